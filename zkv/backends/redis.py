"""A store on Redis or Valkey: :class:`RedisCore`, a :class:`~zkv.core.Core` over redis-py.

The same :class:`~zkv.Store` API, the same values (zkv's codec: cloudpickle, callables
included), and the same tests, with Redis holding the data instead of a zkv owner::

    kv = zkv.connect("redis://:secret@db.example:6379/0?namespace=app")

How each operation is done is one table, :data:`zkv.backends.redis_ops.IMPLEMENTATIONS`
(every entry of :mod:`zkv.ops` a store uses has one; a test checks it). In short:

- plain reads are plain commands (``GET``, ``MGET``, ``EXISTS``, ``PTTL``); each write is a
  Lua script (:mod:`~zkv.backends.redis_scripts`) that also counts the change and publishes
  its change event when someone watches; ``incr`` is ``INCRBY``, native;
- ``modify``, ``transact``, pipelines and float ``incr`` run their function in the caller and
  commit optimistically (compare-and-set, or ``WATCH``/``MULTI``/``EXEC``), retried with
  backoff until the store's ``timeout``, then :class:`~zkv.backends.ContentionError`;
- locks are leases (:mod:`~zkv.backends.redis_locks`); pub/sub and watches are Redis pub/sub
  with sequence numbers (:mod:`~zkv.backends.redis_pubsub`).

What differs from a zkv owner is listed in docs/scaling.md ("What Redis does not give").
redis-py is an optional dependency: ``pip install 'zkv[redis]'``.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from ..config import Options
from ..core import Call
from ..errors import AuthenticationError, ZkvConnectionError, ZkvError, ZkvTimeoutError
from ..ops import Op
from ..pubsub import Subscriber, Topics
from . import ContentionError, UnsupportedError, redis_codec, redis_url
from .redis_codec import KeySpace
from .redis_ops import IMPLEMENTATIONS, NOT_APPLICABLE
from .redis_scripts import SET, Script

if TYPE_CHECKING:  # pragma: no cover
    from ..dispatch import Dispatcher
    from .redis_locks import LockKeeper

__all__ = ["INSTALL_HINT", "RedisCore", "check_security", "ms", "translate"]

P = ParamSpec("P")
R = TypeVar("R")

INSTALL_HINT = "pip install 'zkv[redis]' (redis-py and hiredis)"

_loads = pickle.loads
_decode = redis_codec.loads
_dumps = redis_codec.dumps


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError(f"zkv on Redis needs redis-py: {INSTALL_HINT}") from None
    return redis


def translate(exc: BaseException, where: str = "Redis") -> BaseException:
    """The zkv exception for a redis-py one (see the exception tree in :mod:`zkv.errors`)."""
    redis = _redis()
    text = str(exc) or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        return AuthenticationError(f"{where} refused the credentials: {text}")
    if isinstance(exc, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return AuthenticationError(f"{where} refused: NOPERM, this user may not do it: {text}")
    if isinstance(exc, redis.TimeoutError):
        return ZkvTimeoutError(f"{where} did not answer in time: {text}")
    if isinstance(exc, redis.ConnectionError):
        return ZkvConnectionError(f"{where} cannot be reached: {text}")
    if isinstance(exc, redis.ResponseError):
        if text.startswith("WRONGTYPE"):
            return TypeError(f"a key of this namespace holds a Redis type zkv does not read "
                             f"(not a string): {text}")
        if text.startswith(("READONLY", "MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN",
                            "LOADING", "MASTERDOWN")):
            return ZkvConnectionError(f"{where} cannot serve this now: {text}")
    return ZkvError(f"{where} failed: {type(exc).__name__}: {text}")


def _seconds(timeout: float) -> float | None:
    return None if math.isinf(timeout) else timeout


def ms(seconds: float) -> int:
    """Milliseconds for Redis (at least 1)."""
    return max(1, round(seconds * 1000))


def _connect(url: redis_url.RedisURL, timeout: float | None, space: KeySpace
             ) -> tuple[Any, Any]:
    """The redis-py client of the server that holds the namespace (for a Cluster: the node
    that serves its hash slot), and the Cluster client (or None)."""
    redis = _redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries by redis-py: a command is never sent twice (an incr retried after a lost
    # reply would count twice). A connection found dead before use is replaced by the pool.
    # RESP2: subscriptions are read as plain replies (redis-py 8 speaks RESP3 by default).
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "retry": Retry(NoBackoff(), 0), "protocol": 2,
                              "max_connections": 1 << 16,  # (one per thread at most)
                              **url.connection_kwargs()}
    if url.kind == "single":
        if url.path is not None:
            common.pop("ssl", None)
            return redis.Redis(unix_socket_path=url.path, **common), None
        host, port = url.hosts[0]
        return redis.Redis(host=host, port=port, **common), None
    if url.kind == "sentinel":
        from redis.sentinel import Sentinel as _Sentinel

        Sentinel: Any = _Sentinel
        sentinel_kwargs = {k: v for k, v in common.items() if k != "db"}
        sentinel = Sentinel(list(url.hosts), sentinel_kwargs=sentinel_kwargs, **common)
        return sentinel.master_for(url.service), None
    from redis.cluster import ClusterNode as _ClusterNode
    from redis.cluster import RedisCluster

    ClusterNode: Any = _ClusterNode
    common.pop("retry")
    cluster: Any = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in url.hosts],
                           **common)
    node = cluster.get_node_from_key(space.version)
    client = cluster.get_redis_connection(node)
    return client, cluster


def _packer() -> Callable[[tuple[Any, ...]], bytes]:
    """A function packing one command (a tuple) into bytes: hiredis's, else redis-py's."""
    try:
        import hiredis
    except ImportError:
        import redis.connection

        module: Any = redis.connection
        serializer = module.PythonRespSerializer(
            6000, module.Encoder("utf-8", "strict", False).encode)

        def pack_python(args: tuple[Any, ...]) -> bytes:
            return b"".join(serializer.pack(*args))
        return pack_python
    return cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)


def check_security(url: redis_url.RedisURL) -> None:
    """Refuse a password-less connection to another host, as zkv refuses tcp without keys
    (anyone who can write a value can make every reader run code: values are pickles)."""
    if url.local or url.insecure or url.password or url.tls_args.get("ssl_certfile"):
        return
    hosts = ", ".join(f"{h}:{p}" for h, p in url.hosts)
    raise AuthenticationError(
        f"refusing to use Redis at {hosts} without a password: whoever can write to it can "
        "run code in every process that reads a value (values are pickles). Give "
        "credentials in the URL (redis://:PASSWORD@host:6379/0 or "
        "rediss://USER:PASSWORD@host:6380/0), or a TLS client certificate "
        "(rediss://...?ssl_certfile=...&ssl_keyfile=...); or, for a network you trust, "
        "say so: zkv.connect(url, insecure=True) or ?insecure=1")


class RedisCore:
    """Store operations on Redis (a :class:`~zkv.core.Core`). Thread-safe: redis-py gives
    each thread a connection from a pool. Fork-safe: a forked child's store makes a new
    core (its own connections) on first use."""

    is_owner = False

    def __init__(self, address: str, options: Options) -> None:
        redis = _redis()
        url = redis_url.parse(address)
        check_security(url)
        self.url = url
        self.options = options
        self.endpoint = address
        self.space = space = KeySpace(url.namespace)
        self.timeout = _seconds(options.timeout)
        self._where = f"Redis at {redis_url.redact(address)}"
        self.client, self._cluster = _connect(url, self.timeout, space)
        self._redis_error: type[BaseException] = redis.RedisError
        self._noscript: type[BaseException] = redis.exceptions.NoScriptError
        self._execute = self.client.execute_command
        self._pool = self.client.connection_pool
        self._response_error: type[BaseException] = redis.ResponseError
        #: redis-py's error for an error reply (Redis refused a command).
        self.response_error: type[Exception] = redis.ResponseError
        self._pack = _packer()
        self._version_key = space.version
        self._marker = space.watch_marker
        self._prefix = space.value_prefix
        self._pid = os.getpid()
        self._closed = False
        self._keeper: LockKeeper | None = None
        #: Whether a watcher checked that Redis publishes expired-key events.
        self.expiry_events_checked = False
        try:
            self._execute("PING")
        except self._redis_error as exc:
            self.client.close()
            raise self.translate(exc) from exc

    def __repr__(self) -> str:
        return f"<zkv RedisCore {redis_url.redact(self.endpoint)}>"

    # -- running commands ------------------------------------------------------------------------

    def translate(self, exc: BaseException) -> BaseException:
        return translate(exc, self._where)

    def command(self, *args: Any) -> Any:
        """One Redis command; redis-py's errors become zkv's."""
        try:
            return self._execute(*args)
        except self._redis_error as exc:
            raise self.translate(exc) from exc

    def fast(self, *args: Any) -> Any:
        """One command whose arguments are all ``str``/``bytes``/``int``, on the short path:
        packed by hiredis in one call (redis-py looks at every argument in Python first, a
        cost that grows with MGET's thousand keys), its raw reply returned."""
        pool = self._pool
        try:
            conn = pool.get_connection()
            try:
                conn.send_packed_command((self._pack(args),), False)
                return conn.read_response()
            except self._response_error:
                raise
            except BaseException:
                conn.disconnect()  # (a reply may be half read)
                raise
            finally:
                pool.release(conn)
        except self._redis_error as exc:
            raise self.translate(exc) from exc

    def pack(self, commands: list[tuple[Any, ...]]) -> Any:
        """Several commands packed for one send (see :meth:`fast`)."""
        pack = self._pack
        return b"".join([pack(command) for command in commands])

    def script(self, script: Script, keys: list[Any], args: list[Any]) -> Any:
        """Run a Lua script (``EVALSHA``; loaded first if the server does not know it)."""
        try:
            return self.fast("EVALSHA", script.sha, len(keys), *keys, *args)
        except ZkvError as exc:
            if not isinstance(exc.__cause__, self._noscript):
                raise
        self.command("SCRIPT", "LOAD", script.body)
        return self.fast("EVALSHA", script.sha, len(keys), *keys, *args)

    def connection(self) -> Any:
        """A connection of the pool for a sequence of commands (give it back with
        :meth:`release`)."""
        try:
            return self.client.connection_pool.get_connection()
        except self._redis_error as exc:
            raise self.translate(exc) from exc

    def release(self, conn: Any) -> None:
        self.client.connection_pool.release(conn)

    def new_connection(self) -> Any:
        """A connection of its own, outside the pool (for subscriptions)."""
        pool = self.client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    def retries(self, what: str) -> Iterator[int]:
        """Attempt numbers for an optimistic operation, with backoff between them; raises
        :class:`~zkv.backends.ContentionError` once the store's timeout has passed."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        attempt = 0
        while True:
            yield attempt
            attempt += 1
            if deadline is not None and time.monotonic() >= deadline:
                raise ContentionError(
                    f"{what} lost to concurrent writers {attempt} times in {self.timeout}s "
                    "(the store's timeout) and gave up; nothing was changed")
            # Full jitter, from 0.1 ms up to 20 ms: contenders spread out at once.
            time.sleep(random.uniform(0, min(0.02, 0.0001 * (2 ** min(attempt, 8)))))

    # -- the two most frequent calls, on their shortest paths ----------------------------------

    def get(self, key: str, default: Any) -> Any:
        text = self._prefix + key
        name: str | bytes = text if text.isascii() else text.encode("utf-8", "surrogatepass")
        raw = self.fast("GET", name)
        if raw is None:
            return default
        if raw[0] == 0x80:
            try:
                return _loads(raw)
            except Exception:
                pass  # loads says what is wrong with it
        return _decode(raw)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        data = _dumps(value)
        text = self._prefix + key
        name: str | bytes = text if text.isascii() else text.encode("utf-8", "surrogatepass")
        try:
            self.fast("EVALSHA", SET.sha, 2, name, self._version_key, data,
                      "" if ttl is None else ms(ttl), self._marker)
        except ZkvError as exc:
            if not isinstance(exc.__cause__, self._noscript):
                raise
            self.script(SET, [name, self._version_key],
                        [data, "" if ttl is None else ms(ttl), self._marker])

    # -- everything else -----------------------------------------------------------------------

    def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        implementation = IMPLEMENTATIONS.get(op.name)
        if implementation is None:
            why = NOT_APPLICABLE.get(op.name, "the Redis backend has no implementation of it")
            raise UnsupportedError(f"{op.name} is not available on a store kept in Redis: {why}")
        return cast(R, implementation(self, *args))

    def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        from .redis_txn import execute

        return execute(self, calls, out)

    # -- locks ---------------------------------------------------------------------------------

    @property
    def keeper(self) -> LockKeeper:
        if self._keeper is None:
            from .redis_locks import LockKeeper

            self._keeper = LockKeeper(self)
        return self._keeper

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        return self.keeper.acquire(name, token, timeout)

    def lock_release(self, name: str, token: bytes) -> bool:
        return self.keeper.release(name, token)

    # -- publish/subscribe ---------------------------------------------------------------------

    def subscriber(self, topics: Topics, what: str) -> Subscriber:
        from .redis_pubsub import RedisSubscriber

        return cast(Subscriber, RedisSubscriber(self, topics, what))

    def dispatcher(self) -> Dispatcher:
        from .redis_pubsub import RedisDispatcher

        return cast("Dispatcher", RedisDispatcher(self))

    # -- the read cache ------------------------------------------------------------------------

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        raise UnsupportedError(
            "the read cache is not available on Redis (client-side caching with RESP3 "
            "tracking is not implemented): every get reads Redis. Leave enable_cache out "
            "for a Redis store, or keep a local copy of what rarely changes and refresh it "
            "from watch()")

    def disable_cache(self, prefix: str | None) -> None:
        """Nothing is cached (see :meth:`enable_cache`)."""

    def cache_info(self) -> dict[str, int]:
        return {"hits": 0, "misses": 0, "entries": 0, "flushes": 0}

    # -- lifecycle -----------------------------------------------------------------------------

    def owner_alive(self) -> bool:
        """Whether Redis answers a PING now."""
        try:
            return bool(self._execute("PING"))
        except self._redis_error:
            return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None and self._pid == os.getpid():
            try:
                self._keeper.close()
            except (ZkvError, OSError):
                pass
        try:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()
        except Exception:  # pragma: no cover - closing anyway
            pass

