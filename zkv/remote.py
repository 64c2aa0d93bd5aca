"""A client's side of a store: each operation sent to the owner as its entry in :mod:`zkv.ops`
says (:meth:`RemoteCore.call`), a pipeline as one request, and ``get``/``set`` on a short path.

The read cache (:mod:`zkv.cache`) sits here: a cached ``get`` is answered from memory, and every
reply raises the cache's floor for the keys the operation read or wrote (:meth:`Op.touches`),
so that this process reads its own writes and never reads an older value after a newer one.
"""

from __future__ import annotations

import pickle
from array import array
from collections.abc import Sequence
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import zmq

from . import codec, ops, reentry, wire
from .cache import NOHIT, ReadCache
from .client import Connection
from .codec import Frame
from .config import Options
from .core import Call
from .dispatch import Dispatcher
from .errors import ProtocolError
from .ops import ALL, Op
from .pubsub import Subscriber, Topics
from .state import MISSING

__all__ = ["RemoteCore", "encode_pipeline", "read_get", "read_pipeline"]

P = ParamSpec("P")
R = TypeVar("R")

_GET = ops.GET.code
_SET = ops.SET.code
_OK = int(wire.Status.OK)
_NONE = int(wire.Status.NONE)
_ERROR = int(wire.Status.ERROR)


class _Closeable(Protocol):
    def close(self) -> None: ...


def read_get(status: int, reply: list[Any], default: Any) -> Any:
    """The result of a ``get`` from its reply."""
    if status == _OK:
        if len(reply) == 1:
            try:
                return pickle.loads(reply[0])  # one pickle: the usual value
            except Exception:
                pass  # codec.loads says what is wrong with it, or reads a raw value
        return codec.loads(reply)
    if status == _NONE:
        return default
    raise wire.decode_error(reply)


def encode_pipeline(calls: Sequence[Call]) -> tuple[list[Frame], Any]:
    """The frames of a PIPELINE request, and the keys it reads or writes (a list, ``ALL``,
    or None; see :meth:`Op.touches`)."""
    index = array("I")
    flat: list[Frame] = []
    touched: list[str] = []
    everything = False
    for op, args in calls:
        if not op.pipelined:
            raise ProtocolError(f"{op.name} cannot be pipelined")
        sub = op.encode(*args)
        index.append(op.code)
        index.append(len(sub))
        flat.extend(sub)
        keys = op.touches(args)
        if keys is ALL:
            everything = True
        elif keys is not None:
            touched.extend(keys)
    return [index.tobytes(), *wire.pack_frames(flat)], ALL if everything else touched or None


def read_pipeline(calls: Sequence[Call], status: int, reply: list[Any],
                  out: list[Any]) -> list[Any]:
    """The results of a pipeline from its reply (see :meth:`zkv.core.Core.execute`)."""
    if status == _ERROR:
        raise wire.decode_error(reply)
    out_index = wire.read_index(reply[0], "I", "pipeline reply index")
    if len(out_index) != 2 * len(calls):
        raise ProtocolError("pipeline reply does not match the request")
    results = wire.unpack_frames(reply[1:])
    parts: list[tuple[int, list[Any]]] = []
    at = 0
    for i in range(len(calls)):
        n = out_index[2 * i + 1]
        parts.append((out_index[2 * i], results[at:at + n]))
        at += n
    replies = iter(parts)

    def read(op: Op[..., Any], args: tuple[Any, ...]) -> Any:
        sub_status, sub = next(replies)
        return op.read(sub_status, sub, args)

    return ops.run_all(calls, read, out)


