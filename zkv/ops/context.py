"""What an operation may use in the owner besides its state: the :class:`Context`."""

from __future__ import annotations

from typing import Any, Protocol

from ..codec import Frame
from ..state import Entry, State

__all__ = ["DEFERRED", "Context", "Pickled"]

#: Returned by ``apply`` when the answer comes later (a lock wait): no reply now.
DEFERRED: Any = type("Deferred", (), {"__repr__": lambda self: "DEFERRED"})()


class Pickled:
    """A result already encoded by ``apply`` (inside a transaction, so that a result that
    cannot travel undoes it)."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames


class Context(Protocol):
    """What an operation may use in the owner besides the state: given by the owner's loop
    for a request from another process (``remote`` True: values must be able to travel), and by
    the owner-local core for a call in the owner's own process."""

    state: State
    remote: bool

    def entry_frames(self, entry: Entry) -> list[Frame]:
        """An entry's frames, for a reply (a large value may be put in a blob file)."""

    def acquire_lock(self, name: str, token: bytes, timeout: float | None) -> Any:
        """True/False, or :data:`DEFERRED` (the answer is sent when the wait ends)."""

    def release_lock(self, name: str, token: bytes) -> bool: ...

    def publish(self, channel: str, frames: list[Frame]) -> None: ...

    def end_session(self) -> None: ...

    def cache_watch(self, prefixes: list[bytes]) -> int: ...

    def cache_unwatch(self, prefixes: list[bytes]) -> None: ...

    def cache_sync(self) -> int: ...

    def stats(self) -> dict[str, int]: ...

    def save(self, path: str) -> Any:
        """Write a snapshot to ``path`` (empty: the store's snapshot file): what was saved
        (:meth:`zkv.snapshot.SaveResult.to_dict`), or :data:`DEFERRED` (answered when the
        file is written)."""
