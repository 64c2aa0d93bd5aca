"""The asyncio face of a store: :class:`AsyncStore`, :class:`AsyncPipeline`,
:class:`AsyncLock`, and :func:`astore`, :func:`aconnect`.

An :class:`AsyncStore` is another face of a :class:`~zkv.Store`: the same owner, the same
connection and session, the same settings; closing one closes the other. Every method of
``Store`` that talks to the owner has a coroutine of the same name and arguments here, with
the same checks and results (both come from :mod:`zkv.calls`); :data:`SYNC_ONLY` lists the
few that have none, and why. Nothing here blocks the event loop: in the owner the operations
run directly (:mod:`zkv.aio.local`), in a client they are requests on the loop's own socket
(:mod:`zkv.aio.remote`), and the rare steps that must wait for something else (connecting, a
subscription's welcome) run in a zkv thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    ItemsView,
    Iterable,
    KeysView,
    Mapping,
    ValuesView,
)
from typing import Any, TypeVar

from .. import calls
from .. import store as _store
from ..calls import PipelineQueue, Plan
from ..config import Options
from ..core import Call, Core
from ..errors import StoreClosedError
from ..locks import LockHandle
from ..owner.local import LocalCore
from ..pubsub import Subscriber, Topics
from ..remote import RemoteCore
from ..snapshot import SaveResult
from ..state import MISSING, check_ttl
from ..store import Store, connect
from . import threads
from .core import AsyncCore
from .local import AsyncLocalCore
from .remote import AsyncRemoteCore
from .threaded import AsyncThreadedCore

__all__ = ["SYNC_ONLY", "AsyncLock", "AsyncPipeline", "AsyncStore", "aconnect", "astore"]

R = TypeVar("R")

#: The :class:`~zkv.Store` methods that have no coroutine twin in :class:`AsyncStore`, and why.
#: (Twins under another name: ``__iter__`` -> ``__aiter__``, ``__enter__``/``__exit__`` ->
#: ``__aenter__``/``__aexit__``, ``__contains__`` -> ``contains``, ``__len__`` -> ``len``.)
SYNC_ONLY: dict[str, str] = {
    "__getitem__": "`kv[key]` cannot await: use `await kv.get(key, zkv.MISSING)`",
    "__setitem__": "`kv[key] = value` cannot await: use `await kv.set(key, value)`",
    "__delitem__": "`del kv[key]` cannot await: use `await kv.delete(key, "
                   "ignore_key_error=False)`",
    "on_subscriber_receive": "a decorator that registers a callback (plain or coroutine "
                             "function) on the process's dispatcher thread when the function "
                             "is defined: nothing to await; in async code, `async for` over "
                             "`await kv.subscribe(...)`",
    "on_change": "as on_subscriber_receive; in async code, `async for` over "
                 "`await kv.watch(...)`",
    "remove_callback": "undoes on_subscriber_receive/on_change (the dispatcher's, local)",
    "dropped": "counts what the callbacks of on_subscriber_receive lost (local)",
    "enable_cache": "the read cache serves the sync face's get (answered from memory, it never "
                    "waits); the async face always asks the owner, and keeps the cache right",
    "disable_cache": "see enable_cache",
    "cache_info": "see enable_cache",
}

#: id(sync core) -> its asyncio core, while that lives (it holds the sync core, so the id is
#: that core's for as long as the entry exists).
_ASYNC_CORES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_ASYNC_CORES_LOCK = threading.Lock()


def _async_core(core: Core) -> AsyncCore:
    """The asyncio core over ``core`` (one per sync core: every AsyncStore of a store shares
    its sockets)."""
    with _ASYNC_CORES_LOCK:
        made: AsyncCore | None = _ASYNC_CORES.get(id(core))
        if made is None or made.sync is not core:
            if isinstance(core, LocalCore):
                made = AsyncLocalCore(core)
            elif isinstance(core, RemoteCore):
                made = AsyncRemoteCore(core)
            else:  # another backend (Redis): its sync calls, each in a thread
                made = AsyncThreadedCore(core)
            _ASYNC_CORES[id(core)] = made
        return made


class AsyncStore:
    """The asyncio face of a :class:`~zkv.Store` (see the module docstring)::

        kv = zkv.astore()                  # the process-wide store, owner or client
        await kv.set("config", {"rate": 3})
        await kv.incr("jobs")
        async with kv.lock("report"):
            ...
        async for data in await kv.subscribe("news"):
            ...

    Obtain one with :func:`zkv.astore` or :func:`zkv.aconnect`, which return at once and
    connect on first use, or ``AsyncStore(store)`` over a store you have. Each method awaits
    the :class:`~zkv.Store` method of the same name, with the same arguments, checks, results
    and errors. Many calls of one event loop may be in flight at once (``asyncio.gather``);
    each event loop (one per thread) has its own socket. Cancelling a call
    (``asyncio.wait_for``, ``task.cancel()``) leaves nothing half sent; as for a timeout,
    whether an operation already sent was applied is unknown.
    """

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, store: Store) -> None:
        """The asyncio face of ``store``."""
        self._setup(store, None)

    @classmethod
    def _lazy(cls, opener: Callable[[], Store]) -> AsyncStore:
        """An AsyncStore whose store ``opener()`` makes on first use (in a zkv thread)."""
        made = cls.__new__(cls)
        made._setup(None, opener)
        return made

    def _setup(self, store: Store | None, opener: Callable[[], Store] | None) -> None:
        self._store = store
        self._opener = opener
        self._opening: concurrent.futures.Future[Store] | None = None
        self._acore: AsyncCore | None = None
        self._mutex = threading.Lock()
        self._closing = False
        _LIVE.add(self)

    # -- opening -------------------------------------------------------------------------------

    def _ready(self) -> AsyncCore | None:
        """The async core, if it is still the one of the store's current core."""
        acore, store = self._acore, self._store
        if acore is not None and store is not None and acore.sync is store._core:
            return acore
        return None

    async def _attach(self) -> AsyncCore:
        """Open the store if needed and find its async core (after a fork: connect first)."""
        while True:
            if self._closing:
                raise StoreClosedError("this zkv store is closed")
            store = self._store if self._store is not None else await self._open_store()
            core = store._core
            if isinstance(core, _store._Reconnect):  # a forked child: connect, then go on
                await threads.run(store._reconnect)
                continue
            if isinstance(core, _store._Closed):
                raise StoreClosedError("this zkv store is closed")
            self._acore = _async_core(core)
            return self._acore

    async def _open_store(self) -> Store:
        with self._mutex:
            if self._store is not None:
                return self._store
            if self._opening is None:
                assert self._opener is not None
                self._opening = threads.submit(self._opener)
            opening = self._opening
        try:
            made = await asyncio.shield(asyncio.wrap_future(opening))
        except asyncio.CancelledError:
            raise
        except BaseException:
            with self._mutex:
                if self._opening is opening:
                    self._opening = None  # the next call tries again
            raise
        with self._mutex:
            if self._store is None:
                self._store = made
        if self._closing:
            await threads.run(made.close)
            raise StoreClosedError("this zkv store is closed")
        return self._store

    async def open(self) -> AsyncStore:
        """Connect now (or, for :func:`zkv.astore` in a process without an owner, become the
        owner) if that has not happened yet, instead of on first use; return the store."""
        if self._ready() is None:
            await self._attach()
        return self

    # -- identity --------------------------------------------------------------------------------

    @property
    def sync(self) -> Store:
        """The sync face of this store (a :class:`~zkv.Store`). RuntimeError before it is
        open (see :meth:`open`)."""
        store = self._store
        if store is None:
            raise RuntimeError("this zkv AsyncStore is not open yet: await kv.open() (or any "
                               "call) first")
        return store

    @property
    def endpoint(self) -> str:
        """As :attr:`Store.endpoint` (once open)."""
        return self.sync.endpoint

    @property
    def is_owner(self) -> bool:
        """As :attr:`Store.is_owner` (once open)."""
        return self.sync.is_owner

    @property
    def options(self) -> Options:
        """As :attr:`Store.options` (once open)."""
        return self.sync.options

    @property
    def closed(self) -> bool:
        """Whether this store (either face) was closed."""
        return self._closing or (self._store is not None and self._store.closed)

    def __repr__(self) -> str:
        if self._store is None:
            return f"<zkv.AsyncStore {'closed' if self._closing else 'not open yet'}>"
        return f"<zkv.AsyncStore of {self._store!r}>"

    async def _run(self, plan: Plan[R]) -> R:
        """Await a call planned by :mod:`zkv.calls`."""
        core = self._ready() or await self._attach()
        op = plan.op
        result = None if op is None else await core.call(op, *plan.args)
        then = plan.then
        return result if then is None else then(result)  # type: ignore[return-value]

    # -- basic key-value -------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """Await :meth:`Store.get`."""
        if type(key) is not str:
            calls.bad_key(key)
        core = self._acore
        if core is None or core.sync is not self._store._core:  # type: ignore[union-attr]
            core = await self._attach()
        return await core.get(key, default)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Await :meth:`Store.set`."""
        if type(key) is not str:
            calls.bad_key(key)
        if ttl is not None:
            ttl = check_ttl(ttl)
        core = self._ready() or await self._attach()
        await core.set(key, value, ttl)

    async def delete(self, key: str, ignore_key_error: bool = True) -> bool:
        """Await :meth:`Store.delete`."""
        return await self._run(calls.delete(key, ignore_key_error))

    async def get_all(self, prefix: str = "") -> dict[str, Any]:
        """Await :meth:`Store.get_all`."""
        return await self._run(calls.get_all(prefix))

    async def keys(self, prefix: str = "") -> KeysView[str]:
        """Await :meth:`Store.keys`."""
        return await self._run(calls.keys(prefix))

    async def delete_prefix(self, prefix: str) -> int:
        """Await :meth:`Store.delete_prefix`."""
        return await self._run(calls.delete_prefix(prefix))

    def scan(self, prefix: str = "", count: int = 1000) -> AsyncIterator[str]:
        """:meth:`Store.scan` as an asynchronous iterator: ``async for key in
        kv.scan(prefix)`` (each page awaited)."""
        calls.check_scan(prefix, count)
        return self._scan(prefix, count)

    async def _scan(self, prefix: str, count: int) -> AsyncIterator[str]:
        cursor = 0
        while True:
            cursor, page = await self._run(calls.scan_page(cursor, prefix, count))
            for key in page:
                yield key
            if cursor == 0:
                return

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Await :meth:`Store.get_many`."""
        return await self._run(calls.get_many(keys))

    async def set_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]],
                       ttl: float | None = None) -> None:
        """Await :meth:`Store.set_many`."""
        await self._run(calls.set_many(items, ttl))

    async def expire(self, key: str, seconds: float) -> bool:
        """Await :meth:`Store.expire`."""
        return await self._run(calls.expire(key, seconds))

    async def ttl(self, key: str) -> float | None:
        """Await :meth:`Store.ttl`."""
        return await self._run(calls.ttl(key))

    async def persist(self, key: str) -> bool:
        """Await :meth:`Store.persist`."""
        return await self._run(calls.persist(key))

    # -- the mapping protocol, as coroutines -----------------------------------------------------

    async def contains(self, key: str) -> bool:
        """``key in store``, awaited."""
        return await self._run(calls.contains(key))

    async def len(self) -> int:
        """``len(store)``, awaited."""
        return await self._run(calls.length())

    def __aiter__(self) -> AsyncIterator[str]:
        """``async for key in kv``: a snapshot of the keys (one round trip)."""
        return self._iter_keys()

    async def _iter_keys(self) -> AsyncIterator[str]:
        for key in await self._run(calls.keys()):
            yield key

    async def items(self) -> ItemsView[str, Any]:
        """Await :meth:`Store.items`."""
        return (await self.get_all()).items()

    async def values(self) -> ValuesView[Any]:
        """Await :meth:`Store.values`."""
        return (await self.get_all()).values()

    async def clear(self) -> None:
        """Await :meth:`Store.clear`."""
        await self._run(calls.clear())

    async def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Await :meth:`Store.update`."""
        await self._run(calls.update(other, kwargs))

    async def popitem(self) -> tuple[str, Any]:
        """Await :meth:`Store.popitem`."""
        for key in await self._run(calls.keys()):
            value = await self.pop(key, MISSING)
            if value is not MISSING:
                return key, value
        raise KeyError("popitem(): the store is empty")

    # -- atomic operations -----------------------------------------------------------------------

    async def modify(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Await :meth:`Store.modify` (``fn`` runs in the owner, not in this event loop)."""
        return await self._run(calls.modify(key, fn, default))

    async def incr(self, key: str, amount: int | float = 1) -> int | float:
        """Await :meth:`Store.incr`."""
        return await self._run(calls.incr(key, amount))

    async def decr(self, key: str, amount: int | float = 1) -> int | float:
        """Await :meth:`Store.decr`."""
        return await self._run(calls.decr(key, amount))

    async def setdefault(self, key: str, default: Any = None) -> Any:
        """Await :meth:`Store.setdefault`."""
        return await self._run(calls.setdefault(key, default))

    async def pop(self, key: str, default: Any = MISSING) -> Any:
        """Await :meth:`Store.pop`."""
        return await self._run(calls.pop(key, default))

    async def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        """Await :meth:`Store.compare_and_set`."""
        return await self._run(calls.compare_and_set(key, expected, new))

    async def transact(self, fn: Callable[[Any], Any]) -> Any:
        """Await :meth:`Store.transact` (``fn`` runs in the owner, not in this event loop)."""
        return await self._run(calls.transact(fn))

    def lock(self, name: str, timeout: float | None = None) -> AsyncLock:
        """An :class:`AsyncLock`: :meth:`Store.lock` for ``async with``. Its wait never
        blocks the event loop."""
        return AsyncLock(self, name, timeout)

    async def _lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        core = self._ready() or await self._attach()
        return await core.lock_acquire(name, token, timeout)

    async def _lock_release(self, name: str, token: bytes) -> bool:
        core = self._ready() or await self._attach()
        return await core.lock_release(name, token)

    def pipeline(self) -> AsyncPipeline:
        """An :class:`AsyncPipeline`: :meth:`Store.pipeline` for ``async with``."""
        return AsyncPipeline(self)

    async def _execute(self, queued: list[Call], out: list[Any]) -> list[Any]:
        core = self._ready() or await self._attach()
        return await core.execute(queued, out)

    # -- publish / subscribe ---------------------------------------------------------------------

    async def publish(self, channel: str, data: Any) -> None:
        """Await :meth:`Store.publish` (it waits only while the owner is too far behind to
        take more)."""
        await self._run(calls.publish(channel, data))

    async def subscribe(self, *channels: str, prefix: str | Iterable[str] | None = None
                        ) -> Subscriber:
        """Await :meth:`Store.subscribe`: a :class:`~zkv.Subscriber`, live when returned;
        ``async for data in sub`` or ``await sub.areceive(timeout)``."""
        return await self._subscriber(Topics.channels(channels, prefix), "zkv subscriber")

    async def watch(self, key: str | None = None, prefix: str | Iterable[str] | None = None
                    ) -> Subscriber:
        """Await :meth:`Store.watch` (see :meth:`subscribe`)."""
        return await self._subscriber(Topics.keys(key, prefix), "zkv watcher")

    async def monitor(self) -> Subscriber:
        """Await :meth:`Store.monitor`: a :class:`~zkv.Subscriber` of every request the owner
        serves (see :meth:`subscribe`)."""
        return await self._subscriber(Topics.monitor(), "zkv monitor")

    async def _subscriber(self, topics: Topics, what: str) -> Subscriber:
        core = self._ready() or await self._attach()
        sub = await core.subscriber(topics, what)
        assert self._store is not None
        self._store._subscribers.add(sub)  # closed with the store
        return sub

    async def stats(self) -> dict[str, int]:
        """Await :meth:`Store.stats`."""
        return await self._run(calls.stats())

    async def save(self, path: str | os.PathLike[str] | None = None) -> SaveResult:
        """Await :meth:`Store.save` (the event loop goes on while the file is written)."""
        return await self._run(calls.save(path))

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the store, both faces (as :meth:`Store.close`; idempotent). Calls still
        waiting, in any event loop, fail with :class:`~zkv.StoreClosedError`."""
        if self._closing:
            return
        self._closing = True
        acore = self._acore
        if acore is not None:
            acore.close()  # this loop's socket here and now, other loops' in their threads
        store = self._store
        if store is not None:
            await threads.run(store.close)
            return
        opening = self._opening
        if opening is not None:  # closed while connecting: close what that makes
            opening.add_done_callback(_close_made)

    async def __aenter__(self) -> AsyncStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncPipeline(PipelineQueue[AsyncStore]):
    """:class:`~zkv.Pipeline` for asyncio: the same methods queue the same operations, and
    ``await p.execute()`` (or leaving ``async with kv.pipeline() as p:``) sends them in one
    round trip, applied in order as one atomic step."""

    async def execute(self) -> list[Any]:
        """Send the queued operations; return their results in order (as
        :meth:`Pipeline.execute`)."""
        queued, after = self._take()
        raw: list[Any] = []
        try:
            await self._store._execute(queued, raw)
        except Exception:
            if len(raw) < len(queued):
                raise
        return self._finish(after, raw)

    async def __aenter__(self) -> AsyncPipeline:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.execute()


class AsyncLock(LockHandle):
    """:class:`~zkv.Lock` for asyncio, from :meth:`AsyncStore.lock`: ``async with
    kv.lock(name):``, ``await lock.acquire(...)``, ``await lock.release()``. The same lock as
    the sync one of the same name (they exclude each other); its wait never blocks the event
    loop, and a cancelled wait withdraws itself."""

    def __init__(self, store: AsyncStore, name: str, timeout: float | None) -> None:
        super().__init__(name, timeout)
        self._store = store

    async def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:
        """Await :meth:`Lock.acquire`."""
        token, wait = self._asking(blocking, timeout)
        if await self._store._lock_acquire(self.name, token, wait):
            self._taken(token)
            return True
        return False

    async def release(self) -> None:
        """Await :meth:`Lock.release`."""
        if not await self._store._lock_release(self.name, self._giving_back()):
            raise self._not_held()

    async def __aenter__(self) -> AsyncLock:
        if not await self.acquire():
            raise self._timed_out()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


# -- the process-wide store -------------------------------------------------------------------

_LIVE: weakref.WeakSet[AsyncStore] = weakref.WeakSet()
_GLOBAL: AsyncStore | None = None
_GLOBAL_LOCK = threading.Lock()


def astore() -> AsyncStore:
    """The process-wide store's asyncio face: the same object on every call in one process,
    over the same :class:`~zkv.Store` as :func:`zkv.store` (owner or client exactly as it
    decides). Returns at once; if ``zkv.store()`` has not been made yet, it is made on first
    use, in a zkv thread (the event loop goes on meanwhile)."""
    global _GLOBAL
    current = _GLOBAL
    if current is not None and not current.closed:
        return current
    with _GLOBAL_LOCK:
        if _GLOBAL is not None and not _GLOBAL.closed:
            return _GLOBAL
        made = _store._GLOBAL
        if made is not None and not made.closed:
            _GLOBAL = AsyncStore(made)
        else:
            _GLOBAL = AsyncStore._lazy(_store.store)
        return _GLOBAL


def aconnect(endpoint: str | None = None, **options: Any) -> AsyncStore:
    """:func:`zkv.connect` for asyncio: a new client store, as an :class:`AsyncStore`.
    Returns at once (the options are checked now: TypeError/ValueError); connects on first
    use (or ``await kv.open()``, or ``async with``), in a zkv thread."""
    Options.from_env(options)
    return AsyncStore._lazy(functools.partial(connect, endpoint, **options))


def _close_made(done: concurrent.futures.Future[Store]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().close()


def _after_fork_in_child() -> None:
    global _GLOBAL_LOCK, _ASYNC_CORES_LOCK
    _GLOBAL_LOCK = threading.Lock()
    _ASYNC_CORES_LOCK = threading.Lock()
    for live in list(_LIVE):
        live._mutex = threading.Lock()
        if live._store is None:
            live._opening = None  # a parent's thread was making it
        live._acore = None  # the parent's sockets: never used here (the store reconnects)


os.register_at_fork(after_in_child=_after_fork_in_child)
