"""A private ``redis-server`` for tests and benchmarks: a unix socket in a temporary directory
(mode 0700), no persistence unless asked for, no TCP port unless asked for; stopped and its
directory removed afterwards. It dies with the process that started it.

    with RedisServer() as server:
        kv = zkv.connect(server.url(namespace="test"))
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["INSTALL", "RedisServer", "RedisUnavailable", "free_port"]

#: How to get what a private server needs, for skip reasons and errors.
INSTALL = "apt-get install redis-server (or valkey-server), and pip install 'zkv[redis]'"


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def free_port(below: int = 65536) -> int:
    """A TCP port on 127.0.0.1, lower than ``below``, that was free a moment ago (a Redis
    Cluster node needs its port + 10000 too: ``below=55536``)."""
    for _ in range(1000):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port < below and (below == 65536 or _free(port + 10000)):
            return port
    raise OSError(f"no free TCP port below {below}")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RedisUnavailable(Exception):
    """Redis cannot be used here; the message says why and how to install it."""


def _binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    """Start with :meth:`start` (or ``with``); :attr:`socket_path` is where clients connect.

    ``args`` are extra server arguments (``["--requirepass", "pw"]``); ``port`` also listens
    on TCP 127.0.0.1; ``persistent`` keeps an append-only file (fsync at every write) in the
    directory, so that :meth:`restart` after :meth:`kill` finds the data again."""

    def __init__(self, timeout: float = 10.0, args: list[str] | None = None,
                 port: int | None = None, persistent: bool = False) -> None:
        self.timeout = timeout
        self.args = list(args or [])
        self.port = port
        self.persistent = persistent
        self.socket_path = ""
        self.password: str | None = None
        if "--requirepass" in self.args:
            self.password = self.args[self.args.index("--requirepass") + 1]
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def directory(self) -> str | None:
        return self._dir

    def url(self, namespace: str | None = None, **query: Any) -> str:
        """The ``unix://`` URL of this server (with its password, if it has one)."""
        auth = f":{self.password}@" if self.password else ""
        params = {"namespace": namespace, **query} if namespace is not None else query
        tail = "&".join(f"{k}={v}" for k, v in params.items())
        return f"unix://{auth}{self.socket_path}" + (f"?{tail}" if tail else "")

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Raises :class:`RedisUnavailable`
        if redis-server or redis-py is missing, or the server does not come up."""
        try:
            import redis  # noqa: F401
        except ImportError:
            raise RedisUnavailable(f"the redis Python package is not installed ({INSTALL})"
                                   ) from None
        if _binary() is None:
            raise RedisUnavailable(f"redis-server is not on PATH ({INSTALL})")
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="zkv-redis-")
            self.socket_path = os.path.join(self._dir, "redis.sock")
        self._launch()
        return self

    def _command(self) -> list[str]:
        binary = _binary()
        assert binary is not None and self._dir is not None
        persistence = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""] \
            if self.persistent else ["--save", "", "--appendonly", "no"]
        return [binary, *persistence, "--port", str(self.port or 0),
                "--bind", "127.0.0.1", "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--dir", self._dir, "--daemonize", "no",
                "--loglevel", "warning", "--logfile", os.path.join(self._dir, "redis.log"),
                *self.args]

    def _launch(self) -> None:
        import redis

        # Its own session: a Ctrl-C meant for the caller does not kill it mid-run; and it dies
        # with the caller if that is killed outright.
        self._proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                err = self.log()[-2000:]
                self.stop()
                raise RedisUnavailable(f"redis-server exited with code {code}: {err.strip()}")
            if os.path.exists(self.socket_path):
                client: Any = redis.Redis(unix_socket_path=self.socket_path,
                                          password=self.password, protocol=2)
                try:
                    if client.ping():
                        return
                except redis.RedisError as exc:
                    last = exc
                finally:
                    client.close()
            time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer within {self.timeout}s ({last})")

    def log(self) -> str:
        """What the server logged (warnings and errors)."""
        if self._dir is None:
            return ""
        try:
            with open(os.path.join(self._dir, "redis.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def client(self) -> Any:
        """A plain redis-py client of this server (for checks from outside zkv)."""
        import redis

        return redis.Redis(unix_socket_path=self.socket_path, password=self.password,
                           protocol=2)

    def kill(self) -> None:
        """SIGKILL the server (its directory stays: :meth:`restart` brings it back)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def restart(self) -> None:
        """Start the server again on the same socket, directory and arguments."""
        self.kill()
        self._launch()

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
