"""Child-process bodies and /proc helpers shared by the fault, garbage and stress tests.

Kept apart from the test modules so that the processes the tests start import only zkv (not
pytest or hypothesis): 32 spawned workers start in a fraction of the time.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import multiprocessing as mp
import os
import random
import signal
import struct
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import zkv
from zkv.testing import wait_for

__all__ = [
    "CTX",
    "OwnerProcess",
    "proc_status",
    "socket_backlog",
]

#: Start method for the processes of these tests: spawn works the same everywhere (no fork of
#: a multi-threaded pytest process) and children import only this module and zkv.
CTX = mp.get_context("spawn")


# -- /proc ----------------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """Resident memory (kB), thread count and open file descriptors of process ``pid``."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def socket_backlog() -> int:
    """Bytes this process has written into its sockets that their peers have not read yet
    (the largest such backlog of any one socket): ``SIOCOUTQ`` on every socket descriptor.

    A process calls it on itself to tell that a message it sent is partly in the kernel (its
    peer is stopped, say) -- that is, in flight, neither delivered whole nor still all here."""
    most = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            out = fcntl.ioctl(int(name), termios.TIOCOUTQ, struct.pack("i", 0))  # = SIOCOUTQ
        except OSError:  # gone meanwhile, or not a socket that keeps a send queue
            continue
        most = max(most, struct.unpack("i", out)[0])
    return most


# -- an owner in a child process -------------------------------------------------------------------

def _owner_main(conn: Connection, options: dict[str, Any]) -> None:
    """Serve a store, tell the parent its endpoint, then obey it: ``"stats"`` (answered with
    the owner's stats), ``"close"`` (close the store, stay alive), ``"exit"`` (or the parent's
    end of the pipe closing). Killed with SIGKILL by some tests."""
    kv = zkv.serve(**options)
    conn.send((kv.endpoint, os.getpid()))
    while True:
        try:
            what = conn.recv()
        except EOFError:
            break
        if what == "stats":
            conn.send(kv.stats())
        elif what == "blocks":  # Python's allocated memory blocks, after a collection
            gc.collect()
            conn.send(sys.getallocatedblocks())
        elif what == "close":
            kv.close()
            conn.send("closed")
        else:
            break
    kv.close()


class OwnerProcess:
    """A zkv owner running in a child process (so that it can be SIGKILLed, and its memory
    measured apart from the test's)."""

    def __init__(self, **options: Any) -> None:
        self._conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=_owner_main, args=(child, options), daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(30):
            self.proc.kill()
            raise RuntimeError("the owner process did not start within 30 s")
        self.endpoint, self.pid = self._conn.recv()
        self.directory = Path(self.endpoint[len("ipc://"):]).parent

    def stats(self) -> dict[str, int]:
        """The owner's stats(), asked in-process (does not use the sockets under test)."""
        self._conn.send("stats")
        if not self._conn.poll(30):
            raise RuntimeError("the owner process did not answer within 30 s")
        return self._conn.recv()  # type: ignore[no-any-return]

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def blocks(self) -> int:
        """The owner process's count of allocated Python memory blocks (objects and the
        buffers they own): unlike its resident memory, it goes back down when they are freed."""
        self._conn.send("blocks")
        if not self._conn.poll(30):
            raise RuntimeError("the owner process did not answer within 30 s")
        return self._conn.recv()  # type: ignore[no-any-return]

    def kill(self) -> float:
        """SIGKILL the owner; return the monotonic time just before the signal."""
        t = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)
        return t

    def close_store(self) -> float:
        """Close the owner's store (its process stays alive); return the monotonic time just
        before asking."""
        t = time.monotonic()
        self._conn.send("close")
        if not self._conn.poll(30):
            raise RuntimeError("the owner did not close its store within 30 s")
        self._conn.recv()
        return t

    def close(self) -> None:
        """End the owner process; remove its socket directory if it was killed."""
        if self.proc.is_alive():
            try:
                self._conn.send("exit")
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(10)
        self._conn.close()
        zkv.endpoint.remove_ipc_dir(self.directory)

    def __enter__(self) -> OwnerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- clients of an owner that gets killed ----------------------------------------------------------

