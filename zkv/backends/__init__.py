"""Other engines a store can run on, behind the same :class:`~zkv.Store` API.

Today there is one: Redis (or Valkey), alone, behind Sentinel, or as a Cluster
(:mod:`zkv.backends.redis`). A store is joined by giving its URL wherever an endpoint goes::

    kv = zkv.connect("redis://:secret@db.example:6379/0?namespace=app")
    # or: ZKV_ENDPOINT=redis://... and zkv.store() in every process, pool workers included

This module only recognises backend URLs and opens the backend lazily, so that importing zkv
never imports redis-py (an optional extra: ``pip install 'zkv[redis]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ZkvError, ZkvTimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Options
    from ..core import Core

__all__ = ["BACKEND_OPTIONS", "SCHEMES", "ContentionError", "UnsupportedError",
           "is_backend_url", "open_core", "redact", "split_options"]

#: URL schemes that name a Redis (or Valkey) server, a Sentinel set or a Cluster.
SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis+sentinel",
           "rediss+sentinel", "valkey+sentinel", "valkeys+sentinel", "redis+cluster",
           "rediss+cluster", "valkey+cluster", "valkeys+cluster")

#: Keyword arguments of :func:`zkv.connect` that belong to a backend (they travel in its URL,
#: so that a forked child reconnects with them).
BACKEND_OPTIONS = ("namespace", "insecure", "lease")


class ContentionError(ZkvTimeoutError):
    """An optimistic operation (``modify``, ``transact``, a pipeline, an ``incr`` of a float
    on Redis) kept losing to concurrent writers of the same keys until its timeout passed;
    nothing was changed. Retry later, or make the keys less contended."""


class UnsupportedError(ZkvError, NotImplementedError):
    """This backend cannot give what was asked for (the message says what, and what to do
    instead)."""


def is_backend_url(address: object) -> bool:
    """Whether ``address`` is a backend URL (``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://``, ``redis+cluster://``, ``valkey://`` ...) rather than a zkv
    endpoint (``ipc://``, ``tcp://``)."""
    if not isinstance(address, str):
        return False
    scheme, sep, _rest = address.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def redact(address: str) -> str:
    """``address`` with the password of a backend URL hidden (for ``repr`` and messages)."""
    if not is_backend_url(address):
        return address
    from .redis_url import redact as hide

    return hide(address)


def split_options(address: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Move the backend's keyword arguments (:data:`BACKEND_OPTIONS`) from ``options`` into
    the URL's query; return the URL and the remaining zkv options."""
    from .redis_url import with_query

    own = {name: options[name] for name in BACKEND_OPTIONS if options.get(name) is not None}
    rest = {name: value for name, value in options.items() if name not in BACKEND_OPTIONS}
    return (with_query(address, own) if own else address), rest


def open_core(address: str, options: Options) -> Core:
    """A core serving the store at backend URL ``address`` (see :mod:`zkv.backends.redis`).
    Raises ImportError, saying how to install it, when redis-py is missing."""
    from .redis import RedisCore

    return RedisCore(address, options)
