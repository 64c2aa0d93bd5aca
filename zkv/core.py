"""The seam between the public :class:`~zkv.Store` and whatever serves it: :class:`Core`.

Two cores implement it today: the owner-local core (:class:`zkv.owner.local.LocalCore`), which
applies operations to the data in this process, and the remote core
(:class:`zkv.remote.RemoteCore`), which sends them to the owner over ZeroMQ. A ``Store`` is a
thin face over its core: it checks the caller's arguments and calls :meth:`Core.call` with an
entry of :mod:`zkv.ops`; ``get`` and ``set``, the most frequent calls, have methods of their own
so that each core can take its shortest path.
"""

from __future__ import annotations

from typing import Any, ParamSpec, Protocol, TypeVar

from .dispatch import Dispatcher
from .ops import Op
from .pubsub import Subscriber, Topics

__all__ = ["Call", "Core"]

P = ParamSpec("P")
R = TypeVar("R")

#: One queued operation of a pipeline: the op and its arguments.
Call = tuple[Op[..., Any], tuple[Any, ...]]


class Core(Protocol):
    """What a :class:`~zkv.Store` needs from whatever serves it."""

    @property
    def is_owner(self) -> bool:
        """Whether the data lives in this process."""

    @property
    def endpoint(self) -> str:
        """The address other processes connect to."""

    def get(self, key: str, default: Any) -> Any:
        """The value of ``key``, or ``default``."""

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        """Set ``key``; ``ttl`` seconds until it expires (None: never)."""

    def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run one operation and return its result (``MISSING`` for an absent key)."""

    def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        """Run queued operations in order, as one atomic step; return their results (also
        appended to ``out``). Every operation runs; the first error is raised after all."""

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        """Take lock ``name`` for ``token`` within ``timeout`` (None: no limit)."""

    def lock_release(self, name: str, token: bytes) -> bool:
        """Release lock ``name`` held by ``token``; False if it does not hold it."""

    def subscriber(self, topics: Topics, what: str) -> Subscriber:
        """A new :class:`~zkv.Subscriber` of ``topics``, live when returned."""

    def dispatcher(self) -> Dispatcher:
        """A new callback dispatcher for this process."""

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        """Serve repeated gets of keys under ``prefix`` from this process's memory."""

    def disable_cache(self, prefix: str | None) -> None: ...

    def cache_info(self) -> dict[str, int]: ...

    def owner_alive(self) -> bool:
        """A cheap check that the owner still exists."""

    def close(self) -> None: ...
