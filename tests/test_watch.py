"""Watching keys: ``store.watch()`` and ``@store.on_change``.

A watcher sees a :class:`zkv.Change` (key, kind "set"/"delete", new value, version) for every
change of the keys it watches, made by any process -- atomic operations, transactions and
pipelines included -- in the order the owner applied them, and nothing for other keys.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import threading
from typing import Any

import pytest

import zkv
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

STEPS = 10


def _watching_child(count: int) -> None:
    """Watch "config.", say ready, collect ``count`` changes."""
    kv = zkv.store()
    with kv.watch(prefix="config.") as watch:
        kv.set("watcher.ready", True)
        changes = [watch.receive(timeout=30) for _ in range(count)]
    kv.set("watcher.changes", [(c.key, c.kind, c.value, c.version) for c in changes])


def _setting_child() -> None:
    """Set config.a when asked on "step"; say so on "stepped"; delete it at the end."""
    kv = zkv.store()
    with kv.subscribe("step") as steps:
        kv.set("setter.ready", True)
        for i in range(STEPS):
            assert steps.receive(timeout=30) == i
            kv.set("config.a", i)
            kv.set("configx", i)  # not under "config."
            kv.publish("stepped", i)
        assert steps.receive(timeout=30) == "delete"
        kv.delete("config.a")
        kv.publish("stepped", "deleted")


class TestWatchAcrossProcesses:
    """A watcher in one child sees a set in another child and an incr in the owner, in the
    order they were applied."""

    def test_child_sees_child_set_and_owner_incr_in_order(self, kv: zkv.Store) -> None:
        fork, spawn = mp.get_context("fork"), mp.get_context("spawn")
        total = 2 * STEPS + 1
        watcher = spawn.Process(target=_watching_child, args=(total,))
        setter = fork.Process(target=_setting_child)
        with kv.subscribe("stepped") as stepped:
            watcher.start()
            setter.start()
            wait_for(lambda: kv.get("watcher.ready") and kv.get("setter.ready"), 30,
                     what="children ready")
            for i in range(STEPS):
                kv.publish("step", i)
                assert stepped.receive(timeout=30) == i
                kv.incr("config.n")
                kv.set("other", i)  # not watched
            kv.publish("step", "delete")
            assert stepped.receive(timeout=30) == "deleted"
            watcher.join(30)
            setter.join(30)
        assert watcher.exitcode == 0 and setter.exitcode == 0
        changes = kv["watcher.changes"]
        expected: list[tuple[str, str, Any]] = []
        for i in range(STEPS):
            expected += [("config.a", "set", i), ("config.n", "set", i + 1)]
        expected.append(("config.a", "delete", None))
        assert [c[:3] for c in changes] == expected
        versions = [c[3] for c in changes]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)


def _atomic_ops(kv: zkv.Store, p: str) -> None:
    """Every kind of write, under prefix ``p``."""
    kv.set(p + "a", 1)
    kv.modify(p + "a", lambda v: v + 1)
    kv.incr(p + "n")
    kv.decr(p + "n", 3)
    kv.setdefault(p + "d", "x")
    kv.setdefault(p + "d", "y")  # present: no change
    assert kv.compare_and_set(p + "a", 2, 3)
    assert not kv.compare_and_set(p + "a", 2, 4)  # no change
    assert kv.compare_and_set(p + "new", zkv.MISSING, 0)
    assert kv.pop(p + "new") == 0
    assert kv.pop(p + "new", None) is None  # missing: no change
    kv.delete(p + "nothing")  # missing: no change

    def transaction(m: Any) -> None:
        m[p + "t"] = m[p + "a"] * 10
        del m[p + "d"]

    kv.transact(transaction)
    kv.set_many({p + "m1": 1, p + "m2": 2})
    with kv.pipeline() as pipe:
        pipe.set(p + "q", 1).incr(p + "q").delete(p + "a")
    kv[p + "i"] = "item"
    del kv[p + "i"]
    kv.update({p + "u": [1, 2]})


def _atomic_ops_child() -> None:
    _atomic_ops(zkv.store(), "c.")


def _expected_ops(p: str) -> list[tuple[str, str, Any]]:
    return [
        (p + "a", "set", 1), (p + "a", "set", 2), (p + "n", "set", 1), (p + "n", "set", -2),
        (p + "d", "set", "x"), (p + "a", "set", 3), (p + "new", "set", 0),
        (p + "new", "delete", None), (p + "t", "set", 30), (p + "d", "delete", None),
        (p + "m1", "set", 1), (p + "m2", "set", 2), (p + "q", "set", 1), (p + "q", "set", 2),
        (p + "a", "delete", None), (p + "i", "set", "item"), (p + "i", "delete", None),
        (p + "u", "set", [1, 2]),
    ]


def _take(watch: zkv.Subscriber, count: int) -> list[zkv.Change]:
    return [watch.receive(timeout=10) for _ in range(count)]


class TestEveryWriteIsAnEvent:
    """Plain, atomic, transactional and pipelined writes all produce change events, from the
    owner and from a child; operations that change nothing produce none."""

    def test_owner_and_child_writes(self, kv: zkv.Store) -> None:
        with kv.watch(prefix="o.") as owner_watch, kv.watch(prefix="c.") as child_watch:
            _atomic_ops(kv, "o.")
            proc = mp.get_context("fork").Process(target=_atomic_ops_child)
            proc.start()
            proc.join(30)
            assert proc.exitcode == 0
            for watch, p in ((owner_watch, "o."), (child_watch, "c.")):
                expected = _expected_ops(p)
                changes = _take(watch, len(expected))
                assert [(c.key, c.kind, c.value) for c in changes] == expected
                assert all(isinstance(c, zkv.Change) for c in changes)
            # Nothing more: a marker write is the next event.
            kv.set("o.marker", True)
            assert owner_watch.receive(timeout=10).key == "o.marker"

    def test_versions_are_the_stores(self, kv: zkv.Store) -> None:
        with kv.watch() as watch:
            kv.set("x", 1)
            first = watch.receive(timeout=10)
            kv.set("y", 2)
            kv.delete("x")
            second, third = _take(watch, 2)
        assert first.version + 2 == second.version + 1 == third.version
        assert third.version == kv.stats()["version"]

    def test_clear_deletes_every_key(self, kv: zkv.Store) -> None:
        kv.set_many({"a": 1, "b": 2})
        with kv.watch() as watch:
            kv.clear()
            assert {(c.key, c.kind) for c in _take(watch, 2)} == {("a", "delete"),
                                                                  ("b", "delete")}


class TestWatchMatching:
    """``watch(key)`` is exact, ``watch(prefix=...)`` a prefix, ``watch()`` every key."""

    def test_exact_prefix_and_all(self, kv: zkv.Store) -> None:
        with kv.watch("k") as exact, kv.watch(prefix="k.") as prefix, kv.watch() as every:
            for key in ["k", "k2", "k.a", "k\0x", "j", "k.b.c"]:
                kv.set(key, key)
            kv.set("k", "end")
            kv.set("k.end", "end")
            assert [c.value for c in _take(exact, 2)] == ["k", "end"]
            assert [c.key for c in _take(prefix, 3)] == ["k.a", "k.b.c", "k.end"]
            assert [c.key for c in _take(every, 8)] == [
                "k", "k2", "k.a", "k\0x", "j", "k.b.c", "k", "k.end"]


def _on_change_child() -> None:
    kv = zkv.store()
    seen: list[tuple[str, str, Any]] = []
    got_all = threading.Event()

    @kv.on_change(prefix="cfg.")
    def reload(change: zkv.Change) -> None:
        seen.append((change.key, change.kind, change.value))
        if change.kind == "delete":
            got_all.set()

    kv.set("ready", True)
    assert got_all.wait(30)
    kv.set("seen", seen)


class TestOnChange:
    """The decorator form runs a callback for each change, in a child too."""

    def test_on_change_in_a_child(self, kv: zkv.Store) -> None:
        proc = mp.get_context("fork").Process(target=_on_change_child)
        proc.start()
        wait_for(lambda: kv.get("ready"), 30, what="child registered")
        kv.set("cfg.level", "debug")
        kv.set("other", 1)
        kv.incr("cfg.n")
        kv.delete("cfg.level")
        proc.join(30)
        assert proc.exitcode == 0
        assert kv["seen"] == [("cfg.level", "set", "debug"), ("cfg.n", "set", 1),
                              ("cfg.level", "delete", None)]


def _watch_once(conn: mp.connection.Connection) -> None:
    """In a child: watch "k", say so, and report the first change event and its number."""
    kv = zkv.store()
    with kv.watch("k") as watch:
        conn.send("watching")
        message = watch.receive_message(timeout=30)
    conn.send((message.data.value, message.seq))


class TestEventsOnlyWhileWatched:
    """Change events exist only while someone watches: writes made while nobody watches a key
    make none, so the events of a key are numbered 1, 2, 3, ... over the times it is watched,
    whatever was written in between."""

    @pytest.mark.zkv_only("on Redis every write through zkv is an event, numbered whether "
                          "watched or not (a watcher starts from the count when it subscribes)")
    def test_unwatched_writes_make_no_events(self, kv: zkv.Store) -> None:
        client = zkv.connect(kv.endpoint)
        try:
            for i in range(50):  # nobody watches: from the owner and from a client
                kv.set("k", i)
                client.incr("k")
            with kv.watch("k") as watch:
                kv.set("k", "a")
                client.set("k", "b")
                got = [watch.receive_message(timeout=10) for _ in range(2)]
            assert [(m.data.value, m.seq) for m in got] == [("a", 1), ("b", 2)]
            wait_for(lambda: kv.stats()["topics"] == 0, 10, what="the watcher gone")
            for i in range(50):  # nobody watches again
                kv.set("k", i)
                client.set_many({"k": i, "other": i})
            fork = mp.get_context("fork")
            parent_end, child_end = fork.Pipe()
            child = fork.Process(target=_watch_once, args=(child_end,))
            child.start()
            assert parent_end.poll(30) and parent_end.recv() == "watching"
            client.set("k", "c")
            assert parent_end.poll(30) and parent_end.recv() == ("c", 3)
            child.join(30)
            assert child.exitcode == 0
        finally:
            client.close()
