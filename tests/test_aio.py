"""zkv.AsyncStore across real processes and sockets: it works in the owner and in workers of
every start method, never blocks the event loop, sends many requests of one loop at once, and
a timeout, a cancellation, a dead owner or a closed store leaves nothing behind: no request
half sent, no reply given to the wrong caller, no socket left open."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aio_helpers import LOOPS, LoopWatch, await_until, run, watched
from store_helpers import call_in_child, owner_process

import zkv
from zkv.aio.remote import AsyncRemoteCore, Channel
from zkv.testing import wait_for


def _channel(kv: zkv.AsyncStore) -> Channel:
    """The running loop's channel of a client AsyncStore."""
    core = kv._ready()
    assert isinstance(core, AsyncRemoteCore)
    return core.channel()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- across processes -------------------------------------------------------------------------

def _worker(n: int, path: str) -> dict[str, Any]:
    """A worker's whole async session with the process-wide store (a save to ``path``
    included)."""
    async def main() -> dict[str, Any]:
        kv = zkv.astore()
        await kv.set(f"worker:{n}", n)
        seeds = await asyncio.gather(*(kv.get(f"seed:{i}") for i in range(100)))
        async with kv.lock("workers", timeout=20):
            inside = await kv.incr("inside")
            await kv.set("inside", inside - 1)
        sub = await kv.subscribe(f"to:{n}")
        await kv.publish(f"to:{n}", ("hello", n))
        heard = await sub.areceive(20)
        sub.close()
        async with kv.pipeline() as p:
            p.incr("workers").get(f"worker:{n}")
        saved = await kv.save(path)
        scanned = sorted([key async for key in kv.scan("seed:", count=30)])
        listed = sorted(await kv.keys("seed:"))
        return {"owner": kv.is_owner, "seeds": seeds == list(range(100)), "heard": heard,
                "pipeline": p.results[1], "saved": saved.keys,
                "prefix": scanned == listed == sorted(await kv.get_all("seed:"))
                and len(listed) == 100}
    return run(main())


@pytest.mark.timeout(90)
def test_workers_of_every_start_method(kv: zkv.Store, mp_context: mp.context.BaseContext,
                                       tmp_path: Path) -> None:
    kv.set_many({f"seed:{i}": i for i in range(100)})
    got = call_in_child(mp_context, _worker, 7, str(tmp_path / "w.zkv"))
    assert got == {"owner": False, "seeds": True, "heard": ("hello", 7), "pipeline": 7,
                   "saved": 103, "prefix": True}
    assert kv["worker:7"] == 7 and kv["workers"] == 1 and kv["inside"] == 0
    assert len(zkv.snapshot.read(tmp_path / "w.zkv")) == 103


def _pool_task(n: int) -> int:
    async def main() -> int:
        kv = zkv.astore()
        return int(await kv.incr("pool"))
    return run(main())


@pytest.mark.timeout(60)
def test_a_pool_of_async_workers(kv: zkv.Store) -> None:
    with mp.get_context("fork").Pool(3) as pool:
        assert sorted(pool.map(_pool_task, range(30))) == list(range(1, 31))
    assert kv["pool"] == 30


def _forked_after_use() -> list[Any]:
    return run(_use_global("child"))


async def _use_global(who: str) -> list[Any]:
    kv = zkv.astore()
    await kv.set(who, os.getpid())
    return [kv.is_owner, await kv.get(who) == os.getpid()]


def test_a_store_used_before_fork_works_in_the_child(kv: zkv.Store) -> None:
    assert run(_use_global("parent")) == [True, True]
    assert call_in_child(mp.get_context("fork"), _forked_after_use) == [False, True]
    assert kv["child"] != os.getpid()


# -- the event loop is never blocked ----------------------------------------------------------

