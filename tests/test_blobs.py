"""Large frames travel through files in the owner's private tmpfs directory (zkv.blobs): values
come back intact whoever wrote and reads them, files live exactly as long as the values they
hold (freed ones are reused, then removed), a reader racing an overwrite never gets a torn
value, and anything wrong with the files falls back to the sockets. Hostile spill indexes are
refused and change nothing."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from _raw import say_hello
from store_helpers import call_in_child

import zkv
from zkv import blobs, ops, wire
from zkv.testing import private_store, wait_for
from zkv.wire import Status

MB = 1 << 20
SPAWN = mp.get_context("spawn")


def _big(seed: int, size: int) -> bytes:
    """``size`` bytes that differ with ``seed`` everywhere, and in the middle in detail."""
    mark = hashlib.sha256(str(seed).encode()).digest()
    fill = bytes([seed % 256])
    return fill * (size // 2) + mark + fill * (size - size // 2 - len(mark))


def _values() -> dict[str, Any]:
    """Large values of every shape: raw bytes, a pickle too large for a socket frame of its
    own (a str), an out-of-band buffer (bytearray) inside a container."""
    return {"raw": b"r" * (3 * MB) + b"end", "text": "t" * (2 * MB),
            "oob": {"buf": bytearray(b"b" * (2 * MB)), "n": 1},
            "small": b"x" * 100}


def _child_sets(endpoint: str) -> int:
    kv = zkv.connect(endpoint)
    assert kv._core.conn.blob_dir is not None, "the owner offered no blob directory"
    kv.set_many(_values())  # a batch (packed frames)
    kv.set("single", _values()["raw"])  # one value
    count = kv.stats()["blob_files"]
    kv.close()
    return count


def _child_reads(endpoint: str) -> None:
    kv = zkv.connect(endpoint)
    expected = {**_values(), "single": _values()["raw"]}
    assert kv.get_many(list(expected)) == expected
    for key, value in expected.items():
        got = kv.get(key)
        assert got == value, key
    assert isinstance(kv.get("oob")["buf"], bytearray)
    kv.get("oob")["buf"][0] = 0  # a writable copy
    kv.close()


@pytest.fixture
def blob_dir(kv: zkv.Store) -> Path:
    path = kv._core.owner.blob_dir
    assert path is not None and path.parent == Path(f"/dev/shm/zkv-{os.getuid()}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    return path


def _held(path: Path) -> list[str]:
    return [n for n in os.listdir(path) if not n.startswith("free-")]


class TestRoundTrip:
    """Large values go by file and come back intact; files live as long as their values."""

    def test_large_values_go_by_file_and_come_back_intact(self, kv: zkv.Store,
                                                          blob_dir: Path) -> None:
        files = call_in_child(SPAWN, _child_sets, kv.endpoint)
        # raw, text, oob's buffer, single: one file each while the values are stored
        assert files == 4 == len(_held(blob_dir))
        call_in_child(SPAWN, _child_reads, kv.endpoint)
        assert kv.get("raw") == _values()["raw"] and kv["oob"] == _values()["oob"]
        kv.delete("raw")
        kv.set("text", "short now")
        wait_for(lambda: len(_held(blob_dir)) == 2, timeout=10, what="files of dropped values")
        kv.close()
        assert not blob_dir.exists()

    def test_owner_set_values_are_read_from_a_file(self, kv: zkv.Store, blob_dir: Path) -> None:
        value = _big(7, 4 * MB)
        kv.set("owner", value)
        client = zkv.connect(kv.endpoint)
        try:
            assert client.get("owner") == value
            assert len(_held(blob_dir)) == 1  # written once, on the first read
            assert client.get("owner") == value
            assert len(_held(blob_dir)) == 1
        finally:
            client.close()

    def test_freed_files_are_reused_then_removed(self, kv: zkv.Store, blob_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(blobs, "POOL_SECONDS", 1.0)
        client = zkv.connect(kv.endpoint)
        inodes = set()
        try:
            for i in range(12):
                client.set("k", _big(i, 2 * MB))
                assert client.get("k") == _big(i, 2 * MB)
                (held,) = _held(blob_dir)
                inodes.add(os.stat(blob_dir / held).st_ino)
                assert len(os.listdir(blob_dir)) <= 1 + blobs.POOL_FILES
        finally:
            client.close()
        assert len(inodes) <= 3, "freed files were not reused"
        kv.delete("k")
        wait_for(lambda: os.listdir(blob_dir) == [], timeout=10, what="free files expiring")

    def test_threshold_zero_sends_everything_by_socket(self) -> None:
        with private_store(blob_threshold=0) as owner:
            assert owner._core.owner.blob_dir is None
            client = zkv.connect(owner.endpoint)
            try:
                assert client._core.conn.blob_dir is None
                client.set("big", _big(1, 2 * MB))
                assert client.get("big") == _big(1, 2 * MB) == owner["big"]
            finally:
                client.close()


def _overwrite(endpoint: str, rounds: int, progress: Any) -> None:
    kv = zkv.connect(endpoint)
    wait_for(lambda: kv.get("reader-ready"), timeout=30, what="the reader")
    for i in range(rounds):
        progress[0] = i + 1  # shared memory: overwrites started...
        kv.set("race", bytes([i % 251]) * (2 * MB))
        progress[1] = i + 1  # ...and returned
    kv.set("race-done", True)
    kv.close()


def _read_while_overwritten(endpoint: str, progress: Any) -> dict[str, int]:
    kv = zkv.connect(endpoint)
    assert kv._core.conn.blob_dir is not None, "the owner offered no blob directory"
    reads = overlapped = 0
    seen = set()
    kv.set("reader-ready", True)
    while not kv.get("race-done", False) or reads < 20:
        returned_before = progress[1]
        value = kv.get("race")
        # An overwrite was under way during this read: one that had not returned when the
        # read began had started by the time it ended.
        overlapped += progress[0] > returned_before
        assert len(value) == 2 * MB and value.count(value[:1]) == len(value), "torn value"
        seen.add(value[0])
        reads += 1
    kv.close()
    return {"reads": reads, "overlapped": overlapped, "distinct": len(seen)}


class TestRaces:
    """A reader racing overwrites, or files removed behind zkv's back, never gets a wrong
    value."""

    def test_reader_racing_overwrites_never_gets_a_torn_value(self, kv: zkv.Store,
                                                              blob_dir: Path) -> None:
        kv.set("race", b"\0" * (2 * MB))
        progress = SPAWN.Array("q", 2, lock=False)  # overwrites started, returned
        writer = SPAWN.Process(target=_overwrite, args=(kv.endpoint, 300, progress))
        writer.start()  # it starts writing once the reader reads
        try:
            got = call_in_child(SPAWN, _read_while_overwritten, kv.endpoint, progress,
                                timeout=60)
        finally:
            writer.join(60)
        assert writer.exitcode == 0
        # The race happened: reads overlapped overwrites, and saw many of them.
        assert got["overlapped"] >= 10 and got["distinct"] >= 10, got

    def test_files_removed_behind_zkvs_back_fall_back_to_the_socket(
            self, kv: zkv.Store, blob_dir: Path) -> None:
        client = zkv.connect(kv.endpoint)
        try:
            client.set("big", _big(3, 2 * MB))
            shutil.rmtree(blob_dir)  # the stored value's file too
            assert client.get("big") == _big(3, 2 * MB)  # the owner's mapping is still there
            client.set("big2", _big(4, 2 * MB))  # no directory to write to: by socket
            assert client.get("big2") == kv["big2"] == _big(4, 2 * MB)
        finally:
            client.close()


OTHER_UID = 65534  # nobody: a user that is not this one

#: Run in a mount namespace of its own whose /dev/shm is a fresh tmpfs (see below): make the
#: per-user blob base as argv[1] says, start an owner, have a client set a large value, and
#: print what was made in the base and how the value travelled.
BASE_SCRIPT = """
import json, os, sys, zkv
base = f"/dev/shm/zkv-{os.getuid()}"
os.mkdir(base, 0o700)
if sys.argv[1] == "theirs":
    os.chown(base, 65534, 65534)
