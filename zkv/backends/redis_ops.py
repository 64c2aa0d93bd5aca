"""The Redis implementation of each operation of :mod:`zkv.ops`, in one table.

:data:`IMPLEMENTATIONS` maps an operation's name to ``fn(core, *args)``, which returns what
:meth:`zkv.core.Core.call` returns for it (``MISSING`` for an absent key). Operations that
only exist between a zkv client and its owner (``bye``, the read cache's bookkeeping, the
pipeline request itself) are listed in :data:`NOT_APPLICABLE` with the reason; a test checks
that every entry of :data:`zkv.ops.OPS` is in one or the other, so a new operation cannot be
forgotten here.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..state import MISSING
from . import redis_codec
from .redis_scripts import (
    CAS,
    COUNT,
    DELETE,
    DELETE_MATCHING,
    GET_ALL,
    INCR,
    NOTIFY,
    POP,
    PUBLISH,
    SCAN_PAGE,
    SCAN_START,
    SETDEFAULT,
)

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisCore

__all__ = ["IMPLEMENTATIONS", "NOT_APPLICABLE", "compare_and_set_bytes"]

_dumps = redis_codec.dumps
_loads = redis_codec.loads
#: Milliseconds a scan's remaining keys are kept between two pages (as zkv's owner: 60 s).
SCAN_KEEP_MS = 60_000


def _name(core: RedisCore, key: str) -> Any:
    return core.space.key(key)


def _keys2(core: RedisCore, key: str) -> list[Any]:
    return [core.space.key(key), core.space.version]


# -- single keys ---------------------------------------------------------------------------------

def _get(core: RedisCore, key: str) -> Any:
    raw = core.command("GET", _name(core, key))
    return MISSING if raw is None else _loads(raw)


def _set(core: RedisCore, key: str, value: Any, ttl: float | None) -> None:
    core.set(key, value, ttl)


def _delete(core: RedisCore, key: str) -> bool:
    return bool(core.script(DELETE, _keys2(core, key), [core.space.watch_marker]))


def _contains(core: RedisCore, key: str) -> bool:
    return bool(core.command("EXISTS", _name(core, key)))


def _pop(core: RedisCore, key: str) -> Any:
    raw = core.script(POP, _keys2(core, key), [core.space.watch_marker])
    return MISSING if raw is None else _loads(raw)


def _setdefault(core: RedisCore, key: str, value: Any) -> Any:
    raw = core.script(SETDEFAULT, _keys2(core, key), [_dumps(value), core.space.watch_marker])
    return _loads(raw)


def compare_and_set_bytes(core: RedisCore, key: str, expected: bytes | None, new: bytes
                          ) -> tuple[bool, bytes | None]:
    """Set ``key`` to ``new`` if it holds exactly the bytes ``expected`` (None: if it does
    not exist), keeping its expiry. Returns (done, the bytes it holds when not done)."""
    reply = core.script(CAS, _keys2(core, key),
                        ["m" if expected is None else "v", expected or b"", new,
                         core.space.watch_marker])
    if reply[0] == 1:
        return True, None
    return False, (reply[1] if len(reply) > 1 else None)


def _compare_and_set(core: RedisCore, key: str, expected: Any, new: Any) -> bool:
    data = _dumps(new)
    if expected is MISSING:
        return compare_and_set_bytes(core, key, None, data)[0]
    try:
        guess: bytes | None = _dumps(expected)
    except Exception:
        guess = None  # an expected value that cannot be pickled may still compare equal
    for _attempt in core.retries(f"compare_and_set({key!r})"):
        if guess is None:
            guess = core.command("GET", _name(core, key))
            if guess is None or not bool(_loads(guess) == expected):
                return False  # (decided on what Redis held when it was read)
        done, current = compare_and_set_bytes(core, key, guess, data)
        if done:
            return True
        if current is None or not bool(_loads(current) == expected):
            return False  # (decided on what Redis held when the script ran)
        guess = current  # equal, pickled differently (1 and 1.0, dict order): try with it
    raise AssertionError("unreachable")  # pragma: no cover


def _modify(core: RedisCore, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
    if not callable(fn):
        raise TypeError(f"modify needs a callable, not {type(fn).__name__}")
    raw = core.command("GET", _name(core, key))
    for _attempt in core.retries(f"modify({key!r})"):
        new = fn(default if raw is None else _loads(raw))
        done, current = compare_and_set_bytes(core, key, raw, _dumps(new))
        if done:
            return new
        raw = current
    raise AssertionError("unreachable")  # pragma: no cover


def _incr(core: RedisCore, key: str, amount: int | float) -> int | float:
    if type(amount) not in (int, float):
        raise TypeError(f"incr amount must be an int or float, not {type(amount).__name__}")
    if type(amount) is int and -(1 << 63) <= amount < (1 << 63):
        reply = core.script(INCR, _keys2(core, key), [amount, core.space.watch_marker])
        if reply[0] == 1:
            return int(reply[1])
    # A float, a value that is not an integer string, or past 64 bits: compare-and-set.
    raw = core.command("GET", _name(core, key))
    for _attempt in core.retries(f"incr({key!r})"):
        old = 0 if raw is None else _loads(raw)
        if type(old) not in (int, float):
            raise TypeError(f"cannot incr {key!r}: it holds a {type(old).__name__}, not an "
                            "int or float")
        new = old + amount
        done, current = compare_and_set_bytes(core, key, raw, _dumps(new))
        if done:
            return new
        raw = current
    raise AssertionError("unreachable")  # pragma: no cover


def _transact(core: RedisCore, fn: Callable[[Any], Any]) -> Any:
    from .redis_txn import transact

    return transact(core, fn)


# -- expiry --------------------------------------------------------------------------------------

def _expire(core: RedisCore, key: str, seconds: float | None) -> bool:
    if seconds is None:
        raise ValueError("expire needs a number of seconds")
    from .redis import ms

    return bool(core.command("PEXPIRE", _name(core, key), ms(seconds)))


def _ttl(core: RedisCore, key: str) -> Any:
    left = core.command("PTTL", _name(core, key))
    if left == -2:
        return MISSING
    if left == -1:
        return None
    return left / 1000.0


def _persist(core: RedisCore, key: str) -> bool:
    return bool(core.command("PERSIST", _name(core, key)))


# -- many keys -----------------------------------------------------------------------------------

def _get_many(core: RedisCore, keys: list[str]) -> dict[str, Any]:
    raws = core.fast("MGET", *core.space.keys(keys))
    if None in raws:
        found = [(k, raw) for k, raw in zip(keys, raws, strict=True) if raw is not None]
        return dict(zip([k for k, _ in found], redis_codec.loads_many([r for _, r in found]),
                        strict=True))
    return dict(zip(keys, redis_codec.loads_many(raws), strict=True))


def _u32(lengths: Iterable[int]) -> bytes:
    packed = array("I", lengths)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def pack_names(names: list[Any]) -> tuple[bytes, bytes]:
    """Data keys for the NOTIFY script: their lengths (u32 little-endian each) and the keys
    one after the other."""
    if names and type(names[0]) is str:
        joined = "".join(names)
        if joined.isascii():
            return _u32(map(len, names)), joined.encode()
    encoded = [n if type(n) is bytes else n.encode("utf-8", "surrogatepass") for n in names]
    return _u32(map(len, encoded)), b"".join(encoded)


def _set_many(core: RedisCore, items: list[tuple[str, Any]], ttl: float | None) -> None:
    keys, given = zip(*items, strict=True)
    if len(set(keys)) != len(keys):  # the same key twice: the last value wins, events for each
        from ..ops import SET
        from .redis_txn import execute

        execute(core, [(SET, (k, v, ttl)) for k, v in items], [])
        return
    names = core.space.keys(keys)
    values = redis_codec.dumps_many(given)
    commands: list[tuple[Any, ...]]
    if ttl is None:
        flat: list[Any] = [None] * (2 * len(names))
        flat[0::2] = names
        flat[1::2] = values
        commands = [("MSET", *flat)]
    else:
        from .redis import ms

        px = ms(ttl)
        commands = [("SET", n, v, "PX", px) for n, v in zip(names, values, strict=True)]
    notify = NOTIFY.eval_args([core.space.version], [core.space.watch_marker, "P",
                                                     len(names), *pack_names(names)])
    multi(core, [*commands, tuple(notify)])


def multi(core: RedisCore, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``commands`` as one MULTI/EXEC block on one connection; return their results
    (errors raised)."""
    conn = core.connection()
    try:
        try:
            conn.send_packed_command((core.pack([("MULTI",), *commands, ("EXEC",)]),), False)
            for _ in range(len(commands) + 1):
                conn.read_response()
            results = conn.read_response()
        except BaseException:
            conn.disconnect()  # (a half-read reply would desynchronize the connection)
            raise
    except core._redis_error as exc:
        raise core.translate(exc) from exc
    finally:
        core.release(conn)
    for result in results or ():
        if isinstance(result, Exception):
            raise core.translate(result)
    return list(results or ())


