"""The opt-in client-side read cache (:meth:`zkv.Store.enable_cache`).

Repeated ``get`` of a key under a cached prefix is served from this process's memory. The
owner invalidates: for every change of a key under a prefix some client caches, it publishes an
invalidation (the key and the change's number) on the topic ``i<prefix>\\0``; a thread here
drops the cached values they make stale: a reading thread drains the queued invalidations
before it serves a value, at most every ``DRAIN_INTERVAL`` seconds (and always after a pause),
so no extra thread is needed and a busy reader cannot starve the invalidations.

Why a reply can never leave a stale value behind:

- every reply says up to which change number it reflects the store (``before``, see
  :mod:`zkv.wire`), and every cached value remembers that number;
- the cache keeps, per key, a *floor*: the highest change number it has seen for the key, from
  an invalidation or from this process's own write (a write's reply says ``after``);
- a reply is cached only if its number is at least the key's floor, and an invalidation drops
  a cached value only if the value is older than the change.

So whether the reply or the invalidation arrives first, the older value loses; a process always
reads its own writes (its write raises the floor before it returns); and if invalidations are
lost (the subscriber fell behind its high-water mark; seen as a gap in their sequence numbers)
the whole cache is dropped. The window in which another process's write is not yet visible here
is the time an invalidation takes to arrive plus at most ``DRAIN_INTERVAL`` (measured by
``zkv bench``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from . import codec, wire
from .codec import IMMUTABLE_TYPES
from .errors import OwnerGoneError, ZkvTimeoutError
from .pubsub import GapCounter, open_sub_socket
from .state import MISSING
from .wire import Kind

__all__ = ["NOHIT", "ReadCache"]

log = logging.getLogger("zkv.cache")

#: Returned by :meth:`ReadCache.lookup` when the key is not cached.
NOHIT: Any = object()

#: A reading thread looks for invalidations at most this often (seconds).
DRAIN_INTERVAL = 100e-6
_ALIVE_INTERVAL = 0.1


class ReadCache:
    """Cached ``get`` results of one client process, kept fresh by the owner's invalidations.

    Thread-safe. The SUB socket that receives invalidations is used under ``_sock_lock`` by
    whichever thread drains it."""

    def __init__(self, ctx: zmq.Context[Any], address: str, *, hwm: int, timeout: float,
                 alive: Callable[[], bool], max_entries: int = 100_000) -> None:
        self._timeout = timeout
        self._alive = alive
        self.max_entries = max_entries
        self._entries: dict[str, tuple[int, Any, bool]] = {}
        self._floor: dict[str, int] = {}
        self._global_floor = 0
        self._prefixes: list[str] = []
        self._mutex = threading.Lock()
        self._gaps = GapCounter("zkv read cache", hwm)
        self._sock = open_sub_socket(ctx, address, hwm)
        self._sock_lock = threading.Lock()
        self._next_drain = 0.0
        self._next_alive = 0.0
        self._closed = False
        self.dead = False
        self.hits = 0
        self.misses = 0
        self.flushes = 0

    # -- configuration ---------------------------------------------------------------------------

    def add(self, prefix: str) -> None:
        """Cache keys starting with ``prefix``; returns once invalidations for them are live."""
        if prefix in self._prefixes:
            return
        topic = b"i" + wire.key_bytes(prefix) + b"\0"
        probe = wire.make_probe([topic])
        deadline = time.monotonic() + self._timeout
        with self._sock_lock:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic)
            self._sock.setsockopt(zmq.SUBSCRIBE, probe)
            while True:
                remaining = deadline - time.monotonic()
                if self._sock.poll(int(max(0.0, min(remaining, 0.1)) * 1000)):
                    frames = self._sock.recv_multipart()
                    if frames[0] == probe:
                        break
                    self._on_message(frames)
                    continue
                if not self._alive():
                    raise OwnerGoneError("the zkv owner is gone")
                if remaining <= 0:
                    self._sock.setsockopt(zmq.UNSUBSCRIBE, topic)
                    self._sock.setsockopt(zmq.UNSUBSCRIBE, probe)
                    raise ZkvTimeoutError("the zkv owner did not confirm the cache subscription")
            self._sock.setsockopt(zmq.UNSUBSCRIBE, probe)
            self._gaps.start(wire.parse_welcome(frames[2]) if len(frames) > 2 else {})
            version = wire.unpack_meta(frames[1])[1]
        with self._mutex:
            self._global_floor = max(self._global_floor, version)
            self._prefixes = [*self._prefixes, prefix]

    def remove(self, prefix: str | None = None) -> None:
        """Stop caching keys under ``prefix`` (every prefix if None) and drop what is cached."""
        gone = list(self._prefixes) if prefix is None else [p for p in self._prefixes
                                                            if p == prefix]
        with self._mutex:
            self._prefixes = [p for p in self._prefixes if p not in gone]
            self._entries.clear()
        with self._sock_lock:
            if not self._closed:
                for p in gone:
                    self._sock.setsockopt(zmq.UNSUBSCRIBE, b"i" + wire.key_bytes(p) + b"\0")

    def covers(self, key: str) -> bool:
        for prefix in self._prefixes:
            if key.startswith(prefix):
                return True
        return False

    # -- the read path ---------------------------------------------------------------------------

    def lookup(self, key: str) -> Any:
        """The cached value of ``key`` (``MISSING`` if it is cached as absent), or NOHIT."""
        now = time.perf_counter()
        if now >= self._next_drain:
            self._drain(now)
        if self.dead:
            raise OwnerGoneError("the zkv owner is gone (the read cache was dropped)")
        hit = self._entries.get(key)
        if hit is None:
            self.misses += 1
            return NOHIT
        self.hits += 1
        _version, payload, shared = hit
        if shared:
            return payload
        return codec.loads(payload)

    def fill(self, key: str, version: int, frames: list[Any] | None) -> Any:
        """Record the reply to a ``get`` of ``key`` that reflects changes up to ``version``
        (``frames`` None: the key was missing); return the value (``MISSING`` if absent)."""
        if frames is None:
            value: Any = MISSING
            payload, shared = MISSING, True
        else:
            value = codec.loads(frames)
            if type(value) in IMMUTABLE_TYPES:
                payload, shared = value, True
            else:
                payload, shared = [bytes(f) for f in frames], False
        with self._mutex:
            if version >= self._global_floor and version >= self._floor.get(key, 0) \
                    and self.covers(key):
                entries = self._entries
                entries[key] = (version, payload, shared)
                if len(entries) > self.max_entries:
                    del entries[next(iter(entries))]
        return value

    def written(self, keys: Iterable[str] | None, version: int) -> None:
        """This process changed ``keys`` (None: possibly every key) in changes numbered up to
        ``version``: drop them, and refuse older replies from now on."""
        with self._mutex:
            if keys is None:
                self._entries.clear()
                self._floor.clear()
                self._global_floor = max(self._global_floor, version)
                return
            for key in keys:
                self._entries.pop(key, None)
                if self._floor.get(key, 0) < version:
                    self._floor[key] = version
            self._trim_floors()

    def _invalidate(self, key: str, version: int) -> None:
        with self._mutex:
            hit = self._entries.get(key)
            if hit is not None and hit[0] < version:
                del self._entries[key]
            if self._floor.get(key, 0) < version:
                self._floor[key] = version
            self._trim_floors()

    def _trim_floors(self) -> None:
        if len(self._floor) > 2 * self.max_entries:  # fold into one floor: safe, just colder
            self._global_floor = max(self._global_floor, *self._floor.values())
            self._floor.clear()
            self._entries.clear()

    # -- invalidations ---------------------------------------------------------------------------

    def _drain(self, now: float) -> None:
        if not self._sock_lock.acquire(blocking=False):
            return  # another thread is draining right now
        try:
            if self._closed:
                return
            self._next_drain = now + DRAIN_INTERVAL
            sock = self._sock
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_message(frames)
            if now >= self._next_alive:
                self._next_alive = now + _ALIVE_INTERVAL
                if not self._alive():
                    self.dead = True
                    with self._mutex:
                        self._entries.clear()
        finally:
            self._sock_lock.release()

    def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            return
        topic = frames[0]
        try:
            seq, version, kind = wire.unpack_meta(frames[1])
        except Exception:
            return
        if kind != Kind.INVALIDATE:
            return
        lost_before = self._gaps.dropped
        if not self._gaps.accept(topic, seq):
            return
        if self._gaps.dropped != lost_before:
            # Invalidations were lost: nothing cached can be trusted, nor any reply older
            # than this one.
            self.written(None, version)
            self.flushes += 1
            return
        self._invalidate(wire.key_str(frames[2]), version)

    def close(self) -> None:
        with self._sock_lock:
            if not self._closed:
                self._closed = True
                self._sock.close(0)
        with self._mutex:
            self._entries.clear()
