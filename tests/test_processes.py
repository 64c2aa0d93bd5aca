"""Every kind of child process reaches the owner with ``zkv.store()`` and no set-up of its
own; a forked child never touches its parent's ZeroMQ context or sockets; many threads and
many processes use one store at once without losing an update or crossing replies."""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq
from store_helpers import call_in_child, is_redis, owner_process

import zkv
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

# -- functions run in children (module level: every start method can import them) -------------


def _join_and_report() -> dict[str, Any]:
    kv = zkv.store()
    assert kv is zkv.store()  # one object per process
    kv.set(f"child:{os.getpid()}", kv.get("from-owner") + 1)
    return {"is_owner": kv.is_owner, "endpoint": kv.endpoint, "pid": os.getpid()}


def _incr_many(times: int) -> int:
    kv = zkv.store()
    for _ in range(times):
        kv.incr("counter")
    return os.getpid()


def _append_with_closure(worker: int, times: int) -> None:
    kv = zkv.store()
    for i in range(times):
        kv.modify("log", _appender((worker, i)), default=[])


def _appender(item: tuple[int, int]) -> Any:
    """A closure over ``item`` (travels to the owner with cloudpickle)."""
    return lambda old: [*old, item]


def _pool_task(n: int) -> int:
    kv = zkv.store()
    kv.set(f"square:{n}", n * n)
    return kv.incr("tasks")


def _threads_hammer(kv: zkv.Store, threads: int, rounds: int) -> list[str]:
    """Each thread writes and reads back its own keys; returns what went wrong (nothing)."""
    problems: list[str] = []
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        start.wait()
        try:
            for i in range(rounds):
                value = (t, i, "x" * (t * 97 % 500))
                kv.set(f"t{t}", value)
                got = kv.get(f"t{t}")
                if got != value:
                    problems.append(f"thread {t} round {i}: got {got!r:.60}")
                if kv.incr(f"n{t}") != i + 1:
                    problems.append(f"thread {t} round {i}: its counter crossed")
                many = kv.get_many([f"t{t}", f"n{t}"])
                if many != {f"t{t}": value, f"n{t}": i + 1}:
                    problems.append(f"thread {t} round {i}: get_many gave {many!r:.60}")
        except Exception as exc:
            problems.append(f"thread {t}: {exc!r}")

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return problems


def _threads_in_child(threads: int, rounds: int) -> list[str]:
    return _threads_hammer(zkv.store(), threads, rounds)


# Set by a test before it forks, read by the forked child.
_INHERITED: zkv.Store | None = None
_PARENT_CONTEXTS: list[zmq.Context[Any]] = []


def _use_inherited_store() -> dict[str, Any]:
    """In a forked child: use the store object the parent made before forking."""
    assert _INHERITED is not None
    _INHERITED.incr("inherited")
    return {"is_owner": _INHERITED.is_owner, "same_global": _INHERITED is zkv.store(),
            "value": _INHERITED.get("from-owner")}


