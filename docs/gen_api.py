"""Write docs/api.md from the docstrings of zkv's public names (``make docs``).

``python docs/gen_api.py --check`` exits 1 if docs/api.md is out of date (the test suite runs
it, so the reference cannot drift from the code).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import zkv

OUT = Path(__file__).with_name("api.md")

SECTIONS: list[tuple[str, list[str]]] = [
    ("Getting a store", ["store", "serve", "connect", "shared_memory"]),
    ("The store", ["Store", "Pipeline", "Lock", "MISSING"]),
    ("Publish / subscribe", ["Subscriber", "Message", "Change"]),
    ("Settings", ["Options"]),
    ("Errors", ["ZkvError", "ZkvConnectionError", "NoOwnerError", "OwnerGoneError",
                "AuthenticationError", "ZkvTimeoutError", "SerializationError", "EncodeError",
                "DecodeError", "MessageTooLargeError", "StoreClosedError", "LockError",
                "ProtocolError", "RemoteError"]),
    ("Compatibility with the original module", ["KeyValueStore", "GlobalKeyValueStore"]),
]


_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc):`~?([\w.]+)`")


def _doc(obj: Any) -> str:
    """The docstring, with reST roles and double backticks turned into Markdown code."""
    text = inspect.cleandoc(obj.__doc__ or "").strip()
    def code(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"`{name.split('.')[-1] if '~' in match.group(0) else name}`"

    return _ROLE.sub(code, text).replace("``", "`")


def _signature(obj: Any) -> str:
    try:
        sig = inspect.signature(obj, eval_str=True)
    except Exception:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return "(...)"
    text = str(sig)
    for noise in ("typing.", "collections.abc.", "zkv.store.", "zkv.locks.", "zkv.pubsub.",
                  "zkv.config.", "asyncio.events."):
        text = text.replace(noise, "")
    return text.replace("'", "")


def _item(head: str, doc: str) -> list[str]:
    """A Markdown list item whose continuation lines are indented under it."""
    first, *rest = doc.splitlines() or [""]
    return [f"- {head} — {first}", *[f"  {line}" if line else "" for line in rest], ""]


def _members(cls: type) -> list[tuple[str, Any]]:
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__enter__", "__iter__", "__aiter__"):
            continue
        if isinstance(member, property):
            out.append((name, member))
        elif inspect.isfunction(member) or isinstance(member, (staticmethod, classmethod)):
            out.append((name, member))
    return out


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
    for title, names in SECTIONS:
        lines += [f"## {title}", ""]
        for name in names:
            documented.add(name)
            if name == "shared_memory":
                lines += ["### `zkv.shared_memory`", "",
                          "The process-wide store under the name the original module used: "
                          "the same object as `zkv.store()`, made on first use.", ""]
                continue
            obj = getattr(zkv, name)
            if name == "MISSING":
                lines += ["### `zkv.MISSING`", "", "Marks an absent key: "
                          "`compare_and_set(key, zkv.MISSING, value)` creates `key` only if it "
                          "does not exist; `pop(key, default)` without a default raises "
                          "KeyError.", ""]
                continue
            if id(obj) in seen:
                lines += [f"### `zkv.{name}`", "", f"The same object as `zkv.{seen[id(obj)]}`.", ""]
                continue
            seen[id(obj)] = name
            if inspect.isclass(obj):
                bases = [b.__name__ for b in obj.__bases__ if b is not object]
                suffix = f"({', '.join(bases)})" if bases and issubclass(obj, BaseException) \
                    else ""
                lines += [f"### class `zkv.{name}`{suffix}", "", _doc(obj), ""]
                if issubclass(obj, BaseException):
                    continue
                for member_name, member in _members(obj):
                    func = member.fget if isinstance(member, property) else member
                    if isinstance(func, (staticmethod, classmethod)):
                        func = func.__func__
                    doc = _doc(func)
                    if not doc:
                        continue
                    if isinstance(member, property):
                        lines += _item(f"**`{member_name}`** (property)", doc)
                    else:
                        sig = _signature(func).replace("(self, ", "(").replace("(self)", "()")
                        lines += _item(f"**`{member_name}{sig}`**", doc)
            else:
                lines += [f"### `zkv.{name}{_signature(obj)}`", "", _doc(obj), ""]
    missing = sorted(set(zkv.__all__) - documented - {"__version__"})
    if missing:
        raise SystemExit(f"gen_api: public names without a section: {missing}")
    return "\n".join(line.rstrip() for line in lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
