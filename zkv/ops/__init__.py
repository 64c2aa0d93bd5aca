"""The table of operations: everything a client can ask of the owner, each defined once.

An entry (:class:`Op`) holds the operation's code on the wire, its properties, the *kinds* of
its arguments and of its result (:mod:`zkv.ops.kinds`: how each travels, and what it is in the
owner), and ``apply``: what the owner does, given a :class:`~zkv.ops.context.Context` (the
:class:`~zkv.state.State` and the few services of the owner an operation may use). From the
table:

- the owner serves requests (:mod:`zkv.owner.requests`): decode the arguments, apply, encode
  the result;
- the owner-local core (:mod:`zkv.owner.local`) applies operations to objects directly;
- the remote core (:mod:`zkv.remote`) encodes the arguments and decodes the result;
- pipelines, in both cores, are lists of ``(op, args)`` run by :func:`run_all`;
- the table of operations in docs/protocol.md is generated from it (a test checks it).

Adding an operation is one entry here, one :class:`~zkv.state.State` method and one
:class:`~zkv.Store` method.

Arguments travel in the order of :attr:`Op.args`, except that single-frame arguments come first
and the one argument of a variable number of frames last; an operation with several of those
sends them as sections (see :mod:`zkv.wire`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, cast

from .. import codec, wire
from ..codec import Frame
from ..errors import ProtocolError
from ..state import Entry
from . import kinds as k
from .context import DEFERRED, Context, Pickled
from .kinds import Arg, Result

__all__ = ["ALL", "BY_CODE", "DEFERRED", "OPS", "PACK_LIMIT", "Arg", "Context", "Op", "Pickled",
           "Result", "describe", "run_all"]

P = ParamSpec("P")
R = TypeVar("R")

#: What :meth:`Op.touches` returns for an operation that may read or write any key.
ALL: Any = type("AllKeys", (), {"__repr__": lambda self: "ALL"})()


# -- the entry ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Op(Generic[P, R]):
    """One operation. ``Op[P, R]``: called with arguments ``P``, its result is ``R`` (as a
    :class:`~zkv.core.Core` returns it; ``MISSING`` stands for an absent key)."""

    name: str
    code: int
    args: tuple[Arg, ...]
    result: Result
    apply: Callable[..., Any]
    doc: str
    #: No reply: the sender does not wait.
    one_way: bool = False
    #: May be queued in a pipeline (it neither waits nor changes the session).
    pipelined: bool = True
    #: Its reply may name blob files instead of carrying large frames (a read, which the
    #: client can simply ask again if a file is gone by the time it looks).
    named_reply: bool = False
    #: Only for another process (about its session): the owner-local core never sends it.
    remote_only: bool = False
    #: May read or write any key (for the read cache).
    all_keys: bool = False
    #: A shorter encoding for the usual case: frames, or None to use the general one.
    pack: Callable[..., list[Frame] | None] | None = None
    #: Its inverse: the decoded arguments, or None if ``frames`` are not packed.
    unpack: Callable[[list[Any]], list[Any] | None] | None = None

    def __post_init__(self) -> None:
        multi = [i for i, kind in enumerate(self.args) if not kind.single]
        singles = [i for i, kind in enumerate(self.args) if kind.single]
        object.__setattr__(self, "_singles", singles)
        object.__setattr__(self, "_multi", multi)

    def __repr__(self) -> str:
        return f"<zkv op {self.name} {self.code}>"

    # -- client side ---------------------------------------------------------------------------

    def encode(self, *args: Any) -> list[Frame]:
        """The request's argument frames."""
        if self.pack is not None:
            packed = self.pack(*args)
            if packed is not None:
                return packed
        kinds = self.args
        frames: list[Frame] = []
        for i in self._singles:  # type: ignore[attr-defined]
            frames.extend(kinds[i].encode(args[i]))
        multi: list[int] = self._multi  # type: ignore[attr-defined]
        if len(multi) == 1:
            frames.extend(kinds[multi[0]].encode(args[multi[0]]))
        elif multi:
            frames.extend(wire.pack_sections([kinds[i].encode(args[i]) for i in multi]))
        return frames

    def touches(self, args: Sequence[Any]) -> Any:
        """The keys a call reads or writes (a list), ``ALL``, or None."""
        if self.all_keys:
            return ALL
        keys: list[str] = []
        for kind, value in zip(self.args, args, strict=False):
            if kind.key:
                keys.append(value)
            elif kind.keys:
                keys.extend(v if isinstance(v, str) else v[0] for v in value)
        return keys or None

    def read(self, status: int, frames: list[Any], args: tuple[Any, ...]) -> R:
        """The result, from a reply (raises the error an error reply carries)."""
        if status == wire.Status.ERROR:
            raise wire.decode_error(frames)
        return cast(R, self.result.read(status, frames, args))

    # -- owner side ----------------------------------------------------------------------------

    def decode(self, frames: list[Any]) -> list[Any]:
        """The arguments ``apply`` gets, from a request's frames. Raises ProtocolError if the
        frames do not fit (or DecodeError, TypeError, ValueError for a bad argument)."""
        if self.unpack is not None:
            unpacked = self.unpack(frames)
            if unpacked is not None:
                return unpacked
        kinds = self.args
        singles: list[int] = self._singles  # type: ignore[attr-defined]
        multi: list[int] = self._multi  # type: ignore[attr-defined]
        n = len(singles)
        if len(frames) < n + (1 if multi else 0) or (not multi and len(frames) != n):
            raise ProtocolError(f"{self.name}: {len(frames)} argument frames do not fit "
                                f"({', '.join(kind.name for kind in kinds) or 'none'})")
        out: list[Any] = [None] * len(kinds)
        for at, i in enumerate(singles):
            out[i] = kinds[i].decode(frames[at:at + 1])
        rest = frames[n:]
        if len(multi) == 1:
            out[multi[0]] = kinds[multi[0]].decode(rest)
        elif multi:
            sections = wire.unpack_sections(rest)
            if len(sections) != len(multi) or not all(sections):
                raise ProtocolError(f"{self.name} needs {len(multi)} non-empty sections")
            for i, section in zip(multi, sections, strict=True):
                out[i] = kinds[i].decode(list(section))
        return out

    def local(self, ctx: Context, *args: Any) -> R:
        """Apply the operation in the owner's own process, to objects."""
        value = self.apply(ctx, *self.local_args(args))
        return cast(R, self.result.local(value, args))

    def local_args(self, args: Sequence[Any]) -> list[Any]:
        """What ``apply`` gets in the owner's own process (values to store are pickled here):
        ``local`` is ``result.local(apply(ctx, *local_args(args)), args)``, in three steps for
        a caller that holds the store's lock only for the middle one."""
        return [kind.local(arg) for kind, arg in zip(self.args, args, strict=True)]


