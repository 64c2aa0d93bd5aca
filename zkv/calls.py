"""What each call of the public API asks of a core: its argument checks, the operation it
runs and what it makes of the result. No I/O happens here.

A :class:`Plan` is ``(op, args, then)``: run ``op`` with ``args`` on a core, and pass the
result through ``then``. :class:`~zkv.Store` runs plans with its core's ``call``,
:class:`~zkv.AsyncStore` awaits them, and both pipelines queue them; so each method's checks,
its choice of operation and its handling of the result are written once, here, for every
face. A plan function raises TypeError or ValueError for a bad argument before anything is
sent.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from . import ops
from .ops import Op
from .snapshot import SaveResult
from .state import MISSING, check_ttl

__all__ = [
    "KeysSnapshot",
    "PipelineQueue",
    "Plan",
    "bad_key",
    "check_cache",
    "check_channel",
    "check_key",
    "check_prefix",
    "check_scan",
    "clear",
    "compare_and_set",
    "contains",
    "decr",
    "delete",
    "delete_prefix",
    "expire",
    "get",
    "get_all",
    "get_many",
    "incr",
    "keys",
    "length",
    "modify",
    "persist",
    "pop",
    "publish",
    "save",
    "scan_page",
    "set",
    "set_many",
    "setdefault",
    "stats",
    "transact",
    "ttl",
    "update",
]


R = TypeVar("R")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan(Generic[R]):
    """One call, whose result is an ``R``: ``op`` with ``args`` (``op`` None: nothing to ask,
    the result is ``then(None)``), and ``then`` (None: the op's result as it is)."""

    op: Op[..., Any] | None
    args: tuple[Any, ...]
    then: Callable[[Any], R] | None = None


# -- checks ---------------------------------------------------------------------------------------

def bad_key(key: object) -> None:
    """Raise the TypeError of a key that is not a ``str`` (callers test ``type(key) is not
    str`` first, which costs less than a call on the hot paths)."""
    if not isinstance(key, str):
        raise TypeError(f"zkv keys must be str, not {type(key).__name__}: {key!r:.60}")


def check_key(key: object) -> None:
    if type(key) is not str:
        bad_key(key)


def check_prefix(prefix: object) -> None:
    if type(prefix) is not str:
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")


def check_amount(amount: object) -> None:
    if type(amount) not in (int, float):
        raise TypeError(f"incr amount must be an int or float, not {type(amount).__name__}")


def check_function(fn: object, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{what} needs a callable, not {type(fn).__name__}")


def check_channel(channel: object) -> None:
    if type(channel) is not str:
        raise TypeError(f"channel names must be str, not {type(channel).__name__}")


def check_scan(prefix: object, count: object) -> None:
    check_prefix(prefix)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, not {count!r}")


def check_cache(prefix: object, max_entries: object) -> None:
    if type(prefix) is not str:
        raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be a positive int, not {max_entries!r}")


def _seconds(seconds: object) -> float:
    ttl = check_ttl(seconds, "seconds")
    if ttl is None:
        raise TypeError("seconds must be a number of seconds, not None")
    return ttl


@runtime_checkable
class _KeysAndGetItem(Protocol):
    """What :meth:`dict.update` accepts as a mapping: ``keys()`` and ``[key]``."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, key: str, /) -> Any: ...


# -- results --------------------------------------------------------------------------------------

class KeysSnapshot(KeysView[str]):
    """The keys of a store at one moment (``Store.keys()``): a set-like view of a list."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = keys
        self._set: builtins.set[str] | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        if self._set is None:
            self._set = builtins.set(self._keys)
        return key in self._set

    def __repr__(self) -> str:
        return f"zkv keys({self._keys!r})"


def _or_default(default: Any) -> Callable[[Any], Any]:
    return lambda value: default if value is MISSING else value


def _found_or_key_error(key: str) -> Callable[[Any], Any]:
    def then(found: Any) -> Any:
        if not found:
            raise KeyError(key)
        return found
    return then


def _missing_is_key_error(key: str) -> Callable[[Any], Any]:
    def then(value: Any) -> Any:
        if value is MISSING:
            raise KeyError(key)
        return value
    return then


def _empty_dict(_value: Any) -> dict[str, Any]:
    return {}


def _none(_value: Any) -> None:
    return None


# -- plans ----------------------------------------------------------------------------------------

def get(key: str, default: Any = None) -> Plan[Any]:
    check_key(key)
    return Plan(ops.GET, (key,), _or_default(default))


def set(key: str, value: Any, ttl: float | None = None) -> Plan[None]:
    check_key(key)
    return Plan(ops.SET, (key, value, None if ttl is None else check_ttl(ttl)))


def delete(key: str, ignore_key_error: bool = True) -> Plan[bool]:
    check_key(key)
    return Plan(ops.DELETE, (key,), None if ignore_key_error else _found_or_key_error(key))


def contains(key: str) -> Plan[bool]:
    if not isinstance(key, str):
        raise TypeError(f"zkv keys must be str, not {type(key).__name__}: {key!r:.60}")
    return Plan(ops.CONTAINS, (key,))


def length() -> Plan[int]:
    return Plan(ops.LEN, ())


def clear() -> Plan[None]:
    return Plan(ops.CLEAR, ())


def get_all(prefix: str = "") -> Plan[dict[str, Any]]:
    check_prefix(prefix)
    return Plan(ops.GET_ALL, (prefix,))


def keys(prefix: str = "") -> Plan[KeysView[str]]:
    check_prefix(prefix)
    return Plan(ops.KEYS, (prefix,), KeysSnapshot)


def delete_prefix(prefix: str) -> Plan[int]:
    check_prefix(prefix)
    return Plan(ops.DELETE_PREFIX, (prefix,))


def scan_page(cursor: int, prefix: str, count: int) -> Plan[tuple[int, list[str]]]:
    """One page of a scan (checked by :func:`check_scan` when the scan began)."""
    return Plan(ops.SCAN, (cursor, prefix, count))


def get_many(keys: Iterable[str]) -> Plan[dict[str, Any]]:
    keys = list(keys)
    for key in keys:
        if type(key) is not str:
            bad_key(key)
    if not keys:
        return Plan(None, (), _empty_dict)
    return Plan(ops.GET_MANY, (keys,))


def set_many(items: Mapping[str, Any] | Iterable[tuple[str, Any]],
             ttl: float | None = None) -> Plan[None]:
    pairs = list(items.items() if isinstance(items, Mapping) else items)
    for key, _value in pairs:
        if type(key) is not str:
            bad_key(key)
    if ttl is not None:
        ttl = check_ttl(ttl)
    if not pairs:
        return Plan(None, (), _none)
    return Plan(ops.SET_MANY, (pairs, ttl))


def update(other: Any, kwargs: Mapping[str, Any]) -> Plan[None]:
    """:meth:`dict.update`'s arguments, as a ``set_many``."""
    pairs: list[tuple[str, Any]]
    if isinstance(other, Mapping):
        pairs = list(other.items())
    elif isinstance(other, _KeysAndGetItem):  # as dict.update does
        pairs = [(key, other[key]) for key in other.keys()]
    else:
        pairs = list(other)
    pairs.extend(kwargs.items())
    return set_many(pairs)


def expire(key: str, seconds: float) -> Plan[bool]:
    check_key(key)
    return Plan(ops.EXPIRE, (key, _seconds(seconds)))


def ttl(key: str) -> Plan[float | None]:
    check_key(key)
    return Plan(ops.TTL, (key,), _missing_is_key_error(key))


def persist(key: str) -> Plan[bool]:
    check_key(key)
    return Plan(ops.PERSIST, (key,))


def modify(key: str, fn: Callable[[Any], Any], default: Any = None) -> Plan[Any]:
    check_key(key)
    check_function(fn, "modify")
    return Plan(ops.MODIFY, (key, fn, default))


def incr(key: str, amount: int | float = 1) -> Plan[int | float]:
    check_key(key)
    check_amount(amount)
    return Plan(ops.INCR, (key, amount))


def decr(key: str, amount: int | float = 1) -> Plan[int | float]:
    check_amount(amount)
    return incr(key, -amount)


def setdefault(key: str, default: Any = None) -> Plan[Any]:
    check_key(key)
    return Plan(ops.SETDEFAULT, (key, default))


def pop(key: str, default: Any = MISSING) -> Plan[Any]:
    check_key(key)

    def then(value: Any) -> Any:
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        return value
    return Plan(ops.POP, (key,), then)


def compare_and_set(key: str, expected: Any, new: Any) -> Plan[bool]:
    check_key(key)
    return Plan(ops.CAS, (key, expected, new))


def transact(fn: Callable[[Any], Any]) -> Plan[Any]:
    check_function(fn, "transact")
    return Plan(ops.TRANSACT, (fn,))


def publish(channel: str, data: Any) -> Plan[None]:
    check_channel(channel)
    return Plan(ops.PUBLISH, (channel, data))


def stats() -> Plan[dict[str, int]]:
    return Plan(ops.STATS, ())


def save(path: str | os.PathLike[str] | None = None) -> Plan[SaveResult]:
    """A snapshot to ``path`` (made absolute here, in the caller; None: the owner's
    ``snapshot`` file)."""
    if path is None:
        where = ""
    else:
        where = os.fspath(path)
        if not isinstance(where, str):
            raise TypeError(f"path must be a str or os.PathLike[str], not {type(path).__name__}")
        if not where:
            raise ValueError("path must not be empty (None: the store's snapshot file)")
        where = os.path.abspath(where)
    return Plan(ops.SAVE, (where,), SaveResult.from_dict)


# -- pipelines ------------------------------------------------------------------------------------

Q = TypeVar("Q", bound="PipelineQueue[Any]")
T = TypeVar("T")


def _same(value: Any) -> Any:
    return value


class PipelineQueue(Generic[T]):
    """The queue of a pipeline: its methods check their arguments at once and queue the
    call; :class:`~zkv.Pipeline` and :class:`~zkv.AsyncPipeline` send it. ``T`` is the
    store type the pipeline belongs to."""

    def __init__(self, store: T) -> None:
        self._store = store
        self._calls: list[tuple[Op[..., Any], tuple[Any, ...]]] = []
        self._after: list[Callable[[Any], Any]] = []  # turns an op's result into the method's
        self.results: list[Any] = []

    def _queue(self: Q, plan: Plan[Any]) -> Q:
        assert plan.op is not None
        self._calls.append((plan.op, plan.args))
        self._after.append(plan.then or _same)
        return self

    def get(self: Q, key: str, default: Any = None) -> Q:
        """Queue :meth:`Store.get`."""
        return self._queue(get(key, default))

    def set(self: Q, key: str, value: Any, ttl: float | None = None) -> Q:
        """Queue :meth:`Store.set`."""
        return self._queue(set(key, value, ttl))

    def delete(self: Q, key: str) -> Q:
        """Queue :meth:`Store.delete` (its result: whether the key existed)."""
        return self._queue(delete(key))

    def incr(self: Q, key: str, amount: int | float = 1) -> Q:
        """Queue :meth:`Store.incr`."""
        return self._queue(incr(key, amount))

    def modify(self: Q, key: str, fn: Callable[[Any], Any], default: Any = None) -> Q:
        """Queue :meth:`Store.modify`."""
        return self._queue(modify(key, fn, default))

    def setdefault(self: Q, key: str, default: Any = None) -> Q:
        """Queue :meth:`Store.setdefault`."""
        return self._queue(setdefault(key, default))

    def pop(self: Q, key: str, default: Any = MISSING) -> Q:
        """Queue :meth:`Store.pop` (a missing key without a default: KeyError in
        :attr:`results`)."""
        return self._queue(pop(key, default))

    def compare_and_set(self: Q, key: str, expected: Any, new: Any) -> Q:
        """Queue :meth:`Store.compare_and_set`."""
        return self._queue(compare_and_set(key, expected, new))

    def contains(self: Q, key: str) -> Q:
        """Queue ``key in store``."""
        check_key(key)
        return self._queue(contains(key))

    def expire(self: Q, key: str, seconds: float) -> Q:
        """Queue :meth:`Store.expire`."""
        return self._queue(expire(key, seconds))

    def persist(self: Q, key: str) -> Q:
        """Queue :meth:`Store.persist`."""
        return self._queue(persist(key))

    def __len__(self) -> int:
        return len(self._calls)

    def _take(self) -> tuple[list[tuple[Op[..., Any], tuple[Any, ...]]],
                             list[Callable[[Any], Any]]]:
        """The queued calls (the queue starts again empty)."""
        calls, self._calls = self._calls, []
        after, self._after = self._after, []
        self.results = []
        return calls, after

    def _finish(self, after: list[Callable[[Any], Any]], raw: list[Any]) -> list[Any]:
        """The results of the methods from the operations' results ``raw`` (an exception in
        place of each failed one, the first raised after all)."""
        self.results = results = []
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
