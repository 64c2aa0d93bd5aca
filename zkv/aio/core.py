"""The seam between :class:`~zkv.AsyncStore` and whatever serves it: :class:`AsyncCore`, the
asyncio twin of :class:`zkv.core.Core`.

Two async cores implement it: :class:`zkv.aio.local.AsyncLocalCore` in the owner (operations
applied to the data directly, without blocking the event loop) and
:class:`zkv.aio.remote.AsyncRemoteCore` in a client (requests on an asyncio DEALER per event
loop, many in flight at once). Each is made over the sync core of the same store (its
:attr:`~AsyncCore.sync`), whose connection, owner and settings it shares.
"""

from __future__ import annotations

from typing import Any, ParamSpec, Protocol, TypeVar

from ..core import Call, Core
from ..ops import Op
from ..pubsub import Subscriber, Topics

__all__ = ["AsyncCore"]

P = ParamSpec("P")
R = TypeVar("R")


class AsyncCore(Protocol):
    """What an :class:`~zkv.AsyncStore` needs from whatever serves it (the coroutine twins of
    :class:`zkv.core.Core`'s methods that talk to the owner)."""

    @property
    def sync(self) -> Core:
        """The sync core this one is the asyncio face of."""

    @property
    def is_owner(self) -> bool: ...

    @property
    def endpoint(self) -> str: ...

    async def get(self, key: str, default: Any) -> Any: ...

    async def set(self, key: str, value: Any, ttl: float | None) -> None: ...

    async def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R: ...

    async def execute(self, calls: list[Call], out: list[Any]) -> list[Any]: ...

    async def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool: ...

    async def lock_release(self, name: str, token: bytes) -> bool: ...

    async def subscriber(self, topics: Topics, what: str) -> Subscriber:
        """A new :class:`~zkv.Subscriber`, live when returned (``async for`` it)."""

    def owner_alive(self) -> bool: ...

    def close(self) -> None:
        """Close what this core holds (its sockets), from any thread; idempotent."""