# -- what the owner does --------------------------------------------------------------------------

def _get(ctx: Context, key: str) -> Entry | None:
    return ctx.state.get(key)


def _set(ctx: Context, key: str, value: Entry, ttl: float | None) -> None:
    ctx.state.put(key, value, ttl)


def _pack_set(key: str, value: Any, ttl: float | None) -> list[Frame] | None:
    """A set without ttl of a value that is one small frame: key and value in one frame."""
    if ttl is not None:
        return None
    frames = codec.dumps(value)
    if len(frames) == 1 and type(frames[0]) is bytes and len(frames[0]) < PACK_LIMIT:
        return [wire.pack_key_value(wire.key_bytes(key), frames[0])]
    return [wire.key_bytes(key), b"", *frames]  # (the general layout, pickled once)


def _unpack_set(frames: list[Any]) -> list[Any] | None:
    if len(frames) != 1:
        return None
    name, value = wire.unpack_key_value(bytes(frames[0]))
    return [wire.key_str(name), Entry.from_frames([value]), None]


#: Bytes: a ``set`` whose value pickles to one frame smaller than this travels packed with its
#: key (see :func:`zkv.wire.pack_key_value`).
PACK_LIMIT = 32 * 1024


def _delete(ctx: Context, key: str) -> bool:
    return ctx.state.delete(key) is not None


def _contains(ctx: Context, key: str) -> bool:
    return ctx.state.contains(key)


def _pop(ctx: Context, key: str) -> Entry | None:
    return ctx.state.pop(key, travel=ctx.remote)


