"""When the owner dies (SIGKILL) or closes its store in the middle of traffic, every client's
pending call and next call fail fast with OwnerGoneError (a ConnectionError), far under the
request timeout; the old Store stays broken; the same client processes can join a new owner."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _faultkit import (
    CTX,
    OwnerProcess,
    hammer_client,
    lock_waiter_client,
    slow_modify_client,
    subscriber_client,
)

import zkv
from zkv.testing import wait_for

HAMMERS = 4
REQUEST_TIMEOUT = 60.0  # seconds: every client's request timeout (see _faultkit)
#: "Fails fast": well under REQUEST_TIMEOUT, and wide enough for a loaded 2-core machine (a
#: fraction of a second is expected: the clients check the owner every 0.1 s).
FAST = 15.0
#: "At once": a call on a store that already knows its owner is gone (or a close) sends
#: nothing and waits for nothing; anything like a timeout would take REQUEST_TIMEOUT.
AT_ONCE = 10.0


def _collect(results: Any, count: int, what: str) -> list[tuple[Any, ...]]:
    out = []
    for _ in range(count):
        try:
            out.append(results.get(timeout=30))
        except queue.Empty:
            pytest.fail(f"only {len(out)} of {count} clients reported {what}")
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["kill", "close"])
def test_owner_death_fails_every_client_fast(how: str, tmp_path: Path) -> None:
    owner = OwnerProcess()
    ready, results, new_endpoints = CTX.Queue(), CTX.Queue(), CTX.Queue()
    procs = []
    parent: zkv.Store | None = None
    try:
        parent = zkv.connect(owner.endpoint, timeout=60)
        held = parent.lock("held-by-parent")
        assert held.acquire(timeout=5)
        bodies = [hammer_client] * HAMMERS + [lock_waiter_client, subscriber_client]
        for body in bodies:
            procs.append(CTX.Process(target=body, args=(owner.endpoint, ready, results,
                                                        new_endpoints)))
        for proc in procs:
            proc.start()
        _collect(ready, len(procs), "ready")
        # Pending for sure: the waiter is queued on the lock, the subscriber is receiving, and
        # (kill) the owner is stuck in a slow modify, so the hammers' requests pile up waiting
        # for their replies.
        wait_for(lambda: owner.stats()["locks"] >= 2, timeout=30, what="lock waiter queued")
        wait_for(lambda: owner.stats()["subscriptions"] >= 1, timeout=30, what="subscription")
        if how == "kill":  # a close() would wait for the owner's busy thread; a kill does not
            marker = tmp_path / "slow-modify-started"
            procs.append(CTX.Process(target=slow_modify_client,
                                     args=(owner.endpoint, ready, results, new_endpoints,
                                           str(marker))))
            procs[-1].start()
            _collect(ready, 1, "ready")
            wait_for(marker.exists, timeout=30, what="slow modify running in the owner")
        t_dead = owner.kill() if how == "kill" else owner.close_store()

        first = _collect(results, len(procs), "their first error")
        for role, pid, (start, end, error), (n_start, n_end, n_error) in first:
            assert error == "OwnerGoneError", (role, pid, error)
            if role != "hammer":  # (a hammer may be between two calls)
                assert start < t_dead, f"{role} had no call pending when the owner died"
            assert end - t_dead < FAST, f"{role}: pending call failed {end - t_dead:.2f}s late"
            assert n_error == "OwnerGoneError", (role, pid, n_error)
            assert n_end - n_start < AT_ONCE, f"{role}: next call took {n_end - n_start:.2f}s"
        if how == "kill":
            # The owner was stuck long enough for hammers to be waiting for replies. (One whose
            # reply was still on its way when the owner got stuck may only start its next call
            # as the owner dies: that call shows the "next call" case instead.)
            pending = [r for r in first if r[0] == "hammer" and r[2][0] < t_dead]
            assert pending, "no hammer had a call pending when the owner died"
        with pytest.raises(zkv.OwnerGoneError):
            parent.get("anything")

        with OwnerProcess() as fresh:
            for _ in procs:
                new_endpoints.put(fresh.endpoint)
            second = _collect(results, len(procs), "on the new owner")
            for role, _pid, got, (_s, _e, still), close_took in second:
                assert got == role, f"{role} could not use the new owner"
                assert still == "OwnerGoneError", f"{role}: the old store said {still}"
                assert close_took < AT_ONCE
            for proc in procs:
                proc.join(30)
                assert proc.exitcode == 0, f"a client exited with {proc.exitcode}"
            assert fresh.stats()["keys"] == len(procs)
    finally:
        if parent is not None:
            parent.close()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        owner.close()


class TestOldStore:
    """A Store whose owner died stays broken: every call raises OwnerGoneError, zkv.store()
    does not silently swap it, and close() returns at once."""

    def test_old_store_stays_broken(self) -> None:
        with OwnerProcess() as owner:
            client = zkv.connect(owner.endpoint, timeout=60)
            client.set("k", 1)
            owner.kill()
            for call in (lambda: client.get("k"), lambda: client.set("k", 2),
                         lambda: client.publish("c", 1), lambda: client.subscribe("c"),
                         lambda: client.lock("l").acquire(timeout=1), client.stats):
                with pytest.raises(zkv.OwnerGoneError):
                    call()
            with OwnerProcess() as fresh:
                with pytest.raises(zkv.OwnerGoneError):
                    client.get("k")  # a new owner elsewhere changes nothing for this store
                other = zkv.connect(fresh.endpoint)
                assert other.get("k") is None  # the data died with its owner
                other.close()
            client.close()
            with pytest.raises(zkv.StoreClosedError):
                client.get("k")


def _poller_bug(ticks: int, now: float) -> None:
    raise RuntimeError("a bug in the owner's loop thread")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_crashed_poller_thread_counts_as_owner_gone(kv: zkv.Store,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Should the owner's poller thread ever die of a bug, its process lives on but nobody
    serves the store: clients get OwnerGoneError at once, not at the end of their timeout."""
    client = zkv.connect(kv.endpoint, timeout=REQUEST_TIMEOUT)
    try:
        client.set("k", 1)
        kv._core.owner.sessions.check = _poller_bug  # type: ignore[method-assign]  # loop, 0.1 s
        start = time.monotonic()
        with pytest.raises(zkv.OwnerGoneError):
            while True:
                client.get("k")
        assert time.monotonic() - start < FAST
        assert "owner loop crashed" in caplog.text
    finally:
        client.close()


def test_owner_thread_publishing_flat_out_does_not_starve_clients(kv: zkv.Store) -> None:
    """An owner thread that publishes in a tight loop shares the owner with the clients: they
    can still connect and are served (its messages queue behind theirs, not ahead forever)."""
    stop = threading.Event()

    def flood() -> None:
        n = 0
        while not stop.is_set():
            kv.publish("flood", n)
            n += 1

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        client = zkv.connect(kv.endpoint, timeout=15)
        try:
            for i in range(20):
                client.set("k", i)
                assert client.get("k") == i
        finally:
            client.close()
    finally:
        stop.set()
        flooder.join(10)
