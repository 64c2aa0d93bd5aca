"""Key expiry: ``set(key, value, ttl=...)``, ``expire``, ``ttl``, ``persist``.

An expired key is invisible at once to every read in every process; it is also removed in the
background, so memory does not grow with keys nobody reads; watchers get a change of kind
"expire"; the owner's clock decides.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _faultkit import OwnerProcess
from store_helpers import call_in_child, is_redis

import zkv
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

SPAWN = mp.get_context("spawn")


def _past(deadline: float) -> bool:
    return time.monotonic() > deadline


def _wait_until(deadline: float) -> None:
    """Wait for a moment to have passed (what expiry is about), and 2 ms more: Redis counts
    in whole milliseconds and expires a key once its millisecond is over, up to 1 ms after
    the deadline taken here."""
    wait_for(lambda: _past(deadline + 0.002), timeout=30, what="the deadline to pass")


@pytest.fixture
def frozen_purge(kv: zkv.Store) -> Iterator[None]:
    """No background removal in this test's owner: what a read sees, it saw by itself.
    (Redis removes expired keys on its own schedule, which zkv does not control.)"""
    if is_redis(kv):
        yield
        return
    state = kv._core.owner.state  # type: ignore[attr-defined]
    original = state.purge_expired
    state.purge_expired = lambda limit=None: 0
    yield
    state.purge_expired = original


class TestApi:
    """set with ttl, expire, ttl, persist; which operations keep a key's expiry."""

    def test_set_with_ttl_and_ttl(self, kv: zkv.Store) -> None:
        kv.set("a", 1, ttl=30)
        left = kv.ttl("a")
        assert left is not None and 29 < left <= 30
        kv.set("b", 2)
        assert kv.ttl("b") is None
        with pytest.raises(KeyError):
            kv.ttl("missing")

    def test_expire_persist(self, kv: zkv.Store) -> None:
        assert kv.expire("missing", 5) is False
        kv["a"] = 1
        assert kv.persist("a") is False  # no expiry to remove
        assert kv.expire("a", 10) is True and 9 < (kv.ttl("a") or 0) <= 10
        assert kv.persist("a") is True and kv.ttl("a") is None
        kv.set("a", 1, ttl=10)
        kv.set("a", 2)  # a set without ttl clears the expiry
        assert kv.ttl("a") is None

    def test_set_many_and_pipeline(self, kv: zkv.Store) -> None:
        kv.set_many({"x": 1, "y": 2}, ttl=20)
        assert all(19 < (kv.ttl(k) or 0) <= 20 for k in "xy")
        with kv.pipeline() as p:
            p.set("z", 3, ttl=15).expire("x", 40).persist("y").get("z")
        assert p.results == [None, True, True, 3]
        assert 14 < (kv.ttl("z") or 0) <= 15 and 39 < (kv.ttl("x") or 0) and kv.ttl("y") is None

    def test_read_modify_write_keeps_expiry(self, kv: zkv.Store) -> None:
        kv.set("n", 1, ttl=60)
        kv.incr("n")
        kv.modify("n", lambda v: v * 10)
        assert kv.compare_and_set("n", 20, 21)
        assert kv.setdefault("n", 0) == 21
        kv.transact(lambda m: m.__setitem__("n", m["n"] + 1))
        assert kv["n"] == 22 and 50 < (kv.ttl("n") or 0) <= 60
        kv.transact(lambda m: m.__setitem__("fresh", 1))
        assert kv.ttl("fresh") is None

    @pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), -float("inf")])
    def test_bad_ttl_values(self, kv: zkv.Store, bad: float) -> None:
        kv["k"] = "old"
        for call in (lambda: kv.set("k", "new", ttl=bad), lambda: kv.expire("k", bad),
                     lambda: kv.set_many({"k": "new"}, ttl=bad),
                     lambda: kv.pipeline().set("k", "new", ttl=bad)):
            with pytest.raises(ValueError, match="finite number of seconds > 0"):
                call()
        assert kv["k"] == "old" and kv.ttl("k") is None

    @pytest.mark.parametrize("bad", ["1", b"1", True, [1]])
    def test_bad_ttl_types(self, kv: zkv.Store, bad: Any) -> None:
        kv["k"] = "old"
        with pytest.raises(TypeError):
            kv.set("k", "new", ttl=bad)
        with pytest.raises(TypeError):
            kv.expire("k", bad)
        assert kv["k"] == "old" and kv.ttl("k") is None


