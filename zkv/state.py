"""The owner's data and its atomic operations. No I/O happens here.

Every value is held in an :class:`Entry`, which keeps the value as an object, as wire frames,
or both:

- a value set by another process arrives as frames and stays frames: the owner does not
  unpickle what it only stores and hands back (a class only the clients can import still
  round-trips);
- an immutable value (``str``, ``int``, ``bytes``, ...) set in the owner is kept as the object
  and handed out as it is; it is pickled once, the first time a client asks for it;
- a mutable value set in the owner is pickled at once, so the store holds a snapshot that later
  changes to the caller's object do not affect; reading it in the owner unpickles a fresh copy;
- a value that cannot be pickled at all (a lock, an open file) can still be set in the owner: it
  is kept by reference, for the owner's own use, and a client that reads it gets an
  :class:`~zkv.EncodeError`.

All changes take :attr:`State.lock`, so each operation is atomic and they happen in one order;
reads of a single key take no lock. Nothing outside this module touches the dictionary.

Expiry: a key may carry a deadline on the owner's monotonic clock (a worker's clock never
matters). A key past its deadline is invisible to every read at once; it is removed when read,
and in the background by :meth:`State.purge_expired` (the owner's loop calls it), with a
change of kind :data:`EXPIRE`. ``set``/``set_many`` without a ``ttl`` clear a key's deadline;
operations that change a value in place (``modify``, ``incr``, ``compare_and_set``,
``setdefault``, a ``transact`` write to an existing key) keep it.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from . import codec
from .codec import IMMUTABLE_TYPES, Frame
from .errors import EncodeError, StoreClosedError
from .reentry import run_user_code

__all__ = ["DELETE", "EXPIRE", "MISSING", "SET", "Entry", "State", "TransactionView",
           "check_ttl"]


class _Missing:
    """Marks an absent key (``zkv.MISSING``)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "zkv.MISSING"

    def __reduce__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: Sentinel for "no such key" (``compare_and_set(key, MISSING, value)`` creates a key).
MISSING: Any = _Missing()

#: Marks an entry whose object form is not kept (it is unpickled on each read).
_NOOBJ: Any = object()

#: Change kinds given to :attr:`State.on_change`.
SET = 1
DELETE = 2
EXPIRE = 3

_now = time.monotonic


