"""Where an owner's sockets live, and how other processes find them.

By default an owner binds ``ipc://`` sockets in a fresh private directory (mode 0700) named
``<pid>-<random>`` (``<main pid>.<owner pid>-<random>`` for a dedicated owner process) under a
per-user runtime directory (also 0700): ``$ZKV_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/zkv``,
else ``/tmp/zkv-<uid>``. The request socket is ``<dir>/r``, the publish socket ``<dir>/p``; the
endpoint string a client uses is ``ipc://<dir>/r``.

Discovery, in order:

1. the ``ZKV_ENDPOINT`` environment variable, which the owner exports so that children inherit it;
2. in a process that multiprocessing started (fork, spawn, forkserver) only: its ancestors. An
   owner's directory is named after the pid of the process it serves (its own, or, for a
   dedicated owner process, the main process that started it: see :func:`owner_dir_pids`), so
   a worker finds the owner that serves one of its ancestors (even from a forkserver started
   before the store existed). A program
   started any other way (``subprocess``, a shell) is not a worker: without ``ZKV_ENDPOINT`` it
   joins nothing, and ``zkv.store()`` makes it the owner of its own store.

An ipc ``ZKV_ENDPOINT`` whose owner is gone (a forkserver keeps the environment it was started
with, which may name a store closed since) is passed over for a live owner among the ancestors;
if there is none, the stale address is returned and connecting to it says it is stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import multiprocessing
import os
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from .errors import NoOwnerError

__all__ = [
    "ENV_VAR",
    "SERVES_FOR_VAR",
    "Endpoint",
    "discover",
    "ensure_private_dir",
    "find_ancestor_owner",
    "make_ipc_dir",
    "owner_dir_pids",
    "parse",
    "pid_alive",
    "remove_ipc_dir",
    "runtime_dir",
    "sweep_stale",
]

#: The environment variable through which an owner announces its endpoint to its children.
ENV_VAR = "ZKV_ENDPOINT"
#: Set (by zkv) in a dedicated owner process only: the pid of the main process it serves.
SERVES_FOR_VAR = "ZKV_SERVES_FOR"

#: Unix socket paths longer than this do not fit in ``sockaddr_un.sun_path``.
_MAX_SOCKET_PATH = 107
_REQ_NAME = "r"
_PUB_NAME = "p"
_HOW_TO_CONNECT = ("Create the store in the main process (zkv.store() or zkv.serve()) before "
                   "starting other processes, or pass a live owner's endpoint to "
                   "zkv.connect(endpoint).")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Parsed form of an endpoint string.

    ``address`` is the request (ROUTER) address; for ``ipc`` endpoints ``directory`` is the
    owner's private directory and ``pid`` the owner's process id (from the directory name).
    """

    address: str
    transport: str
    directory: Path | None = None
    pid: int | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_ipc(self) -> bool:
        return self.transport == "ipc"

    def pub_address(self, pub: str) -> str:
        """The address a client connects its SUB socket to, given what the owner announced."""
        if self.transport == "tcp":
            return f"tcp://{self.host}:{int(pub)}"
        return pub

    def owner_present(self) -> bool:
        """Cheap local check that an ipc owner still exists (its pid lives and its socket file
        is there). Always True for TCP endpoints, which are checked by heartbeats instead."""
        if not self.is_ipc:
            return True
        assert self.directory is not None
        if not (self.directory / _REQ_NAME).exists():
            return False
        return self.pid is None or pid_alive(self.pid)


def parse(address: str) -> Endpoint:
    """Parse an endpoint string (``ipc:///path/r`` or ``tcp://host:port``).

    Raises ValueError naming what is wrong with it.
    """
    if not isinstance(address, str):
        raise TypeError(f"endpoint must be a str, not {type(address).__name__}")
    if address.startswith("ipc://"):
        path = Path(address[len("ipc://"):])
        if not path.is_absolute() or path.name != _REQ_NAME:
            raise ValueError(f"not a zkv ipc endpoint (expected ipc:///<dir>/r): {address!r}")
        pids = owner_dir_pids(path.parent.name)
        return Endpoint(address, "ipc", directory=path.parent,
                        pid=None if pids is None else pids[0])
    if address.startswith("tcp://"):
        rest = address[len("tcp://"):]
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"not a tcp endpoint (expected tcp://host:port): {address!r}")
        return Endpoint(address, "tcp", host=host.strip("[]"), port=int(port))
    raise ValueError(f"unsupported endpoint {address!r}: use ipc://... or tcp://host:port")