def _reads_of_expired(endpoint: str) -> dict[str, Any]:
    """In another process: every kind of read of keys that have expired."""
    kv = zkv.connect(endpoint)
    if not zkv.backends.is_backend_url(endpoint):  # (Redis refuses the read cache)
        kv.enable_cache("c.")
    before = kv.get("c.cached")  # cached now
    return {
        "cached_before": before,
        "get": kv.get("gone", "default"),
        "in": "gone" in kv,
        "len": len(kv),
        "keys": sorted(kv),
        "get_all": kv.get_all(),
        "get_many": kv.get_many(["gone", "kept"]),
        "ttl_missing": _raises_key_error(lambda: kv.ttl("gone")),
        "pop": kv.pop("gone", "default"),
        "pipeline": kv.pipeline().get("gone", "default").execute(),
    }


def _raises_key_error(call: Any) -> bool:
    try:
        call()
    except KeyError:
        return True
    return False


class TestInvisible:
    """An expired key is invisible at once to every read, in every process, before the
    background removal comes by."""

    def test_in_the_owner(self, kv: zkv.Store, frozen_purge: None) -> None:
        kv["kept"] = 1
        kv.set("gone", "x", ttl=0.3)
        deadline = time.monotonic() + 0.3  # (after: the store stamped its expiry before)
        _wait_until(deadline)
        if not is_redis(kv):
            assert kv._core.owner.state.stored == 2  # type: ignore[attr-defined]  # still held
        assert kv.get("gone") is None and "gone" not in kv and len(kv) == 1
        assert sorted(kv) == ["kept"] and kv.get_all() == {"kept": 1}
        assert kv.get_many(["gone", "kept"]) == {"kept": 1}

    def test_in_other_processes(self, kv: zkv.Store, frozen_purge: None) -> None:
        kv["kept"] = 1
        kv["c.cached"] = "v"
        kv.set("gone", "x", ttl=1.0)
        kv.expire("c.cached", 1.0)
        deadline = time.monotonic() + 1.0  # (after: the store stamped its expiry before)
        _wait_until(deadline)
        report = call_in_child(SPAWN, _reads_of_expired, kv.endpoint)
        assert report == {
            "cached_before": None, "get": "default", "in": False, "len": 1,
            "keys": ["kept"], "get_all": {"kept": 1}, "get_many": {"kept": 1},
            "ttl_missing": True, "pop": "default", "pipeline": ["default"]}

    @pytest.mark.zkv_only("the read cache is refused on Redis")
    def test_cached_read_sees_the_expiry(self, kv: zkv.Store) -> None:
        """A value in a client's read cache is dropped when its key expires (the owner sends
        the invalidation)."""
        kv.set("c.k", "v", ttl=1.0)
        report = call_in_child(SPAWN, _cached_read_until_gone, kv.endpoint, timeout=60)
        assert report["first"] == "v" and report["hits"] > 0
        assert report["last"] is None


def _cached_read_until_gone(endpoint: str) -> dict[str, Any]:
    kv = zkv.connect(endpoint)
    kv.enable_cache("c.")
    first = kv.get("c.k")
    kv.get("c.k")
    hits = kv.cache_info()["hits"]
    wait_for(lambda: kv.get("c.k") is None, timeout=30, what="the cached key to expire")
    return {"first": first, "hits": hits, "last": kv.get("c.k")}


class TestAcrossProcesses:
    """Expiry set in any process, with any start method, is kept by the owner."""

    def test_children_set_and_read(self, kv: zkv.Store,
                                   mp_context: mp.context.BaseContext) -> None:
        assert call_in_child(mp_context, _set_with_ttl, "k", 30) is True
        left = kv.ttl("k")
        assert left is not None and 25 < left <= 30
        kv.expire("k", 0.5)
        deadline = time.monotonic() + 0.5  # (after: the store stamped its expiry before)
        _wait_until(deadline)
        assert call_in_child(mp_context, _get, "k") == "absent"


