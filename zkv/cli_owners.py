"""Which owner a ``zkv`` command talks to, and the live owners of this user.

An ipc owner binds its sockets in ``<runtime dir>/<pid>-<random>/`` (see :mod:`zkv.endpoint`).
:func:`live_owners` looks there, without creating anything: in ``$ZKV_RUNTIME_DIR`` if it is
set, else in every directory an owner of this user may have chosen (``$XDG_RUNTIME_DIR/zkv``,
``<tempdir>/zkv-<uid>``, ``/tmp/zkv-<uid>``). An owner counts as live when its process runs and
its request socket accepts a connection. Standalone tcp owners have no such directory: name
them with ``--endpoint``.

:func:`resolve` picks the target of a command: ``--endpoint``, else ``ZKV_ENDPOINT``, else the
only live owner; anything else is a :class:`TargetError` that says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from . import backends, endpoint
from .cli_format import UsageError
from .errors import NoOwnerError

__all__ = ["Owner", "TargetError", "format_uptime", "live_owners", "resolve", "search_dirs"]



class TargetError(Exception):
    """No owner, or no single owner, to talk to; the message says what to do (exit status 1)."""


@dataclasses.dataclass(frozen=True)
class Owner:
    """A live ipc owner of this user: its ``pid``, its ``endpoint`` and when it started
    (``started``, seconds since the epoch: when it bound its request socket)."""

    pid: int
    endpoint: str
    started: float


def search_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The runtime directories where this user's owners may have their sockets (existing,
    private ones only), in the order :func:`zkv.endpoint.runtime_dir` tries them."""
    env = os.environ if environ is None else environ
    if env.get("ZKV_RUNTIME_DIR"):
        candidates = [Path(env["ZKV_RUNTIME_DIR"])]
    else:
        candidates = [Path(tempfile.gettempdir()) / f"zkv-{os.getuid()}",
                      Path("/tmp") / f"zkv-{os.getuid()}"]
        if env.get("XDG_RUNTIME_DIR"):
            candidates.insert(0, Path(env["XDG_RUNTIME_DIR"]) / "zkv")
    found: list[Path] = []
    for path in candidates:
        try:
            info = path.lstat()
        except OSError:
            continue
        private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
            and not info.st_mode & 0o077
        if private and all(not path.samefile(seen) for seen in found):
            found.append(path)
    return found


def _listening(address: str) -> bool:
    try:
        endpoint.check_ipc_reachable(endpoint.parse(address))
    except NoOwnerError:
        return False
    return True


def live_owners(environ: Mapping[str, str] | None = None) -> list[Owner]:
    """The live ipc owners of this user, oldest first."""
    owners: list[Owner] = []
    for base in search_dirs(environ):
        with contextlib.suppress(OSError):
            for entry in base.iterdir():
                pids = endpoint.owner_dir_pids(entry.name)
                if pids is None:
                    continue
                sock = entry / "r"
                try:
                    info = sock.lstat()
                except OSError:
                    continue
                pid, address = pids[0], f"ipc://{sock}"
                if stat.S_ISSOCK(info.st_mode) and endpoint.pid_alive(pid) \
                        and _listening(address):
                    owners.append(Owner(pid, address, info.st_mtime))
    return sorted(owners, key=lambda owner: (owner.started, owner.pid))


def _listing(owners: list[Owner]) -> str:
    return "\n".join(f"  pid {o.pid:<8} {o.endpoint}" for o in owners)


def resolve(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The endpoint a command talks to: ``explicit`` (``--endpoint``), else ``ZKV_ENDPOINT``,
    else the only live owner of this user. Raises :class:`TargetError` when there is none, when
    there are several, or when ``ZKV_ENDPOINT`` names an owner that is gone, and
    :class:`~zkv.cli_format.UsageError` when ``explicit`` is not an endpoint."""
    env = os.environ if environ is None else environ
    if explicit and backends.is_backend_url(explicit):  # a store kept in Redis
        return explicit
    if explicit:
        try:
            endpoint.parse(explicit)
        except ValueError as exc:
            raise UsageError(f"--endpoint: {exc}") from None
        return explicit
    announced = env.get(endpoint.ENV_VAR)
    if announced and backends.is_backend_url(announced):
        return announced
    if announced:
        try:
            present = endpoint.parse(announced).owner_present()
        except ValueError as exc:
            raise TargetError(f"{endpoint.ENV_VAR} is not a zkv endpoint: {exc}") from None
        if present:
            return announced
        others = live_owners(env)
        hint = f"; live owners:\n{_listing(others)}" if others else "; no other owner is live"
        raise TargetError(f"{endpoint.ENV_VAR}={announced} names an owner that is gone (unset "
                          f"it, or pass --endpoint){hint}")
    owners = live_owners(env)
    if len(owners) == 1:
        return owners[0].endpoint
    if not owners:
        where = ", ".join(str(d) for d in search_dirs(env)) or "no runtime directory exists"
        raise TargetError(
            f"no live zkv owner of this user (looked in: {where}). Start one (`zkv serve`, or a "
            f"program that calls zkv.store()), or pass --endpoint / set {endpoint.ENV_VAR}")
    raise TargetError(f"{len(owners)} live zkv owners of this user; choose one with --endpoint "
                      f"(or set {endpoint.ENV_VAR}):\n{_listing(owners)}")


def format_uptime(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``, ``4d03h``."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