def _spy_on_zmq(parents: set[int]) -> tuple[list[str], list[str], list[str]]:
    """Record every call into pyzmq that zkv can make from now on: the methods of sockets,
    contexts and pollers (pyzmq's Python classes and the compiled ones beneath them), and any
    of those compiled methods that a zkv module or class keeps a reference to (zkv's
    ``sockets.raw_send`` skips pyzmq's Python wrapper). Returns three lists, filled as calls
    happen: calls on a context in ``parents`` (ids) or on its sockets, calls on any other
    context or socket, and references to pyzmq methods that zkv keeps where they cannot be
    spied on (default arguments, closures): the spy would miss those calls."""
    theirs: list[str] = []
    ours: list[str] = []
    hidden: list[str] = []

    def record(name: str, target: Any) -> None:
        context = target if isinstance(target, zmq.backend.Context) else \
            getattr(target, "context", None)
        (theirs if id(context) in parents else ours).append(name)

    def spied(name: str, original: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            record(name, self)
            return original(self, *args, **kwargs)
        return call

    compiled: dict[int, str] = {}
    for python_cls, compiled_cls in ((zmq.Socket, zmq.backend.Socket),
                                     (zmq.Context, zmq.backend.Context)):
        names = set()
        for cls in (compiled_cls, python_cls):
            for name, value in vars(cls).items():
                if name.startswith("__") or not callable(value) or \
                        isinstance(value, (type, classmethod, staticmethod)):
                    continue
                names.add(name)
                if cls is compiled_cls:
                    compiled[id(value)] = f"{cls.__name__}.{name}"
        for name in sorted(names):
            setattr(python_cls, name, spied(f"{python_cls.__name__}.{name}",
                                            getattr(python_cls, name)))

    def spied_poll(name: str, original: Any, sockets: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            for sock in sockets(*args):
                if isinstance(sock, zmq.backend.Socket):
                    record(name, sock)
            return original(*args, **kwargs)
        return call

    for name in ("register", "modify", "unregister", "poll"):
        setattr(zmq.Poller, name, spied_poll(f"Poller.{name}", getattr(zmq.Poller, name),
                                             lambda poller, *rest: [s for s, _ in
                                                                    poller.sockets]
                                             + [r for r in rest[:1]]))
    zmq_poll = zmq.zmq_poll
    compiled[id(zmq_poll)] = "zmq_poll"
    zmq.zmq_poll = spied_poll("zmq_poll", zmq_poll, lambda items, *rest: [i[0] for i in items])

    for module_name, module in list(sys.modules.items()):
        if module_name != "zkv" and not module_name.startswith("zkv."):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in compiled:  # e.g. wire.raw_send
                wrap = spied_poll if value is zmq_poll else None
                setattr(module, attr, spied(f"{module_name}.{attr}", value) if wrap is None
                        else spied_poll(f"{module_name}.{attr}", value,
                                        lambda items, *rest: [i[0] for i in items]))
                continue
            holders = [value] if inspect.isfunction(value) else []
            if isinstance(value, type) and value.__module__ == module_name:
                for name, member in list(vars(value).items()):
                    if id(member) in compiled:
                        setattr(value, name, spied(f"{attr}.{name}", member))
                    elif inspect.isfunction(member):
                        holders.append(member)
            for fn in holders:
                kept = [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values(),
                        *(c.cell_contents for c in fn.__closure__ or () if
                          c.cell_contents is not None)]
                hidden.extend(f"{module_name}.{fn.__qualname__}: {compiled[id(v)]}"
                              for v in kept if id(v) in compiled)
    return theirs, ours, hidden


def _fork_child_touches() -> dict[str, Any]:
    """In a forked child: record every use of the parent's ZeroMQ context or sockets while the
    child uses its stores (the one it inherited, the process-wide one and a new one: requests,
    a lock, pub/sub, callbacks, a read cache), then closes them and collects the garbage."""
    parents = {id(c) for c in _PARENT_CONTEXTS}
    touches, own, hidden = _spy_on_zmq(parents)

    inherited = _INHERITED
    assert inherited is not None
    kv = zkv.store()
    fresh = zkv.connect()
    for store in (inherited, kv, fresh):
        store.set("child", os.getpid())
        store.incr("n")
    with kv.lock("child-lock"):
        pass
    got: list[Any] = []
    inherited.on_subscriber_receive("child-news")(got.append)
    inherited.enable_cache("cached.")
    with fresh.subscribe("child-news") as sub:
        inherited.publish("child-news", "hi")
        assert sub.receive(timeout=30) == "hi"
    wait_for(lambda: got == ["hi"], timeout=30, what="the child's callback")
    assert inherited.get("cached.k") is None and inherited.get("cached.k") is None
    child_contexts = {id(store._core.context) for store in (inherited, kv, fresh)}
    fresh.close()
    kv.close()
    inherited.close()
    gc.collect()
    return {"touches": touches, "hidden": hidden, "own": sorted(set(own)),
            "fresh_context": not (child_contexts & parents), "is_owner": kv.is_owner}


#: Set by a test before it forks, read by the forked child.
_FORKED: dict[str, Any] = {}


def _leave_mark(data: Any) -> None:
    """A callback: leaves a file named after the process that ran it and the message."""
    (Path(_FORKED["marks"]) / f"{os.getpid()}-{data}").touch()


def _child_after_fork() -> dict[str, Any]:
    """In a forked child: what it inherited of its parent's subscriber, callback and read
    cache (nothing: each is closed, gone or empty), observed through the store's API."""
    client, sub = _FORKED["client"], _FORKED["sub"]
    out: dict[str, Any] = {"pid": os.getpid(), "sub_closed": sub.closed}
    try:
        sub.receive(timeout=5)
        out["receive"] = "received"
    except zkv.StoreClosedError:
        out["receive"] = "closed"
    out["cache"] = client.cache_info()
    # Another process changes the key the parent cached. Its invalidation goes to the parent's
    # cache socket: a copy of the parent's cache here would go on answering "old".
    with zkv.connect(client.endpoint) as other:
        other.set("c.x", "new")
    out["get"] = client.get("c.x")
    out["removed"] = client.remove_callback(_leave_mark)
    # A callback of the child's own, registered after the parent's: for one message the
    # dispatcher runs callbacks in registration order, so once this one has run, a copy of the
    # parent's would have run before it (and left a mark with this process's pid).
    got: list[Any] = []
    client.on_subscriber_receive("news")(got.append)
    client.publish("news", "from-child")
    wait_for(lambda: got == ["from-child"], timeout=30, what="the child's own callback")
    out["marks"] = sorted(os.listdir(_FORKED["marks"]))
    return out


def _check_child_touches(result: dict[str, Any]) -> None:
    assert result["hidden"] == [], "zkv reaches pyzmq where the spy cannot see: extend it"
    # The spy sees zkv's sends and receives (on the child's own sockets): it can catch them.
    assert any("send" in name for name in result["own"]), result["own"]
    assert any("recv" in name for name in result["own"]), result["own"]
    assert result["touches"] == []
    assert result["fresh_context"] is True and result["is_owner"] is False


# -- tests -----------------------------------------------------------------------------------------


class TestChildren:
    """fork, spawn and forkserver children, Pool and ProcessPoolExecutor workers, all with no
    set-up in the worker code."""

    def test_child_joins_owner(self, kv: zkv.Store, mp_context: mp.context.BaseContext) -> None:
        kv.set("from-owner", 41)
        report = call_in_child(mp_context, _join_and_report)
        assert report["is_owner"] is False
        assert report["endpoint"] == kv.endpoint
        assert kv[f"child:{report['pid']}"] == 42

    def test_pool_incr_is_exact(self, kv: zkv.Store, mp_context: mp.context.BaseContext) -> None:
        """4 pool workers x 250 incr -> exactly 1000."""
        with mp_context.Pool(4) as pool:
            pids = pool.map(_incr_many, [250] * 4)
        assert kv["counter"] == 1000
        assert os.getpid() not in pids

    def test_process_pool_executor(self, kv: zkv.Store,
                                   mp_context: mp.context.BaseContext) -> None:
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp_context) as pool:
            counts = list(pool.map(_pool_task, range(20)))
        assert sorted(counts) == list(range(1, 21))  # each incr saw a distinct count
        assert kv.get_many([f"square:{n}" for n in range(20)]) == {
            f"square:{n}": n * n for n in range(20)}

    def test_modify_with_closure_loses_no_update(self, kv: zkv.Store) -> None:
        """modify with a closure from 4 spawn workers: every update is there, in order per
        worker."""
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_append_with_closure, args=(w, 100)) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        log = kv["log"]
        assert len(log) == 400
        for w in range(4):
            assert [i for (who, i) in log if who == w] == list(range(100))


