"""Pipelines and ``transact`` on Redis: optimistic transactions (``WATCH``/``MULTI``/``EXEC``).

A zkv owner runs a pipeline, or a ``transact`` function, with the store to itself. Redis cannot
run Python, so here the caller does, and commits optimistically:

- **a pipeline** ``WATCH``-es the keys it touches, reads them (``MGET``, ``PTTL``), runs every
  queued operation on a private :class:`~zkv.state.State` holding those keys -- the very code a
  zkv owner runs, so each operation means exactly what it means there -- and commits the
  resulting writes and their change events in one ``MULTI``/``EXEC`` block;
- **transact(fn)** ``WATCH``-es the namespace's change counter (every write made through zkv
  bumps it) and each key ``fn`` reads, runs ``fn`` on a view that reads Redis, and commits its
  writes in one ``MULTI``/``EXEC`` block.

If anything they watch changed meanwhile, ``EXEC`` applies nothing and the whole attempt runs
again (``fn`` included), with backoff, until the store's timeout
(:class:`~zkv.backends.ContentionError`). ``EXEC`` is atomic: a Redis that dies before it
has applied nothing; after it, everything (with AOF, a torn transaction is discarded on
restart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from .. import ops, state
from ..codec import Frame
from ..errors import ProtocolError, StoreClosedError
from ..ops import ALL, Op
from ..state import MISSING, Entry, State
from . import redis_codec
from .redis_scripts import NOTIFY

if TYPE_CHECKING:  # pragma: no cover
    from ..core import Call
    from .redis import RedisCore

__all__ = ["RedisView", "execute", "transact"]

_dumps = redis_codec.dumps
_loads = redis_codec.loads
#: Operations whose value argument (at this position) must be storable before they run.
_VALUE_AT = {ops.SET.name: 1, ops.SETDEFAULT.name: 1, ops.CAS.name: 2}
#: Operations that decide a key's expiry (a set without ttl clears it).
_SETS_EXPIRY = {ops.SET.name, ops.EXPIRE.name, ops.PERSIST.name}


class _Context:
    """The :class:`~zkv.ops.Context` of a pipeline run on a private State (key operations
    only: pipelines hold nothing else)."""

    remote = True  # values must be storable in Redis, as they must travel from a client

    def __init__(self, private: State) -> None:
        self.state = private

    def entry_frames(self, entry: Entry) -> list[Frame]:
        return entry.wire()

    def _not_here(self, *args: Any) -> Any:
        raise ProtocolError("not an operation of a pipeline")

    acquire_lock = release_lock = publish = end_session = _not_here
    cache_watch = cache_unwatch = cache_sync = stats = save = _not_here


def _run_on(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` on ``conn`` at once and read every reply (errors as values)."""
    conn.send_packed_command(conn.pack_commands(commands))
    out = []
    for _ in commands:
        try:
            out.append(conn.read_response(disconnect_on_error=False))
        except Exception as exc:
            if not _is_reply_error(exc):
                raise
            out.append(exc)
    return out


def _is_reply_error(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, redis.ResponseError)


def _commit(core: RedisCore, conn: Any, commands: list[tuple[Any, ...]],
            events: list[Any]) -> bool:
    """MULTI, ``commands``, the events' NOTIFY, EXEC. False if a watched key changed."""
    if events:
        commands = [*commands, tuple(NOTIFY.eval_args(
            [core.space.version], [core.space.watch_marker, "T", *events]))]
    replies = _run_on(conn, [("MULTI",), *commands, ("EXEC",)])
    for reply in replies[:-1]:
        if isinstance(reply, Exception):
            raise core.translate(reply)
    results = replies[-1]
    if isinstance(results, Exception):
        raise core.translate(results)
    if results is None:
        return False
    for result in results:
        if isinstance(result, Exception):
            raise core.translate(result)
    return True


