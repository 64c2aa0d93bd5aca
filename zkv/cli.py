"""The ``zkv`` command: a shell for zkv stores, and zkv's tools.

``zkv ls|get|set|del|incr|keys|stats|ping|pub|sub|watch`` talk to one owner (see
docs/cli.md); each is a function in :mod:`zkv.cli_commands`, registered with
:func:`zkv.cli_base.command`. ``zkv serve|keygen|bench`` are tools with parsers of their own
(:data:`TOOLS`: each module exposes ``main(argv) -> int``).

Exit status: 0 done (a key found), 1 a missing key or an error (one line on stderr, no
traceback), 2 a usage error (on stderr, with the usage), 130 Ctrl-C (``sub`` and ``watch``,
which run until Ctrl-C, exit 0), 141 stdout closed by its reader (``zkv keys | head``), as a
program killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import sys
from collections.abc import Sequence

import zmq

from . import cli_commands  # noqa: F401  (registers the shell commands)
from ._version import __version__
from .cli_base import COMMANDS, Command, Context
from .cli_format import UsageError
from .cli_owners import TargetError
from .errors import ZkvError

__all__ = ["DEFAULT_TIMEOUT", "TOOLS", "build_parser", "main"]

#: Tools with parsers of their own: name -> (module with ``main(argv) -> int``, summary).
TOOLS: dict[str, tuple[str, str]] = {
    "serve": ("zkv.serve_cli", "run a standalone owner until Ctrl-C"),
    "keygen": ("zkv.keygen", "make CURVE credentials for tcp endpoints"),
    "bench": ("zkv.bench", "compare zkv with Manager, Pipe, pyzmq, Redis"),
}

#: Seconds a shell command waits for the owner, unless ``--timeout`` or ``ZKV_TIMEOUT`` say.
DEFAULT_TIMEOUT = 10.0

_EPILOG = """\
The target owner: --endpoint, else $ZKV_ENDPOINT, else the only live owner of this user.
Exit status: 0 done, 1 missing key or error, 2 usage error.
`zkv COMMAND --help` gives the options of a command; docs/cli.md has examples."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, not {text!r}")
    return value


def _default_timeout() -> float:
    try:
        return _seconds(os.environ.get("ZKV_TIMEOUT") or str(DEFAULT_TIMEOUT))
    except argparse.ArgumentTypeError:
        return DEFAULT_TIMEOUT


def _version() -> str:
    return (f"zkv {__version__} (pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
            f"Python {platform.python_version()})")


def _add_options(parser: argparse.ArgumentParser, cmd: Command | None) -> None:
    """The options every command shares. On the top-level parser (``cmd`` None) they have
    defaults; on a command's parser they are set only when given there (so that
    ``zkv --json get K`` and ``zkv get K --json`` mean the same)."""
    def default(value: object) -> object:
        return value if cmd is None else argparse.SUPPRESS

    if cmd is None or cmd.target:
        parser.add_argument("-e", "--endpoint", metavar="URL", default=default(None),
                            help="the owner to talk to (ipc://... or tcp://host:port)")
        parser.add_argument("--keys", metavar="DIR", default=default(None),
                            help="tcp credentials made by `zkv keygen` (default: $ZKV_KEYS)")
    parser.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                        default=default(_default_timeout()),
                        help=f"how long to wait for the owner (default: $ZKV_TIMEOUT, else "
                             f"{DEFAULT_TIMEOUT:g})")
    if cmd is not None and cmd.value:
        parser.add_argument("value", metavar="VALUE",
                            help="a Python literal: 42, 2.5, 'text', [1, 2], {'a': None} "
                                 "(- reads it from standard input)")
        how = parser.add_mutually_exclusive_group()
        how.add_argument("--str", action="store_true", help="VALUE is text: store it as a str")
        how.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="VALUE is JSON")
    else:
        parser.add_argument("--json", action="store_true", default=default(False),
                            help="print JSON, for scripts (see docs/cli.md)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``zkv`` parser, and the parser of each shell command by name."""
    parser = argparse.ArgumentParser(
        prog="zkv", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="A shell for zkv stores: read and change keys, publish, subscribe and "
                    "watch, list the owners; and zkv's tools.")
    parser.add_argument("--version", action="version", version=_version())
    _add_options(parser, None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands: dict[str, argparse.ArgumentParser] = {}
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.summary, description=cmd.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        for spec in cmd.args:
            sub.add_argument(*spec.flags, **spec.options)
        _add_options(sub, cmd)
        commands[cmd.name] = sub
    for name, (_module, summary) in TOOLS.items():
        subparsers.add_parser(name, help=summary, add_help=False)
    return parser, commands


def _silence_stdout() -> None:
    """After the reader of stdout went away: send what is still buffered nowhere, so that
    the interpreter's last flush does not fail again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):  # stdout may be closed or replaced
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zkv ARGS`` and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return int(importlib.import_module(TOOLS[args[0]][0]).main(args[1:]))
    parser, commands = build_parser()
    if not args:
        parser.print_help(sys.stderr)
        return 2
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if ns.command is None:  # options, but no command
        parser.print_usage(sys.stderr)
        print("zkv: a COMMAND is needed (zkv --help lists them)", file=sys.stderr)
        return 2
    if ns.command in TOOLS:
        parser.print_usage(sys.stderr)
        print(f"zkv: {ns.command} takes its own options, after its name (zkv {ns.command} "
              "--help)", file=sys.stderr)
        return 2
    cx = Context(COMMANDS[ns.command], ns)
    try:
        status = cx.command.run(cx)
        sys.stdout.flush()
        return status
    except UsageError as exc:
        commands[ns.command].print_usage(sys.stderr)
        cx.note(str(exc))
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130
    except (TargetError, ZkvError, OSError, TypeError, ValueError) as exc:
        cx.note(str(exc) or type(exc).__name__)
        return 1
    finally:
        with contextlib.suppress(KeyboardInterrupt, ZkvError, OSError):  # exiting anyway
            cx.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
