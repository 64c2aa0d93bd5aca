"""How the ``zkv`` command reads values from its arguments and shows them.

- **In**: a ``VALUE`` argument is a Python literal (``ast.literal_eval``: ``42``, ``'text'``,
  ``{'a': [1, 2.5]}``), or, with ``--str``, the text as it is, or, with ``--json``, JSON.
  ``-`` reads the text from standard input.
- **Out**: ``repr`` of the value by default; with ``--json`` one JSON document per value.
  Python values that JSON cannot express (a set, bytes, an instance of a class, a dict with
  non-str keys, NaN) become ``{"$type": "module.Class", "$repr": "..."}`` at the place where
  they occur, so the output is always valid JSON and still says what the value was.
- **Names** (keys, channels) are printed as they are, unless that would be ambiguous on a line
  (empty, whitespace, a control character, a leading quote): then as a Python literal.
- :class:`Progress`: a status line on a terminal's stderr, for work that takes more than a
  second.
"""

from __future__ import annotations

import ast
import json
import math
import sys
import threading
import time
from typing import Any, TextIO

__all__ = [
    "Progress",
    "UsageError",
    "jsonable",
    "parse_value",
    "render",
    "safe_repr",
    "show_name",
    "type_name",
]

#: How ``VALUE`` is read: as a Python literal (default), as plain text, or as JSON.
VALUE_FORMATS = ("literal", "str", "json")


class UsageError(Exception):
    """The command line is wrong (exit status 2); the message says what and how to fix it."""


def type_name(obj: object) -> str:
    """``module.QualName`` of the type of ``obj`` (just the name for builtins)."""
    kind = type(obj)
    module = getattr(kind, "__module__", None)
    if module in (None, "builtins"):
        return kind.__qualname__
    return f"{module}.{kind.__qualname__}"


def safe_repr(value: object) -> str:
    """``repr(value)``, or a placeholder naming the type if its ``__repr__`` fails."""
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__ of a user's class
        return f"<{type_name(value)} object (repr failed: {type(exc).__name__}: {exc})>"


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data; what JSON cannot express becomes
    ``{"$type": ..., "$repr": ...}`` where it occurs."""
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float and math.isfinite(value):
        return value
    if kind in (list, tuple):
        return [jsonable(item) for item in value]
    if kind is dict and all(type(key) is str for key in value):
        return {key: jsonable(item) for key, item in value.items()}
    return {"$type": type_name(value), "$repr": safe_repr(value)}


def render(value: Any, as_json: bool) -> str:
    """One value as the command prints it: ``repr``, or JSON (see the module docstring)."""
    if not as_json:
        return safe_repr(value)
    try:
        return json.dumps(jsonable(value), ensure_ascii=False)
    except RecursionError:  # nested too deeply for the converter: show it whole
        return json.dumps({"$type": type_name(value), "$repr": safe_repr(value)},
                          ensure_ascii=False)


def show_name(name: str) -> str:
    """A key or channel name for a line of output: as it is, or as a Python literal when
    printing it plainly would be ambiguous."""
    if name and name.isprintable() and name[0] not in "'\"" \
            and not any(char.isspace() for char in name):
        return name
    return repr(name)


def parse_value(text: str, how: str, stdin: TextIO | None = None) -> Any:
    """The value meant by a ``VALUE`` argument; ``how`` is ``"literal"``, ``"str"`` or
    ``"json"``, and ``"-"`` means the text of ``stdin``. Raises :class:`UsageError` naming what
    is wrong and how to fix it."""
    if how not in VALUE_FORMATS:
        raise ValueError(f"unknown value format {how!r}")
    if text == "-":
        text = (stdin or sys.stdin).read()
        if how != "str":
            text = text.strip()
    if how == "str":
        return text
    if how == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"VALUE is not valid JSON ({exc}): {text[:80]!r}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise UsageError(
            f"VALUE {text[:80]!r} is not a Python literal ({reason}); quote a string as "
            f"\"'{text[:20]}'\", or pass --str to store the text as it is, or --json") from None


class Progress:
    """A status line on ``stream`` (stderr) for work that turns out to take more than
    ``delay`` seconds: nothing is shown for quick work, nor when ``stream`` is not a terminal.
    A background thread rewrites the line in place about ten times a second; it is erased when
    the ``with`` block ends. Update it with :meth:`stage` and :meth:`advance`."""

    def __init__(self, what: str, stream: TextIO | None = None, delay: float = 1.0) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.done = 0
        self.total: int | None = None
        self._stage = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def stage(self, text: str, total: int | None = None) -> None:
        """What is being done now, and how many steps it has (None: unknown)."""
        self._stage, self.total, self.done = text, total, 0

    def advance(self, steps: int = 1) -> None:
        self.done += steps

    def line(self) -> str:
        """The status line as it would be shown now."""
        count = ""
        if self.total:
            count = f" {self.done:,}/{self.total:,} ({100 * self.done // self.total}%)"
        return f"{self.what}: {self._stage}{count}"

    def __enter__(self) -> Progress:
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        if tty:
            self._thread = threading.Thread(target=self._run, name="zkv-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._shown:
            self._write("\r\x1b[K")

    def _run(self) -> None:
        started = time.monotonic()
        if self._stop.wait(self.delay):
            return
        while not self._stop.is_set():
            self._shown = True
            elapsed = time.monotonic() - started
            self._write(f"\r\x1b[K{self.line()} [{elapsed:.0f}s]")
            self._stop.wait(0.1)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the work goes on
            self._stop.set()
