"""What is measured: zkv's clients, and the measuring loops agents run.

Each loop runs one repetition and returns its samples, so that the runner can interleave
subjects (A B A B ...). Latency loops time every operation (or every ``chunk`` of them, for
operations too short to time one by one) with ``time.perf_counter``; loops that must line up
across processes use ``time.monotonic``, one clock for every process on Linux.

A *subject spec* says which store an agent talks to and is the key of its cached client:
``("zkv", endpoint, cached)``, ``("echo", address)``, ``("pipe",)``, ``("manager",)``,
``("redis", socket_path)``, ``("redis-pickled", socket_path)`` (and zkv on Redis:
``("zkv", "unix://...", False)``); for pub/sub, ``("zkv", endpoint)``, ``("zmq", address)``,
``("redis", socket_path)``, ``("queue",)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import zmq

from ..aio import AsyncStore
from ..errors import ZkvTimeoutError
from ..store import Store, connect
from . import baselines
from .agents import Agent, NotAvailable

__all__ = [
    "GO",
    "PUB_TEXT",
    "STOP",
    "ZkvKV",
    "ZkvSubscriber",
    "async_latency_loop",
    "async_rate_loop",
    "batch_loop",
    "latency_loop",
    "local_loop",
    "make_value",
    "open_kv",
    "prepare",
    "pub_value",
    "publish_loop",
    "publisher_loop",
    "staleness_reader",
    "stall_probe",
    "subscriber_loop",
    "throughput_loop",
]

Spec = tuple[Any, ...]

_ENDED = object()

#: The text in every pub/sub message: the issue's harness sent ``(int, int, float, str of 100
#: characters)``.
PUB_TEXT = "x" * 100


def pub_value(n: int, when: float, kind: str) -> Any:
    """The value of message ``n`` (negative: the marker that ends a repetition) sent at
    ``when`` (latency rows; else 0.0): ``(n, 67890, when, PUB_TEXT)``, or with ``kind``
    ``"float"`` a bare float (``when`` in latency rows, else ``n``)."""
    if kind == "float":
        return when if when and n >= 0 else float(n)
    return (n, 67890, when, PUB_TEXT)


def _pub_fields(value: Any) -> tuple[float, float]:
    """``(counter, send time)`` of a value made by :func:`pub_value`."""
    if type(value) is tuple:
        return value[0], value[2]
    return value, value


def make_value(kind: str, size: int) -> Any:
    """A value of ``size`` bytes: ``"bytes"`` (a pattern, not zeros) or ``"str"``."""
    if kind == "str":
        return "x" * size
    pattern = b"0123456789abcdef"
    return pattern * (size // len(pattern)) + pattern[: size % len(pattern)]


class ZkvKV:
    """A zkv client store; with ``cached`` its reads go through ``Store.enable_cache``."""

    def __init__(self, endpoint: str, cached: bool) -> None:
        self.store: Store = connect(endpoint)
        if cached:
            enable = getattr(self.store, "enable_cache", None)
            if enable is None:
                self.store.close()
                raise NotAvailable("Store.enable_cache does not exist in this zkv version")
            enable(prefix="")

    def get(self, key: str) -> Any:
        return self.store.get(key)

    def set(self, key: str, value: Any) -> None:
        self.store.set(key, value)

    def get_many(self, keys: list[str]) -> Any:
        return self.store.get_many(keys)

    def set_many(self, items: dict[str, Any]) -> None:
        self.store.set_many(items)

    def pipeline(self, ops: list[tuple[str, str, Any]]) -> list[Any]:
        with self.store.pipeline() as p:
            for op, key, value in ops:
                if op == "set":
                    p.set(key, value)
                else:
                    p.get(key)
        return p.results

    def close(self) -> None:
        self.store.close()


class ZkvSubscriber:
    """A zkv :class:`~zkv.Subscriber` of one channel (live when made), read one message per
    call the way ``mode`` says: ``"message"`` (``receive_message``), ``"receive"``
    (``receive``) or ``"iter"`` (``for data in sub``; the subscriber is closed after
    ``max_wait`` seconds so that a lost marker cannot hang the loop)."""

    def __init__(self, store: Store, channel: str, mode: str = "message",
                 max_wait: float = 60.0) -> None:
        self._sub = store.subscribe(channel)
        self._mode = mode
        self._iter: Iterator[Any] | None = None
        self._watchdog: threading.Timer | None = None
        if mode == "iter":
            self._iter = iter(self._sub)
            self._watchdog = threading.Timer(max_wait, self._sub.close)
            self._watchdog.daemon = True
            self._watchdog.start()
        elif mode not in ("message", "receive"):
            raise ValueError(f"unknown receive mode {mode!r}")

    @property
    def dropped(self) -> int:
        return self._sub.dropped

    def receive(self, timeout: float) -> tuple[Any, int | None] | None:
        if self._iter is not None:
            data = next(self._iter, _ENDED)
            return None if data is _ENDED else (data, None)
        try:
            if self._mode == "receive":
                return self._sub.receive(timeout), None
            message = self._sub.receive_message(timeout)
        except ZkvTimeoutError:
            return None
        return message.data, message.seq

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._sub.close()


class _ZmqContext:
    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()

    def close(self) -> None:
        self.ctx.destroy(0)


def open_kv(agent: Agent, spec: Spec) -> Any:
    """The agent's client for ``spec`` (made once, then reused)."""
    def make() -> Any:
        kind = spec[0]
        if kind == "zkv":
            return ZkvKV(spec[1], bool(spec[2]))
        if kind == "echo":
            return baselines.EchoKV(spec[1])
        if kind == "pipe":
            return baselines.PipeKV(agent.resources["pipe"])
        if kind == "manager":
            return baselines.ManagerKV(agent.resources["manager"])
        if kind == "redis":
            return baselines.RedisKV(spec[1])
        if kind == "redis-pickled":
            return baselines.RedisPickledKV(spec[1])
        raise ValueError(f"unknown subject {spec!r}")
    return agent.client(spec, make)