def _modify(ctx: Context, key: str, fn: Callable[[Any], Any], default: Any) -> Entry:
    if not callable(fn):
        raise TypeError(f"modify needs a callable, not {type(fn).__name__}")
    return ctx.state.modify(key, fn, default, travel=ctx.remote)


def _incr(ctx: Context, key: str, amount: int | float) -> int | float:
    return ctx.state.incr(key, amount)


def _setdefault(ctx: Context, key: str, value: Entry) -> Entry:
    return ctx.state.setdefault(key, value)


def _cas(ctx: Context, key: str, expected: Any, new: Entry) -> bool:
    return ctx.state.compare_and_set(key, expected, new)


def _transact(ctx: Context, fn: Callable[[Any], Any]) -> Any:
    if not callable(fn):
        raise TypeError(f"transact needs a callable, not {type(fn).__name__}")
    if ctx.remote:  # the result is pickled inside: if it cannot travel, nothing changes
        return Pickled(ctx.state.transact(lambda view: codec.dumps(fn(view)), travel=True))
    return ctx.state.transact(fn)


def _get_many(ctx: Context, keys: list[str]) -> list[Entry | None]:
    return ctx.state.get_many(keys)


def _set_many(ctx: Context, items: list[tuple[str, Entry]], ttl: float | None) -> None:
    ctx.state.put_many(items, ttl)


def _get_all(ctx: Context, prefix: str) -> list[tuple[str, Entry]]:
    return ctx.state.items(prefix)


def _keys(ctx: Context, prefix: str) -> list[str]:
    return ctx.state.keys(prefix)


def _delete_prefix(ctx: Context, prefix: str) -> int:
    return ctx.state.clear(prefix)


def _scan(ctx: Context, cursor: int, prefix: str, count: int) -> tuple[int, list[str]]:
    if type(count) is not int or count < 1:
        raise ValueError(f"scan count must be an int >= 1, not {count!r}")
    return ctx.state.scan(cursor, prefix, count)


def _len(ctx: Context) -> int:
    return ctx.state.length()


def _clear(ctx: Context) -> None:
    ctx.state.clear()


def _expire(ctx: Context, key: str, seconds: float | None) -> bool:
    if seconds is None:
        raise ValueError("expire needs a number of seconds")
    return ctx.state.expire(key, seconds)


def _ttl(ctx: Context, key: str) -> Any:
    return ctx.state.ttl(key)


def _persist(ctx: Context, key: str) -> bool:
    return ctx.state.persist(key)


def _lock(ctx: Context, name: str, token: bytes, timeout: float | None) -> Any:
    return ctx.acquire_lock(name, token, timeout)


def _unlock(ctx: Context, name: str, token: bytes) -> bool:
    return ctx.release_lock(name, token)


def _publish(ctx: Context, channel: str, frames: list[Frame]) -> None:
    ctx.publish(channel, frames)


def _bye(ctx: Context) -> None:
    ctx.end_session()


def _stats(ctx: Context) -> dict[str, int]:
    return ctx.stats()


def _cache_watch(ctx: Context, prefixes: list[bytes]) -> int:
    return ctx.cache_watch(prefixes)


def _cache_unwatch(ctx: Context, prefixes: list[bytes]) -> None:
    ctx.cache_unwatch(prefixes)


def _cache_sync(ctx: Context) -> int:
    return ctx.cache_sync()


def _save(ctx: Context, path: str) -> Any:
    return ctx.save(path)


def _pipeline(ctx: Context, *args: Any) -> Any:
    raise ProtocolError("a pipeline is served by the owner's loop itself")  # pragma: no cover


# -- the table ------------------------------------------------------------------------------------

GET: Op[[str], Any] = Op(
    "get", 1, (k.KEY,), k.ENTRY, _get, "the value of a key", named_reply=True)
SET: Op[[str, Any, float | None], None] = Op(
    "set", 2, (k.KEY, k.VALUE, k.TTL), k.NOTHING, _set,
    "set a key (ttl: seconds until it expires; none clears its expiry); a value of one small "
    "frame travels packed with its key in one frame", pack=_pack_set, unpack=_unpack_set)
