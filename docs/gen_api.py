"""Write docs/api.md from the docstrings of zkv's public names, and the table of operations
in docs/protocol.md from zkv.ops (``make docs``).

``python docs/gen_api.py --check`` exits 1 if either is out of date (the test suite runs it,
so the reference cannot drift from the code).

Why a script of our own rather than mkdocstrings: zkv's docstrings are written in reST
(``:class:`~zkv.Store```, double backticks), which this script turns into Markdown; the result
is a plain Markdown file that reads the same on the documentation site and in the repository,
and that a test keeps fresh. It runs in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import zkv

OUT = Path(__file__).with_name("api.md")

#: (section title, intro, names): a name is ``zkv.NAME`` unless it is a dotted path.
SECTIONS: list[tuple[str, str, list[str]]] = [
    ("Getting a store", "", ["store", "serve", "connect", "shared_memory"]),
    ("The store", "", ["Store", "Pipeline", "Lock", "MISSING"]),
    ("asyncio", "The same store, awaited: see [the guide](guide.md#asyncio). Each method awaits "
     "the `Store` method of the same name; `zkv.aio.SYNC_ONLY` lists those that have no "
     "twin, and why.", ["astore", "aconnect", "AsyncStore", "AsyncPipeline", "AsyncLock"]),
    ("Snapshots", "See [the guide](guide.md#snapshots).", ["zkv.snapshot.SaveResult"]),
    ("Publish / subscribe", "", ["Subscriber", "Message", "Change"]),
    ("Settings", "", ["Options"]),
    ("Testing helpers", "`zkv.testing` gives a test a store of its own; see the pytest "
     "fixture in [recipes.md](recipes.md#a-pytest-fixture-with-a-private-store).",
     ["zkv.testing.private_store", "zkv.testing.wait_for"]),
    ("Credentials for tcp", "The `keys` option (or `ZKV_KEYS`) takes a directory made by "
     "`zkv keygen`, or key material given directly, as these classes (see "
     "[security.md](security.md)).", ["zkv.auth.OwnerKeys", "zkv.auth.ClientKeys"]),
    ("Redis and Valkey", "A store kept in Redis or Valkey is joined with `zkv.connect(URL)` "
     "or `ZKV_ENDPOINT=URL` (see [scaling.md](scaling.md)); these errors are its own.",
     ["zkv.backends.ContentionError", "zkv.backends.UnsupportedError"]),
    ("Errors", "", ["ZkvError", "ZkvConnectionError", "NoOwnerError", "OwnerGoneError",
                    "AuthenticationError", "ZkvTimeoutError", "SerializationError",
                    "EncodeError", "DecodeError", "MessageTooLargeError", "StoreClosedError",
                    "LockError", "ReentrancyError", "SnapshotError", "ProtocolError",
                    "RemoteError"]),
    ("Compatibility with the original module", "", ["KeyValueStore", "GlobalKeyValueStore"]),
]

#: Members whose code has no docstring yet: what the reference says about them.
#: Docstrings for members that cannot carry their own: none left (every public member has
#: its docstring in the code; keep it that way).
FALLBACK_DOCS: dict[tuple[str, str], str] = {}

#: Members left out: used through the class's own protocol (documented in its docstring).
SKIPPED = {"__enter__", "__iter__", "__aiter__", "__aenter__", "__aexit__", "timeout_ms",
           "to_dict", "from_dict"}

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc):`(~?)([\w.]+)`")
_NOISE = ("typing.", "collections.abc.", "zkv.store.", "zkv.locks.", "zkv.pubsub.",
          "zkv.aio.store.", "zkv.snapshot.",
          "zkv.config.", "zkv.auth.", "asyncio.events.", "os.")


def _markdown(text: str) -> str:
    """reST roles and double backticks turned into Markdown code."""
    def code(match: re.Match[str]) -> str:
        name = match.group(2)
        return f"`{name.split('.')[-1] if match.group(1) else name}`"

    return _ROLE.sub(code, text).replace("``", "`")


def _doc(obj: Any) -> str:
    return _markdown(inspect.cleandoc(obj.__doc__ or "").strip())


def _signature(obj: Any) -> str:
    """The signature as a reader wants it: short type names, real defaults."""
    try:
        sig = inspect.signature(obj, eval_str=True)
    except (NameError, TypeError, ValueError):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return "(...)"
    text = str(sig)
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None and inspect.isgeneratorfunction(wrapped):  # @contextmanager
        text = re.sub(r"-> Iterator\[(.*)\]$", r"-> ContextManager[\1]",
                      text.replace("collections.abc.", ""))
    for noise in _NOISE:
        text = text.replace(noise, "")
    return text.replace("~", "")  # TypeVars: F, not ~F


def _item(head: str, doc: str) -> list[str]:
    """A Markdown list item whose continuation lines are indented under it."""
    first, *rest = doc.splitlines() or [""]
    return [f"- {head} — {first}", *[f"  {line}" if line else "" for line in rest], ""]


def _members(cls: type) -> list[tuple[str, Any]]:
    """The documented members of ``cls``, those of zkv's own base classes first (a pipeline's
    queueing methods, a lock's ``locked``)."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is cls or klass.__module__.startswith("zkv."):
            found.update(vars(klass))
    out = []
    for name, member in found.items():
        if name in SKIPPED or (name.startswith("_") and name != "__init__"):
            continue
        if name == "__init__" and (cls.__name__, name) not in FALLBACK_DOCS \
                and not (member.__doc__ or "").strip():
            continue  # made by zkv, not by the caller
        if isinstance(member, property) or inspect.isfunction(member) \
                or isinstance(member, (staticmethod, classmethod)):
            out.append((name, member))
    return out