def _open_sub(agent: Agent, spec: Spec, channel: str, hwm: int, mode: str,
              max_wait: float) -> Any:
    kind = spec[0]
    if kind == "zkv":
        return ZkvSubscriber(open_kv(agent, ("zkv", spec[1], False)).store, channel, mode,
                             max_wait)
    if kind == "zmq":
        ctx = agent.client("zmq-context", _ZmqContext).ctx
        return baselines.ZmqSubscriber(ctx, spec[1], channel, hwm, raw=spec[2:] == ("raw",))
    if kind == "redis":
        return baselines.RedisSubscriber(open_kv(agent, ("redis", spec[1]))._r, channel)
    if kind == "queue":
        return baselines.QueueSubscriber(agent.resources["queues"][agent.index], channel)
    raise ValueError(f"unknown subscriber {spec!r}")


def _operation(kv: Any, op: str, key: str, value: Any) -> Callable[[], Any]:
    if op == "get":
        return lambda: kv.get(key)
    if op == "set":
        return lambda: kv.set(key, value)
    if op == "echo":
        return lambda: kv.echo(value)
    raise ValueError(f"unknown operation {op!r}")


# -- loops run by agents ---------------------------------------------------------------------------

def prepare(agent: Agent, spec: Spec, items: list[tuple[str, str, int]]) -> None:
    """Set each ``(key, kind, size)`` to :func:`make_value` ``(kind, size)``."""
    kv = open_kv(agent, spec)
    for key, kind, size in items:
        kv.set(key, make_value(kind, size))


