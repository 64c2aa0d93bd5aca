"""Prefix queries: ``keys(prefix=)``, ``get_all(prefix=)``, ``delete_prefix(prefix)`` and
``scan(prefix=, count=)``, in the owner and in other processes. A prefix matches on the key
string exactly (NUL and lone surrogates included), as ``watch(prefix=)`` and
``enable_cache(prefix=)`` do."""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

import pytest
from store_helpers import call_in_child

import zkv
from zkv import ops

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

SPAWN = mp.get_context("spawn")
KEYS = ["a", "a\0", "a\0b", "ab", "abc", "b", "", "\udcffx", "\udcff"]


def _fill(kv: zkv.Store) -> None:
    kv.set_many({key: i for i, key in enumerate(KEYS)})


def _expected(prefix: str) -> list[str]:
    return sorted(k for k in KEYS if k.startswith(prefix))


def _queries(prefixes: list[str]) -> dict[str, Any]:
    """In any process: every prefix query for each prefix (keys sorted for comparison)."""
    kv = zkv.store()
    out: dict[str, Any] = {}
    for prefix in prefixes:
        out[f"keys {prefix!r}"] = sorted(kv.keys(prefix))
        out[f"get_all {prefix!r}"] = sorted(kv.get_all(prefix).items())
        out[f"scan {prefix!r}"] = sorted(kv.scan(prefix, count=2))
    return out


PREFIXES = ["", "a", "a\0", "ab", "b", "\udcff", "zz"]


class TestQueries:
    """keys, get_all and scan with a prefix give exactly the keys that start with it."""

    def _check(self, report: dict[str, Any]) -> None:
        for prefix in PREFIXES:
            keys = _expected(prefix)
            assert report[f"keys {prefix!r}"] == keys, prefix
            assert report[f"get_all {prefix!r}"] == [(k, KEYS.index(k)) for k in keys], prefix
            assert report[f"scan {prefix!r}"] == keys, prefix

    def test_in_the_owner(self, kv: zkv.Store) -> None:
        _fill(kv)
        self._check(_queries(PREFIXES))

    def test_in_a_child(self, kv: zkv.Store, mp_context: mp.context.BaseContext) -> None:
        _fill(kv)
        self._check(call_in_child(mp_context, _queries, PREFIXES))

    def test_bad_prefix(self, kv: zkv.Store) -> None:
        for call in (lambda: kv.keys(1), lambda: kv.get_all(b"a"),  # type: ignore[arg-type]
                     lambda: list(kv.scan(None)), lambda: kv.delete_prefix(3)):  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="prefix"):
                call()
        with pytest.raises(ValueError, match="count"):
            kv.scan("", count=0)


def _delete_prefix(prefix: str) -> int:
    return zkv.store().delete_prefix(prefix)


class TestDeletePrefix:
    """delete_prefix removes exactly the keys starting with the prefix, atomically, and says
    how many; watchers see each removal."""

    def test_from_a_child(self, kv: zkv.Store) -> None:
        _fill(kv)
        with kv.watch(prefix="a") as changes:
            assert call_in_child(SPAWN, _delete_prefix, "a\0") == 2
            removed = {changes.receive(timeout=10).key for _ in range(2)}
        assert removed == {"a\0", "a\0b"}
        assert sorted(kv) == sorted(set(KEYS) - removed)
        assert kv.delete_prefix("nothing") == 0
        with kv.pipeline() as p:
            p.set("x1", 1).set("x2", 2)
        assert kv.delete_prefix("x") == 2 and "x1" not in kv


def _scan_pages(prefix: str, count: int) -> dict[str, Any]:
    kv = zkv.store()
    calls = []
    real_call = kv._core.call

    def counting(op: Any, *args: Any) -> Any:
        calls.append(op.name)
        return real_call(op, *args)

    kv._core.call = counting  # type: ignore[method-assign]
    keys = list(kv.scan(prefix, count=count))
    return {"keys": keys, "requests": calls.count(ops.SCAN.name)}


class TestScan:
    """A scan fetches count keys per request, never the whole key set in one message, and a
    key present throughout is seen exactly once while others come and go."""

    @pytest.mark.timeout(120)
    def test_pages(self, kv: zkv.Store) -> None:
        kv.set_many({f"k{i:05}": i for i in range(20_000)})
        kv.set_many({f"other{i}": i for i in range(100)})
        report = call_in_child(SPAWN, _scan_pages, "k", 1000, timeout=100)
        assert sorted(report["keys"]) == [f"k{i:05}" for i in range(20_000)]
        assert len(report["keys"]) == 20_000  # each once
        assert report["requests"] == 20  # 1000 keys per message

    @pytest.mark.timeout(120)
    def test_keys_present_throughout_are_seen_once(self, kv: zkv.Store) -> None:
        kv.set_many({f"stay{i}": i for i in range(5000)})
        stop = threading.Event()
        churned = [0]

        def churn() -> None:  # keys that come and go while the scan runs
            i = 0
            while not stop.is_set():
                kv.set(f"stay-not{i}", i)
                kv.delete(f"stay-not{i - 50}")
                i += 1
                churned[0] = i

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            seen = call_in_child(SPAWN, _scan_pages, "stay", 100, timeout=100)["keys"]
        finally:
            stop.set()
            writer.join(30)
        steady = [k for k in seen if not k.startswith("stay-not")]
        assert sorted(steady) == sorted(f"stay{i}" for i in range(5000))
        assert len(set(seen)) == len(seen)  # nothing twice
        assert churned[0] > 100  # the key set did change during the scan

    def test_an_unknown_cursor(self, kv: zkv.Store) -> None:
        kv["a"] = 1
        with pytest.raises(KeyError, match="cursor"):
            kv._core.call(ops.SCAN, 12345, "", 10)