DELETE: Op[[str], bool] = Op("delete", 3, (k.KEY,), k.FOUND, _delete, "remove a key")
PIPELINE: Op[..., list[Any]] = Op(
    "pipeline", 4, (), k.NOTHING, _pipeline,
    "(op u32, frame count u32) per operation, packed frames -> (status, frame count) per "
    "operation, packed frames; applied in order as one atomic step", pipelined=False)
GET_ALL: Op[[str], dict[str, Any]] = Op(
    "get_all", 5, (k.NAME,), k.ITEM_SECTIONS, _get_all,
    "every key (starting with a prefix) and its value, read atomically", all_keys=True)
KEYS: Op[[str], list[str]] = Op(
    "keys", 6, (k.NAME,), k.KEY_LIST, _keys, "every key (starting with a prefix)",
    all_keys=True)
LEN: Op[[], int] = Op("len", 7, (), k.PICKLE, _len, "the number of keys")
CONTAINS: Op[[str], bool] = Op(
    "contains", 8, (k.KEY,), k.FOUND, _contains, "whether a key exists")
CLEAR: Op[[], None] = Op("clear", 9, (), k.NOTHING, _clear, "remove every key", all_keys=True)
MODIFY: Op[[str, Callable[[Any], Any], Any], Any] = Op(
    "modify", 10, (k.KEY, k.OBJECT, k.OBJECT), k.ENTRY, _modify,
    "replace a value by fn(old), keeping its expiry; returns the new value")
INCR: Op[[str, int | float], int | float] = Op(
    "incr", 11, (k.KEY, k.NUMBER), k.PICKLE, _incr, "add to a number, keeping its expiry")
SETDEFAULT: Op[[str, Any], Any] = Op(
    "setdefault", 12, (k.KEY, k.VALUE), k.ENTRY, _setdefault,
    "the value, set first if missing")
POP: Op[[str], Any] = Op(
    "pop", 13, (k.KEY,), k.ENTRY, _pop, "remove a key, returning its value")
CAS: Op[[str, Any, Any], bool] = Op(
    "compare_and_set", 14, (k.KEY, k.OBJECT, k.VALUE), k.FOUND, _cas,
    "set if the value equals the expected one (MISSING: absent), keeping its expiry")
TRANSACT: Op[[Callable[[Any], Any]], Any] = Op(
    "transact", 15, (k.OBJECT,), k.PICKLE, _transact,
    "fn(mapping) with the store to itself; its writes are applied together", all_keys=True)
LOCK: Op[[str, bytes, float | None], bool] = Op(
    "lock", 16, (k.NAME, k.BYTES, k.TIMEOUT), k.FOUND, _lock,
    "take a lock (name, token, timeout); answered when granted (OK) or timed out (NONE)",
    pipelined=False)
UNLOCK: Op[[str, bytes], bool] = Op(
    "unlock", 17, (k.NAME, k.BYTES), k.FOUND, _unlock,
    "release a lock, or cancel a wait for it")
PUBLISH: Op[[str, Any], None] = Op(
    "publish", 18, (k.NAME, k.DATA), k.NOTHING, _publish,
    "send data to the subscribers of a channel", one_way=True, pipelined=False)
BYE: Op[[], None] = Op(
    "bye", 20, (), k.NOTHING, _bye, "the session ends: its locks are released", one_way=True,
    pipelined=False, remote_only=True)
STATS: Op[[], dict[str, int]] = Op("stats", 21, (), k.JSON, _stats, "the owner's counters")
CACHE_WATCH: Op[[list[str]], int] = Op(
    "cache_watch", 22, (k.PREFIXES,), k.SEQ, _cache_watch,
    "this socket receives invalidations of keys under these prefixes; returns its sequence",
    pipelined=False, remote_only=True)
CACHE_UNWATCH: Op[[list[str]], None] = Op(
    "cache_unwatch", 23, (k.PREFIXES,), k.NOTHING, _cache_unwatch,
    "stop the invalidations of these prefixes (all of them if none)", pipelined=False,
    remote_only=True)
CACHE_SYNC: Op[[], int] = Op(
    "cache_sync", 24, (), k.SEQ, _cache_sync,
    "where this socket's invalidation sequence stands", pipelined=False, remote_only=True)
