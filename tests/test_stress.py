"""Under heavy concurrent load (32 processes x 1,000 mixed operations) nothing is lost or
duplicated: every increment is counted once, every write of every process is there once and in
its order, and every subscriber either received each message or counted it as lost."""

from __future__ import annotations

import collections
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _faultkit import CTX, STRESS_CHANNELS, stress_subscriber, stress_worker

from zkv.testing import private_store, wait_for

WORKERS = 32
OPS = 1000
PAD = 1024  # bytes per published message: enough that a stalled subscriber must lose some
OWNER_HWM = 200  # the owner queues at most this many messages per subscriber


def _get(q: Any, deadline: float, what: str) -> Any:
    try:
        return q.get(timeout=max(0.1, deadline - time.monotonic()))
    except queue.Empty:
        pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_many_processes_mixed_operations() -> None:
    deadline = time.monotonic() + 150
    procs = []
    with private_store(hwm=OWNER_HWM) as kv:
        ready, drain, start = CTX.Queue(), CTX.Event(), CTX.Event()
        worker_reports, sub_reports = CTX.Queue(), CTX.Queue()
        try:
            subscribers = [("live-1", 100_000, None), ("live-2", 100_000, None),
                           ("stalled", 100, drain)]
            for name, hwm, gate in subscribers:
                procs.append(CTX.Process(target=stress_subscriber,
                                         args=(kv.endpoint, name, hwm, ready, gate,
                                               sub_reports)))
                procs[-1].start()
            for _ in subscribers:
                _get(ready, deadline, "the subscribers")
            for me in range(WORKERS):
                procs.append(CTX.Process(target=stress_worker,
                                         args=(kv.endpoint, me, OPS, PAD, start,
                                               worker_reports)))
                procs[-1].start()
            start.set()
            reports = [_get(worker_reports, deadline, "the workers") for _ in range(WORKERS)]

            # Every subscriber now reads; end markers (numbered) go out until each has one on
            # every channel. Markers can be lost too: they are sent again.
            drain.set()
            ended: list[dict[str, Any]] = []
            marker = 0
            while len(ended) < len(subscribers):
                marker += 1
                for channel in STRESS_CHANNELS:
                    kv.publish(channel, ("end", marker))
                try:
                    ended.append(sub_reports.get(timeout=0.25))
                except queue.Empty:
                    assert time.monotonic() < deadline, "subscribers never saw the end"
            for proc in procs:
                proc.join(30)
                assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        store = kv.get_all()
        # Every client said goodbye as it left. The goodbye is one-way (the client does not
        # wait for it to be taken), so the owner may take it a moment after join() returned.
        wait_for(lambda: kv.stats()["sessions"] == 0, timeout=30, what="every session ended")

    # -- the key-value audit -----------------------------------------------------------------------
    assert sum(r["mismatches"] for r in reports) == 0, "a process did not read its own write"
    assert store["counter"] == sum(r["added"] for r in reports), "an increment was lost/doubled"
    log = store.get("log", [])
    assert len(log) == len(set(log)) == sum(r["seq"] for r in reports)
    by_worker: dict[int, list[int]] = collections.defaultdict(list)
    for me, seq in log:
        by_worker[me].append(seq)
    for r in reports:
        me = r["me"]
        assert store.get(f"w{me}:incrs", 0) == r["incrs"]
        assert store.get(f"w{me}:seq", []) == list(range(r["seq"]))
        assert by_worker[me] == list(range(r["seq"])), "the shared log lost or reordered a write"
        assert store.get(f"w{me}:value") == r["last"]
        assert f"w{me}:tmp" not in store
    # (incr, modify and delete are half of the mix)
    assert sum(r["incrs"] + r["seq"] + r["deletes"] for r in reports) > 0.4 * WORKERS * OPS

    # -- the pub/sub audit -------------------------------------------------------------------------
    published = {c: sum(r["published"][c] for r in reports) for c in STRESS_CHANNELS}
    for sub in ended:
        lost = 0
        for channel in STRESS_CHANNELS:
            got = sub["received"][channel]
            assert len(got) == len(set(got)), f"{sub['name']} got a message twice"
            assert all(0 <= s < next(r for r in reports if r["me"] == w)["published"][channel]
                       for w, s in got), f"{sub['name']} got a message nobody published"
            number, seq = sub["ends"][channel]
            # Sequence numbers: every published message numbered once, in one order.
            assert seq == published[channel] + number
            lost += sub["last"][channel] - sub["counts"][channel]
        assert sub["dropped"] == lost, f"{sub['name']}: zkv counted {sub['dropped']} lost, " \
                                       f"the sequence numbers say {lost}"
    stalled = next(s for s in ended if s["name"] == "stalled")
    assert stalled["dropped"] > 0, "the stalled subscriber was expected to fall behind"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_soak_script_runs() -> None:
    """examples/soak.py (make soak) runs, reports the owner's memory, file descriptors and
    threads, and finds them flat on a short run."""
    script = Path(__file__).resolve().parent.parent / "examples" / "soak.py"
    result = subprocess.run([sys.executable, str(script), "--seconds", "5"],
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rss(MB)" in result.stdout and "fds" in result.stdout
    assert "soak: FLAT" in result.stdout
