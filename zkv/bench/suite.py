"""The benchmark suite: the processes it starts (the lab) and the rows it measures.

:class:`Lab` forks everything that must be forked before the main process has threads (the
Manager, the bare echo server, the Pipe server, a standalone zkv owner, the agents), then
starts the things that run threads in the main process (the zkv owner, the publishers).
:meth:`Lab.rows` lists the workloads; each case's ``run`` does one repetition.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import multiprocessing.managers
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from ..config import Options
from ..owner.process import start as start_owner_process
from ..store import Store, connect, serve
from . import baselines, workloads
from .agents import AgentError, Agents, detach
from .redis_server import RedisServer, RedisUnavailable
from .runner import Case, Progress, Rep, Row, Settings, Target, percentile

__all__ = ["SUBJECTS", "Lab"]

ZKV = "zkv"
ECHO = "bare zmq echo"
PIPE = "Pipe echo"
MANAGER = "Manager dict"
REDIS = "Redis"
LOCKED = "dict + Lock"
ZPUB = "bare zmq PUB/SUB"
ZPUB_RAW = "bare zmq PUB/SUB, raw"
RPUB = "Redis pub/sub"
QUEUE = "mp.Queue"
ASYNC = "zkv async"
ASYNC_UV = "zkv async, uvloop"
SYNC = "zkv sync"
ONE_BY_ONE = "zkv async, one by one"
SNAP_SMALL = "zkv, 100,000 small keys"
SNAP_LARGE = "zkv, 1 GB, 64 MB values"
ZKV_REDIS = "zkv on Redis"
REDIS_PY = "redis-py"
ZKV_EMBEDDED = "zkv, embedded owner"

#: What each subject name in the table means.
SUBJECTS = {
    ZKV: "zkv: the owner is the benchmark's main process, the client a child process; "
         "frames of 1 MiB or more go through files in /dev/shm",
    ECHO: "pyzmq DEALER -> ROUTER over ipc, server in its own process: one frame echoed "
          "(values stored and returned as frames, without copying)",
    PIPE: "multiprocessing.Pipe to a server process (pickled send/recv)",
    MANAGER: "multiprocessing.Manager().dict() proxy",
    REDIS: "redis-py over a unix socket to a private redis-server (no persistence); batches "
           "use MGET/MSET and a non-transactional pipeline",
    LOCKED: "a dict behind a threading.Lock in the same process",
    ZPUB: "pyzmq XPUB -> SUB over ipc, same high-water mark as zkv: [channel, pickle] sent, "
          "one recv_multipart (RCVTIMEO) and one unpickling per message",
    ZPUB_RAW: "the same, carrying the float as 8 raw bytes (no pickling; a floor, not what "
              "zkv does)",
    RPUB: "redis-py: one PUBLISH call per message; a PubSub per subscriber",
    QUEUE: "multiprocessing.Queue, one per subscriber (put into each)",
    ASYNC: "zkv.AsyncStore in the child (asyncio's own event loop), over the same "
           "connection as the sync store: `await kv.get(...)`",
    ASYNC_UV: "the same on a uvloop event loop",
    SYNC: "the child's sync store (`kv.get(...)`): what the async rows compare with",
    ONE_BY_ONE: "the same AsyncStore, each get awaited before the next is sent",
    SNAP_SMALL: "kv.save() in an owner of 100,000 keys of 16-byte str values set in the "
                "owner (pickled while the file is written)",
    SNAP_LARGE: "kv.save() in an owner of 16 bytes values of 64 MB each, set in the owner "
                "(written as they are)",
    ZKV_REDIS: "zkv with its data in the private redis-server (zkv.connect('unix://...')): "
               "the Store API, zkv's codec, change events, sequence numbers",
    REDIS_PY: "redis-py used directly on the same redis-server, storing the same Python "
              "objects the way a program must: pickled in, unpickled out; MGET / MSET",
    ZKV_EMBEDDED: "zkv as usual (the owner is the benchmark's main process), beside",
}

HWM = 100_000

#: How a pub/sub row's zkv subscriber receives (:func:`workloads.subscriber_loop`).
PUB_MODES = {"message": "receive_message()", "receive": "receive()",
             "iter": "for data in sub", "callback": "a callback"}


@dataclasses.dataclass(frozen=True)
class _PubRow:
    """What a pub/sub row measures: ``k`` subscribers, each receiving the way ``mode``
    says; the publisher in the main process (the zkv owner) or in a ``worker`` child; a
    tuple (``kind="tuple"``) or a bare float; throughput, or ``latency``."""

    k: int
    mode: str = "message"
    worker: bool = False
    latency: bool = False
    kind: str = "tuple"

    @property
    def id(self) -> str:
        if self.latency:
            return f"pub_latency_{self.k}"
        if self.kind == "float":
            return f"pub_float_{self.k}"
        if self.worker:
            return "pub_worker_" + ("" if self.mode == "message" else f"{self.mode}_") \
                + str(self.k)
        return f"pub_{'rate' if self.mode == 'message' else self.mode}_{self.k}"

    @property
    def title(self) -> str:
        who = "1 child" if self.k == 1 else f"{self.k} children"
        what = "latency" if self.latency else "throughput"
        where = "worker" if self.worker else "owner"
        detail = "a float" if self.kind == "float" else PUB_MODES[self.mode]
        return f"pub/sub {what}, {where} -> {who}, {detail}"
N_AGENTS = 16
SMALL = ("str", 16)
SMALL_BYTES = ("bytes", 16)
BATCH = 1000


def _standalone_owner(conn: multiprocessing.connection.Connection) -> None:
    """A zkv owner in a process of its own, until told to stop (or the pipe closes)."""
    detach()
    with serve() as owner:
        conn.send(owner.endpoint)
        try:
            conn.recv()
        except (EOFError, OSError):
            pass


class _ZkvPublisher:
    """A store publishing (a subscription is live when ``subscribe`` returns). A zkv owner
    may drop a message for a subscriber that falls behind (the marker is then sent again);
    on Redis, a connected subscriber loses nothing (``reliable``)."""

    def __init__(self, store: Store, reliable: bool = False) -> None:
        self._store = store
        self.reliable = reliable

    def wait_subscribers(self, channel: str, count: int, timeout: float = 10.0) -> None:
        pass

    def publish(self, channel: str, value: Any) -> None:
        self._store.publish(channel, value)

    def close(self) -> None:
        pass


def _pub_or_sub(agent: Any, publisher: dict[str, Any] | None = None,
                **subscriber: Any) -> dict[str, Any]:
    """An agent's part of a pub/sub repetition with the publisher in a child."""
    if publisher is not None:
        return workloads.publisher_loop(agent, **publisher)
    return workloads.subscriber_loop(agent, **subscriber)


