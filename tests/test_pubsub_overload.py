"""Overload: delivery is at-most-once, never silently.

A subscriber that stops reading fills its SUB socket's receive queue (RCVHWM) and then the
owner's send queue for it (XPUB SNDHWM), both set by the ``hwm`` option; past that the owner
drops its messages instead of waiting. The subscriber counts exactly what it lost from the
sequence numbers (``received + dropped == published``), logs a warning, and neither the owner
nor a subscriber that keeps up is slowed or loses anything.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from typing import Any

import pytest

import zkv
from zkv.testing import private_store, wait_for

HWM = 100
BATCH = HWM // 2  # a fast subscriber is never more than this behind
BATCHES = 60
PAYLOAD = b"x" * 1000  # big enough that the kernel's socket buffers hold few messages
MARK = "MARK"

# The owner is the only publisher on "flood", so message number j (from 0) has seq j + 1;
# marks carry their number too.


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _capture_warnings() -> _Warnings:
    handler = _Warnings()
    logging.getLogger("zkv").addHandler(handler)
    return handler


def _slow_subscriber(go: Any) -> None:
    """Subscribe, then read nothing until told to; then read up to the first mark."""
    kv = zkv.store()
    warnings = _capture_warnings()
    with kv.subscribe("flood") as sub:
        kv.set("slow.ready", True)
        assert go.wait(60)  # (an Event: no requests to the owner while it floods)
        received = 0
        while True:
            message = sub.receive_message(timeout=30)
            if isinstance(message.data, tuple):  # (MARK, j)
                break
            assert message.data == PAYLOAD
            received += 1
        kv.set("slow.result", {"received": received, "dropped": sub.dropped,
                               "mark": message.data, "seq": message.seq,
                               "warnings": warnings.messages})


def _fast_subscriber() -> None:
    """Read every message; after each batch, say so on the "ack" channel."""
    kv = zkv.store()
    with kv.subscribe("flood") as sub:
        kv.set("fast.ready", True)
        seqs = []
        for batch in range(BATCHES):
            for _ in range(BATCH):
                seqs.append(sub.receive_message(timeout=30).seq)
            kv.publish("ack", batch)
        kv.set("fast.result", {"seqs": seqs, "dropped": sub.dropped})


def _publish_marks_until(kv: zkv.Store, key: str, published: int) -> Any:
    """Publish marks until ``key`` is set (a mark is published after the reader drained
    its backlog, so the last gap shows); return the key's value."""
    count = [published]

    def mark_and_check() -> Any:
        kv.publish("flood", (MARK, count[0]))
        count[0] += 1
        return kv.get(key)

    return wait_for(mark_and_check, 30, interval=0.01, what=key)


class TestSlowSubscriber:
    """A subscriber that stops reading loses messages, counts them exactly and says so; the
    owner and a fast subscriber carry on and lose nothing."""

    @pytest.mark.timeout(90)
    def test_slow_child_loses_counts_and_warns_fast_ones_get_everything(self) -> None:
        fork = mp.get_context("fork")
        with private_store(hwm=HWM) as kv:
            go = fork.Event()
            slow = fork.Process(target=_slow_subscriber, args=(go,))
            fast = fork.Process(target=_fast_subscriber)
            slow.start()
            fast.start()
            with kv.subscribe("flood") as mine, kv.subscribe("ack") as acks:
                wait_for(lambda: kv.get("slow.ready") and kv.get("fast.ready"), 30,
                         what="children subscribed")
                own_seqs = []
                for batch in range(BATCHES):  # the slow child reads nothing meanwhile
                    for _ in range(BATCH):
                        kv.publish("flood", PAYLOAD)
                    own_seqs += [mine.receive_message(timeout=30).seq for _ in range(BATCH)]
                    assert acks.receive(timeout=30) == batch
                published = BATCHES * BATCH
                go.set()
                slow_result = _publish_marks_until(kv, "slow.result", published)
                fast.join(30)
                slow.join(30)
                assert fast.exitcode == 0 and slow.exitcode == 0

                # The owner's own subscriber and the fast child got everything, in order.
                everything = list(range(1, published + 1))
                assert own_seqs == everything and mine.dropped == 0
                assert kv["fast.result"] == {"seqs": everything, "dropped": 0}

                # The slow child lost most of it, and knows exactly how many.
                mark, j = slow_result["mark"]
                assert mark == MARK and j >= published and slow_result["seq"] == j + 1
                received, dropped = slow_result["received"], slow_result["dropped"]
                assert received + dropped == j  # every message before the mark
                assert dropped >= published - 20 * HWM  # at most queues + socket buffers kept
                assert received >= HWM  # at least its own queue was delivered
                assert slow_result["warnings"]
                assert f"lost {dropped} message(s)" in " ".join(slow_result["warnings"])
                assert "hwm=100" in slow_result["warnings"][0]


def _slow_callbacks(go_event: Any) -> None:
    """A callback that blocks until told to go, then counts messages up to the first mark."""
    kv = zkv.store()
    warnings = _capture_warnings()
    go = threading.Event()
    received: list[Any] = []
    done = threading.Event()

    @kv.on_subscriber_receive("flood")
    def on_flood(data: Any) -> None:
        go.wait(60)
        if isinstance(data, tuple):
            if not done.is_set():
                received.append(data)
                done.set()
            return
        received.append(None)

    kv.set("slow.ready", True)
    assert go_event.wait(60)  # (an Event: no requests to the owner while it floods)
    go.set()
    assert done.wait(30)
    mark = received.pop()
    kv.set("slow.result", {"received": len(received), "dropped": kv.dropped, "mark": mark,
                           "warnings": warnings.messages})


