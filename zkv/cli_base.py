"""The parts every ``zkv`` shell command shares: the registry and the :class:`Context`.

A command is one function that takes a :class:`Context` and returns the exit status, registered
by the :func:`command` decorator with its summary and its arguments::

    @command("get", "print the value of KEY (exit status 1 if it is missing)",
             arg("key", metavar="KEY"))
    def get(cx: Context) -> int:
        value = cx.store.get(cx.args.key, MISSING)
        if value is MISSING:
            return cx.missing(cx.args.key)
        cx.show(value)
        return 0

The context gives the parsed arguments (``cx.args``), the store of the target owner (connected
on first use of ``cx.store``, closed by the caller), and the output helpers: :meth:`show`,
:meth:`emit`, :meth:`note`, :meth:`missing` and :meth:`follow` for commands that stream until
Ctrl-C. Errors need no handling in a command: :func:`zkv.cli.main` turns zkv's exceptions into
a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TextIO

from .cli_format import parse_value, render
from .cli_owners import resolve
from .errors import DecodeError, EncodeError, SerializationError
from .pubsub import Message
from .store import Store, connect

__all__ = ["COMMANDS", "Arg", "Command", "Context", "Stream", "arg", "command", "unshowable"]

#: What a command does: given its context, return the exit status.
Run = Callable[["Context"], int]


class Stream(Protocol):
    """What :meth:`Context.follow` prints from: a :class:`~zkv.Subscriber`, or anything that
    receives :class:`~zkv.Message` objects the same way."""

    @property
    def dropped(self) -> int:
        """Messages lost so far because the reader fell behind."""
        ...

    def receive_message(self, timeout: float | None = None) -> Message:
        """The next message; waits for it (None: as long as it takes)."""
        ...

    def close(self) -> None:
        """Stop receiving (idempotent)."""
        ...


@dataclasses.dataclass(frozen=True)
class Arg:
    """The arguments of one ``ArgumentParser.add_argument`` call (see :func:`arg`)."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument of a command, written as for :meth:`argparse.ArgumentParser.add_argument`."""
    return Arg(flags, options)


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered shell command (see :func:`command`)."""

    name: str
    summary: str
    run: Run
    args: tuple[Arg, ...]
    value: bool
    target: bool

    @property
    def description(self) -> str:
        """What ``zkv NAME --help`` says: the function's docstring, else the summary."""
        return inspect.getdoc(self.run) or self.summary


#: The shell commands, by name, in the order they were registered.
COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, *args: Arg, value: bool = False,
            target: bool = True) -> Callable[[Run], Run]:
    """Register the decorated function as ``zkv NAME``.

    ``summary`` is its line in ``zkv --help``; the function's docstring, if any, is what
    ``zkv NAME --help`` says. ``args`` are its arguments (:func:`arg`). ``value=True`` adds a
    ``VALUE`` argument and the ``--str``/``--json`` switches that say how to read it
    (:meth:`Context.value`).
    ``target=False`` for a command that does not talk to one owner: it gets no
    ``--endpoint``/``--keys`` options. Every command gets ``--timeout``, and ``--json`` (JSON
    output) unless it takes a ``VALUE``.
    """
    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise ValueError(f"zkv command {name!r} is registered twice")
        COMMANDS[name] = Command(name, summary, run, args, value, target)
        return run
    return register


def unshowable(exc: SerializationError) -> dict[str, Any]:
    """What to print for a value that exists but cannot be shown here: its type when the error
    names it, and the reason."""
    text = str(exc)
    kind = None
    if isinstance(exc, EncodeError) and "of type " in text:
        kind = text.split("of type ", 1)[1].split(":", 1)[0]
    return {"$type": kind, "$error": text}


class Context:
    """What a running command works with: its arguments, the target's store, its output."""

    def __init__(self, cmd: Command, args: argparse.Namespace, *,
                 stdout: TextIO | None = None, stderr: TextIO | None = None,
                 stdin: TextIO | None = None) -> None:
        self.command = cmd
        self.args = args
        self.json: bool = bool(getattr(args, "json", False)) and not cmd.value
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.stdin = stdin if stdin is not None else sys.stdin
        self._store: Store | None = None

    # -- the target --------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        return float(self.args.timeout)

    @property
    def store(self) -> Store:
        """A client of the target owner (``--endpoint``, ``ZKV_ENDPOINT`` or the only live
        owner), connected on first use."""
        if self._store is None:
            self._store = connect(resolve(getattr(self.args, "endpoint", None)),
                                  timeout=self.timeout, keys=getattr(self.args, "keys", None))
        return self._store

    def close(self) -> None:
        """Close the store if one was opened (idempotent)."""
        made, self._store = self._store, None
        if made is not None:
            made.close()

    # -- input ---------------------------------------------------------------------------------

    def value(self) -> Any:
        """The ``VALUE`` argument, read as its switches say (see :mod:`zkv.cli_format`)."""
        how = "str" if self.args.str else "json" if getattr(self.args, "json", False) \
            else "literal"
        return parse_value(self.args.value, how, self.stdin)

    # -- output --------------------------------------------------------------------------------

    def out(self, line: str) -> None:
        """Print one line on stdout, flushed at once (a reader may be waiting for it)."""
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def show(self, value: Any) -> None:
        """Print a value: its ``repr``, or JSON with ``--json``."""
        self.out(render(value, self.json))

    def emit(self, data: Any, human: str) -> None:
        """Print one result: ``data`` as JSON with ``--json``, else the ``human`` line."""
        self.out(render(data, True) if self.json else human)

    def note(self, text: str) -> None:
        """A message for the person at the terminal, on stderr: ``zkv CMD: text``."""
        self.stderr.write(f"zkv {self.command.name}: {text}\n")
        self.stderr.flush()

    def missing(self, key: str) -> int:
        """Say that ``key`` does not exist; returns exit status 1."""
        self.note(f"no key {key!r}")
        return 1

    def cannot_show(self, exc: SerializationError) -> int:
        """Say that a value exists but cannot be shown here (its type, and why); returns exit
        status 1."""
        info = unshowable(exc)
        self.emit(info, f"<{info['$type'] or 'a value'} that cannot be shown here>")
        hint = ""
        if isinstance(exc, DecodeError) and "No module named" in str(exc):
            hint = " (run `python -m zkv` in the program's directory, or set PYTHONPATH, " \
                   "so that its modules import here)"
        self.note(f"{exc}{hint}")
        return 1

    def follow(self, sub: Stream, line: Callable[[Message], tuple[Any, str]]) -> int:
        """Print a line for every message of ``sub`` as it arrives, until Ctrl-C (exit status
        0) or until the owner is gone (an error). ``line(message)`` gives (JSON data, human
        line). A note on stderr says when the subscription is live; messages that cannot be
        loaded here, and messages lost because this command fell behind, are reported there
        too."""
        self.note("listening (Ctrl-C to stop)")  # on stderr, once the subscription is live
        dropped = 0
        try:
            for message in _messages(sub, self):
                data, human = line(message)
                self.emit(data, human)
                if sub.dropped != dropped:
                    self.note(f"lost {sub.dropped - dropped} message(s): this command fell "
                              "behind")
                    dropped = sub.dropped
        except KeyboardInterrupt:
            return 0
        finally:
            sub.close()
        return 0  # pragma: no cover - the loop above ends only by an exception


def _messages(sub: Stream, cx: Context) -> Iterator[Message]:
    while True:
        try:
            yield sub.receive_message()
        except DecodeError as exc:
            cx.note(f"a message that cannot be loaded here: {exc}")

