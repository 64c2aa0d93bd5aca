"""A client process killed mid-request, while waiting for a lock, or while holding one, does not
disturb the owner or the other clients: its locks are released within seconds and everyone
else is served throughout."""

from __future__ import annotations

import functools
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from store_helpers import is_redis, stop_process

import zkv
from zkv.endpoint import pid_alive
from zkv.testing import wait_for

#: Seconds: a fraction of a second is expected (the owner checks lock holders every 0.2 s);
#: generous for a loaded 2-core machine, and under the 30 s that the waits are given.
QUICK = 20.0
LEASE = 2.0  # seconds: the locks' lease of the Redis stores of the tests (conftest.py)

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract


def _hold_lock_forever(conn: mp.connection.Connection, name: str) -> None:
    kv = zkv.store()
    kv.lock(name).acquire()
    conn.send("held")
    conn.recv()  # until killed


def _wait_for_lock(name: str) -> None:
    kv = zkv.store()
    kv.lock(name).acquire()  # killed while waiting, or (stopped) once granted
    threading.Event().wait()  # until killed


def _wait_for_lock_and_note(name: str) -> None:
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


class _Waiter:
    """A lock wait in a thread of this process, through its own client (its own session)."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.client = zkv.connect(endpoint)
        self.lock = self.client.lock(name)
        self.granted = threading.Event()
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        try:
            if self.lock.acquire(timeout=60):
                self.granted.set()
        except zkv.StoreClosedError:  # closed by the test while it waited (the test failed)
            pass

    def close(self) -> None:
        self.client.close()  # releases the lock, or ends the wait
        self.thread.join(10)


def test_a_killed_waiter_never_gets_the_lock(kv: zkv.Store, fork: mp.context.BaseContext
                                             ) -> None:
    """On every backend: a process killed while it waits for a lock neither gets it nor
    keeps it from the others."""
    lock = kv.lock("job")
    lock.acquire()
    waiter = fork.Process(target=_wait_for_lock_and_note, args=("job",))
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
        assert time.monotonic() - started < QUICK + (LEASE if is_redis(kv) else 0)
        assert "dead-waiter-got-it" not in kv
    finally:
        client.close()


@pytest.mark.zkv_only("the owner's queue of waiters, first come first served (Redis's lease "
                      "locks have none)")
class TestWaiterKilled:
    """A process killed while it waits for a lock never keeps it: its wait is dropped, or, if
    the lock was granted to it as it died, the lock is taken back and passed on to the next
    waiter."""

    def _queue(self, kv: zkv.Store, fork: mp.context.BaseContext
               ) -> tuple[zkv.Lock, mp.process.BaseProcess, _Waiter]:
        """The owner holds "job"; a child process waits for it, and a client behind it."""
        lock = kv.lock("job")
        lock.acquire()
        waiter = fork.Process(target=_wait_for_lock, args=("job",))
        waiter.start()
        wait_for(lambda: kv.stats()["locks"] == 2, what="the child waiting")
        behind = _Waiter(kv.endpoint, "job")
        wait_for(lambda: kv.stats()["locks"] == 3, what="a client waiting behind it")
        return lock, waiter, behind

    def test_dead_waiter_is_skipped(self, kv: zkv.Store, fork: mp.context.BaseContext) -> None:
        lock, waiter, behind = self._queue(kv, fork)
        try:
            _kill(waiter)
            # The owner drops the dead process's wait: the holder and the client remain.
            wait_for(lambda: kv.stats()["locks"] == 2, timeout=QUICK, what="the wait dropped")
            lock.release()  # to the next waiter alive, the client
            assert behind.granted.wait(QUICK)
            assert kv.stats()["locks"] == 1
        finally:
            behind.close()

    def test_lock_granted_to_a_dying_waiter_is_passed_on(
            self, kv: zkv.Store, fork: mp.context.BaseContext) -> None:
        lock, waiter, behind = self._queue(kv, fork)
        try:
            assert waiter.pid is not None
            stop_process(waiter.pid)  # alive, so the owner grants it the lock...
            lock.release()
            # ...first come, first served: the child holds it, the client still waits.
            assert kv.stats()["locks"] == 2 and not behind.granted.is_set()
            _kill(waiter)  # ...and dies holding it, before it could even know
            assert behind.granted.wait(QUICK), "the dead waiter kept the lock"
            assert kv.stats()["locks"] == 1
        finally:
            behind.close()


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



# -- order and normal exit ---------------------------------------------------------------------

def _take_in_turn(name: str, me: int) -> None:
    """Wait for the lock; once granted, note this process's turn, and release it."""
    kv = zkv.store()
    with kv.lock(name, timeout=60):
        kv.modify("turns", functools.partial(_append, me), default=[])