def _report_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Run a child body; on an unexpected exception, print it and exit with status 3."""
    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(3)
    return wrapper


def _fail_time(call: Callable[[], Any]) -> tuple[float, float, str]:
    """Run ``call`` (expected to fail); return (start, end, exception type name)."""
    start = time.monotonic()
    try:
        call()
    except zkv.ZkvConnectionError as exc:
        return start, time.monotonic(), type(exc).__name__
    except Exception as exc:
        return start, time.monotonic(), f"unexpected {type(exc).__name__}: {exc}"
    return start, time.monotonic(), "no error"


def _after_owner_death(kv: zkv.Store, role: str, first: tuple[float, float, str],
                       results: Any, new_endpoints: Any) -> None:
    """Common tail of the clients: the next call fails fast, the old store stays broken, and a
    new owner can be joined from this same process."""
    nxt = _fail_time(lambda: kv.set("after", 1))
    results.put((role, os.getpid(), first, nxt))
    new_endpoint = new_endpoints.get(timeout=60)
    fresh = zkv.connect(new_endpoint, timeout=60)
    fresh.set(f"hello:{role}:{os.getpid()}", role)
    got = fresh.get(f"hello:{role}:{os.getpid()}")
    still = _fail_time(lambda: kv.get("anything"))
    start = time.monotonic()
    kv.close()  # closing a store whose owner died returns at once
    close_took = time.monotonic() - start
    results.put((role, os.getpid(), got, still, close_took))
    fresh.close()


@_report_errors
def hammer_client(endpoint: str, ready: Any, results: Any, new_endpoints: Any) -> None:
    """Loop set/get/incr/publish/modify against the owner until it dies."""
    kv = zkv.connect(endpoint, timeout=60)
    me = os.getpid()
    ready.put(me)
    n = 0
    while True:
        n += 1
        op = n % 5
        start = time.monotonic()
        try:
            if op == 0:
                kv.set(f"h:{me}", n)
            elif op == 1:
                kv.get(f"h:{me}")
            elif op == 2:
                kv.incr("hammered")
            elif op == 3:
                kv.publish("noise", n)
            else:
                kv.modify(f"m:{me}", _plus_one, 0)
        except zkv.ZkvConnectionError as exc:
            first = (start, time.monotonic(), type(exc).__name__)
            break
    _after_owner_death(kv, "hammer", first, results, new_endpoints)


def _plus_one(value: int) -> int:
    return value + 1


@_report_errors
def lock_waiter_client(endpoint: str, ready: Any, results: Any, new_endpoints: Any) -> None:
    """Wait (without a timeout) for a lock that the parent holds, until the owner dies."""
    kv = zkv.connect(endpoint, timeout=60)
    ready.put(os.getpid())
    first = _fail_time(lambda: kv.lock("held-by-parent").acquire())
    _after_owner_death(kv, "lock-waiter", first, results, new_endpoints)


@_report_errors
def subscriber_client(endpoint: str, ready: Any, results: Any, new_endpoints: Any) -> None:
    """Block in Subscriber.receive() (no timeout) until the owner dies."""
    kv = zkv.connect(endpoint, timeout=60)
    sub = kv.subscribe("quiet")
    ready.put(os.getpid())
    first = _fail_time(lambda: sub.receive(timeout=None))
    _after_owner_death(kv, "subscriber", first, results, new_endpoints)


@_report_errors
def slow_modify_client(endpoint: str, ready: Any, results: Any, new_endpoints: Any,
                       marker: str) -> None:
    """Run a modify() whose function keeps the owner busy for a minute (it creates ``marker``
    when it starts), until the owner dies."""
    kv = zkv.connect(endpoint, timeout=60)
    ready.put(os.getpid())
    first = _fail_time(lambda: kv.modify("slow", functools.partial(_sleep_a_minute, marker), 0))
    _after_owner_death(kv, "slow-modify", first, results, new_endpoints)


def _sleep_a_minute(marker: str, value: int) -> int:
    Path(marker).touch()
    time.sleep(60)  # the owner is busy in user code: its death must still be seen at once
    return value


# -- clients that get killed -----------------------------------------------------------------------

def write_generation(kv: zkv.Store, how: str, g: int, keys: int, pad: bytes) -> None:
    """Write generation ``g`` to ``keys`` keys in one message: a ``set_many`` of ``gen:<i>``
    (each value ``(g, pad)``), or a pipeline that sets ``pipe:<i>`` likewise and counts the
    generation in ``pipe:count``."""
    if how == "set_many":
        kv.set_many({f"gen:{i}": (g, pad) for i in range(keys)})
    else:
        with kv.pipeline() as p:
            for i in range(keys):
                p.set(f"pipe:{i}", (g, pad))
            p.incr("pipe:count")


@_report_errors
def generation_writer(endpoint: str, how: str, keys: int, size: int, progress: Any) -> None:
    """Forever: write the next generation (see :func:`write_generation`). ``progress`` (shared
    memory) says where it is: ``2g - 1`` while the call for generation g runs, ``2g`` once it
    has returned. Killed by the test at a moment it picks."""
    kv = zkv.connect(endpoint)
    pad = b"x" * size
    g = 0
    while True:
        g += 1
        progress.value = 2 * g - 1
        write_generation(kv, how, g, keys, pad)
        progress.value = 2 * g


@_report_errors
def mid_message_writer(endpoint: str, how: str, keys: int, size: int, conn: Connection) -> None:
    """Write generations 1 and 2 (see :func:`write_generation`) and say so; when told (the
    owner is stopped then), send generation 3, and report that this process is in the middle
    of sending it -- part of the message is in the kernel, unread by the owner, the rest still
    queued here -- with the bytes in the kernel. Killed by the test after that."""
    kv = zkv.connect(endpoint, timeout=120)
    pad = b"x" * size
    for g in (1, 2):
        write_generation(kv, how, g, keys, pad)
    conn.send("written")
    conn.recv()

    def report() -> None:
        in_kernel = wait_for(socket_backlog, timeout=60, interval=0.001,
                             what="part of the message in the kernel")
        conn.send(("mid-message", in_kernel))

    threading.Thread(target=report, daemon=True).start()
    write_generation(kv, how, 3, keys, pad)  # the owner is stopped: no answer comes
    conn.send(("answered", 0))


# -- stress ---------------------------------------------------------------------------------------

#: Channels the stress workers publish on.
STRESS_CHANNELS = ("ch0", "ch1", "ch2", "ch3")


def _append(item: Any, log: list[Any]) -> list[Any]:
    log.append(item)
    return log


@_report_errors
def stress_worker(endpoint: str, me: int, ops: int, pad: int, start: Any,
                  reports: Any) -> None:
    """``ops`` mixed operations, each chosen at random (seeded by ``me``); reports what it did
    so that the test can audit the store."""
    kv = zkv.connect(endpoint, timeout=120)
    rng = random.Random(me)
    padding = b"p" * pad
    report: dict[str, Any] = {"me": me, "added": 0, "incrs": 0, "seq": 0, "last": None,
                              "mismatches": 0, "deletes": 0,
                              "published": dict.fromkeys(STRESS_CHANNELS, 0)}
    start.wait(60)
    for i in range(ops):
        what = rng.choices(("set", "get", "incr", "modify", "delete", "publish"),
                           weights=(2, 2, 2, 2, 1, 1))[0]
        if what == "set":
            kv.set(f"w{me}:value", i)
            report["last"] = i
        elif what == "get":
            if kv.get(f"w{me}:value") != report["last"]:
                report["mismatches"] += 1  # a write of this process was lost or reordered
        elif what == "incr":
            amount = rng.randrange(1, 6)
            kv.incr("counter", amount)
            report["added"] += amount
            report["incrs"] += 1
            kv.incr(f"w{me}:incrs")
        elif what == "modify":
            item = (me, report["seq"])
            kv.modify(f"w{me}:seq", functools.partial(_append, report["seq"]), [])
            kv.modify("log", functools.partial(_append, item), [])
            report["seq"] += 1
        elif what == "delete":
            kv.set(f"w{me}:tmp", i)
            if not kv.delete(f"w{me}:tmp") or kv.get(f"w{me}:tmp") is not None:
                report["mismatches"] += 1
            report["deletes"] += 1
        else:
            channel = STRESS_CHANNELS[rng.randrange(len(STRESS_CHANNELS))]
            kv.publish(channel, (me, report["published"][channel], padding))
            report["published"][channel] += 1
    kv.close()
    reports.put(report)


@_report_errors
def stress_subscriber(endpoint: str, name: str, hwm: int, ready: Any, drain: Any,
                      reports: Any) -> None:
    """Subscribe to every stress channel; if ``drain`` is given, read nothing until it is set
    (a subscriber that falls far behind). Read until an end marker arrives on every channel;
    report what was received, the end markers' numbers, and the gaps zkv counted."""
    kv = zkv.connect(endpoint, hwm=hwm, timeout=120)
    sub = kv.subscribe(*STRESS_CHANNELS)
    ready.put(name)
    if drain is not None:
        drain.wait(120)
    received: dict[str, list[tuple[int, int]]] = {c: [] for c in STRESS_CHANNELS}
    counts = dict.fromkeys(STRESS_CHANNELS, 0)  # messages received, end markers included
    last = dict.fromkeys(STRESS_CHANNELS, 0)  # highest sequence number seen
    ends: dict[str, tuple[int, int]] = {}  # channel -> (marker number, its sequence number)
    while len(ends) < len(STRESS_CHANNELS):
        message = sub.receive_message(timeout=120)
        channel = message.channel
        counts[channel] += 1
        last[channel] = message.seq
        if message.data[0] == "end":
            ends.setdefault(channel, (message.data[1], message.seq))
        elif channel not in ends:
            received[channel].append(message.data[:2])
    reports.put({"name": name, "received": received, "ends": ends, "counts": counts,
                 "last": last, "dropped": sub.dropped})
    sub.close()
    kv.close()
