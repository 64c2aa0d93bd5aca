"""The public face of zkv: :class:`Store` and :class:`Pipeline`, and :func:`store`,
:func:`serve`, :func:`connect`.

A :class:`Store` looks the same in every process: it checks the caller's arguments and hands
each operation to its :class:`~zkv.core.Core` — in the owner the owner-local core, which applies
it to the data in this process; anywhere else the remote core, which sends it to the owner.

Fork safety: after ``os.fork()`` the child never touches its parent's ZeroMQ context or
sockets. Every live store in the child drops its parent's core (it is kept referenced, never
closed, so no destructor touches it) and reconnects, on first use, to the same endpoint as a
client, so that a store made at module level keeps working in forked pool workers.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import multiprocessing
import multiprocessing.util
import os
import threading
import weakref
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

from . import backends as _backends
from . import calls, reentry
from . import endpoint as _endpoint
from .calls import PipelineQueue, Plan
from .config import Options
from .core import Call, Core
from .dispatch import Dispatcher
from .errors import NoOwnerError, StoreClosedError
from .locks import Lock
from .ops import Op
from .owner.local import LocalCore
from .owner.process import OwnerProcess
from .owner.process import start as start_owner_process
from .pubsub import Subscriber, Topics
from .remote import RemoteCore
from .snapshot import SaveResult
from .state import MISSING, check_ttl

__all__ = ["Pipeline", "Store", "connect", "serve", "store"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")


class _Closed:
    """Stands in for the core of a closed store: every use raises StoreClosedError."""

    is_owner = False
    endpoint = ""

    def _closed(self) -> NoReturn:
        raise StoreClosedError("this zkv store is closed")

    def get(self, key: str, default: Any) -> Any:
        return self._closed()

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self._closed()

    def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        self._closed()

    def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        self._closed()

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        self._closed()

    def lock_release(self, name: str, token: bytes) -> bool:
        self._closed()

    def subscriber(self, topics: Topics, what: str) -> Subscriber:
        self._closed()

    def dispatcher(self) -> Dispatcher:
        self._closed()

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        self._closed()

    def disable_cache(self, prefix: str | None) -> None:
        self._closed()

    def cache_info(self) -> dict[str, int]:
        self._closed()

    def owner_alive(self) -> bool:
        return False

    def close(self) -> None:
        """Nothing to close."""


class _Reconnect:
    """Stands in for the core of a store inherited through ``fork``: the first use connects
    this process to the owner as a client (and the store uses that core from then on)."""

    is_owner = False

    def __init__(self, store: Store) -> None:
        self._store = store
        self.endpoint = store.endpoint

    def _core(self) -> Core:
        return self._store._reconnect()

    def get(self, key: str, default: Any) -> Any:
        return self._core().get(key, default)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self._core().set(key, value, ttl)

    def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return self._core().call(op, *args, **kwargs)

    def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        return self._core().execute(calls, out)

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        return self._core().lock_acquire(name, token, timeout)

    def lock_release(self, name: str, token: bytes) -> bool:
        return self._core().lock_release(name, token)

    def subscriber(self, topics: Topics, what: str) -> Subscriber:
        return self._core().subscriber(topics, what)

    def dispatcher(self) -> Dispatcher:
        return self._core().dispatcher()

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        self._core().enable_cache(prefix, max_entries)

    def disable_cache(self, prefix: str | None) -> None:
        self._core().disable_cache(prefix)

    def cache_info(self) -> dict[str, int]:
        return self._core().cache_info()

    def owner_alive(self) -> bool:
        return self._core().owner_alive()

    def close(self) -> None:
        """Nothing to close: the parent's core is not this process's."""


class _LockBackend:
    def __init__(self, store: Store) -> None:
        self._store = store

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        return self._store._core.lock_acquire(name, token, timeout)

    def lock_release(self, name: str, token: bytes) -> bool:
        return self._store._core.lock_release(name, token)


class Store(MutableMapping[str, Any]):
    """A key-value store with publish/subscribe, shared by every process of a program.

    Obtain one with :func:`zkv.store` (the process-wide store), :func:`zkv.serve` (own a new
    one) or :func:`zkv.connect` (join one); do not instantiate it directly. It is a
    :class:`collections.abc.MutableMapping` of ``str`` keys to any picklable values, safe to
    use from many threads, and a context manager that closes it.

    Values are snapshots: changing an object you got from the store does not change the store;
    :meth:`set` it again (or use :meth:`modify`). Every operation is applied by the owner as one
    atomic step, and all processes see the operations in one order.
    """

    # A store is a handle: equal only to itself (comparing contents would copy the store).
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, core: Core, options: Options) -> None:
        self._core: Core = core
        self._options = options
        self._endpoint = core.endpoint
        self._is_owner = core.is_owner
        self._closed = False
        self._mutex = threading.RLock()
        self._dispatcher: Dispatcher | None = None
        self._subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()
        self._env_before: str | None = None
        self._keys_exported: tuple[str | None, str] | None = None  # (ZKV_KEYS before, ours)
        self._abandoned: list[Any] = []
        self._owner_process: OwnerProcess | None = None  # owner="process": the data's process
        _LIVE.add(self)
        _install_exit_hooks()

    # -- identity --------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The address other processes pass to :func:`zkv.connect` to join this store."""
        return self._endpoint

    @property
    def is_owner(self) -> bool:
        """True in the process that holds the data (and only there). With
        ``owner="process"`` that is the dedicated owner process, and this is False in every
        process of the program, the main one included."""
        return self._core.is_owner

    @property
    def options(self) -> Options:
        """The settings this store was made with (see :class:`zkv.Options`)."""
        return self._options

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (every use of a closed store raises
        :class:`~zkv.StoreClosedError`)."""
        return self._closed

    def __repr__(self) -> str:
        role = "closed" if self._closed else ("owner" if self.is_owner else "client")
        return f"<zkv.Store {role} {_backends.redact(self._endpoint)}>"

    def _run(self, plan: Plan[R]) -> R:
        """Run a call planned by :mod:`zkv.calls` on this store's core."""
        op = plan.op
        result = None if op is None else self._core.call(op, *plan.args)
        then = plan.then
        return cast(R, result) if then is None else then(result)

    # -- basic key-value -------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing (or expired)."""
        if type(key) is not str:
            calls.bad_key(key)
        return self._core.get(key, default)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` to ``value``. When this returns, every process sees the new value.
        ``ttl``: seconds until the key expires (None: never; a set without ``ttl`` removes a
        key's expiry). Raises :class:`~zkv.EncodeError` (naming the type) if ``value`` cannot
        be pickled, and TypeError/ValueError for a bad ``ttl``; the store is then unchanged."""
        if type(key) is not str:
            calls.bad_key(key)
        if ttl is not None:
            ttl = check_ttl(ttl)
        self._core.set(key, value, ttl)

    def delete(self, key: str, ignore_key_error: bool = True) -> bool:
        """Remove ``key``. Returns whether it existed; with ``ignore_key_error=False`` a
        missing key raises KeyError instead."""
        return self._run(calls.delete(key, ignore_key_error))

    def get_all(self, prefix: str = "") -> dict[str, Any]:
        """A copy of the whole store (of the keys starting with ``prefix``) as a dict, taken
        atomically. It holds the owner for its whole duration: for a large store, prefer
        :meth:`scan` and :meth:`get_many`."""
        return self._run(calls.get_all(prefix))

    def keys(self, prefix: str = "") -> KeysView[str]:
        """A snapshot of the keys (starting with ``prefix``), taken atomically."""
        return self._run(calls.keys(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix``, as one atomic step; return how many
        were removed. ``delete_prefix("")`` is :meth:`clear`."""
        return self._run(calls.delete_prefix(prefix))

    def scan(self, prefix: str = "", count: int = 1000) -> Iterator[str]:
        """Yield the keys starting with ``prefix``, fetched ``count`` at a time: the key set
        never travels in one message, and the owner is held for a page at a time. A key
        present throughout the scan is yielded exactly once; one set or removed while it runs
        may or may not be. A scan not continued within a minute is forgotten by the owner
        (the next page raises KeyError)."""
        calls.check_scan(prefix, count)
        return self._scan(prefix, count)

    def _scan(self, prefix: str, count: int) -> Iterator[str]:
        cursor = 0
        while True:
            cursor, page = self._run(calls.scan_page(cursor, prefix, count))
            yield from page
            if cursor == 0:
                return

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of ``keys`` that exist, in one round trip, read atomically."""
        return self._run(calls.get_many(keys))

    def set_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]],
                 ttl: float | None = None) -> None:
        """Set many keys in one round trip, as one atomic step (each with ``ttl``, as
        :meth:`set`)."""
        self._run(calls.set_many(items, ttl))

    # -- expiry ----------------------------------------------------------------------------------

    def expire(self, key: str, seconds: float) -> bool:
        """Make ``key`` expire ``seconds`` from now (on the owner's clock). Returns False if
        the key is missing. TypeError/ValueError for seconds that are not a finite number
        > 0."""
        return self._run(calls.expire(key, seconds))

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if it has no expiry. KeyError if the key is
        missing."""
        return self._run(calls.ttl(key))

    def persist(self, key: str) -> bool:
        """Remove the expiry of ``key``. Returns False if it is missing or had none."""
        return self._run(calls.persist(key))

    # -- the mapping protocol --------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        self.delete(key, ignore_key_error=False)

    def __contains__(self, key: object) -> bool:
        return self._run(calls.contains(key))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        """Iterate over a snapshot of the keys."""
        keys: KeysView[str] = self._run(calls.keys())
        return iter(keys)

    def __len__(self) -> int:
        return self._run(calls.length())

    def items(self) -> ItemsView[str, Any]:
        """The (key, value) pairs of an atomic snapshot (one round trip)."""
        return self.get_all().items()

    def values(self) -> ValuesView[Any]:
        """The values of an atomic snapshot (one round trip)."""
        return self.get_all().values()

    def clear(self) -> None:
        """Remove every key, as one atomic step."""
        self._run(calls.clear())

    def update(self, other: Any = (),
               /, **kwargs: Any) -> None:
        """Like :meth:`dict.update`, as one atomic step in one round trip."""
        self._run(calls.update(other, kwargs))

    def popitem(self) -> tuple[str, Any]:
        """Remove and return some (key, value) pair; KeyError if the store is empty."""
        for key in self:
            value = self.pop(key, MISSING)
            if value is not MISSING:
                return key, value
        raise KeyError("popitem(): the store is empty")

    # -- atomic operations -----------------------------------------------------------------------

    def modify(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Replace the value of ``key`` by ``fn(old)`` as one atomic step, in the owner, and
        return the new value. ``old`` is ``default`` if the key is missing. ``fn`` travels to
        the owner with cloudpickle (closures and lambdas work); if it raises, the exception is
        re-raised here and nothing changes. The key keeps its expiry. ``fn`` blocks every other
        request while it runs: keep it short, and do not wait for the owner inside it (see
        :class:`~zkv.ReentrancyError`)."""
        return self._run(calls.modify(key, fn, default))

    def incr(self, key: str, amount: int | float = 1) -> int | float:
        """Add ``amount`` to the number at ``key`` (missing counts as 0) atomically; return
        the new value. TypeError if the key holds something else than an int or float. The
        key keeps its expiry."""
        return self._run(calls.incr(key, amount))

    def decr(self, key: str, amount: int | float = 1) -> int | float:
        """``incr(key, -amount)``."""
        return self._run(calls.decr(key, amount))

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value of ``key``; if missing, set it to ``default`` first (atomically)."""
        return self._run(calls.setdefault(key, default))

    def pop(self, key: str, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value, atomically. If missing: ``default``, or
        KeyError when no default is given."""
        return self._run(calls.pop(key, default))

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        """Set ``key`` to ``new`` if its value equals ``expected`` (``zkv.MISSING``: if the
        key does not exist), atomically. Returns whether it was set. The key keeps its
        expiry."""
        return self._run(calls.compare_and_set(key, expected, new))

    def transact(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(mapping)`` in the owner with the whole store to itself, and return what it
        returns. ``mapping`` reads and writes the store; its writes are applied together when
        ``fn`` returns, and not at all if it raises (the exception is re-raised here). Values
        read from it are copies: assign them back to change the store. A key written keeps
        its expiry; a new key has none."""
        return self._run(calls.transact(fn))

    def lock(self, name: str, timeout: float | None = None) -> Lock:
        """A cross-process lock named ``name`` (a context manager). ``timeout`` bounds the
        wait in ``with`` (None: wait until it is free; the wait still ends with
        :class:`~zkv.OwnerGoneError` if the owner dies). Released when its holder dies."""
        return Lock(_LockBackend(self), name, timeout)

    def enable_cache(self, prefix: str = "", max_entries: int = 100_000) -> None:
        """Serve repeated :meth:`get` of keys starting with ``prefix`` ("" = every key) from
        this process's memory, kept fresh by the owner's invalidations. A write made by this
        process is always seen by its next read, and a read never returns an older value than
        one this process read before; a write made elsewhere is seen once its invalidation
        arrives (see docs/guide.md, "Cached reads"). At most ``max_entries`` values are kept.
        In the owner this does nothing: its reads are local already."""
        calls.check_cache(prefix, max_entries)
        self._core.enable_cache(prefix, max_entries)

    def disable_cache(self, prefix: str | None = None) -> None:
        """Stop caching keys under ``prefix`` (every prefix if None)."""
        self._core.disable_cache(prefix)

    def cache_info(self) -> dict[str, int]:
        """Counters of the read cache: ``hits``, ``misses``, ``entries`` (values held now) and
        ``flushes`` (times it was dropped whole because invalidations were lost)."""
        return self._core.cache_info()

    def pipeline(self) -> Pipeline:
        """Queue many operations and send them in one round trip (see :class:`Pipeline`)."""
        return Pipeline(self)

    # -- publish / subscribe ---------------------------------------------------------------------

    def publish(self, channel: str, data: Any) -> None:
        """Send ``data`` to every subscriber of ``channel``, in every process (this one
        included). From a client this costs no round trip; the owner gives every message its
        place in one order."""
        self._run(calls.publish(channel, data))

    def subscribe(self, *channels: str, prefix: str | Iterable[str] | None = None) -> Subscriber:
        """A :class:`Subscriber` of ``channels`` (exact names) and/or channels starting with
        ``prefix``. Live when it returns: every message published after that reaches it."""
        return self._subscriber(Topics.channels(channels, prefix), "zkv subscriber")

    def watch(self, key: str | None = None, prefix: str | Iterable[str] | None = None
              ) -> Subscriber:
        """A :class:`Subscriber` of :class:`Change` events for ``key``, for keys starting
        with ``prefix``, or for every key if neither is given. Events come from every
        process's writes, atomic operations and expiry included, in the order they were
        applied."""
        return self._subscriber(Topics.keys(key, prefix), "zkv watcher")

    def monitor(self) -> Subscriber:
        """A :class:`Subscriber` of every request the owner serves from other processes, as
        it serves it (like ``redis-cli monitor``): each message's data is a dict with
        ``time`` (the owner's wall clock), ``pid`` (the client process), ``op`` (the
        operation's name), ``key`` (the key, lock or channel it was about, or None) and
        ``status`` ("ok", "none", "error", "one-way" for a publish, or "answered later" for a lock
        wait). The owner
        describes requests only while someone listens; its own process's calls are not
        requests and are not shown (with ``owner="process"`` every call is one)."""
        return self._subscriber(Topics.monitor(), "zkv monitor")

    def _subscriber(self, topics: Topics, what: str) -> Subscriber:
        reentry.refuse("subscribe() or watch()")
        sub = self._core.subscriber(topics, what)
        self._subscribers.add(sub)
        return sub

    def on_subscriber_receive(self, channel: str, *, prefix: bool = False,
                              loop: asyncio.AbstractEventLoop | None = None) -> Callable[[F], F]:
        """Decorator: call the function with the data of every message on ``channel`` (every
        channel starting with it if ``prefix=True``), in this process, on its dispatcher
        thread. Coroutine functions run on ``loop`` (default: an event loop zkv runs). Returns
        the function unchanged; :meth:`remove_callback` unregisters it."""
        if type(channel) is not str:
            raise TypeError(f"channel names must be str, not {type(channel).__name__}")
        topics = Topics.channels([], channel) if prefix else Topics.channels([channel], None)

        def register(fn: F) -> F:
            self._get_dispatcher().add(topics, fn, loop)
            return fn
        return register

    def on_change(self, key: str | None = None, prefix: str | Iterable[str] | None = None, *,
                  loop: asyncio.AbstractEventLoop | None = None) -> Callable[[F], F]:
        """Decorator: call the function with a :class:`Change` for every change of ``key``
        (or of keys starting with ``prefix``, or of every key). See :meth:`watch`."""
        topics = Topics.keys(key, prefix)

        def register(fn: F) -> F:
            self._get_dispatcher().add(topics, fn, loop)
            return fn
        return register

    def remove_callback(self, fn: Callable[..., Any]) -> int:
        """Unregister ``fn`` from every channel and watch; return how many registrations
        were removed."""
        if self._dispatcher is None:
            return 0
        return self._dispatcher.remove(fn)

    @property
    def dropped(self) -> int:
        """Messages this process's callbacks lost because the dispatcher fell behind."""
        return 0 if self._dispatcher is None else self._dispatcher.dropped

    def _get_dispatcher(self) -> Dispatcher:
        reentry.refuse("registering a callback")  # (registering waits for the welcome)
        with self._mutex:
            if self._dispatcher is None:
                self._dispatcher = self._core.dispatcher()
            return self._dispatcher

    def stats(self) -> dict[str, int]:
        """The owner's counters: ``keys`` (held now: a key that expired is removed within a
        tick, 0.05 s, and counted until then), ``expiring`` (keys with an expiry), ``version``
        (changes applied so far), ``sessions`` (connected client processes), ``topics``
        (topics with at least one live subscriber, in any process; ``subscriptions`` is the
        same number), ``locks`` (sessions holding or waiting for locks), ``refused``
        (malformed messages dropped), ``refused_auth``, the owner's ``pid`` and ``uptime``
        (seconds), and ``blob_files``/``blob_free``: files in ``/dev/shm`` that hold large
        values, and free ones kept a few seconds for reuse (see docs/guide.md, "Large
        values")."""
        return self._run(calls.stats())

    def save(self, path: str | os.PathLike[str] | None = None) -> SaveResult:
        """Write the whole store to the file ``path`` (None: the store's ``snapshot`` file),
        atomically, with each key's remaining expiry, and return what was saved (a
        :class:`~zkv.snapshot.SaveResult`). The store is held only while its entries are
        listed (``pause``); pickling and writing happen meanwhile it serves. A value that
        cannot be pickled (kept by reference in the owner) is left out and named in
        ``skipped``. The file is on the owner's host; a relative ``path`` is taken from this
        process's working directory. Raises OSError if it cannot be written (the file is then
        untouched), ValueError if ``path`` is None and the store has no snapshot file. See
        docs/guide.md, "Snapshots"."""
        return self._run(calls.save(path))

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the store (idempotent). In the owner this stops serving and removes the
        sockets: the data is gone and other processes get OwnerGoneError. In a client it
        releases this process's locks and closes its sockets. Returns promptly from any
        thread, callbacks included; a second, concurrent call returns at once."""
        with self._mutex:  # held only to take things over: closing may wait for a callback
            if self._closed:  # that closes this store too
                return
            reentry.refuse("close()")
            self._closed = True
            subscribers = list(self._subscribers)
            dispatcher, self._dispatcher = self._dispatcher, None
            core, self._core = self._core, _Closed()
        for sub in subscribers:
            sub.close()
        if dispatcher is not None:
            dispatcher.close()
        core.close()
        if self._owner_process is not None:
            self._owner_process.stop(self._options.linger + 10)
        if (self._is_owner or self._owner_process is not None) \
                and self._env_before is not _NOT_SET:
            if os.environ.get(_endpoint.ENV_VAR) == self._endpoint:
                if self._env_before is None:
                    os.environ.pop(_endpoint.ENV_VAR, None)
                else:
                    os.environ[_endpoint.ENV_VAR] = self._env_before
            if self._keys_exported is not None:
                before, ours = self._keys_exported
                if os.environ.get("ZKV_KEYS") == ours:
                    if before is None:
                        os.environ.pop("ZKV_KEYS", None)
                    else:
                        os.environ["ZKV_KEYS"] = before
        _forget_global(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fork ------------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        self._mutex = threading.RLock()
        if self._closed:
            return
        self._abandoned.append(self._core)  # never closed, never collected: not ours
        self._abandoned.append(self._dispatcher)
        self._abandoned.extend(self._subscribers)
        for sub in self._subscribers:
            sub._closed = True
        self._subscribers = weakref.WeakSet()
        self._dispatcher = None
        self._core = _Reconnect(self)
        self._is_owner = False
        self._owner_process = None  # the parent's: only the parent stops it
        self._env_before = _NOT_SET

    def _reconnect(self) -> Core:
        with self._mutex:
            if isinstance(self._core, _Reconnect):
                self._core = _client_core(self._endpoint, self._options)
                _install_exit_hooks()
            return self._core


_NOT_SET: Any = object()


class Pipeline(PipelineQueue["Store"]):
    """Operations queued to be sent to the owner in one round trip, and applied there in
    order as one atomic step::

        with store.pipeline() as p:
            p.set("a", 1)
            p.incr("n")
            p.get("a")
        p.results  # [None, 1, 1]

    :meth:`execute` sends them and returns the results (also kept in :attr:`results`). Every
    queued operation runs; if any raised, the first exception is raised after all of them, and
    :attr:`results` holds the exception in place of each failed operation's result. Each
    method takes the same arguments as the :class:`Store` method of the same name, checks them
    at once, and returns the pipeline (so calls can be chained).
    """

    def execute(self) -> list[Any]:
        """Send the queued operations; return their results in order."""
        calls, after = self._take()
        raw: list[Any] = []
        try:
            self._store._core.execute(calls, raw)
        except Exception:
            if len(raw) < len(calls):
                raise  # the pipeline as a whole failed (the owner is gone, a timeout, ...)
        return self._finish(after, raw)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.execute()


# -- the process-wide store -------------------------------------------------------------------

_LIVE: weakref.WeakSet[Store] = weakref.WeakSet()
_GLOBAL: Store | None = None
_GLOBAL_LOCK = threading.RLock()
_hooks_pid: int | None = None


def store(**options: Any) -> Store:
    """The process-wide store: the same object on every call in one process.

    On first use it connects to the owner announced in ``ZKV_ENDPOINT`` (or, in a process
    that multiprocessing started, to an owner among its ancestors). If there is none and this
    is not a multiprocessing child, it makes a new store: it binds private ipc sockets, starts
    its loop thread and exports ``ZKV_ENDPOINT`` for the children it starts. A
    multiprocessing child that finds no owner raises :class:`~zkv.NoOwnerError` instead of
    silently making a private store.

    ``options`` (see :class:`zkv.Options`; they win over the environment) are those of the
    store this call makes, owner or client: ``zkv.store(snapshot="data.zkv")`` makes an owner
    that loads and saves that file (a client ignores the owner's settings). Once the store
    exists, options that differ from its own raise ValueError, except ``owner``.

    ``owner`` (default ``ZKV_OWNER``, else ``"embedded"``) says where a new store's data
    lives: in this process, or (``"process"``) in a dedicated process that this one starts
    and that every process of the program, this one included, is a client of (see
    :func:`serve`). It is ignored when the store already exists or is joined, so that the
    same ``zkv.store(owner="process")`` line may run in the main process and in its workers.
    """
    current = _GLOBAL
    if current is not None and not current.closed:
        if options:
            _check_options(current, options)
        return current
    with _GLOBAL_LOCK:
        if _GLOBAL is not None and not _GLOBAL.closed:
            if options:
                _check_options(_GLOBAL, options)
            return _GLOBAL
        Options.from_env(options)  # a bad option fails before anything is done
        address = _endpoint.discover()
        if address:
            made = connect(address, **options)
        elif multiprocessing.parent_process() is not None:
            raise NoOwnerError(
                "this is a multiprocessing child and no zkv owner was found: "
                f"{_endpoint.ENV_VAR} is not set and no ancestor process owns a store. Create "
                "the store in the main process (zkv.store() or zkv.serve()) before starting "
                "the workers, or pass its endpoint: zkv.connect(endpoint)")
        else:
            made = serve(**options)
        _set_global(made)
        return made


def _check_options(made: Store, options: dict[str, Any]) -> None:
    wanted = Options.from_env(options)
    differ = sorted(name for name in options if name != "owner"
                    and getattr(wanted, name) != getattr(made.options, name))
    if differ:
        raise ValueError(f"the process-wide zkv store exists already, with other settings "
                         f"({', '.join(differ)}); pass options to the first zkv.store() call, "
                         f"or use zkv.serve()/zkv.connect() for a store of its own")


def _set_global(made: Store) -> None:
    global _GLOBAL
    with _GLOBAL_LOCK:
        if _GLOBAL is None or _GLOBAL.closed:
            _GLOBAL = made


def _forget_global(gone: Store) -> None:
    global _GLOBAL
    with _GLOBAL_LOCK:
        if _GLOBAL is gone:
            _GLOBAL = None


def serve(endpoint: str | None = None, **options: Any) -> Store:
    """Own a new store from the moment this returns, and return it.

    ``endpoint=None`` binds private ipc sockets; ``"tcp://host:port"`` binds TCP, which needs
    credentials (``keys=DIR`` made by ``zkv keygen``, or ``ZKV_KEYS``; see :mod:`zkv.auth`) and
    raises :class:`~zkv.AuthenticationError` without them. The endpoint is exported in
    ``ZKV_ENDPOINT`` (and a keys directory in ``ZKV_KEYS``) for children started afterwards,
    and the store becomes this process's :func:`zkv.store` if there was none. Use it as a
    context manager to close it and remove its sockets. ``options``: see
    :class:`zkv.config.Options`.

    ``owner="process"`` (or ``ZKV_OWNER=process``): the data and the sockets live in a
    dedicated process that this one starts, and this process is a client of it like every
    worker (``is_owner`` is False here): a busy main thread then slows no worker down. That
    process ends when this store is closed or this process exits or dies.
    """
    if _backends.is_backend_url(endpoint):
        raise ValueError(f"zkv.serve() starts an owner; a store kept in Redis is joined: "
                         f"zkv.connect({_backends.redact(str(endpoint))!r})")
    opts = Options.from_env(options)
    if opts.owner == "process":
        address, process = start_owner_process(opts, endpoint)
        client_opts = dataclasses.replace(opts, owner="embedded")
        made = Store(RemoteCore(address, client_opts), client_opts)
        made._owner_process = process
    else:
        made = Store(LocalCore(opts, endpoint), opts)
    made._env_before = os.environ.get(_endpoint.ENV_VAR)
    os.environ[_endpoint.ENV_VAR] = made.endpoint
    if isinstance(opts.keys, (str, os.PathLike)) and not made.endpoint.startswith("ipc://"):
        keys_dir = os.path.abspath(os.fspath(opts.keys))
        made._keys_exported = (os.environ.get("ZKV_KEYS"), keys_dir)
        os.environ["ZKV_KEYS"] = keys_dir  # children connect with DIR/client
    _set_global(made)
    return made


def connect(endpoint: str | None = None, **options: Any) -> Store:
    """Join an existing store as a client and return it.

    ``endpoint`` defaults to ``ZKV_ENDPOINT``, then (in a process that multiprocessing
    started) to an owner among this process's ancestors. Raises :class:`~zkv.NoOwnerError`
    if there is no owner to join. A ``tcp://`` endpoint needs client credentials
    (``keys=DIR`` or ``ZKV_KEYS``) and raises :class:`~zkv.AuthenticationError` if they are
    missing or the owner refuses them.

    A Redis or Valkey URL (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``,
    ``redis+cluster://``) joins a store kept in Redis instead, with the same API; ``namespace=``
    keeps programs sharing a database apart, ``insecure=True`` allows a password-less
    connection to another host, ``lease=`` sets the locks' lease (see docs/scaling.md).
    """
    address = endpoint or _endpoint.discover()
    if not address:
        raise NoOwnerError(f"no zkv endpoint given and {_endpoint.ENV_VAR} is not set (an "
                           "owner among the ancestors is looked for only in multiprocessing "
                           "children)")
    if _backends.is_backend_url(address):  # Redis/Valkey: its options travel in the URL
        address, options = _backends.split_options(address, options)
    opts = Options.from_env(options)
    return Store(_client_core(address, opts), opts)


def _client_core(address: str, options: Options) -> Core:
    """A core that joins the store at ``address``: a zkv owner's endpoint, or the URL of
    another engine (``redis://...``, see :mod:`zkv.backends`)."""
    if _backends.is_backend_url(address):
        return _backends.open_core(address, options)
    return RemoteCore(address, options)


# -- fork and exit ---------------------------------------------------------------------------

def _after_fork_in_child() -> None:
    global _GLOBAL_LOCK, _hooks_pid
    _GLOBAL_LOCK = threading.RLock()
    _hooks_pid = None
    for live in list(_LIVE):
        live._after_fork_in_child()


def _close_all() -> None:
    for live in list(_LIVE):
        try:
            live.close()
        except Exception:  # pragma: no cover - exiting anyway
            pass


def _install_exit_hooks() -> None:
    """Close every store at exit. ``atexit`` does not run in forked multiprocessing children
    (they leave through ``os._exit``), so also register with multiprocessing's finalizers."""
    global _hooks_pid
    pid = os.getpid()
    if _hooks_pid == pid:
        return
    _hooks_pid = pid
    multiprocessing.util.Finalize(None, _close_all, exitpriority=100)


atexit.register(_close_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
