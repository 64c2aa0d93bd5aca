"""The ``zkv`` command: ``zkv bench``, ``zkv serve``, ``zkv keygen``.

Each subcommand lives in its own module, which exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

_COMMANDS = {
    "bench": ("zkv.bench", "measure zkv against Manager, Pipe, bare pyzmq and Redis"),
    "serve": ("zkv.serve_cli", "run a standalone owner (ipc or authenticated tcp)"),
    "keygen": ("zkv.keygen", "make CURVE credentials for tcp endpoints"),
}


def _usage() -> str:
    lines = ["usage: zkv <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_mod, summary) in _COMMANDS.items()]
    lines += ["", "zkv <command> --help for the options of a command"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in _COMMANDS:
        print(f"zkv: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    return int(module.main(rest))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
