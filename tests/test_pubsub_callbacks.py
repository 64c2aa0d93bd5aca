"""Callbacks: ``@store.on_subscriber_receive`` and ``@store.on_change``.

Callbacks run on the process's dispatcher thread (never the publisher's), one at a time, in the
order the owner sequenced the messages. Coroutine functions run on zkv's event loop, or on one
handed over with ``loop=``, also in order. A callback that raises is logged and the others
still run. A callback may use the store (get, set, publish, register more callbacks) without
deadlock, in the owner and in children. ``remove_callback`` stops delivery.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
from typing import Any

import pytest

import zkv
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract


class TestThreadAndOrder:
    """Callbacks run off the publisher's thread, in order, on the dispatcher."""

    def test_owner_callbacks_run_on_the_dispatcher_in_order(self, kv: zkv.Store) -> None:
        calls: list[tuple[int, str]] = []

        def record(data: int) -> None:
            calls.append((data, threading.current_thread().name))

        assert kv.on_subscriber_receive("ch")(record) is record  # returned unchanged
        for i in range(500):
            kv.publish("ch", i)
        wait_for(lambda: len(calls) == 500, 20, what="500 callbacks")
        assert [data for data, _ in calls] == list(range(500))
        assert {name for _, name in calls} == {"zkv-dispatch"}

    def test_several_callbacks_of_one_message_run_in_registration_order(
            self, kv: zkv.Store) -> None:
        calls: list[tuple[str, int]] = []
        kv.on_subscriber_receive("ch")(lambda d: calls.append(("first", d)))
        kv.on_subscriber_receive("ch", prefix=True)(lambda d: calls.append(("prefix", d)))
        kv.on_subscriber_receive("ch")(lambda d: calls.append(("second", d)))
        kv.publish("ch", 1)
        kv.publish("chx", 2)
        wait_for(lambda: len(calls) == 4, 10)
        assert calls == [("first", 1), ("prefix", 1), ("second", 1), ("prefix", 2)]

    def test_child_callbacks_use_the_store_without_deadlock(self, kv: zkv.Store) -> None:
        fork, spawn = mp.get_context("fork"), mp.get_context("spawn")
        kv.set("base", 1000)
        procs = [fork.Process(target=_serving_child, args=("fork",)),
                 spawn.Process(target=_serving_child, args=("spawn",))]
        with kv.subscribe("done") as done:
            for proc in procs:
                proc.start()
            wait_for(lambda: kv.get("ready") == 2, 30, what="children registered")
            for i in range(50):
                kv.publish("job", i)
            replies = [done.receive(timeout=30) for _ in range(100)]
            for name in ("fork", "spawn"):
                assert [r[1] for r in replies if r[0] == name] == list(range(50))
                assert kv.get_many(f"result.{name}.{i}" for i in range(50)) == {
                    f"result.{name}.{i}": 1000 + i for i in range(50)}
            kv.publish("stop", True)
            for proc in procs:
                proc.join(30)
                assert proc.exitcode == 0
            assert kv["threads.fork"] == kv["threads.spawn"] == ["zkv-dispatch"]


def _serving_child(name: str) -> None:
    """Child: a callback that reads, writes and publishes through the store."""
    kv = zkv.store()
    threads: set[str] = set()

    @kv.on_subscriber_receive("job")
    def on_job(i: int) -> None:
        threads.add(threading.current_thread().name)
        kv.set(f"result.{name}.{i}", kv.get("base") + i)
        kv.publish("done", (name, i))

    with kv.subscribe("stop") as stop:
        kv.incr("ready")
        stop.receive(timeout=60)
    kv.set(f"threads.{name}", sorted(threads))


