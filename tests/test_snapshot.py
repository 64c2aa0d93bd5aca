"""Snapshots: ``kv.save(path)`` writes the whole store atomically, with each key's remaining
expiry, naming the values it could not write; an owner started with ``snapshot=`` loads its
file before serving, saves it every ``snapshot_every`` seconds when something changed and when
it closes; a killed save leaves the previous file whole; a corrupt, foreign or unsafe file is
refused with an error naming it, and no owner starts with part of the data."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from store_helpers import call_in_child, owner_process, socket_dirs_of

import zkv
from zkv import snapshot
from zkv.testing import wait_for


class Point:
    """A class of the tests: values of it travel by reference to this module."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


def _client_values(endpoint: str) -> None:
    """Values set by another process: the owner keeps them as it received them."""
    with zkv.connect(endpoint) as kv:
        kv.set("from-client", {"nested": [1, 2.5, None, "ü"]})
        kv.set("client-big", b"b" * (3 << 20))  # through a file in /dev/shm
        kv.set("client-buffer", bytearray(b"c" * 200_000))  # an out-of-band buffer
        kv.set("client-fn", lambda x: x * 3)


def _values(kv: zkv.Store) -> dict[str, Any]:
    out = kv.get_all()
    out["client-fn"] = out["client-fn"](2)
    return out