class RemoteCore:
    """Store operations for a process that is not the owner (a :class:`~zkv.core.Core`)."""

    is_owner = False

    def __init__(self, address: str, options: Options) -> None:
        self.options = options
        self.conn = Connection(address, options)
        self.endpoint = address
        self._cache: ReadCache | None = None
        self._attached: list[_Closeable] = []

    def owner_alive(self) -> bool:
        return not self.conn.lost and self.conn.owner_alive()

    # -- the two most frequent calls, on their shortest paths ----------------------------------

    def get(self, key: str, default: Any) -> Any:
        cache = self._cache
        if cache is not None and cache.covers(key):
            return self._cached_get(cache, key, default)
        status, reply, _before, _after = self.conn.request_small(
            _GET, key.encode("utf-8", "surrogatepass"), named=True)
        return read_get(status, reply, default)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        frames = ops.SET.encode(key, value, ttl)
        packed = frames[0]
        if len(frames) == 1 and type(packed) is bytes:  # key and small value in one frame
            status, reply, _before, after = self.conn.request_small(_SET, packed)
        else:
            status, reply, _before, after = self.conn.request(_SET, frames)
        if self._cache is not None:
            self._cache.written([key], after)
        if status == _ERROR:
            raise wire.decode_error(reply)

    # -- everything else -----------------------------------------------------------------------

    def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        frames = op.encode(*args)
        if op.one_way:
            self.conn.send(op.code, frames)
            return cast(R, None)
        status, reply, _before, after = self.conn.request(op.code, frames,
                                                          named=op.named_reply)
        if self._cache is not None:
            self.touched(op.touches(args), after)
        return op.read(status, reply, args)

    @property
    def cache_enabled(self) -> bool:
        """Whether this process keeps a read cache (whose floors replies must raise)."""
        return self._cache is not None

    def touched(self, keys: Any, version: int) -> None:
        """Keys that a reply read or wrote (up to change ``version``): the cache drops them
        and takes no older value for them from now on."""
        if keys is not None and self._cache is not None:
            self._cache.written(None if keys is ALL else keys, version)

    def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        """Send queued operations as one PIPELINE request (see :class:`~zkv.core.Core`)."""
        if not calls:
            return out
        frames, touched = encode_pipeline(calls)
        status, reply, _before, after = self.conn.request(ops.PIPELINE.code, frames)
        self.touched(touched, after)
        return read_pipeline(calls, status, reply, out)

    # -- the read cache ------------------------------------------------------------------------

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        if self._cache is None:
            hwm = self.conn.hwm
            self._cache = ReadCache(self.conn.open_socket(rcvhwm=hwm), hwm=hwm,
                                    timeout=self.options.timeout, alive=self.owner_alive,
                                    max_entries=max_entries)
        self._cache.max_entries = max_entries
        self._cache.add(prefix)

    def disable_cache(self, prefix: str | None) -> None:
        if self._cache is not None:
            self._cache.remove(prefix)

    def cache_info(self) -> dict[str, int]:
        cache = self._cache
        if cache is None:
            return {"hits": 0, "misses": 0, "entries": 0, "flushes": 0}
        return cache.info()

    def _cached_get(self, cache: ReadCache, key: str, default: Any) -> Any:
        value = cache.lookup(key)
        if value is NOHIT:
            status, reply, before, _after = self.conn.request(_GET, [wire.key_bytes(key)],
                                                              named=True)
            if status == _ERROR:
                raise wire.decode_error(reply)
            value = cache.fill(key, before, reply if status == _OK else None)
        return default if value is MISSING else value

    # -- locks ---------------------------------------------------------------------------------

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        reentry.refuse(f"waiting for lock {name!r}")
        frames = ops.LOCK.encode(name, token, timeout)
        wait = float("inf") if timeout is None else timeout + self.options.timeout
        try:
            status, reply, _before, _after = self.conn.request(ops.LOCK.code, frames,
                                                               timeout=wait)
        except BaseException:
            # Gave up (timeout, interrupt): withdraw the wait, or give back a late grant.
            try:
                self.conn.send(ops.UNLOCK.code, ops.UNLOCK.encode(name, token))
            except Exception:
                pass
            raise
        return bool(ops.LOCK.read(status, reply, (name, token, timeout)))

    def lock_release(self, name: str, token: bytes) -> bool:
        return self.call(ops.UNLOCK, name, token)

    # -- publish/subscribe ---------------------------------------------------------------------

    def subscriber(self, topics: Topics, what: str) -> Subscriber:
        return Subscriber(self.conn.context, self.conn.pub_address, topics, hwm=self.conn.hwm,
                          timeout=self.options.timeout, alive=self.owner_alive, what=what)

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.conn.context, self.conn.pub_address, hwm=self.conn.hwm,
                          timeout=self.options.timeout, alive=self.owner_alive)

    @property
    def context(self) -> zmq.Context[Any]:
        return self.conn.context

    def attach(self, other: _Closeable) -> None:
        """Close ``other`` (which holds sockets of this connection: an asyncio client) before
        the connection closes."""
        self._attached.append(other)

    def close(self) -> None:
        for other in self._attached:
            other.close()
        if self._cache is not None:
            self._cache.close()
        self.conn.close()