def _get_all(core: RedisCore, prefix: str) -> dict[str, Any]:
    flat = core.script(GET_ALL, [core.space.version], [core.space.pattern(prefix)])
    names = [core.space.key_of(n) for n in flat[0::2]]
    return dict(zip(names, redis_codec.loads_many(flat[1::2]), strict=True))


def _keys(core: RedisCore, prefix: str) -> list[str]:
    return [core.space.key_of(n) for n in core.command("KEYS", core.space.pattern(prefix))]


def _len(core: RedisCore) -> int:
    return int(core.script(COUNT, [core.space.version], [core.space.pattern("")]))


def _delete_prefix(core: RedisCore, prefix: str) -> int:
    return int(core.script(DELETE_MATCHING, [core.space.version],
                           [core.space.pattern(prefix), core.space.watch_marker]))


def _clear(core: RedisCore) -> None:
    _delete_prefix(core, "")


def _scan(core: RedisCore, cursor: int, prefix: str, count: int) -> tuple[int, list[str]]:
    if type(count) is not int or count < 1:
        raise ValueError(f"scan count must be an int >= 1, not {count!r}")
    if cursor == 0:
        page = core.script(SCAN_START, [core.space.scan_counter],
                           [core.space.pattern(prefix), core.space.scan_prefix, count,
                            SCAN_KEEP_MS])
    else:
        try:
            page = core.script(SCAN_PAGE, [f"{core.space.scan_prefix}{cursor}"],
                               [cursor, count, SCAN_KEEP_MS])
        except Exception as exc:
            if "unknown scan cursor" in str(exc):
                raise KeyError(f"scan cursor {cursor} is unknown or expired (a scan is "
                               f"forgotten after {SCAN_KEEP_MS // 1000} s without a next "
                               "page)") from None
            raise
    return int(page[0]), [core.space.key_of(n) for n in page[1:]]