class TestSaveAndLoad:
    """What is saved is what is loaded: every kind of value, wherever it was set, with its
    expiry; what cannot be saved is named."""

    def test_round_trip(self, tmp_path: Path) -> None:
        path = tmp_path / "data.zkv"
        with zkv.serve(snapshot=path, snapshot_every=math.inf) as kv:
            kv.set("str", "héllo\udcff")
            kv.set("obj", Point(3))
            kv.set("raw", b"r" * 200_000)
            kv.set("owner-big", b"o" * (2 << 20))
            kv.set("expiring", 1, ttl=60)
            kv.set("key \0 with NUL", 1)
            kv.set("lock", threading.Lock())  # kept by reference: cannot be saved
            call_in_child(mp.get_context("fork"), _client_values, kv.endpoint)
            result = kv.save()
            before = _values(kv)
        assert result.path == str(path) and result.keys == len(before) - 1
        assert result.skipped == ("lock",) and result.bytes == path.stat().st_size
        assert path.stat().st_mode & 0o777 == 0o600
        with zkv.serve(snapshot=path) as kv:
            after = _values(kv)
            assert 50 < kv.ttl("expiring") <= 60 and kv.ttl("str") is None
        del before["lock"]
        assert after == before

    def test_an_owner_process_loads_and_saves(self, tmp_path: Path) -> None:
        """owner="process": the dedicated owner takes the snapshot options, saves when the
        program closes it, and the next one loads the file (a relative path included)."""
        path = tmp_path / "data.zkv"
        with zkv.serve(owner="process", snapshot=path, snapshot_every=math.inf) as kv:
            assert kv.stats()["pid"] != os.getpid()  # the data lives in another process
            kv.set("obj", Point(3))
            kv.set("expiring", 1, ttl=60)
        assert path.exists()
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with zkv.serve(owner="process", snapshot="data.zkv") as kv:
                assert kv.get("obj") == Point(3) and 50 < (kv.ttl("expiring") or 0) <= 60
        finally:
            os.chdir(cwd)

    def test_a_key_that_expired_while_no_owner_ran_is_not_loaded(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "data.zkv"
        with zkv.serve(snapshot=path) as kv:
            kv.set("short", 1, ttl=10)
            kv.set("long", 1, ttl=1000)
            kv.set("forever", 1)
        later = snapshot._wall() + 100  # the owner comes back 100 s later
        monkeypatch.setattr(snapshot, "_wall", lambda: later)
        with zkv.serve(snapshot=path) as kv:
            assert sorted(kv.keys()) == ["forever", "long"]
            assert 850 < kv.ttl("long") <= 900

    def test_a_client_saves_and_the_owner_serves_meanwhile(
            self, kv: zkv.Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The owner lists the store when the request comes, answers other requests while
        the file is written, and replies when it is: the file holds the store as it was at
        the request."""
        kv.set_many({f"k{i}": i for i in range(1000)})
        writing, finish = threading.Event(), threading.Event()
        write = snapshot.write

        def slow_write(listing: snapshot.Listing, path: str) -> snapshot.SaveResult:
            writing.set()
            finish.wait(20)
            return write(listing, path)

        monkeypatch.setattr(snapshot, "write", slow_write)
        results: list[Any] = []
        with zkv.connect(kv.endpoint) as saver, zkv.connect(kv.endpoint) as other:
            thread = threading.Thread(target=lambda: results.append(
                saver.save(tmp_path / "a.zkv")))
            thread.start()
            assert writing.wait(10)
            other.set("k0", "changed after the listing")  # served while the file is written
            assert other.get("k0") == "changed after the listing" and not results
            finish.set()
            thread.join(10)
        assert results[0].keys == 1000
        saved = {key: frames for key, frames, _expires in snapshot.read(tmp_path / "a.zkv")}
        assert zkv.codec.loads(saved["k0"]) == 0

    @pytest.mark.parametrize("where", ["owner", "client"])
    def test_errors(self, kv: zkv.Store, tmp_path: Path, where: str) -> None:
        store = kv if where == "owner" else zkv.connect(kv.endpoint)
        try:
            with pytest.raises(FileNotFoundError):
                store.save(tmp_path / "no-such-dir" / "a.zkv")
            with pytest.raises(ValueError, match="no snapshot file"):
                store.save()
            with pytest.raises(TypeError):
                store.save(3)  # type: ignore[arg-type]
            assert not list(tmp_path.iterdir())  # nothing left behind
        finally:
            if store is not kv:
                store.close()


class TestTheOwnersFile:
    """An owner started with a snapshot file loads it first, saves it when something changed
    (every ``snapshot_every`` seconds, and when it closes), and keeps it to itself."""

    def test_saves_when_changed_and_only_then(self, tmp_path: Path) -> None:
        path = tmp_path / "data.zkv"
        with zkv.serve(snapshot=path, snapshot_every=0.02) as kv:
            snaps = kv._core.snapshots  # type: ignore[attr-defined]
            kv.set("a", 1)
            wait_for(lambda: snaps.saves >= 1, what="a periodic save")
            assert [k for k, _f, _e in snapshot.read(path)] == ["a"]
            saves, periods = snaps.saves, snaps.periods
            wait_for(lambda: snaps.periods >= periods + 5, what="5 more periods")
            assert snaps.saves == saves  # nothing changed: nothing written
            kv.set("b", 2)
            wait_for(lambda: snaps.saves > saves, what="the change saved")
            kv.set("c", 3)  # and this one when the owner closes
        assert [k for k, _f, _e in snapshot.read(path)] == ["a", "b", "c"]

    def test_from_the_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                  ) -> None:
        path = tmp_path / "env.zkv"
        monkeypatch.setenv("ZKV_SNAPSHOT", str(path))
        monkeypatch.setenv("ZKV_SNAPSHOT_EVERY", "inf")
        with zkv.serve() as kv:
            assert kv.options.snapshot == str(path) and kv.options.snapshot_every == math.inf
            kv.set("a", 1)
        with zkv.serve() as kv:
            assert kv["a"] == 1
        monkeypatch.setenv("ZKV_SNAPSHOT_EVERY", "often")
        with pytest.raises(ValueError, match="ZKV_SNAPSHOT_EVERY"):
            zkv.serve()

    @pytest.mark.parametrize("bad", [0, -1, math.nan, "10", None])
    def test_snapshot_every_is_checked(self, bad: Any) -> None:
        with pytest.raises(ValueError, match="snapshot_every"):
            zkv.Options(snapshot_every=bad)

    def test_the_process_wide_store_takes_the_options(self, tmp_path: Path) -> None:
        path = tmp_path / "data.zkv"
        script = textwrap.dedent(f"""
            import zkv
            kv = zkv.store(snapshot={str(path)!r}, snapshot_every=60)
            assert kv.is_owner and zkv.store(snapshot={str(path)!r}) is kv
            try:
                zkv.store(snapshot_every=1)
            except ValueError as exc:
                assert "snapshot_every" in str(exc)
            else:
                raise AssertionError("other options were accepted")
            kv.set("n", kv.get("n", 0) + 1)
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", script], env=env, timeout=50,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        with zkv.serve(snapshot=path) as kv:
            assert kv["n"] == 2  # saved at exit each time, loaded at start

    def test_one_owner_per_file(self, tmp_path: Path) -> None:
        path = tmp_path / "data.zkv"
        with zkv.serve(snapshot=path):
            with pytest.raises(zkv.SnapshotError, match=f"{path}: in use by another zkv owner "
                                                        f"\\(pid {os.getpid()}\\)"):
                zkv.serve(snapshot=path)  # in this process
            pid = call_in_child(mp.get_context("spawn"), _serve_and_fail, str(path))
            assert pid == str(os.getpid())  # in another process, naming this one
        with zkv.serve(snapshot=path):
            pass  # free again once the first one closed

    def test_a_forked_child_does_not_keep_the_file(self, tmp_path: Path) -> None:
        """A process forked by the owner (a pool worker) that outlives it does not hold the
        file: the next owner can take it."""
        path = tmp_path / "data.zkv"
        ctx = mp.get_context("fork")
        release = ctx.Event()
        with zkv.serve(snapshot=path) as kv:
            kv.set("a", 1)
            child = ctx.Process(target=release.wait, args=(30,))
            child.start()
        try:
            with zkv.serve(snapshot=path) as kv:  # while the child lives
                assert kv["a"] == 1
        finally:
            release.set()
            child.join(10)


def _serve_and_fail(path: str) -> str:
    """In another process: an owner of a file in use fails, naming the pid that uses it."""
    os.environ.pop("ZKV_ENDPOINT", None)
    try:
        zkv.serve(snapshot=path)
    except zkv.SnapshotError as exc:
        return str(exc).split("(pid ")[1].split(")")[0]
    raise AssertionError("a second owner started on the same file")


# -- files that must not load -------------------------------------------------------------------

def _good_file(path: Path) -> bytes:
    with zkv.serve() as kv:
        kv.set_many({f"k{i}": i for i in range(100)})
        kv.set("big", b"x" * 100_000)
        kv.save(path)
    return path.read_bytes()


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated in a value":
        return data[:len(data) // 2]
    if how == "truncated in the end":
        return data[:-3]
    if how == "a bit flipped":
        at = len(data) // 3
        return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]
    if how == "a length changed":
        at = data.index(b"k50") - 8  # the low byte of the value's length
        return data[:at] + b"\x07" + data[at + 1:]
    if how == "empty":
        return b""
    if how == "a text file":
        return b"key=value\n" * 50
    if how == "another magic":
        return b"\x89PNG\r\n\x1a\n" + data[8:]
    if how == "a newer format":
        return data[:8] + (snapshot.FORMAT + 1).to_bytes(2, "little") + data[10:]
    raise AssertionError(how)


CORRUPTIONS = ["truncated in a value", "truncated in the end", "a bit flipped",
               "a length changed", "empty", "a text file", "another magic", "a newer format"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_bad_file_stops_the_owner_from_starting(tmp_path: Path, how: str) -> None:
    good = _good_file(tmp_path / "good.zkv")
    path = tmp_path / "data.zkv"
    path.write_bytes(_corrupt(good, how))
    path.chmod(0o600)
    endpoint = os.environ.get("ZKV_ENDPOINT")
    dirs = socket_dirs_of(os.getpid())
    with pytest.raises(zkv.SnapshotError) as raised:
        zkv.serve(snapshot=path)
    assert str(path) in str(raised.value)
    assert socket_dirs_of(os.getpid()) == dirs  # nothing was bound
    assert os.environ.get("ZKV_ENDPOINT") == endpoint
    path.write_bytes(good)  # the file is not held: with a good one, the owner starts
    with zkv.serve(snapshot=path) as kv:
        assert len(kv) == 101


def test_the_load_checks_the_whole_file_first(tmp_path: Path) -> None:
    """A file whose end is damaged loads nothing at all (not the keys before the damage)."""
    good = _good_file(tmp_path / "good.zkv")
    path = tmp_path / "data.zkv"
    path.write_bytes(_corrupt(good, "truncated in the end"))
    state = zkv.state.State()
    with pytest.raises(zkv.SnapshotError, match="end"):
        snapshot.load(state, path)
    assert state.length() == 0


def test_a_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.zkv"
    _good_file(path)
    path.chmod(0o666)
    with pytest.raises(zkv.SnapshotError, match="other users may write it"):
        zkv.serve(snapshot=path)


# -- killed in the middle of a save -----------------------------------------------------------

def _generation(kv: zkv.Store, n: int, keys: int) -> None:
    """Generation ``n`` of the data, in one atomic step: every value says ``n``."""
    kv.set_many({"gen": n, **{f"k{i}": (n, b"p" * 4000) for i in range(keys)},
                 **{f"big{i}": bytes([n % 256]) * (1 << 20) for i in range(4)}})


def _check_file(path: Path, keys: int) -> int:
    """The generation a snapshot file holds; it must be whole and consistent."""
    items = {key: zkv.codec.loads(frames) for key, frames, _e in snapshot.read(path)}
    gen = items.pop("gen")
    assert len(items) == keys + 4 + 1, sorted(items)[:5]  # (+1: the owner's "owner-pid")
    assert all(items[f"k{i}"][0] == gen for i in range(keys))
    assert all(items[f"big{i}"] == bytes([gen % 256]) * (1 << 20) for i in range(4))
    return int(gen)


def _written_by(pid: int) -> int:
    """Bytes process ``pid`` has written so far (all its write calls, from the kernel)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _save_and_kill(path: Path, keys: int, held: int, point: str, size: float) -> int:
    """Start an owner on ``path`` (holding generation ``held``), write the next generation,
    ask for a save and SIGKILL the owner at ``point``: at once, once it has written ``size``
    bytes (however and wherever it writes them), or after the save; return the generation
    written."""
    with owner_process(snapshot=str(path), snapshot_every=math.inf) as owner:
        with zkv.connect(owner.endpoint, timeout=60) as kv:
            assert kv.get("gen", 0) == held  # loaded before it served
            _generation(kv, held + 1, keys)
            done: list[Any] = []

            def save() -> None:
                try:
                    done.append(kv.save())
                except zkv.ZkvConnectionError as exc:
                    done.append(exc)

            before = _written_by(owner.pid)
            saver = threading.Thread(target=save)
            saver.start()
            if point == "part written":
                wait_for(lambda: _written_by(owner.pid) - before >= size or done,
                         interval=0.0005, what=f"{size:.0f} bytes written")
            elif point == "after":
                wait_for(lambda: done, what="the save")
            owner.kill()
            saver.join(30)
    return held + 1


@pytest.mark.timeout(120)
def test_a_save_killed_at_any_point_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    """SIGKILL the owner at random points of a save, many times: the file is always the
    previous snapshot or the new one, whole; each new owner loads it."""
    path = tmp_path / "data.zkv"
    keys = 2000
    rng = random.Random(20261201)
    held = 0  # the generation the file holds (0: none yet)
    points = ["at once", "part written", "part written", "part written", "after"]
    for round_ in range(15):
        point = points[round_ % len(points)]
        size = (keys * 4100 + 4 * (1 << 20)) * rng.random()
        new = _save_and_kill(path, keys, held, point, size)
        now = _check_file(path, keys) if path.exists() else 0
        assert now in (held, new), (round_, point, held, now)
        if point == "after":
            assert now == new
        held = now
    assert held > 0
    with zkv.serve(snapshot=path) as kv:  # a last owner: its save sweeps the killed ones' files
        kv.set("last", 1)
    assert not list(tmp_path.glob(".data.zkv.*.tmp"))
