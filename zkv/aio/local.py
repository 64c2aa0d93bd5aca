"""The owner's asyncio side of a store: :class:`AsyncLocalCore`, over the process's
:class:`~zkv.owner.local.LocalCore`.

In the owner an operation is a few dictionary operations: the async core runs it directly, in
the event loop's thread, from the table of operations. It never lets the loop wait:

- it holds the store's lock while the operation runs; if another thread holds it (a client's
  long ``transact``, a ``get_all`` of a large store), the operation runs in a zkv thread
  instead of blocking the loop until that ends. Values to store are pickled, and results
  unpickled, outside the lock;
- publishing, and writing keys that someone watches, wait while the owner's queue of outgoing
  messages is full (pacing): that wait happens in a zkv thread, then the operation runs;
- a lock wait is a future that the lock table's grant sets (from the owner's loop thread);
- a save lists the store (the pause) and awaits the snapshot thread's writing;
- an operation that completes at once does not give the loop a turn (that is what makes it
  fast), so every :data:`TURN_EVERY` calls one of them yields to the loop first: a loop of
  awaited calls never starves the loop's other tasks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, ParamSpec, TypeVar, cast

from .. import ops, reentry
from ..core import Call
from ..ops import Op
from ..owner.local import LocalCore
from ..owner.outbox import LIMIT
from ..owner.sessions import OWNER_SESSION
from ..pubsub import Subscriber, Topics
from ..snapshot import SaveResult
from ..state import Entry
from . import threads

__all__ = ["TURN_EVERY", "AsyncLocalCore"]

#: Calls between two turns given to the event loop (see the module docstring).
TURN_EVERY = 32

P = ParamSpec("P")
R = TypeVar("R")


def _settle(future: asyncio.Future[bool], granted: bool) -> None:
    if not future.done():
        future.set_result(granted)


class AsyncLocalCore:
    """Store operations for the process that owns the data, awaited (an
    :class:`~zkv.aio.core.AsyncCore`)."""

    is_owner = True

    def __init__(self, local: LocalCore) -> None:
        #: The sync core this one is the asyncio face of.
        self.sync = local
        self._sync = local
        self.endpoint = local.endpoint
        self.state = local.state
        self._lock = local.state.lock
        self._outbox = local.owner.outbox
        self._ctx = local.op_context
        self._calls = 0

    async def _room(self) -> None:
        """Give the loop its turn if it is due; wait, off the loop, while the owner's outgoing
        queue is full (see the module docstring): the caller then runs its operation holding
        the store's lock, where the operation itself does not wait for room."""
        self._calls += 1
        if not self._calls % TURN_EVERY:
            await asyncio.sleep(0)
        if len(self._outbox) >= LIMIT:
            await threads.run(self._sync.owner.wait_for_room)

    async def get(self, key: str, default: Any) -> Any:
        self._calls += 1
        if not self._calls % TURN_EVERY:
            await asyncio.sleep(0)
        return self._sync.get(key, default)  # a dict lookup, no lock (unless just expired)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        entry = Entry.from_object(value)
        await self._room()
        if self._lock.acquire(blocking=False):
            try:
                self.state.put(key, entry, ttl)
            finally:
                self._lock.release()
        else:
            await threads.run(self.state.put, key, entry, ttl)

    async def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if op is ops.SAVE:
            return cast(R, (await self._save(*args)).to_dict())  # type: ignore[arg-type]
        converted = op.local_args(args)
        await self._room()
        if self._lock.acquire(blocking=False):
            try:
                value = op.apply(self._ctx, *converted)
            finally:
                self._lock.release()
        else:
            value = await threads.run(op.apply, self._ctx, *converted)
        return cast(R, op.result.local(value, args))

    async def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        await self._room()
        if self._lock.acquire(blocking=False):
            try:
                return self._sync.execute(calls, out)
            finally:
                self._lock.release()
        return await threads.run(self._sync.execute, calls, out)

    async def _save(self, path: str) -> SaveResult:
        snapshots = self._sync.snapshots
        if self._lock.acquire(blocking=False):
            try:
                done = snapshots.submit(path)  # lists the store: the pause
            finally:
                self._lock.release()
        else:
            done = await threads.run(snapshots.submit, path)
        return await asyncio.wrap_future(done)

    async def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        if reentry.active():  # inside a function the owner runs: as the sync core says
            return self._sync.lock_acquire(name, token, timeout)
        locks = self._sync.owner.locks
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[bool] = loop.create_future()

        def grant(ok: bool) -> None:  # (called by the lock table, holding its mutex)
            try:
                loop.call_soon_threadsafe(_settle, granted, ok)
            except RuntimeError:  # the loop is closed: nobody waits; give the lock back
                if ok:
                    threading.Thread(target=locks.release, args=(name, token),
                                     daemon=True).start()

        deadline = None if timeout is None else time.monotonic() + timeout
        got = locks.acquire(name, OWNER_SESSION, token, deadline, grant)
        if got is not None:
            return got
        ok = False
        try:
            # The owner's loop answers at the deadline; half a second more only in case.
            ok = await asyncio.wait_for(granted, None if timeout is None else timeout + 0.5)
        except asyncio.TimeoutError:
            ok = False
        finally:
            if not ok:  # cancel the wait, or give back a grant that raced with giving up
                locks.release(name, token)
        return ok

    async def lock_release(self, name: str, token: bytes) -> bool:
        return self._sync.lock_release(name, token)

    async def subscriber(self, topics: Topics, what: str) -> Subscriber:
        return await threads.run(self._sync.subscriber, topics, what, cleanup=Subscriber.close)

    def owner_alive(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to close: no socket of its own."""