async def _busy_session(kv: zkv.AsyncStore, watch: LoopWatch) -> dict[str, Any]:
    """1,000 awaited operations, a subscription, and a wait for a lock that a thread of this
    process holds until the loop has ticked 30 times past the start of the wait."""
    await kv.open()
    sync = kv.sync
    for i in range(200):
        await kv.set(f"g:{i}", i)
        assert await kv.get(f"g:{i}") == i
        await kv.incr("g:n")
        await kv.modify("g:m", lambda v: (v or 0) + 1)
    for _ in range(8):
        assert await asyncio.gather(*(kv.get(f"g:{i}") for i in range(25))) == list(range(25))
    sub = await kv.subscribe("g:news")
    await kv.publish("g:news", "x")
    assert await sub.areceive(10) == "x"
    sub.close()

    held, waiting = threading.Event(), threading.Event()
    start: list[int] = []

    def holder() -> None:
        with sync.lock("g:lock"):
            held.set()
            waiting.wait(10)
            wait_for(lambda: watch.ticks >= start[0] + 30, what="30 ticks of the loop")

    thread = threading.Thread(target=holder)
    thread.start()
    await await_until(held.is_set, what="the lock taken by the thread")
    start.append(watch.ticks)
    waiting.set()
    async with kv.lock("g:lock", timeout=20):
        got = await kv.get("g:n")
    await await_until(lambda: not thread.is_alive(), what="the holder thread")
    return {"n": got}


async def _watched_session(kv: zkv.AsyncStore) -> tuple[dict[str, Any], float, str]:
    watch = LoopWatch()
    watch.start()
    try:
        result = await _busy_session(kv, watch)
    finally:
        await watch.stop()
    return result, watch.worst, watch.report()


def _session_in_worker(loop: str) -> tuple[dict[str, Any], float, str]:
    return run(_watched_session(zkv.astore()), loop)


LIMIT = 0.020  # seconds the loop may be kept from running (the 20 ms)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("where", ["owner", "worker"])
def test_the_event_loop_is_never_blocked(kv: zkv.Store, where: str, loop: str) -> None:
    if where == "owner":
        result, worst, report = run(_watched_session(zkv.AsyncStore(kv)), loop)
    else:
        result, worst, report = call_in_child(mp.get_context("fork"), _session_in_worker, loop)
    assert result == {"n": 200}
    assert worst < LIMIT, report


@pytest.mark.timeout(60)
def test_waiting_for_a_stopped_owner_never_stops_the_loop() -> None:
    """A worker's calls wait for an owner that does not answer (SIGSTOP): a get, a subscribe
    (its welcome), a lock wait, a publish; the loop ticks on meanwhile. (A call that blocked
    would stop the loop until its 3 s timeout.)"""
    with owner_process() as owner:
        async def main() -> tuple[list[Any], LoopWatch]:
            kv = zkv.aconnect(owner.endpoint, timeout=3)
            await kv.set("a", 1)
            owner.stop()
            watch = LoopWatch()
            watch.start()
            try:
                waiting = asyncio.gather(kv.get("a"), kv.subscribe("news"),
                                         kv.lock("L").acquire(), kv.publish("news", 1))
                await await_until(lambda: watch.ticks >= 100, what="100 ticks")
            finally:
                owner.resume()
            results = await waiting
            await watch.stop()
            results[1].close()
            await kv.close()
            return results, watch
        results, watch = run(main())
    assert results[0] == 1 and results[2] is True
    assert watch.worst < LIMIT, watch.report()


@pytest.mark.timeout(60)
def test_calls_in_the_owner_never_wait_for_a_busy_store(tmp_path: Path) -> None:
    """In the owner, while another thread holds the store (a long transact), awaited calls
    that need the store wait off the loop, and the loop ticks on."""
    with zkv.testing.private_store() as kv:
        inside, finish = threading.Event(), threading.Event()

        def long_transaction(view: Any) -> None:
            inside.set()
            finish.wait(20)
            view["t"] = 1

        async def main() -> tuple[list[Any], LoopWatch]:
            akv = zkv.AsyncStore(kv)
            thread = threading.Thread(target=kv.transact, args=(long_transaction,))
            thread.start()
            await await_until(inside.is_set, what="the transaction running")
            watch = LoopWatch()
            watch.start()
            try:
                waiting = asyncio.gather(akv.set("a", 1), akv.incr("n"), akv.get_many(["t"]),
                                         akv.len(), akv.save(tmp_path / "busy.zkv"))
                await await_until(lambda: watch.ticks >= 50, what="50 ticks")
                assert not waiting.done()  # they do wait for the store
            finally:
                finish.set()
            results = await waiting
            await watch.stop()
            await await_until(lambda: not thread.is_alive(), what="the transaction")
            return results, watch
        results, watch = run(main())
    assert results[1:3] == [1, {"t": 1}] and results[3] >= 1 and results[4].keys >= 1
    assert watch.worst < LIMIT, watch.report()