def _wait_until(moment: float) -> None:
    while True:
        left = moment - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def latency_loop(agent: Agent, spec: Spec, op: str, key: str, value: tuple[str, int],
                 duration: float, min_ops: int, chunk: int = 1,
                 start_at: float | None = None, warm: bool = True) -> array[float]:
    """Seconds per operation, timed per ``chunk`` operations, for ``duration`` seconds (and
    at least ``min_ops`` operations). ``warm``: one untimed call first."""
    kv = open_kv(agent, spec)
    call = _operation(kv, op, key, make_value(*value))
    if warm:
        call()
    if start_at is not None:
        _wait_until(start_at)
    clock = time.perf_counter
    samples: array[float] = array("d")
    end = clock() + duration
    done = 0
    r = range(chunk)
    while done < min_ops or clock() < end:
        t0 = clock()
        for _ in r:
            call()
        samples.append((clock() - t0) / chunk)
        done += chunk
    return samples


T = TypeVar("T")


def _run_on(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` on an asyncio (``"asyncio"``) or uvloop (``"uvloop"``) event loop."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            coro.close()
            raise NotAvailable("uvloop is not installed (pip install uvloop)") from None
        return uvloop.run(coro)  # type: ignore[no-any-return]
    return asyncio.run(coro)


def async_latency_loop(agent: Agent, spec: Spec, key: str, duration: float, min_ops: int,
                       loop: str = "asyncio") -> array[float]:
    """Seconds per awaited ``get`` of an :class:`~zkv.AsyncStore` over the agent's zkv client
    (its connection, the one the sync rows use), for ``duration`` seconds and at least
    ``min_ops`` gets, on a new event loop of the kind ``loop`` names."""
    store = AsyncStore(open_kv(agent, spec).store)

    async def measure() -> array[float]:
        get = store.get
        await get(key)  # the loop's socket, opened
        clock = time.perf_counter
        samples: array[float] = array("d")
        end = clock() + duration
        while len(samples) < min_ops or clock() < end:
            t0 = clock()
            await get(key)
            samples.append(clock() - t0)
        return samples
    return _run_on(loop, measure())


def async_rate_loop(agent: Agent, spec: Spec, key: str, duration: float, batch: int,
                    loop: str = "asyncio") -> float:
    """Gets per second for ``duration`` seconds: ``batch`` gets of an AsyncStore at a time
    (``asyncio.gather``; 1: awaited one by one), or (``loop="sync"``) the sync store's gets
    one by one."""
    kv = open_kv(agent, spec)
    if loop == "sync":
        get_sync = kv.store.get
        get_sync(key)
        clock = time.perf_counter
        t0 = clock()
        end = t0 + duration
        done = 0
        while clock() < end:
            get_sync(key)
            done += 1
        return done / (clock() - t0)
    store = AsyncStore(kv.store)

    async def measure() -> float:
        get = store.get
        await get(key)
        many: Callable[[], Awaitable[Any]] = \
            (lambda: asyncio.gather(*[get(key) for _ in range(batch)])) if batch > 1 \
            else (lambda: get(key))
        clock = time.perf_counter
        t0 = clock()
        end = t0 + duration
        done = 0
        while clock() < end:
            await many()
            done += batch
        return done / (clock() - t0)
    return _run_on(loop, measure())


def stall_probe(agent: Agent, spec: Spec, key: str, max_wait: float) -> dict[str, float]:
    """Gets back to back until told STOP: the slowest one (seconds) and how many."""
    kv = open_kv(agent, spec)
    get = kv.store.get
    get(key)
    agent.ready()
    worst = 0.0
    count = 0
    clock = time.perf_counter
    deadline = time.monotonic() + max_wait
    while agent.message() != STOP and time.monotonic() < deadline:
        t0 = clock()
        get(key)
        elapsed = clock() - t0
        if elapsed > worst:
            worst = elapsed
        count += 1
    return {"worst": worst, "gets": float(count)}


def batch_loop(agent: Agent, spec: Spec, op: str, n_keys: int, duration: float,
               min_ops: int) -> array[float]:
    """Seconds per batch of ``n_keys`` small keys (``get_many``, ``set_many`` or a
    ``pipeline`` alternating set and get), for ``duration`` seconds."""
    kv = open_kv(agent, spec)
    keys = [f"batch:{i}" for i in range(n_keys)]
    value = make_value("str", 16)
    if op == "get_many":
        def call() -> Any:
            return kv.get_many(keys)
    elif op == "set_many":
        items = dict.fromkeys(keys, value)

        def call() -> Any:
            return kv.set_many(items)
    elif op == "pipeline":
        ops = [("set", keys[i], value) if i % 2 == 0 else ("get", keys[i - 1], None)
               for i in range(n_keys)]

        def call() -> Any:
            return kv.pipeline(ops)
    else:
        raise ValueError(f"unknown batch {op!r}")
    call()
    clock = time.perf_counter
    samples: array[float] = array("d")
    end = clock() + duration
    while len(samples) < min_ops or clock() < end:
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return samples


def throughput_loop(agent: Agent, spec: Spec, op: str, key: str, value: tuple[str, int],
                    start_at: float, duration: float) -> int:
    """How many operations completed between ``start_at`` and ``start_at + duration``
    (``time.monotonic``, shared by every agent)."""
    kv = open_kv(agent, spec)
    call = _operation(kv, op, key, make_value(*value))
    call()
    _wait_until(start_at)
    end = start_at + duration
    clock = time.monotonic
    done = 0
    while True:
        call()
        if clock() > end:
            return done
        done += 1


def subscriber_loop(agent: Agent, spec: Spec, channel: str, hwm: int, max_wait: float,
                    latency: bool, mode: str = "message") -> dict[str, Any]:
    """Subscribe to ``channel``, say ready, and count messages until the marker (a negative
    counter) arrives, one receive call per message (``mode``: see :class:`ZkvSubscriber`;
    ``"callback"``: a zkv callback). With ``latency``, each message carries its send time
    and the delay is kept. ``cpu`` is the CPU time the subscriber's process spent meanwhile
    (all its threads: the ZeroMQ I/O thread, zkv's dispatcher). ``marker_seq`` (zkv only) is
    the marker's sequence number: every message before it was either received or counted in
    ``dropped``, unless some were lost silently."""
    if mode == "callback":
        return _callback_loop(agent, spec, channel, max_wait, latency)
    sub = _open_sub(agent, spec, channel, hwm, mode, max_wait)
    try:
        agent.ready()
        received = 0
        last = 0.0
        delays: array[float] = array("d")
        marker_seq: int | None = None
        marked = False
        clock = time.monotonic
        deadline = clock() + max_wait
        cpu = time.process_time()
        while True:
            got = sub.receive(0.05)
            if got is None:
                if clock() > deadline or agent.aborted() or mode == "iter":
                    break
                continue
            value, seq = got
            n, sent_at = _pub_fields(value)
            if n < 0:
                marked, marker_seq = True, seq
                break
            received += 1
            last = clock()
            if latency:
                delays.append(last - sent_at)
        return {"received": received, "last": last, "delays": delays,
                "dropped": sub.dropped, "marker_seq": marker_seq, "marked": marked,
                "cpu": time.process_time() - cpu}
    finally:
        sub.close()


def _callback_loop(agent: Agent, spec: Spec, channel: str, max_wait: float,
                   latency: bool) -> dict[str, Any]:
    """:func:`subscriber_loop` with a zkv callback doing the counting."""
    if spec[0] != "zkv":
        raise ValueError(f"callbacks are zkv's: {spec!r}")
    store = open_kv(agent, ("zkv", spec[1], False)).store
    clock = time.monotonic
    marked = threading.Event()
    counts = {"received": 0, "last": 0.0}
    delays: array[float] = array("d")

    def on_message(value: Any) -> None:
        n, sent_at = _pub_fields(value)
        if n < 0:
            marked.set()
            return
        counts["received"] += 1
        counts["last"] = now = clock()
        if latency:
            delays.append(now - sent_at)

    dropped = store.dropped
    store.on_subscriber_receive(channel)(on_message)
    try:
        agent.ready()
        deadline = clock() + max_wait
        cpu = time.process_time()
        while not marked.wait(0.05):
            if clock() > deadline or agent.aborted():
                break
        cpu = time.process_time() - cpu
    finally:
        store.remove_callback(on_message)
    return {"received": counts["received"], "last": counts["last"], "delays": delays,
            "dropped": store.dropped - dropped, "marker_seq": None,
            "marked": marked.is_set(), "cpu": cpu}


def publish_loop(publish: Callable[[str, Any], None], channel: str, messages: int,
                 duration: float, latency: bool, kind: str) -> tuple[int, float]:
    """Publish ``messages`` values (:func:`pub_value`) on ``channel``: as fast as possible
    for at most ``duration`` seconds, or with ``latency`` ~1 ms apart, each carrying its send
    time. Returns how many were sent and when the first was (``time.monotonic``)."""
    clock = time.monotonic
    sent = 0
    t0 = clock()
    if latency:
        for _ in range(messages):
            publish(channel, pub_value(sent, clock(), kind))
            sent += 1
            time.sleep(0.001)
    else:
        end = t0 + duration
        while sent < messages:
            publish(channel, pub_value(sent, 0.0, kind))
            sent += 1
            if sent % 64 == 0 and clock() >= end:
                break
    return sent, t0


#: Sent to a publishing agent (:meth:`Agents.tell`): start publishing; stop sending markers.
GO, STOP = "go", "stop"


def publisher_loop(agent: Agent, spec: Spec, channel: str, subscribers: int, hwm: int,
                   messages: int, duration: float, latency: bool, kind: str
                   ) -> dict[str, Any]:
    """A publisher in a child process: set up (a zkv client, or a bare XPUB bound at the
    address subscribers connect to, which waits for their subscriptions), say ready, wait
    for GO, :func:`publish_loop`, then send markers until told STOP."""
    if spec[0] == "zkv":
        publish = open_kv(agent, ("zkv", spec[1], False)).store.publish
    elif spec[0] == "zmq":
        pub = agent.client(("zmq-pub", spec[1]), lambda: baselines.ZmqPublisher(spec[1], hwm))
        pub.wait_subscribers(channel, subscribers)
        publish = pub.publish
    else:
        raise ValueError(f"unknown publisher {spec!r}")
    agent.ready()
    deadline = time.monotonic() + 30.0
    while agent.message(0.05) != GO:
        if time.monotonic() > deadline:
            raise TimeoutError("no GO from the main process")
    sent, t0 = publish_loop(publish, channel, messages, duration, latency, kind)
    deadline = time.monotonic() + 20.0
    marker = pub_value(-1, 0.0, kind)
    while True:
        publish(channel, marker)
        if agent.message(0.01) == STOP or time.monotonic() > deadline:
            return {"sent": sent, "t0": t0}


def staleness_reader(agent: Agent, spec: Spec, key: str, final: int,
                     max_wait: float) -> list[tuple[int, float]]:
    """Read ``key`` through the cache in a loop (yielding the GIL between reads) and note
    when each new value is first seen, until ``final`` is seen."""
    kv = open_kv(agent, spec)
    seen = kv.get(key)
    agent.ready()
    out: list[tuple[int, float]] = []
    clock = time.monotonic
    deadline = clock() + max_wait
    reads = 0
    while seen != final and clock() < deadline:
        value = kv.get(key)
        if value != seen:
            out.append((value, clock()))
            seen = value
        time.sleep(0)
        reads += 1
        if reads % 256 == 0 and agent.aborted():
            break
    return out


# -- loops run by the main process -----------------------------------------------------------------

def local_loop(call: Callable[[], Any], duration: float, min_ops: int,
               chunk: int = 100) -> array[float]:
    """Seconds per call of ``call``, timed per ``chunk`` calls, for ``duration`` seconds."""
    clock = time.perf_counter
    samples: array[float] = array("d")
    r = range(chunk)
    call()
    end = clock() + duration
    done = 0
    while done < min_ops or clock() < end:
        t0 = clock()
        for _ in r:
            call()
        samples.append((clock() - t0) / chunk)
        done += chunk
    return samples
