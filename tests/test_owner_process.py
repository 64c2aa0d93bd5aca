"""``owner="process"``: the data lives in a dedicated process that the main process starts;
the main process and every worker are its clients, with the same API and guarantees. That
process never outlives the program, and its death reaches the main process as OwnerGoneError.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import call_in_child

import zkv
from zkv import endpoint as zkv_endpoint
from zkv.endpoint import pid_alive
from zkv.testing import wait_for


@pytest.fixture
def kv() -> Iterator[zkv.Store]:
    """A store whose owner is a dedicated process (children find it through ZKV_ENDPOINT)."""
    store = zkv.serve(owner="process")
    try:
        yield store
    finally:
        store.close()


def _incr(n: int) -> int:
    kv = zkv.store()
    assert not kv.is_owner
    for _ in range(n):
        kv.incr("hits")
    pid = os.getpid()
    with kv.lock("L", timeout=30):
        kv.modify("log", lambda log: [*log, pid], default=[])  # (runs in the owner)
    return pid


def _stats() -> dict[str, int]:
    return zkv.store().stats()


class TestSameGuarantees:
    """Workers of every start method, the main process (a client too), one order."""

    def test_main_is_a_client(self, kv: zkv.Store) -> None:
        assert kv.is_owner is False
        owner_pid = kv.stats()["pid"]
        assert owner_pid != os.getpid() and pid_alive(owner_pid)
        assert kv._owner_process is not None and kv._owner_process.pid == owner_pid
        kv["a"] = {"x": 1}
        assert kv["a"] == {"x": 1} and kv.incr("n") == 1

    def test_pools_of_every_start_method(self, kv: zkv.Store,
                                         mp_context: mp.context.BaseContext) -> None:
        with mp_context.Pool(3) as pool:
            pids = pool.map(_incr, [50] * 6)
        assert kv["hits"] == 300
        assert sorted(kv["log"]) == sorted(pids)
        assert call_in_child(mp_context, _stats)["pid"] == kv.stats()["pid"]

    def test_watch_pubsub_and_cache_in_main(self, kv: zkv.Store) -> None:
        with kv.watch("w") as changes, kv.subscribe("news") as news:
            call_in_child(mp.get_context("spawn"), _write_and_publish)
            assert changes.receive(timeout=10).value == 1
            assert news.receive(timeout=10) == "hello"
        kv.enable_cache("c.")
        kv["c.k"] = 1
        assert kv["c.k"] == 1 and kv["c.k"] == 1
        assert kv.cache_info()["hits"] >= 1


def _write_and_publish() -> None:
    kv = zkv.store()
    kv["w"] = 1
    kv.publish("news", "hello")


FORKSERVER_FIRST = """
import multiprocessing as mp, os
import zkv

def work(n):
    kv = zkv.store()   # this worker's forkserver predates the store: found by ancestry
    return kv.incr("hits"), kv.is_owner, os.environ.get("ZKV_ENDPOINT")

def nothing():
    pass

if __name__ == "__main__":
    mp.set_start_method("forkserver")
    p = mp.Process(target=nothing)   # starts the forkserver before any store exists
    p.start(); p.join()
    kv = zkv.store(owner="process")
    with mp.Pool(2) as pool:
        results = pool.map(work, range(10))
    assert sorted(r[0] for r in results) == list(range(1, 11)), results
    assert not any(r[1] for r in results) and all(r[2] is None for r in results), results
    assert kv["hits"] == 10 and not kv.is_owner
    print("ok")
"""


MAIN = """
import json, os, sys, time, zkv
kv = zkv.store(owner="process")
kv["a"] = 1
stats = kv.stats()
print(json.dumps({"owner": stats["pid"], "endpoint": kv.endpoint,
                  "blobs": str(kv._core.conn.blob_dir)}), flush=True)
time.sleep(3600)   # until the test kills this process
"""


def test_forkserver_started_before_the_store(tmp_path: Path) -> None:
    """A forkserver's workers find the dedicated owner process through their ancestry: its
    directory is named after the main process it serves."""
    script = tmp_path / "forkserver_first.py"
    script.write_text(textwrap.dedent(FORKSERVER_FIRST))
    env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


class TestLifetime:
    """The owner process never outlives the program; its death is the owner's death."""

    @pytest.mark.parametrize("how", ["kill", "exit"])
    def test_main_dies_or_exits(self, tmp_path: Path, how: str) -> None:
        script = MAIN if how == "kill" else MAIN.replace("time.sleep(3600)", "sys.exit(0)")
        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        main = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert main.stdout is not None
            report = json.loads(main.stdout.readline())
            owner = report["owner"]
            directory = zkv_endpoint.parse(report["endpoint"]).directory
            assert pid_alive(owner) and directory is not None and directory.exists()
            if how == "kill":
                main.send_signal(signal.SIGKILL)
            main.wait(30)
            wait_for(lambda: not pid_alive(owner), timeout=30, what="the owner process to end")
            assert not directory.exists()  # it cleaned up after itself
            assert not Path(report["blobs"]).exists()
        finally:
            if main.poll() is None:
                main.kill()
                main.wait(10)
            if main.stdout is not None:
                main.stdout.close()

    def test_owner_death_is_owner_gone(self, kv: zkv.Store) -> None:
        kv["a"] = 1
        os.kill(kv.stats()["pid"], signal.SIGKILL)
        with pytest.raises(zkv.OwnerGoneError):
            wait_for(lambda: kv.get("a") is None, timeout=30)

    def test_close_stops_it(self) -> None:
        store = zkv.serve(owner="process")
        owner = store.stats()["pid"]
        directory = zkv_endpoint.parse(store.endpoint).directory
        store.close()
        assert not pid_alive(owner)
        assert directory is not None and not directory.exists()
        assert "ZKV_ENDPOINT" not in os.environ

    def test_a_forked_child_that_exits_does_not_stop_it(self, kv: zkv.Store) -> None:
        owner = kv.stats()["pid"]
        assert call_in_child(mp.get_context("fork"), _stats)["pid"] == owner
        assert pid_alive(owner) and kv.incr("still") == 1

    def test_environment_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ZKV_OWNER", "process")
        store = zkv.serve()
        try:
            assert not store.is_owner and store.stats()["pid"] != os.getpid()
        finally:
            store.close()
        monkeypatch.setenv("ZKV_OWNER", "elsewhere")
        with pytest.raises(ValueError, match="ZKV_OWNER=elsewhere"):
            zkv.serve()

