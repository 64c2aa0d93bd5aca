"""An embedded owner whose process keeps a thread busy running Python code serves its workers
slowly (each request waits for the GIL): zkv says so, once, naming the fix. (The speed itself
is the bench's busy_owner row.)"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import time
from typing import Any

import pytest

import zkv

SPAWN = mp.get_context("spawn")


def _get_until(stop: Any, ready: Any) -> int:
    kv = zkv.store()
    kv.get("a")
    ready.set()
    n = 0
    while not stop.is_set():
        kv.get("a")
        n += 1
    return n


def _spin(seconds: float) -> int:
    """Pure-Python work, holding the GIL."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for i in range(1000):
            x += i * i
    return x


class TestBusyOwnerWarning:
    """One warning naming the cause and owner='process' when requests wait for the GIL, and
    none when the owner's process is idle."""

    def _run(self, kv: zkv.Store, busy: bool) -> int:
        kv["a"] = 1
        stop, ready = SPAWN.Event(), SPAWN.Event()
        worker = SPAWN.Process(target=_get_until, args=(stop, ready))
        worker.start()
        try:
            assert ready.wait(60)
            if busy:
                _spin(3.0)  # long enough for a second of measurements, twice
            else:
                stop.wait(1.5)  # (the main thread idles while the worker is served)
        finally:
            stop.set()
            worker.join(30)
        return kv._core.owner.gil.warnings  # type: ignore[attr-defined, no-any-return]

    @pytest.mark.timeout(90)
    @pytest.mark.skipif(not getattr(sys, "_is_gil_enabled", lambda: True)(),
                        reason="free-threaded Python: a busy thread holds up nobody, and no "
                               "warning is due (the idle test still checks there is none)")
    def test_busy(self, kv: zkv.Store, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.WARNING, logger="zkv.owner")
        assert self._run(kv, busy=True) == 1  # once, not once per second
        warnings = [r.getMessage() for r in caplog.records if "GIL" in r.getMessage()]
        assert len(warnings) == 1
        assert "owner='process'" in warnings[0] and "ms" in warnings[0]

    @pytest.mark.timeout(90)
    def test_idle(self, kv: zkv.Store, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.WARNING, logger="zkv.owner")
        assert self._run(kv, busy=False) == 0
        assert not [r for r in caplog.records if "GIL" in r.getMessage()]
