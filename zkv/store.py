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
from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar, runtime_checkable

from . import backends as _backends
from . import endpoint as _endpoint
from . import ops, reentry
from .config import Options
from .core import Call, Core
from .dispatch import Dispatcher
from .errors import NoOwnerError, StoreClosedError
from .locks import Lock
from .ops import Op
from .owner.local import LocalCore
from .pubsub import Subscriber, Topics
from .remote import RemoteCore
from .state import MISSING, check_ttl

__all__ = ["Pipeline", "Store", "connect", "serve", "store"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")


@runtime_checkable
class _KeysAndGetItem(Protocol):
    """What :meth:`dict.update` accepts as a mapping: ``keys()`` and ``[key]``."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, key: str, /) -> Any: ...


def _bad_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"zkv keys must be str, not {type(key).__name__}: {key!r:.60}")


def _check_amount(amount: object) -> None:
    if type(amount) not in (int, float):
        raise TypeError(f"incr amount must be an int or float, not {type(amount).__name__}")


def _check_prefix(prefix: object) -> None:
    if type(prefix) is not str:
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")


class _KeysSnapshot(KeysView[str]):
    """The keys of a store at one moment (``Store.keys()``): a set-like view of a list."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = keys
        self._set: set[str] | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        if self._set is None:
            self._set = set(self._keys)
        return key in self._set

    def __repr__(self) -> str:
        return f"zkv keys({self._keys!r})"


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
        _LIVE.add(self)
        _install_exit_hooks()

    # -- identity --------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The address other processes pass to :func:`zkv.connect` to join this store."""
        return self._endpoint

    @property
    def is_owner(self) -> bool:
        """True in the process that holds the data (and only there)."""
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

    # -- basic key-value -------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is missing (or expired)."""
        if type(key) is not str:
            _bad_key(key)
        return self._core.get(key, default)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` to ``value``. When this returns, every process sees the new value.
        ``ttl``: seconds until the key expires (None: never; a set without ``ttl`` removes a
        key's expiry). Raises :class:`~zkv.EncodeError` (naming the type) if ``value`` cannot
        be pickled, and TypeError/ValueError for a bad ``ttl``; the store is then unchanged."""
        if type(key) is not str:
            _bad_key(key)
        if ttl is not None:
            ttl = check_ttl(ttl)
        self._core.set(key, value, ttl)

    def delete(self, key: str, ignore_key_error: bool = True) -> bool:
        """Remove ``key``. Returns whether it existed; with ``ignore_key_error=False`` a
        missing key raises KeyError instead."""
        if type(key) is not str:
            _bad_key(key)
        found = self._core.call(ops.DELETE, key)
        if not found and not ignore_key_error:
            raise KeyError(key)
        return found

    def get_all(self, prefix: str = "") -> dict[str, Any]:
        """A copy of the whole store (of the keys starting with ``prefix``) as a dict, taken
        atomically. It holds the owner for its whole duration: for a large store, prefer
        :meth:`scan` and :meth:`get_many`."""
        _check_prefix(prefix)
        return self._core.call(ops.GET_ALL, prefix)

    def keys(self, prefix: str = "") -> KeysView[str]:
        """A snapshot of the keys (starting with ``prefix``), taken atomically."""
        _check_prefix(prefix)
        return _KeysSnapshot(self._core.call(ops.KEYS, prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix``, as one atomic step; return how many
        were removed. ``delete_prefix("")`` is :meth:`clear`."""
        _check_prefix(prefix)
        return self._core.call(ops.DELETE_PREFIX, prefix)

    def scan(self, prefix: str = "", count: int = 1000) -> Iterator[str]:
        """Yield the keys starting with ``prefix``, fetched ``count`` at a time: the key set
        never travels in one message, and the owner is held for a page at a time. A key
        present throughout the scan is yielded exactly once; one set or removed while it runs
        may or may not be. A scan not continued within a minute is forgotten by the owner
        (the next page raises KeyError)."""
        _check_prefix(prefix)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, not {count!r}")
        return self._scan(prefix, count)

    def _scan(self, prefix: str, count: int) -> Iterator[str]:
        cursor = 0
        while True:
            cursor, page = self._core.call(ops.SCAN, cursor, prefix, count)
            yield from page
            if cursor == 0:
                return

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of ``keys`` that exist, in one round trip, read atomically."""
        keys = list(keys)
        for key in keys:
            if type(key) is not str:
                _bad_key(key)
        if not keys:
            return {}
        return self._core.call(ops.GET_MANY, keys)

    def set_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]],
                 ttl: float | None = None) -> None:
        """Set many keys in one round trip, as one atomic step (each with ``ttl``, as
        :meth:`set`)."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        for key, _value in pairs:
            if type(key) is not str:
                _bad_key(key)
        if ttl is not None:
            ttl = check_ttl(ttl)
        if pairs:
            self._core.call(ops.SET_MANY, pairs, ttl)

    # -- expiry ----------------------------------------------------------------------------------

    def expire(self, key: str, seconds: float) -> bool:
        """Make ``key`` expire ``seconds`` from now (on the owner's clock). Returns False if
        the key is missing. TypeError/ValueError for seconds that are not a finite number
        > 0."""
        if type(key) is not str:
            _bad_key(key)
        ttl = check_ttl(seconds, "seconds")
        if ttl is None:
            raise TypeError("seconds must be a number of seconds, not None")
        return self._core.call(ops.EXPIRE, key, ttl)

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if it has no expiry. KeyError if the key is
        missing."""
        if type(key) is not str:
            _bad_key(key)
        left = self._core.call(ops.TTL, key)
        if left is MISSING:
            raise KeyError(key)
        return left

    def persist(self, key: str) -> bool:
        """Remove the expiry of ``key``. Returns False if it is missing or had none."""
        if type(key) is not str:
            _bad_key(key)
        return self._core.call(ops.PERSIST, key)

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
        if not isinstance(key, str):
            raise TypeError(f"zkv keys must be str, not {type(key).__name__}: {key!r:.60}")
        return self._core.call(ops.CONTAINS, key)

    def __iter__(self) -> Iterator[str]:
        """Iterate over a snapshot of the keys."""
        keys: list[str] = self._core.call(ops.KEYS, "")
        return iter(keys)

    def __len__(self) -> int:
        return self._core.call(ops.LEN)

    def items(self) -> ItemsView[str, Any]:
        """The (key, value) pairs of an atomic snapshot (one round trip)."""
        return self.get_all().items()

    def values(self) -> ValuesView[Any]:
        """The values of an atomic snapshot (one round trip)."""
        return self.get_all().values()

    def clear(self) -> None:
        """Remove every key, as one atomic step."""
        self._core.call(ops.CLEAR)

    def update(self, other: _KeysAndGetItem | Iterable[tuple[str, Any]] = (),
               /, **kwargs: Any) -> None:
        """Like :meth:`dict.update`, as one atomic step in one round trip."""
        pairs: list[tuple[str, Any]]
        if isinstance(other, Mapping):
            pairs = list(other.items())
        elif isinstance(other, _KeysAndGetItem):  # as dict.update does
            pairs = [(key, other[key]) for key in other.keys()]
        else:
            pairs = list(other)
        pairs.extend(kwargs.items())
        self.set_many(pairs)

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
        if type(key) is not str:
            _bad_key(key)
        if not callable(fn):
            raise TypeError(f"modify needs a callable, not {type(fn).__name__}")
        return self._core.call(ops.MODIFY, key, fn, default)

    def incr(self, key: str, amount: int | float = 1) -> int | float:
        """Add ``amount`` to the number at ``key`` (missing counts as 0) atomically; return
        the new value. TypeError if the key holds something else than an int or float. The
        key keeps its expiry."""
        if type(key) is not str:
            _bad_key(key)
        _check_amount(amount)
        return self._core.call(ops.INCR, key, amount)

    def decr(self, key: str, amount: int | float = 1) -> int | float:
        """``incr(key, -amount)``."""
        _check_amount(amount)
        return self.incr(key, -amount)

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value of ``key``; if missing, set it to ``default`` first (atomically)."""
        if type(key) is not str:
            _bad_key(key)
        return self._core.call(ops.SETDEFAULT, key, default)

    def pop(self, key: str, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value, atomically. If missing: ``default``, or
        KeyError when no default is given."""
        if type(key) is not str:
            _bad_key(key)
        value = self._core.call(ops.POP, key)
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        return value

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        """Set ``key`` to ``new`` if its value equals ``expected`` (``zkv.MISSING``: if the
        key does not exist), atomically. Returns whether it was set. The key keeps its
        expiry."""
        if type(key) is not str:
            _bad_key(key)
        return self._core.call(ops.CAS, key, expected, new)

    def transact(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(mapping)`` in the owner with the whole store to itself, and return what it
        returns. ``mapping`` reads and writes the store; its writes are applied together when
        ``fn`` returns, and not at all if it raises (the exception is re-raised here). Values
        read from it are copies: assign them back to change the store. A key written keeps
        its expiry; a new key has none."""
        if not callable(fn):
            raise TypeError(f"transact needs a callable, not {type(fn).__name__}")
        return self._core.call(ops.TRANSACT, fn)

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
        if type(prefix) is not str:
            raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, not {max_entries!r}")
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
        if type(channel) is not str:
            raise TypeError(f"channel names must be str, not {type(channel).__name__}")
        self._core.call(ops.PUBLISH, channel, data)

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
        return self._core.call(ops.STATS)

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
        if self._is_owner and self._env_before is not _NOT_SET:
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
        self._env_before = _NOT_SET

    def _reconnect(self) -> Core:
        with self._mutex:
            if isinstance(self._core, _Reconnect):
                self._core = _client_core(self._endpoint, self._options)
                _install_exit_hooks()
            return self._core


_NOT_SET: Any = object()


class Pipeline:
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

    def __init__(self, store: Store) -> None:
        self._store = store
        self._calls: list[Call] = []
        self._after: list[Callable[[Any], Any]] = []  # turns an op's result into the method's
        self.results: list[Any] = []

    def _queue(self, op: Op[..., Any], key: str, *args: Any,
               then: Callable[[Any], Any] | None = None) -> Pipeline:
        if type(key) is not str:
            _bad_key(key)
        self._calls.append((op, (key, *args)))
        self._after.append(then or _same)
        return self

    def get(self, key: str, default: Any = None) -> Pipeline:
        """Queue :meth:`Store.get`."""
        return self._queue(ops.GET, key, then=lambda v: default if v is MISSING else v)

    def set(self, key: str, value: Any, ttl: float | None = None) -> Pipeline:
        """Queue :meth:`Store.set`."""
        return self._queue(ops.SET, key, value, None if ttl is None else check_ttl(ttl))

    def delete(self, key: str) -> Pipeline:
        """Queue :meth:`Store.delete` (its result: whether the key existed)."""
        return self._queue(ops.DELETE, key)

    def incr(self, key: str, amount: int | float = 1) -> Pipeline:
        """Queue :meth:`Store.incr`."""
        _check_amount(amount)
        return self._queue(ops.INCR, key, amount)

    def modify(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Pipeline:
        """Queue :meth:`Store.modify`."""
        if not callable(fn):
            raise TypeError(f"modify needs a callable, not {type(fn).__name__}")
        return self._queue(ops.MODIFY, key, fn, default)

    def setdefault(self, key: str, default: Any = None) -> Pipeline:
        """Queue :meth:`Store.setdefault`."""
        return self._queue(ops.SETDEFAULT, key, default)

    def pop(self, key: str, default: Any = MISSING) -> Pipeline:
        """Queue :meth:`Store.pop` (a missing key without a default: KeyError in
        :attr:`results`)."""

        def result(value: Any) -> Any:
            if value is MISSING:
                if default is MISSING:
                    raise KeyError(key)
                return default
            return value
        return self._queue(ops.POP, key, then=result)

    def compare_and_set(self, key: str, expected: Any, new: Any) -> Pipeline:
        """Queue :meth:`Store.compare_and_set`."""
        return self._queue(ops.CAS, key, expected, new)

    def contains(self, key: str) -> Pipeline:
        """Queue ``key in store``."""
        return self._queue(ops.CONTAINS, key)

    def expire(self, key: str, seconds: float) -> Pipeline:
        """Queue :meth:`Store.expire`."""
        ttl = check_ttl(seconds, "seconds")
        if ttl is None:
            raise TypeError("seconds must be a number of seconds, not None")
        return self._queue(ops.EXPIRE, key, ttl)

    def persist(self, key: str) -> Pipeline:
        """Queue :meth:`Store.persist`."""
        return self._queue(ops.PERSIST, key)

    def __len__(self) -> int:
        return len(self._calls)

    def execute(self) -> list[Any]:
        """Send the queued operations; return their results in order."""
        calls, self._calls = self._calls, []
        after, self._after = self._after, []
        self.results = results = []
        raw: list[Any] = []
        try:
            self._store._core.execute(calls, raw)
        except Exception:
            if len(raw) < len(calls):
                raise  # the pipeline as a whole failed (the owner is gone, a timeout, ...)
        first_error: BaseException | None = None
        for then, value in zip(after, raw, strict=True):
            if isinstance(value, BaseException):
                results.append(value)
            else:
                try:
                    results.append(then(value))
                except Exception as exc:
                    results.append(exc)
            if first_error is None and isinstance(results[-1], BaseException):
                first_error = results[-1]
        if first_error is not None:
            raise first_error
        return results

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.execute()


def _same(value: Any) -> Any:
    return value


# -- the process-wide store -------------------------------------------------------------------

_LIVE: weakref.WeakSet[Store] = weakref.WeakSet()
_GLOBAL: Store | None = None
_GLOBAL_LOCK = threading.RLock()
_hooks_pid: int | None = None


def store() -> Store:
    """The process-wide store: the same object on every call in one process.

    On first use it connects to the owner announced in ``ZKV_ENDPOINT`` (or, in a process
    that multiprocessing started, to an owner among its ancestors). If there is none and this
    is not a multiprocessing child, it becomes the owner: it binds private ipc sockets, starts
    its poller thread and exports ``ZKV_ENDPOINT`` for the children it starts. A
    multiprocessing child that finds no owner raises :class:`~zkv.NoOwnerError` instead of
    silently making a private store.
    """
    current = _GLOBAL
    if current is not None and not current.closed:
        return current
    with _GLOBAL_LOCK:
        if _GLOBAL is not None and not _GLOBAL.closed:
            return _GLOBAL
        address = _endpoint.discover()
        if address:
            made = connect(address)
        elif multiprocessing.parent_process() is not None:
            raise NoOwnerError(
                "this is a multiprocessing child and no zkv owner was found: "
                f"{_endpoint.ENV_VAR} is not set and no ancestor process owns a store. Create "
                "the store in the main process (zkv.store() or zkv.serve()) before starting "
                "the workers, or pass its endpoint: zkv.connect(endpoint)")
        else:
            made = serve()
        _set_global(made)
        return made


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
    """
    if _backends.is_backend_url(endpoint):
        raise ValueError(f"zkv.serve() starts an owner; a store kept in Redis is joined: "
                         f"zkv.connect({_backends.redact(str(endpoint))!r})")
    opts = Options.from_env(options)
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