def _set_with_ttl(key: str, ttl: float) -> bool:
    kv = zkv.store()
    kv.set(key, "v", ttl=ttl)
    left = kv.ttl(key)
    return left is not None and ttl - 5 < left <= ttl


def _get(key: str) -> Any:
    return zkv.store().get(key, "absent")


class TestBackgroundRemoval:
    """Keys nobody reads are removed anyway: memory does not grow with short-lived keys."""

    @pytest.mark.timeout(120)
    def test_100000_short_lived_keys(self) -> None:
        payload = "x" * 100

        def round_(client: zkv.Store, owner: OwnerProcess, n: int) -> tuple[int, int]:
            """100,000 keys that live 0.5 s and that nobody reads: the owner's allocated
            Python memory blocks at the peak, and once the owner removed them by itself."""
            for batch in range(10):
                client.set_many({f"k{n}.{batch}.{i}": payload for i in range(10_000)},
                                ttl=0.5)
            peak = owner.blocks()
            assert owner.stats()["expiring"] == 100_000
            wait_for(lambda: owner.stats()["keys"] == 0, timeout=60,
                     what="expired keys removed in the background")
            assert owner.stats()["expiring"] == 0
            return peak, owner.blocks()

        with OwnerProcess() as owner:
            with zkv.connect(owner.endpoint, timeout=60) as client:
                round_(client, owner, 0)  # warm-up: the allocator's pools, ZeroMQ's buffers
                start = owner.blocks()
                rss_start = owner.status()["rss_kb"]
                rounds = [round_(client, owner, n) for n in (1, 2, 3)]
                rss_end = owner.status()["rss_kb"]
        for peak, after in rounds:
            assert peak - start > 200_000, (start, rounds)  # the keys did take memory ...
            assert after - start < (peak - start) / 20, (start, rounds)  # ... and gave it back
        # Resident memory (which the allocator gives back to the system only in part) does
        # not grow from round to round either.
        assert rss_end - rss_start < 16 * 1024, (rss_start, rss_end)


class TestWatchers:
    """Watchers get a change of kind "expire"; locks are not keys."""

    def test_expire_event(self, kv: zkv.Store) -> None:
        with kv.watch("k") as changes:
            kv.set("k", 1, ttl=0.2)
            assert changes.receive(timeout=10).kind == "set"
            change = changes.receive(timeout=10)  # nobody reads the key: the owner removes it
        assert (change.key, change.kind, change.value) == ("k", "expire", None)
        assert "k" not in kv

    def test_locks_are_not_affected(self, kv: zkv.Store) -> None:
        with kv.lock("k"):
            kv.set("k", 1, ttl=0.2)
            deadline = time.monotonic() + 0.2  # (after: the store stamped its expiry before)
            _wait_until(deadline)
            assert "k" not in kv
            assert not kv.lock("k").acquire(blocking=False)  # still held


OTHER_CLOCK = """
import sys, time, zkv
kv = zkv.connect(sys.argv[1])
kv.set("k", 1, ttl=30)
left = kv.ttl("k")
print(time.monotonic(), left)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (a time namespace)")
def test_the_owners_clock_decides(kv: zkv.Store) -> None:
    """A worker whose monotonic clock is a day ahead sets a key with a 30 s ttl: the key
    lives 30 s on the owner's clock, whatever the worker's says."""
    done = subprocess.run(
        ["unshare", "--time", "--monotonic", "86400", sys.executable, "-c",
         textwrap.dedent(OTHER_CLOCK), kv.endpoint],
        capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip("time namespaces are not permitted here")
    assert done.returncode == 0, done.stderr
    their_clock, left = (float(x) for x in done.stdout.split())
    assert their_clock > time.monotonic() + 80_000  # the worker's clock really is elsewhere
    assert 25 < left <= 30 and math.isclose(kv.ttl("k") or 0, left, abs_tol=5)
    assert kv["k"] == 1

