"""Redis URLs: what a ``redis://`` endpoint says, checked, in one small record.

==================================================  =============================================
URL                                                 means
==================================================  =============================================
``redis://[[user]:password@]host[:port][/db]``      one server (Valkey too: ``valkey://``)
``rediss://...``                                    the same over TLS
``unix://[[user]:password@]/path/redis.sock``       a local server's unix socket (``?db=N``)
``redis+sentinel://[...@]host:port[,host:port]/``   the master of ``service``, found through
``service[/db]``                                    Sentinel (``rediss+sentinel``: TLS)
``redis+cluster://[...@]host:port[,host:port]``     a Cluster (``rediss+cluster``: TLS)
==================================================  =============================================

Query arguments: ``namespace`` (default ``zkv``; keeps programs sharing one database apart),
``insecure=1`` (allow a password-less connection to another host), ``lease`` (seconds a lock
stays held without renewal, default 10), ``db``, and for TLS ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``required``/``optional``/``none``),
``ssl_check_hostname``. Anything else is refused with the list of what is known.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

__all__ = ["DEFAULT_LEASE", "DEFAULT_NAMESPACE", "RedisURL", "parse", "redact", "with_query"]

DEFAULT_NAMESPACE = "zkv"
#: Seconds a lock stays held when its holder stops renewing it (it renews every third).
DEFAULT_LEASE = 10.0

_TLS_ARGS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
             "ssl_check_hostname")
_KNOWN = ("namespace", "insecure", "lease", "db", *_TLS_ARGS)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class RedisURL:
    """A parsed backend URL. ``kind`` is ``"single"``, ``"sentinel"`` or ``"cluster"``;
    ``hosts`` the (host, port) pairs (empty for a unix socket, whose path is ``path``)."""

    url: str
    kind: str
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    path: str | None
    db: int
    username: str | None
    password: str | None
    namespace: str
    insecure: bool
    lease: float
    service: str | None
    tls_args: Mapping[str, Any]

    @property
    def local(self) -> bool:
        """Whether every server named is on this machine (a unix socket or loopback)."""
        return self.path is not None or all(_loopback(host) for host, _port in self.hosts)

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's ``Redis`` (or a Sentinel/Cluster node)."""
        kwargs: dict[str, Any] = {}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.kind != "cluster":
            kwargs["db"] = self.db
        if self.tls:
            kwargs["ssl"] = True
            kwargs.update(self.tls_args)
        return kwargs

    def __repr__(self) -> str:
        return f"RedisURL({redact(self.url)!r})"


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} in a Redis URL: use 1 or 0")


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for part in netloc.split(","):
        if not part:
            raise ValueError("a Redis URL names an empty host")
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = part.partition(":")
        if not host:
            raise ValueError("a Redis URL names an empty host")
        if port and not port.isdigit():
            raise ValueError(f"bad port {port!r} in a Redis URL")
        out.append((host, int(port) if port else default_port))
    return tuple(out)


def parse(url: str) -> RedisURL:
    """Parse and check a backend URL (see the module docstring). Raises ValueError naming
    what is wrong."""
    if not isinstance(url, str):
        raise TypeError(f"a Redis URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"not a Redis URL: {url!r}")
    base, _, variant = scheme.partition("+")
    if base not in ("redis", "rediss", "valkey", "valkeys", "unix") \
            or variant not in ("", "sentinel", "cluster") or (base == "unix" and variant):
        raise ValueError(f"unknown Redis URL scheme {scheme!r}: use redis://, rediss://, "
                         "unix://, redis+sentinel:// or redis+cluster://")
    tls = base in ("rediss", "valkeys")
    parts = urlsplit("x://" + rest)
    userinfo, at, hostpart = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None and username is not None:  # redis://secret@host is a password
            username, password = None, username
    query: dict[str, str] = {}
    for name, text in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _KNOWN:
            raise ValueError(f"unknown argument {name!r} in a Redis URL; known: "
                             f"{', '.join(_KNOWN)}")
        query[name] = text
    if "password" in query or "username" in query:  # pragma: no cover - refused above
        raise ValueError("give credentials as user:password@ in a Redis URL")
    namespace = query.get("namespace", DEFAULT_NAMESPACE)
    if not namespace or "{" in namespace or "}" in namespace:
        raise ValueError(f"namespace must be a non-empty str without braces, not {namespace!r}")
    insecure = _flag("insecure", query.get("insecure", "0"))
    try:
        lease = float(query.get("lease", DEFAULT_LEASE))
    except ValueError:
        raise ValueError(f"lease={query['lease']!r} in a Redis URL is not a number") from None
    if not (math.isfinite(lease) and 0.1 <= lease <= 86400):
        raise ValueError(f"lease must be a number of seconds in [0.1, 86400], not {lease!r}")
    tls_args: dict[str, Any] = {}
    for name in _TLS_ARGS:
        if name in query:
            value: Any = query[name]
            if name == "ssl_check_hostname":
                value = _flag(name, value)
            elif name == "ssl_cert_reqs" and value not in ("required", "optional", "none"):
                raise ValueError(f"ssl_cert_reqs must be required, optional or none, not "
                                 f"{value!r}")
            tls_args[name] = value
    if tls_args and not tls:
        raise ValueError(f"{', '.join(tls_args)} in a Redis URL need TLS: use rediss://")
    path_part = unquote(parts.path)
    db_text = query.get("db")
    service = None
    path: str | None = None
    hosts: tuple[tuple[str, int], ...] = ()
    if base == "unix":
        if not path_part.startswith("/"):
            raise ValueError(f"a unix:// Redis URL needs an absolute socket path: {url!r}")
        path = path_part
    else:
        if not hostpart:
            raise ValueError(f"a Redis URL needs a host: {url!r}")
        hosts = _hosts(hostpart, 26379 if variant == "sentinel" else 6379)
        segments = [s for s in path_part.split("/") if s]
        if variant == "sentinel":
            if not segments:
                raise ValueError("a redis+sentinel:// URL names its service: "
                                 "redis+sentinel://host:26379/mymaster[/db]")
            service = segments.pop(0)
        if variant == "cluster" and (segments or db_text not in (None, "0")):
            raise ValueError("a Redis Cluster has only database 0")
        if len(segments) > 1:
            raise ValueError(f"unexpected path {path_part!r} in a Redis URL")
        if segments and db_text is None:
            db_text = segments[0]
        if len(hosts) > 1 and variant == "":
            raise ValueError("several hosts need redis+sentinel:// or redis+cluster://")
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError(f"bad database number {db_text!r} in a Redis URL") from None
    if db < 0:
        raise ValueError(f"bad database number {db} in a Redis URL")
    return RedisURL(url=url, kind=variant or "single", tls=tls, hosts=hosts, path=path, db=db,
                    username=username, password=password, namespace=namespace,
                    insecure=insecure, lease=lease, service=service, tls_args=tls_args)


def with_query(url: str, extra: Mapping[str, Any]) -> str:
    """``url`` with the query arguments ``extra`` added (replacing any of the same name);
    ``True``/``False`` become 1/0."""
    base, _, rest = url.partition("?")
    query_text, hash_, fragment = rest.partition("#")
    query = [(k, v) for k, v in parse_qsl(query_text, keep_blank_values=True)
             if k not in extra]
    for name, value in extra.items():
        if isinstance(value, bool):
            value = int(value)
        query.append((name, str(value)))
    return f"{base}?{urlencode(query, quote_via=quote)}{hash_}{fragment}"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and ``repr``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc_end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            netloc_end = min(netloc_end, found)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hostpart = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _secret = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return f"{scheme}://{hidden}@{hostpart}{tail}"
