"""The fast paths of pub/sub deliver every message, in order, whole, however it is read.

A subscriber reads a message with one ``recv`` when its value is one small frame (it rides in
the message's first frame) and reads the value's other frames when there are some. Whatever
the value's layout (small, large, raw bytes, out-of-band buffers), however the subscriber
reads (``receive``, ``receive_message``, iteration, async iteration, callbacks, coroutine
callbacks) and wherever the publisher is (the owner, a worker), every message arrives once, in
order, equal to what was published, with its sequence number, and nothing is lost silently.
How fast is shown by ``zkv bench`` (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
from typing import Any

import pytest

import zkv
from zkv import wire
from zkv.errors import ProtocolError
from zkv.testing import wait_for

COUNT = 600
CHANNEL = "speed"
BIG = 100_000  # past the size a value's frame rides in the message's first frame


def _value(i: int) -> Any:
    """Message ``i``: every layout a value can travel in, in turn."""
    shape = i % 6
    if shape == 0:
        return (i, 67890, 3.5, "x" * 100)  # one small frame: rides in the first frame
    if shape == 1:
        return None
    if shape == 2:
        return bytes([i % 256]) * BIG  # raw bytes: an empty mark frame, then the bytes
    if shape == 3:
        return bytearray([i % 256]) * BIG  # pickle + an out-of-band buffer
    if shape == 4:
        return "y" * BIG + str(i)  # one large frame
    return {"i": i, "nested": [i, str(i)]}


MODES = ["receive", "receive_message", "iter", "async_iter", "callback", "coroutine"]


def _receive_all(kv: zkv.Store, mode: str, ready: Any) -> tuple[list[Any], list[int], int]:
    """Subscribe ``mode``'s way, say ready, read COUNT messages: (data, seqs, dropped)."""
    got: list[Any] = []
    seqs: list[int] = []
    if mode in ("callback", "coroutine"):
        done = threading.Event()

        def record(data: Any) -> None:
            got.append(data)
            if len(got) == COUNT:
                done.set()

        if mode == "coroutine":
            async def record_async(data: Any) -> None:
                record(data)
            kv.on_subscriber_receive(CHANNEL)(record_async)
        else:
            kv.on_subscriber_receive(CHANNEL)(record)
        ready.set()
        assert done.wait(60), f"{len(got)} of {COUNT} callbacks"
        return got, seqs, kv.dropped
    with kv.subscribe(CHANNEL) as sub:
        ready.set()
        if mode == "receive":
            got = [sub.receive(timeout=30) for _ in range(COUNT)]
        elif mode == "receive_message":
            for _ in range(COUNT):
                message = sub.receive_message(timeout=30)
                assert message.channel == CHANNEL
                got.append(message.data)
                seqs.append(message.seq)
        elif mode == "iter":
            for data in sub:
                got.append(data)
                if len(got) == COUNT:
                    break
        else:
            async def read() -> None:
                async for data in sub:
                    got.append(data)
                    if len(got) == COUNT:
                        return
            asyncio.run(asyncio.wait_for(read(), 60))
        return got, seqs, sub.dropped


def _receiving_child(mode: str, ready: Any) -> None:
    kv = zkv.store()
    got, seqs, dropped = _receive_all(kv, mode, ready)
    wrong = [i for i, data in enumerate(got) if data != _value(i)]
    kv.set("child.result", {"count": len(got), "wrong": wrong[:5], "seqs": seqs,
                            "dropped": dropped})
    kv.close()


def _publishing_child() -> None:
    kv = zkv.store()
    for i in range(COUNT):
        kv.publish(CHANNEL, _value(i))
    kv.close()


class TestEveryWayToReceive:
    """A child receives every message of every layout, in order, whole, each way it can
    read, from a publisher in the owner or in another child."""

    @pytest.mark.parametrize("publisher", ["owner", "worker"])
    @pytest.mark.parametrize("mode", MODES)
    def test_every_message_in_order(self, kv: zkv.Store, mode: str, publisher: str) -> None:
        spawn = mp.get_context("spawn")
        ready = spawn.Event()
        child = spawn.Process(target=_receiving_child, args=(mode, ready))
        child.start()
        wait_for(lambda: ready.is_set() or not child.is_alive(), 60, what="child subscribed")
        if publisher == "owner":
            for i in range(COUNT):
                kv.publish(CHANNEL, _value(i))
        else:
            worker = spawn.Process(target=_publishing_child)
            worker.start()
            worker.join(60)
            assert worker.exitcode == 0
        child.join(60)
        assert child.exitcode == 0
        result = kv["child.result"]
        assert result["count"] == COUNT
        assert result["wrong"] == []
        assert result["dropped"] == 0
        if mode == "receive_message":
            assert result["seqs"] == list(range(1, COUNT + 1))

    @pytest.mark.parametrize("mode", MODES)
    def test_in_the_owner(self, kv: zkv.Store, mode: str) -> None:
        ready = threading.Event()
        out: list[tuple[list[Any], list[int], int]] = []
        reader = threading.Thread(target=lambda: out.append(_receive_all(kv, mode, ready)))
        reader.start()
        assert ready.wait(30)
        for i in range(COUNT):
            kv.publish(CHANNEL, _value(i))
        reader.join(60)
        got, seqs, dropped = out[0]
        assert [i for i, data in enumerate(got) if data != _value(i)] == []
        assert len(got) == COUNT and dropped == 0
        if mode == "receive_message":
            assert seqs == list(range(1, COUNT + 1))


