"""Fan-out, exact channel matching and one order, across real processes.

Every subscribed process (the owner and 4+ children) receives every message of its channels,
exactly once and in the same order; "news" never receives "newsletter" (nor "news\\0x") unless
it asked for the prefix; all publishes, from any process or thread, fall in one order that
keeps each publishing thread's own order; a publisher subscribed to its channel receives its
own messages.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

import pytest

import zkv
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

STOP = "STOP"
CHILDREN = 4


def _record(name: str, channels: list[str], prefix: str | None = None) -> None:
    """Child: subscribe, say ready, record every (channel, data, seq) until a STOP message."""
    kv = zkv.store()
    with kv.subscribe(*channels, prefix=prefix) as sub:
        kv.incr("ready")
        got = []
        while True:
            message = sub.receive_message(timeout=30)
            if message.data == STOP:
                break
            got.append((message.channel, message.data, message.seq))
        kv.set(f"got.{name}", {"messages": got, "dropped": sub.dropped})


def _drain(sub: zkv.Subscriber) -> list[tuple[str, Any, int]]:
    got = []
    while True:
        message = sub.receive_message(timeout=30)
        if message.data == STOP:
            return got
        got.append((message.channel, message.data, message.seq))


def _start(ctx: Any, target: Any, *args: Any) -> mp.process.BaseProcess:
    proc = ctx.Process(target=target, args=args)
    proc.start()
    return proc


def _join_all(procs: list[mp.process.BaseProcess]) -> None:
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"


class TestFanOut:
    """Every subscribed process receives every message, the same ones in the same order."""

    def test_owner_and_children_receive_every_message(
            self, kv: zkv.Store, mp_context: mp.context.BaseContext) -> None:
        procs = [_start(mp_context, _record, f"c{i}", ["ch"]) for i in range(CHILDREN)]
        with kv.subscribe("ch") as mine:
            wait_for(lambda: kv.get("ready") == CHILDREN, 30, what="children subscribed")
            count = 2000
            for i in range(count):
                kv.publish("ch", i)
            kv.publish("ch", STOP)
            expected = [("ch", i, i + 1) for i in range(count)]
            assert _drain(mine) == expected
        _join_all(procs)
        for i in range(CHILDREN):
            assert kv[f"got.c{i}"] == {"messages": expected, "dropped": 0}

    def test_messages_published_by_a_child_reach_every_process(self, kv: zkv.Store) -> None:
        ctx = mp.get_context("fork")
        procs = [_start(ctx, _record, f"c{i}", ["ch"]) for i in range(CHILDREN)]
        with kv.subscribe("ch") as mine:
            wait_for(lambda: kv.get("ready") == CHILDREN, 30, what="children subscribed")
            # It publishes 1000 messages and STOP, and exits at once: nothing may be lost.
            publisher = _start(ctx, _publish_then_exit, "ch", 1000, STOP)
            _join_all([publisher])
            expected = [("ch", i, i + 1) for i in range(1000)]
            assert _drain(mine) == expected
        _join_all(procs)
        for i in range(CHILDREN):
            assert kv[f"got.c{i}"]["messages"] == expected


def _publish_then_exit(channel: str, count: int, last: Any = None) -> None:
    kv = zkv.store()
    for i in range(count):
        kv.publish(channel, i)
    if last is not None:
        kv.publish(channel, last)
    else:  # a round trip on the same socket: the owner has taken the publishes before it
        kv.incr(f"done.{channel}")


class TestExactMatching:
    """A channel subscription matches that exact name; prefixes are asked for explicitly."""

    CHANNELS = ["news", "newsletter", "news\0x", "new", "news.sport", "News", "n"]

    def test_exact_and_prefix_subscribers_in_owner_and_children(
            self, kv: zkv.Store, request: pytest.FixtureRequest) -> None:
        ctx = mp.get_context("fork")
        procs = [_start(ctx, _record, "exact", ["news"]),
                 _start(ctx, _record, "prefix", [], "news"),
                 _start(ctx, _record, "both", ["new", "news"], "news.")]
        exact = kv.subscribe("news")
        prefix = kv.subscribe(prefix="news")
        request.addfinalizer(exact.close)
        request.addfinalizer(prefix.close)
        wait_for(lambda: kv.get("ready") == 3, 30, what="children subscribed")
        for round_ in range(3):
            for channel in self.CHANNELS:
                kv.publish(channel, (channel, round_))
        for channel in ("news", "new"):  # ends every subscription above
            kv.publish(channel, STOP)

        def expected(match: Any) -> list[str]:
            return [c for _ in range(3) for c in self.CHANNELS if match(c)]

        got_exact = [m[0] for m in _drain(exact)]
        got_prefix = [m[0] for m in _drain(prefix)]
        _join_all(procs)
        assert got_exact == expected(lambda c: c == "news")
        assert got_prefix == expected(lambda c: c.startswith("news"))
        assert "newsletter" in got_prefix and "news\0x" in got_prefix
        assert [m[0] for m in kv["got.exact"]["messages"]] == got_exact
        assert [m[0] for m in kv["got.prefix"]["messages"]] == got_prefix
        # "both" stopped at the first STOP (on "news"); it never saw "newsletter".
        both = [m[0] for m in kv["got.both"]["messages"]]
        assert both == expected(lambda c: c in ("new", "news") or c.startswith("news."))

    def test_prefix_matching_is_by_characters_not_words(self, kv: zkv.Store) -> None:
        with kv.subscribe(prefix=["a.", "é"]) as sub:
            for channel in ["a", "a.", "a.b", "ab", "é", "éa", "e"]:
                kv.publish(channel, channel)
            kv.publish("a.", STOP)
            assert [m[1] for m in _drain(sub)] == ["a.", "a.b", "é", "éa"]


def _publish_and_record(name: str, threads: int, count: int) -> None:
    """Child: subscribe to "order", publish ``count`` messages from each of ``threads`` threads
    (each thread then counts itself done, on its own socket, so after its publishes), and record
    everything until STOP."""
    kv = zkv.store()
    with kv.subscribe("order") as sub:
        kv.incr("ready")
        wait_for(lambda: kv.get("go"), 30, what="go")

        def publish(thread: int) -> None:
            for i in range(count):
                kv.publish("order", (name, thread, i))
            kv.incr("published")

        workers = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        got = _drain(sub)
        for worker in workers:
            worker.join()
    kv.set(f"got.{name}", got)


class TestOneOrder:
    """All publishes, from every process and thread, are seen by everyone in one order."""

    @pytest.mark.timeout(90)
    def test_publishes_from_many_processes_and_threads(
            self, kv: zkv.Store, request: pytest.FixtureRequest) -> None:
        ctx = mp.get_context("fork")
        threads, count = 2, 300
        names = [f"p{i}" for i in range(CHILDREN)]
        procs = [_start(ctx, _publish_and_record, name, threads, count) for name in names]
        mine = kv.subscribe("order")
        request.addfinalizer(mine.close)
        wait_for(lambda: kv.get("ready") == CHILDREN, 30, what="children subscribed")
        kv.set("go", True)

        def publish(thread: int) -> None:
            for i in range(count):
                kv.publish("order", ("owner", thread, i))
            kv.incr("published")

        workers = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wait_for(lambda: kv.get("published") == (CHILDREN + 1) * threads, 30,
                 what="every thread published")
        kv.publish("order", STOP)
        got = _drain(mine)
        _join_all(procs)

        total = (CHILDREN + 1) * threads * count
        assert [seq for _c, _d, seq in got] == list(range(1, total + 1))
        for name in names:
            assert kv[f"got.{name}"] == got  # the same sequence everywhere
        by_thread: dict[tuple[str, int], list[int]] = {}
        for _channel, (publisher, thread, i), _seq in got:
            by_thread.setdefault((publisher, thread), []).append(i)
        assert len(by_thread) == (CHILDREN + 1) * threads
        for sequence in by_thread.values():  # each thread's messages in its own order
            assert sequence == list(range(count))
        # Publishers received their own messages (they are in `got` of each child above).
        assert {p for p, _t in by_thread} == {"owner", *names}

    def test_owner_receives_its_own_messages_interleaved_with_a_child(
            self, kv: zkv.Store) -> None:
        with kv.subscribe("self") as sub:
            kv.publish("self", "first")
            proc = _start(mp.get_context("fork"), _publish_then_exit, "self", 3)
            _join_all([proc])
            assert kv["done.self"] == 1
            kv.publish("self", "last")
            data = [sub.receive(timeout=10) for _ in range(5)]
        assert data == ["first", 0, 1, 2, "last"]


def _publish_from_a_thread_that_ends(count: int) -> None:
    kv = zkv.store()
    payload = b"x" * 20_000
    publisher = threading.Thread(target=lambda: [kv.publish("big", payload)
                                                 for _ in range(count)])
    publisher.start()
    publisher.join()
    kv.incr("after")  # a new thread's first request: the ended thread's socket is reaped


class TestNoSilentLoss:
    """Without overload nothing is lost: what a thread published before it ended arrives."""

    def test_publishes_of_an_ended_thread_are_delivered(self, kv: zkv.Store) -> None:
        count = 2000
        with kv.subscribe("big") as sub:
            proc = _start(mp.get_context("fork"), _publish_from_a_thread_that_ends, count)
            for _ in range(count):
                assert len(sub.receive(timeout=20)) == 20_000
            _join_all([proc])
            assert sub.dropped == 0