class _Attempt:
    """One connection of the pool for one optimistic attempt; given back clean (UNWATCH-ed,
    or closed if it broke mid-way)."""

    def __init__(self, core: RedisCore) -> None:
        self.core = core
        self.conn = core.connection()
        self.watching = False

    def __enter__(self) -> Any:
        return self.conn

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        core = self.core
        try:
            if exc is not None and not isinstance(exc, Exception):
                self.conn.disconnect()  # (KeyboardInterrupt: the connection may be mid-reply)
            elif self.watching:
                _run_on(self.conn, [("UNWATCH",)])
        except Exception:
            self.conn.disconnect()
        finally:
            core.release(self.conn)
        if exc is not None and isinstance(exc, core._redis_error):
            raise core.translate(exc) from exc


# -- pipelines -------------------------------------------------------------------------------------

def execute(core: RedisCore, calls: list[Call], out: list[Any]) -> list[Any]:
    """Run a pipeline's operations as one atomic step (see the module docstring)."""
    if not calls:
        return out
    keys: list[str] = []
    for op, args in calls:
        if not op.pipelined:
            raise ProtocolError(f"{op.name} cannot be pipelined")
        touched = op.touches(args)
        if touched is ALL or touched is None:
            raise ProtocolError(f"{op.name} is not a key operation")
        keys.extend(touched)
    keys = list(dict.fromkeys(keys))
    names = [core.space.key(k) for k in keys]
    for _attempt in core.retries("a pipeline"):
        attempt = _Attempt(core)
        with attempt as conn:
            attempt.watching = True
            replies = _run_on(conn, [("WATCH", *names), ("MGET", *names),
                                     *[("PTTL", n) for n in names]])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise core.translate(reply)
            loaded = {k: (raw, pttl) for k, raw, pttl in
                      zip(keys, replies[1], replies[2:], strict=True)}
            results, commands, events = _simulate(core, calls, loaded)
            if not commands and not events:
                return _deliver(results, out)
            attempt.watching = False  # (EXEC ends the watch, whatever it answers)
            if _commit(core, conn, commands, events):
                return _deliver(results, out)
    raise AssertionError("unreachable")  # pragma: no cover


def _deliver(results: list[Any], out: list[Any]) -> list[Any]:
    out.extend(results)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return out


def _simulate(core: RedisCore, calls: list[Call], loaded: dict[str, tuple[Any, int]]
              ) -> tuple[list[Any], list[tuple[Any, ...]], list[Any]]:
    """Run the operations on a private State holding the keys as loaded; return their
    results, the commands that make Redis match, and the change events (NOTIFY triples)."""
    private = State()
    for key, (raw, pttl) in loaded.items():
        if raw is not None and pttl != -2:
            private.put(key, Entry.from_object(_loads(raw)), None if pttl < 0 else pttl / 1000)
    changes: list[tuple[int, str, Entry | None]] = []
    private.on_change = lambda kind, key, entry, version: changes.append((kind, key, entry))
    expiry: set[str] = set()
    ctx = _Context(private)

    def run(op: Op[..., Any], args: tuple[Any, ...]) -> Any:
        at = _VALUE_AT.get(op.name)
        if at is not None:
            _dumps(args[at])  # a value that cannot be stored fails here, changing nothing
        if op.name in _SETS_EXPIRY:
            expiry.add(args[0])
        return op.local(ctx, *args)

    results: list[Any] = []
    try:
        ops.run_all(calls, run, results)
    except Exception:
        pass  # (the results hold it)
    private.on_change = None
    commands: list[tuple[Any, ...]] = []
    events: list[Any] = []
    written: set[str] = set()
    deleted: set[str] = set()
    for kind, key, entry in changes:
        if kind == state.SET and entry is not None:
            written.add(key)
            events += ["s", core.space.key(key), _dumps(entry.load())]
        elif kind == state.DELETE:
            deleted.add(key)
            events += ["d", core.space.key(key), b""]
    for key in loaded:
        name = core.space.key(key)
        existed = loaded[key][0] is not None
        final = private.get(key)
        if key in written or key in deleted:
            if final is None:
                commands.append(("DEL", name))
                continue
            data = _dumps(final.load())
            if key in expiry or key in deleted:
                left = private.ttl(key)
                commands.append(("SET", name, data) if left is None or left is MISSING
                                else ("SET", name, data, "PX", _ms(left)))
            else:
                commands.append(("SET", name, data, "KEEPTTL") if existed
                                else ("SET", name, data))
        elif key in expiry and final is not None:
            left = private.ttl(key)
            commands.append(("PERSIST", name) if left is None else ("PEXPIRE", name, _ms(left)))
    return results, commands, events