def _resolve(name: str) -> tuple[str, Any]:
    """(the name as written in the docs, the object) for ``NAME`` or ``module.NAME``."""
    if "." not in name:
        return f"zkv.{name}", getattr(zkv, name)
    module, _dot, attr = name.rpartition(".")
    return name, getattr(importlib.import_module(module), attr)


def _rst_table(text: str) -> list[list[str]]:
    """The rows of the first reST simple table in ``text`` (continuation lines joined)."""
    lines = text.splitlines()
    borders = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line.strip())]
    if len(borders) < 3:
        return []
    spans = [m.span() for m in re.finditer(r"=+", lines[borders[0]])]
    rows: list[list[str]] = []
    for line in lines[borders[1] + 1:borders[2]]:
        cells = [line[a:b if i + 1 < len(spans) else None].strip()
                 for i, (a, b) in enumerate(spans)]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
    return rows


def _options_fields(cls: type) -> list[str]:
    """The fields of :class:`zkv.Options` as a Markdown table, from the config module's."""
    described = {row[0].strip("`"): row for row in _rst_table(sys.modules[cls.__module__]
                                                              .__doc__ or "")}
    lines = ["| field | environment variable | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        row = described.get(field.name)
        if row is None:
            raise SystemExit(f"gen_api: Options.{field.name} is not in the table of "
                             f"{cls.__module__}'s docstring")
        var, default, meaning = (_markdown(cell) for cell in row[1:4])
        lines.append(f"| `{field.name}` | {var} | {default} | {meaning} |")
    return [*lines, ""]


def _class(written: str, cls: type) -> list[str]:
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    suffix = f"({', '.join(bases)})" if bases and issubclass(cls, BaseException) else ""
    lines = [f"### class `{written}`{suffix}", "", _doc(cls), ""]
    if issubclass(cls, BaseException):
        return lines
    if dataclasses.is_dataclass(cls) and cls is zkv.Options:
        lines += _options_fields(cls)
    store_docs = {name: _doc(member).split("\n\n")[0] for name, member in _members(zkv.Store)}
    for name, member in _members(cls):
        func = member.fget if isinstance(member, property) else member
        if isinstance(func, staticmethod):
            func = func.__func__
        if isinstance(func, classmethod):
            func = getattr(cls, name)  # bound: no cls in the signature
        doc = _doc(func) or FALLBACK_DOCS.get((cls.__name__, name), "")
        if not doc and cls is zkv.Pipeline and name in store_docs:
            doc = f"Queue `Store.{name}`; its result goes to `results`."
        if not doc:
            raise SystemExit(f"gen_api: {cls.__name__}.{name} has no docstring: write one "
                             "(or add it to FALLBACK_DOCS or SKIPPED)")
        if isinstance(member, property):
            lines += _item(f"**`{name}`** (property)", doc)
        else:
            sig = _signature(func).replace("(self, ", "(").replace("(self)", "()")
            typed_self = re.match(r"\(self: (\w+)(, )?", sig)  # (self: Q, ...) -> Q
            if typed_self:
                sig = "(" + sig[typed_self.end():]
                sig = re.sub(rf"-> {typed_self[1]}$", f"-> {cls.__name__}", sig)
            head = f"{cls.__name__}{sig.removesuffix(' -> None')}" if name == "__init__" \
                else f"{name}{sig}"
            lines += _item(f"**`{head}`**", doc)
    return lines


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `make docs` (`docs/gen_api.py`); do not edit by hand.",
        "The guide ([guide.md](guide.md)) explains how the pieces fit together.",
        "",
    ]
    documented: set[str] = set()
    seen: dict[int, str] = {}
    for title, intro, names in SECTIONS:
        lines += [f"## {title}", ""]
        if intro:
            lines += [intro, ""]
        for name in names:
            documented.add(name)
            if name == "shared_memory":
                lines += ["### `zkv.shared_memory`", "",
                          "The process-wide store under the name the original module used: "
                          "the same object as `zkv.store()`, made on first use.", ""]
                continue
            written, obj = _resolve(name)
            if name == "MISSING":
                lines += ["### `zkv.MISSING`", "", "Marks an absent key: "
                          "`compare_and_set(key, zkv.MISSING, value)` creates `key` only if it "
                          "does not exist; `pop(key, default)` without a default raises "
                          "KeyError.", ""]
                continue
            if id(obj) in seen:
                lines += [f"### `{written}`", "", f"The same object as `{seen[id(obj)]}`.", ""]
                continue
            seen[id(obj)] = written
            if inspect.isclass(obj):
                lines += _class(written, obj)
            else:
                lines += [f"### `{written}{_signature(obj)}`", "", _doc(obj), ""]
    missing = sorted(set(zkv.__all__) - documented - {"__version__"})
    if missing:
        raise SystemExit(f"gen_api: public names without a section: {missing}")
    return "\n".join(line.rstrip() for line in lines).rstrip() + "\n"


PROTOCOL = Path(__file__).with_name("protocol.md")
_OPS_BLOCK = re.compile(r"(<!-- ops:begin -->\n).*?(<!-- ops:end -->)", re.S)


def render_protocol() -> str:
    """docs/protocol.md with its table of operations made from zkv.ops (the one place each
    operation is defined)."""
    from zkv import ops

    text = PROTOCOL.read_text()
    if not _OPS_BLOCK.search(text):
        raise SystemExit("gen_api: docs/protocol.md has no <!-- ops:begin/end --> block")
    return _OPS_BLOCK.sub(lambda m: m.group(1) + ops.describe() + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="fail if docs/api.md or the table of docs/protocol.md is stale")
    args = parser.parse_args(argv)
    outputs = {OUT: render(), PROTOCOL: render_protocol()}
    if args.check:
        stale = [path.name for path, text in outputs.items()
                 if not path.exists() or path.read_text() != text]
        if stale:
            print(f"{', '.join(stale)} out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