GET_MANY: Op[[list[str]], dict[str, Any]] = Op(
    "get_many", 26, (k.KEYS,), k.MANY, _get_many, "the values of some keys, read atomically",
    named_reply=True)
SET_MANY: Op[[list[tuple[str, Any]], float | None], None] = Op(
    "set_many", 27, (k.ITEMS, k.TTL), k.NOTHING, _set_many,
    "set many keys as one atomic step (plain values: the keys joined and one pickle of the "
    "values, which the owner reads with an unpickler that loads no global)")
EXPIRE: Op[[str, float], bool] = Op(
    "expire", 30, (k.KEY, k.TTL), k.FOUND, _expire, "make a key expire in ttl seconds")
TTL: Op[[str], float | None] = Op(
    "ttl", 31, (k.KEY,), k.PICKLE, _ttl,
    "seconds until a key expires (None: no expiry; MISSING: no such key)")
PERSIST: Op[[str], bool] = Op(
    "persist", 32, (k.KEY,), k.FOUND, _persist, "remove a key's expiry")
DELETE_PREFIX: Op[[str], int] = Op(
    "delete_prefix", 33, (k.NAME,), k.PICKLE, _delete_prefix,
    "remove every key starting with a prefix, as one atomic step; returns how many",
    all_keys=True)
SCAN: Op[[int, str, int], tuple[int, list[str]]] = Op(
    "scan", 34, (k.INT, k.NAME, k.INT), k.PICKLE, _scan,
    "a page of keys (cursor 0 starts a scan; count keys at most) and the next cursor (0: "
    "done)", pipelined=False)
SAVE: Op[[str], dict[str, Any]] = Op(
    "save", 35, (k.NAME,), k.JSON, _save,
    "write the whole store to a file (a path on the owner's host; empty: its snapshot file), "
    "atomically; answered when written, with what was saved", pipelined=False)

#: Every operation, by name.
OPS: dict[str, Op[..., Any]] = {op.name: op for op in (
    GET, SET, DELETE, PIPELINE, GET_ALL, KEYS, LEN, CONTAINS, CLEAR, MODIFY, INCR,
    SETDEFAULT, POP, CAS, TRANSACT, LOCK, UNLOCK, PUBLISH, BYE, STATS, CACHE_WATCH,
    CACHE_UNWATCH, CACHE_SYNC, GET_MANY, SET_MANY, EXPIRE, TTL, PERSIST, DELETE_PREFIX,
    SCAN, SAVE)}
#: Every operation, by code.
BY_CODE: dict[int, Op[..., Any]] = {op.code: op for op in OPS.values()}
assert len(BY_CODE) == len(OPS), "two operations share a code"


def run_all(calls: Sequence[tuple[Op[..., Any], tuple[Any, ...]]],
            run: Callable[[Op[..., Any], tuple[Any, ...]], Any],
            out: list[Any] | None = None) -> list[Any]:
    """Run every call (``run(op, args)``) in order and return the results (also appended to
    ``out``); if any raised, the first exception is raised after all of them ran, and the
    results hold the exception in its place. The one rule of every pipeline."""
    results: list[Any] = [] if out is None else out
    first_error: BaseException | None = None
    for op, args in calls:
        try:
            results.append(run(op, args))
        except Exception as exc:
            results.append(exc)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results


def describe() -> str:
    """The table of operations as Markdown (docs/protocol.md includes it verbatim)."""
    rows = ["| code | operation | arguments | result | properties |", "|---|---|---|---|---|"]
    for op in sorted(OPS.values(), key=lambda op: op.code):
        props = [name for name, on in (("one-way", op.one_way),
                                       ("not pipelined", not op.pipelined),
                                       ("reply may name files", op.named_reply),
                                       ("clients only", op.remote_only),
                                       ("any key", op.all_keys)) if on]
        wire_order = [k for k in op.args if k.single] + [k for k in op.args if not k.single]
        args = ", ".join(kind.name for kind in wire_order) or "—"
        result = "none (one-way)" if op.one_way else op.result.name
        rows.append(f"| {op.code} | `{op.name}`: {op.doc} | {args} | {result} | "
                    f"{', '.join(props) or '—'} |")
    return "\n".join(rows) + "\n"