def _ms(seconds: float) -> int:
    from .redis import ms

    return ms(seconds)


# -- transact --------------------------------------------------------------------------------------

class RedisView(MutableMapping[str, Any]):
    """The mapping a ``transact`` function gets on Redis: reads see Redis (each key read is
    watched) plus the function's own writes, which are kept until it returns. It cannot be
    used after that."""

    def __init__(self, core: RedisCore, conn: Any) -> None:
        self._core = core
        self._conn = conn
        self._read: dict[str, bytes | None] = {}
        self._changes: dict[str, Any] = {}
        self._closed = False

    def _check(self, key: object) -> None:
        if self._closed:
            raise StoreClosedError("the transaction is over; this view cannot be used any more")
        if not isinstance(key, str):
            raise TypeError(f"keys must be str, not {type(key).__name__}")

    def _raw(self, key: str) -> bytes | None:
        if key not in self._read:
            name = self._core.space.key(key)
            _watch, raw = _run_on(self._conn, [("WATCH", name), ("GET", name)])
            for reply in (_watch, raw):
                if isinstance(reply, Exception):
                    raise self._core.translate(reply)
            self._read[key] = raw
        return self._read[key]

    def __getitem__(self, key: str) -> Any:
        self._check(key)
        if key in self._changes:
            value = self._changes[key]
            if value is MISSING:
                raise KeyError(key)
            return value
        raw = self._raw(key)
        if raw is None:
            raise KeyError(key)
        return _loads(raw)  # a copy, as everywhere: assign it back to change the store

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key)
        self._changes[key] = value

    def __delitem__(self, key: str) -> None:
        self._check(key)
        if key not in self:
            raise KeyError(key)
        self._changes[key] = MISSING

    def __contains__(self, key: object) -> bool:
        self._check(key)
        assert isinstance(key, str)
        if key in self._changes:
            return self._changes[key] is not MISSING
        return self._raw(key) is not None

    def _stored_keys(self) -> list[str]:
        (names,) = _run_on(self._conn, [("KEYS", self._core.space.pattern(""))])
        if isinstance(names, Exception):
            raise self._core.translate(names)
        return [self._core.space.key_of(n) for n in names]

    def __iter__(self) -> Iterator[str]:
        if self._closed:
            raise StoreClosedError("the transaction is over; this view cannot be used any more")
        stored = self._stored_keys()
        present = set(stored)
        seen = [k for k in stored if self._changes.get(k, None) is not MISSING]
        added = [k for k, v in self._changes.items() if v is not MISSING and k not in present]
        return iter(seen + added)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return "<zkv transaction view (Redis)>"


def transact(core: RedisCore, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(view)`` and commit its writes atomically (see the module docstring)."""
    if not callable(fn):
        raise TypeError(f"transact needs a callable, not {type(fn).__name__}")
    space = core.space
    for _attempt in core.retries("transact"):
        attempt = _Attempt(core)
        with attempt as conn:
            attempt.watching = True
            (watched,) = _run_on(conn, [("WATCH", space.version)])
            if isinstance(watched, Exception):
                raise core.translate(watched)
            view = RedisView(core, conn)
            try:
                result = fn(view)
            finally:
                view._closed = True
            commands: list[tuple[Any, ...]] = []
            events: list[Any] = []
            for key, value in view._changes.items():
                name = space.key(key)
                if value is MISSING:
                    if view._raw(key) is not None:  # (a change event only if it existed)
                        commands.append(("DEL", name))
                        events += ["d", name, b""]
                else:
                    data = _dumps(value)  # a value that cannot be stored: nothing changes
                    commands.append(("SET", name, data, "KEEPTTL"))
                    events += ["s", name, data]
            if not commands:
                return result
            attempt.watching = False
            if _commit(core, conn, commands, events):
                return result
    raise AssertionError("unreachable")  # pragma: no cover
