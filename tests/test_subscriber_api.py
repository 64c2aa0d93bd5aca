"""The pull-style Subscriber: receive with a timeout, messages with channel/data/seq, sync and
async iteration, and unsubscribe/close/context manager ending iteration -- in the owner and in
child processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
from typing import Any

import pytest

import zkv
from zkv.testing import private_store, wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract


class TestReceive:
    """``receive`` and ``receive_message`` wait up to a timeout; messages carry their
    channel, data and per-channel sequence number."""

    def test_timeout_raises_a_timeout_error(self, kv: zkv.Store) -> None:
        with kv.subscribe("quiet") as sub:
            with pytest.raises(TimeoutError):  # zkv.ZkvTimeoutError is one
                sub.receive(timeout=0.05)
            with pytest.raises(zkv.ZkvTimeoutError):
                sub.receive_message(timeout=0)

    def test_message_fields(self, kv: zkv.Store) -> None:
        with kv.subscribe("a", prefix="p.") as sub:
            kv.publish("a", {"x": 1})
            kv.publish("p.one", b"bytes")
            kv.publish("a", None)
            kv.publish("p.two", [1])
            messages = [sub.receive_message(timeout=10) for _ in range(4)]
        assert [(m.channel, m.data, m.seq) for m in messages] == [
            ("a", {"x": 1}, 1), ("p.one", b"bytes", 1), ("a", None, 2), ("p.two", [1], 1)]
        assert all(isinstance(m, zkv.Message) for m in messages)

    def test_sequence_numbers_continue_for_later_subscribers(self, kv: zkv.Store) -> None:
        with kv.subscribe("a") as first:
            kv.publish("a", 1)
            assert first.receive_message(timeout=10).seq == 1
            with kv.subscribe("a") as second:
                kv.publish("a", 2)
                assert first.receive_message(timeout=10).seq == 2
                assert second.receive_message(timeout=10).seq == 2
                assert first.dropped == second.dropped == 0

    def test_bad_arguments(self, kv: zkv.Store) -> None:
        with pytest.raises(ValueError):
            kv.subscribe()
        with pytest.raises(TypeError):
            kv.subscribe(b"bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            kv.publish(1, "x")  # type: ignore[arg-type]


class TestEndingSubscriptions:
    """``close``, ``unsubscribe`` and the context manager end iteration and receiving."""

    def test_iteration_ends_when_closed_from_another_thread(self, kv: zkv.Store) -> None:
        sub = kv.subscribe("ch")
        got: list[Any] = []

        def consume() -> None:
            got.extend(sub)  # runs until the subscriber is closed

        consumer = threading.Thread(target=consume)
        consumer.start()
        for i in range(3):
            kv.publish("ch", i)
        wait_for(lambda: len(got) == 3, 10)
        sub.unsubscribe()
        consumer.join(10)
        assert not consumer.is_alive()
        assert got == [0, 1, 2]
        assert sub.closed
        with pytest.raises(zkv.StoreClosedError):
            sub.receive(timeout=1)

    def test_closing_inside_the_loop_ends_it(self, kv: zkv.Store) -> None:
        got = []
        with kv.subscribe("ch") as sub:
            for i in range(5):
                kv.publish("ch", i)
            for data in sub:
                got.append(data)
                if data == 2:
                    sub.close()
            sub.close()  # idempotent
        assert got == [0, 1, 2]

    def test_context_manager_closes(self, kv: zkv.Store) -> None:
        with kv.subscribe("ch") as sub:
            assert not sub.closed
            assert "live" in repr(sub)
        assert sub.closed and "closed" in repr(sub)
        assert list(sub) == []

    def test_store_close_closes_its_subscribers(self) -> None:
        with private_store() as kv:
            sub = kv.subscribe("ch")
        assert sub.closed


class TestAsync:
    """``async for`` and ``areceive`` on an asyncio loop."""

    def test_async_iteration_and_areceive(self, kv: zkv.Store) -> None:
        async def main() -> tuple[list[Any], Any]:
            with kv.subscribe("ch") as sub:
                with pytest.raises(zkv.ZkvTimeoutError):
                    await sub.areceive(timeout=0.05)
                for i in range(5):
                    kv.publish("ch", i)
                got = []
                async for data in sub:
                    got.append(data)
                    if data == 3:
                        break
                last = await sub.areceive(timeout=10)
                return got, last

        assert asyncio.run(main()) == ([0, 1, 2, 3], 4)

    def test_async_iteration_ends_on_close(self, kv: zkv.Store) -> None:
        async def main() -> list[Any]:
            sub = kv.subscribe("ch")
            got: list[Any] = []

            async def consume() -> None:
                async for data in sub:
                    got.append(data)

            task = asyncio.ensure_future(consume())
            kv.publish("ch", "one")
            while not got:
                await asyncio.sleep(0.01)
            sub.close()
            await asyncio.wait_for(task, 10)
            return got

        assert asyncio.run(main()) == ["one"]

    def test_cancelling_the_task_still_cancels_it(self, kv: zkv.Store) -> None:
        async def main() -> bool:
            with kv.subscribe("ch") as sub:
                async def consume() -> None:
                    async for _data in sub:
                        pass

                task = asyncio.ensure_future(consume())
                await asyncio.sleep(0)  # let it start waiting
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # The subscriber is still usable.
                kv.publish("ch", "after")
                return bool(await sub.areceive(timeout=10) == "after")

        assert asyncio.run(main())


def _iterating_child() -> None:
    """Child: ``for`` and ``async for`` over subscribers until a marker; report."""
    kv = zkv.store()
    with kv.subscribe("sync") as sync_sub, kv.subscribe("async") as async_sub:
        kv.set("ready", True)
        got_sync = []
        for data in sync_sub:
            if data == "end":
                break
            got_sync.append(data)

        async def consume() -> list[Any]:
            out = []
            async for data in async_sub:
                if data == "end":
                    break
                out.append(data)
            return out

        got_async = asyncio.run(consume())
    kv.set("got", {"sync": got_sync, "async": got_async})


class TestInAChild:
    """Iteration works the same in a child process."""

    def test_sync_and_async_iteration_in_a_child(self, kv: zkv.Store) -> None:
        proc = mp.get_context("spawn").Process(target=_iterating_child)
        proc.start()
        wait_for(lambda: kv.get("ready"), 30, what="child subscribed")
        for channel in ("sync", "async"):
            for i in range(10):
                kv.publish(channel, (channel, i))
            kv.publish(channel, "end")
        proc.join(30)
        assert proc.exitcode == 0
        assert kv["got"] == {"sync": [("sync", i) for i in range(10)],
                             "async": [("async", i) for i in range(10)]}