# -- locks, pub/sub, counters ----------------------------------------------------------------------

def _lock(core: RedisCore, name: str, token: bytes, timeout: float | None) -> bool:
    return core.lock_acquire(name, token, timeout)


def _unlock(core: RedisCore, name: str, token: bytes) -> bool:
    return core.lock_release(name, token)


def _publish(core: RedisCore, channel: str, data: Any) -> None:
    space = core.space
    if channel.isascii():
        core.script(PUBLISH, [space.seqs], [channel, space.channel_prefix + channel,
                                             _dumps(data)])
    else:
        core.script(PUBLISH, [space.seqs], [channel.encode("utf-8", "surrogatepass"),
                                             space.channel(channel), _dumps(data)])


def _stats(core: RedisCore) -> dict[str, int]:
    space = core.space
    info = core.command("INFO", "server")
    version = core.command("GET", space.version)
    channels = core.command("PUBSUB", "CHANNELS",
                            redis_codec.glob_escape(space.tag) + ":[cw]:*")
    locks = core.command("KEYS", redis_codec.glob_escape(space.lock_prefix) + "*")
    return {"keys": _len(core), "version": int(version or 0), "topics": len(channels),
            "subscriptions": len(channels), "locks": len(locks), "sessions": 0,
            "refused": 0, "refused_auth": 0, "expiring": 0, "pid": int(info["process_id"]),
            "uptime": int(info["uptime_in_seconds"]), "blob_files": 0, "blob_free": 0,
            "client_pid": os.getpid()}


#: How the Redis backend does each operation of :mod:`zkv.ops` (by name).
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "get": _get,
    "set": _set,
    "delete": _delete,
    "contains": _contains,
    "pop": _pop,
    "setdefault": _setdefault,
    "compare_and_set": _compare_and_set,
    "modify": _modify,
    "incr": _incr,
    "transact": _transact,
    "expire": _expire,
    "ttl": _ttl,
    "persist": _persist,
    "get_many": _get_many,
    "set_many": _set_many,
    "get_all": _get_all,
    "keys": _keys,
    "len": _len,
    "delete_prefix": _delete_prefix,
    "clear": _clear,
    "scan": _scan,
    "lock": _lock,
    "unlock": _unlock,
    "publish": _publish,
    "stats": _stats,
}

#: Operations of :mod:`zkv.ops` that have no meaning on Redis, and why.
NOT_APPLICABLE: dict[str, str] = {
    "pipeline": "the request that carries a pipeline to a zkv owner; on Redis, "
                "RedisCore.execute runs pipelines (WATCH/MULTI/EXEC)",
    "bye": "ends a session with a zkv owner; a Redis connection just closes",
    "cache_watch": "the zkv read cache's bookkeeping (the cache is refused on Redis)",
    "cache_unwatch": "the zkv read cache's bookkeeping (the cache is refused on Redis)",
    "cache_sync": "the zkv read cache's bookkeeping (the cache is refused on Redis)",
    "save": "snapshots are a zkv owner's; Redis keeps its data itself: configure its RDB "
            "snapshots or its append-only file (`save`, `appendonly` in redis.conf)",
}
