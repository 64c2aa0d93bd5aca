"""Functions the owner runs for its users must not wait for the owner.

``modify(key, fn)`` and ``transact(fn)`` run ``fn`` in the owner, holding the store's lock, and
(for a request from another process) on the owner's only poller thread. A call made from inside
``fn`` that waits for the owner — a lock wait, a subscription waiting for its welcome, a new
connection saying HELLO, closing the store — could never be answered: the owner is busy running
``fn``. Such calls raise :class:`~zkv.ReentrancyError` at once instead of wedging the owner.
Reads, writes, atomic operations, ``publish`` and ``lock(...).acquire(blocking=False)`` work as
usual inside ``fn``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from .errors import ReentrancyError

__all__ = ["active", "refuse", "run_user_code"]

T = TypeVar("T")
A = TypeVar("A")

_state = threading.local()


def run_user_code(fn: Callable[[A], T], arg: A) -> T:
    """``fn(arg)``, marked as user code that the owner runs (see the module docstring)."""
    depth: int = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        return fn(arg)
    finally:
        _state.depth = depth


def active() -> bool:
    """Whether this thread is running a function on the owner's behalf."""
    return bool(getattr(_state, "depth", 0))


def refuse(what: str) -> None:
    """Raise ReentrancyError if this thread is running a function on the owner's behalf."""
    if getattr(_state, "depth", 0):
        raise ReentrancyError(
            f"{what} would wait for the zkv owner, which is running this very function (given "
            f"to modify or transact); it can never be answered. Do it before or after the "
            f"call, or use lock(...).acquire(blocking=False)")
