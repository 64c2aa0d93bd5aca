"""A client process killed mid-request, while waiting for a lock, or while holding one, does not
disturb the owner or the other clients: its locks are released within seconds and everyone
else is served throughout."""

from __future__ import annotations

import functools
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from store_helpers import is_redis

import zkv
from zkv.endpoint import pid_alive
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

QUICK = 5.0  # seconds: generous, the machine is shared
LEASE = 2.0  # seconds: the locks' lease of the Redis stores of the tests (conftest.py)


def _hold_lock_forever(conn: mp.connection.Connection, name: str) -> None:
    kv = zkv.store()
    kv.lock(name).acquire()
    conn.send("held")
    conn.recv()  # until killed


def _wait_for_lock(name: str) -> None:
    kv = zkv.store()
    kv.set("waiter-started", True)
    kv.lock(name).acquire()  # never granted before the kill
    kv.set("dead-waiter-got-it", True)


def _request_loop() -> None:
    kv = zkv.store()
    n = 0
    while True:
        n += 1
        kv.incr("loops")
        kv.set(f"blob{n % 4}", os.urandom(1000 + n % 5000))
        kv.get_many(["loops", "blob1"])
        with kv.pipeline() as p:
            p.incr("pipelined").get("loops")


_IN_MODIFY = threading.Event()


def _slow_update(client_pid: int, old: int) -> int:
    """Runs in the owner (this test process): blocks until the client that sent it is dead."""
    _IN_MODIFY.set()
    wait_for(lambda: not pid_alive(client_pid), timeout=20, what="client killed")
    return old + 1


def _modify_until_killed() -> None:
    kv = zkv.store()
    kv.modify("slow", functools.partial(_slow_update, os.getpid()), default=0)


@pytest.fixture
def fork() -> Iterator[mp.context.BaseContext]:
    """The fork context; every process started from it is killed and reaped after the test."""
    ctx = mp.get_context("fork")
    yield ctx
    for child in mp.active_children():
        child.kill()
        child.join(5)


def _wait_for_count(kv: zkv.Store, key: str, at_least: int) -> None:
    wait_for(lambda: kv.get(key, 0) >= at_least, timeout=30, what=f"{key} >= {at_least}")


def _kill(proc: mp.process.BaseProcess) -> None:
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


class TestHolderKilled:
    """A lock whose holder process dies is released within seconds; another process then
    acquires it."""

    def test_released_to_other_process(self, kv: zkv.Store,
                                       fork: mp.context.BaseContext) -> None:
        parent_end, child_end = fork.Pipe()
        holder = fork.Process(target=_hold_lock_forever, args=(child_end, "job"))
        holder.start()
        assert parent_end.poll(20) and parent_end.recv() == "held"
        client = zkv.connect(kv.endpoint)
        try:
            assert client.lock("job").acquire(blocking=False) is False
            killed = time.monotonic()
            _kill(holder)
            assert client.lock("job").acquire(timeout=30) is True
            # (on Redis a dead holder's lock is free once its lease runs out)
            assert time.monotonic() - killed < QUICK + (LEASE if is_redis(kv) else 0)
            assert kv.lock("job").acquire(blocking=False) is False  # the client holds it now
        finally:
            client.close()
        # the client closed: its lock is released at once
        assert kv.lock("job").acquire(timeout=QUICK) is True

    def test_released_to_owner_waiting(self, kv: zkv.Store,
                                       fork: mp.context.BaseContext) -> None:
        parent_end, child_end = fork.Pipe()
        holder = fork.Process(target=_hold_lock_forever, args=(child_end, "job"))
        holder.start()
        assert parent_end.poll(20) and parent_end.recv() == "held"
        got: list[float] = []

        def owner_waits() -> None:
            with kv.lock("job", timeout=30):
                got.append(time.monotonic())

        waiter = threading.Thread(target=owner_waits)
        waiter.start()
        if is_redis(kv):  # no queue of waiters to look at: the lock is held, it waits
            quick = QUICK + LEASE  # a dead holder's lock is free once its lease runs out
        else:
            wait_for(lambda: kv.stats()["locks"] == 2, what="owner waiting")
            quick = QUICK
        killed = time.monotonic()
        _kill(holder)
        waiter.join(30)
        assert got and got[0] - killed < quick


class TestWaiterKilled:
    """A process killed while its lock request is pending never gets (and keeps) the lock."""

    def test_dead_waiter_is_skipped(self, kv: zkv.Store, fork: mp.context.BaseContext) -> None:
        lock = kv.lock("job")
        lock.acquire()
        waiter = fork.Process(target=_wait_for_lock, args=("job",))
        waiter.start()
        if is_redis(kv):  # no queue of waiters on Redis: wait until it is trying
            wait_for(lambda: kv.get("waiter-started"), what="child waiting")
        else:
            wait_for(lambda: kv.stats()["locks"] == 2, what="child waiting")
        _kill(waiter)
        lock.release()  # may be granted to the dead waiter first; it must come back
        client = zkv.connect(kv.endpoint)
        try:
            started = time.monotonic()
            assert client.lock("job").acquire(timeout=30) is True
            assert time.monotonic() - started < QUICK
            assert "dead-waiter-got-it" not in kv
        finally:
            client.close()


class TestKilledMidRequest:
    """Clients killed in the middle of their requests leave the owner serving the others."""

    def test_killed_during_request_stream(self, kv: zkv.Store,
                                          fork: mp.context.BaseContext) -> None:
        client = zkv.connect(kv.endpoint)
        errors: list[BaseException] = []
        stop = threading.Event()

        def bystander() -> None:
            n = 0
            try:
                while not stop.is_set():
                    n += 1
                    client.set("bystander", n)
                    assert client.get("bystander") == n
            except BaseException as exc:
                errors.append(exc)

        watcher = threading.Thread(target=bystander)
        watcher.start()
        try:
            for round_ in range(1, 4):
                worker = fork.Process(target=_request_loop)
                worker.start()
                _wait_for_count(kv, "loops", 50 * round_)
                _kill(worker)
        finally:
            stop.set()
            watcher.join(30)
        try:
            assert errors == []
            assert kv.stats()["refused"] == 0  # no torn or malformed message reached the owner
            client.incr("after")
            assert kv["after"] == 1 and client.get("bystander") == kv["bystander"]
        finally:
            client.close()

    @pytest.mark.zkv_only("on Redis the function runs in the caller: a caller killed inside "
                          "it applies nothing (tests/test_redis.py)")
    def test_killed_while_owner_runs_its_modify(self, kv: zkv.Store,
                                                fork: mp.context.BaseContext) -> None:
        """The owner is executing the client's function when the client dies: the change is
        applied (it reached the owner), the reply is dropped, and everyone else is served."""
        _IN_MODIFY.clear()
        worker = fork.Process(target=_modify_until_killed)
        worker.start()
        assert _IN_MODIFY.wait(20)
        _kill(worker)
        client = zkv.connect(kv.endpoint)
        try:
            assert client.get("slow") == 1
            client.set("next", "served")
            assert kv["next"] == "served"
        finally:
            client.close()