class TestUsingTheStoreFromCallbacks:
    """A callback in the owner may call the store, publish (even to its own channel) and
    register further callbacks."""

    def test_owner_callback_gets_sets_and_publishes(self, kv: zkv.Store) -> None:
        kv.set("n", 0)

        @kv.on_subscriber_receive("chain")
        def step(i: int) -> None:
            kv.set("n", kv.get("n") + 1)
            if i < 100:
                kv.publish("chain", i + 1)  # feeds itself

        with kv.subscribe("chain") as sub:
            kv.publish("chain", 0)
            assert [sub.receive(timeout=10) for _ in range(101)] == list(range(101))
        wait_for(lambda: kv.get("n") == 101, 10, what="101 steps")

    def test_callback_registers_another(self, kv: zkv.Store) -> None:
        seen: list[Any] = []
        registered = threading.Event()

        @kv.on_subscriber_receive("outer")
        def outer(data: Any) -> None:
            kv.on_subscriber_receive("inner")(seen.append)  # returns at once on this thread
            registered.set()

        kv.publish("outer", 1)
        assert registered.wait(10)
        # Live shortly after the registering callback returns: publish until it is.
        wait_for(lambda: kv.publish("inner", "hi") or seen, 10, what="inner callback live")
        assert set(seen) == {"hi"}


class TestCoroutineCallbacks:
    """Coroutine functions run on an event loop: zkv's, or one handed over with ``loop=``."""

    def test_coroutines_run_in_order_on_zkvs_loop(self, kv: zkv.Store) -> None:
        calls: list[tuple[int, str]] = []
        loops: set[int] = set()

        @kv.on_subscriber_receive("ch")
        async def record(data: int) -> None:
            loops.add(id(asyncio.get_running_loop()))
            await asyncio.sleep(0)  # interleaving must not reorder them
            calls.append((data, threading.current_thread().name))

        for i in range(200):
            kv.publish("ch", i)
        wait_for(lambda: len(calls) == 200, 20, what="200 coroutines")
        assert [data for data, _ in calls] == list(range(200))
        assert {name for _, name in calls} == {"zkv-asyncio"}
        assert len(loops) == 1

    def test_coroutines_run_on_a_loop_handed_over(self, kv: zkv.Store) -> None:
        async def main() -> list[Any]:
            loop = asyncio.get_running_loop()
            got: list[Any] = []
            finished = asyncio.Event()

            async def on_message(data: Any) -> None:
                assert asyncio.get_running_loop() is loop
                got.append(data)
                if data == "last":
                    finished.set()

            kv.on_subscriber_receive("ch", loop=loop)(on_message)
            for i in range(20):
                kv.publish("ch", i)
            kv.publish("ch", "last")
            await asyncio.wait_for(finished.wait(), 10)
            return got

        assert asyncio.run(main()) == [*range(20), "last"]

    def test_coroutine_callback_in_a_child(self, kv: zkv.Store) -> None:
        proc = mp.get_context("fork").Process(target=_async_child)
        with kv.subscribe("echo") as echo:
            proc.start()
            wait_for(lambda: kv.get("ready"), 30, what="child registered")
            for i in range(10):
                kv.publish("ask", i)
            assert [echo.receive(timeout=10) for _ in range(10)] == [i * 2 for i in range(10)]
            kv.publish("stop", True)
        proc.join(30)
        assert proc.exitcode == 0


def _async_child() -> None:
    kv = zkv.store()

    @kv.on_subscriber_receive("ask")
    async def ask(i: int) -> None:
        await asyncio.sleep(0)
        kv.publish("echo", i * 2)

    with kv.subscribe("stop") as stop:
        kv.set("ready", True)
        stop.receive(timeout=60)


