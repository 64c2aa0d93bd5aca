"""Credentials for ``tcp://`` endpoints: CURVE keys, and the owner's ZAP check of client keys.

A TCP owner never accepts an unauthenticated peer (unpickling is code execution). Every tcp
socket of a store speaks CURVE (encrypted, authenticated, replay-protected), and the owner
answers ZeroMQ's ZAP requests itself, in its poller thread, letting in only the client public
keys it was given (:class:`Authenticator`). See docs/security.md.

Keys come from the ``keys`` option (or ``ZKV_KEYS``): a directory made by ``zkv keygen``, or
explicit key material (:class:`OwnerKeys` in the owner, :class:`ClientKeys` in a client). The
directory layout::

    DIR/server.key            the owner's public key
    DIR/server.key_secret     the owner's keypair (secret: stays with the owner)
    DIR/clients/NAME.key      public keys of the clients the owner lets in (read at each
                              connection: add or remove files to grant or revoke)
    DIR/NAME/                 what client NAME needs (copy it to the client's host):
        server.key            the owner's public key
        NAME.key_secret       the client's keypair

The owner reads ``DIR``; a client reads ``DIR/NAME`` (or ``DIR`` itself, meaning ``DIR/client``,
when it runs where the owner's directory is).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import zmq
import zmq.auth
from zmq.utils import z85

from .errors import AuthenticationError

__all__ = [
    "DEFAULT_CLIENT",
    "Authenticator",
    "ClientKeys",
    "KeysOption",
    "OwnerKeys",
    "client_keys",
    "drain_events",
    "monitor",
    "owner_keys",
]

log = logging.getLogger("zkv.auth")

#: The name ``zkv keygen`` gives the first client keypair (``DIR/client/``).
DEFAULT_CLIENT = "client"

#: The ZAP domain of zkv's sockets.
ZAP_DOMAIN = b"zkv"

_HOWTO = ("make credentials with `zkv keygen DIR`, then pass keys=DIR to zkv.serve() and "
          "zkv.connect() (or set ZKV_KEYS=DIR; `zkv serve --keys DIR`); on other hosts, use a "
          "copy of DIR/client")


def _z85_key(value: str | bytes, what: str) -> bytes:
    key = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if len(key) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 CURVE key, not {len(key)} bytes")
    try:
        z85.decode(key)
    except (ValueError, KeyError, struct.error):
        raise ValueError(f"{what} is not a valid Z85 CURVE key") from None
    return key


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class OwnerKeys:
    """The owner's CURVE secret key and the public keys of the clients it lets in (Z85, as
    made by :func:`zmq.curve_keypair`). ``clients`` may be a directory of ``*.key`` files,
    re-read when it changes."""

    secret_key: bytes
    clients: frozenset[bytes] | Path

    def __init__(self, secret_key: str | bytes,
                 clients: Iterable[str | bytes] | str | os.PathLike[str]) -> None:
        """``secret_key``: the owner's secret key; ``clients``: the public keys it lets in,
        or a directory of ``*.key`` files. ValueError names a key that is not a 40-character
        Z85 CURVE key."""
        object.__setattr__(self, "secret_key", _z85_key(secret_key, "secret_key"))
        if isinstance(clients, (str, os.PathLike)):
            object.__setattr__(self, "clients", Path(clients))
        else:
            keys = frozenset(_z85_key(k, "client key") for k in clients)
            object.__setattr__(self, "clients", keys)

    @property
    def public_key(self) -> bytes:
        """The owner's public key, which clients need (``server.key``)."""
        return zmq.curve_public(self.secret_key)

    def __repr__(self) -> str:  # never print the secret
        return f"OwnerKeys(public_key={self.public_key.decode()!r}, clients={self.clients!r})"


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class ClientKeys:
    """A client's CURVE keypair and the owner's public key (Z85)."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    def __init__(self, server_key: str | bytes, public_key: str | bytes,
                 secret_key: str | bytes) -> None:
        """ValueError names a key that is not a 40-character Z85 CURVE key, or says that
        ``public_key`` does not belong to ``secret_key``."""
        object.__setattr__(self, "server_key", _z85_key(server_key, "server_key"))
        object.__setattr__(self, "public_key", _z85_key(public_key, "public_key"))
        object.__setattr__(self, "secret_key", _z85_key(secret_key, "secret_key"))
        if zmq.curve_public(self.secret_key) != self.public_key:
            raise ValueError("public_key does not belong to secret_key")

    def __repr__(self) -> str:  # never print the secret
        return (f"ClientKeys(server_key={self.server_key.decode()!r}, "
                f"public_key={self.public_key.decode()!r})")


#: What the ``keys`` option accepts.
KeysOption = Union[str, "os.PathLike[str]", OwnerKeys, ClientKeys, None]


def _secret_file(path: Path) -> tuple[bytes, bytes]:
    """Load a ``.key_secret`` certificate, refusing one that others may read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AuthenticationError(f"missing credentials file {path}; {_HOWTO}") from None
    if info.st_mode & 0o077:
        raise AuthenticationError(
            f"{path} holds a secret key but is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):o}); make it private: chmod 600 {path}")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise AuthenticationError(f"{path} holds no secret key")
    return public, secret


def _public_file(path: Path) -> bytes:
    if not path.is_file():
        raise AuthenticationError(f"missing credentials file {path}; {_HOWTO}")
    return zmq.auth.load_certificate(path)[0]


