"""A private ``redis-server`` for one benchmark run (the one zkv's tests use too: see
:mod:`zkv.backends.redis_server`): unix socket in a temporary directory, no persistence, no
TCP port; stopped and removed afterwards."""

from __future__ import annotations

from ..backends.redis_server import RedisServer, RedisUnavailable

__all__ = ["RedisServer", "RedisUnavailable"]
