"""zkv: one key-value store with publish/subscribe, shared by every process of a program.

The main process owns the data; multiprocessing workers (Pool, ProcessPoolExecutor, fork, spawn
or forkserver) and other processes reach it over ZeroMQ sockets whose address they inherit in
the ``ZKV_ENDPOINT`` environment variable::

    import zkv

    kv = zkv.store()          # the owner in the main process, a client in its children
    kv["config"] = {"rate": 3}
    kv.incr("jobs_done")
    with kv.lock("report"):
        ...

``zkv.astore()`` is the same store for asyncio (``await kv.get(...)``), and
``zkv.store(snapshot="data.zkv")`` keeps the owner's data in a file across restarts.

``zkv.shared_memory``, ``zkv.KeyValueStore`` and ``zkv.GlobalKeyValueStore.get_instance()``
keep code written against the original ``shared_memory`` module working.
"""

from __future__ import annotations

import logging
from typing import Any

from ._version import __version__
from .aio import AsyncLock, AsyncPipeline, AsyncStore, aconnect, astore
from .compat import GlobalKeyValueStore, KeyValueStore
from .config import Options
from .errors import (
    AuthenticationError,
    DecodeError,
    EncodeError,
    LockError,
    MessageTooLargeError,
    NoOwnerError,
    OwnerGoneError,
    ProtocolError,
    ReentrancyError,
    RemoteError,
    SerializationError,
    SnapshotError,
    StoreClosedError,
    ZkvConnectionError,
    ZkvError,
    ZkvTimeoutError,
)
from .locks import Lock
from .pubsub import Change, Message, Subscriber
from .state import MISSING
from .store import Pipeline, Store, connect, serve, store

# zkv logs, and writes nothing to stderr unless the application configured logging.
logging.getLogger("zkv").addHandler(logging.NullHandler())

__all__ = [
    "MISSING",
    "AsyncLock",
    "AsyncPipeline",
    "AsyncStore",
    "AuthenticationError",
    "Change",
    "DecodeError",
    "EncodeError",
    "GlobalKeyValueStore",
    "KeyValueStore",
    "Lock",
    "LockError",
    "Message",
    "MessageTooLargeError",
    "NoOwnerError",
    "Options",
    "OwnerGoneError",
    "Pipeline",
    "ProtocolError",
    "ReentrancyError",
    "RemoteError",
    "SerializationError",
    "SnapshotError",
    "Store",
    "StoreClosedError",
    "Subscriber",
    "ZkvConnectionError",
    "ZkvError",
    "ZkvTimeoutError",
    "__version__",
    "aconnect",
    "astore",
    "connect",
    "serve",
    "store",
]


def __getattr__(name: str) -> Any:
    # ``zkv.shared_memory`` is the process-wide store, made on first use (never at import,
    # and never by ``from zkv import *``: it is not in ``__all__``).
    if name == "shared_memory":
        return store()
    raise AttributeError(f"module 'zkv' has no attribute {name!r}")