class TestForkSafety:
    """A forked child never touches its parent's ZeroMQ context or sockets."""

    @pytest.mark.zkv_only("ZeroMQ contexts; a forked child's own Redis connections are "
                          "checked in tests/test_redis.py")
    def test_child_of_owner(self, kv: zkv.Store) -> None:
        global _INHERITED
        kv.set("from-owner", 1)
        # What a fork could wrongly reuse: the owner's subscriber and callback sockets too.
        sub = kv.subscribe("parent-news")
        kv.on_subscriber_receive("parent-news")(print)
        _INHERITED = kv
        _PARENT_CONTEXTS[:] = [kv._core.context]
        try:
            result = call_in_child(mp.get_context("fork"), _fork_child_touches)
        finally:
            _INHERITED = None
            _PARENT_CONTEXTS.clear()
        _check_child_touches(result)
        assert kv["n"] == 3
        kv.publish("parent-news", "still here")
        assert sub.receive(timeout=30) == "still here"
        sub.close()
        kv.set("after", 1)  # the parent's own sockets still serve
        with zkv.connect(kv.endpoint) as client:
            assert client.get("after") == 1

    def test_child_of_client(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The parent is itself a client (DEALER sockets, an I/O thread): its children make
        their own connections, and the parent keeps working after they exit."""
        global _INHERITED
        with owner_process() as owner:
            monkeypatch.setenv("ZKV_ENDPOINT", owner.endpoint)
            parent = zkv.store()
            try:
                assert not parent.is_owner
                parent.set("from-owner", 7)
                with parent.lock("warm"):  # open sockets in more than one thread
                    threading.Thread(target=parent.get, args=("x",)).start()
                # ...and a subscriber, a callback and a read cache, each with its socket.
                sub = parent.subscribe("parent-news")
                parent.on_subscriber_receive("parent-news")(print)
                parent.enable_cache("cached.")
                parent.get("cached.k")
                _INHERITED = parent
                _PARENT_CONTEXTS[:] = [parent._core.context]
                for _ in range(3):
                    result = call_in_child(mp.get_context("fork"), _fork_child_touches)
                    _check_child_touches(result)
                assert parent.get("n") == 9
                parent.publish("parent-news", "still here")
                assert sub.receive(timeout=30) == "still here"
                sub.close()
                parent.set("after", 2)
                assert parent.get("after") == 2
            finally:
                _INHERITED = None
                _PARENT_CONTEXTS.clear()
                parent.close()

    @pytest.mark.zkv_only("the read cache is refused on Redis (a Redis store's fork safety: "
                          "tests/test_redis.py)")
    def test_subscribers_callbacks_and_cache_are_not_inherited(self, kv: zkv.Store,
                                                               tmp_path: Path) -> None:
        """A forked child inherits its parent's store but not its subscriber (closed there),
        callback (not called there) or read cache (empty there); the parent keeps all three."""
        kv["c.x"] = "old"
        client = zkv.connect(kv.endpoint)
        try:
            client.enable_cache("c.")
            assert client.get("c.x") == "old" and client.cache_info()["entries"] == 1
            sub = client.subscribe("news")
            client.on_subscriber_receive("news")(_leave_mark)
            _FORKED.update(client=client, sub=sub, marks=str(tmp_path))
            try:
                child = call_in_child(mp.get_context("fork"), _child_after_fork)
            finally:
                _FORKED.clear()
            assert child["sub_closed"] and child["receive"] == "closed"
            assert child["cache"] == {"hits": 0, "misses": 0, "entries": 0, "flushes": 0}
            assert child["get"] == "new"
            assert child["removed"] == 0
            assert not [m for m in child["marks"] if m.startswith(f"{child['pid']}-")]
            # The parent's three are intact: its subscriber and callback got the child's
            # message, and its cache took the invalidation.
            assert sub.receive(timeout=30) == "from-child"
            wait_for(lambda: (tmp_path / f"{os.getpid()}-from-child").exists(), timeout=30,
                     what="the parent's callback")
            wait_for(lambda: client.get("c.x") == "new", timeout=30, what="the invalidation")
            sub.close()
        finally:
            client.close()

    def test_module_level_store_in_forked_pool(self, kv: zkv.Store) -> None:
        """A store object made in the parent before forking keeps working in fork workers."""
        global _INHERITED
        kv.set("from-owner", "hello")
        _INHERITED = kv
        try:
            with mp.get_context("fork").Pool(3) as pool:
                reports = [pool.apply_async(_use_inherited_store) for _ in range(6)]
                results = [r.get(30) for r in reports]
        finally:
            _INHERITED = None
        assert all(r == {"is_owner": False, "same_global": True, "value": "hello"}
                   for r in results), results
        assert kv["inherited"] == 6
        assert kv.is_owner is not is_redis(kv)  # unchanged: the owner, or Redis's client
        kv.set("still", "owner")
        assert kv["still"] == "owner"

    def test_module_level_store(self, tmp_path: Path) -> None:
        """A store made at module level of the main script works in fork and spawn pool
        workers, and in the parent after they exit."""
        script = tmp_path / "module_level.py"
        script.write_text(textwrap.dedent(MODULE_LEVEL_STORE))
        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"


class TestThreads:
    """Many threads of one process call the store at once; replies never cross."""

    def test_owner_threads(self, kv: zkv.Store) -> None:
        assert _threads_hammer(kv, threads=8, rounds=150) == []

    def test_client_threads(self, kv: zkv.Store) -> None:
        client = zkv.connect(kv.endpoint)
        try:
            assert _threads_hammer(client, threads=8, rounds=150) == []
        finally:
            client.close()

    def test_child_threads(self, kv: zkv.Store) -> None:
        assert call_in_child(mp.get_context("fork"), _threads_in_child, 8, 150) == []
        assert kv["n7"] == 150


# -- discovery -------------------------------------------------------------------------------------

FORKSERVER_FIRST = """
import multiprocessing as mp, os, sys
import zkv

def work(n):
    kv = zkv.store()   # no set-up: this worker's forkserver predates the store
    return kv.incr("hits"), kv.is_owner, os.environ.get("ZKV_ENDPOINT")

def nothing():
    pass

if __name__ == "__main__":
    mp.set_start_method("forkserver")
    p = mp.Process(target=nothing)   # starts the forkserver before any store exists
    p.start(); p.join()
    kv = zkv.serve()
    with mp.Pool(2) as pool:
        results = pool.map(work, range(10))
    assert sorted(r[0] for r in results) == list(range(1, 11)), results
    assert not any(r[1] for r in results), results
    assert all(r[2] is None for r in results), results  # they did not inherit the variable
    assert kv["hits"] == 10
    print("ok")
"""


MODULE_LEVEL_STORE = """
import multiprocessing as mp, os, sys
import zkv

kv = zkv.store()   # at module level: the owner in the main process; re-run in spawn children

def work(n):
    kv.incr("hits")          # the module-level object, no set-up in the worker
    return kv.is_owner, os.getpid()

if __name__ == "__main__":
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            results = pool.map(work, range(10))
        assert not any(owner for owner, _ in results), results
        assert os.getpid() not in {pid for _, pid in results}
    assert kv.is_owner and kv["hits"] == 20, kv.get("hits")
    kv["after"] = "still working"
    assert kv["after"] == "still working"
    print("ok")
"""


def _try_store() -> tuple[str, list[str]]:
    """Returns the error message, and the socket directories this child made (none)."""
    try:
        zkv.store()
    except zkv.NoOwnerError as exc:
        assert isinstance(exc, ConnectionError)
        message = str(exc)
    else:
        message = "no error: the child made or found a store"
    mine = [p.name for p in zkv.endpoint.runtime_dir().iterdir()
            if p.name.startswith(f"{os.getpid()}-")]
    return message, mine


class TestDiscovery:
    """A child that did not inherit ZKV_ENDPOINT finds its owner among its ancestors, or
    raises NoOwnerError saying how to connect; it never makes a private store."""

    def test_forkserver_started_before_the_store(self, tmp_path: Path) -> None:
        script = tmp_path / "forkserver_first.py"
        script.write_text(textwrap.dedent(FORKSERVER_FIRST))
        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"

    def test_stale_variable_from_an_earlier_store(self) -> None:
        """The forkserver of this test process may hold the ZKV_ENDPOINT of an owner closed
        since: a child must still find the current owner (its ancestor)."""
        ctx = mp.get_context("forkserver")
        for round_ in range(2):
            with zkv.serve() as kv:
                kv.set("from-owner", round_)
                report = call_in_child(ctx, _join_and_report)
                assert report["endpoint"] == kv.endpoint
                assert kv[f"child:{report['pid']}"] == round_ + 1

    def test_stale_variable_in_main_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A main process whose ZKV_ENDPOINT names a closed owner (and no ancestor owns a
        store) raises, instead of silently becoming the owner of a new, empty store."""
        with zkv.serve() as gone:
            endpoint = gone.endpoint
        monkeypatch.setenv("ZKV_ENDPOINT", endpoint)
        with pytest.raises(zkv.NoOwnerError, match="stale"):
            zkv.store()

    def test_orphan_child_raises_no_owner(self, mp_context: mp.context.BaseContext) -> None:
        assert "ZKV_ENDPOINT" not in os.environ
        message, made = call_in_child(mp_context, _try_store)
        assert "zkv.connect" in message and "ZKV_ENDPOINT" in message, message
        assert made == []  # the child bound no sockets of its own
