"""The owner's side of a store: operations applied to the :class:`~zkv.state.State` directly.

Nothing here touches a socket: ``get`` and ``set`` in the owner are a dict lookup and a dict
store under a lock. Publishing and change events are handed to the poller thread
(:meth:`zkv.server.Server.post`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from . import codec, reentry, wire
from .config import Options
from .locks import LockTable
from .server import OWNER_SESSION, Server
from .state import MISSING, Entry, State

__all__ = ["LocalCore"]


class LocalCore:
    """Store operations for the process that owns the data."""

    is_owner = True

    def __init__(self, options: Options, bind: str | None = None) -> None:
        self.options = options
        self.state = State()
        self.locks = LockTable()
        self.server = Server(self.state, options, self.locks, bind)
        self.server.start()
        self.endpoint = self.server.endpoint
        self.pub_address = self.server.inproc_pub
        self.context: zmq.Context[Any] = self.server._ctx

    # -- reads -----------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        entry = self.state.data.get(key)
        if entry is None:
            return default
        return entry.load()

    def contains(self, key: str) -> bool:
        return key in self.state.data

    def length(self) -> int:
        return len(self.state.data)

    def keys(self) -> list[str]:
        with self.state.lock:
            return list(self.state.data)

    def get_all(self) -> dict[str, Any]:
        return {key: entry.load() for key, entry in self.state.snapshot().items()}

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        data = self.state.data
        with self.state.lock:  # read atomically: never half of a concurrent set_many
            entries = [(key, data.get(key)) for key in keys]
        return {key: entry.load() for key, entry in entries if entry is not None}

    # -- writes ----------------------------------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        self.state.put(key, Entry.from_object(value))

    def set_many(self, items: list[tuple[str, Any]]) -> None:
        self.state.put_many([(key, Entry.from_object(value)) for key, value in items])

    def delete(self, key: str) -> bool:
        return self.state.delete(key) is not None

    def clear(self) -> None:
        self.state.clear()

    def modify(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        return self.state.modify(key, fn, default).load()

    def incr(self, key: str, amount: int | float) -> int | float:
        return self.state.incr(key, amount)

    def setdefault(self, key: str, default: Any) -> Any:
        return self.state.setdefault(key, Entry.from_object(default)).load()

    def pop(self, key: str, default: Any) -> Any:
        entry = self.state.delete(key)
        if entry is None:
            if default is MISSING:
                raise KeyError(key)
            return default
        return entry.load()

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        return self.state.compare_and_set(key, expected, Entry.from_object(new))

    def transact(self, fn: Callable[[Any], Any]) -> Any:
        return self.state.transact(fn)

    def execute(self, calls: list[tuple[str, tuple[Any, ...]]],
                out: list[Any] | None = None) -> list[Any]:
        """Run queued operations in order, as one atomic step. Every operation runs; the first
        error is raised after all of them. The results are also appended to ``out``."""
        results: list[Any] = [] if out is None else out
        first_error: BaseException | None = None
        with self.state.lock:
            for name, args in calls:
                try:
                    results.append(getattr(self, name)(*args))
                except Exception as exc:
                    results.append(exc)
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results

    # -- locks -----------------------------------------------------------------------------------

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        granted = threading.Event()
        outcome: list[bool] = []

        def grant(ok: bool) -> None:
            outcome.append(ok)
            granted.set()

        if reentry.active():  # inside a function the owner runs: only a lock that is free now
            got = self.locks.acquire(name, OWNER_SESSION, token, time.monotonic(), grant)
            if not got and timeout != 0:
                reentry.refuse(f"waiting for lock {name!r}")
            return bool(got)
        deadline = None if timeout is None else time.monotonic() + timeout
        got = self.locks.acquire(name, OWNER_SESSION, token, deadline, grant)
        if got is not None:
            return got
        ok = False
        try:
            ok = granted.wait(None if timeout is None else timeout + 0.5) and outcome[0]
        finally:
            if not ok:  # cancel the wait, or give back a grant that raced with giving up
                self.locks.release(name, token)
        return ok

    def lock_release(self, name: str, token: bytes) -> bool:
        return self.locks.release(name, token)

    # -- publish ---------------------------------------------------------------------------------

    def publish(self, channel: str, data: Any) -> None:
        frames = codec.dumps(data, copy_buffers=True)
        if not reentry.active():  # (never under the state lock: the poller may need it)
            self.server.wait_for_room()
        with self.state.lock:  # in order with the change events of concurrent writes
            self.server.post(("pub", wire.key_bytes(channel), frames))

    def owner_alive(self) -> bool:
        return True

    def expect_probe(self, probe: bytes) -> None:
        """A subscriber of this process waits for the welcome of ``probe``."""
        self.server.expect_probe(probe)

    def stats(self) -> dict[str, int]:
        return self.server.stats()

    def close(self) -> None:
        self.server.close()