def _busy_until(moment: float) -> int:
    """Pure-Python work (holding the GIL) until ``moment``."""
    x = 0
    while time.monotonic() < moment:
        for i in range(2000):
            x += i * i
    return x


def _polling_until(moment: float, queue: Any) -> int:
    """A main process's other usual way of being busy: waiting for results on a
    ``multiprocessing.Queue``, one millisecond at a time, until ``moment``."""
    polls = 0
    while time.monotonic() < moment:
        try:
            queue.get(timeout=0.001)
        except Empty:
            polls += 1
    return polls


class Lab:
    """Everything one run needs; a context manager that stops it all."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self.progress = progress
        self._closers: list[Callable[[], None]] = []
        self._channel = 0
        self.redis_skip: str | None = None
        self.redis_path = ""
        self.redis_url = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _later(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.tmp = tempfile.mkdtemp(prefix="zkv-bench-")
        self._later(lambda: shutil.rmtree(self.tmp, ignore_errors=True))

        self.progress.note("starting redis-server, Manager, echo servers and "
                           f"{N_AGENTS} agent processes")
        redis = RedisServer()
        try:
            redis.start()
            self.redis_path = redis.socket_path
            self.redis_url = redis.url("bench")
            self._later(redis.stop)
        except RedisUnavailable as exc:
            self.redis_skip = str(exc)

        manager = multiprocessing.managers.SyncManager(ctx=ctx)
        manager.start(detach)
        self._later(manager.shutdown)
        self.manager_dict = manager.dict()

        self.echo_address = f"ipc://{self.tmp}/echo"
        ready_r, ready_w = ctx.Pipe(duplex=False)
        echo = ctx.Process(target=baselines.echo_server, args=(self.echo_address, ready_w),
                           name="zkv-bench-echo", daemon=True)
        echo.start()
        ready_w.close()
        if not ready_r.poll(30):
            raise RuntimeError("the echo server did not start")
        ready_r.close()

        def stop_echo() -> None:
            client = baselines.EchoKV(self.echo_address)
            try:
                client.stop_server()
            finally:
                client.close()
            self._stop_process(echo)
        self._later(stop_echo)

        pipe_mine, pipe_theirs = ctx.Pipe()
        piper = ctx.Process(target=baselines.pipe_server, args=(pipe_theirs,),
                            name="zkv-bench-pipe", daemon=True)
        piper.start()
        pipe_theirs.close()

        def stop_piper() -> None:
            try:
                pipe_mine.send(None)
            except OSError:
                pass
            self._stop_process(piper)
        self._later(stop_piper)

        own_mine, own_theirs = ctx.Pipe()
        standalone = ctx.Process(target=_standalone_owner, args=(own_theirs,),
                                 name="zkv-bench-standalone-owner", daemon=True)
        standalone.start()
        own_theirs.close()
        if not own_mine.poll(30):
            raise RuntimeError("the standalone zkv owner did not start")
        self.standalone_endpoint = own_mine.recv()

        def stop_standalone() -> None:
            try:
                own_mine.send(None)
            except OSError:
                pass
            self._stop_process(standalone)
        self._later(stop_standalone)

        self.queues = [ctx.Queue() for _ in range(4)]
        self.idle_queue = ctx.Queue()  # (the busy-owner row's main process polls it)

        self.process_endpoint, dedicated = start_owner_process(Options(), None)
        self._later(lambda: dedicated.stop(5.0))

        def resources(i: int) -> dict[str, Any]:
            return {"manager": self.manager_dict, "queues": self.queues,
                    "pipe": pipe_mine if i == 0 else None}
        self.agents = Agents(N_AGENTS, resources, ctx)
        self._later(self.agents.close)  # (closers run in reverse: agents before servers)

        # From here on the main process may run threads.
        self.owner = serve()
        self._later(self.owner.close)
        self._later(self.agents.close)  # idempotent: before the owner their clients talk to
        self.endpoint = self.owner.endpoint
        self.zpub = baselines.ZmqPublisher(f"ipc://{self.tmp}/pub", HWM)
        self._later(self.zpub.close)
        self.zpub_raw = baselines.ZmqPublisher(f"ipc://{self.tmp}/pub-raw", HWM, raw=True)
        self._later(self.zpub_raw.close)
        self.rpub: Any = None
        self.redis_store: Store | None = None
        if not self.redis_skip:
            self.rpub = baselines.RedisPublisher(self.redis_path)
            self._later(self.rpub.close)
            try:
                self.redis_store = connect(self.redis_url)
                self._later(self.redis_store.close)
            except ImportError as exc:  # redis-py is there (the server answered), hiredis...
                self.redis_skip = str(exc)
        self.qpub = baselines.QueuePublisher(self.queues)
        self.locked = baselines.LockedDict()

    @staticmethod
    def _stop_process(proc: Any) -> None:
        proc.join(2.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for fn in reversed(closers):
            try:
                fn()
            except Exception as exc:  # pragma: no cover - best effort on the way out
                self.progress.note(f"cleanup: {type(exc).__name__}: {exc}")
        for q in getattr(self, "queues", []):
            q.close()
            q.cancel_join_thread()

    # -- helpers ---------------------------------------------------------------------------------

    def zkv(self, cached: bool = False) -> tuple[Any, ...]:
        return ("zkv", self.endpoint, cached)

    def _redis_case(self, run: Callable[[], Callable[[bool], Rep]],
                    subject: str = REDIS) -> Case:
        if self.redis_skip:
            return Case(subject, None, skip=self.redis_skip)
        return Case(subject, run())

    def _seed(self, specs: list[tuple[Any, ...]], items: list[tuple[str, str, int]]) -> None:
        for spec in specs:
            self.agents.call(workloads.prepare, [{"spec": spec, "items": items}])

    def _kv_specs(self, *, pipe: bool = True, echo: bool = True) -> list[tuple[Any, ...]]:
        specs: list[tuple[Any, ...]] = [self.zkv(), ("manager",)]
        if echo:
            specs.append(("echo", self.echo_address))
        if pipe:
            specs.append(("pipe",))
        if not self.redis_skip:
            specs.append(("redis", self.redis_path))
        return specs

    def _latency(self, spec: tuple[Any, ...], op: str, key: str, value: tuple[str, int], *,
                 duration: float, min_ops: int, chunk: int = 1,
                 warm: bool = True) -> Callable[[bool], Rep]:
        def run(warmup: bool) -> Rep:
            (samples,) = self.agents.call(workloads.latency_loop, [{
                "spec": spec, "op": op, "key": key, "value": value,
                "duration": 0.0 if warmup else duration,
                "min_ops": 1 if warmup else min_ops, "chunk": chunk, "warm": warm}])
            return Rep(samples)
        return run

    # -- rows ------------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        s = self.settings
        out = [self._child_small("get"), self._child_small("set"),
               self._owner_local("get"), self._owner_local("set")]
        for mb in (1, s.large_mb):
            out += [self._large("set", mb), self._large("get", mb)]
        out += [self._batch("get_many"), self._batch("set_many"), self._batch("pipeline")]
        out += [self._cached(), self._staleness()]
        out += [self._pubsub(_PubRow(k)) for k in (1, 4)]
        out += [self._pubsub(_PubRow(1, mode)) for mode in PUB_MODES if mode != "message"]
        out += [self._pubsub(_PubRow(1, mode, worker=True)) for mode in PUB_MODES]
        out.append(self._pubsub(_PubRow(1, kind="float")))
        out += [self._pubsub(_PubRow(k, latency=True)) for k in (1, 4)]
        out += [self._clients(n) for n in (1, 4, 16)]
        out.append(self._busy_owner())
        out += [self._async_get(), self._async_gather(), self._snapshot_pause()]
        out += [self._on_redis_small("get"), self._on_redis_small("set"),
                self._on_redis_batch("get_many"), self._on_redis_batch("set_many"),
                self._on_redis_pubsub()]
        return out

    # -- zkv on Redis ----------------------------------------------------------------------------

    def _on_redis(self, run: Callable[[], Callable[[bool], Rep]], subject: str) -> Case:
        if self.redis_skip:
            return Case(subject, None, skip=self.redis_skip)
        return Case(subject, run())

    def _redis_specs(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return ("zkv", self.redis_url, False), ("redis-pickled", self.redis_path)

    def _on_redis_small(self, op: str) -> Row:
        s = self.settings
        lat: dict[str, Any] = dict(duration=s.latency_s, min_ops=s.min_ops)
        key = "small"
        zkv_redis, redis_py = self._redis_specs()
        cases = [
            self._on_redis(lambda: self._latency(zkv_redis, op, key, SMALL, **lat), ZKV_REDIS),
            self._on_redis(lambda: self._latency(redis_py, op, key, SMALL, **lat), REDIS_PY),
            self._on_redis(lambda: self._latency(("redis", self.redis_path), op, key, SMALL,
                                                 **lat), REDIS),
            Case(ZKV_EMBEDDED, self._latency(self.zkv(), op, key, SMALL, **lat)),
        ]
        setup = None
        if not self.redis_skip:
            def setup() -> None:
                self._seed([zkv_redis, redis_py, ("redis", self.redis_path), self.zkv()],
                           [(key, *SMALL)])
        return Row(
            id=f"redis_{op}", title=f"on Redis: child {op}, small value", metric="latency",
            unit="", cases=cases,
            targets=[Target("<=1.15x slower", against=REDIS_PY, min_ratio=1 / 1.15)],
            note="a child process; 16-character str; 'Redis' stores it as raw bytes and hands "
                 "back bytes (no pickling: a floor); the others give the str back",
            setup=setup)

    def _on_redis_batch(self, op: str) -> Row:
        s = self.settings
        zkv_redis, redis_py = self._redis_specs()

        def case(spec: tuple[Any, ...]) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                (samples,) = self.agents.call(workloads.batch_loop, [{
                    "spec": spec, "op": op, "n_keys": BATCH,
                    "duration": 0.0 if warmup else s.batch_s,
                    "min_ops": 1 if warmup else 3}])
                return Rep(samples)
            return run
        setup = None
        if op == "get_many" and not self.redis_skip:
            def setup() -> None:
                for spec in (zkv_redis, redis_py, ("redis", self.redis_path), self.zkv()):
                    self.agents.call(workloads.batch_loop, [{
                        "spec": spec, "op": "set_many", "n_keys": BATCH, "duration": 0.0,
                        "min_ops": 1}])
        return Row(
            id=f"redis_{op}", title=f"on Redis: child {op}, 1000 keys", metric="throughput",
            unit="keys/s", work=float(BATCH),
            cases=[self._on_redis(lambda: case(zkv_redis), ZKV_REDIS),
                   self._on_redis(lambda: case(redis_py), REDIS_PY),
                   self._on_redis(lambda: case(("redis", self.redis_path)), REDIS),
                   Case(ZKV_EMBEDDED, case(self.zkv()))],
            targets=[Target("<=1.15x slower", against=REDIS_PY, min_ratio=1 / 1.15)],
            setup=setup,
            note="16-character str values; zkv on Redis: MGET, or MULTI with MSET and the "
                 "change-event script; 'Redis': raw bytes, not pickled (a floor)")

    def _on_redis_pubsub(self) -> Row:
        p = _PubRow(1)

        def case(spec: tuple[Any, ...], publisher: Any) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                return self._pub_once(p, spec, publisher, warmup)
            return run
        redis_publisher = None if self.redis_store is None else \
            _ZkvPublisher(self.redis_store, reliable=True)
        cases = [self._on_redis(lambda: case(("zkv", self.redis_url), redis_publisher),
                                ZKV_REDIS),
                 self._on_redis(lambda: case(("redis", self.redis_path), self.rpub), RPUB),
                 Case(ZKV_EMBEDDED, case(("zkv", self.endpoint), _ZkvPublisher(self.owner)))]
        return Row(
            id="redis_pub_1", title="on Redis: pub/sub throughput, main -> 1 child",
            metric="rate", unit="msgs/s", cases=cases,
            targets=[Target("0 silent losses", no_silent_loss=True),
                     Target(">=0.85x its rate", against=RPUB, min_ratio=0.85)],
            note=f"{self.settings.pub_msgs} messages (or {self.settings.pub_s} s of them) of "
                 f"(int, int, float, {len(workloads.PUB_TEXT)}-character str), pickled by "
                 "every subject, published as fast as possible by the main process; zkv on "
                 "Redis: one script per publish (sequence number and PUBLISH), the "
                 "subscriber counts gaps")

    def _child_small(self, op: str) -> Row:
        s = self.settings
        lat: dict[str, Any] = dict(duration=s.latency_s, min_ops=s.min_ops)
        key = "small"
        cases = [
            Case(ZKV, self._latency(self.zkv(), op, key, SMALL, **lat)),
            Case(ECHO, self._latency(("echo", self.echo_address), "echo", key, SMALL_BYTES,
                                     **lat)),
            Case(PIPE, self._latency(("pipe",), "echo", key, SMALL, **lat)),
            Case(MANAGER, self._latency(("manager",), op, key, SMALL, **lat)),
            self._redis_case(lambda: self._latency(("redis", self.redis_path), op, key,
                                                   SMALL, **lat)),
        ]
        return Row(
            id=f"child_{op}", title=f"child {op}, small value", metric="latency", unit="",
            cases=cases, targets=[Target("<=1.2x slower", against=ECHO, min_ratio=1 / 1.2)],
            note="a child process; 16-byte value; the echo rows carry 16 bytes each way",
            setup=lambda: self._seed(self._kv_specs(pipe=False, echo=False),
                                     [(key, *SMALL)]))

    def _owner_local(self, op: str) -> Row:
        s = self.settings
        owner, locked = self.owner, self.locked
        value = workloads.make_value(*SMALL)
        if op == "get":
            zkv_call: Callable[[], Any] = lambda: owner.get("small")  # noqa: E731
            lock_call: Callable[[], Any] = lambda: locked.get("small")  # noqa: E731
        else:
            zkv_call = lambda: owner.set("local", value)  # noqa: E731
            lock_call = lambda: locked.set("local", value)  # noqa: E731

        def local(call: Callable[[], Any]) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                if warmup:
                    return Rep(workloads.local_loop(call, 0.0, 100))
                return Rep(workloads.local_loop(call, s.latency_s, s.min_ops * 100))
            return run

        def setup() -> None:
            owner.set("small", value)
            locked.set("small", value)
        targets = [Target("<=2x slower", against=LOCKED, min_ratio=0.5)] if op == "get" else []
        return Row(id=f"owner_{op}", title=f"owner-local {op}", metric="latency", unit="",
                   cases=[Case(ZKV, local(zkv_call)), Case(LOCKED, local(lock_call))],
                   targets=targets, setup=setup,
                   note="in the owner's own process, timed per 100 calls")

    def _large(self, op: str, mb: int) -> Row:
        s = self.settings
        size = mb * 1024 * 1024
        key = f"big{mb}"
        value = ("bytes", size)
        big = mb >= 8
        lat: dict[str, Any] = dict(duration=0.0, min_ops=s.large_ops, warm=False) if big \
            else dict(duration=s.latency_s, min_ops=5)
        specs = {ZKV: self.zkv(), ECHO: ("echo", self.echo_address), PIPE: ("pipe",),
                 MANAGER: ("manager",)}
        if not self.redis_skip:
            specs[REDIS] = ("redis", self.redis_path)

        def case(spec: tuple[Any, ...]) -> Callable[[bool], Rep]:
            measure = self._latency(spec, op, key, value, **lat)

            def run(warmup: bool) -> Rep:
                # Clients are warm from earlier rows: the warm-up of a get stores the value
                # it will read, that of a set does nothing (a 64 MB warm-up costs seconds).
                if not warmup:
                    return measure(False)
                if op == "get":
                    self._seed([spec], [(key, "bytes", size)])
                return Rep([])
            return run
        cases = [Case(name, case(spec)) for name, spec in specs.items()]
        if self.redis_skip:
            cases.append(Case(REDIS, None, skip=self.redis_skip))
        targets = []
        if big:
            targets = [Target("<=1.5x slower", against=ECHO, min_ratio=1 / 1.5),
                       Target(">=2x faster", against=MANAGER, min_ratio=2.0),
                       Target(">=2x faster", against=REDIS, min_ratio=2.0)]
        return Row(id=f"{op}_{mb}mb", title=f"child {op}, {mb} MB bytes", metric="throughput",
                   unit="MB/s", work=size / 1e6, cases=cases, targets=targets,
                   note="a bytes value; the bare echo hands back bytes too (one copy)")

    def _batch(self, op: str) -> Row:
        s = self.settings

        def case(spec: tuple[Any, ...]) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                (samples,) = self.agents.call(workloads.batch_loop, [{
                    "spec": spec, "op": op, "n_keys": BATCH,
                    "duration": 0.0 if warmup else s.batch_s,
                    "min_ops": 1 if warmup else 3}])
                return Rep(samples)
            return run
        titles = {"get_many": "child get_many, 1000 keys", "set_many":
                  "child set_many, 1000 keys", "pipeline": "child pipeline, 1000 ops"}
        setup = None
        if op == "get_many":
            def setup() -> None:
                specs = [self.zkv()] + ([] if self.redis_skip else
                                        [("redis", self.redis_path)])
                for spec in specs:
                    self.agents.call(workloads.batch_loop, [{
                        "spec": spec, "op": "set_many", "n_keys": BATCH, "duration": 0.0,
                        "min_ops": 1}])
        return Row(
            id=op, title=titles[op], metric="throughput",
            unit="ops/s" if op == "pipeline" else "keys/s", work=float(BATCH),
            cases=[Case(ZKV, case(self.zkv())),
                   self._redis_case(lambda: case(("redis", self.redis_path)))],
            targets=[Target(">=100,000/s", min_speed=100_000.0),
                     Target(">=1.3x faster", against=REDIS, min_ratio=1.3)],
            setup=setup,
            note="16-byte values; Redis: MGET / MSET / pipeline(transaction=False); the "
                 "pipeline alternates set and get")

    def _cached(self) -> Row:
        s = self.settings
        lat: dict[str, Any] = dict(duration=s.latency_s, min_ops=s.min_ops * 10, chunk=10)
        key = "small"
        return Row(
            id="cached_get", title="child cached get, same key", metric="latency", unit="",
            cases=[Case(ZKV, self._latency(self.zkv(cached=True), "get", key, SMALL, **lat)),
                   Case("zkv, no cache", self._latency(self.zkv(), "get", key, SMALL, **lat)),
                   Case(MANAGER, self._latency(("manager",), "get", key, SMALL, **lat)),
                   self._redis_case(lambda: self._latency(("redis", self.redis_path), "get",
                                                          key, SMALL, **lat))],
            targets=[Target(">=20x faster", against=MANAGER, min_ratio=20.0)],
            note="store.enable_cache(prefix='') in the child; timed per 10 reads",
            setup=lambda: self._seed(self._kv_specs(pipe=False, echo=False),
                                     [(key, *SMALL)]))

    def _staleness(self) -> Row:
        s = self.settings
        owner = self.owner

        counter = [0]  # values never repeat: a stale read of an earlier repetition's value
                       # (legitimate, within the window) must not pass for this one's

        def run(warmup: bool) -> Rep:
            writes = 2 if warmup else s.staleness_writes
            key = "stale"
            first = counter[0] + 1
            final = counter[0] = first + writes
            owner.set(key, first)
            with self.agents.session(workloads.staleness_reader, [{
                    "spec": self.zkv(cached=True), "key": key, "final": final,
                    "max_wait": writes * 0.02 + 10.0}]) as agents:
                agents.wait_ready()
                written: dict[int, float] = {}
                for i in range(first + 1, final + 1):
                    time.sleep(0.002)
                    owner.set(key, i)
                    written[i] = time.monotonic()
                (seen,) = agents.results()
            if not seen or seen[-1][0] != final:
                shown = ", ".join(str(v) for v, _t in seen[-5:]) or "nothing new"
                raise AgentError(f"the cached reader never saw the last write {final} "
                                 f"(stale cache); last values seen: {shown}")
            delays = [max(0.0, t - written[v]) for v, t in seen if v in written]
            return Rep(delays, {"unseen": float(writes - len(delays))})
        return Row(id="cache_staleness", title="cache staleness window", metric="latency",
                   unit="", cases=[Case(ZKV, run)],
                   note="owner sets a key every ~2 ms; a child reading it through its cache "
                        "notes when each new value shows: the time after the set returned")

    def _pubsub(self, p: _PubRow) -> Row:
        s = self.settings

        def case(spec: tuple[Any, ...], publisher: Any) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                return self._pub_once(p, spec, publisher, warmup)
            return run
        if p.worker:  # the publishing agent makes its own publisher
            cases = [Case(ZKV, case(("zkv", self.endpoint), None)),
                     Case(ZPUB, case(("zmq", f"ipc://{self.tmp}/worker-pub"), None))]
        elif p.kind == "float":
            cases = [Case(ZKV, case(("zkv", self.endpoint), _ZkvPublisher(self.owner))),
                     Case(ZPUB_RAW, case(("zmq", f"ipc://{self.tmp}/pub-raw", "raw"),
                                         self.zpub_raw))]
        else:
            cases = [Case(ZKV, case(("zkv", self.endpoint), _ZkvPublisher(self.owner))),
                     Case(ZPUB, case(("zmq", f"ipc://{self.tmp}/pub"), self.zpub))]
            if p.mode == "message":
                cases += [self._redis_case(lambda: case(("redis", self.redis_path), self.rpub),
                                           subject=RPUB),
                          Case(QUEUE, case(("queue",), self.qpub))]
        payload = "a float (the bare baseline sends it as 8 raw bytes)" if p.kind == "float" \
            else f"(int, int, float, {len(workloads.PUB_TEXT)}-character str), pickled by " \
                 "every subject"
        publisher = "a child process publishes (through the owner for zkv)" if p.worker \
            else "the main process (the zkv owner) publishes"
        if p.latency:
            return Row(id=p.id, title=p.title, metric="latency", unit="", cases=cases,
                       note=f"{s.pub_latency_msgs} messages ~1 ms apart of {payload}; publish "
                            "to receive")
        targets = [Target("0 silent losses", no_silent_loss=True)]
        if p.k == 1 and p.kind != "float":
            targets.append(Target(">=0.9x its rate", against=ZPUB, min_ratio=0.9))
        if p.id == "pub_rate_1":
            targets.append(Target(">=5x faster", against=RPUB, min_ratio=5.0))
        return Row(id=p.id, title=p.title, metric="rate", unit="msgs/s", cases=cases,
                   targets=targets,
                   note=f"{s.pub_msgs} messages (or {s.pub_s} s of them) of {payload}, "
                        f"published as fast as possible; {publisher}; the rate at which each "
                        "subscriber received them (the slowest), one receive call per "
                        "message; dropped = reported by the subscriber, lost = silently")

    def _pub_once(self, p: _PubRow, spec: tuple[Any, ...], publisher: Any,
                  warmup: bool) -> Rep:
        s = self.settings
        self._channel += 1
        channel = f"bench.{self._channel}"
        messages = 3 if warmup else s.pub_latency_msgs if p.latency else s.pub_msgs
        duration = 0.01 if warmup else s.pub_s
        max_wait = duration + messages * 0.01 + 20.0
        calls = [{"spec": spec, "channel": channel, "hwm": HWM, "latency": p.latency,
                  "max_wait": max_wait, "mode": p.mode if spec[0] == "zkv" else "message"}
                 ] * p.k
        if p.worker:
            return self._pub_from_worker(p, spec, channel, calls, messages, duration)
        with self.agents.session(workloads.subscriber_loop, calls) as agents:
            agents.wait_ready()
            publisher.wait_subscribers(channel, p.k)
            sent, t0 = workloads.publish_loop(publisher.publish, channel, messages, duration,
                                              p.latency, p.kind)
            marker = workloads.pub_value(-1, 0.0, p.kind)
            if publisher.reliable:
                publisher.publish(channel, marker)
            else:
                deadline = time.monotonic() + 20.0
                while True:
                    publisher.publish(channel, marker)
                    if agents.done(0.01) or time.monotonic() > deadline:
                        break
            results = agents.results()
        return self._pub_rep(p, results, sent, t0)

    def _pub_from_worker(self, p: _PubRow, spec: tuple[Any, ...], channel: str,
                         calls: list[dict[str, Any]], messages: int, duration: float) -> Rep:
        """Subscribers in agents 0 .. k-1, the publisher in agent k."""
        publish = {"spec": spec, "channel": channel, "subscribers": p.k, "hwm": HWM,
                   "messages": messages, "duration": duration, "latency": p.latency,
                   "kind": p.kind}
        with self.agents.session(_pub_or_sub, [*calls, {"publisher": publish}]) as agents:
            agents.wait_ready()
            agents.tell(workloads.GO, among=[p.k])
            deadline = time.monotonic() + calls[0]["max_wait"] + 10.0
            while not agents.done(0.05, among=range(p.k)):
                if time.monotonic() > deadline:
                    raise AgentError("the subscribers did not finish")
            agents.tell(workloads.STOP, among=[p.k])
            *results, published = agents.results()
        return self._pub_rep(p, results, published["sent"], published["t0"])

    @staticmethod
    def _pub_rep(p: _PubRow, results: list[dict[str, Any]], sent: int, t0: float) -> Rep:
        received = dropped = silent = 0
        cpu = 0.0
        rates = []
        delays: list[float] = []
        for r in results:
            before = r["marker_seq"] - 1 if r["marker_seq"] is not None else sent
            received += r["received"]
            dropped += r["dropped"]
            silent += max(0, before - r["received"] - r["dropped"])
            delays.extend(r["delays"])
            cpu += r["cpu"]
            span = r["last"] - t0
            rates.append(r["received"] / span if r["received"] and span > 0 else 0.0)
        extra = {"sent": float(sent * p.k), "received": float(received),
                 "dropped": float(dropped), "silent": float(silent)}
        if p.latency:  # (its CPU time is mostly waking up for each paced message)
            return Rep(delays, extra)
        extra["cpu"] = cpu
        return Rep([min(rates)], extra)

    def _clients(self, n: int) -> Row:
        s = self.settings

        def case(spec: tuple[Any, ...], op: str, value: tuple[str, int]) -> \
                Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                duration = 0.02 if warmup else s.clients_s
                start_at = time.monotonic() + 0.05 + 0.005 * n
                counts = self.agents.call(workloads.throughput_loop, [{
                    "spec": spec, "op": op, "key": "small", "value": value,
                    "start_at": start_at, "duration": duration}] * n)
                return Rep([sum(counts) / duration])
            return run
        targets = [Target(">=0.85x its rate", against=ECHO, min_ratio=0.85)] if n == 16 else []
        return Row(
            id=f"clients_{n}", title=f"aggregate get rate, {n} client process"
            + ("es" if n > 1 else ""), metric="rate", unit="req/s",
            cases=[Case(ZKV, case(self.zkv(), "get", SMALL)),
                   Case(ECHO, case(("echo", self.echo_address), "echo", SMALL_BYTES)),
                   self._redis_case(lambda: case(("redis", self.redis_path), "get", SMALL))],
            targets=targets, note="each client does small gets back to back for a fixed time",
            setup=lambda: self._seed(self._kv_specs(pipe=False, echo=False),
                                     [("small", *SMALL)]))

    def _busy_owner(self) -> Row:
        s = self.settings
        key = "small"
        idle = "zkv embedded, owner idle"
        busy = "zkv embedded, main busy (Python loop)"
        polling = "zkv embedded, main polls a Queue"

        def case(spec: tuple[Any, ...], how: str) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                duration = 0.02 if warmup else s.busy_s
                start_at = time.monotonic() + 0.05
                with self.agents.session(workloads.latency_loop, [{
                        "spec": spec, "op": "get", "key": key, "value": SMALL,
                        "duration": duration, "min_ops": 1, "start_at": start_at}]) as agents:
                    if how == "busy":
                        _busy_until(start_at + duration)
                    elif how == "polling":
                        _polling_until(start_at + duration, self.idle_queue)
                    (samples,) = agents.results()
                total = sum(samples)
                return Rep([len(samples) / total], {"ops": float(len(samples)),
                                                    "seconds": total,
                                                    "p99": percentile(samples, 99)},
                           raw=samples)
            return run
        standalone = ("zkv", self.standalone_endpoint, False)
        dedicated = ("zkv", self.process_endpoint, False)
        return Row(
            id="busy_owner", title="child gets while the main process is busy", metric="rate",
            unit="gets/s",
            cases=[Case("zkv owner='process', main busy", case(dedicated, "busy")),
                   Case(idle, case(self.zkv(), "idle")),
                   Case(busy, case(self.zkv(), "busy")),
                   Case(polling, case(self.zkv(), "polling")),
                   Case("zkv serve, main busy", case(standalone, "busy")),
                   Case(MANAGER, case(("manager",), "busy"))],
            # (On a free-threaded Python a busy thread holds up nobody: no GIL, no cliff to
            # measure against.)
            targets=[Target(">=0.5x the idle embedded owner", against=idle, min_ratio=0.5),
                     *([Target(">=50x the busy embedded owner", against=busy, min_ratio=50.0)]
                       if getattr(sys, "_is_gil_enabled", lambda: True)() else []),
                     Target("embedded, Python loop: >=150 gets/s", min_speed=150.0,
                            subject=busy),
                     Target("embedded, Queue polling: >=150 gets/s", min_speed=150.0,
                            subject=polling)],
            note="gets/s one child achieves while the main process runs pure-Python code (or "
                 "polls a multiprocessing.Queue every millisecond); owner='process': the data "
                 "lives in a dedicated process the main one started; 'zkv serve': in a "
                 "process of its own",
            setup=lambda: self._seed([self.zkv(), standalone, dedicated, ("manager",)],
                                     [(key, *SMALL)]))

    # -- asyncio ---------------------------------------------------------------------------------

    def _async_get(self) -> Row:
        s = self.settings
        key = "small"

        def case(loop: str) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                (samples,) = self.agents.call(workloads.async_latency_loop, [{
                    "spec": self.zkv(), "key": key, "loop": loop,
                    "duration": 0.0 if warmup else s.latency_s,
                    "min_ops": 1 if warmup else s.min_ops}])
                return Rep(samples)
            return run
        lat: dict[str, Any] = dict(duration=s.latency_s, min_ops=s.min_ops)
        return Row(
            id="async_get", title="child awaited get, small value", metric="latency", unit="",
            cases=[Case(ASYNC, case("asyncio")), Case(ASYNC_UV, case("uvloop")),
                   Case(SYNC, self._latency(self.zkv(), "get", key, SMALL, **lat))],
            targets=[Target("<=1.2x slower", against=SYNC, min_ratio=1 / 1.2)],
            note="the same child and connection for every subject; 16-byte value",
            setup=lambda: self._seed([self.zkv()], [(key, *SMALL)]))

    def _async_gather(self) -> Row:
        s = self.settings
        key = "small"

        def case(batch: int, loop: str) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                (rate,) = self.agents.call(workloads.async_rate_loop, [{
                    "spec": self.zkv(), "key": key, "batch": batch, "loop": loop,
                    "duration": 0.01 if warmup else s.latency_s}])
                return Rep([rate])
            return run
        return Row(
            id="async_gather", title="child gets, 100 at a time (asyncio.gather)",
            metric="rate", unit="gets/s",
            cases=[Case(ASYNC, case(100, "asyncio")), Case(ASYNC_UV, case(100, "uvloop")),
                   Case(ONE_BY_ONE, case(1, "asyncio")), Case(SYNC, case(1, "sync"))],
            targets=[Target(">=1.5x faster", against=ONE_BY_ONE, min_ratio=1.5)],
            note="the rate of gets from one event loop: 100 requests in flight at once "
                 "against one at a time",
            setup=lambda: self._seed([self.zkv()], [(key, *SMALL)]))

    # -- snapshots -------------------------------------------------------------------------------

    def _snapshot_owner(self, large: bool) -> Store:
        """An owner of its own for the snapshot rows, filled once."""
        name = "snap_large" if large else "snap_small"
        made: Store | None = getattr(self, name, None)
        if made is None:
            made = serve()
            self._later(made.close)
            setattr(self, name, made)
            made.set("probe", "x" * 16)
            if large:
                count, size = 16, self.settings.large_mb << 20
                for i in range(count):
                    made.set(f"large:{i}", bytes([i]) * size)
            else:
                count = 100_000 if self.settings.mode != "smoke" else 1000
                made.set_many({f"key:{i}": workloads.make_value(*SMALL) for i in range(count)})
        return made

    def _snapshot_pause(self) -> Row:
        def case(large: bool) -> Callable[[bool], Rep]:
            def run(warmup: bool) -> Rep:
                owner = self._snapshot_owner(large)
                path = os.path.join(self.tmp, "bench.zkv")
                with self.agents.session(workloads.stall_probe, [{
                        "spec": ("zkv", owner.endpoint, False), "key": "probe",
                        "max_wait": 300.0}]) as agents:
                    agents.wait_ready()
                    result = owner.save(path)
                    agents.tell(workloads.STOP)
                    (probe,) = agents.results()
                os.unlink(path)
                return Rep([result.pause], {"saves": 1.0, "save": result.seconds,
                                            "bytes": float(result.bytes),
                                            "stall": probe["worst"]})
            return run
        return Row(
            id="snapshot_pause", title="snapshot: the store held for the listing",
            metric="latency", unit="",
            cases=[Case(SNAP_SMALL, case(False)), Case(SNAP_LARGE, case(True))], compare=False,
            note="kv.save(path) in the owner; median and p99: how long the store's lock was "
                 "held (the pause); then the whole save (pickling, writing, fsync, rename), "
                 "and the slowest get a client did back to back meanwhile")
