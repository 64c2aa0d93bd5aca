"""The asyncio face matches the sync one: every public Store method has a coroutine twin of
the same name and arguments (or is listed as sync-only, with the reason), pipelines and locks
likewise; and every twin gives the same results and raises the same errors as its sync
method, in the owner and in a client, on every kind of event loop."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, ItemsView, Iterator, KeysView, ValuesView
from typing import Any

import pytest
from aio_helpers import LOOPS, run

import zkv
from zkv.aio import SYNC_ONLY

#: Twins under another name: the protocol methods Python cannot await.
RENAMED = {"__iter__": "__aiter__", "__enter__": "__aenter__", "__exit__": "__aexit__",
           "__contains__": "contains", "__len__": "len"}
#: The dunders of Store that are part of its API (the rest are object's or the ABC's).
API_DUNDERS = ["__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__",
               "__len__", "__enter__", "__exit__"]


def _public(cls: type) -> list[str]:
    return sorted({n for n in dir(cls) if not n.startswith("_")} | set(API_DUNDERS)
                  & set(dir(cls)))


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _is_async_api(fn: Callable[..., Any]) -> bool:
    """A coroutine function, or one that returns an async iterator / context manager."""
    if inspect.iscoroutinefunction(fn):
        return True
    returns = inspect.signature(fn).return_annotation
    return any(word in str(returns) for word in ("AsyncIterator", "AsyncPipeline", "AsyncLock"))


class TestParity:
    """Every public Store method has its AsyncStore twin, or is sync-only with a reason."""

    @pytest.mark.parametrize("name", _public(zkv.Store))
    def test_store_method_has_a_twin(self, name: str) -> None:
        if name in SYNC_ONLY:
            assert SYNC_ONLY[name].strip(), name
            assert not hasattr(zkv.AsyncStore, name) or name.startswith("__"), \
                f"{name} is listed as sync-only but AsyncStore has it"
            return
        sync = inspect.getattr_static(zkv.Store, name)
        twin_name = RENAMED.get(name, name)
        assert hasattr(zkv.AsyncStore, twin_name), f"AsyncStore has no twin of Store.{name}"
        twin = inspect.getattr_static(zkv.AsyncStore, twin_name)
        if isinstance(sync, property):
            assert isinstance(twin, property), name
            return
        if name in RENAMED:
            return  # (protocol methods: their own signatures)
        assert _params(getattr(zkv.AsyncStore, name)) == _params(getattr(zkv.Store, name)), name
        assert _is_async_api(getattr(zkv.AsyncStore, name)), \
            f"AsyncStore.{name} neither is a coroutine function nor returns an async object"

    def test_sync_only_names_are_store_methods(self) -> None:
        assert set(SYNC_ONLY) <= set(_public(zkv.Store))

    @pytest.mark.parametrize(("sync", "twin"), [(zkv.Pipeline, zkv.AsyncPipeline),
                                                (zkv.Lock, zkv.AsyncLock)])
    def test_pipelines_and_locks(self, sync: type, twin: type) -> None:
        for name in _public(sync):
            name = {"__enter__": "__aenter__", "__exit__": "__aexit__"}.get(name, name)
            assert hasattr(twin, name), f"{twin.__name__} has no {name}"
            if name in ("execute", "acquire", "release"):
                assert inspect.iscoroutinefunction(getattr(twin, name)), name
                assert _params(getattr(twin, name)) == _params(getattr(sync, name)), name

    def test_every_async_method_is_documented(self) -> None:
        for name in _public(zkv.AsyncStore):
            if name.startswith("__"):
                continue
            assert inspect.getdoc(getattr(zkv.AsyncStore, name)), name


# -- the same calls through both faces give the same results ----------------------------------

def _append_one(items: list[int]) -> list[int]:
    return [*items, 1]


def _move_c(view: Any) -> Any:
    view["c2"] = view.pop("c")
    return sorted(view)


def _fails(_value: Any) -> Any:
    raise ValueError("fn fails on purpose")


#: (method, args, kwargs): run in order on a fresh store through each face.
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("set", ("a", {"x": [1, 2]}), {}),
    ("get", ("a",), {}),
    ("get", ("missing", "default"), {}),
    ("set", ("t", 1), {"ttl": 100}),
    ("ttl", ("t",), {}),
    ("expire", ("a", 50), {}),
    ("persist", ("a",), {}),
    ("ttl", ("a",), {}),
    ("incr", ("n",), {}),
    ("incr", ("n", 2.5), {}),
    ("decr", ("n",), {}),
    ("setdefault", ("sd", [1]), {}),
    ("setdefault", ("sd", [2]), {}),
    ("modify", ("m", _append_one, []), {}),
    ("compare_and_set", ("c", zkv.MISSING, 1), {}),
    ("compare_and_set", ("c", 2, 3), {}),
    ("transact", (_move_c,), {}),
    ("set_many", ({"b1": 1, "b2": b"two"},), {}),
    ("get_many", (["b1", "b2", "zz"],), {}),
    ("get_many", ([],), {}),
    ("update", ({"u1": 1},), {"u2": 2}),
    ("__contains__", ("b1",), {}),
    ("__contains__", ("zz",), {}),
    ("__len__", (), {}),
    ("keys", (), {}),
    ("keys", ("b",), {}),
    ("get_all", ("b",), {}),
    ("items", (), {}),
    ("values", (), {}),
    ("scan", ("", 3), {}),
    ("__iter__", (), {}),
    ("delete", ("b1",), {}),
    ("delete", ("b1",), {}),
    ("pop", ("b2",), {}),
    ("pop", ("b2", "gone"), {}),
    ("delete_prefix", ("u",), {}),
    ("publish", ("nobody-listens", 1), {}),
    ("popitem", (), {}),
    # errors: the same type and message
    ("get", (1,), {}),
    ("set", ("k", 1), {"ttl": -1}),
    ("pop", ("nope",), {}),
    ("ttl", ("nope",), {}),
    ("delete", ("nope", False), {}),
    ("modify", ("m", _fails), {}),
    ("modify", ("m", "not callable"), {}),
    ("incr", ("a",), {}),
    ("incr", ("n", "1"), {}),
    ("expire", ("a", 0), {}),
    ("get_many", ([1],), {}),
    ("scan", ("", 0), {}),
    ("set", ("lock", threading.Lock()), {}),  # the owner keeps it by reference; a client fails
    ("get", ("lock",), {}),
    ("clear", (), {}),
    ("__len__", (), {}),
    ("popitem", (), {}),
]


def _plain(value: Any) -> Any:
    """A result as it can be compared between the faces."""
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value).split("\n")[0])
    if isinstance(value, float) and not value.is_integer():
        return round(value)  # a ttl: the two runs are a moment apart
    if isinstance(value, (zkv.Store, zkv.AsyncStore)):
        return "store"
    if type(value).__name__ == "lock":
        return "a lock"
    if isinstance(value, (Iterator, set, KeysView, ItemsView, ValuesView)):
        return sorted(map(_plain, value), key=repr)
    return value


def _sync_results(kv: zkv.Store) -> list[Any]:
    out = []
    for name, args, kwargs in CALLS:
        try:
            out.append(_plain(getattr(kv, name)(*args, **kwargs)))
        except Exception as exc:
            out.append(_plain(exc))
    return out


async def _async_results(kv: zkv.AsyncStore) -> list[Any]:
    out = []
    for name, args, kwargs in CALLS:
        try:
            method = getattr(kv, RENAMED.get(name, name))
            result = method(*args, **kwargs)
            if isinstance(result, AsyncIterator):
                result = iter([item async for item in result])
            elif inspect.isawaitable(result):
                result = await result
            out.append(_plain(result))
        except Exception as exc:
            out.append(_plain(exc))
    return out


@pytest.mark.contract  # on every backend (a Redis store: its calls in threads)
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("where", ["owner", "client"])
def test_every_call_gives_what_the_sync_call_gives(kv: zkv.Store, where: str,
                                                   loop: str) -> None:
    client = zkv.connect(kv.endpoint) if where == "client" else kv
    try:
        expected = _sync_results(client)
        kv.clear()

        async def main() -> list[Any]:
            return await _async_results(zkv.AsyncStore(client))
        got = run(main(), loop)
    finally:
        if client is not kv:
            client.close()
    for (name, args, _kwargs), want, have in zip(CALLS, expected, got, strict=True):
        assert have == want, f"{name}{args}"
    assert any(isinstance(r, tuple) and r[0] == "KeyError" for r in got)  # (errors were met)


@pytest.mark.contract  # on every backend (a Redis store: its calls in threads)
@pytest.mark.parametrize("where", ["owner", "client"])
def test_pipeline_and_lock_twins(kv: zkv.Store, where: str) -> None:
    async def main() -> None:
        akv = zkv.aconnect(kv.endpoint) if where == "client" else zkv.AsyncStore(kv)
        async with akv.pipeline() as p:
            p.set("a", 1).incr("a").get("a").pop("none", 0).contains("a").expire("a", 9)
        assert p.results == [None, 2, 2, 0, True, True]
        # (a failed operation does not stop the others; the first error is raised after)
        p2 = akv.pipeline().set("b", 2).pop("none").get("b")
        with pytest.raises(KeyError):
            await p2.execute()
        assert p2.results[0] is None and isinstance(p2.results[1], KeyError) \
            and p2.results[2] == 2
        lock = akv.lock("L", timeout=5)
        async with lock:
            assert lock.locked()
            assert not await akv.lock("L").acquire(blocking=False)
            assert not kv.lock("L").acquire(blocking=False)  # the sync face sees it held
        assert not lock.locked()
        with pytest.raises(zkv.LockError):
            await lock.release()
        await akv.close()
        assert akv.closed and (where == "client" or kv.closed)

    run(main())


def test_pipeline_results_match(kv: zkv.Store) -> None:
    async def main() -> list[Any]:
        akv = zkv.AsyncStore(kv)
        p = akv.pipeline().set("a", 1).incr("a").get("a").contains("a").delete("a")
        return await p.execute()
    assert run(main()) == [None, 2, 2, True, True]
    with kv.pipeline() as p:
        p.set("a", 1).incr("a").get("a").contains("a").delete("a")
    assert p.results == [None, 2, 2, True, True]


def test_snapshot_save_twin(kv: zkv.Store, tmp_path: Any) -> None:
    kv.set("a", 1)

    async def main() -> zkv.snapshot.SaveResult:
        return await zkv.AsyncStore(kv).save(tmp_path / "a.zkv")
    result = run(main())
    assert result.keys == 1 and result.path == str(tmp_path / "a.zkv")
    assert math.isfinite(result.pause) and result.pause <= result.seconds


def test_the_lazy_stores_return_at_once_and_check_options_at_once() -> None:
    with pytest.raises(TypeError):
        zkv.aconnect("ipc:///nowhere", no_such_option=1)
    kv = zkv.aconnect("ipc:///nowhere/at/all/r")  # nothing is tried before the first use
    assert not kv.closed and "not open yet" in repr(kv)
    with pytest.raises(RuntimeError, match="not open yet"):
        kv.endpoint  # noqa: B018

    async def main() -> None:
        with pytest.raises(zkv.ZkvConnectionError):
            await kv.get("a")
        await kv.close()
    run(main())
    assert kv.closed


def test_astore_is_the_process_wide_store(kv: zkv.Store) -> None:
    async def main() -> None:
        akv = zkv.astore()
        assert akv is zkv.astore() and akv.sync is kv is zkv.store()
        await akv.set("shared", 1)
        assert kv["shared"] == 1
    run(main())


def test_astore_in_a_process_without_a_store_becomes_the_owner() -> None:
    """In a program's main process with no store yet, the first awaited call makes the
    owner (off the event loop), which ``zkv.store()`` then is; the program exits cleanly."""
    script = textwrap.dedent("""
        import asyncio, zkv
        async def main():
            kv = zkv.astore()
            assert "not open yet" in repr(kv)
            await kv.set("a", 1)
            assert kv.is_owner and kv.sync is zkv.store() and zkv.store()["a"] == 1
            print("ok")
        asyncio.run(main())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=50,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
