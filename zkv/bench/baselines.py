"""The alternatives zkv is measured against: their servers and their clients.

- a bare pyzmq DEALER->ROUTER server in its own process: the floor for zkv's design (one
  ZeroMQ round trip, no serialization). One frame is echoed; ``[b"g", key]`` and
  ``[b"s", key, value]`` keep values as received frames and send them back without copying,
  so large values measure the same bytes travelling as zkv's;
- a ``multiprocessing.Pipe`` server in its own process (what the original ``shared_memory``
  module did): ``send``/``recv`` of pickled tuples;
- ``multiprocessing.Manager().dict()``;
- Redis through redis-py over a unix socket;
- for publish/subscribe: bare pyzmq XPUB->SUB, Redis pub/sub, and ``multiprocessing.Queue``
  (one queue per subscriber);
- a ``dict`` behind a ``threading.Lock``, for the owner's local reads and writes.

Clients are made in the process that uses them (agents make theirs on first use).
"""

from __future__ import annotations

import multiprocessing.connection
import pickle
import queue
import struct
import threading
import time
from typing import Any

import zmq

from .agents import detach

__all__ = [
    "EchoKV",
    "LockedDict",
    "ManagerKV",
    "PipeKV",
    "QueuePublisher",
    "QueueSubscriber",
    "RedisKV",
    "RedisPickledKV",
    "RedisPublisher",
    "RedisSubscriber",
    "ZmqPublisher",
    "ZmqSubscriber",
    "echo_server",
    "pipe_server",
]

_F64 = struct.Struct("<d")
_PICKLE = 5  # the protocol zkv uses


# -- servers (each runs in its own process) --------------------------------------------------------

def echo_server(address: str, ready: multiprocessing.connection.Connection) -> None:
    """A ROUTER at ``address`` until it receives ``[b"q"]``."""
    detach()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    ready.send(True)
    ready.close()
    values: dict[bytes, Any] = {}
    empty = b""
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            n = len(frames)
            if n == 2:  # [identity, payload]: echo
                sock.send_multipart(frames, copy=False)
                continue
            op = frames[1].bytes
            if op == b"g":
                sock.send_multipart([frames[0], values.get(frames[2].bytes, empty)], copy=False)
            elif op == b"s":
                values[frames[2].bytes] = frames[3]
                sock.send_multipart([frames[0], empty], copy=False)
            elif op == b"q":
                sock.send_multipart([frames[0], empty], copy=False)
                break
    finally:
        sock.close(0)
        ctx.term()


def pipe_server(conn: multiprocessing.connection.Connection) -> None:
    """Answers ``("e", x)`` with ``x``, ``("g", key)`` with the value, ``("s", key, value)``
    with None, until it receives None or the pipe closes."""
    detach()
    values: dict[str, Any] = {}
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            op = msg[0]
            if op == "e":
                conn.send(msg[1])
            elif op == "g":
                conn.send(values.get(msg[1]))
            else:
                values[msg[1]] = msg[2]
                conn.send(None)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


# -- key-value clients -----------------------------------------------------------------------------

class EchoKV:
    """A DEALER to :func:`echo_server`. ``get`` hands back ``bytes`` (one copy out of the
    frame, as zkv must make), ``set`` sends the value without copying it."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)

    def echo(self, payload: bytes) -> bytes:
        self._sock.send(payload)
        return self._sock.recv()

    def get(self, key: str) -> bytes:
        self._sock.send_multipart([b"g", key.encode()])
        frame = self._sock.recv(copy=False)
        return frame.bytes

    def set(self, key: str, value: bytes) -> None:
        self._sock.send_multipart([b"s", key.encode(), value], copy=False)
        self._sock.recv()

    def stop_server(self) -> None:
        self._sock.send_multipart([b"q", b""])
        if self._sock.poll(5000):
            self._sock.recv()

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class PipeKV:
    """The client end of :func:`pipe_server`."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn

    def echo(self, payload: Any) -> Any:
        self._conn.send(("e", payload))
        return self._conn.recv()

    def get(self, key: str) -> Any:
        self._conn.send(("g", key))
        return self._conn.recv()

    def set(self, key: str, value: Any) -> None:
        self._conn.send(("s", key, value))
        self._conn.recv()

    def close(self) -> None:
        pass  # the pipe belongs to the agent's inheritance, closed when it exits


class ManagerKV:
    """A ``Manager().dict()`` proxy."""

    def __init__(self, proxy: Any) -> None:
        self._d = proxy

    def get(self, key: str) -> Any:
        return self._d.get(key)

    def set(self, key: str, value: Any) -> None:
        self._d[key] = value

    def close(self) -> None:
        pass


class RedisKV:
    """redis-py over a unix socket. Batches use MGET/MSET and a non-transactional pipeline
    (Redis's fastest options)."""

    def __init__(self, socket_path: str) -> None:
        import redis

        self._r: Any = redis.Redis(unix_socket_path=socket_path)

    def get(self, key: str) -> Any:
        return self._r.get(key)

    def set(self, key: str, value: Any) -> None:
        self._r.set(key, value)

    def get_many(self, keys: list[str]) -> Any:
        return self._r.mget(keys)

    def set_many(self, items: dict[str, Any]) -> None:
        self._r.mset(items)

    def pipeline(self, ops: list[tuple[str, str, Any]]) -> list[Any]:
        p = self._r.pipeline(transaction=False)
        for op, key, value in ops:
            if op == "set":
                p.set(key, value)
            else:
                p.get(key)
        return p.execute()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._r.close()


