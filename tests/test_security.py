"""tcp endpoints: only peers holding an allowed CURVE key get in, a refused client is told at
once, `zkv keygen` makes private credentials, `zkv serve` runs a standalone owner, and a dead
peer on either side of a tcp link is noticed quickly."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

import zkv
from zkv import keygen
from zkv.auth import ClientKeys
from zkv.testing import wait_for

LOOPBACK = "tcp://127.0.0.1:0"
#: Seconds: a generous bound for "fast" failures on a loaded 2-core machine (about 0.1 s is
#: expected; a client that was not told would wait for its HELLO, 10 s, or its 30 s timeout,
#: and would raise another exception than the one each test expects).
FAST = 15.0
#: Seconds: calls on a store that knows its owner is gone fail without waiting.
AT_ONCE = 10.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An owner key directory made by keygen, with clients "client" and "alice"."""
    directory = tmp_path_factory.mktemp("keys") / "zkv-keys"
    keygen.make_keys(directory)
    keygen.make_client(directory, "alice")
    return directory


@pytest.fixture(autouse=True)
def _no_keys_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test states its credentials; none leaks ZKV_KEYS."""
    monkeypatch.delenv("ZKV_KEYS", raising=False)
    yield
    assert "ZKV_KEYS" not in os.environ, "a test leaked ZKV_KEYS"


@pytest.fixture
def tcp_owner(keys: Path) -> Iterator[zkv.Store]:
    """An owner in this process on an authenticated loopback tcp port."""
    with zkv.serve(LOOPBACK, keys=keys, heartbeat=0.2) as owner:
        yield owner


def _zkv_serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str],
                                                                         dict[str, str]]:
    """Start `zkv serve ARGS`; return it and the NAME=value lines it printed first."""
    proc = subprocess.Popen([sys.executable, "-m", "zkv", "serve", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    announced: dict[str, str] = {}
    for line in proc.stdout:
        if line.startswith("#"):
            break
        name, _sep, value = line.strip().partition("=")
        announced[name] = value
    if "ZKV_ENDPOINT" not in announced:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"zkv serve did not start: {err}")
    return proc, announced


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# -- keygen ------------------------------------------------------------------------------------


class TestKeygen:
    """`zkv keygen DIR` makes an owner and a client keypair that only this user can read."""

    def test_private_permissions_and_layout(self, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        directory = tmp_path / "k"
        assert keygen.main([str(directory)]) == 0
        out = capsys.readouterr().out
        assert str(directory / "client") in out and "--keys" in out
        files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))
        assert files == ["client", "client/client.key_secret", "client/server.key", "clients",
                         "clients/client.key", "server.key", "server.key_secret"]
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for path in directory.rglob("*"):
            want = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == want, path

    def test_refuses_to_overwrite_and_adds_clients(self, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        directory = tmp_path / "k"
        assert keygen.main([str(directory)]) == 0
        before = (directory / "server.key_secret").read_bytes()
        assert keygen.main([str(directory)]) == 1
        assert "not empty" in capsys.readouterr().err
        assert (directory / "server.key_secret").read_bytes() == before
        assert keygen.main([str(directory), "--client", "bob"]) == 0
        assert stat.S_IMODE((directory / "bob" / "bob.key_secret").stat().st_mode) == 0o600
        assert (directory / "clients" / "bob.key").is_file()

    def test_secret_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        directory = tmp_path / "k"
        keygen.make_keys(directory)
        os.chmod(directory / "server.key_secret", 0o644)
        with pytest.raises(zkv.AuthenticationError, match="chmod 600"):
            zkv.serve(LOOPBACK, keys=directory)


# -- no credentials, wrong credentials ---------------------------------------------------------


class TestCredentialsRequired:
    """tcp is never opened without credentials, and the error says how to make them."""

    def test_serve_tcp_without_keys_is_refused(self) -> None:
        before = os.environ.get("ZKV_ENDPOINT")
        with pytest.raises(zkv.AuthenticationError, match="zkv keygen"):
            zkv.serve(LOOPBACK)
        assert os.environ.get("ZKV_ENDPOINT") == before

    def test_connect_tcp_without_keys_is_refused(self, tcp_owner: zkv.Store,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("ZKV_KEYS")  # exported by the owner for its children
        started = time.monotonic()
        with pytest.raises(zkv.AuthenticationError, match="zkv keygen"):
            zkv.connect(tcp_owner.endpoint, keys=None)
        assert time.monotonic() - started < FAST

    def test_zkv_serve_tcp_without_keys_exits_with_the_howto(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ZKV_KEYS"}
        done = subprocess.run([sys.executable, "-m", "zkv", "serve", "--bind", LOOPBACK],
                              capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 1
        assert "zkv keygen" in done.stderr


class TestRefusedPeers:
    """A peer without an allowed key gets an AuthenticationError at once (client) or nothing
    at all (raw socket), and the owner goes on serving."""

    def test_unknown_client_key(self, tcp_owner: zkv.Store, keys: Path) -> None:
        server_key = (keys / "client" / "server.key")
        stranger_public, stranger_secret = zmq.curve_keypair()
        wrong = ClientKeys(zmq.auth.load_certificate(server_key)[0], stranger_public,
                           stranger_secret)
        started = time.monotonic()
        with pytest.raises(zkv.AuthenticationError, match="refused this client's key"):
            zkv.connect(tcp_owner.endpoint, keys=wrong)
        assert time.monotonic() - started < FAST
        assert tcp_owner.stats()["refused_auth"] >= 1

    def test_wrong_server_key(self, tcp_owner: zkv.Store, keys: Path) -> None:
        public, secret = zmq.auth.load_certificate(keys / "client" / "client.key_secret")
        assert secret is not None
        impostor_server, _ = zmq.curve_keypair()
        started = time.monotonic()
        with pytest.raises(zkv.AuthenticationError, match="server key"):
            zkv.connect(tcp_owner.endpoint, keys=ClientKeys(impostor_server, public, secret))
        assert time.monotonic() - started < FAST

    def test_revoked_client_is_refused(self, tmp_path: Path) -> None:
        directory = tmp_path / "k"
        keygen.make_keys(directory)
        keygen.make_client(directory, "bob")
        with zkv.serve(LOOPBACK, keys=directory) as owner:
            zkv.connect(owner.endpoint, keys=directory / "bob").close()
            (directory / "clients" / "bob.key").unlink()
            with pytest.raises(zkv.AuthenticationError):
                zkv.connect(owner.endpoint, keys=directory / "bob")
            zkv.connect(owner.endpoint, keys=directory / "client").close()

    def test_plain_zmq_peers_get_nothing(self, tcp_owner: zkv.Store, keys: Path) -> None:
        good = zkv.connect(tcp_owner.endpoint, keys=keys / "client")
        ctx = zmq.Context()
        try:
            watcher = good.subscribe("news")
            dealer = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.connect(tcp_owner.endpoint)
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(good._core.conn.pub_address)
            refused = tcp_owner.stats()["refused_auth"]
            # HELLO, then a SET: what a zkv client would send (header: rid u32, op u8).
            dealer.send_multipart([b"zkv-helo\x03\x00" + b'{"pid": 1, "host": "x"}'])
            dealer.send_multipart([b"\x02\0\0\0\x02\x00", b"k", b"", b"\x80\x04K\x01."])
            wait_for(lambda: tcp_owner.stats()["refused_auth"] >= refused + 2,
                     what="the owner refused both plain sockets")
            tcp_owner.publish("news", "for members only")
            assert watcher.receive(FAST) == "for members only"
            assert not dealer.poll(200) and not sub.poll(0)
            assert "k" not in tcp_owner
            good["still"] = "served"
            assert tcp_owner["still"] == "served"
            assert tcp_owner.stats()["sessions"] == 1
        finally:
            ctx.destroy(0)
            good.close()


class TestClientKeysWhileServing:
    """Adding a client's key file lets that client in, and deleting it refuses the client's new
    connections, without restarting the owner; a connection already open stays."""

    def test_add_then_revoke(self, tmp_path: Path) -> None:
        directory = tmp_path / "k"
        keygen.make_keys(directory)
        with zkv.serve(LOOPBACK, keys=directory) as owner:
            zkv.connect(owner.endpoint, keys=directory / "client").close()  # keys read now
            keygen.make_client(directory, "carol")  # added while the owner serves
            carol = zkv.connect(owner.endpoint, keys=directory / "carol")
            try:
                carol["from-carol"] = 1
                assert owner["from-carol"] == 1
                (directory / "clients" / "carol.key").unlink()
                with pytest.raises(zkv.AuthenticationError, match="refused this client's key"):
                    zkv.connect(owner.endpoint, keys=directory / "carol")
                carol["still"] = 2  # on the connection opened before
                assert owner["still"] == 2
            finally:
                carol.close()
            zkv.connect(owner.endpoint, keys=directory / "client").close()  # others: served


# -- a tcp store across processes --------------------------------------------------------------


def _tcp_client(endpoint: str, keys: str, ready: Any, results: Any) -> None:
    kv = zkv.connect(endpoint, keys=keys)
    with kv.subscribe("to-child") as sub:
        kv.set("child-ready", True)
        ready.set()
        results.put(sub.receive(30))
    kv.publish("to-owner", kv.get("from-owner") * 2)
    kv.incr("count", 5)
    with kv.lock("shared"):
        kv.set("locked-by-child", True)
    kv.close()


class TestTcpStore:
    """A tcp store with keys works across processes: get, set, atomic ops, locks, pub/sub."""

    def test_child_process_over_tcp(self, tcp_owner: zkv.Store, keys: Path) -> None:
        ctx = mp.get_context("spawn")
        ready, results = ctx.Event(), ctx.Queue()
        tcp_owner["from-owner"] = 21
        tcp_owner.incr("count")
        with tcp_owner.subscribe("to-owner") as from_child:
            child = ctx.Process(target=_tcp_client,
                                args=(tcp_owner.endpoint, str(keys / "alice"), ready, results))
            child.start()
            try:
                assert ready.wait(30)
                tcp_owner.publish("to-child", {"hello": "child"})
                assert results.get(timeout=30) == {"hello": "child"}
                assert from_child.receive(30) == 42
                child.join(30)
                assert child.exitcode == 0
            finally:
                if child.is_alive():
                    child.kill()
                child.join()
        assert tcp_owner["count"] == 6 and tcp_owner["locked-by-child"] is True

    def test_read_cache_is_invalidated_over_tcp(self, tcp_owner: zkv.Store, keys: Path) -> None:
        with zkv.connect(tcp_owner.endpoint, keys=keys / "alice") as kv:
            kv.enable_cache("cfg.")
            tcp_owner["cfg.rate"] = 1
            assert kv["cfg.rate"] == 1 and kv["cfg.rate"] == 1
            tcp_owner["cfg.rate"] = 2
            wait_for(lambda: kv["cfg.rate"] == 2, what="the invalidation arrived")
            assert kv.cache_info()["hits"] >= 1

    def test_children_inherit_endpoint_and_keys(self, tcp_owner: zkv.Store, keys: Path) -> None:
        assert os.environ["ZKV_ENDPOINT"] == tcp_owner.endpoint
        assert os.environ["ZKV_KEYS"] == str(keys)
        proc = mp.get_context("spawn").Process(target=_child_uses_global_store)
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        assert tcp_owner["global-child"] == os.environ["ZKV_ENDPOINT"]


def _child_uses_global_store() -> None:
    kv = zkv.store()
    kv.set("global-child", kv.endpoint)


# -- dead peers ----------------------------------------------------------------------------------


def _hold_lock_forever(endpoint: str, keys: str) -> None:
    kv = zkv.connect(endpoint, keys=keys)
    kv.lock("held").acquire()
    kv.set("holding", os.getpid())
    threading.Event().wait()


class TestDeadPeers:
    """Over tcp the owner's pid cannot be checked: the connection and heartbeats tell."""

    def test_owner_sigkilled_fails_pending_and_next_calls(self, keys: Path) -> None:
        proc, announced = _zkv_serve("--bind", LOOPBACK, "--keys", str(keys))
        try:
            endpoint = announced["ZKV_ENDPOINT"]
            holder = zkv.connect(endpoint, keys=keys / "client")
            waiter = zkv.connect(endpoint, keys=keys / "alice")
            holder.lock("L").acquire()
            sub = waiter.subscribe("never")
            errors: dict[str, BaseException] = {}

            def pending_lock() -> None:
                try:
                    waiter.lock("L").acquire(timeout=30)
                except BaseException as exc:
                    errors["lock"] = exc

            thread = threading.Thread(target=pending_lock, daemon=True)
            thread.start()
            wait_for(lambda: holder.stats()["locks"] == 2, what="the lock wait is pending")
            killed = time.monotonic()
            proc.kill()
            with pytest.raises(zkv.OwnerGoneError):
                sub.receive(30)
            thread.join(30)
            assert isinstance(errors.get("lock"), zkv.OwnerGoneError)
            assert time.monotonic() - killed < FAST
            started = time.monotonic()
            with pytest.raises(zkv.OwnerGoneError):
                waiter.get("x")
            with pytest.raises(zkv.OwnerGoneError):
                holder["x"] = 1
            assert time.monotonic() - started < AT_ONCE
            holder.close()
            waiter.close()
        finally:
            _stop(proc)

    def test_silent_owner_is_detected_by_heartbeats(self, keys: Path) -> None:
        proc, announced = _zkv_serve("--bind", LOOPBACK, "--keys", str(keys),
                                     env={"ZKV_HEARTBEAT": "0.2"})
        try:
            kv = zkv.connect(announced["ZKV_ENDPOINT"], keys=keys / "client", heartbeat=0.2)
            kv["x"] = 1
            proc.send_signal(signal.SIGSTOP)  # alive, but its sockets no longer answer
            started = time.monotonic()
            with pytest.raises(zkv.OwnerGoneError, match="heartbeats"):
                kv.get("x")
            assert time.monotonic() - started < FAST
            kv.close()
        finally:
            _stop(proc)

    @pytest.mark.parametrize("how", ["sigkill", "sigstop"])
    def test_dead_or_silent_client_releases_its_lock(self, tcp_owner: zkv.Store, keys: Path,
                                                     how: str) -> None:
        child = mp.get_context("fork").Process(
            target=_hold_lock_forever, args=(tcp_owner.endpoint, str(keys / "alice")))
        child.start()
        try:
            wait_for(lambda: tcp_owner.get("holding") == child.pid, timeout=30,
                     what="the child holds the lock")
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
            with tcp_owner.lock("held", timeout=FAST):
                pass
        finally:
            child.kill()
            child.join()