def _watching_child(ready: Any) -> None:
    kv = zkv.store()
    with kv.watch(prefix="w.") as watch:
        ready.set()
        changes = [watch.receive_message(timeout=30) for _ in range(4)]
    kv.set("child.changes", [(m.channel, m.seq, m.data.key, m.data.kind, m.data.value,
                              m.data.version) for m in changes])
    kv.close()


class TestChangeEvents:
    """Change events carry their key, kind, value (small or large) and version."""

    def test_small_large_and_deleted_values(self, kv: zkv.Store) -> None:
        spawn = mp.get_context("spawn")
        ready = spawn.Event()
        child = spawn.Process(target=_watching_child, args=(ready,))
        child.start()
        wait_for(lambda: ready.is_set() or not child.is_alive(), 60, what="child watching")
        kv.set("w.small", 1)
        kv.set("w.big", b"z" * BIG)
        kv.delete("w.small")
        kv.set("w.small", (1, "x"))
        version = kv.stats()["version"]
        child.join(60)
        assert child.exitcode == 0
        assert kv["child.changes"] == [
            ("w.small", 1, "w.small", "set", 1, version - 3),
            ("w.big", 1, "w.big", "set", b"z" * BIG, version - 2),
            ("w.small", 2, "w.small", "delete", None, version - 1),
            ("w.small", 3, "w.small", "set", (1, "x"), version),
        ]


class TestManyTopics:
    """A prefix subscription or callback that sees more channels than a subscriber keeps
    names for still gets every message with its channel's name."""

    def test_subscriber_and_callback_over_5000_channels(self, kv: zkv.Store) -> None:
        names = [f"p.{i}" for i in range(5000)]
        seen: list[Any] = []
        kv.on_subscriber_receive("p.", prefix=True)(seen.append)
        with kv.subscribe(prefix="p.") as sub:
            for i, name in enumerate(names):
                kv.publish(name, i)
            got = [sub.receive_message(timeout=30) for _ in names]
        assert [(m.channel, m.data, m.seq) for m in got] == [(n, i, 1) for i, n in
                                                              enumerate(names)]
        wait_for(lambda: len(seen) == len(names), 30, what="every callback")
        assert seen == list(range(len(names)))


class TestLayout:
    """Published messages decode to what was sent, whatever the value's frames."""

    @pytest.mark.parametrize("frames", [
        [], [b"p"], [b""], [b"", b"raw"], [b"p", b"buf"], [b"x" * BIG], [b"x" * BIG, b"y"],
        [memoryview(b"mv")],
    ], ids=["none", "one", "empty", "raw", "oob", "large", "large+1", "memoryview"])
    def test_round_trip(self, frames: list[Any]) -> None:
        topic = wire.topic(wire.CHANNEL_TOPIC, b"a\0b")
        sent = wire.published(topic, 7, 9, wire.Kind.MESSAGE, frames)
        assert wire.split_published(sent) == (topic, 7, 9, wire.Kind.MESSAGE,
                                              [bytes(f) for f in frames])

    def test_a_welcome_keeps_its_payload_apart(self) -> None:
        probe = wire.make_probe([wire.topic(wire.KEY_TOPIC, b"\0k")])
        sent = wire.published(probe, 0, 3, wire.Kind.WELCOME, [b"payload"])
        assert len(sent) == 2
        assert wire.split_published(sent) == (probe, 0, 3, wire.Kind.WELCOME, [b"payload"])

    @pytest.mark.parametrize("head", [b"", b"c", b"cname", b"cname\0short", b"w" + b"x" * 5])
    def test_malformed_heads_are_refused(self, head: bytes) -> None:
        with pytest.raises(ProtocolError):
            wire.parse_head(head)
