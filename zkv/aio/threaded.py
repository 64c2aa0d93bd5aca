"""The asyncio face of a store served by anything else: :class:`AsyncThreadedCore` runs each
call of a sync :class:`~zkv.core.Core` (a Redis backend's, for one) in a thread of its own
pool, so that the event loop never waits on a socket it does not own.

It gives what a thread pool gives: the loop is never blocked, and up to :data:`THREADS` calls
of a process are in flight at once (the rest queue for a thread). A cancelled call goes on in
its thread, as a request already sent does: a write may still be applied; a lock it is granted
meanwhile is released, a subscriber it makes is closed.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, ParamSpec, TypeVar

from ..core import Call, Core
from ..ops import Op
from ..pubsub import Subscriber, Topics
from . import threads

__all__ = ["THREADS", "AsyncThreadedCore"]

#: Threads of one :class:`AsyncThreadedCore`: its calls in flight at once.
THREADS = 16

P = ParamSpec("P")
R = TypeVar("R")


class AsyncThreadedCore:
    """Store operations of any sync core, awaited (an :class:`~zkv.aio.core.AsyncCore`)."""

    def __init__(self, sync: Core) -> None:
        #: The sync core this one is the asyncio face of.
        self.sync = sync
        self.is_owner = sync.is_owner
        self.endpoint = sync.endpoint
        self._pool = concurrent.futures.ThreadPoolExecutor(THREADS,
                                                           thread_name_prefix="zkv-aio-core")

    async def get(self, key: str, default: Any) -> Any:
        return await threads.run(self.sync.get, key, default, pool=self._pool)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        await threads.run(self.sync.set, key, value, ttl, pool=self._pool)

    async def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        run = functools.partial(self.sync.call, op, *args, **kwargs)
        return await threads.run(run, pool=self._pool)

    async def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        return await threads.run(self.sync.execute, calls, out, pool=self._pool)

    async def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        def give_back(granted: bool) -> None:
            if granted:
                self.sync.lock_release(name, token)
        return await threads.run(self.sync.lock_acquire, name, token, timeout,
                                 cleanup=give_back, pool=self._pool)

    async def lock_release(self, name: str, token: bytes) -> bool:
        return await threads.run(self.sync.lock_release, name, token, pool=self._pool)

    async def subscriber(self, topics: Topics, what: str) -> Subscriber:
        return await threads.run(self.sync.subscriber, topics, what,
                                 cleanup=Subscriber.close, pool=self._pool)

    def owner_alive(self) -> bool:
        return self.sync.owner_alive()

    def close(self) -> None:
        """Let the threads end once their calls return (the sync core's closing ends them)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
