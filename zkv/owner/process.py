"""The owner in a dedicated process (``zkv.store(owner="process")``, ``ZKV_OWNER=process``).

The main process starts a small Python process (running :func:`main`) that owns the
data and the sockets; the main process and every worker are its clients. No process of the
program waits on another one's GIL to be served: a busy main thread slows nobody else.

Lifetime: the owner process holds the read end of a pipe whose write end only the main process
keeps (forked children close their copy at once). When the main process closes its store, or
exits, or is killed (SIGKILL included), the pipe reaches end-of-file and the owner closes its
store, removes its socket and blob directories, and exits. If the owner dies, the main
process's calls fail with :class:`~zkv.OwnerGoneError`, as with any owner's death.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from ..config import Options
from ..endpoint import SERVES_FOR_VAR
from ..errors import NoOwnerError

__all__ = ["OwnerProcess", "main", "start"]

#: Seconds the main process waits for the owner process to start and tell its endpoint.
START_TIMEOUT = 30.0
_ENTRY = "import sys; from zkv.owner.process import main; sys.exit(main(sys.argv[1:]))"


class OwnerProcess:
    """The main process's handle on its dedicated owner process."""

    def __init__(self, proc: subprocess.Popen[bytes], control: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._control: int | None = control
        self._creator = os.getpid()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: drop our copy of the pipe's write end (only the main process
        keeps the owner alive)."""
        control, self._control = self._control, None
        if control is not None:
            try:
                os.close(control)
            except OSError:
                pass

    def stop(self, timeout: float) -> None:
        """Tell the owner process to close its store and exit; wait for it (up to
        ``timeout``, then kill it)."""
        if os.getpid() != self._creator:
            return
        control, self._control = self._control, None
        if control is not None:
            try:
                os.close(control)  # end-of-file: the owner closes its store and exits
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start(options: Options, address: str | None) -> tuple[str, OwnerProcess]:
    """Start a dedicated owner process serving ``address`` (None: private ipc sockets) with
    ``options``; return its endpoint and a handle on it. Raises NoOwnerError (with the
    owner's own error) if it cannot start."""
    control_r, control_w = os.pipe()
    ready_r, ready_w = os.pipe()
    settings = {f.name: _jsonable(getattr(options, f.name))
                for f in dataclasses.fields(options) if f.name != "owner"}
    env = {k: v for k, v in os.environ.items() if k not in ("ZKV_ENDPOINT", "ZKV_OWNER")}
    env[SERVES_FOR_VAR] = str(os.getpid())  # its directory is found as this process's
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, str(control_r), str(ready_w),
             json.dumps({"address": address, "options": settings})],
            pass_fds=(control_r, ready_w), stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # (Ctrl-C in the terminal reaches the main process only)
    finally:
        os.close(control_r)
        os.close(ready_w)
    os.set_inheritable(control_w, False)
    try:
        answer = _read_all(ready_r, START_TIMEOUT)
    finally:
        os.close(ready_r)
    if not answer.startswith("ok "):
        os.close(control_w)
        proc.kill()
        proc.wait(5)
        raise NoOwnerError(f"the zkv owner process did not start: {answer or 'no answer'}")
    return answer[3:], OwnerProcess(proc, control_w)


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"owner='process' cannot pass the option value {value!r} to the owner "
                     f"process; give a directory path for keys")


def _read_all(fd: int, timeout: float) -> str:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "timed out"
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def main(argv: list[str] | None = None) -> int:
    """The owner process: serve, say the endpoint, and live until the control pipe closes
    (or SIGTERM/SIGINT)."""
    from ..store import serve

    args = sys.argv[1:] if argv is None else argv
    control, ready = int(args[0]), int(args[1])
    config = json.loads(args[2])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides
    try:
        kv = serve(config["address"], owner="embedded", **config["options"])
    except BaseException as exc:
        os.write(ready, f"{type(exc).__name__}: {exc}".encode())
        os.close(ready)
        return 1
    os.write(ready, f"ok {kv.endpoint}".encode())
    os.close(ready)

    def watch_parent() -> None:  # end-of-file when the main process closed the store or died
        while not stop.is_set():
            readable, _, _ = select.select([control], [], [], 0.5)
            if readable and not os.read(control, 4096):
                break
        stop.set()

    threading.Thread(target=watch_parent, name="zkv-parent-watch", daemon=True).start()
    while not stop.wait(1.0):
        pass
    kv.close()  # removes the socket and blob directories
    return 0