def check_ttl(ttl: object, what: str = "ttl") -> float | None:
    """A time to live as given by a caller: None, or a finite number of seconds > 0. Raises
    TypeError or ValueError (naming ``what`` and the value) for anything else."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(ttl).__name__}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"{what} must be a finite number of seconds > 0, not {ttl!r}")
    return float(ttl)


class Entry:
    """One stored value: ``obj`` (an object safe to hand out as it is, or ``_NOOBJ``) and
    ``frames`` (its wire form, or None until first needed)."""

    __slots__ = ("frames", "obj")

    def __init__(self, obj: Any, frames: list[Frame] | None) -> None:
        self.obj = obj
        self.frames = frames

    @classmethod
    def from_object(cls, value: Any) -> Entry:
        """An entry for a value set in the owner (a snapshot, see the module docstring)."""
        if type(value) in IMMUTABLE_TYPES:
            return cls(value, None)
        try:
            return cls(_NOOBJ, codec.dumps(value, copy_buffers=True))
        except EncodeError:
            return cls(value, None)  # kept by reference: usable in the owner only

    @classmethod
    def from_frames(cls, frames: list[Frame]) -> Entry:
        """An entry for a value that arrived from another process."""
        return cls(_NOOBJ, frames)

    @classmethod
    def many_from_frames(cls, values: list[Frame]) -> list[Entry]:
        """Entries for many single-frame values that arrived from another process."""
        noobj = _NOOBJ
        return [cls(noobj, [value]) for value in values]

    @classmethod
    def many_from_objects(cls, values: list[Any]) -> list[Entry]:
        """Entries for many immutable values (plain data), kept as objects."""
        return [cls(value, None) for value in values]

    def load(self) -> Any:
        """The value as an object: the kept object, or a fresh unpickled copy."""
        obj = self.obj
        if obj is not _NOOBJ:
            return obj
        assert self.frames is not None
        obj = codec.loads(self.frames)
        if type(obj) in IMMUTABLE_TYPES:
            self.obj = obj  # safe to share from now on
        return obj

    def encoded(self) -> list[Frame]:
        """The value as frames, as :meth:`wire`, but without keeping them if they are made
        now (a snapshot of many values set in the owner leaves no pickles behind). Raises
        EncodeError."""
        frames = self.frames
        if frames is None:
            return codec.dumps(self.obj)
        return frames

    def wire(self) -> list[Frame]:
        """The value as frames (pickled now, once, if it was kept as an object).

        Raises EncodeError if the value cannot be pickled (kept by reference in the owner).
        """
        frames = self.frames
        if frames is None:
            frames = self.frames = codec.dumps(self.obj, copy_buffers=True)
        return frames


ChangeHook = Callable[[int, str, "Entry | None", int], None]

#: Expired keys removed per call of :meth:`State.purge_expired` (the rest: next time).
PURGE_BATCH = 10_000
#: Seconds a scan is kept between two pages, and how many scans run at once at most.
SCAN_IDLE = 60.0
SCANS = 64
#: Keys: dictionaries smaller than this at their largest are never compacted.
_COMPACT_ABOVE = 50_000


class State:
    """The key-value data of one owner, with its atomic operations.

    Set :attr:`on_change` to be called (under the lock, in the order changes are applied)
    with ``(kind, key, entry_or_None, version)`` after every change. :attr:`version` counts
    the changes applied so far: a reader that sees version N sees every change up to N.
    """

    def __init__(self) -> None:
        self._data: dict[str, Entry] = {}
        self._deadlines: dict[str, float] = {}  # key -> monotonic time it expires
        self._heap: list[tuple[float, str]] = []  # (deadline, key); stale items are skipped
        self._peak = 0  # the most keys held since the last compaction
        self._scans: dict[int, tuple[list[str], int, float]] = {}  # cursor -> keys, at, used
        self._next_scan = 0
        self.lock = threading.RLock()
        self.version = 0
        self.on_change: ChangeHook | None = None
        #: Called before a write while someone watches (``on_change`` is set), holding no
        #: lock: the owner makes writing threads wait there while its queue of change events
        #: is full, as publishing threads do (see the owner's loop).
        self.pace: Callable[[], None] | None = None

    # -- changes (callers hold the lock) -------------------------------------------------------

    def _put(self, key: str, entry: Entry) -> None:
        # Store first, count second: a reader that sees version N sees every change <= N.
        data = self._data
        data[key] = entry
        if len(data) > self._peak:
            self._peak = len(data)
        self.version += 1
        hook = self.on_change
        if hook is not None:
            hook(SET, key, entry, self.version)

    def _remove(self, key: str, kind: int = DELETE) -> Entry | None:
        entry = self._data.pop(key, None)
        if entry is not None:
            if self._deadlines:
                self._deadlines.pop(key, None)
            self.version += 1
            hook = self.on_change
            if hook is not None:
                hook(kind, key, None, self.version)
        return entry

    def _set_deadline(self, key: str, ttl: float | None) -> None:
        if ttl is None:
            if self._deadlines:
                self._deadlines.pop(key, None)
            return
        deadline = _now() + ttl
        self._deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        if len(self._heap) > 2 * len(self._deadlines) + 1024:  # mostly stale: rebuild
            self._heap = [(d, k) for k, d in self._deadlines.items()]
            heapq.heapify(self._heap)

    def _live(self, key: str) -> Entry | None:
        """The entry of ``key`` if it exists and has not expired (an expired one is removed
        now). Callers hold the lock."""
        entry = self._data.get(key)
        if entry is not None and self._deadlines:
            deadline = self._deadlines.get(key)
            if deadline is not None and deadline <= _now():
                self._remove(key, EXPIRE)
                return None
        return entry

    def _purge_due(self) -> None:
        """Remove every key whose deadline has passed (before a read of many keys)."""
        if self._heap and self._heap[0][0] <= _now():
            self.purge_expired(limit=None)

    def _pace(self) -> None:
        pace = self.pace
        if pace is not None:
            pace()

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry of ``key``, or None if it is missing or expired (no lock taken unless it
        has just expired)."""
        entry = self._data.get(key)
        if entry is None or not self._deadlines:
            return entry
        deadline = self._deadlines.get(key)
        if deadline is None or deadline > _now():
            return entry
        with self.lock:
            return self._live(key)

    def contains(self, key: str) -> bool:
        return self.get(key) is not None

    def get_many(self, keys: Iterable[str]) -> list[Entry | None]:
        """The entries of ``keys`` (None where missing), read atomically."""
        with self.lock:
            if not self._deadlines:
                return list(map(self._data.get, keys))
            return [self._live(key) for key in keys]

    def keys(self, prefix: str = "") -> list[str]:
        """The keys (starting with ``prefix``), read atomically."""
        with self.lock:
            self._purge_due()
            if not prefix:
                return list(self._data)
            return [key for key in self._data if key.startswith(prefix)]

    def length(self) -> int:
        with self.lock:
            self._purge_due()
            return len(self._data)

    def items(self, prefix: str = "") -> list[tuple[str, Entry]]:
        """(key, entry) pairs (of keys starting with ``prefix``), read atomically."""
        with self.lock:
            self._purge_due()
            if not prefix:
                return list(self._data.items())
            return [(k, e) for k, e in self._data.items() if k.startswith(prefix)]

    def scan(self, cursor: int, prefix: str, count: int) -> tuple[int, list[str]]:
        """A page of at most ``count`` keys starting with ``prefix``, and the cursor of the
        next page (0: the scan is over). Cursor 0 starts a scan: the keys are listed then, and
        each page returns those of them still present. So a key present throughout a scan is
        returned exactly once; one set or removed while it runs may or may not be. A scan not
        continued within :data:`SCAN_IDLE` seconds is forgotten (its cursor is then refused
        with KeyError); at most :data:`SCANS` run at once (the oldest is forgotten)."""
        with self.lock:
            now = _now()
            scans = self._scans
            for stale in [c for c, scan in scans.items() if scan[2] < now - SCAN_IDLE]:
                del scans[stale]
            if cursor == 0:
                self._purge_due()
                keys = [k for k in self._data if k.startswith(prefix)] if prefix \
                    else list(self._data)
                self._next_scan += 1
                cursor = self._next_scan
                if len(scans) >= SCANS:
                    del scans[min(scans, key=lambda c: scans[c][2])]
                scans[cursor] = (keys, 0, now)
            elif cursor not in scans:
                raise KeyError(f"scan cursor {cursor} is unknown or expired (a scan is "
                               f"forgotten after {SCAN_IDLE:.0f} s without a next page)")
            keys, at, _used = scans[cursor]
            page: list[str] = []
            while at < len(keys) and len(page) < count:
                key = keys[at]
                at += 1
                if self._live(key) is not None:
                    page.append(key)
            if at >= len(keys):
                del scans[cursor]
                return 0, page
            scans[cursor] = (keys, at, now)
            return cursor, page

    def listing(self) -> tuple[int, dict[str, Entry], dict[str, float]]:
        """Everything, read atomically, for a snapshot: the version, a copy of the dictionary
        of entries and of the deadlines (monotonic) of the keys that have one. Copies of the
        dictionaries only (no object per key is made: no garbage collection can start), so
        the lock is held for as short as it can be; expired keys are removed first."""
        with self.lock:
            self._purge_due()
            return self.version, self._data.copy(), self._deadlines.copy()

    def ttl(self, key: str) -> float | Any | None:
        """Seconds until ``key`` expires, None if it has no deadline, MISSING if it is
        missing."""
        with self.lock:
            if self._live(key) is None:
                return MISSING
            deadline = self._deadlines.get(key)
            return None if deadline is None else max(0.0, deadline - _now())

    # -- writes: callers outside this class hold no lock; every method takes it ----------------

    def put(self, key: str, entry: Entry, ttl: float | None = None) -> None:
        """Set ``key`` (its deadline: ``ttl`` seconds from now, or none)."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            self._set_deadline(key, ttl)
            self._put(key, entry)

    def put_many(self, items: list[tuple[str, Entry]], ttl: float | None = None) -> None:
        if self.on_change is not None:
            self._pace()
        with self.lock:
            if ttl is not None or self._deadlines:
                for key, _entry in items:
                    self._set_deadline(key, ttl)
            hook = self.on_change
            if hook is None:  # nobody watches: one dict update, at C speed
                self._data.update(items)
                self._peak = max(self._peak, len(self._data))
                self.version += len(items)  # (stored first, counted second, as in _put)
                return
            for key, entry in items:
                self._put(key, entry)

    def restore(self, items: Iterable[tuple[str, Entry, float | None]]) -> None:
        """Set every ``(key, entry, ttl)`` (``ttl``: seconds, or None), as one step (a
        snapshot being loaded)."""
        with self.lock:
            for key, entry, ttl in items:
                self._set_deadline(key, ttl)
                self._put(key, entry)

    def delete(self, key: str) -> Entry | None:
        """Remove ``key``; return its entry, or None if it was missing."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            if self._live(key) is None:
                return None
            return self._remove(key)

    def pop(self, key: str, travel: bool = False) -> Entry | None:
        """Remove ``key`` and return its entry (None if missing). ``travel=True`` (a client's
        request): the value must be picklable, else EncodeError and nothing changes."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            entry = self._live(key)
            if entry is None:
                return None
            if travel:
                entry.wire()  # fails before the key is removed if it cannot travel
            return self._remove(key)

    def clear(self, prefix: str = "") -> int:
        """Remove every key (starting with ``prefix``); return how many."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            self._purge_due()
            doomed = [k for k in self._data if k.startswith(prefix)] if prefix \
                else list(self._data)
            for key in doomed:
                self._remove(key)
            self._compact()
            return len(doomed)

    def setdefault(self, key: str, entry: Entry) -> Entry:
        """The entry of ``key``, setting it to ``entry`` first if missing."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            current = self._live(key)
            if current is not None:
                return current
            self._put(key, entry)
            return entry

    def modify(self, key: str, fn: Callable[[Any], Any], default: Any,
               travel: bool = False) -> Entry:
        """Replace the value of ``key`` by ``fn(old)`` (``old`` is ``default`` if missing) and
        return the new entry. If ``fn`` raises, nothing changes. ``travel=True`` (a client's
        request): the new value must be picklable, else EncodeError and nothing changes."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            current = self._live(key)
            old = current.load() if current is not None else default
            entry = Entry.from_object(run_user_code(fn, old))
            if travel:
                entry.wire()
            self._put(key, entry)
            return entry

    def incr(self, key: str, amount: int | float) -> int | float:
        """Add ``amount`` to the number at ``key`` (0 if missing) and return the result."""
        if type(amount) not in (int, float):
            raise TypeError(f"incr amount must be an int or float, not {type(amount).__name__}")
        if self.on_change is not None:
            self._pace()
        with self.lock:
            current = self._live(key)
            old = current.load() if current is not None else 0
            if type(old) not in (int, float):
                raise TypeError(
                    f"cannot incr {key!r}: it holds a {type(old).__name__}, not an int or float"
                )
            new = old + amount
            self._put(key, Entry(new, None))
            return new

    def compare_and_set(self, key: str, expected: Any, entry: Entry) -> bool:
        """Set ``key`` to ``entry`` if its current value equals ``expected`` (or it is missing
        and ``expected`` is :data:`MISSING`). Return whether it was set."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            current = self._live(key)
            if current is None:
                matches = expected is MISSING
            else:
                matches = expected is not MISSING and bool(current.load() == expected)
            if matches:
                self._put(key, entry)
            return matches

    def transact(self, fn: Callable[[TransactionView], Any], travel: bool = False) -> Any:
        """Run ``fn(view)`` with the whole store to itself. Its changes are applied together
        when it returns, and not at all if it raises. Returns what ``fn`` returns.
        ``travel=True`` (a client's request): every value written must be picklable, else
        EncodeError and nothing changes."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            self._purge_due()
            view = TransactionView(self)
            try:
                result = run_user_code(fn, view)
            finally:
                view._closed = True
            changes = [(key, None if value is MISSING else Entry.from_object(value))
                       for key, value in view._changes.items()]
            if travel:
                for _key, entry in changes:
                    if entry is not None:
                        entry.wire()
            for key, entry in changes:
                if entry is None:
                    self._remove(key)
                else:
                    self._put(key, entry)
            return result

    def expire(self, key: str, ttl: float) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now; False if it is missing."""
        with self.lock:
            if self._live(key) is None:
                return False
            self._set_deadline(key, ttl)
            return True

    def persist(self, key: str) -> bool:
        """Remove the deadline of ``key``; False if it is missing or had none."""
        with self.lock:
            if self._live(key) is None or key not in self._deadlines:
                return False
            del self._deadlines[key]
            return True

    def purge_expired(self, limit: int | None = PURGE_BATCH) -> int:
        """Remove up to ``limit`` keys whose deadline has passed (None: all of them); return
        how many. Each one is a change of kind :data:`EXPIRE`."""
        removed = 0
        with self.lock:
            heap, deadlines = self._heap, self._deadlines
            now = _now()
            while heap and heap[0][0] <= now and (limit is None or removed < limit):
                deadline, key = heapq.heappop(heap)
                if deadlines.get(key) == deadline:  # not a stale heap item
                    self._remove(key, EXPIRE)
                    removed += 1
            if not deadlines and heap:
                heap.clear()
            if removed:
                self._compact()
        return removed

    @property
    def expiring(self) -> int:
        """Keys that have a deadline."""
        return len(self._deadlines)

    @property
    def stored(self) -> int:
        """Keys held now, expired ones not yet removed included (a cheap count)."""
        return len(self._data)

    def _compact(self) -> None:
        """Give back the memory of a dictionary that shrank a lot (Python's dictionaries keep
        their size when keys are removed): copy it when it holds under a quarter of its
        largest size. Callers hold the lock."""
        size = len(self._data)
        if size * 4 < self._peak and self._peak > _COMPACT_ABOVE:
            self._data = dict(self._data)
            self._deadlines = dict(self._deadlines)
            self._peak = size


class TransactionView(MutableMapping[str, Any]):
    """The mapping handed to a :meth:`State.transact` function: reads see the store plus this
    transaction's own changes; writes are kept until the function returns. It must not be used
    after that."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._changes: dict[str, Any] = {}
        self._closed = False

    def _check(self, key: object) -> None:
        if self._closed:
            raise StoreClosedError("the transaction is over; this view cannot be used any more")
        if not isinstance(key, str):
            raise TypeError(f"keys must be str, not {type(key).__name__}")

    def __getitem__(self, key: str) -> Any:
        self._check(key)
        if key in self._changes:
            value = self._changes[key]
            if value is MISSING:
                raise KeyError(key)
            return value
        entry = self._state._live(key)
        if entry is None:
            raise KeyError(key)
        return entry.load()  # a copy, as everywhere: assign it back to change the store

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key)
        self._changes[key] = value

    def __delitem__(self, key: str) -> None:
        self._check(key)
        if key not in self:
            raise KeyError(key)
        self._changes[key] = MISSING

    def __contains__(self, key: object) -> bool:
        self._check(key)
        if key in self._changes:
            return self._changes[key] is not MISSING  # type: ignore[index]
        return self._state._live(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        if self._closed:
            raise StoreClosedError("the transaction is over; this view cannot be used any more")
        data = self._state._data  # (expired keys were purged when the transaction began)
        seen = [k for k in data if self._changes.get(k, None) is not MISSING]
        added = [k for k, v in self._changes.items() if v is not MISSING and k not in data]
        return iter(seen + added)

    def __len__(self) -> int:
        return sum(1 for _ in self)
