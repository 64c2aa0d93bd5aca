"""The opt-in client-side read cache (:meth:`zkv.Store.enable_cache`).

Repeated ``get`` of a key under a cached prefix is served from this process's memory. The
owner invalidates: the process registers a dedicated DEALER socket for the prefixes it caches,
and for every change of a key under one of them the owner pushes an invalidation (the key, the
change's number, and a sequence number of that socket's invalidations) to it. A reading thread
drains the pushed invalidations before it serves a value, at most every ``DRAIN_INTERVAL``
seconds (and always after a pause), so no extra thread is needed and a busy reader cannot
starve the invalidations.

Why a value can never stay stale:

- every reply says up to which change number it reflects the store (``before``, see
  :mod:`zkv.wire`), and every cached value remembers that number;
- the cache keeps, per key, a *floor*: the highest change number it has seen for the key, from
  an invalidation or from this process's own write (a write's reply says ``after``);
- a reply is cached only if its number is at least the key's floor, and an invalidation drops
  a cached value only if the value is older than the change. So whether a reply or the
  invalidation that makes it stale arrives first, the older value loses, and a process always
  reads its own writes (its write raises the floor before it returns);
- invalidations that the owner had to drop (this process stopped reading and more than ``hwm``
  piled up) are seen as a gap in the sequence, and the whole cache is dropped. A loss at the
  *end* of a burst has no later message to reveal it, so a drain that finds a backlog that big
  asks the owner where the sequence stands (``CACHE_SYNC``). That reply travels on the same
  pipe as the invalidations, after them: if the sequence moved further than what arrived,
  some were lost and the cache is dropped.

The window in which another process's write is not yet visible here is the time an
invalidation takes to arrive plus at most ``DRAIN_INTERVAL`` (measured by ``zkv bench``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from . import codec, ops, wire
from .codec import IMMUTABLE_TYPES
from .errors import OwnerGoneError, ProtocolError, ZkvTimeoutError
from .state import MISSING
from .wire import Status

__all__ = ["DRAIN_INTERVAL", "NOHIT", "ReadCache"]

log = logging.getLogger("zkv.cache")

#: Returned by :meth:`ReadCache.lookup` when the key is not cached.
NOHIT: Any = object()

#: A reading thread looks for invalidations at most this often (seconds).
DRAIN_INTERVAL = 100e-6
_ALIVE_INTERVAL = 0.1
_RESEND = 0.25


class ReadCache:
    """Cached ``get`` results of one client process, kept fresh by the owner's invalidations.

    Thread-safe. ``sock`` is a DEALER made for this cache (``Connection.open_socket``); it is
    used under ``_sock_lock`` by whichever thread drains it, and closed by :meth:`close`."""

    def __init__(self, sock: zmq.Socket[Any], *, hwm: int, timeout: float,
                 alive: Callable[[], bool], max_entries: int = 100_000) -> None:
        self._sock = sock
        self._hwm = hwm
        self._timeout = timeout
        self._alive = alive
        self.max_entries = max_entries
        self._entries: dict[str, tuple[int, Any, bool]] = {}
        self._floor: dict[str, int] = {}
        self._global_floor = 0
        self._prefixes: list[str] = []
        self._mutex = threading.Lock()
        self._sock_lock = threading.Lock()
        self._seq = 0
        self._rid = 0
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
        with self._sock_lock:
            seq, version = self._request(ops.CACHE_WATCH.code, [wire.key_bytes(prefix)])
            self._check_seq(seq, version)
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
        if gone:
            with self._sock_lock:
                if not self._closed:
                    self._request(ops.CACHE_UNWATCH.code, [wire.key_bytes(p) for p in gone])

    def info(self) -> dict[str, int]:
        """``hits``, ``misses``, ``entries`` (values held now) and ``flushes`` (times the
        cache was dropped whole because invalidations were lost)."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                "flushes": self.flushes}

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

    def _lost(self, version: int) -> None:
        """Invalidations were lost: nothing cached can be trusted, nor any reply older than
        ``version``."""
        self.written(None, version)
        self.flushes += 1
        log.warning("zkv read cache lost invalidations (it fell more than hwm=%d behind); "
                    "dropped the whole cache", self._hwm)

    # -- the invalidation socket (callers hold _sock_lock) ---------------------------------------

    def _drain(self, now: float) -> None:
        if not self._sock_lock.acquire(blocking=False):
            return  # another thread is draining right now
        try:
            if self._closed:
                return
            self._next_drain = now + DRAIN_INTERVAL
            sock = self._sock
            count = 0
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_message(frames)
                count += 1
            if count >= self._hwm // 2:
                # A backlog this big may have overflowed, losing invalidations at its end
                # where no later one shows the gap: ask the owner where the sequence is.
                seq, version = self._request(ops.CACHE_SYNC.code, [])
                self._check_seq(seq, version)
            if now >= self._next_alive:
                self._next_alive = now + _ALIVE_INTERVAL
                if not self._alive():
                    self.dead = True
                    with self._mutex:
                        self._entries.clear()
        finally:
            self._sock_lock.release()

    def _request(self, op: int, frames: list[bytes]) -> tuple[int, int]:
        """Send a request on the invalidation socket; handle the invalidations queued before
        its reply; return the reply's sequence number (0 if none) and ``after`` version.

        The owner drops what it cannot queue to this socket, a reply included, while the
        socket is full of invalidations; so the (idempotent) request is sent again every
        ``_RESEND`` seconds until a reply comes, while the backlog is being read."""
        deadline = time.monotonic() + self._timeout
        resend = 0.0
        rid = self._rid
        while True:
            now = time.monotonic()
            if now >= resend:
                self._rid = rid = (self._rid + 1) & 0xFFFFFFFF
                self._sock.send_multipart(wire.request(rid, op, frames))
                resend = now + _RESEND
            if self._sock.poll(10):
                reply = self._sock.recv_multipart()
                got, status, _flags, _before, after, results = wire.parse_reply(reply[0],
                                                                                 reply[1:])
                if status == Status.INVALIDATE:
                    self._on_message(reply)
                    continue
                if got != rid:
                    continue
                if status == Status.ERROR:
                    raise wire.decode_error(results)
                seq = wire.unpack_seq(results[0]) if results else 0
                return seq, after
            if not self._alive():
                self.dead = True
                raise OwnerGoneError("the zkv owner is gone")
            if time.monotonic() > deadline:
                raise ZkvTimeoutError("the zkv owner did not answer the read cache")

    def _check_seq(self, seq: int, version: int) -> None:
        if seq > self._seq:
            if self._seq or self._entries:
                self._lost(version)
            self._seq = seq

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            _rid, status, _flags, seq, version, results = wire.parse_reply(frames[0],
                                                                           frames[1:])
        except ProtocolError:
            return
        if status != Status.INVALIDATE or len(results) != 1:
            return
        if seq <= self._seq:
            return
        gap = seq - self._seq - 1
        self._seq = seq
        if gap:
            self._lost(version)
            return
        self._invalidate(wire.key_str(results[0]), version)

    def close(self) -> None:
        with self._sock_lock:
            if not self._closed:
                self._closed = True
                self._sock.close(0)
        with self._mutex:
            self._entries.clear()