# -- zkv serve ---------------------------------------------------------------------------------


class TestZkvServe:
    """`zkv serve` announces what clients need, serves them, logs sessions, and exits 0 on
    SIGTERM/SIGINT with everything closed."""

    def test_tcp(self, keys: Path) -> None:
        proc, announced = _zkv_serve("--bind", LOOPBACK, "--keys", str(keys))
        try:
            assert announced["ZKV_KEYS"] == str(keys / "client")
            server_key = zmq.auth.load_certificate(keys / "server.key")[0]
            with pytest.raises(zkv.AuthenticationError):
                zkv.connect(announced["ZKV_ENDPOINT"],
                            keys=ClientKeys(server_key, *zmq.curve_keypair()))
            with zkv.connect(announced["ZKV_ENDPOINT"], keys=announced["ZKV_KEYS"]) as kv:
                kv["a"] = [1, 2]
                with kv.subscribe("c") as sub:
                    kv.publish("c", "m")
                    assert sub.receive(FAST) == "m"
                assert kv["a"] == [1, 2]
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert "HELLO" in err and "BYE" in err and "closed" in err
            assert "refused a connection from 127.0.0.1" in err
            with pytest.raises(zkv.NoOwnerError):
                zkv.connect(announced["ZKV_ENDPOINT"], keys=announced["ZKV_KEYS"])
        finally:
            _stop(proc)

    def test_ipc(self) -> None:
        proc, announced = _zkv_serve()
        try:
            endpoint = announced["ZKV_ENDPOINT"]
            assert endpoint.startswith("ipc://")
            directory = Path(endpoint[len("ipc://"):]).parent
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            with zkv.connect(endpoint) as kv:
                kv["x"] = 1
                assert kv.incr("x") == 2
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert not directory.exists()
        finally:
            _stop(proc)
