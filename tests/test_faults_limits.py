"""A message over the store's max_message_size (``serve(max_message_size=...)``,
``ZKV_MAX_MESSAGE_SIZE``) is refused in the sender with MessageTooLargeError before anything is
sent, and changes nothing; a raw peer that sends an oversized frame anyway is disconnected by
ZeroMQ, and the owner keeps serving everyone else."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
import zmq.utils.monitor

import zkv
from zkv import ops, wire
from zkv.testing import private_store

LIMIT = 16 * 1024  # under the 64 KiB at which values travel as frames of their own


@pytest.fixture
def small() -> Iterator[zkv.Store]:
    """An owner that accepts messages of at most LIMIT bytes."""
    with private_store(max_message_size=LIMIT) as owner:
        yield owner


@pytest.fixture
def client(small: zkv.Store) -> Iterator[zkv.Store]:
    """A client that was told nothing: it learns the owner's limit when it connects."""
    other = zkv.connect(small.endpoint)
    yield other
    other.close()


def _keep(big: bytes, value: Any) -> Any:
    return (len(big), value)


class TestRefusedInTheSender:
    """Every way of sending too much raises MessageTooLargeError, names the limit, and
    changes nothing."""

    @pytest.mark.parametrize("size", [LIMIT + 1, 100_000])  # one small frame, one raw frame
    def test_set(self, client: zkv.Store, small: zkv.Store, size: int) -> None:
        with pytest.raises(zkv.MessageTooLargeError, match=f"max_message_size.*{LIMIT}"):
            client.set("big", b"x" * size)
        assert "big" not in small
        client.set("big", b"x" * (LIMIT // 2))  # under the limit: fine
        assert len(small["big"]) == LIMIT // 2

    def test_long_key(self, client: zkv.Store) -> None:
        with pytest.raises(zkv.MessageTooLargeError):
            client.get("k" * (LIMIT + 1))

    def test_publish(self, client: zkv.Store) -> None:
        with client.subscribe("news") as sub:
            with pytest.raises(zkv.MessageTooLargeError):
                client.publish("news", "x" * (LIMIT + 1))
            client.publish("news", "small")
            assert sub.receive(timeout=10) == "small"  # the big one was never sent

    def test_set_many_and_pipeline(self, client: zkv.Store, small: zkv.Store) -> None:
        many = {f"k{i}": bytes([i]) * 1024 for i in range(32)}  # each small, together too big
        with pytest.raises(zkv.MessageTooLargeError):
            client.set_many(many)
        with pytest.raises(zkv.MessageTooLargeError):
            with client.pipeline() as p:
                for key, value in many.items():
                    p.set(key, value)
        assert len(small) == 0

    def test_modify_with_a_big_closure(self, client: zkv.Store, small: zkv.Store) -> None:
        client.set("k", 1)
        with pytest.raises(zkv.MessageTooLargeError):
            client.modify("k", functools.partial(_keep, b"x" * (LIMIT + 1)))
        assert small["k"] == 1

    def test_limit_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ZKV_MAX_MESSAGE_SIZE", str(LIMIT))
        with private_store() as owner:
            assert owner.options.max_message_size == LIMIT
            monkeypatch.delenv("ZKV_MAX_MESSAGE_SIZE")
            other = zkv.connect(owner.endpoint)  # its own default is 1 GiB; the owner's wins
            try:
                with pytest.raises(zkv.MessageTooLargeError):
                    other.set("big", b"x" * (LIMIT + 1))
            finally:
                other.close()

    @pytest.mark.parametrize("bad", [0, -1, 1.5, "big", True])
    def test_bad_limit(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="max_message_size"):
            zkv.Options(max_message_size=bad)


def _disconnected(sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> bool:
    while monitor.poll(10_000):
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


@pytest.mark.parametrize("where", ["r", "p"])
def test_raw_oversized_frame_disconnects_the_sender(small: zkv.Store, client: zkv.Store,
                                                    where: str) -> None:
    """A peer that skips the check: ZeroMQ drops its connection at the oversized frame; the
    owner never sees the message and keeps serving."""
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER if where == "r" else zmq.XSUB)
        sock.linger = 0
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(small.endpoint[:-1] + where)
        if where == "r":
            sock.send_multipart([wire.pack_header(1, ops.SET.code), b"big", b"",
                                 b"x" * (LIMIT + 1)])
        else:
            sock.send(b"\x01" + b"k" * (LIMIT + 1))  # an oversized subscription
        assert _disconnected(sock, monitor), "the oversized sender was not disconnected"
        sock.disable_monitor()
        monitor.close()
        sock.close()
    finally:
        ctx.term()
    assert "big" not in small
    assert small.stats()["topics"] == 0
    client.set("after", 1)
    assert client.get("after") == 1


class TestHighWaterMark:
    """``hwm`` bounds what waits for a client socket that does not read; a client that reads
    its replies never loses one, whatever the hwm (a request has one reply outstanding)."""

    def test_replies_are_not_dropped_while_the_owner_is_busy(self) -> None:
        with private_store(hwm=1) as owner:
            owner["k"] = 1
            stop = threading.Event()
            publisher = zkv.connect(owner.endpoint)

            def publish_flat_out() -> None:
                n = 0
                while not stop.is_set():
                    try:
                        publisher.publish("noise", n)
                    except zkv.ZkvTimeoutError:  # (its queue to the owner full a whole timeout)
                        pass
                    n += 1

            flood = threading.Thread(target=publish_flat_out)
            flood.start()
            try:
                with zkv.connect(owner.endpoint, timeout=2) as client:
                    for _ in range(2000):  # it has always failed within 100
                        assert client.get("k") == 1
            finally:
                stop.set()
                flood.join(30)
                publisher.close()
