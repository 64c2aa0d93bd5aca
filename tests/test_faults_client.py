"""A client that dies (SIGKILL) in the middle of a large set_many or pipeline leaves nothing
half-applied: each is applied entirely or not at all, and the owner keeps serving. User code
that the owner runs (modify, transact, unpickling) cannot stop the owner's thread, whatever it
raises, and its exception reaches the caller with the owner's traceback. (Clients killed
holding or waiting for a lock, or mid-request: tests/test_locks.py.)"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from _faultkit import generation_writer, mid_message_writer
from _raw import say_hello
from store_helpers import owner_process

import zkv
from zkv import ops, wire
from zkv.testing import wait_for
from zkv.wire import Status

FORK = mp.get_context("fork")
SIZE = 4096  # bytes per value
#: Keys per generation: each generation is one message of at least 1.6 MB, and at least 8
#: times what the kernel lets a socket have in flight (so a message can be caught half-way).
with open("/proc/sys/net/core/wmem_default") as _fh:
    KEYS = max(400, 8 * int(_fh.read()) // SIZE)


@pytest.fixture
def client(kv: zkv.Store) -> Iterator[zkv.Store]:
    """A client of the test's owner, in the test process (its requests go over the sockets)."""
    other = zkv.connect(kv.endpoint)
    yield other
    other.close()


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def _serves(client: zkv.Store, tag: str) -> None:
    client.set(f"alive:{tag}", tag)
    assert client.get(f"alive:{tag}") == tag


def _generations(client: zkv.Store, how: str) -> set[int]:
    """The generations found in the keys of :func:`_faultkit.write_generation` (one if the
    writes were whole), with the pipeline's own count of them."""
    if how == "set_many":
        values = client.get_many([f"gen:{i}" for i in range(KEYS)])
        assert len(values) == KEYS
        return {g for g, _pad in values.values()}
    snapshot = client.get_all()  # one atomic read
    return {snapshot[f"pipe:{i}"][0] for i in range(KEYS)} | {snapshot["pipe:count"]}


HOW = pytest.mark.parametrize("how", ["set_many", "pipeline"])


class TestKilledMidMessage:
    """Killed while its large set_many or pipeline is partly sent (the owner stopped, part of
    the message in the kernel, the rest still in the sender): nothing of it is applied, the
    previous one stays whole, and the owner serves on."""

    @HOW
    def test_partly_sent(self, how: str) -> None:
        # blob_threshold=0: the whole message goes through the socket, not through a file.
        with owner_process(blob_threshold=0) as owner:
            parent_end, child_end = FORK.Pipe()
            victim = FORK.Process(target=mid_message_writer,
                                  args=(owner.endpoint, how, KEYS, SIZE, child_end))
            victim.start()
            try:
                assert parent_end.poll(30) and parent_end.recv() == "written"
                owner.stop()
                parent_end.send("go")
                assert parent_end.poll(60), "the victim never reported"
                what, in_kernel = parent_end.recv()
                assert what == "mid-message"
                _kill(victim)  # the owner is still stopped: the message cannot have arrived
            finally:
                owner.resume()
                if victim.is_alive():
                    victim.kill()
            # Where the kill landed: part of the message had left, most of it had not.
            assert 0 < in_kernel < KEYS * SIZE // 2, in_kernel
            with zkv.connect(owner.endpoint, timeout=60) as client:
                assert _generations(client, how) == {2}, "a partly sent message was applied"
                _serves(client, how)
                assert client.stats()["refused"] == 0  # nothing torn reached zkv's code


class TestKilledAnywhere:
    """Killed at moments spread over its write loop (by files, the default for these sizes):
    each set_many or pipeline is applied entirely or not at all."""

    @HOW
    def test_all_or_nothing(self, kv: zkv.Store, client: zkv.Store, how: str) -> None:
        rng = random.Random(7)
        for _ in range(4):
            progress = FORK.Value("q", 0, lock=False)
            writer = FORK.Process(target=generation_writer,
                                  args=(kv.endpoint, how, KEYS, SIZE, progress))
            writer.start()
            # Odd: while the call for a generation runs; even: just after it returned.
            moment = rng.randrange(5, 24)
            try:
                wait_for(lambda p=progress, m=moment: p.value >= m, timeout=60,
                         interval=0.0005, what=f"the writer at step {moment}")
            finally:
                _kill(writer)
            generations = _generations(client, how)
            assert len(generations) == 1, f"half-applied {how}: generations {generations}"
            _serves(client, how)
            if how == "pipeline":  # the next writer starts from generation 1 again
                client.set("pipe:count", 0)
                client.set_many({f"pipe:{i}": (0, b"") for i in range(KEYS)})


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


def _refuse_in_owner(value: Any) -> Any:
    raise ValueError(f"refused {value!r} in pid {os.getpid()}")


def _abort_in_owner(view: Any) -> Any:
    view["half"] = "done"
    raise LookupError(f"aborted in pid {os.getpid()}")


class TestOwnerTraceback:
    """An exception raised by user code in the owner reaches the caller as itself, with the
    owner's traceback (which the caller never ran) as its ``__cause__``."""

    def test_modify_and_transact(self) -> None:
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=60)
            try:
                client.set("k", 1)
                for call, kind, where in (
                        (lambda: client.modify("k", _refuse_in_owner), ValueError,
                         "_refuse_in_owner"),
                        (lambda: client.transact(_abort_in_owner), LookupError,
                         "_abort_in_owner")):
                    with pytest.raises(kind, match=f"in pid {owner.pid}$") as info:
                        call()
                    exc = info.value
                    cause = exc.__cause__
                    assert cause is not None, "no owner traceback"
                    owner_side = str(cause)
                    # The owner's frames: the user function and the line that raised there.
                    assert "Owner traceback" in owner_side and "Traceback" in owner_side
                    assert f"in {where}" in owner_side and f"raise {kind.__name__}(" in owner_side
                    # ...and a printed traceback shows them, as the cause of the caller's error.
                    printed = "".join(traceback.format_exception(exc))
                    assert "direct cause of the following exception" in printed
                    assert printed.index(f"in {where}") < printed.index("direct cause")
                assert client.get("k") == 1 and "half" not in client  # nothing changed
            finally:
                client.close()
