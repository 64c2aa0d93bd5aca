"""The owner's side of a store: operations applied to the data directly, in the calling thread.

Nothing here touches a socket: ``get`` and ``set`` in the owner are a dict lookup and a dict
store under a lock. Every other operation runs its entry of :mod:`zkv.ops` on objects, with a
:class:`LocalContext`. Publishing and change events are handed to the loop thread (the outbox).
"""

from __future__ import annotations

import threading
import time
from typing import Any, ParamSpec, TypeVar

import zmq

from .. import ops, reentry
from ..codec import Frame
from ..config import Options
from ..core import Call
from ..dispatch import Dispatcher
from ..ops import Op
from ..pubsub import Subscriber, Topics
from ..snapshot import Snapshots
from ..state import Entry, State
from .loop import Owner
from .outbox import Publish
from .sessions import OWNER_SESSION

__all__ = ["LocalContext", "LocalCore"]

P = ParamSpec("P")
R = TypeVar("R")


class LocalContext:
    """The :class:`~zkv.ops.Context` of a call made in the owner's own process."""

    remote = False

    def __init__(self, owner: Owner, snapshots: Snapshots) -> None:
        self.state: State = owner.state
        self._owner = owner
        self._snapshots = snapshots

    def entry_frames(self, entry: Entry) -> list[Frame]:
        return entry.wire()

    def acquire_lock(self, name: str, token: bytes, timeout: float | None) -> bool:
        locks = self._owner.locks
        granted = threading.Event()
        outcome: list[bool] = []

        def grant(ok: bool) -> None:
            outcome.append(ok)
            granted.set()

        if reentry.active():  # inside a function the owner runs: only a lock that is free now
            got = locks.acquire(name, OWNER_SESSION, token, time.monotonic(), grant)
            if not got and timeout != 0:
                reentry.refuse(f"waiting for lock {name!r}")
            return bool(got)
        deadline = None if timeout is None else time.monotonic() + timeout
        got = locks.acquire(name, OWNER_SESSION, token, deadline, grant)
        if got is not None:
            return got
        ok = False
        try:
            ok = granted.wait(None if timeout is None else timeout + 0.5) and outcome[0]
        finally:
            if not ok:  # cancel the wait, or give back a grant that raced with giving up
                locks.release(name, token)
        return ok

    def release_lock(self, name: str, token: bytes) -> bool:
        return self._owner.locks.release(name, token)

    def publish(self, channel: str, frames: list[Frame]) -> None:
        self._owner.wait_for_room()  # (never under the state lock: the loop may need it)
        with self.state.lock:  # in order with the change events of concurrent writes
            self._owner.outbox.put(Publish(channel, frames))

    def end_session(self) -> None:  # pragma: no cover - a remote-only operation
        raise NotImplementedError

    def cache_watch(self, prefixes: list[bytes]) -> int:  # pragma: no cover - remote-only
        raise NotImplementedError

    def cache_unwatch(self, prefixes: list[bytes]) -> None:  # pragma: no cover - remote-only
        raise NotImplementedError

    def cache_sync(self) -> int:  # pragma: no cover - remote-only
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        return self._owner.stats()

    def save(self, path: str) -> Any:
        return self._snapshots.save(path).to_dict()


class LocalCore:
    """Store operations for the process that owns the data (a :class:`~zkv.core.Core`)."""

    is_owner = True

    def __init__(self, options: Options, address: str | None = None) -> None:
        self.options = options
        #: Loaded before anything is bound: a bad snapshot file leaves nothing behind.
        self.snapshots = Snapshots(options.snapshot, options.snapshot_every)
        self.snapshots.open()
        try:
            self.owner = Owner(options, address)
        except BaseException:
            self.snapshots.close()
            raise
        self.snapshots.start(self.owner.state)
        self.owner.requests.snapshots = self.snapshots
        self.owner.start()
        self.state = self.owner.state
        self._ctx = LocalContext(self.owner, self.snapshots)
        self.endpoint = self.owner.endpoint
        self._zmq: zmq.Context[Any] = self.owner.bound.ctx
        self._pub = self.owner.bound.inproc_pub

    @property
    def op_context(self) -> LocalContext:
        """The :class:`~zkv.ops.Context` this core applies operations with."""
        return self._ctx

    @property
    def context(self) -> zmq.Context[Any]:
        """The owner's ZeroMQ context (its own subscribers' sockets are made from it)."""
        return self._zmq

    def get(self, key: str, default: Any) -> Any:
        entry = self.state.get(key)
        if entry is None:
            return default
        return entry.load()

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.state.put(key, Entry.from_object(value), ttl)

    def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return op.local(self._ctx, *args)

    def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        ctx = self._ctx
        with self.state.lock:
            return ops.run_all(calls, lambda op, args: op.local(ctx, *args), out)

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        return self._ctx.acquire_lock(name, token, timeout)

    def lock_release(self, name: str, token: bytes) -> bool:
        return self._ctx.release_lock(name, token)

    def subscriber(self, topics: Topics, what: str) -> Subscriber:
        return Subscriber(self._zmq, self._pub, topics, hwm=self.options.hwm,
                          timeout=self.options.timeout, alive=self.owner_alive, what=what)

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self._zmq, self._pub, hwm=self.options.hwm,
                          timeout=self.options.timeout, alive=self.owner_alive)

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        """Nothing to do: the owner's reads are local already."""

    def disable_cache(self, prefix: str | None) -> None:
        """Nothing to do (see enable_cache)."""

    def cache_info(self) -> dict[str, int]:
        return {"hits": 0, "misses": 0, "entries": 0, "flushes": 0}

    def owner_alive(self) -> bool:
        return True

    def close(self) -> None:
        self.owner.close()
        self.snapshots.close()  # after the loop: the last save has every change