class TestSlowCallbacks:
    """A process whose callbacks fall behind loses messages, and ``store.dropped`` and a
    warning say exactly how many."""

    @pytest.mark.timeout(90)
    def test_blocked_callback_counts_exactly(self) -> None:
        fork = mp.get_context("fork")
        with private_store(hwm=HWM) as kv:
            go = fork.Event()
            slow = fork.Process(target=_slow_callbacks, args=(go,))
            slow.start()
            wait_for(lambda: kv.get("slow.ready"), 30, what="child registered")
            published = BATCHES * BATCH
            for _ in range(published):
                kv.publish("flood", PAYLOAD)
            go.set()
            result = _publish_marks_until(kv, "slow.result", published)
            slow.join(30)
            assert slow.exitcode == 0
            mark, j = result["mark"]
            assert mark == MARK and j >= published
            assert result["received"] + result["dropped"] == j
            assert result["dropped"] >= published - 20 * HWM
            assert any("zkv callbacks lost" in w for w in result["warnings"])


def _mark_until(kv: zkv.Store, mark: Any, reading: threading.Event) -> None:
    wait_for(lambda: kv.publish("flood", mark) or reading.is_set(), 30, interval=0.01)


class TestLossReports:
    """Every loss is reported: the warnings add up to ``dropped``, also when several gaps come
    within a second (the rest is reported by a later message or on close)."""

    def test_warnings_add_up_to_dropped(self, caplog: pytest.LogCaptureFixture) -> None:
        with private_store(hwm=HWM) as kv, caplog.at_level(logging.WARNING, "zkv"):
            sub = kv.subscribe("flood")
            published = 0
            overflows = 0
            for _round in range(10):  # separate overflows, well within a second
                before = sub.dropped
                for _ in range(30 * HWM):  # 1 kB each: more than the socket buffers hold
                    kv.publish("flood", (published, PAYLOAD))
                    published += 1
                mark = (MARK, _round)
                reading = threading.Event()
                marks = threading.Thread(target=_mark_until, args=(kv, mark, reading))
                marks.start()
                while sub.receive(timeout=30) != mark:
                    pass
                reading.set()
                marks.join()
                overflows += sub.dropped > before
                if overflows == 3:
                    break
            dropped = sub.dropped
            sub.close()
        assert overflows >= 2, "the subscriber never fell behind: the test proves nothing"
        assert 0 < dropped < published
        reported = [r.args[1] for r in caplog.records if "lost" in r.getMessage()]
        assert len(reported) >= 2
        assert sum(reported) == dropped  # type: ignore[arg-type]


STALLED = threading.Event()
RELEASE = threading.Event()


def _stall_owner(old: Any) -> Any:
    """A modify function: runs in the owner's poller thread (this module's events are the
    owner's there) and holds it until the test releases it."""
    STALLED.set()
    RELEASE.wait(30)
    return old


def _stall_child() -> None:
    zkv.store().modify("stall", _stall_owner)


def _flood_child(channel: str, count: int, go: Any, sent: Any) -> None:
    kv = zkv.store()
    kv.set("flooder.connected", True)
    assert go.wait(30)
    for i in range(count):
        kv.publish(channel, i)
    sent.set()


class TestSubscribingUnderOverload:
    """A subscription made while its queue overflows still goes live: the owner's welcome,
    dropped like any message, is probed for again."""

    def test_callback_registered_while_its_channel_floods(self) -> None:
        fork = mp.get_context("fork")
        STALLED.clear()
        RELEASE.clear()
        with private_store(hwm=10, timeout=5) as kv:
            # Hold the owner's poller thread, queue a flood on "other" for it, and register
            # a callback for "other": when the poller resumes it takes the flood and the
            # registration's probe together, and the welcome overflows the new queue.
            go, sent = fork.Event(), fork.Event()
            flooder = fork.Process(target=_flood_child, args=("other", 1000, go, sent))
            flooder.start()
            wait_for(lambda: kv.get("flooder.connected"), 10, what="flooder connected")
            staller = fork.Process(target=_stall_child)
            staller.start()
            assert STALLED.wait(10)
            go.set()
            assert sent.wait(10)
            seen: list[Any] = []
            errors: list[BaseException] = []

            def register() -> None:
                try:
                    kv.on_subscriber_receive("other")(seen.append)
                except BaseException as exc:
                    errors.append(exc)

            registrar = threading.Thread(target=register)
            registrar.start()
            wait_for(lambda: kv._dispatcher is not None and not kv._dispatcher._commands, 10,
                     what="the dispatcher subscribed")
            RELEASE.set()
            registrar.join(30)
            assert errors == []
            # The owner may take the registration's probe in the middle of the flood (it
            # serves its clients fairly, not in wall-clock order), and the flood may still
            # overflow the new queue: publish until a message gets through.
            wait_for(lambda: kv.publish("other", "hello") or "hello" in seen, 10,
                     what="the new callback ran")
            flood = [x for x in seen if x != "hello"]
            assert flood == sorted(flood)  # in order, whatever was not lost
            for proc in (staller, flooder):
                proc.join(30)
                assert proc.exitcode == 0


class TestHwmSetting:
    """The high-water mark is a setting: keyword, environment variable, default."""

    def test_hwm_from_keyword_environment_and_default(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert zkv.Options().hwm == 100_000
        monkeypatch.setenv("ZKV_HWM", "1234")
        assert zkv.Options.from_env().hwm == 1234
        assert zkv.Options.from_env({"hwm": 77}).hwm == 77
        with private_store() as kv:
            assert kv.options.hwm == 1234
        monkeypatch.setenv("ZKV_HWM", "lots")
        with pytest.raises(ValueError, match="ZKV_HWM"):
            zkv.Options.from_env()
