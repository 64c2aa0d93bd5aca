"""``zkv keygen DIR``: make the CURVE credentials of a tcp store.

Makes an owner keypair and a client keypair in a new private directory (mode 0700, files 0600;
layout in :mod:`zkv.auth`) and prints what to pass where. ``zkv keygen DIR --client NAME`` adds
another client to an existing directory. Revoke a client by deleting ``DIR/clients/NAME.key``
(the owner re-reads that directory at each new connection).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import zmq.auth

from .auth import DEFAULT_CLIENT

__all__ = ["main", "make_client", "make_keys"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = {"server", "clients"}


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)  # whatever the umask


def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` in ``directory`` (already 0700, so
    nobody else can open them before the chmod), both 0600."""
    public, secret = zmq.auth.create_certificates(directory, name)
    for path in (public, secret):
        os.chmod(path, 0o600)
    return Path(public), Path(secret)


def _copy_private(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


def make_client(directory: Path, name: str) -> Path:
    """Add client ``name`` to the owner's key directory: ``clients/name.key`` for the owner,
    and ``name/`` holding what the client needs. Returns the client's directory."""
    if not _NAME.match(name) or name in _RESERVED:
        raise ValueError(f"bad client name {name!r}: use letters, digits, '.', '_' or '-' "
                         f"(not {' or '.join(sorted(_RESERVED))})")
    server_public = directory / "server.key"
    if not server_public.is_file():
        raise FileNotFoundError(f"{directory} has no server.key: make it with "
                                f"`zkv keygen {directory}` first")
    allowed = directory / "clients"
    client_dir = directory / name
    if (allowed / f"{name}.key").exists() or client_dir.exists():
        raise FileExistsError(f"client {name!r} already exists in {directory}")
    if not allowed.is_dir():
        _private_dir(allowed)
    _private_dir(client_dir)
    public, _secret = _keypair(client_dir, name)
    os.replace(public, allowed / f"{name}.key")  # the owner lets this key in
    _copy_private(server_public, client_dir / "server.key")
    return client_dir


def make_keys(directory: Path) -> Path:
    """Make an owner keypair and the first client (``client``) in the new directory
    ``directory`` (it may exist if empty). Returns the client's directory."""
    if directory.exists():
        if not directory.is_dir() or any(directory.iterdir()):
            raise FileExistsError(f"{directory} exists and is not empty; choose a new directory "
                                  f"(or add a client: zkv keygen {directory} --client NAME)")
        os.chmod(directory, 0o700)
    else:
        _private_dir(directory)
    _keypair(directory, "server")
    return make_client(directory, DEFAULT_CLIENT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zkv keygen",
        description="Make CURVE credentials for a tcp zkv store: an owner keypair and a client "
                    "keypair in a new private directory (0700, files 0600).")
    parser.add_argument("dir", type=Path, help="directory to create (must not exist, or be "
                                               "empty)")
    parser.add_argument("--client", metavar="NAME",
                        help="add client NAME to an existing key directory instead")
    args = parser.parse_args(argv)
    directory = args.dir.absolute()
    try:
        if args.client:
            client_dir = make_client(directory, args.client)
        else:
            client_dir = make_keys(directory)
    except (OSError, ValueError) as exc:
        print(f"zkv keygen: {exc}", file=sys.stderr)
        return 1
    name = client_dir.name
    done = f"added client {name!r} to" if args.client else "made CURVE credentials in"
    print(f"""{done} {directory} (private: directories 0700, files 0600)

owner:   zkv serve --bind tcp://0.0.0.0:PORT --keys {directory}
         or zkv.serve("tcp://HOST:PORT", keys="{directory}")
client:  copy {client_dir} to the client's host (keep it private), then
         zkv.connect("tcp://OWNER-HOST:PORT", keys="<that copy>")
         or set ZKV_ENDPOINT=tcp://OWNER-HOST:PORT ZKV_KEYS=<that copy>
         (on the owner's host, keys="{directory}" works for clients too)

secret:  {directory}/server.key_secret never leaves the owner;
         {client_dir}/{name}.key_secret goes only to client {name!r}
more:    zkv keygen {directory} --client NAME adds a client;
         deleting {directory}/clients/NAME.key revokes it (for new connections)""")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