class RedisPickledKV:
    """redis-py over a unix socket, storing Python objects the way a program using redis-py
    directly must: each value pickled (protocol 5) on the way in and unpickled on the way
    out; batches are one MGET / MSET. The baseline of the "zkv on Redis" rows. (Database 1:
    the raw :class:`RedisKV` uses the same key names in database 0.)"""

    def __init__(self, socket_path: str) -> None:
        import redis

        self._r: Any = redis.Redis(unix_socket_path=socket_path, db=1)

    def get(self, key: str) -> Any:
        raw = self._r.get(key)
        return None if raw is None else pickle.loads(raw)

    def set(self, key: str, value: Any) -> None:
        self._r.set(key, pickle.dumps(value, _PICKLE))

    def get_many(self, keys: list[str]) -> Any:
        return {k: pickle.loads(v) for k, v in zip(keys, self._r.mget(keys), strict=True)
                if v is not None}

    def set_many(self, items: dict[str, Any]) -> None:
        self._r.mset({k: pickle.dumps(v, _PICKLE) for k, v in items.items()})

    def close(self) -> None:
        self._r.close()


class LockedDict:
    """A dict behind a ``threading.Lock``: the owner-local floor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._d: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._d.get(key, default)

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            self._d[key] = value


# -- publish / subscribe ---------------------------------------------------------------------------
#
# Every message carries the same value for every subject (see workloads.pub_value: a tuple
# with a counter or a send time, or a bare float in the "raw float" row); a negative counter
# is the marker that ends a repetition. Subscribers return ``(value, seq)`` or None on
# timeout; ``seq`` is only known to zkv.

class ZmqPublisher:
    """An XPUB bound at ``address`` (it reports each subscription, so the publisher can wait
    for its subscribers instead of sleeping away ZeroMQ's slow-joiner window). Sends
    ``[channel, pickle of the value]``, as a pyzmq user would; with ``raw``, a float as 8
    bytes, not pickled."""

    reliable = False

    def __init__(self, address: str, hwm: int, raw: bool = False) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._sock.bind(address)
        self._raw = raw

    def wait_subscribers(self, channel: str, count: int, timeout: float = 10.0) -> None:
        wanted = b"\x01" + channel.encode()
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000)):
                raise TimeoutError(f"only {seen} of {count} subscribers arrived")
            if self._sock.recv() == wanted:
                seen += 1

    def publish(self, channel: str, value: Any) -> None:
        data = _F64.pack(value) if self._raw else pickle.dumps(value, _PICKLE)
        self._sock.send_multipart([channel.encode(), data])

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class ZmqSubscriber:
    """A SUB socket of one channel, made for one repetition: one ``recv_multipart`` with a
    timeout (the socket's RCVTIMEO, set when it changes) and one unpickling per message."""

    dropped = 0

    def __init__(self, ctx: zmq.Context[Any], address: str, channel: str, hwm: int,
                 raw: bool = False) -> None:
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.connect(address)
        self._sock.setsockopt(zmq.SUBSCRIBE, channel.encode())
        self._timeout = -1
        self._raw = raw

    def receive(self, timeout: float) -> tuple[Any, int | None] | None:
        ms = int(timeout * 1000)
        if ms != self._timeout:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._timeout = ms
        try:
            frames = self._sock.recv_multipart()
        except zmq.Again:
            return None
        if self._raw:
            return _F64.unpack(frames[1])[0], None
        return pickle.loads(frames[1]), None

    def close(self) -> None:
        self._sock.close(0)


class RedisPublisher:
    """``PUBLISH`` through redis-py, one call (one round trip) per message, as a user would."""

    reliable = True

    def __init__(self, socket_path: str) -> None:
        import redis

        self._r: Any = redis.Redis(unix_socket_path=socket_path)

    def wait_subscribers(self, channel: str, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = dict(self._r.pubsub_numsub(channel)).get(channel.encode(), 0)
            if found >= count:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"only {found} of {count} subscribers arrived")
            time.sleep(0.005)

    def publish(self, channel: str, value: Any) -> None:
        self._r.publish(channel, pickle.dumps(value, _PICKLE))

    def close(self) -> None:
        self._r.close()


class RedisSubscriber:
    """A redis-py PubSub of one channel, subscribed (confirmed) when made."""

    dropped = 0

    def __init__(self, client: Any, channel: str) -> None:
        self._p = client.pubsub()
        self._p.subscribe(channel)
        deadline = time.monotonic() + 10.0
        while True:
            msg = self._p.get_message(timeout=0.5)
            if msg is not None and msg["type"] == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise TimeoutError("redis did not confirm the subscription")

    def receive(self, timeout: float) -> tuple[Any, int | None] | None:
        msg = self._p.get_message(timeout=timeout)
        if msg is None or msg["type"] != "message":
            return None
        return pickle.loads(msg["data"]), None

    def close(self) -> None:
        self._p.close()


class QueuePublisher:
    """``put`` into the queue of each subscriber (a Queue has one reader)."""

    reliable = True

    def __init__(self, queues: list[Any]) -> None:
        self._queues = queues
        self._token = ""
        self._targets: list[Any] = []

    def wait_subscribers(self, channel: str, count: int, timeout: float = 10.0) -> None:
        self._token = channel
        self._targets = self._queues[:count]

    def publish(self, channel: str, value: Any) -> None:
        item = (channel, value)
        for q in self._targets:
            q.put(item)

    def close(self) -> None:
        pass


class QueueSubscriber:
    """Reads its own queue; items of other repetitions (other channels) are skipped."""

    dropped = 0

    def __init__(self, q: Any, channel: str) -> None:
        self._q = q
        self._channel = channel

    def receive(self, timeout: float) -> tuple[Any, int | None] | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                channel, value = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if channel == self._channel:
                return value, None

    def close(self) -> None:
        pass
