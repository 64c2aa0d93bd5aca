"""The client-side read cache: local repeated reads, never a stale value left behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

import pytest
from store_helpers import stop_process

import zkv
from zkv.testing import wait_for

CTX = mp.get_context("spawn")


def _cached_reader(q: Any, key: str, rounds: int) -> None:
    kv = zkv.store()
    kv.enable_cache("c.")
    first = kv.get(key)
    reads = [kv.get(key) for _ in range(rounds)]
    q.put((first, reads, kv.cache_info()))
    # Wait until another process's write becomes visible through the cache.
    deadline = time.monotonic() + 20
    while kv.get(key) == first and time.monotonic() < deadline:
        pass
    q.put(kv.get(key))


class TestCachedReads:
    """Repeated gets of a cached prefix are served locally and still see other writes."""

    def test_hits_are_local_and_invalidated_by_other_writers(self, kv: zkv.Store) -> None:
        kv["c.x"] = "old"
        q = CTX.Queue()
        proc = CTX.Process(target=_cached_reader, args=(q, "c.x", 1000))
        proc.start()
        first, reads, info = q.get(timeout=30)
        assert first == "old" and reads == ["old"] * 1000
        assert info["hits"] >= 1000 and info["misses"] == 1  # served from the cache
        kv["c.x"] = "new"  # the owner writes; the reader's cache must drop "old"
        assert q.get(timeout=30) == "new"
        proc.join(30)
        assert proc.exitcode == 0

    def test_owner_enable_cache_is_a_no_op(self, kv: zkv.Store) -> None:
        kv.enable_cache()
        kv["a"] = 1
        assert kv["a"] == 1
        assert kv.cache_info()["hits"] == 0

    def test_bad_arguments(self, kv: zkv.Store) -> None:
        with pytest.raises(TypeError):
            kv.enable_cache(3)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            kv.enable_cache("", max_entries=0)


def _read_your_writes(q: Any) -> None:
    kv = zkv.store()
    kv.enable_cache("")
    bad = 0
    for i in range(300):
        kv.set("c.mine", i)
        if kv.get("c.mine") != i:
            bad += 1
        kv.incr("c.count")
        if kv.get("c.count") != i + 1:
            bad += 1
        kv.modify("c.list", lambda v, i=i: [*v, i], default=[])
        if kv.get("c.list")[-1] != i:
            bad += 1
    kv.delete("c.mine")
    if kv.get("c.mine", "gone") != "gone":
        bad += 1
    with kv.pipeline() as p:
        p.set("c.p", 1)
    if kv.get("c.p") != 1:
        bad += 1
    kv.clear()
    if kv.get("c.count") is not None:
        bad += 1
    q.put(bad)


def _threads_read_your_writes(q: Any) -> None:
    import threading

    kv = zkv.store()
    kv.enable_cache("c.")
    kv.set("c.t", -1)
    stop = threading.Event()

    def reader() -> None:  # keeps replies to older reads in flight while the writer writes
        while not stop.is_set():
            kv.get("c.t")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    stale = 0
    for i in range(200):
        kv.set("c.t", i)
        if kv.get("c.t") != i:
            stale += 1
    stop.set()
    for t in threads:
        t.join()
    q.put(stale)


def _writer(key: str, count: int, progress: Any) -> None:
    kv = zkv.store()
    for i in range(count):
        progress[0] = i + 1  # shared memory: sets started...
        kv.set(key, i)
        progress[1] = i + 1  # ...and returned
    kv.set(key + ".done", True)


def _monotonic_reader(q: Any, key: str, progress: Any) -> None:
    kv = zkv.store()
    kv.enable_cache("c.")
    kv.get(key)
    q.put("ready")
    last = -1
    backwards = 0
    reads = 0
    overlapped = 0  # reads during which a set was under way
    seen = set()
    deadline = time.monotonic() + 30
    while (not kv.get(key + ".done", False) or last != kv.get(key)) \
            and time.monotonic() < deadline:
        returned_before = progress[1]
        value = kv.get(key, -1)
        reads += 1
        overlapped += progress[0] > returned_before  # one not returned had started by now
        seen.add(value)
        if value < last:
            backwards += 1
        last = max(last, value)
    q.put({"backwards": backwards, "last": last, "reads": reads, "overlapped": overlapped,
           "distinct": len(seen), "cache": kv.cache_info()})


class TestCoherence:
    """A process reads its own writes; a reply racing an invalidation never sticks."""

    def test_read_your_writes(self, kv: zkv.Store) -> None:
        q = CTX.Queue()
        proc = CTX.Process(target=_read_your_writes, args=(q,))
        proc.start()
        assert q.get(timeout=50) == 0
        proc.join(30)

    @pytest.mark.timeout(90)
    def test_read_your_writes_while_other_threads_read(self, kv: zkv.Store) -> None:
        q = CTX.Queue()
        proc = CTX.Process(target=_threads_read_your_writes, args=(q,))
        proc.start()
        assert q.get(timeout=80) == 0
        proc.join(30)

    @pytest.mark.timeout(90)
    def test_values_never_go_back_in_time(self, kv: zkv.Store) -> None:
        """Two caching readers spin on a key while another process overwrites it 2000 times:
        neither ever reads a value older than one it read before, and both end on the last."""
        kv["c.k"] = -1
        q = CTX.Queue()
        progress = CTX.Array("q", 2, lock=False)  # the writer's sets started, returned
        readers = [CTX.Process(target=_monotonic_reader, args=(q, "c.k", progress))
                   for _ in range(2)]
        for r in readers:
            r.start()
        assert [q.get(timeout=60) for _ in readers] == ["ready", "ready"]  # caching, reading
        writer = CTX.Process(target=_writer, args=("c.k", 2000, progress))
        writer.start()
        writer.join(60)
        assert writer.exitcode == 0
        results = [q.get(timeout=60) for _ in readers]
        for r in readers:
            r.join(30)
        for result in results:
            assert result["backwards"] == 0, result
            assert result["last"] == 1999, result  # the final write became visible
            # What makes it a race: the reader read while the writer wrote, saw many of its
            # values, and served reads from its cache in between invalidations.
            assert result["overlapped"] >= 10, result
            assert result["distinct"] >= 5, result
            assert result["cache"]["hits"] > 0 and result["cache"]["misses"] > 0, result


KEY = "c." + "k" * 2000 + ".{}"  # long keys: the backlog outgrows the kernel's socket buffers


def _idle_then_read(q: Any, go: Any) -> None:
    kv = zkv.store()
    kv.enable_cache("c.")
    for i in range(50):
        kv.get(KEY.format(i))
    q.put("cached")
    go.recv()  # the test stops this process meanwhile, and the owner overwrites everything
    # The owner's writes returned before its invalidations left it: they arrive within the
    # staleness window, or, those that were lost, through the sync that finds the loss.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        values = [kv.get(KEY.format(i)) for i in range(50)]
        if values == ["new39"] * 50:
            break
    q.put((values, kv.cache_info()))


class TestLostInvalidations:
    """Invalidations lost to the high-water mark drop the whole cache instead of going stale."""

    def test_overflow_flushes_the_cache(self) -> None:
        """The loss no later message can show: the last invalidations of a burst. The reader
        is stopped (SIGSTOP) while the owner writes, so that what reaches it is only the start
        of the burst, up to what its queues and the kernel hold (a few hundred of these
        messages; the rest is dropped); nothing after the loss arrives to show a gap in the
        numbering. Only the sync that a large backlog triggers can find it."""
        # hwm=200, not smaller: with a tiny hwm the owner may also drop the replies to the
        # reader's requests (see test_faults_limits.py, TestHighWaterMark).
        with zkv.testing.private_store(hwm=200) as kv:
            for i in range(50):
                kv[KEY.format(i)] = "old"
            q = CTX.Queue()
            go, go_child = CTX.Pipe(duplex=False)[::-1]  # (a pipe: no lock to hold when stopped)
            proc = CTX.Process(target=_idle_then_read, args=(q, go_child))
            proc.start()
            try:
                assert q.get(timeout=30) == "cached"
                assert proc.pid is not None
                stop_process(proc.pid)  # it reads nothing now, not even in ZeroMQ's threads
                try:
                    # Fill the reader's pipe with invalidations of other keys, then change the
                    # cached keys: all of their invalidations are lost, at the end.
                    for j in range(2000):
                        kv[KEY.format(f"filler{j}")] = j
                    for round_ in range(40):
                        for i in range(50):
                            kv[KEY.format(i)] = f"new{round_}"
                    go.send("go")
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                values, info = q.get(timeout=30)
                proc.join(30)
            finally:
                if proc.is_alive():
                    proc.kill()
            assert values == ["new39"] * 50
            assert info["flushes"] >= 1  # the loss was seen, not papered over


def _owner(ready: Any) -> None:
    kv = zkv.serve()
    kv["c.x"] = 1
    ready.put(kv.endpoint)
    threading.Event().wait()  # serve until killed


class TestOwnerDeath:
    """A cache never serves values once its owner is gone."""

    def test_cached_get_raises_owner_gone(self) -> None:
        q = CTX.Queue()
        owner = CTX.Process(target=_owner, args=(q,))
        owner.start()
        try:
            client = zkv.connect(q.get(timeout=30), timeout=60)
            client.enable_cache("c.")
            assert client.get("c.x") == 1
            assert client.get("c.x") == 1
            os.kill(owner.pid, signal.SIGKILL)
            owner.join(10)
            started = time.monotonic()

            def raises() -> bool:
                try:
                    client.get("c.x")
                except zkv.OwnerGoneError:
                    return True
                return False

            # Far under the client's 60 s timeout; a fraction of a second is expected.
            wait_for(raises, timeout=20, what="OwnerGoneError from a cached get")
            assert time.monotonic() - started < 20
            client.close()
        finally:
            if owner.is_alive():
                owner.kill()


class TestOrderingRules:
    """The rules that make replies and invalidations race safely, one case at a time."""

    @pytest.fixture
    def cache(self, kv: zkv.Store) -> Any:
        client = zkv.connect(kv.endpoint)
        client.enable_cache("c.")
        yield client._core._cache
        client.close()

    def test_reply_older_than_own_write_is_not_cached(self, cache: Any) -> None:
        from zkv import codec
        from zkv.cache import NOHIT

        cache.written(["c.k"], 100)
        assert cache.fill("c.k", 99, codec.dumps("old")) == "old"  # returned, not kept
        assert cache.lookup("c.k") is NOHIT
        cache.fill("c.k", 100, codec.dumps("new"))
        assert cache.lookup("c.k") == "new"

    def test_invalidation_before_reply(self, cache: Any) -> None:
        from zkv import codec
        from zkv.cache import NOHIT

        cache._invalidate("c.k", 50)
        cache.fill("c.k", 49, codec.dumps("stale"))
        assert cache.lookup("c.k") is NOHIT
        cache.fill("c.k", 50, codec.dumps("fresh"))
        assert cache.lookup("c.k") == "fresh"

    def test_invalidation_after_reply(self, cache: Any) -> None:
        from zkv import codec
        from zkv.cache import NOHIT

        cache.fill("c.k", 60, codec.dumps("v60"))
        cache._invalidate("c.k", 60)  # the change this value already reflects
        assert cache.lookup("c.k") == "v60"
        cache._invalidate("c.k", 61)
        assert cache.lookup("c.k") is NOHIT

    def test_values_are_copies(self, cache: Any) -> None:
        from zkv import codec

        cache.fill("c.list", 70, codec.dumps([1, 2]))
        got = cache.lookup("c.list")
        got.append(3)
        assert cache.lookup("c.list") == [1, 2]

    def test_uncovered_keys_are_not_cached(self, cache: Any) -> None:
        from zkv import codec
        from zkv.cache import NOHIT

        cache.fill("other", 80, codec.dumps(1))
        assert cache.lookup("other") is NOHIT
