"""A private ``redis-server`` for one benchmark run: unix socket in a temporary directory, no
persistence, no TCP port; stopped and removed afterwards."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["RedisServer", "RedisUnavailable"]


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


class RedisUnavailable(Exception):
    """Redis cannot be used in this run; the message says why (shown as the skip reason)."""


class RedisServer:
    """Start with :meth:`start` (or ``with``); :attr:`socket_path` is where clients connect."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.socket_path = ""
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Raises :class:`RedisUnavailable`
        if redis-server or the redis Python package is missing, or the server does not come
        up."""
        try:
            import redis
        except ImportError:
            raise RedisUnavailable("the redis Python package is not installed "
                                   "(pip install 'zkv[bench]')") from None
        path = shutil.which("redis-server")
        if path is None:
            raise RedisUnavailable("redis-server is not on PATH (install it: apt-get install "
                                   "redis-server)")
        self._dir = tempfile.mkdtemp(prefix="zkv-bench-redis-")
        self.socket_path = os.path.join(self._dir, "redis.sock")
        args = [path, "--save", "", "--appendonly", "no", "--port", "0",
                "--unixsocket", self.socket_path, "--unixsocketperm", "700",
                "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning"]
        # Its own session: a Ctrl-C meant for the benchmark does not kill it mid-run; and it
        # dies with the benchmark if that is killed outright. (preexec_fn is safe here: the
        # benchmark starts Redis before it has any thread.)
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RedisUnavailable(f"redis-server exited with code {self._proc.returncode}")
            if os.path.exists(self.socket_path):
                client: Any = redis.Redis(unix_socket_path=self.socket_path)
                try:
                    if client.ping():
                        return self
                except redis.RedisError as exc:
                    last = exc
                finally:
                    client.close()
            time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer within {self.timeout}s ({last})")

    def stop(self) -> None:
        """Stop the server and remove its directory (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
