"""The Store API behaves the same in the owner and in every other process: basic key-value,
the MutableMapping protocol, atomic operations, batches, pipelines, lifecycle, and TypeError
for a non-str key before anything is sent."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from store_helpers import call_in_child, is_redis, owner_process

import zkv
from zkv import endpoint as zkv_endpoint

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract


@pytest.fixture(params=["owner", "client"])
def side(request: pytest.FixtureRequest, kv: zkv.Store) -> Iterator[zkv.Store]:
    """The store as the owner sees it, and as a client process sees it (a real connection
    over the owner's sockets)."""
    if request.param == "owner":
        yield kv
        return
    client = zkv.connect(kv.endpoint)
    try:
        assert not client.is_owner
        yield client
    finally:
        client.close()


def _api_battery(kv: zkv.Store) -> str:
    """A walk through the whole API; raises AssertionError on the first surprise."""
    kv.clear()
    # get / set / delete
    assert kv.get("a") is None and kv.get("a", 5) == 5
    kv.set("a", 1)
    assert kv.get("a") == 1
    assert kv.delete("a") is True and kv.delete("a") is False
    try:
        kv.delete("a", ignore_key_error=False)
        raise AssertionError("no KeyError")
    except KeyError:
        pass
    # mapping protocol
    kv["x"] = [1]
    assert kv["x"] == [1] and "x" in kv and "y" not in kv and len(kv) == 1
    assert list(kv) == ["x"] and list(kv.keys()) == ["x"]
    assert dict(kv.items()) == {"x": [1]} and list(kv.values()) == [[1]]
    kv.update({"y": 2}, z=3)
    assert kv.get_all() == {"x": [1], "y": 2, "z": 3}
    del kv["z"]
    try:
        kv["z"]
        raise AssertionError("no KeyError")
    except KeyError:
        pass
    # atomic operations
    assert kv.incr("n") == 1 and kv.incr("n", 5) == 6 and kv.decr("n", 2) == 4
    assert kv.modify("x", lambda v: [*v, 2]) == [1, 2]
    assert kv.setdefault("x", "ignored") == [1, 2] and kv.setdefault("new", 0) == 0
    assert kv.pop("new") == 0 and kv.pop("new", "gone") == "gone"
    assert kv.compare_and_set("y", 2, 20) is True and kv.compare_and_set("y", 2, 30) is False
    assert kv.compare_and_set("c", zkv.MISSING, "made") is True
    assert kv.transact(lambda m: m.pop("c") + "!") == "made!" and "c" not in kv
    # batches
    kv.set_many({"b1": 1, "b2": 2})
    assert kv.get_many(["b1", "b2", "nope"]) == {"b1": 1, "b2": 2}
    with kv.pipeline() as p:
        p.set("p", 1).incr("p").get("p").delete("p")
    assert p.results == [None, 2, 2, True]
    with kv.lock("battery", timeout=5):
        pass
    return "ok"


def _battery_in_child() -> str:
    return _api_battery(zkv.store())


class TestWholeApi:
    """The same walk through the API passes in the owner, a client, and child processes."""

    def test_in_owner_and_client(self, side: zkv.Store) -> None:
        assert _api_battery(side) == "ok"

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_in_child(self, kv: zkv.Store, method: str) -> None:
        assert call_in_child(mp.get_context(method), _battery_in_child) == "ok"


class TestKeyValue:
    """get/set/delete/get_all and the mapping protocol."""

    def test_delete_missing(self, side: zkv.Store) -> None:
        assert side.delete("nope") is False
        with pytest.raises(KeyError):
            side.delete("nope", ignore_key_error=False)
        with pytest.raises(KeyError):
            del side["nope"]

    def test_get_all_is_a_copy(self, side: zkv.Store) -> None:
        side["a"] = {"inner": 1}
        everything = side.get_all()
        everything["a"]["inner"] = 2
        everything["b"] = 3
        assert side.get_all() == {"a": {"inner": 1}}

    def test_mutable_mapping(self, side: zkv.Store) -> None:
        assert isinstance(side, MutableMapping)
        side.update([("a", 1)], b=2)
        assert sorted(side) == ["a", "b"]
        for key in side:  # iterates over a snapshot: changing the store meanwhile is fine
            side[key + "2"] = 0
        assert len(side) == 4
        key, value = side.popitem()
        assert key not in side and len(side) == 3 and value in (0, 1, 2)
        side.clear()
        assert len(side) == 0 and side.get_all() == {}
        with pytest.raises(KeyError):
            side.popitem()
        assert side != {}  # a store is a handle: equal only to itself
        assert side == side

    def test_pop(self, side: zkv.Store) -> None:
        side["a"] = 1
        assert side.pop("a") == 1
        assert side.pop("a", None) is None
        with pytest.raises(KeyError):
            side.pop("a")


class TestAtomicOps:
    """modify/incr/setdefault/pop/compare_and_set/transact, each one step in the owner."""

    def test_modify(self, side: zkv.Store) -> None:
        assert side.modify("s", lambda old: old | {1}, default=frozenset()) == {1}
        side["n"] = 1

        def boom(old: Any) -> Any:
            raise ValueError("no thanks")
        with pytest.raises(ValueError, match="no thanks"):
            side.modify("n", boom)
        assert side["n"] == 1
        with pytest.raises(TypeError):
            side.modify("n", "not callable")  # type: ignore[arg-type]

    def test_incr(self, side: zkv.Store) -> None:
        assert side.incr("f", 0.5) == 0.5
        side["s"] = "text"
        with pytest.raises(TypeError, match="str"):
            side.incr("s")
        assert side["s"] == "text"
        with pytest.raises(TypeError):
            side.incr("f", True)  # type: ignore[arg-type]

    def test_compare_and_set(self, side: zkv.Store) -> None:
        assert side.compare_and_set("k", zkv.MISSING, 1) is True
        assert side.compare_and_set("k", zkv.MISSING, 2) is False  # it exists now
        assert side.compare_and_set("k", 1, [2]) is True
        assert side.compare_and_set("k", [2], 3) is True  # compared by ==
        assert side["k"] == 3
        assert side.compare_and_set("absent", None, 1) is False  # None is a value, not absence

    def test_transact_all_or_nothing(self, side: zkv.Store) -> None:
        side.set_many({"a": 1, "b": 2})

        def move(m: MutableMapping[str, Any]) -> int:
            m["a"], m["b"] = m["b"], m["a"]
            m["c"] = m["a"] + m["b"]
            del m["b"]
            assert "b" not in m and m["c"] == 3  # the function sees its own writes
            return len(m)
        assert side.transact(move) == 2
        assert side.get_all() == {"a": 2, "c": 3}

        def fail_half_way(m: MutableMapping[str, Any]) -> None:
            m["a"] = 100
            del m["c"]
            raise KeyError("abort")
        with pytest.raises(KeyError, match="abort"):
            side.transact(fail_half_way)
        assert side.get_all() == {"a": 2, "c": 3}

    def test_transact_views_are_copies(self, side: zkv.Store) -> None:
        side["doc"] = {"list": [1]}
        side.transact(lambda m: m["doc"]["list"].append(2))  # not assigned back
        assert side["doc"] == {"list": [1]}
        side.transact(lambda m: m.__setitem__("doc", {**m["doc"], "more": True}))
        assert side["doc"] == {"list": [1], "more": True}

    def test_transact_view_cannot_escape(self, side: zkv.Store) -> None:
        if side.is_owner or is_redis(side):  # the function ran here: the view is dead
            view = side.transact(lambda m: m)
            with pytest.raises(zkv.StoreClosedError):
                view["a"] = 1
        else:  # a client cannot even receive it
            with pytest.raises(zkv.EncodeError, match="TransactionView"):
                side.transact(lambda m: m)


class TestBatches:
    """get_many/set_many and pipelines: one round trip, one atomic step."""

    def test_pipeline_errors(self, side: zkv.Store) -> None:
        side["s"] = "text"
        p = side.pipeline()
        p.set("a", 1).incr("s").incr("a").pop("missing").get("a")
        assert len(p) == 5
        with pytest.raises(TypeError):
            p.execute()
        assert p.results[0] is None and isinstance(p.results[1], TypeError)
        assert p.results[2] == 2 and isinstance(p.results[3], KeyError)
        assert p.results[4] == 2  # every queued operation ran
        assert side.pipeline().execute() == []

    def test_pipeline_not_sent_on_error_in_block(self, side: zkv.Store) -> None:
        with pytest.raises(RuntimeError):
            with side.pipeline() as p:
                p.set("a", 1)
                raise RuntimeError("changed my mind")
        assert "a" not in side

    def test_set_many_is_atomic(self, kv: zkv.Store, side: zkv.Store) -> None:
        """A reader never sees half of a set_many: 50 keys written together are always equal,
        whether the reader is the owner or a client, while a client writes."""
        keys = [f"k{i}" for i in range(50)]
        writer = zkv.connect(kv.endpoint)
        stop = threading.Event()
        torn: list[dict[str, Any]] = []
        written = [0]  # set_many calls that have returned
        side.set_many(dict.fromkeys(keys, 0))

        def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                writer.set_many(dict.fromkeys(keys, n))
                written[0] = n

        thread = threading.Thread(target=write)
        thread.start()
        # Reads during which a set_many was applied (and returned): they raced it closely.
        overlapped = reads = 0
        try:
            deadline = time.monotonic() + 30
            while overlapped < 50 and time.monotonic() < deadline:
                before = written[0]
                got = side.get_many(keys)
                snapshot = side.get_all()
                overlapped += written[0] != before
                reads += 1
                if len(set(got.values())) != 1:
                    torn.append(got)
                    break
                if len({snapshot[k] for k in keys}) != 1:
                    torn.append(snapshot)
                    break
        finally:
            stop.set()
            thread.join(10)
            writer.close()
        assert torn == []
        assert overlapped >= 50, f"only {overlapped} of {reads} reads raced a set_many"


    PLAIN = {"s": "text", "": "empty key", "surrogate \udc80": "\udc81", "n": None,
             "t": True, "f": False, "i": -7, "big": 3 ** 200, "x": 1.5, "inf": float("inf"),
             "b": b"\x00\xff" * 10}

    @pytest.mark.parametrize("extra", [
        {}, {"nul\0key": 1}, {"large": b"L" * (1 << 17)}, {"list": [1, 2]},
        {"c": 1 + 2j}, {"sub": type("Str", (str,), {})("subclass")}],
        ids=["plain", "nul-key", "large-bytes", "list", "complex", "str-subclass"])
    def test_batches_keep_every_value_and_type(self, kv: zkv.Store, side: zkv.Store,
                                               extra: dict[str, Any]) -> None:
        """Plain values travel as one pickle (and non-plain ones, or keys holding NUL, the
        general way): either way each key gets its value back, with its exact type, whoever
        reads it."""
        items = {**self.PLAIN, **extra}
        side.set_many(items)
        client = zkv.connect(kv.endpoint)
        try:
            for reader in (side, kv, client):
                got = reader.get_many([*items, "absent"])
                assert got == items
                assert {k: type(v) for k, v in got.items()} == \
                    {k: type(v) for k, v in items.items()}
                assert all(reader.get(key) == value for key, value in items.items())
        finally:
            client.close()
        side.set_many({})  # nothing to send
        assert side.get_many([]) == {}

class TestLocks:
    """lock(name, timeout): a cross-process mutual exclusion."""

    def test_lock_semantics(self, side: zkv.Store) -> None:
        lock = side.lock("l", timeout=0.2)
        assert lock.acquire() is True and lock.locked()
        with pytest.raises(zkv.LockError):
            lock.acquire()  # not reentrant
        other = side.lock("l")
        assert other.acquire(blocking=False) is False
        assert other.acquire(timeout=0.1) is False
        lock.release()
        with pytest.raises(zkv.LockError):
            lock.release()
        with other:
            assert other.locked()
        assert not other.locked()
        with pytest.raises(TypeError):
            side.lock(1)  # type: ignore[arg-type]

    def test_mutual_exclusion_across_processes(self, kv: zkv.Store) -> None:
        kv["n"] = 0
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_unsafe_increments, args=(40,)) for _ in range(3)]
        for p in procs:
            p.start()
        _unsafe_increments(40)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert kv["n"] == 160


