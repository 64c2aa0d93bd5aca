"""Noticing that an embedded owner waits for the GIL, and saying so.

An embedded owner's loop thread shares the GIL with its process's other threads. While one of
them runs pure-Python code, each time the loop gives the GIL away (around every ZeroMQ call) it
may wait up to the interpreter's switch interval (5 ms by default) to get it back, and the
workers it serves slow down from thousands of requests per second to a few hundred or less.
Nothing is wrong, but the user should know why, and what to do: ``owner="process"``.

:class:`GilWatch` measures the wait: every loop tick in which requests were served, it gives the
GIL away once (``time.sleep(0)``) and times how long getting it back takes (microseconds when
the other threads are idle or blocked; about a switch interval when one of them is busy).
When the median over the last second is above :data:`SLOW`, it logs one warning naming the
cause and the fix, at most once per :data:`EVERY` seconds.
"""

from __future__ import annotations

import collections
import logging
import statistics
import sys
import time

__all__ = ["EVERY", "SLOW", "GilWatch"]

log = logging.getLogger("zkv.owner")

#: Seconds: a median wait for the GIL above this is worth a warning (the default switch
#: interval is 5 ms: a busy thread costs each request at least that much).
SLOW = 0.002
#: Seconds between two warnings at most.
EVERY = 60.0
_WINDOW = 1.0  # seconds of measurements the median is over
_ENOUGH = 5  # measurements needed before judging


class GilWatch:
    """Times the owner loop's waits for the GIL (see the module docstring)."""

    def __init__(self) -> None:
        self._waits: collections.deque[tuple[float, float]] = collections.deque()
        self._warned_at = -EVERY
        self.warnings = 0

    def probe(self, now: float) -> float:
        """Give the GIL away once, time its return; warn if waits have been long lately.
        Returns the wait (seconds)."""
        start = time.perf_counter()
        time.sleep(0)
        wait = time.perf_counter() - start
        waits = self._waits
        waits.append((now, wait))
        while waits and waits[0][0] < now - _WINDOW:
            waits.popleft()
        if len(waits) >= _ENOUGH and now - self._warned_at >= EVERY:
            median = statistics.median(w for _t, w in waits)
            if median > SLOW:
                self._warned_at = now
                self.warnings += 1
                log.warning(
                    "zkv owner: requests from other processes wait for this process's GIL "
                    "(median %.1f ms per hand-off over the last second; switch interval "
                    "%.1f ms): a thread of this process keeps running Python code, so every "
                    "worker is served at a few hundred requests per second or less. Fix: "
                    "zkv.store(owner='process') (or ZKV_OWNER=process) puts the data in a "
                    "dedicated process that nobody's GIL holds up.",
                    median * 1000, sys.getswitchinterval() * 1000)
        return wait
