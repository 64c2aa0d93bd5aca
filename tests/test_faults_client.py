"""A client that dies (SIGKILL) in the middle of a large set_many or pipeline leaves nothing
half-applied: each is applied entirely or not at all, and the owner keeps serving. User code
that the owner runs (modify, transact, unpickling) cannot stop the owner's thread, whatever it
raises. (Clients killed holding or waiting for a lock, or mid-request: tests/test_locks.py.)"""

from __future__ import annotations

import os
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
    generation_writer,
    pipeline_writer,
)
from _raw import say_hello

import zkv
from zkv import ops, wire
from zkv.wire import Status


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
            say_hello(peer)
            frames = ops.MODIFY.encode("k", _ExitsWhenUnpickled(), None)
            peer.send_multipart(wire.request(9, ops.MODIFY.code, frames))
            assert peer.poll(10_000), "no answer: the owner's thread died"
            reply = peer.recv_multipart()
            rid, status = wire.parse_reply(reply[0], reply[1:])[:2]
            assert (rid, status) == (9, Status.ERROR)
            peer.close()
        finally:
            ctx.term()
        _serves(client, "unpickle-exit")
