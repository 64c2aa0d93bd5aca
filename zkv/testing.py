"""Helpers for testing code that uses zkv.

:func:`private_store` starts a fresh owner for one test and tears it down, restoring
``ZKV_ENDPOINT`` and the process-wide store afterwards::

    @pytest.fixture
    def kv():
        with zkv.testing.private_store() as store:
            yield store
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ZkvTimeoutError
from .store import Store, serve

__all__ = ["private_store", "wait_for"]


@contextlib.contextmanager
def private_store(**options: Any) -> Iterator[Store]:
    """A new owner (private ipc sockets) for the duration of the block. Children started
    inside the block find it through ``ZKV_ENDPOINT``; it is closed and its sockets removed
    on exit."""
    owner = serve(**options)
    try:
        yield owner
    finally:
        owner.close()


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005,
             what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something true, and return that; raise
    :class:`~zkv.ZkvTimeoutError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ZkvTimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)