class TestFailingCallbacks:
    """A callback that raises is logged with its traceback; the others still run, and it
    keeps receiving later messages."""

    def test_raising_callbacks_are_logged_and_others_run(
            self, kv: zkv.Store, caplog: pytest.LogCaptureFixture) -> None:
        good: list[int] = []
        bad_calls: list[int] = []
        async_good: list[int] = []

        @kv.on_subscriber_receive("ch")
        def bad(i: int) -> None:
            bad_calls.append(i)
            raise ValueError(f"bad {i}")

        @kv.on_subscriber_receive("ch")
        async def async_bad(i: int) -> None:
            raise KeyError(f"async bad {i}")

        kv.on_subscriber_receive("ch")(good.append)

        @kv.on_subscriber_receive("ch")
        async def async_ok(i: int) -> None:
            async_good.append(i)

        with caplog.at_level(logging.ERROR, "zkv"):
            for i in range(5):
                kv.publish("ch", i)
            wait_for(lambda: len(good) == 5 and len(async_good) == 5, 10)
            wait_for(lambda: len([r for r in caplog.records if "raised" in r.getMessage()])
                     == 10, 10, what="10 errors logged")
        assert bad_calls == good == async_good == list(range(5))
        errors = [r for r in caplog.records if "raised" in r.getMessage()]
        assert sum("bad 4" in str(r.exc_info[1]) for r in errors if r.exc_info) == 2
        assert all(r.exc_info is not None for r in errors)

    def test_raising_callback_in_a_child(self, kv: zkv.Store) -> None:
        proc = mp.get_context("fork").Process(target=_raising_child)
        with kv.subscribe("ok") as ok:
            proc.start()
            wait_for(lambda: kv.get("ready"), 30, what="child registered")
            for i in range(3):
                kv.publish("ch", i)
            assert [ok.receive(timeout=10) for _ in range(3)] == [0, 1, 2]
            kv.publish("stop", True)
        proc.join(30)
        assert proc.exitcode == 0
        logged = kv["logged"]
        assert len(logged) == 3 and all("ZeroDivisionError" in text for text in logged)


def _raising_child() -> None:
    kv = zkv.store()
    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(self.format(record))

    logging.getLogger("zkv").addHandler(Keep(logging.ERROR))
    kv.on_subscriber_receive("ch")(lambda i: 1 / 0)
    kv.on_subscriber_receive("ch")(lambda i: kv.publish("ok", i))
    with kv.subscribe("stop") as stop:
        kv.set("ready", True)
        stop.receive(timeout=60)
    kv.set("logged", logged)


class TestRemoveCallback:
    """``remove_callback`` stops delivery (a message being dispatched at that moment may still
    reach it); registering again starts afresh."""

    def test_removed_callback_gets_nothing_more(self, kv: zkv.Store) -> None:
        removed: list[int] = []
        kept: list[int] = []
        kv.on_subscriber_receive("ch")(removed.append)
        kv.on_subscriber_receive("ch")(kept.append)
        kv.publish("ch", 1)
        wait_for(lambda: kept == [1], 10)
        assert kv.remove_callback(removed.append) == 1
        assert kv.remove_callback(removed.append) == 0
        kv.publish("ch", 2)
        wait_for(lambda: kept == [1, 2], 10)
        assert removed == [1]

    def test_remove_callback_registered_for_several_channels(self, kv: zkv.Store) -> None:
        calls: list[Any] = []
        kv.on_subscriber_receive("a")(calls.append)
        kv.on_subscriber_receive("b")(calls.append)
        kv.on_change(prefix="k.")(calls.append)
        assert kv.remove_callback(calls.append) == 3
        # Witnesses, registered after: the dispatcher runs the callbacks of a message in the
        # order they were registered, so once the witnesses have seen all three messages, the
        # removed callback would have run before them.
        seen: list[Any] = []
        kv.on_subscriber_receive("a")(seen.append)
        kv.on_subscriber_receive("b")(seen.append)
        kv.on_change(prefix="k.")(seen.append)
        kv.publish("a", 1)
        kv.publish("b", 2)
        kv.set("k.x", 3)
        wait_for(lambda: len(seen) == 3, 10, what="the witnesses")
        assert seen[:2] == [1, 2] and seen[2].key == "k.x"
        assert calls == []

    def test_register_again_no_old_messages_no_false_losses(
            self, kv: zkv.Store, caplog: pytest.LogCaptureFixture) -> None:
        got: list[Any] = []
        kv.on_subscriber_receive("ch")(got.append)
        kv.publish("ch", "first")
        wait_for(lambda: got == ["first"], 10)
        kv.remove_callback(got.append)
        wait_for(lambda: kv.stats()["topics"] == 0, 10, what="unsubscribed at the owner")
        for i in range(5):  # published while nobody listens
            kv.publish("ch", i)
        kv.on_subscriber_receive("ch")(got.append)
        kv.publish("ch", "again")
        wait_for(lambda: len(got) >= 2, 10)
        assert got == ["first", "again"]
        assert kv.dropped == 0
        assert not [r for r in caplog.records if "lost" in r.getMessage()]