def _append(item: int, turns: list[int]) -> list[int]:
    return [*turns, item]


@pytest.mark.zkv_only("Redis's lease locks are not first come, first served")
class TestFirstComeFirstServed:
    """Waiters get a lock in the order their waits reached the owner, whatever the process."""

    def test_arrival_order(self, kv: zkv.Store, fork: mp.context.BaseContext) -> None:
        lock = kv.lock("turn")
        lock.acquire()
        waiters = []
        for me in range(6):
            waiters.append(fork.Process(target=_take_in_turn, args=("turn", me)))
            waiters[-1].start()
            # One at a time: the next waits only once this one's wait is queued in the owner.
            wait_for(lambda n=me + 2: kv.stats()["locks"] == n, what=f"waiter {me} queued")
        lock.release()
        for waiter in waiters:
            waiter.join(30)
            assert waiter.exitcode == 0
        assert kv["turns"] == list(range(6))


def _hold_and_exit(name: str, conn: mp.connection.Connection) -> None:
    """Take the lock and leave normally, without close(). An exit hook that runs after zkv's
    own (which closes the store) keeps this process alive until the test says so."""
    kv = zkv.store()
    kv.lock(name).acquire()
    multiprocessing.util.Finalize(None, _linger, args=(conn,), exitpriority=1)  # zkv's: 100
    conn.send("held")
    conn.recv()  # "exit"


def _linger(conn: mp.connection.Connection) -> None:
    conn.send("closed")
    conn.recv()  # "go"


HOLD_AND_EXIT = """
import atexit, sys
# Registered before zkv is imported, so it runs after zkv's exit hook (atexit: last in, first
# out). It keeps the process alive, with its store closed, until the test says so.
atexit.register(lambda: (print("closed", flush=True), sys.stdin.readline()))
import zkv
zkv.store().lock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.readline()
"""


class TestReleasedOnNormalExit:
    """A process that takes a lock and exits normally, without close(), releases it as it
    exits: shown while the process still lives (so not found dead by the owner)."""

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_multiprocessing_child(self, kv: zkv.Store, method: str) -> None:
        ctx = mp.get_context(method)
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_hold_and_exit, args=("exit-lock", child_end))
        child.start()
        try:
            assert parent_end.poll(30) and parent_end.recv() == "held"
            assert kv.lock("exit-lock").acquire(blocking=False) is False
            parent_end.send("exit")
            assert parent_end.poll(30) and parent_end.recv() == "closed"
            free = kv.lock("exit-lock").acquire(timeout=QUICK)
            assert child.pid is not None and pid_alive(child.pid)
            assert free, "not released by the exit"
            parent_end.send("go")
            child.join(30)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()

    def test_script(self, kv: zkv.Store) -> None:
        child = subprocess.Popen([sys.executable, "-c", HOLD_AND_EXIT, "exit-lock"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline() == "held\n"
            assert kv.lock("exit-lock").acquire(blocking=False) is False
            child.stdin.write("exit\n")
            child.stdin.flush()
            assert child.stdout.readline() == "closed\n"
            free = kv.lock("exit-lock").acquire(timeout=QUICK)
            assert child.poll() is None and pid_alive(child.pid)
            assert free, "not released by the exit"
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate()
