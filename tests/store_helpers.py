"""Helpers for the store tests: an owner running in a child process that the test can stop,
kill or let exit, and a way to run a function in a child and get its result or exception.

Everything sent to a child is defined at module level, so every start method can import it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zkv
from zkv import endpoint as zkv_endpoint
from zkv.testing import wait_for

__all__ = ["OwnerProcess", "all_threads_stopped", "call_in_child", "is_redis", "owner_process",
           "socket_dirs_of", "stop_process"]


def is_redis(store: zkv.Store) -> bool:
    """Whether ``store`` is kept in Redis (the ``[redis]`` twin of a contract test)."""
    return zkv.backends.is_backend_url(store.endpoint)


def _owner_main(conn: mp.connection.Connection, hold_lock: str | None,
                options: dict[str, Any]) -> None:
    """Body of an owner process: serve, optionally take a lock, report the endpoint, then wait
    for "close" (close the store and exit) or "exit" (exit without closing; atexit cleans up)."""
    os.environ.pop("ZKV_ENDPOINT", None)
    kv = zkv.serve(**options)
    kv.set("owner-pid", os.getpid())
    if hold_lock is not None:
        kv.lock(hold_lock).acquire()
    conn.send(kv.endpoint)
    command = conn.recv()
    if command == "close":
        kv.close()


class OwnerProcess:
    """An owner running in a child of the test (so that the test can SIGKILL/SIGSTOP it)."""

    def __init__(self, proc: mp.process.BaseProcess, conn: mp.connection.Connection,
                 endpoint: str) -> None:
        self.proc = proc
        self.conn = conn
        self.endpoint = endpoint
        self.directory = zkv_endpoint.parse(endpoint).directory

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGSTOP the owner and wait until every one of its threads is really stopped (the
        signal is delivered asynchronously)."""
        stop_process(self.pid)

    def running(self) -> bool:
        """Whether some thread of the owner is not stopped."""
        return not all_threads_stopped(self.pid)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def finish(self, command: str = "close", timeout: float = 20.0) -> int | None:
        """Tell the owner to close (or just exit) and wait for it; return its exit code."""
        self.conn.send(command)
        self.proc.join(timeout)
        return self.proc.exitcode


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (by SIGSTOP)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[-1].split()[0] not in (b"T", b"t"):
                return False
    return True


def stop_process(pid: int) -> None:
    """SIGSTOP process ``pid`` and wait until every one of its threads is really stopped (the
    signal is delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: all_threads_stopped(pid), timeout=10, what=f"process {pid} to stop")


@contextlib.contextmanager
def owner_process(hold_lock: str | None = None, **options: Any) -> Iterator[OwnerProcess]:
    """Start an owner in a forked child of the test and yield it. On exit it is killed if still
    running, and the socket directory a killed owner leaves behind is removed."""
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_owner_main, args=(child_end, hold_lock, options), daemon=True)
    proc.start()
    child_end.close()
    owner: OwnerProcess | None = None
    try:
        if not parent_end.poll(30):
            raise RuntimeError("the owner process did not start")
        owner = OwnerProcess(proc, parent_end, parent_end.recv())
        yield owner
    finally:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
                os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(10)
        parent_end.close()
        if owner is not None and owner.directory is not None:
            zkv_endpoint.remove_ipc_dir(owner.directory)


def _call_main(conn: mp.connection.Connection, fn: Callable[..., Any], args: tuple[Any, ...]
               ) -> None:
    try:
        result: tuple[str, Any] = ("ok", fn(*args))
    except BaseException as exc:  # report anything, including assertion failures
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    conn.send(result)
    conn.close()


def call_in_child(ctx: mp.context.BaseContext, fn: Callable[..., Any], *args: Any,
                  timeout: float = 30.0) -> Any:
    """Run ``fn(*args)`` in a new child process of context ``ctx``; return its result, or raise
    AssertionError carrying the child's traceback. ``fn`` must be importable by the child."""
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_call_main, args=(child_end, fn, args))
    proc.start()
    child_end.close()
    answered = False
    try:
        if not parent_end.poll(timeout):
            raise AssertionError(f"child {fn.__name__} gave no answer within {timeout}s")
        status, value = parent_end.recv()
        answered = True
    finally:
        try:
            proc.join(timeout if answered else 0)
        finally:  # even if the test's own timeout interrupts the join: no child outlives it
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            parent_end.close()
    if status != "ok":
        raise AssertionError(f"child {fn.__name__} failed: {value}")
    assert proc.exitcode == 0, f"child exited with {proc.exitcode}"
    return value


def socket_dirs_of(pid: int) -> list[Path]:
    """The socket directories an owner with process id ``pid`` has in the runtime directory."""
    base = zkv_endpoint.runtime_dir()
    return [p for p in base.iterdir() if p.name.split("-", 1)[0] == str(pid)]