def _unsafe_increments(times: int) -> None:
    """A read-then-write increment: only correct under the lock."""
    kv = zkv.store()
    for _ in range(times):
        with kv.lock("counter", timeout=20):
            value = kv["n"]
            kv["n"] = value + 1


class TestLifecycle:
    """close() and the context manager; store(), serve() and connect()."""

    def test_close(self, kv: zkv.Store) -> None:
        client = zkv.connect(kv.endpoint)
        with client:
            client["a"] = 1
        assert client.closed
        client.close()  # idempotent
        with pytest.raises(zkv.StoreClosedError):
            client.get("a")
        assert kv["a"] == 1  # a client closing leaves the owner serving

    def test_serve_context_manager_removes_sockets(self) -> None:
        with zkv.serve() as owner:
            assert owner.is_owner and zkv.store() is owner
            directory = zkv_endpoint.parse(owner.endpoint).directory
            assert directory is not None and (directory / "r").exists()
        assert owner.closed and not directory.exists()
        with pytest.raises(zkv.StoreClosedError):
            owner["a"] = 1

    def test_clients_see_owner_close(self) -> None:
        owner = zkv.serve()
        client = zkv.connect(owner.endpoint, timeout=60)
        client["a"] = 1
        owner.close()
        started = time.monotonic()
        with pytest.raises(zkv.OwnerGoneError):
            client["a"]
        assert time.monotonic() - started < 20  # far under the 60 s timeout
        client.close()

    def test_store_is_one_object(self, kv: zkv.Store) -> None:
        assert zkv.store() is kv and zkv.store() is zkv.store()
        if is_redis(kv):  # joined, from ZKV_ENDPOINT: nobody owns a store kept in Redis
            assert kv.endpoint == os.environ["ZKV_ENDPOINT"] and not kv.is_owner
            assert "client" in repr(kv)
        else:
            assert kv.endpoint.startswith("ipc://") and kv.is_owner
            assert "owner" in repr(kv)

    def test_connect_without_owner(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("ZKV_ENDPOINT", raising=False)
        with pytest.raises(zkv.NoOwnerError):
            zkv.connect("ipc:///nonexistent-zkv-dir/r")


BAD_KEY_CALLS = {
    "get": lambda s: s.get(1),
    "set": lambda s: s.set(b"k", 1),
    "getitem": lambda s: s[1],
    "setitem": lambda s: s.__setitem__(None, 1),
    "delete": lambda s: s.delete(1.5),
    "delitem": lambda s: s.__delitem__(("t",)),
    "contains": lambda s: 1 in s,
    "modify": lambda s: s.modify(1, lambda v: v),
    "incr": lambda s: s.incr(1),
    "setdefault": lambda s: s.setdefault(1),
    "pop": lambda s: s.pop(1),
    "compare_and_set": lambda s: s.compare_and_set(1, 1, 2),
    "get_many": lambda s: s.get_many(["ok", 1]),
    "set_many": lambda s: s.set_many({"ok": 1, 2: 2}),
    "update": lambda s: s.update({3: 3}),
    "pipeline": lambda s: s.pipeline().set("ok", 1).get(1),
    "lock": lambda s: s.lock(1),
    "publish": lambda s: s.publish(1, "data"),
}


def _bad_keys_in_child() -> list[str]:
    kv = zkv.store()
    raised = []
    for name, call in BAD_KEY_CALLS.items():
        try:
            call(kv)
        except TypeError:
            raised.append(name)
    return sorted(raised)


class TestBadKeys:
    """A non-str key raises TypeError before anything is sent (proved against an owner that
    is stopped: anything sent would hang until the timeout instead)."""

    def test_type_error_before_sending(self) -> None:
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=30)
            try:
                client.set("ok", 1)
                owner.stop()
                for name, call in BAD_KEY_CALLS.items():
                    started = time.monotonic()
                    with pytest.raises(TypeError):
                        call(client)
                    # anything sent would wait for the 30 s timeout
                    assert time.monotonic() - started < 10, name
            finally:
                owner.resume()
                client.close()

    def test_type_error_in_child(self, kv: zkv.Store) -> None:
        assert call_in_child(mp.get_context("fork"), _bad_keys_in_child) == sorted(BAD_KEY_CALLS)
        assert kv.get_all() == {}

    def test_type_error_in_owner(self, kv: zkv.Store) -> None:
        for name, call in BAD_KEY_CALLS.items():
            with pytest.raises(TypeError):
                call(kv)
            assert kv.get_all() == {}, name
