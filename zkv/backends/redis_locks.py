"""Locks on Redis: leases with an owner token, renewed while held.

A lock named ``name`` is the key ``{ns}:l:name``, holding the token of its holder, set with
``SET NX PX lease``. While a process holds locks, a thread of its own renews each one every
third of the lease, by a script that checks the token first. Releasing is a script too: it
deletes the key only if it still holds the releaser's token, and tells waiters on
``{ns}:lr:name``. So:

- a lock is freed when its holder releases it, closes its store, or **dies**: then nobody
  renews it, and it is free at most one lease (default 10 s, ``?lease=`` in the URL) after
  the holder's last renewal;
- a holder stopped for longer than the lease (SIGSTOP, a swap storm, a long GC pause) loses
  its lock; its ``release()`` then raises :class:`~zkv.LockError` ("no longer held"), as it
  does on a zkv owner for a holder that was dropped;
- waiters are woken by the release message and try again; they are not served first come,
  first served (Redis has no queue of waiters).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import ZkvError
from .redis_scripts import LOCK, RENEW, UNLOCK

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisCore

__all__ = ["LockKeeper"]

log = logging.getLogger("zkv.redis")

#: Seconds a waiter waits before trying again even if no release message came (a message
#: can be lost while the listener reconnects).
RETRY_EVERY = 0.25


class _ReleaseListener:
    """One subscription to the lock release messages of a namespace, on a thread of its own,
    that wakes the local waiters of the lock released."""

    def __init__(self, core: RedisCore) -> None:
        self._core = core
        self._prefix = core.space.release_prefix.encode("utf-8", "surrogatepass")
        self._pattern = _glob(core.space.release_prefix) + b"*"
        self._waiters: dict[str, set[threading.Event]] = {}
        self._mutex = threading.Lock()
        self._stopping = False
        self._ready = threading.Event()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="zkv-redis-lock-waits",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(core.timeout)

    def waiter(self, name: str) -> threading.Event:
        event = threading.Event()
        with self._mutex:
            self._waiters.setdefault(name, set()).add(event)
        return event

    def forget(self, name: str, event: threading.Event) -> None:
        with self._mutex:
            events = self._waiters.get(name)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[name]

    def _run(self) -> None:
        while not self._stopping:
            try:
                conn = self._conn = self._core.new_connection()
                conn.connect()
                conn.send_command("PSUBSCRIBE", self._pattern)
                conn.read_response()
                self._ready.set()
                self._wake_all()  # (anything released while it was away)
                while not self._stopping:
                    if not conn.can_read(timeout=0.1):
                        continue
                    reply = conn.read_response()
                    if reply and reply[0] == b"pmessage":
                        name = reply[2][len(self._prefix):].decode("utf-8", "surrogatepass")
                        with self._mutex:
                            events = list(self._waiters.get(name, ()))
                        for event in events:
                            event.set()
            except Exception as exc:
                if self._stopping:
                    break
                log.debug("lock release listener: %s; reconnecting", exc)
                self._wake_all()
                time.sleep(0.1)
            finally:
                if self._conn is not None:
                    try:
                        self._conn.disconnect()
                    except Exception:  # pragma: no cover
                        pass

    def _wake_all(self) -> None:
        with self._mutex:
            events = [e for events in self._waiters.values() for e in events]
        for event in events:
            event.set()

    def close(self) -> None:
        self._stopping = True
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)


def _glob(text: str) -> bytes:
    from .redis_codec import glob_escape

    return glob_escape(text).encode("utf-8", "surrogatepass")


class LockKeeper:
    """The locks one process holds on one Redis store (see the module docstring)."""

    def __init__(self, core: RedisCore) -> None:
        self._core = core
        self.lease = core.url.lease
        self._lease_ms = max(1, round(self.lease * 1000))
        self._held: dict[bytes, bytes] = {}  # token -> lock key
        self._lost: set[bytes] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._listener: _ReleaseListener | None = None

    # -- taking and giving back ----------------------------------------------------------------

    def acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        """Take lock ``name`` for ``token`` within ``timeout`` seconds (None: no limit)."""
        core = self._core
        key = core.space.lock(name)
        deadline = None if timeout is None else time.monotonic() + timeout
        left = core.script(LOCK, [key], [token, self._lease_ms])
        if left == -1:
            self._hold(token, key)
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        listener = self._waits()
        while True:
            woken = listener.waiter(name)
            try:
                left = core.script(LOCK, [key], [token, self._lease_ms])
                if left == -1:
                    self._hold(token, key)
                    return True
                wait = RETRY_EVERY if left < 0 else min(RETRY_EVERY, left / 1000 + 0.001)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                woken.wait(wait)
            finally:
                listener.forget(name, woken)

    def release(self, name: str, token: bytes) -> bool:
        """Release lock ``name`` held by ``token``; False if it no longer held it (its lease
        ran out: someone else may hold it now)."""
        with self._mutex:
            self._held.pop(token, None)
            lost = token in self._lost
            self._lost.discard(token)
        released = bool(self._core.script(
            UNLOCK, [self._core.space.lock(name)],
            [token, self._core.space.release_channel(name)]))
        return released and not lost

    def _hold(self, token: bytes, key: bytes) -> None:
        with self._mutex:
            self._held[token] = key
            if self._renewer is None or not self._renewer.is_alive():
                self._stop.clear()
                self._renewer = threading.Thread(target=self._renew_loop,
                                                 name="zkv-redis-locks", daemon=True)
                self._renewer.start()

    def _waits(self) -> _ReleaseListener:
        with self._mutex:
            if self._listener is None:
                self._listener = _ReleaseListener(self._core)
            return self._listener

    # -- renewing --------------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            with self._mutex:
                held = list(self._held.items())
                if not held:
                    self._renewer = None
                    return
            for token, key in held:
                try:
                    kept = self._core.script(RENEW, [key], [token, self._lease_ms])
                except ZkvError as exc:
                    log.warning("could not renew a lock (%s); it is lost if this lasts "
                                "%.1f s", exc, self.lease)
                    continue
                if not kept:
                    with self._mutex:
                        if self._held.pop(token, None) is not None:
                            self._lost.add(token)
                    log.warning("lock %r was lost: its lease (%.1f s) ran out before it was "
                                "renewed", key, self.lease)

    def close(self) -> None:
        """Release every lock held (the store is closing) and stop the threads."""
        self._stop.set()
        with self._mutex:
            held = list(self._held.items())
            self._held.clear()
            listener, self._listener = self._listener, None
        prefix = self._core.space.lock_prefix.encode("utf-8", "surrogatepass")
        for token, key in held:
            name = key[len(prefix):].decode("utf-8", "surrogatepass")
            try:
                self._core.script(UNLOCK, [key],
                                  [token, self._core.space.release_channel(name)])
            except ZkvError:
                pass  # its lease frees it
        if listener is not None:
            listener.close()
