"""Where the sockets live and how processes leave: ipc sockets in a private 0700 directory with
paths that fit a unix socket address, nothing left behind after the owner closes or exits, no
exit that hangs on unsent messages, and an owner whose own get/set touch no socket."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from _faultkit import socket_backlog
from store_helpers import call_in_child, owner_process, socket_dirs_of

import zkv
from zkv import client as client_module
from zkv import endpoint as zkv_endpoint
from zkv import sockets

#: Seconds: generous for a loaded 2-core machine (a fraction of a second is expected).
QUICK = 20.0
#: A user that is not this one (nobody), for directories that belong to someone else.
OTHER_UID = 65534
#: Where ipc owners of this user make their blob directories (see zkv.blobs).
SHM_BASE = Path(f"/dev/shm/zkv-{os.getuid()}")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


class TestSocketFiles:
    """The owner's sockets: private, short enough, and removed when it goes."""

    def test_private_directory(self, kv: zkv.Store) -> None:
        ep = zkv_endpoint.parse(kv.endpoint)
        assert ep.directory is not None and ep.pid == os.getpid()
        assert _mode(ep.directory) == 0o700
        assert _mode(ep.directory.parent) == 0o700  # the per-user runtime directory too
        assert ep.directory.stat().st_uid == os.getuid()
        sockets = sorted(p.name for p in ep.directory.iterdir())
        assert sockets == ["p", "r"]
        for name in sockets:
            path = ep.directory / name
            assert stat.S_ISSOCK(path.lstat().st_mode)
            assert len(str(path).encode()) <= 107

    def test_long_runtime_dir_is_passed_over(self, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        deep = tmp_path / ("d" * 40) / ("e" * 40)
        deep.mkdir(parents=True, mode=0o700)
        monkeypatch.setenv("ZKV_RUNTIME_DIR", str(deep))
        with zkv.serve() as owner:
            path = zkv_endpoint.parse(owner.endpoint).directory
            assert path is not None and not str(path).startswith(str(deep))
            assert len(str(path / "r").encode()) <= 107
            with zkv.connect(owner.endpoint) as client:
                client["a"] = 1
            assert owner["a"] == 1

    @pytest.mark.parametrize("mode", [0o755, 0o750, 0o710, 0o701])
    def test_runtime_dir_open_to_others_is_refused(self, tmp_path: Path, mode: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(mode)  # even only traversable (x): others could reach a socket in it
        monkeypatch.setenv("ZKV_RUNTIME_DIR", str(shared))
        with pytest.raises(PermissionError, match="chmod 700"):
            zkv.serve()
        assert "ZKV_ENDPOINT" not in os.environ
        assert list(shared.iterdir()) == []  # nothing was made in it

    def test_runtime_dir_of_another_user_is_refused(self, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a directory that belongs to another user")
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, OTHER_UID, OTHER_UID)
        monkeypatch.setenv("ZKV_RUNTIME_DIR", str(theirs))
        with pytest.raises(PermissionError, match=f"belongs to uid {OTHER_UID}"):
            zkv.serve()
        assert "ZKV_ENDPOINT" not in os.environ
        assert list(theirs.iterdir()) == []

    def test_killed_owners_directories_are_removed_by_the_next_owner(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A SIGKILLed owner leaves its socket and blob directories behind; the next owner of
        the same user removes them as it starts, and leaves those of live owners alone."""
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        monkeypatch.setenv("ZKV_RUNTIME_DIR", str(runtime))
        with owner_process() as dead, owner_process() as alive:
            left = []
            for owner in (dead, alive):
                assert owner.directory is not None
                blob_dir = SHM_BASE / owner.directory.name
                with zkv.connect(owner.endpoint) as client:
                    client.set("big", b"x" * (2 << 20))  # a file in the blob directory
                assert blob_dir.is_dir() and os.listdir(blob_dir)
                left.append((owner.directory, blob_dir))
            dead.kill()
            dead.proc.join(10)
            assert all(path.exists() for path in left[0])  # a killed owner cleans nothing
            with zkv.serve() as successor:
                assert successor.endpoint.startswith(f"ipc://{runtime}/")
                assert not any(path.exists() for path in left[0]), "the dead owner's are left"
                assert all(path.exists() for path in left[1]), "a live owner's were removed"
            with zkv.connect(alive.endpoint) as client:
                assert client.get("big") == b"x" * (2 << 20)

    def test_nothing_left_after_close(self) -> None:
        owner = zkv.serve()
        directory = zkv_endpoint.parse(owner.endpoint).directory
        client = zkv.connect(owner.endpoint)
        client["a"] = 1
        client.close()
        owner.close()
        assert directory is not None and not directory.exists()
        assert socket_dirs_of(os.getpid()) == []

    @pytest.mark.parametrize("how", ["close", "exit"])
    def test_nothing_left_after_owner_process_ends(self, how: str) -> None:
        """Closing the store, or just exiting (atexit closes it), removes the sockets."""
        with owner_process() as owner:
            with zkv.connect(owner.endpoint) as client:
                client["a"] = 1
            pid = owner.pid
            started = time.monotonic()
            assert owner.finish(how) == 0
            assert time.monotonic() - started < QUICK
            assert socket_dirs_of(pid) == []


# -- exit never hangs -----------------------------------------------------------------------------

def _publish_and_leave(count: int) -> None:
    os.environ["ZKV_TIMEOUT"] = "120"  # long: an exit that waited for it would show
    kv = zkv.store()
    kv.set("child", "was here")
    for i in range(count):
        kv.publish("news", i)


#: Messages, and bytes each, that a child publishes to a stopped owner before it exits: 10 MB,
#: far more than the kernel's socket buffers hold, and fewer messages than the 1000 that its
#: queue to the owner takes (so that no publish waits).
UNSENT, UNSENT_SIZE = 500, 20_000


def _publish_unsent_and_leave(conn: mp.connection.Connection, endpoint: str) -> None:
    # A long request timeout and a short linger: an exit that waited for the owner, or for a
    # request timeout, would take far longer than one that drops what the owner cannot take.
    os.environ.update(ZKV_ENDPOINT=endpoint, ZKV_TIMEOUT="120", ZKV_LINGER="0.2")
    kv = zkv.store()  # the process-wide store: it lives until the process exits
    kv.set("x", 1)
    conn.send("connected")
    conn.recv()  # the owner is stopped now
    for _ in range(UNSENT):
        kv.publish("news", b"x" * UNSENT_SIZE)
    # What the kernel holds for the stopped owner; the rest is still queued in this process.
    conn.send(("queued", UNSENT * UNSENT_SIZE, socket_backlog()))
    # no close(): leaving the process closes the store, and must not wait for the owner


class TestExit:
    """A process that exits right after publishing (or with its owner unresponsive) finishes
    promptly."""

    def test_child_publishes_and_exits(self, kv: zkv.Store,
                                       mp_context: mp.context.BaseContext) -> None:
        sub = kv.subscribe("news")
        proc = mp_context.Process(target=_publish_and_leave, args=(200,))
        started = time.monotonic()
        proc.start()
        proc.join(40)
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"the child took {elapsed:.1f}s"  # ~1 s expected (spawn included)
        assert proc.exitcode == 0
        assert kv["child"] == "was here"
        got = [sub.receive(timeout=5) for _ in range(200)]
        assert got == list(range(200))  # nothing lost by leaving at once
        sub.close()

    def test_exit_with_owner_stopped_and_messages_unsent(self) -> None:
        """A child whose owner is stopped exits with megabytes of publishes still queued: they
        are dropped after the linger time (0.2 s here), not waited for until the owner takes
        them or the request timeout (120 s here) passes."""
        with owner_process() as owner:
            ctx = mp.get_context("fork")
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_publish_unsent_and_leave,
                               args=(child_end, owner.endpoint))
            proc.start()
            try:
                assert parent_end.poll(20) and parent_end.recv() == "connected"
                owner.stop()
                parent_end.send("go")
                assert parent_end.poll(60)
                what, published, in_kernel = parent_end.recv()
                started = time.monotonic()
                proc.join(40)
                elapsed = time.monotonic() - started
                stopped_throughout = not owner.running()
            finally:
                owner.resume()
                if proc.is_alive():
                    proc.kill()
            assert what == "queued"
            # The exit had something to drop: most of what was published never left the child.
            assert published - in_kernel > published // 2, (published, in_kernel)
            assert stopped_throughout
            assert elapsed < 30, f"exit took {elapsed:.1f}s"  # ~0.2 s expected
            assert proc.exitcode == 0
            with zkv.connect(owner.endpoint) as client:  # the owner serves on
                assert client.get("x") == 1


# -- the owner's own reads and writes ------------------------------------------------------------

class TestOwnerTouchesNoSocket:
    """In the owner, get/set (and the other key-value operations) never touch a socket: with
    every ZeroMQ send/receive/poll made to fail in the calling thread, they still work."""

    def test_owner_ops_without_sockets(self, kv: zkv.Store,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        kv["warm"] = 1  # anything lazy is set up before the sockets are made to fail
        me = threading.get_ident()
        touched: list[str] = []

        def forbid(cls: Any, name: str) -> None:
            original = getattr(cls, name)

            def guarded(*args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() == me:
                    touched.append(f"{cls.__name__}.{name}")
                    raise RuntimeError(f"{cls.__name__}.{name} called in the owner's thread")
                return original(*args, **kwargs)
            monkeypatch.setattr(cls, name, guarded)

        for name in ("send", "recv", "send_multipart", "recv_multipart", "poll",
                     "send_pyobj", "recv_pyobj", "connect", "bind"):
            forbid(zmq.Socket, name)
        forbid(sockets, "raw_send")  # zkv's own sends skip pyzmq's Python wrapper
        forbid(client_module, "raw_send")  # (the client's short path holds its own name)
        forbid(zmq.Context, "socket")
        forbid(zmq.Poller, "poll")

        kv.set("a", {"x": 1})
        assert kv.get("a") == {"x": 1} and kv["warm"] == 1
        kv["b"] = [1, 2]
        assert kv.get("missing", 0) == 0 and "a" in kv and len(kv) == 3
        assert kv.incr("n") == 1 and kv.modify("n", lambda v: v * 10) == 10
        kv.set_many({"c": 3, "d": 4})
        assert kv.get_many(["c", "d"]) == {"c": 3, "d": 4}
        assert kv.setdefault("e", 5) == 5 and kv.pop("e") == 5
        assert kv.compare_and_set("c", 3, 30)
        assert kv.transact(lambda m: m["c"] + m["d"]) == 34
        with kv.pipeline() as p:
            p.set("f", 6).get("f")
        assert p.results == [None, 6]
        assert kv.delete("f") and sorted(kv.get_all()) == ["a", "b", "c", "d", "n", "warm"]
        with kv.lock("owner-lock", timeout=5):
            pass
        assert touched == []
        monkeypatch.undo()
        # and the guard was real: a client's request in this thread does touch a socket
        with zkv.connect(kv.endpoint) as client:
            assert client.get("c") == 30

    def test_guard_catches_a_client(self, kv: zkv.Store,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """The method above can fail: the same guard stops a client's get at once."""
        client = zkv.connect(kv.endpoint)
        try:
            client.get("warm")
            me = threading.get_ident()
            for owner, name in ((zmq.Socket, "send"), (zmq.Socket, "send_multipart"),
                                (sockets, "raw_send"), (client_module, "raw_send")):
                original = getattr(owner, name)

                def guarded(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
                    if threading.get_ident() == me:
                        raise RuntimeError("socket used")
                    return __original(*args, **kwargs)
                monkeypatch.setattr(owner, name, guarded)
            with pytest.raises(RuntimeError, match="socket used"):
                client.get("warm")
        finally:
            monkeypatch.undo()
            client.close()


def _run_and_check_exit(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)


def test_nothing_binds_at_import() -> None:
    """Importing zkv starts no thread, binds nothing and exports nothing."""
    done = _run_and_check_exit(
        "import os, threading, zkv\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert 'ZKV_ENDPOINT' not in os.environ\n"
        "kv = zkv.shared_memory\n"
        "assert kv.is_owner and os.environ['ZKV_ENDPOINT'] == kv.endpoint\n"
        "assert threading.active_count() == 2\n"
        "print(os.getpid())\n")
    assert done.returncode == 0, done.stderr
    assert socket_dirs_of(int(done.stdout)) == []  # and its exit removed the sockets


def _noop() -> int:
    return os.getpid()


def test_child_without_store_exits_promptly(kv: zkv.Store) -> None:
    """A child that never used the store inherits nothing to wait for."""
    started = time.monotonic()
    call_in_child(mp.get_context("fork"), _noop)
    assert time.monotonic() - started < QUICK
