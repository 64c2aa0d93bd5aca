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
reads of a single key take no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from . import codec
from .codec import IMMUTABLE_TYPES, Frame
from .errors import EncodeError, StoreClosedError
from .reentry import run_user_code

__all__ = ["MISSING", "Entry", "State", "TransactionView"]


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

    def wire(self) -> list[Frame]:
        """The value as frames (pickled now, once, if it was kept as an object).

        Raises EncodeError if the value cannot be pickled (kept by reference in the owner).
        """
        frames = self.frames
        if frames is None:
            frames = self.frames = codec.dumps(self.obj, copy_buffers=True)
        return frames


ChangeHook = Callable[[int, str, "Entry | None", int], None]


class State:
    """The key-value data of one owner, with its atomic operations.

    Set :attr:`on_change` to be called (under the lock, in the order changes are applied)
    with ``(kind, key, entry_or_None, version)`` after every change.
    """

    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.lock = threading.RLock()
        self.version = 0
        self.on_change: ChangeHook | None = None
        #: Called before a write while someone watches (``on_change`` is set), holding no
        #: lock: the owner makes writing threads wait there while its queue of change events
        #: is full, as publishing threads do (see Server.wait_for_room).
        self.pace: Callable[[], None] | None = None

    # -- writes: callers outside this class hold no lock; every method takes it ----------------

    def _put(self, key: str, entry: Entry) -> None:
        # Store first, count second: a reader that sees version N sees every change <= N.
        self.data[key] = entry
        self.version += 1
        hook = self.on_change
        if hook is not None:
            hook(SET, key, entry, self.version)

    def _remove(self, key: str) -> Entry | None:
        entry = self.data.pop(key, None)
        if entry is not None:
            self.version += 1
            hook = self.on_change
            if hook is not None:
                hook(DELETE, key, None, self.version)
        return entry

    def _pace(self) -> None:
        pace = self.pace
        if pace is not None:
            pace()

    def put(self, key: str, entry: Entry) -> None:
        if self.on_change is not None:
            self._pace()
        with self.lock:
            self._put(key, entry)

    def put_many(self, items: list[tuple[str, Entry]]) -> None:
        if self.on_change is not None:
            self._pace()
        with self.lock:
            hook = self.on_change
            if hook is None:  # nobody watches: one dict update, at C speed
                self.data.update(items)
                self.version += len(items)  # (stored first, counted second, as in _put)
                return
            for key, entry in items:
                self._put(key, entry)

    def delete(self, key: str) -> Entry | None:
        """Remove ``key``; return its entry, or None if it was missing."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            return self._remove(key)

    def clear(self) -> None:
        if self.on_change is not None:
            self._pace()
        with self.lock:
            for key in list(self.data):
                self._remove(key)

    def setdefault(self, key: str, entry: Entry) -> Entry:
        """The entry of ``key``, setting it to ``entry`` first if missing."""
        if self.on_change is not None:
            self._pace()
        with self.lock:
            current = self.data.get(key)
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
            current = self.data.get(key)
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
            current = self.data.get(key)
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
            current = self.data.get(key)
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

    # -- reads -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Entry]:
        """A copy of the key -> entry mapping, taken atomically."""
        with self.lock:
            return dict(self.data)


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
        entry = self._state.data.get(key)
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
        return key in self._state.data

    def __iter__(self) -> Iterator[str]:
        if self._closed:
            raise StoreClosedError("the transaction is over; this view cannot be used any more")
        seen = [k for k in self._state.data if self._changes.get(k, None) is not MISSING]
        added = [k for k, v in self._changes.items()
                 if v is not MISSING and k not in self._state.data]
        return iter(seen + added)

    def __len__(self) -> int:
        return sum(1 for _ in self)
