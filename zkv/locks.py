"""Cross-process locks: the owner's table of holders and waiters, and the handle users hold.

A lock is held by one *holder*: a (session, token) pair, where the session is a process's
connection to the owner and the token is fresh for every acquisition. Waiters are served first
come, first served. When a session ends (its process closes the store or dies) every lock it
holds is released and its waits are cancelled.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .errors import LockError, ZkvTimeoutError

__all__ = ["Lock", "LockHandle", "LockTable"]

#: A waiter's callback: True when the lock is granted to it, False when its wait timed out.
Grant = Callable[[bool], None]


@dataclasses.dataclass
class _Waiter:
    session: bytes
    token: bytes
    deadline: float | None
    grant: Grant


class LockTable:
    """The owner's record of who holds which lock and who waits for it. Thread-safe; grant
    callbacks are called with the table's lock held, so they must only hand work off."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._waiting: dict[str, collections.deque[_Waiter]] = {}

    def acquire(self, name: str, session: bytes, token: bytes, deadline: float | None,
                grant: Grant) -> bool | None:
        """Take ``name`` for (session, token) if it is free (True). Otherwise, if the deadline
        has passed, False; else queue the waiter and return None: ``grant`` is called later."""
        with self._mutex:
            if name not in self._held:
                self._held[name] = (session, token)
                return True
            if deadline is not None and deadline <= time.monotonic():
                return False
            self._waiting.setdefault(name, collections.deque()).append(
                _Waiter(session, token, deadline, grant))
            return None

    def release(self, name: str, token: bytes) -> bool:
        """Release ``name`` if ``token`` holds it, or cancel ``token``'s wait for it.
        Returns False if the token neither holds nor waits."""
        with self._mutex:
            holder = self._held.get(name)
            if holder is not None and holder[1] == token:
                self._pass_on(name)
                return True
            queue = self._waiting.get(name)
            if queue:
                for waiter in queue:
                    if waiter.token == token:
                        queue.remove(waiter)
                        return True
            return False

    def _pass_on(self, name: str) -> None:
        queue = self._waiting.get(name)
        while queue:
            waiter = queue.popleft()
            self._held[name] = (waiter.session, waiter.token)
            if not queue:
                del self._waiting[name]
            waiter.grant(True)
            return
        self._waiting.pop(name, None)
        del self._held[name]

    @property
    def waiting(self) -> bool:
        """Whether anyone waits for a lock (cheap; no lock taken)."""
        return bool(self._waiting)

    def expire(self, now: float) -> float | None:
        """Time out waiters whose deadline passed; return the next deadline, if any."""
        nearest: float | None = None
        with self._mutex:
            for name in list(self._waiting):
                queue = self._waiting[name]
                for waiter in list(queue):
                    if waiter.deadline is None:
                        continue
                    if waiter.deadline <= now:
                        queue.remove(waiter)
                        waiter.grant(False)
                    elif nearest is None or waiter.deadline < nearest:
                        nearest = waiter.deadline
                if not queue:
                    del self._waiting[name]
        return nearest

    def drop_session(self, session: bytes) -> None:
        """Forget a session that ended: release its locks, cancel its waits."""
        with self._mutex:
            for name, queue in list(self._waiting.items()):
                kept = collections.deque(w for w in queue if w.session != session)
                if kept:
                    self._waiting[name] = kept
                else:
                    del self._waiting[name]
            for name, (holder, _token) in list(self._held.items()):
                if holder == session:
                    self._pass_on(name)

    def sessions(self) -> set[bytes]:
        """Sessions that hold or wait for a lock."""
        with self._mutex:
            out = {holder for holder, _ in self._held.values()}
            for queue in self._waiting.values():
                out.update(w.session for w in queue)
            return out


def _wait(timeout: object, what: str) -> float | None:
    """A lock wait as given by the caller: None (or ``inf``) for no limit, else seconds >= 0.
    Raises ValueError for anything else (NaN included)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not timeout >= 0:  # NaN is not >= 0
        raise ValueError(f"{what} must be None or a number of seconds >= 0, not {timeout!r}")
    return None if timeout == float("inf") else float(timeout)


class LockBackend(Protocol):
    """What a :class:`Lock` needs from a store's core."""

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool: ...

    def lock_release(self, name: str, token: bytes) -> bool: ...


class LockHandle:
    """What a lock handle knows, without I/O: its name, its default wait, and the token it
    holds the lock with. :class:`Lock` and :class:`zkv.AsyncLock` add the calls."""

    def __init__(self, name: str, timeout: float | None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"lock names must be str, not {type(name).__name__}")
        self.name = name
        self.timeout = _wait(timeout, "timeout")
        self._token: bytes | None = None
        self._pid = 0  # the process that holds it (a forked child only has a copy)

    def _asking(self, blocking: bool, timeout: float | None) -> tuple[bytes, float | None]:
        """A new token, and how long to wait (see ``acquire``)."""
        if self.locked():
            raise LockError(f"lock {self.name!r} is already held by this handle")
        if not blocking:
            wait: float | None = 0.0
        elif timeout == -1:
            wait = self.timeout
        else:
            wait = _wait(timeout, "timeout")
        return os.urandom(16), wait

    def _taken(self, token: bytes) -> None:
        self._token = token
        self._pid = os.getpid()

    def _giving_back(self) -> bytes:
        """The token to release the lock with (this handle no longer holds it)."""
        if self._token is not None and self._pid != os.getpid():
            raise LockError(f"lock {self.name!r} is held by process {self._pid}; this process "
                            f"(a child forked while it was held) cannot release it")
        token, self._token = self._token, None
        if token is None:
            raise LockError(f"lock {self.name!r} is not held by this handle")
        return token

    def _not_held(self) -> LockError:
        return LockError(f"lock {self.name!r} was no longer held (its holder was dropped)")

    def _timed_out(self) -> ZkvTimeoutError:
        return ZkvTimeoutError(f"could not acquire lock {self.name!r} within {self.timeout}s")

    def locked(self) -> bool:
        """Whether this handle holds the lock (in this process: False in a forked child)."""
        return self._token is not None and self._pid == os.getpid()

    def __repr__(self) -> str:
        state = "held" if self.locked() else "free"
        return f"<zkv.{type(self).__name__} {self.name!r} {state}>"


class Lock(LockHandle):
    """A cross-process lock named ``name``, from :meth:`zkv.Store.lock`.

    Use it as a context manager (``with store.lock("name"):``), which waits up to the
    ``timeout`` given to :meth:`~zkv.Store.lock` (None: until it is free) and raises
    :class:`~zkv.ZkvTimeoutError` if it passes. It is not reentrant. It is released when the
    block ends, when :meth:`release` is called, or when the holding process dies. It belongs
    to the process that acquired it: a child forked while it is held cannot release it.
    """

    def __init__(self, backend: LockBackend, name: str, timeout: float | None) -> None:
        super().__init__(name, timeout)
        self._backend = backend

    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:
        """Take the lock. ``blocking=False`` tries once; ``timeout`` (seconds; the default is
        the lock's own; None or ``inf``: until it is free) bounds the wait. Returns whether the
        lock was taken."""
        token, wait = self._asking(blocking, timeout)
        if self._backend.lock_acquire(self.name, token, wait):
            self._taken(token)
            return True
        return False

    def release(self) -> None:
        """Release the lock. Raises LockError if this handle does not hold it, and in a
        forked child whose parent holds it (the lock stays with the parent)."""
        if not self._backend.lock_release(self.name, self._giving_back()):
            raise self._not_held()

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise self._timed_out()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