elif sys.argv[1] != "private":
    os.chmod(base, int(sys.argv[1], 8))
with zkv.serve() as owner, zkv.connect(owner.endpoint) as client:
    client.set("big", b"b" * (2 << 20))
    files = owner.stats()["blob_files"]
    intact = client.get("big") == b"b" * (2 << 20)
    print(json.dumps({"made": os.listdir(base), "blob_files": files, "intact": intact}))
"""


def _own_shm(tmp_path: Path, how: str) -> dict[str, Any]:
    """Run BASE_SCRIPT with a private /dev/shm (unshare(1) makes a mount namespace: the
    machine's /dev/shm, which other owners of this user share, is left alone)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give an owner a /dev/shm of its own")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ZKV_")},
           "ZKV_RUNTIME_DIR": str(runtime)}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'mount -t tmpfs zkv-test /dev/shm && exec "$@"', "sh",
                           sys.executable, "-c", BASE_SCRIPT, how],
                          capture_output=True, text=True, env=env, timeout=60)
    if done.returncode != 0 and "mount" in done.stderr and "zkv" not in done.stderr:
        pytest.skip(f"cannot mount a tmpfs in a new mount namespace: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


class TestPrivateDirectory:
    """Blob directories are as private as the sockets: an owner makes none in a per-user base
    that others could open or that belongs to someone else, and a client uses none that is
    not a private directory of its own user; large values then simply go by socket."""

    def test_owner_uses_a_private_base(self, tmp_path: Path) -> None:
        got = _own_shm(tmp_path, "private")  # the control: here it does make one, and use it
        assert len(got["made"]) == 1 and got["blob_files"] == 1 and got["intact"]

    @pytest.mark.parametrize("how", ["755", "750", "701", "theirs"])
    def test_owner_refuses_a_base_not_private(self, tmp_path: Path, how: str) -> None:
        got = _own_shm(tmp_path, how)
        assert got == {"made": [], "blob_files": 0, "intact": True}

    @pytest.mark.parametrize("how", ["750", "701", "theirs"])
    def test_client_refuses_a_directory_not_private(self, kv: zkv.Store, blob_dir: Path,
                                                    how: str) -> None:
        value = _big(5, 2 * MB)
        with zkv.connect(kv.endpoint) as before:  # the control: it does use the directory
            before.set("before", value)
            assert kv.stats()["blob_files"] == 1
            if how == "theirs":
                if os.geteuid() != 0:
                    pytest.skip("needs root to give the directory to another user")
                os.chown(blob_dir, OTHER_UID, OTHER_UID)
            else:
                blob_dir.chmod(int(how, 8))
            with zkv.connect(kv.endpoint) as after:
                after.set("after", value)
                assert kv.stats()["blob_files"] == 1  # it went by socket
                assert after.get("after") == value == kv["after"]


@pytest.fixture
def dealer(kv: zkv.Store) -> Iterator[zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(kv.endpoint)
    say_hello(sock)
    yield sock
    sock.close()


def _spilled_set(sock: zmq.Socket[Any], entries: list[tuple[int, int, bytes]]) -> BaseException:
    # A set of "key" (no ttl) whose value's frame (the 3rd, position 2) is said to be in a file.
    sock.send_multipart([wire.pack_header(5, ops.SET.code, wire.SPILLED), b"key", b"", b"",
                         wire.pack_spill(entries)])
    assert sock.poll(10_000)
    head, *rest = sock.recv_multipart()
    _rid, status, _flags, _b, _a, results = wire.parse_reply(head, rest)
    assert status == Status.ERROR
    return wire.decode_error(results)


class TestHostileSpills:
    """Spill indexes naming files that zkv did not make are refused and change nothing."""

    @pytest.mark.parametrize("name", [b"../../../../etc/passwd", b"0" * 31 + b"/", b"A" * 32,
                                      b"0" * 32])
    def test_bad_or_missing_names(self, kv: zkv.Store, blob_dir: Path,
                                  dealer: zmq.Socket[Any], name: bytes) -> None:
        exc = _spilled_set(dealer, [(2, 10, name.ljust(32, b"0")[:32])])
        assert isinstance(exc, zkv.ProtocolError) and "spilled" in str(exc)
        assert "key" not in kv

    def test_files_that_are_not_what_the_index_says(self, kv: zkv.Store, blob_dir: Path,
                                                    dealer: zmq.Socket[Any]) -> None:
        secret = blob_dir.parent / f"secret-of-test-{os.getpid()}"  # same file system
        secret.write_bytes(b"s" * 20)
        try:
            cases = {b"1" * 32: "size", b"2" * 32: "symlink", b"3" * 32: "hard link"}
            (blob_dir / ("1" * 32)).write_bytes(b"x" * 10)
            os.symlink(secret, blob_dir / ("2" * 32))
            os.link(secret, blob_dir / ("3" * 32))
            for name in cases:
                exc = _spilled_set(dealer, [(2, 20, name)])
                assert isinstance(exc, zkv.ProtocolError), cases[name]
            assert "key" not in kv
            assert secret.read_bytes() == b"s" * 20
            wait_for(lambda: os.listdir(blob_dir) == [], timeout=10,
                     what="refused files removed")
        finally:
            secret.unlink()

    def test_a_file_is_adopted_once(self, kv: zkv.Store, blob_dir: Path,
                                    dealer: zmq.Socket[Any]) -> None:
        name = b"4" * 32
        (blob_dir / name.decode()).write_bytes(pickle.dumps("v" * 100))
        exc = _spilled_set(dealer, [(2, len(pickle.dumps("v" * 100)), name)] * 2)
        assert isinstance(exc, zkv.ProtocolError)
        assert "key" not in kv