def test_the_watch_sees_a_blocked_loop() -> None:
    """The measure of the test above can fail: a blocking call in a coroutine shows."""
    async def blocking() -> None:
        await asyncio.sleep(0.01)
        threading.Event().wait(0.06)  # a blocking wait, as a sync call in a coroutine does
        await asyncio.sleep(0.01)

    async def busy() -> None:
        await asyncio.sleep(0.01)
        end = time.thread_time() + 0.06
        while time.thread_time() < end:  # computing
            pass
        await asyncio.sleep(0.01)

    for body in (blocking, busy):
        _result, watch = run(watched(body))
        assert watch.worst >= 0.05, watch.report()


# -- many requests in flight, cancellation, timeouts --------------------------------------------

@pytest.mark.timeout(60)
def test_gathered_gets_are_all_in_flight_at_once() -> None:
    """With the owner stopped, 100 gathered gets are all sent (none waits for another's
    reply); resumed, each gets its own value."""
    with owner_process() as owner:
        async def main() -> list[Any]:
            kv = zkv.aconnect(owner.endpoint)
            await kv.set_many({f"k{i}": i for i in range(100)})
            channel = _channel(kv)
            owner.stop()
            try:
                gathered = asyncio.gather(*(kv.get(f"k{i}") for i in range(100)))
                await await_until(lambda: len(channel.pending) == 100,
                                  what="100 requests in flight")
            finally:
                owner.resume()
            values = await gathered
            await kv.close()
            return values
        assert run(main()) == list(range(100))


@pytest.mark.timeout(60)
def test_cancelled_requests_leave_nothing_behind() -> None:
    """A request that times out (``wait_for``) or is cancelled while the owner does not
    answer: its late reply is recognised and dropped, the next request gets its own reply,
    and no socket or file descriptor is left over."""
    with owner_process() as owner:
        async def main() -> None:
            kv = zkv.aconnect(owner.endpoint)
            await kv.set("a", "first")
            channel = _channel(kv)
            fds = _open_fds()
            owner.stop()
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(kv.get("a"), 0.05)
                task = asyncio.ensure_future(kv.incr("count"))
                await await_until(lambda: len(channel.pending) == 1, what="the incr sent")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert not channel.pending
            finally:
                owner.resume()
            await kv.set("a", "second")
            assert await kv.get("a") == "second"  # not a late reply to an earlier get
            await await_until(lambda: channel.late == 2, what="the two late replies")
            assert await kv.get("count") == 1  # the cancelled incr had been sent whole
            assert _channel(kv) is channel and _open_fds() == fds
            await kv.close()
        run(main())


@pytest.mark.timeout(60)
def test_a_request_cancelled_while_waiting_to_be_sent_is_never_sent() -> None:
    """With the owner stopped, writes fill the socket's queue; those still waiting to be sent
    when cancelled are never applied, and the owner sees no half message."""
    with owner_process() as owner:
        async def main() -> tuple[int, int]:
            kv = zkv.aconnect(owner.endpoint)
            await kv.open()
            channel = _channel(kv)
            value = b"x" * 20_000
            owner.stop()
            try:
                tasks = [asyncio.ensure_future(kv.set(f"w{i}", value)) for i in range(3000)]
                await await_until(lambda: channel._blocked > 0, what="a full queue")
                sent = len(channel.pending)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                owner.resume()
            keys = await kv.keys("w")
            refused = (await kv.stats())["refused"]
            await kv.close()
            return sent, len(keys), refused
        sent, applied, refused = run(main())
    assert 0 < sent < 3000 and applied == sent and refused == 0


@pytest.mark.timeout(60)
def test_deadlines_are_absolute_and_a_dead_owner_is_noticed_at_once() -> None:
    with owner_process() as owner:
        async def main() -> None:
            slow = zkv.aconnect(owner.endpoint, timeout=0.3)
            patient = zkv.aconnect(owner.endpoint, timeout=60)
            await slow.open()
            await patient.open()
            owner.stop()
            started = time.monotonic()
            with pytest.raises(zkv.ZkvTimeoutError):
                await slow.get("a")
            assert 0.3 <= time.monotonic() - started < 5
            waiting = asyncio.gather(*(patient.get("a") for _ in range(10)),
                                     return_exceptions=True)
            await await_until(lambda: len(_channel(patient).pending) == 10, what="in flight")
            started = time.monotonic()
            owner.kill()
            results = await waiting
            assert all(isinstance(r, zkv.OwnerGoneError) for r in results), results
            assert time.monotonic() - started < 5  # not the 60 s timeout
            with pytest.raises(zkv.OwnerGoneError):
                await patient.set("a", 1)  # at once
            await patient.close()
            await slow.close()
        run(main())


