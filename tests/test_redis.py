"""What the Redis backend promises beyond the contract suites (which run on it too, see
conftest.py): URLs, credentials and TLS, namespaces, values other Redis clients can read,
the table of operations, optimistic operations under contention, lease locks, losses counted
when Redis drops a subscriber or restarts, transactions that never half-apply, fork safety,
and Redis Cluster and Sentinel. Every test runs a real redis-server of its own making."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_helpers import call_in_child

import zkv
from zkv import ops
from zkv.backends import ContentionError, UnsupportedError, redis_url
from zkv.backends.redis_ops import IMPLEMENTATIONS, NOT_APPLICABLE
from zkv.backends.redis_server import RedisServer, RedisUnavailable, free_port
from zkv.testing import wait_for

pytestmark = pytest.mark.redis


def _start(server: RedisServer) -> RedisServer:
    try:
        return server.start()
    except RedisUnavailable as exc:
        pytest.skip(f"Redis unavailable: {exc}")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server for one test (it may be killed, restarted, reconfigured)."""
    srv = _start(RedisServer())
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def store(server: RedisServer) -> Iterator[zkv.Store]:
    with zkv.connect(server.url("app")) as kv:
        yield kv


# -- URLs and credentials ----------------------------------------------------------------------

class TestUrls:
    """What a URL says, what is refused, and that a password never shows."""

    def test_forms(self) -> None:
        url = redis_url.parse("rediss://u:p%40ss@db.example:6380/3?namespace=app&lease=5"
                              "&ssl_ca_certs=/ca.pem")
        assert (url.kind, url.tls, url.hosts, url.db, url.username, url.password,
                url.namespace, url.lease) == ("single", True, (("db.example", 6380),), 3,
                                              "u", "p@ss", "app", 5.0)
        assert url.connection_kwargs()["ssl_ca_certs"] == "/ca.pem"
        sentinel = redis_url.parse("redis+sentinel://:pw@s1:26379,s2/mymaster/2")
        assert (sentinel.kind, sentinel.hosts, sentinel.service, sentinel.db) == (
            "sentinel", (("s1", 26379), ("s2", 26379)), "mymaster", 2)
        cluster = redis_url.parse("redis+cluster://n1:7000,n2:7001")
        assert cluster.kind == "cluster" and len(cluster.hosts) == 2
        unix = redis_url.parse("unix://:pw@/run/redis.sock?db=1")
        assert (unix.path, unix.db, unix.password, unix.local) == ("/run/redis.sock", 1,
                                                                   "pw", True)
        assert redis_url.parse("valkey://localhost").namespace == "zkv"

    @pytest.mark.parametrize("bad", [
        "redis://h/0?nope=1", "redis://h?namespace=", "redis://h?namespace={x}",
        "redis://h?lease=0", "redis://h:port", "redis://h/0?ssl_ca_certs=/x",
        "redis+sentinel://h:26379", "redis+cluster://h/1", "unix://relative.sock",
        "ftp://h", "redis://a,b"])
    def test_refused_urls(self, bad: str) -> None:
        with pytest.raises(ValueError):
            redis_url.parse(bad)

    def test_no_password_to_another_host_is_refused(self) -> None:
        with pytest.raises(zkv.AuthenticationError, match="insecure=True") as info:
            zkv.connect("redis://10.255.255.1:6379/0")
        assert isinstance(info.value, PermissionError)
        for allowed in ("redis://:pw@10.0.0.1", "redis://10.0.0.1?insecure=1",
                        "redis://127.0.0.1", "redis://[::1]:6379", "unix:///tmp/x.sock",
                        "rediss://10.0.0.1?ssl_certfile=/c&ssl_keyfile=/k"):
            zkv.backends.redis.check_security(redis_url.parse(allowed))

    def test_password_is_never_shown(self, server: RedisServer) -> None:
        url = server.url("app") .replace("unix://", "unix://:not-shown@")
        assert "not-shown" not in redis_url.redact(url)
        assert redis_url.redact("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
        plain = zkv.connect(server.url("app"))  # (the server has no password: AUTH is sent)
        plain.close()

    def test_serve_says_to_connect(self) -> None:
        with pytest.raises(ValueError, match=r"zkv.connect\('redis://:\*\*\*@h/0'\)"):
            zkv.serve("redis://:secret@h/0")

    def test_unreachable_fails_within_the_timeout(self) -> None:
        port = free_port()  # nobody listens there
        started = time.monotonic()
        with pytest.raises(zkv.ZkvConnectionError, match="cannot be reached"):
            zkv.connect(f"redis://127.0.0.1:{port}/0", timeout=1)
        assert time.monotonic() - started < 10

    def test_without_redis_py_the_error_says_how_to_install(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "redis", None)
        with pytest.raises(ImportError, match=r"pip install 'zkv\[redis\]'"):
            zkv.connect("redis://127.0.0.1:1/0")

    def test_zkv_endpoint_names_a_redis_store(self, server: RedisServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ZKV_ENDPOINT", server.url("env"))
        kv = zkv.store()
        try:
            kv["a"] = 1
            assert not kv.is_owner and zkv.store() is kv
            assert call_in_child(mp.get_context("spawn"), _get_from_store, "a") == 1
        finally:
            kv.close()


def _get_from_store(key: str) -> Any:
    return zkv.store().get(key)


class TestShell:
    """The zkv command talks to a store kept in Redis like to an owner."""

    def test_commands(self, server: RedisServer, store: zkv.Store) -> None:
        store.update(a=1, b=[2])

        def zkv_command(*args: str) -> str:
            done = subprocess.run([sys.executable, "-m", "zkv", *args, "-e", server.url("app")],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()
        assert zkv_command("keys").split() == ["a", "b"]
        assert zkv_command("get", "b") == "[2]" and zkv_command("incr", "a") == "2"
        zkv_command("set", "--str", "c", "x")
        assert store["c"] == "x"


class TestCredentialsAndTls:
    """A password and TLS come from the URL."""

    def test_password(self) -> None:
        srv = _start(RedisServer(args=["--requirepass", "s3cret"]))
        try:
            with zkv.connect(srv.url("app")) as kv:  # (the URL carries the password)
                kv["a"] = 1
                assert kv["a"] == 1 and "s3cret" not in repr(kv)
            wrong = srv.url("app").replace(":s3cret@", ":wrong@")
            with pytest.raises(zkv.AuthenticationError):
                zkv.connect(wrong)
            with pytest.raises(zkv.AuthenticationError):
                zkv.connect(srv.url("app").replace(":s3cret@", ""))
        finally:
            srv.stop()

    def test_a_user_limited_by_acl(self, server: RedisServer,
                                   caplog: pytest.LogCaptureFixture) -> None:
        """A Redis user allowed only its namespace works; what it may not do is refused
        with a clear error, at once (no retrying)."""
        raw = server.client()
        raw.config_set("notify-keyspace-events", "Ex")  # (this user may not CONFIG)
        raw.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~{app}:*", "&*",
                            "+@all", "-@dangerous", "+keys", "+info")
        raw.execute_command("ACL", "SETUSER", "narrow", "on", ">pw", "~{app}:*",
                            "&{app}:*", "+@all", "-@dangerous", "+keys", "+info")
        raw.close()
        app = server.url("app").replace("unix://", "unix://app:pw@")
        with zkv.connect(app) as kv:
            kv["a"] = 1
            assert kv.incr("a") == 2 and list(kv) == ["a"] and kv.transact(len) == 1
            with kv.lock("l"), kv.watch(prefix="") as watch, \
                    kv.subscribe("c", prefix="p.") as sub:
                kv.set("b", 2, ttl=0.2)
                kv.publish("p.x", "x")
                assert sub.receive(timeout=10) == "x"
                assert [watch.receive(timeout=10).kind for _ in range(2)] == ["set",
                                                                             "expire"]
        with zkv.connect(app.replace("app:pw", "app:pw").replace("=app", "=other")) as kv:
            with pytest.raises(zkv.AuthenticationError, match="NOPERM"):
                kv["x"] = 1
        narrow = server.url("app").replace("unix://", "unix://narrow:pw@")
        with zkv.connect(narrow) as kv:
            with kv.subscribe("c") as sub:  # exact channels: allowed by &{app}:*
                kv.publish("c", 1)
                assert sub.receive(timeout=10) == 1
            started = time.monotonic()
            with pytest.raises(zkv.AuthenticationError, match="NOPERM"):
                kv.subscribe(prefix="p.")  # a pattern: ACLs must allow it literally
            with pytest.raises(zkv.AuthenticationError, match="NOPERM"):
                kv.on_subscriber_receive("p.", prefix=True)(print)
            assert time.monotonic() - started < 10
            got: list[Any] = []
            kv.on_subscriber_receive("c")(got.append)  # the dispatcher still works
            kv.publish("c", 2)
            wait_for(lambda: got == [2], what="the callback")

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
    def test_tls(self, tmp_path: Path) -> None:
        ca, cert, key = _certificates(tmp_path)
        other_ca, _, _ = _certificates(tmp_path / "other")
        port = free_port()
        srv = _start(RedisServer(args=["--tls-port", str(port), "--tls-cert-file", cert,
                                       "--tls-key-file", key, "--tls-ca-cert-file", ca,
                                       "--tls-auth-clients", "no", "--requirepass", "pw"]))
        try:
            url = f"rediss://:pw@127.0.0.1:{port}/0?namespace=tls&ssl_ca_certs={ca}"
            with zkv.connect(url) as kv:
                kv["a"] = [1]
                with kv.subscribe("ch") as sub:
                    kv.publish("ch", "over tls")
                    assert sub.receive(timeout=10) == "over tls"
                assert kv["a"] == [1]
            with pytest.raises(zkv.ZkvConnectionError):
                zkv.connect(url.replace(ca, other_ca), timeout=5)
        finally:
            srv.stop()


def _certificates(where: Path) -> tuple[str, str, str]:
    """A CA, and a server certificate for 127.0.0.1 that it signed."""
    where.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True,
                       timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=zkv-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
        "server.key", "-out", "server.csr")
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return str(where / "ca.pem"), str(where / "server.pem"), str(where / "server.key")


# -- namespaces and values -----------------------------------------------------------------------

class TestNamespaces:
    """Programs sharing one database see only their namespace."""

    def test_isolated(self, server: RedisServer) -> None:
        raw = server.client()
        raw.set("someone-else", "x")
        with zkv.connect(server.url("a")) as a, zkv.connect(server.url("b")) as b, \
                zkv.connect(server.url("x"), namespace="a") as also_a:
            a.update({"k": 1, "p.1": 2})
            b["k"] = "b's"
            assert also_a["k"] == 1  # the keyword argument wins over the URL's
            assert sorted(a) == ["k", "p.1"] and len(a) == 2 and list(b) == ["k"]
            assert a.get_all() == {"k": 1, "p.1": 2} and list(a.scan()) != []
            with b.subscribe("ch") as sub_b, a.watch() as watch_a:
                a.publish("ch", "for a")
                b.publish("ch", "for b")
                assert sub_b.receive_message(timeout=10).data == "for b"
                a.clear()
                assert len(a) == 0 and b["k"] == "b's"
                assert {watch_a.receive(timeout=10).key for _ in range(2)} == {"k", "p.1"}
        assert raw.get("someone-else") == b"x"
        raw.close()

    def test_glob_characters_in_names_are_plain(self, store: zkv.Store) -> None:
        store.update({"a*": 1, "a?b": 2, "a[1]": 3, "ab": 4, "a\\": 5})
        assert sorted(store.keys("a*")) == ["a*"] and store.delete_prefix("a[") == 1
        assert sorted(store) == ["a*", "a?b", "a\\", "ab"]


class TestValuesOtherClientsRead:
    """Integers are stored as digits (INCRBY works on them natively; any client reads them);
    everything else is zkv's pickle; a foreign string reads as bytes."""

    def test_integers_and_others(self, server: RedisServer, store: zkv.Store) -> None:
        raw = server.client()
        try:
            store["n"] = 41
            assert raw.get("{app}:v:n") == b"41"
            raw.incrby("{app}:v:n", 1)
            assert store["n"] == 42 and store.incr("n", 8) == 50
            assert raw.get("{app}:v:n") == b"50"
            store.set("t", 1, ttl=100)
            store.incr("t")
            assert raw.get("{app}:v:t") == b"2" and raw.pttl("{app}:v:t") > 90_000
            store["f"] = 1.5
            assert raw.get("{app}:v:f")[:1] == b"\x80" and store.incr("f", 1) == 2.5
            store["big"] = 2 ** 70
            assert store.incr("big") == 2 ** 70 + 1  # past 64 bits: pickled, still exact
            store["b"] = True
            assert store["b"] is True
            raw.set("{app}:v:foreign", "written by redis-cli")
            raw.set("{app}:v:digits", "-17")
            assert store["foreign"] == b"written by redis-cli" and store["digits"] == -17
            store["big_overflow"] = (1 << 63) - 1
            assert store.incr("big_overflow") == 1 << 63
            store["past_double"] = 1 << 62  # (digits a Lua number would lose)
            with store.watch("past_double") as watch:
                assert store.incr("past_double", 3) == (1 << 62) + 3
                assert watch.receive(timeout=10).value == (1 << 62) + 3
            assert store.compare_and_set("n", threading.Lock(), 0) is False  # not equal
            assert store["n"] == 50
            raw.hset("{app}:v:hash", "f", "v")
            with pytest.raises(TypeError, match="Redis type"):
                store.get("hash")
        finally:
            raw.close()

    def test_callables_and_main_objects(self, store: zkv.Store) -> None:
        factor = 3
        store["fn"] = lambda x: x * factor
        assert call_in_child(mp.get_context("spawn"), _call_stored, store.endpoint, "fn",
                             5) == 15


def _call_stored(endpoint: str, key: str, arg: Any) -> Any:
    with zkv.connect(endpoint) as kv:
        return kv[key](arg)


class TestOperationTable:
    """Every operation of zkv.ops has a Redis implementation, or a reason not to."""

    def test_every_operation_is_covered(self) -> None:
        missing = sorted(set(ops.OPS) - set(IMPLEMENTATIONS) - set(NOT_APPLICABLE))
        assert missing == [], f"operations without a Redis implementation: {missing}"
        assert not set(IMPLEMENTATIONS) & set(NOT_APPLICABLE)
        assert set(IMPLEMENTATIONS) | set(NOT_APPLICABLE) <= set(ops.OPS)
        used_by_stores = {op.name for op in ops.OPS.values() if not op.remote_only}
        assert used_by_stores - {"pipeline", "save"} <= set(IMPLEMENTATIONS)

    def test_without_hiredis(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """hiredis is optional: without it commands are packed by redis-py's own packer,
        to the same bytes."""
        import hiredis

        from zkv.backends.redis import _packer

        command = ("EVALSHA", "ab" * 20, 2, "{ns}:v:k", b"{ns}:v:\xed\xb2\x80", b"\x80\x05.", 7)
        monkeypatch.setitem(sys.modules, "hiredis", None)
        assert _packer()(command) == hiredis.pack_command(command)

    def test_the_read_cache_is_refused_clearly(self, store: zkv.Store) -> None:
        with pytest.raises(UnsupportedError, match="read cache") as info:
            store.enable_cache()
        assert isinstance(info.value, NotImplementedError)
        assert store.cache_info()["hits"] == 0
        store.disable_cache()

    def test_a_snapshot_is_refused_clearly(self, store: zkv.Store, tmp_path: Any) -> None:
        """Redis persists its data itself: save() names what to configure instead, sync and
        awaited, and writes nothing."""
        with pytest.raises(UnsupportedError, match="appendonly"):
            store.save(str(tmp_path / "x.zkv"))

        async def awaited() -> None:
            await zkv.AsyncStore(store).save(str(tmp_path / "x.zkv"))
        with pytest.raises(UnsupportedError, match="appendonly"):
            asyncio.run(awaited())
        assert list(tmp_path.iterdir()) == []


# -- optimistic operations -------------------------------------------------------------------------

def _modify_many(endpoint: str, times: int) -> int:
    with zkv.connect(endpoint) as kv:
        for _ in range(times):
            kv.modify("count", lambda n: n + 1, default=0)
    return times


def _incr_float(endpoint: str, times: int) -> None:
    with zkv.connect(endpoint) as kv:
        for _ in range(times):
            kv.incr("f", 0.5)


def _pipelines(endpoint: str, times: int) -> None:
    with zkv.connect(endpoint) as kv:
        for _ in range(times):
            with kv.pipeline() as p:
                p.modify("n", lambda n: n + 1, 0).incr("m")


def _move_money(endpoint: str, times: int, me: int) -> None:
    with zkv.connect(endpoint) as kv:
        for i in range(times):
            def move(m: Any, i: int = i) -> None:
                src, dst = f"acct{(me + i) % 4}", f"acct{(me + i + 1) % 4}"
                m[src] -= 1
                m[dst] += 1
                m["moves"] = m.get("moves", 0) + 1
            kv.transact(move)


class TestContention:
    """modify and transact run the function in the caller and retry when another writer
    came in between: exact under contention, and a clear error when it never gets through."""

    @pytest.mark.timeout(120)
    def test_8_processes_500_modify_each(self, store: zkv.Store) -> None:
        ctx = mp.get_context("fork")
        with ctx.Pool(8) as pool:
            done = pool.starmap(_modify_many, [(store.endpoint, 500)] * 8)
        assert sum(done) == 4000 and store["count"] == 4000

    @pytest.mark.timeout(120)
    def test_transactions_keep_the_sum(self, store: zkv.Store) -> None:
        store.update({f"acct{i}": 100 for i in range(4)})
        procs = [mp.get_context("fork").Process(target=_move_money,
                                                args=(store.endpoint, 100, me))
                 for me in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(100)
            assert proc.exitcode == 0
        accounts = store.get_many([f"acct{i}" for i in range(4)])
        assert sum(accounts.values()) == 400 and store["moves"] == 400

    @pytest.mark.timeout(120)
    def test_float_incr(self, store: zkv.Store) -> None:
        """incr of a float (not INCRBY: compare-and-set) is exact under contention too."""
        store["f"] = 0.0
        with mp.get_context("fork").Pool(4) as pool:
            pool.starmap(_incr_float, [(store.endpoint, 100)] * 4)
        assert store["f"] == 200.0

    @pytest.mark.timeout(120)
    def test_pipelines_are_atomic(self, store: zkv.Store) -> None:
        with mp.get_context("fork").Pool(4) as pool:
            pool.starmap(_pipelines, [(store.endpoint, 100)] * 4)
        assert store.get_many(["n", "m"]) == {"n": 400, "m": 400}

    def test_contention_that_never_ends_is_an_error(self, server: RedisServer) -> None:
        raw = server.client()
        calls = []

        def always_overtaken(old: int) -> int:
            calls.append(old)
            raw.set("{app}:v:hot", str(len(calls) * 1000))  # another writer, every time
            return old + 1

        with zkv.connect(server.url("app"), timeout=0.5) as kv:
            kv["hot"] = 0
            with pytest.raises(ContentionError, match="gave up") as info:
                kv.modify("hot", always_overtaken)
            assert isinstance(info.value, TimeoutError) and len(calls) > 1
            assert kv["hot"] == len(calls) * 1000  # the other writer's value: ours never
            with pytest.raises(ContentionError):
                kv.transact(lambda m: always_overtaken(m["hot"]) and m.update(hot=-1))
            assert kv["hot"] != -1
        raw.close()

    def test_a_function_may_run_again_and_its_last_run_wins(self, store: zkv.Store) -> None:
        store["x"] = 1
        seen: list[int] = []
        barrier = threading.Event()

        def slow_double(old: int) -> int:
            seen.append(old)
            if len(seen) == 1:
                store.set("x", 10)  # overtaken once
            barrier.set()
            return old * 2
        assert store.modify("x", slow_double) == 20
        assert seen == [1, 10] and store["x"] == 20


# -- locks -----------------------------------------------------------------------------------------

def _hold_and_report(endpoint: str, conn: Any) -> None:
    kv = zkv.connect(endpoint)
    lock = kv.lock("job")
    lock.acquire()
    conn.send("held")
    conn.recv()  # until killed or stopped


class TestLeases:
    """A lock is a lease: renewed while held, freed a lease after its holder stops."""

    def test_renewed_while_held(self, server: RedisServer) -> None:
        url = server.url("app", lease=0.3)
        with zkv.connect(url) as holder, zkv.connect(url) as other:
            lock = holder.lock("l")
            lock.acquire()
            until = time.monotonic() + 1.5  # five leases
            wait_for(lambda: time.monotonic() > until, timeout=30, what="five leases")
            assert other.lock("l").acquire(blocking=False) is False  # renewed all along
            lock.release()
            assert other.lock("l").acquire(timeout=5)

    def test_a_stopped_holder_loses_it(self, server: RedisServer) -> None:
        url = server.url("app", lease=0.5)
        ctx = mp.get_context("fork")
        mine, theirs = ctx.Pipe()
        holder = ctx.Process(target=_hold_and_report, args=(url, theirs))
        holder.start()
        try:
            assert mine.poll(20) and mine.recv() == "held"
            with zkv.connect(url) as other:
                assert other.lock("job").acquire(blocking=False) is False
                assert holder.pid is not None
                os.kill(holder.pid, signal.SIGSTOP)  # it cannot renew now
                stopped = time.monotonic()
                assert other.lock("job").acquire(timeout=20)
                assert time.monotonic() - stopped >= 0.3  # (not before its lease ran out)
        finally:
            if holder.pid is not None:
                os.kill(holder.pid, signal.SIGKILL)
            holder.join(10)

    def test_release_after_the_lease_ran_out_says_so(self, server: RedisServer) -> None:
        url = server.url("app", lease=0.3)
        with zkv.connect(url) as kv:
            lock = kv.lock("l")
            lock.acquire()
            raw = server.client()
            raw.set("{app}:l:l", "someone else")  # as if it ran out and was taken
            raw.close()
            wait_for(lambda: not kv._core.keeper._held, timeout=10,  # type: ignore
                     what="the keeper to notice")
            with pytest.raises(zkv.LockError, match="no longer held"):
                lock.release()
            raw = server.client()
            assert raw.get("{app}:l:l") == b"someone else"  # the other holder keeps it
            raw.close()


# -- pub/sub losses, restarts, failures ---------------------------------------------------------

class _SlowLink:
    """A unix-socket proxy to a server that holds back, for ``delay`` seconds, every chunk a
    client sends that contains ``hold``: a subscription that is slow to reach Redis."""

    def __init__(self, target: str, path: str, hold: bytes, delay: float) -> None:
        import socket as socket_module

        self._socket = socket_module
        self.target, self.path, self.hold, self.delay = target, path, hold, delay
        self._listener = socket_module.socket(socket_module.AF_UNIX)
        self._listener.bind(path)
        self._listener.listen(16)
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = self._socket.socket(self._socket.AF_UNIX)
            server.connect(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: Any, sink: Any, outgoing: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if outgoing and self.hold in data:
                    threading.Event().wait(self.delay)  # the slow link
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass
            source.close()  # (the other direction's thread closes the other end)

    def close(self) -> None:
        self._stopping = True
        self._listener.close()


class TestLiveOnReturn:
    """subscribe() returns once Redis has the subscription: a subscription that takes long to
    reach Redis still gets a message published right after subscribe() returned."""

    def test_over_a_slow_link(self, server: RedisServer, tmp_path: Path) -> None:
        link = _SlowLink(server.socket_path, str(tmp_path / "slow.sock"),
                         hold=b"{app}:c:held", delay=0.5)
        try:
            with zkv.connect(f"unix://{link.path}?namespace=app") as far, \
                    zkv.connect(server.url("app")) as near:
                with far.subscribe("held") as sub:
                    near.publish("held", "right after")  # (straight to Redis)
                    assert sub.receive(timeout=10) == "right after"
                got: list[Any] = []
                far.on_subscriber_receive("held")(got.append)
                near.publish("held", "to the callback")
                wait_for(lambda: got == ["to the callback"], what="the callback")
        finally:
            link.close()


class TestLossesAreCounted:
    """Redis drops a subscriber that falls too far behind, and forgets everything when it
    restarts without persistence: the subscriber reconnects by itself and counts what it
    missed."""

    @pytest.mark.timeout(120)
    def test_output_buffer_limit(self, server: RedisServer, store: zkv.Store) -> None:
        raw = server.client()
        raw.config_set("client-output-buffer-limit", "pubsub 65536 0 0")
        payload = "x" * 1000

        def subscribed(channel: str) -> int:
            return int(dict(raw.pubsub_numsub(channel))[channel.encode()])
        with store.subscribe("flood") as sub, store.watch("w") as watch:
            sent = 0
            # Publish (and write the watched key) until Redis has dropped both subscribers.
            while subscribed("{app}:c:flood") or subscribed("{app}:w:w"):
                store.publish("flood", (sent, payload))
                store.set("w", (sent, payload))
                sent += 1
                assert sent < 100_000
            for _ in range(10):  # while they are away
                store.publish("flood", (sent, payload))
                store.set("w", (sent, payload))
                sent += 1
            got: list[zkv.Message] = []
            changes: list[zkv.Change] = []

            def everything_accounted_for() -> bool:
                for reader, out in ((sub.receive_message, got), (watch.receive, changes)):
                    try:
                        out.append(reader(timeout=0.05))
                    except zkv.ZkvTimeoutError:
                        pass
                return len(got) + sub.dropped == sent and \
                    len(changes) + watch.dropped == sent
            wait_for(everything_accounted_for, timeout=60, interval=0,
                     what="every message received or counted as dropped")
            numbers = [m.data[0] for m in got]
            assert numbers == sorted(numbers) and [m.seq - 1 for m in got] == numbers
            assert sub.dropped > 0 and watch.dropped > 0
            values = [c.value[0] for c in changes]
            assert values == sorted(values) and all(c.kind == "set" for c in changes)
            store.publish("flood", "live again")  # reconnected: nothing is lost from here
            store.set("w", "live again")
            assert sub.receive(timeout=10) == "live again"
            assert watch.receive(timeout=10).value == "live again"
        raw.close()

    @pytest.mark.parametrize("persistent", [False, True], ids=["no-persistence", "aof"])
    def test_restart(self, persistent: bool) -> None:
        srv = _start(RedisServer(persistent=persistent))
        try:
            with zkv.connect(srv.url("app")) as kv:
                sub = kv.subscribe("ch")
                watch = kv.watch(prefix="k")
                got: list[Any] = []
                kv.on_subscriber_receive("ch")(got.append)
                kv.publish("ch", "before")
                kv.set("k1", "before")
                assert sub.receive(timeout=10) == "before"
                assert watch.receive(timeout=10).value == "before"
                wait_for(lambda: got == ["before"], what="the callback")
                srv.restart()
                kv["k2"] = "after restart"  # the store reconnects by itself
                for i in range(5):  # published before the subscribers are back
                    kv.publish("ch", i)
                for reader in (sub.receive, watch.receive):
                    with pytest.raises(zkv.ZkvTimeoutError):
                        reader(timeout=0.5)  # (it reconnects and learns what it missed)
                assert sub.dropped == 5 and watch.dropped == 1  # (k2, set while away)
                kv.publish("ch", "after")
                kv["k3"] = "after"
                assert sub.receive_message(timeout=10).data == "after"
                assert watch.receive(timeout=10).key == "k3"
                wait_for(lambda: got[-1:] == ["after"], what="the callback, again")
                assert kv.dropped == 5 and got == ["before", "after"]
                sub.close()
                watch.close()
        finally:
            srv.stop()

    def test_stopped_redis_times_out(self, server: RedisServer) -> None:
        with zkv.connect(server.url("app"), timeout=0.5) as kv:
            kv["a"] = 1
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(zkv.ZkvTimeoutError):
                    kv.get("a")
                assert time.monotonic() - started < 10
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert kv.get("a") == 1  # (a connection that timed out is replaced)


_IN_FN = "zkv-test-in-fn"


def _transact_forever(endpoint: str) -> None:
    kv = zkv.connect(endpoint, timeout=5)
    while True:
        try:
            kv.transact(lambda m: m.update(a=m["a"] + 1, b=m["b"] + 1))
        except zkv.ZkvError:
            return


def _modify_and_hang(endpoint: str, flag: str) -> None:
    kv = zkv.connect(endpoint)

    def hang(old: int) -> int:
        Path(flag).touch()
        threading.Event().wait(60)  # killed meanwhile
        return old + 1
    kv.modify("slow", hang, default=0)


class TestNeverHalfApplied:
    """A transaction is one MULTI/EXEC: Redis killed before it applied nothing, after it
    everything; a caller killed inside its function applies nothing."""

    @pytest.mark.timeout(120)
    def test_redis_killed_under_a_stream_of_transactions(self) -> None:
        srv = _start(RedisServer(persistent=True))
        try:
            with zkv.connect(srv.url("app")) as kv:
                kv.update(a=0, b=0)
            worker = mp.get_context("fork").Process(target=_transact_forever,
                                                    args=(srv.url("app"),))
            worker.start()
            check = srv.client()
            wait_for(lambda: int(check.get("{app}:v:a") or 0) > 50, timeout=60,
                     what="transactions under way")
            check.close()
            srv.kill()
            worker.join(30)
            assert worker.exitcode == 0  # it got a connection error, no hang
            srv.restart()
            with zkv.connect(srv.url("app")) as kv:
                assert kv["a"] == kv["b"] > 50
        finally:
            srv.stop()

    def test_redis_killed_inside_the_function(self) -> None:
        srv = _start(RedisServer(persistent=True))
        try:
            with zkv.connect(srv.url("app"), timeout=2) as kv:
                kv.update(a=1, b=1)

                def half(m: Any) -> None:
                    m["a"] = 2
                    srv.kill()
                    m["b"] = 2
                with pytest.raises(zkv.ZkvConnectionError):
                    kv.transact(half)
            srv.restart()
            with zkv.connect(srv.url("app")) as kv:
                assert kv.get_many(["a", "b"]) == {"a": 1, "b": 1}
        finally:
            srv.stop()

    def test_caller_killed_inside_modify(self, store: zkv.Store, tmp_path: Path) -> None:
        flag = tmp_path / "in-fn"
        proc = mp.get_context("fork").Process(target=_modify_and_hang,
                                              args=(store.endpoint, str(flag)))
        proc.start()
        wait_for(flag.exists, timeout=30, what="the function to run")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert "slow" not in store
        assert store.modify("slow", lambda n: n + 1, default=0) == 1


# -- fork ------------------------------------------------------------------------------------------

_PARENT: zkv.Store | None = None


def _child_uses_own_connections(parent_ids: set[int]) -> dict[str, Any]:
    import redis.connection

    touched: list[str] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        if id(self) in parent_ids:
            touched.append(repr(self))
        return original(self, *args, **kwargs)
    redis.connection.AbstractConnection.send_packed_command = spy  # type: ignore
    assert _PARENT is not None
    _PARENT.incr("n")
    with _PARENT.lock("in-child"):
        pass
    with _PARENT.subscribe("x") as sub:
        _PARENT.publish("x", 1)
        sub.receive(timeout=10)
    return {"touched": touched, "n": _PARENT["n"], "core": id(_PARENT._core)}


class TestFork:
    """A forked child never uses its parent's Redis connections: the inherited store makes
    its own on first use, and the parent's keep working."""

    def test_child_opens_its_own(self, store: zkv.Store) -> None:
        global _PARENT
        store["n"] = 0
        with store.lock("warm"):
            pass
        pool = store._core.client.connection_pool  # type: ignore[attr-defined]
        ids = {id(c) for c in [*pool._available_connections, *pool._in_use_connections]}
        assert ids
        _PARENT = store
        try:
            for _ in range(2):
                result = call_in_child(mp.get_context("fork"), _child_uses_own_connections,
                                       ids)
                assert result["touched"] == []
                assert result["core"] != id(store._core)  # a core of its own, made there
        finally:
            _PARENT = None
        assert store["n"] == 2 and result["n"] == 2


# -- Cluster and Sentinel --------------------------------------------------------------------------

def _battery() -> str:
    from test_store_api import _api_battery

    return _api_battery(zkv.store())


class TestClusterAndSentinel:
    """The whole API on a Redis Cluster (keys of a namespace share one hash slot, so multi-key
    operations and scripts are legal there) and through Sentinel."""

    @pytest.mark.timeout(90)
    def test_cluster(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        port = free_port(below=55536)  # (the cluster bus listens on port + 10000)
        srv = _start(RedisServer(port=port, args=[
            "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf")]))
        try:
            raw = srv.client()
            raw.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_for(lambda: b"cluster_state:ok" in raw.execute_command("CLUSTER", "INFO"),
                     timeout=30, what="the cluster to be up")
            raw.close()
            url = f"redis+cluster://127.0.0.1:{port}?namespace=app"
            monkeypatch.setenv("ZKV_ENDPOINT", url)
            with zkv.store() as kv:
                assert _battery() == "ok"
                kv.set_many({f"k{i}": i for i in range(100)}, ttl=60)
                assert len(kv.get_many([f"k{i}" for i in range(100)])) == 100
                with kv.watch(prefix="k") as watch, kv.subscribe(prefix="c") as sub:
                    kv.transact(lambda m: m.update(k1=-1))
                    kv.publish("c1", "hi")
                    assert watch.receive(timeout=10).value == -1
                    assert sub.receive(timeout=10) == "hi"
                assert call_in_child(mp.get_context("spawn"), _battery) == "ok"
        finally:
            srv.stop()

    @pytest.mark.timeout(90)
    def test_sentinel(self, tmp_path: Path) -> None:
        port = free_port()
        master = _start(RedisServer(port=port))
        sentinel_port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\n"
                        f"sentinel monitor mymaster 127.0.0.1 {port} 1\n")
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        assert binary is not None
        sentinel = subprocess.Popen([binary, str(conf), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            probe = redis.Redis(port=sentinel_port, protocol=2)
            wait_for(functools.partial(_knows_master, probe), timeout=30,
                     what="the sentinel to know its master")
            probe.close()
            url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster?namespace=app"
            with zkv.connect(url) as kv:
                kv["a"] = 1
                assert kv.incr("a") == 2 and kv.transact(lambda m: m["a"]) == 2
                with kv.subscribe("ch") as sub:
                    kv.publish("ch", "via sentinel")
                    assert sub.receive(timeout=10) == "via sentinel"
        finally:
            sentinel.terminate()
            sentinel.wait(10)
            master.stop()


    @pytest.mark.timeout(90)
    def test_sentinel_failover(self, tmp_path: Path) -> None:
        """After a failover the store works again by itself, on the new master, with the
        data replicated before it; a subscriber follows."""
        import redis

        port, replica_port, sentinel_port = free_port(), free_port(), free_port()
        master = _start(RedisServer(port=port))
        replica = _start(RedisServer(port=replica_port,
                                     args=["--replicaof", "127.0.0.1", str(port)]))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\n"
                        f"sentinel monitor mymaster 127.0.0.1 {port} 1\n"
                        "sentinel down-after-milliseconds mymaster 1000\n"
                        "sentinel failover-timeout mymaster 5000\n")
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        assert binary is not None
        sentinel = subprocess.Popen([binary, str(conf), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=sentinel_port, protocol=2)
        try:
            wait_for(lambda: _master_port(probe) == port, timeout=30, what="the sentinel")
            url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster?namespace=app"
            with zkv.connect(url, timeout=5) as kv:
                kv.update(a=1, b=[2])
                follower = replica.client()
                wait_for(lambda: follower.get("{app}:v:a") == b"1", timeout=30,
                         what="the replica to have the data")
                follower.close()
                with kv.subscribe("ch") as sub:
                    wait_for(lambda: probe.execute_command("SENTINEL", "FAILOVER",
                                                           "mymaster"), timeout=30,
                             what="the sentinel to accept a failover")
                    wait_for(lambda: _master_port(probe) == replica_port, timeout=30,
                             what="the failover")
                    _eventually(lambda: kv.set("after", "failover"))
                    assert kv.get_many(["a", "b", "after"]) == {"a": 1, "b": [2],
                                                                "after": "failover"}
                    assert kv.incr("a") == 2
                    kv.publish("ch", "on the new master")
                    assert sub.receive(timeout=20) == "on the new master"
        finally:
            probe.close()
            sentinel.terminate()
            sentinel.wait(10)
            replica.stop()
            master.stop()

def _master_port(probe: Any) -> int | None:
    try:
        host_port = probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
    except Exception:
        return None
    return int(host_port[1]) if host_port else None


def _eventually(call: Any) -> Any:
    """``call()`` once it stops failing with a connection error (a failover is under way)."""
    outcome: list[Any] = []

    def attempt() -> bool:
        try:
            outcome.append(call())
        except zkv.ZkvConnectionError:
            return False
        return True
    wait_for(attempt, timeout=30, interval=0.05, what="the store to work again")
    return outcome[-1]


def _knows_master(probe: Any) -> bool:
    try:
        return bool(probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"))
    except Exception:
        return False