def runtime_dir() -> Path:
    """The per-user directory under which owners make their private socket directories.

    Created with mode 0700 if missing; refused (PermissionError) if it exists but belongs to
    another user or is open to others, since anyone who can connect can run code in the owner.
    """
    candidates: list[Path] = []
    if os.environ.get("ZKV_RUNTIME_DIR"):
        candidates.append(Path(os.environ["ZKV_RUNTIME_DIR"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "zkv")
    candidates.append(Path(tempfile.gettempdir()) / f"zkv-{os.getuid()}")
    candidates.append(Path("/tmp") / f"zkv-{os.getuid()}")
    for base in candidates:
        # "<base>/<pid>-<8 hex>/r" must fit in a unix socket path.
        if len(str(base)) + 1 + 20 + 10 > _MAX_SOCKET_PATH:
            continue
        try:
            ensure_private_dir(base)
        except FileNotFoundError:
            continue
        return base
    raise OSError("no runtime directory short enough for unix socket paths; set ZKV_RUNTIME_DIR")


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) if missing; raise PermissionError unless it is a directory
    of this user that nobody else can open."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{path} is accessible to other users (mode {stat.S_IMODE(info.st_mode):o}); "
            "zkv needs it private (chmod 700)"
        )


def make_ipc_dir() -> tuple[Path, str, str]:
    """Create this owner's private directory. Returns it, the request address and the publish
    address. Stale directories of owners that died without cleaning up are removed first."""
    base = runtime_dir()
    sweep_stale(base)
    serves_for = os.environ.get(SERVES_FOR_VAR, "")
    name = f"{serves_for}.{os.getpid()}" if serves_for.isdigit() else str(os.getpid())
    directory = base / f"{name}-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o700)
    return directory, f"ipc://{directory / _REQ_NAME}", f"ipc://{directory / _PUB_NAME}"


def remove_ipc_dir(directory: Path) -> None:
    """Remove an owner's socket directory (idempotent)."""
    shutil.rmtree(directory, ignore_errors=True)


def owner_dir_pids(name: str) -> tuple[int, int] | None:
    """``(owner pid, pid it serves)`` from the name of an owner's directory, or None if it is
    not one: ``<pid>-<random>`` for an owner that serves its own process, ``<main pid>.<owner
    pid>-<random>`` for a dedicated owner process (``owner="process"``), which serves (and is
    found, by the ancestor search, as) the main process that started it."""
    head, sep, rest = name.partition("-")
    if not sep or not rest:
        return None
    serves, dot, owner = head.partition(".")
    if not dot:
        owner = serves
    if not (serves.isdigit() and owner.isdigit()):
        return None
    return int(owner), int(serves)


def sweep_stale(base: Path) -> None:
    """Remove the owner directories under ``base`` whose owner process is gone."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        pids = owner_dir_pids(entry.name)
        if pids is not None and not pid_alive(pids[0]):
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (a killed child not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:  # pragma: no cover - other errnos mean it exists
        return exc.errno != errno.ESRCH
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return True  # no procfs: trust kill()
    state = data.rsplit(b")", 1)[-1].split()[0:1]
    return state not in ([b"Z"], [b"X"])


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[-1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return os.getppid() if pid == os.getpid() else None


def find_ancestor_owner() -> str | None:
    """Look for a live owner among the ancestors of this process; return its endpoint."""
    try:
        base = runtime_dir()
        entries = [e for e in base.iterdir() if (e / _REQ_NAME).exists()]
    except OSError:
        return None
    by_pid: dict[int, list[Path]] = {}  # the pid an owner serves -> its directories
    for entry in entries:
        pids = owner_dir_pids(entry.name)
        if pids is not None and pid_alive(pids[0]):
            by_pid.setdefault(pids[1], []).append(entry)
    pid: int | None = os.getpid()
    seen = set()
    while pid and pid > 1 and pid not in seen:
        seen.add(pid)
        pid = _parent_of(pid)
        if pid and pid in by_pid and pid_alive(pid):
            newest = max(by_pid[pid], key=lambda p: p.stat().st_mtime)
            return f"ipc://{newest / _REQ_NAME}"
    return None


def discover(ancestors: bool | None = None) -> str | None:
    """The endpoint this process should join, by the discovery order of the module docstring,
    or None if there is nothing to join.

    ``ancestors`` says whether to search the ancestors; by default only a process that
    multiprocessing started (fork, spawn, forkserver: ``multiprocessing.parent_process()`` is
    set) does. A program started any other way (``subprocess``, a shell) joins a store only
    through ``ZKV_ENDPOINT``: if its author removed the variable, it owns a store of its own."""
    if ancestors is None:
        ancestors = multiprocessing.parent_process() is not None
    address = os.environ.get(ENV_VAR)
    if not address:
        return find_ancestor_owner() if ancestors else None
    try:
        stale = not parse(address).owner_present()
    except ValueError:
        return address  # connecting reports what is wrong with it
    if stale and ancestors:
        return find_ancestor_owner() or address
    return address


def check_ipc_reachable(ep: Endpoint) -> None:
    """Fail fast (NoOwnerError) if an ipc endpoint has no live owner behind it."""
    assert ep.directory is not None
    path = ep.directory / _REQ_NAME
    if not path.exists():
        raise NoOwnerError(
            f"no zkv owner at {ep.address}: the socket does not exist (the owner exited, or "
            f"{ENV_VAR} is stale). {_HOW_TO_CONNECT}"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        raise NoOwnerError(f"no zkv owner listening at {ep.address}: {exc}. "
                           f"{_HOW_TO_CONNECT}") from exc
    finally:
        probe.close()