# -- closing ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_closing_the_store_fails_waiting_calls_and_closes_every_socket() -> None:
    with owner_process() as owner:
        kv = zkv.aconnect(owner.endpoint)

        async def main() -> list[Any]:
            await kv.set("a", 1)
            owner.stop()
            waiting = asyncio.gather(*(kv.get("a") for _ in range(5)), return_exceptions=True)
            await await_until(lambda: len(_channel(kv).pending) == 5, what="in flight")
            kv.sync.close()  # the sync face, from this loop's thread
            return await waiting

        try:
            results = run(main())
        finally:
            owner.resume()
        assert all(isinstance(r, zkv.StoreClosedError) for r in results), results
        assert kv.closed


@pytest.mark.timeout(60)
def test_many_event_loops_one_store_no_leak(kv: zkv.Store) -> None:
    """Each ``asyncio.run`` has a loop of its own, each thread too: each gets a channel, the
    channels of closed loops are let go, and closing the store never hangs on them."""
    client = zkv.aconnect(kv.endpoint)

    async def use(n: int) -> int:
        return int(await client.incr("n", n))

    run(use(1))
    fds = _open_fds()
    for _ in range(20):
        run(use(1))
    # One channel at a time, not one per loop (ZeroMQ closes a socket's files a moment later).
    wait_for(lambda: _open_fds() <= fds + 2, what=f"{_open_fds()} files open, {fds} before")
    threads = [threading.Thread(target=lambda: [run(use(1)) for _ in range(5)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert kv["n"] == 1 + 20 + 20
    started = time.monotonic()
    client.sync.close()  # every loop is closed: their sockets are closed here
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_a_store_closed_from_another_thread_while_its_loop_runs(kv: zkv.Store) -> None:
    client = zkv.aconnect(kv.endpoint)
    ready, results = threading.Event(), []

    async def loop_body() -> None:
        await client.set("a", 1)
        ready.set()
        while True:
            try:
                await client.get("a")
            except zkv.StoreClosedError:
                results.append("closed")
                return

    thread = threading.Thread(target=lambda: run(loop_body()))
    thread.start()
    assert ready.wait(10)
    client.sync.close()
    thread.join(10)
    assert results == ["closed"] and not thread.is_alive()


# -- locks and subscriptions ------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["owner", "client"])
def test_a_cancelled_lock_wait_withdraws(kv: zkv.Store, where: str) -> None:
    akv = zkv.AsyncStore(kv) if where == "owner" else zkv.aconnect(kv.endpoint)
    holder = kv.lock("L")
    assert holder.acquire()

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(akv.lock("L").acquire(), 0.2)
        assert not await akv.lock("L").acquire(timeout=0.05)  # a timeout: False, as sync
        holder.release()
        # Nobody waits any more: the lock is free for the next one at once.
        other = kv.lock("L")
        await await_until(lambda: other.acquire(blocking=False), what="the lock free")
        other.release()
        await akv.close()
    run(main())


@pytest.mark.timeout(60)
def test_a_cancelled_subscribe_leaves_no_subscription(kv: zkv.Store) -> None:
    async def main() -> None:
        akv = zkv.AsyncStore(kv)
        task = asyncio.ensure_future(akv.subscribe("never-used"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watcher = await akv.watch(prefix="w:")
        await akv.set("w:1", 1)
        change = await watcher.areceive(10)
        assert (change.key, change.kind, change.value) == ("w:1", "set", 1)
        watcher.close()
    run(main())
    wait_for(lambda: kv.stats()["topics"] == 0, what="every subscription gone")


def _three_requests(endpoint: str) -> None:
    with zkv.connect(endpoint) as client:
        client.set("k", 1)
        client.incr("n")
        client.get("missing")


def test_monitor_sees_a_workers_requests(kv: zkv.Store) -> None:
    """await kv.monitor() in the owner describes what another process asks, in order."""
    async def main() -> list[tuple[str, str, str]]:
        akv = zkv.AsyncStore(kv)
        sub = await akv.monitor()
        await asyncio.to_thread(call_in_child, mp.get_context("spawn"), _three_requests,
                                kv.endpoint, timeout=60)
        events = [await sub.areceive(10) for _ in range(3)]
        sub.close()
        return [(e["op"], e["key"], e["status"]) for e in events]
    assert run(main()) == [("set", "k", "ok"), ("incr", "n", "ok"), ("get", "missing", "none")]
