"""Which process owns the store.

``zkv.store()`` joins the owner named by ``ZKV_ENDPOINT``; only a process that multiprocessing
started (fork, spawn, forkserver) also looks for an owner among its ancestors. A program started
with ``subprocess`` and an environment without ``ZKV_ENDPOINT`` owns a store of its own, as any
main process does. Importing zkv, even with ``from zkv import *``, never creates a store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import zkv

REPORT = """
import json, os, threading
import zkv
kv = zkv.store()
kv["who"] = os.getpid()
print(json.dumps({"owner": kv.is_owner, "endpoint": kv.endpoint, "pid": os.getpid(),
                  "who": kv["who"]}))
"""


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=60)


class TestSubprocess:
    """A program started by ``subprocess`` joins only through ZKV_ENDPOINT."""

    def test_without_the_variable_it_owns_its_own_store(self, kv: zkv.Store) -> None:
        import json

        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        done = _run(REPORT, env)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["owner"] is True
        assert report["endpoint"] != kv.endpoint
        assert report["who"] == report["pid"]
        assert "who" not in kv  # it did not write into its parent's store
        assert kv.stats()["sessions"] == 0

    def test_with_the_variable_it_joins(self, kv: zkv.Store) -> None:
        import json

        done = _run(REPORT, dict(os.environ))
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["owner"] is False and report["endpoint"] == kv.endpoint
        assert kv["who"] == report["pid"]


class TestImport:
    """Importing zkv creates nothing."""

    def test_star_import_makes_no_store(self, kv: zkv.Store) -> None:
        script = """
            import os, threading
            from zkv import *
            import zkv
            assert "shared_memory" not in zkv.__all__
            assert "store" in dir() and "shared_memory" not in dir()
            assert threading.active_count() == 1, threading.enumerate()
            assert zkv.store.__module__ == "zkv.store"
            import sys
            assert sys.modules["zkv.store"]._GLOBAL is None
            assert "ZKV_ENDPOINT" not in os.environ
            print("clean")
        """
        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        done = _run(script, env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "clean"

    def test_shared_memory_still_works(self) -> None:
        script = """
            import zkv
            from zkv import shared_memory
            shared_memory.set("a", 1)
            assert zkv.shared_memory is shared_memory is zkv.store()
            assert shared_memory.is_owner and shared_memory.get("a") == 1
            print("ok")
        """
        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        done = _run(script, env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"
