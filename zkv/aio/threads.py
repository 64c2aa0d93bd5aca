"""Blocking work done off the event loop: rare, slow-to-start steps (connecting, waiting for
a subscription's welcome, a store lock held by another thread) run in zkv's own small thread
pool, so that a user's saturated default executor never holds them up."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["run", "submit"]

T = TypeVar("T")

_WORKERS = 4
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(_WORKERS,
                                                              thread_name_prefix="zkv-aio")
            pool = _pool
    return pool


async def run(fn: Callable[..., T], *args: Any,
              cleanup: Callable[[T], Any] | None = None,
              pool: concurrent.futures.Executor | None = None) -> T:
    """``fn(*args)`` in a zkv thread (of ``pool``, if given), awaited. If the caller is
    cancelled (or times out) meanwhile, the call goes on, and what it returns is given to
    ``cleanup`` (a subscriber nobody will use is closed, a connection nobody will use is
    closed, a lock granted to nobody is released)."""
    done = (pool or _executor()).submit(functools.partial(fn, *args))
    try:
        return await asyncio.wrap_future(done)
    except asyncio.CancelledError:
        if cleanup is not None:
            def clean(finished: concurrent.futures.Future[T]) -> None:
                if not finished.cancelled() and finished.exception() is None:
                    cleanup(finished.result())
            done.add_done_callback(clean)
        raise


def _after_fork_in_child() -> None:
    global _pool, _pool_lock
    _pool = None  # its threads do not exist here
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def submit(fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """``fn(*args)`` in a zkv thread; its future."""
    return _executor().submit(functools.partial(fn, *args))