def owner_keys(keys: KeysOption, bind: str) -> OwnerKeys:
    """The owner's credentials for binding ``bind``, from the ``keys`` option.

    Raises :class:`~zkv.AuthenticationError` saying how to make them if there are none.
    """
    if keys is None:
        raise AuthenticationError(
            f"refusing to bind {bind} without credentials: a tcp endpoint must never accept "
            f"unauthenticated peers (they could run code in this process). To fix: {_HOWTO}")
    if isinstance(keys, OwnerKeys):
        return keys
    if isinstance(keys, ClientKeys):
        raise AuthenticationError(f"binding {bind} needs the owner's keys (OwnerKeys or a "
                                  "directory made by `zkv keygen`), not ClientKeys")
    directory = Path(keys)
    _public, secret = _secret_file(directory / "server.key_secret")
    clients = directory / "clients"
    if not clients.is_dir() or not list(clients.glob("*.key")):
        raise AuthenticationError(f"no client public keys in {clients}: add one with "
                                  f"`zkv keygen {directory} --client NAME`")
    return OwnerKeys(secret, clients)


def client_keys(keys: KeysOption, address: str) -> ClientKeys:
    """A client's credentials for connecting to ``address``, from the ``keys`` option.

    ``keys`` may be a client directory (``server.key`` and one ``NAME.key_secret``) or an
    owner's directory (its ``client/`` subdirectory is used). Raises
    :class:`~zkv.AuthenticationError` saying what is missing.
    """
    if keys is None:
        raise AuthenticationError(
            f"connecting to {address} needs client credentials: tcp endpoints only let in "
            f"known CURVE keys. Pass keys=DIR (a client directory made by `zkv keygen`, e.g. "
            f"DIR/client) or set ZKV_KEYS=DIR")
    if isinstance(keys, ClientKeys):
        return keys
    if isinstance(keys, OwnerKeys):
        raise AuthenticationError(f"connecting to {address} needs ClientKeys or a client "
                                  "directory, not OwnerKeys")
    directory = Path(keys)
    if (directory / "server.key_secret").exists() and (directory / DEFAULT_CLIENT).is_dir():
        directory = directory / DEFAULT_CLIENT
    secrets = [p for p in sorted(directory.glob("*.key_secret")) if p.name != "server.key_secret"]
    if len(secrets) != 1:
        found = "none" if not secrets else ", ".join(p.name for p in secrets)
        raise AuthenticationError(
            f"{directory} is not a zkv client directory: it needs server.key and exactly one "
            f"NAME.key_secret (found {found}); {_HOWTO}")
    public, secret = _secret_file(secrets[0])
    return ClientKeys(_public_file(directory / "server.key"), public, secret)


class Authenticator:
    """Answers ZAP requests: lets in CURVE clients whose public key is allowed.

    Runs in the owner's loop thread (see :mod:`zkv.owner.sessions`). A directory of allowed keys is
    re-read when its modification time changes, so adding or removing a ``NAME.key`` file
    grants or revokes access for new connections without restarting the owner.
    """

    def __init__(self, keys: OwnerKeys) -> None:
        self._source = keys.clients
        self._mtime: int | None = None
        self._allowed: dict[bytes, str] = {}
        if isinstance(keys.clients, frozenset):
            self._allowed = {k: "key:" + k[:8].decode() for k in keys.clients}
        self.refused = 0

    def _reload(self) -> None:
        if not isinstance(self._source, Path):
            return
        try:
            mtime = self._source.stat().st_mtime_ns
        except OSError:
            mtime = -1
        if mtime == self._mtime:
            return
        allowed: dict[bytes, str] = {}
        for path in sorted(self._source.glob("*.key")):
            try:
                allowed[zmq.auth.load_certificate(path)[0]] = path.stem
            except (OSError, ValueError) as exc:
                log.warning("zkv owner ignored client key file %s: %s", path, exc)
        self._allowed, self._mtime = allowed, mtime

    def handle(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to ``request`` (RFC 27: version, id, domain, address, identity,
        mechanism, credentials...)."""
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            self._reload()
            key = z85.encode(credentials[0])
            name = self._allowed.get(key)
            if name is not None:
                return [version, request_id, b"200", b"OK", name.encode(), b""]
            why, shown = "unknown client key", key.decode()
        else:
            why, shown = f"mechanism {mechanism.decode(errors='replace')}", ""
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:
            log.warning("zkv owner refused a connection from %s: %s %s (%d refused so far)",
                        address.decode(errors="replace"), why, shown, self.refused)
        return [version, request_id, b"400", b"client key not allowed", b"", b""]


def monitor(sock: zmq.Socket[Any], events: int) -> zmq.Socket[Any]:
    """A PAIR socket receiving ``sock``'s monitor ``events``, with no high-water mark (so that
    no disconnection is ever dropped). Call before ``sock`` binds or connects."""
    address = f"inproc://zkv-monitor-{id(sock):x}-{os.urandom(4).hex()}"
    sock.monitor(address, events)
    pair: zmq.Socket[Any] = sock.context.socket(zmq.PAIR)
    pair.setsockopt(zmq.RCVHWM, 0)
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(address)
    return pair


def drain_events(pair: zmq.Socket[Any]) -> list[tuple[int, int]]:
    """Every monitor event waiting on ``pair``, as ``(event, value)``, without blocking."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            frames = pair.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        if frames and len(frames[0]) >= 6:
            event, value = struct.unpack("=HI", frames[0][:6])
            out.append((event, value))
