"""A client that dies (SIGKILL) mid-request, holding a lock, waiting for a lock, or mid-pipeline
never breaks the owner: it keeps serving the others, the dead client's locks are released, and
every set_many / pipeline is applied entirely or not at all. User code that the owner runs
(modify, transact, unpickling) cannot stop the owner's thread, whatever it raises."""

from __future__ import annotations

import os
import pickle
import random
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from _faultkit import (
    CTX,
    busy_requester,
    generation_writer,
    lock_holder,
    lock_queuer,
    pipeline_writer,
)

import zkv
from zkv import wire
from zkv.testing import wait_for
from zkv.wire import Op, Status


@pytest.fixture
def client(kv: zkv.Store) -> Iterator[zkv.Store]:
    """A client of the test's owner, in the test process (its requests go over the sockets)."""
    other = zkv.connect(kv.endpoint)
    yield other
    other.close()


def _start(target: Any, *args: Any) -> tuple[Any, int]:
    ready = CTX.Queue()
    proc = CTX.Process(target=target, args=(*args, ready))
    proc.start()
    pid = ready.get(timeout=30)
    return proc, pid


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def _serves(client: zkv.Store, tag: str) -> None:
    client.set(f"alive:{tag}", tag)
    assert client.get(f"alive:{tag}") == tag


class TestClientKilledWithLocks:
    """A lock whose holder or waiter is SIGKILLed is released within a few seconds."""

    def test_holder_killed(self, kv: zkv.Store, client: zkv.Store) -> None:
        proc, _pid = _start(lock_holder, kv.endpoint, "job")
        assert not client.lock("job").acquire(blocking=False)
        _kill(proc)
        start = time.monotonic()
        lock = client.lock("job", timeout=10)
        assert lock.acquire(), "the dead holder's lock was never released"
        assert time.monotonic() - start < 5.0
        lock.release()
        _serves(client, "holder")

    def test_waiter_killed(self, kv: zkv.Store, client: zkv.Store) -> None:
        mine = client.lock("job")
        assert mine.acquire(timeout=5)
        proc, _pid = _start(lock_queuer, kv.endpoint, "job")
        wait_for(lambda: kv.stats()["locks"] >= 2, timeout=10, what="the child queued")
        _kill(proc)
        mine.release()  # at once: the grant may go to the dead waiter before it is noticed
        start = time.monotonic()
        again = client.lock("job", timeout=10)
        assert again.acquire(), "the lock went to the dead waiter and stayed there"
        assert time.monotonic() - start < 5.0
        again.release()
        wait_for(lambda: kv.stats()["locks"] == 0, timeout=10, what="no lock sessions left")


def test_client_killed_mid_request(kv: zkv.Store, client: zkv.Store) -> None:
    """Requesters killed at random moments (sending, waiting, or between requests)."""
    rng = random.Random(5)
    for round_ in range(4):
        procs = [_start(busy_requester, kv.endpoint)[0] for _ in range(2)]
        for proc in procs:
            time.sleep(rng.uniform(0, 0.05))  # a random moment of its request loop
            _kill(proc)
        _serves(client, f"round{round_}")
        assert isinstance(client.get("busy"), list)
    wait_for(lambda: kv.stats()["sessions"] <= 1, timeout=20, what="dead sessions forgotten")


class TestKilledMidPipeline:
    """Killed while a large set_many / pipeline is being built, sent or applied: each one is
    applied entirely or not at all (the owner receives a message whole, or not at all, and
    applies it as one step)."""

    KEYS = 400
    SIZE = 4096  # a 1.6 MB message: a kill often lands while it is on the wire

    def _rounds(self, kv: zkv.Store, target: Any) -> Iterator[None]:
        rng = random.Random(7)
        for _ in range(4):
            proc, _pid = _start(target, kv.endpoint, self.KEYS, self.SIZE)
            time.sleep(rng.uniform(0, 0.2))  # a random moment of its write loop
            _kill(proc)
            yield

    def test_set_many(self, kv: zkv.Store, client: zkv.Store) -> None:
        for _ in self._rounds(kv, generation_writer):
            values = client.get_many([f"gen:{i}" for i in range(self.KEYS)])
            assert len(values) == self.KEYS
            generations = {g for g, _pad in values.values()}
            assert len(generations) == 1, f"half-applied set_many: generations {generations}"
            _serves(client, "set_many")

    def test_pipeline(self, kv: zkv.Store, client: zkv.Store) -> None:
        for _ in self._rounds(kv, pipeline_writer):
            snapshot = client.get_all()
            generations = {snapshot[f"pipe:{i}"][0] for i in range(self.KEYS)}
            assert generations == {snapshot["pipe:count"]}, "half-applied pipeline"
            _serves(client, "pipeline")
            client.set("pipe:count", 0)
            client.set_many({f"pipe:{i}": (0, b"") for i in range(self.KEYS)})


# -- user code in the owner ------------------------------------------------------------------------

def _exit(value: Any) -> Any:
    sys.exit(3)


def _interrupt(view: Any) -> Any:
    raise KeyboardInterrupt


class _ExitsWhenUnpickled:
    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (4,))


class TestOwnerSurvivesUserCode:
    """A function run in the owner (modify, transact) or a pickle it loads may raise anything,
    SystemExit and KeyboardInterrupt included: the exception goes back to the caller, nothing
    changes, and the owner keeps serving."""

    def test_modify_raising_system_exit(self, kv: zkv.Store, client: zkv.Store) -> None:
        client.set("k", 1)
        with pytest.raises(SystemExit):
            client.modify("k", _exit)
        assert client.get("k") == 1
        _serves(client, "exit")

    def test_transact_raising_keyboard_interrupt(self, kv: zkv.Store,
                                                 client: zkv.Store) -> None:
        with pytest.raises(KeyboardInterrupt):
            client.transact(_interrupt)
        _serves(client, "interrupt")

    def test_pipelined_system_exit(self, kv: zkv.Store, client: zkv.Store) -> None:
        with pytest.raises(SystemExit):
            with client.pipeline() as p:
                p.set("a", 1)
                p.modify("k", _exit)
                p.set("b", 2)
        assert (client.get("a"), client.get("b")) == (1, 2)  # every operation ran
        _serves(client, "pipelined-exit")

    def test_unpickling_raises_system_exit(self, kv: zkv.Store, client: zkv.Store) -> None:
        ctx = zmq.Context()
        try:
            peer = ctx.socket(zmq.DEALER)
            peer.linger = 0
            peer.connect(kv.endpoint)
            fn = pickle.dumps(_ExitsWhenUnpickled())
            frames = wire.pack_sections([[b"k"], [fn], [pickle.dumps(None)]])
            peer.send_multipart([wire.pack_header(9, Op.MODIFY), *frames])
            assert peer.poll(10_000), "no answer: the owner's thread died"
            rid, status = wire.unpack_header(peer.recv_multipart()[0])
            assert (rid, status) == (9, Status.ERROR)
            peer.close()
        finally:
            ctx.term()
        _serves(client, "unpickle-exit")
