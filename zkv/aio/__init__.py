"""zkv for asyncio: the same store, awaited.

:func:`astore` is the process-wide store's asyncio face (owner or client, as
:func:`zkv.store` decides; the same owner and connection); :func:`aconnect` joins a store as a
new client. Both return at once and connect on first use::

    kv = zkv.astore()
    await kv.set("config", {"rate": 3})
    values = await asyncio.gather(*(kv.get(f"job:{i}") for i in range(100)))  # pipelined

Modules: :mod:`zkv.aio.store` (the public classes), :mod:`zkv.aio.core` (the
:class:`AsyncCore` protocol), :mod:`zkv.aio.local` (in the owner), :mod:`zkv.aio.remote` (in a
client: one socket per event loop), :mod:`zkv.aio.threads` (blocking steps off the loop).
"""

from __future__ import annotations

from .core import AsyncCore
from .store import SYNC_ONLY, AsyncLock, AsyncPipeline, AsyncStore, aconnect, astore

__all__ = ["SYNC_ONLY", "AsyncCore", "AsyncLock", "AsyncPipeline", "AsyncStore", "aconnect",
           "astore"]
