"""Work that the owner's other threads hand to its loop thread, which alone owns the sockets.

What owner threads publish, the change events of what they write, lock grants and the late
replies of requests that another thread completed (a save) are put on
the :class:`Outbox` (change events under the state lock, so in the order the changes were
applied), and the loop is woken. A thread that fills the outbox past :data:`LIMIT` waits for
the loop to catch up (publishing, or writing watched keys, in a tight loop then goes at the
pace the loop sends, instead of queueing without bound).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from ..codec import Frame
from ..errors import ZkvTimeoutError
from ..sockets import Waker
from ..state import Entry

__all__ = ["LIMIT", "Change", "Grant", "Item", "Outbox", "Publish", "Reply"]

#: Items queued before owner threads wait for the loop.
LIMIT = 4096


@dataclasses.dataclass(slots=True)
class Publish:
    """A message to fan out on ``channel``."""

    channel: str
    frames: list[Frame]


@dataclasses.dataclass(slots=True)
class Change:
    """A change of a key, for its watchers and caching clients (``kind``: state.SET, DELETE
    or EXPIRE)."""

    kind: int
    key: str
    entry: Entry | None
    version: int


@dataclasses.dataclass(slots=True)
class Grant:
    """The late answer to a lock wait: ``granted`` or timed out."""

    routing_id: bytes
    rid: int
    granted: bool


@dataclasses.dataclass(slots=True)
class Reply:
    """The late answer to a request that another thread completes (a save): sent as it is."""

    routing_id: bytes
    rid: int
    status: int
    frames: list[Frame]


Item = Publish | Change | Grant | Reply


class Outbox:
    """A queue of :data:`Item` from owner threads to the loop thread, with its wake-up."""

    def __init__(self, timeout: float) -> None:
        self._items: collections.deque[Item] = collections.deque()
        self.waker = Waker()
        self._timeout = timeout
        self._room = threading.Condition()
        self._waiters = 0
        self.loop_thread: int | None = None  # ident of the loop thread, once it runs
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> None:
        """Queue ``item`` and wake the loop (not needed from the loop thread itself)."""
        self._items.append(item)
        if threading.get_ident() != self.loop_thread:
            self.waker.wake()

    def take(self, limit: int) -> list[Item]:
        """Up to ``limit`` items, oldest first (loop thread)."""
        items = self._items
        out = []
        for _ in range(min(limit, len(items))):
            out.append(items.popleft())
        if self._waiters:
            with self._room:
                self._room.notify_all()
        return out

    def wait_for_room(self, may_wait: Callable[[], bool]) -> None:
        """Block the calling owner thread while the outbox is full (see the module docstring).
        ``may_wait()`` says whether this thread may wait now (not while it holds the store's
        lock, which the loop may need). Raises ZkvTimeoutError if the loop does not catch up
        within the store's timeout."""
        if len(self._items) < LIMIT or threading.get_ident() == self.loop_thread:
            return
        if not may_wait():
            return
        deadline = time.monotonic() + self._timeout
        with self._room:
            self._waiters += 1
            try:
                while len(self._items) >= LIMIT and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ZkvTimeoutError(
                            f"the zkv owner's loop did not catch up with {len(self._items)} "
                            f"queued messages within {self._timeout}s")
                    self._room.wait(min(remaining, 0.1))
            finally:
                self._waiters -= 1

    def close(self) -> None:
        self.closed = True
        with self._room:
            self._room.notify_all()
        self.waker.close()
