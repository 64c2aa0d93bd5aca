"""Helpers for the asyncio tests: running a coroutine on each kind of event loop, waiting for a
condition inside a loop, and measuring how long the event loop was kept from running.

Everything a child process runs is defined at module level, so every start method can import
it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import zkv

__all__ = ["LOOPS", "LoopWatch", "await_until", "run"]

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test dependencies
    uvloop = None

#: The kinds of event loop the tests run on (uvloop when it is installed).
LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """``asyncio.run(coro)`` on the kind of loop named."""
    if loop == "uvloop":
        assert uvloop is not None
        return uvloop.run(coro)  # type: ignore[no-any-return]
    return asyncio.run(coro)


async def await_until(condition: Callable[[], Any], timeout: float = 10.0,
                      what: str = "condition") -> Any:
    """Let the loop run until ``condition()`` is true (checked every few milliseconds); raise
    ZkvTimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise zkv.ZkvTimeoutError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.002)


class LoopWatch:
    """Ticks every millisecond in the event loop and measures, for each gap between two ticks,
    how long the loop's thread was *kept from running the loop*: the gap's wall time minus the
    time the process's threads spent runnable but not running (waiting for a CPU, from the
    kernel's ``/proc/self/task/*/schedstat``: the loop's thread itself, or a thread that held
    the GIL the loop waited for). A loaded machine that does not schedule the process
    stretches the gaps, but not this measure; a callback that computes, or waits in a
    blocking call (a socket, a lock), does."""

    def __init__(self) -> None:
        self.blocked: list[float] = []  # seconds per gap, scheduling delays taken out
        self.raw: list[float] = []  # seconds per gap, as the wall clock saw it
        self.ticks = 0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _queued_ns() -> dict[str, int]:
        """Nanoseconds each thread of this process has spent waiting on a run queue so far."""
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                    out[tid] = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):  # a thread that just ended
                pass
        return out

    async def _run(self) -> None:
        last, queued = time.monotonic(), self._queued_ns()
        while not self._stop:
            await asyncio.sleep(0.001)
            now, now_queued = time.monotonic(), self._queued_ns()
            gap = now - last
            waited = sum(n - queued.get(tid, 0) for tid, n in now_queued.items())
            self.raw.append(gap)
            self.blocked.append(gap - waited / 1e9)
            last, queued = now, now_queued
            self.ticks += 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    @property
    def worst(self) -> float:
        """The longest the loop was kept from running (seconds)."""
        return max(self.blocked, default=0.0)

    def report(self) -> str:
        return (f"{self.ticks} ticks; worst gap {self.worst * 1000:.1f} ms blocked, "
                f"{max(self.raw, default=0.0) * 1000:.1f} ms on the wall clock")


async def watched(body: Callable[[], Awaitable[T]]) -> tuple[T, LoopWatch]:
    """Run ``body()`` with a :class:`LoopWatch` ticking beside it."""
    watch = LoopWatch()
    watch.start()
    await asyncio.sleep(0)
    try:
        result = await body()
    finally:
        await watch.stop()
    return result, watch
