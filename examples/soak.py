"""Soak test: mixed load on one owner for a long time; its memory, file descriptors and
threads must stay flat.

    python examples/soak.py --minutes 10      # make soak
    python examples/soak.py --seconds 5       # a quick smoke run

The owner runs in a process of its own that does nothing but serve, so that what is measured is
the owner. Client processes come and go all the time (each lives a few seconds; some are killed
with SIGKILL, some while holding a lock), and run a random mix of set, get, incr, modify,
pipelines, publish, subscribe, watch and lock on a bounded key space. One long-lived subscriber
follows the whole run.

The owner's resident memory (RSS), open file descriptors and thread count are printed at the
start, every ``--interval`` seconds, and at the end, with its counters (sessions, topics, locks).
The verdict compares:

- RSS at the end of the warm-up (the data set is full by then) with RSS at the end: it may grow
  by at most ``--rss-tolerance-mb``;
- file descriptors and threads before any client came with those after every client left;
- sessions, topics and locks after every client left: all zero.

Exit status: 0 when everything stayed flat, 1 when something grew, 2 when a client failed.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import zkv

KEYS = 1000  # the key space is bounded: the data set stops growing after the warm-up
CLIENTS = 4  # short-lived clients alive at any time
LOCKS = 4
KILL_EVERY = 3.0  # seconds between SIGKILLs of a random client (on average)

ctx = mp.get_context("spawn")


# -- the processes ---------------------------------------------------------------------------------

def owner_main(conn: Any) -> None:
    """Serve a store until told to stop; answer stats questions over ``conn``."""
    kv = zkv.serve()
    conn.send((kv.endpoint, os.getpid()))
    while True:
        try:
            what = conn.recv()
        except EOFError:
            break
        if what != "stats":
            break
        conn.send(kv.stats())
    kv.close()


def _bounded_append(item: int, items: list[int]) -> list[int]:
    items.append(item)
    return items[-100:]


def client_main(endpoint: str, seed: int, lifetime: float, stop: Any) -> None:
    """A random mix of operations for ``lifetime`` seconds (or until ``stop``)."""
    kv = zkv.connect(endpoint, timeout=60)
    rng = random.Random(seed)
    end = time.monotonic() + lifetime
    ops = 0
    if rng.random() < 0.3:  # some clients also run callbacks on their dispatcher thread
        kv.on_subscriber_receive("events")(lambda data: None)
    while time.monotonic() < end and not stop.is_set():
        r = rng.random()
        key = f"k{rng.randrange(KEYS)}"
        if r < 0.25:
            kv.set(key, rng.randbytes(rng.randrange(4096)))
        elif r < 0.50:
            kv.get(key)
        elif r < 0.58:
            kv.incr("counter")
        elif r < 0.66:
            kv.modify("recent", functools.partial(_bounded_append, ops), [])
        elif r < 0.76:
            kv.publish("events", (seed, ops, rng.randbytes(rng.randrange(512))))
        elif r < 0.82:
            try:
                with kv.lock(f"lock{rng.randrange(LOCKS)}", timeout=10):
                    kv.incr("locked")
            except zkv.ZkvTimeoutError:
                pass  # a killed holder is noticed within a fraction of a second, but still
        elif r < 0.90:
            with kv.pipeline() as p:
                for _ in range(10):
                    p.get(f"k{rng.randrange(KEYS)}")
                p.set(key, ops)
        elif r < 0.94:
            with kv.subscribe("events", prefix="ev") as sub:
                kv.publish("events", ops)
                sub.receive(timeout=10)
        elif r < 0.97:
            with kv.watch(prefix="w:") as watch:
                kv.set(f"w:{rng.randrange(10)}", ops)
                watch.receive(timeout=10)
        else:
            kv.get_many(f"k{rng.randrange(KEYS)}" for _ in range(20))
        ops += 1
    kv.incr("ops", ops)
    kv.close()


def listener_main(endpoint: str, stop: Any, report: Any) -> None:
    """Follow the "events" channel for the whole run; report what was received and lost."""
    kv = zkv.connect(endpoint, timeout=60)
    received = 0
    with kv.subscribe("events") as sub:
        while not stop.is_set():
            try:
                sub.receive(timeout=0.5)
                received += 1
            except zkv.ZkvTimeoutError:
                pass
        report.put((received, sub.dropped))
    kv.close()


# -- measuring -------------------------------------------------------------------------------------

@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    threads: int
    stats: dict[str, int]


def sample(pid: int, conn: Any, t0: float) -> Sample:
    rss = threads = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    conn.send("stats")
    stats = conn.recv() if conn.poll(60) else {}
    return Sample(time.monotonic() - t0, rss, fds, threads, stats)


def show(label: str, s: Sample, ops: int | None = None) -> None:
    st = s.stats
    rate = "" if ops is None or s.t <= 0 else f"  {ops / s.t:8.0f}"
    print(f"{label:>9} {s.t:7.1f} {s.rss_kb / 1024:8.1f} {s.fds:5d} {s.threads:7d} "
          f"{st.get('sessions', -1):8d} {st.get('topics', -1):6d} {st.get('locks', -1):5d} "
          f"{st.get('keys', -1):5d}{rate}", flush=True)


# -- the run ---------------------------------------------------------------------------------------

def run(duration: float, interval: float, rss_tolerance_mb: float, seed: int) -> int:
    rng = random.Random(seed)
    conn, child = ctx.Pipe()
    owner = ctx.Process(target=owner_main, args=(child,), name="zkv-owner")
    owner.start()
    child.close()
    endpoint, pid = conn.recv()
    stop = ctx.Event()
    t0 = time.monotonic()
    idle_start = sample(pid, conn, t0)
    print(f"soak: owner pid {pid}, {endpoint}, {duration:.0f}s of load", flush=True)
    print("     when    t(s)  rss(MB)   fds threads sessions topics locks  keys  ops/s",
          flush=True)
    show("idle", idle_start)

    reports = ctx.Queue()
    listener = ctx.Process(target=listener_main, args=(endpoint, stop, reports))
    listener.start()
    clients: list[mp.process.BaseProcess] = []
    killed: set[int] = set()
    failures = started = 0
    warmup = min(60.0, duration / 5)
    baseline: Sample | None = None
    samples: list[Sample] = []
    next_sample = t0 + interval
    next_kill = t0 + rng.expovariate(1 / KILL_EVERY)
    end = t0 + duration
    store = zkv.connect(endpoint, timeout=60)
    while time.monotonic() < end:
        for proc in [p for p in clients if not p.is_alive()]:
            proc.join()
            if proc.exitcode != 0 and proc.pid not in killed:
                failures += 1
                print(f"soak: client {proc.pid} failed (exit code {proc.exitcode})", flush=True)
            clients.remove(proc)
        while len(clients) < CLIENTS:
            started += 1
            lifetime = rng.uniform(0.5, min(8.0, max(1.0, duration / 4)))
            proc = ctx.Process(target=client_main,
                               args=(endpoint, rng.randrange(1 << 30), lifetime, stop))
            proc.start()
            clients.append(proc)
        now = time.monotonic()
        if now >= next_kill and clients:
            victim = rng.choice(clients)
            killed.add(victim.pid or 0)
            os.kill(victim.pid or 0, signal.SIGKILL)
            next_kill = now + rng.expovariate(1 / KILL_EVERY)
        if baseline is None and now - t0 >= warmup:
            baseline = sample(pid, conn, t0)
            show("baseline", baseline, store.get("ops", 0))
        if now >= next_sample:
            samples.append(sample(pid, conn, t0))
            show("", samples[-1], store.get("ops", 0))
            next_sample = now + interval
        multiprocessing.connection.wait([p.sentinel for p in clients], timeout=0.1)

    stop.set()
    for proc in clients:
        proc.join(30)
        if proc.exitcode != 0:
            failures += 1
            print(f"soak: client {proc.pid} failed (exit code {proc.exitcode})", flush=True)
    received, dropped = reports.get(timeout=60)
    listener.join(30)
    ops = store.get("ops", 0)
    store.close()
    # Killed clients' sessions are noticed by the owner's periodic sweep (every few seconds).
    give_up = time.monotonic() + 30
    final = sample(pid, conn, t0)
    while (final.stats.get("sessions") or final.stats.get("topics")) and \
            time.monotonic() < give_up:
        time.sleep(0.5)  # polling the owner's counters until the sweep has run
        final = sample(pid, conn, t0)
    show("end", final, ops)
    conn.send("stop")
    owner.join(30)

    assert baseline is not None
    growth = (final.rss_kb - baseline.rss_kb) / 1024
    problems = []
    if growth > rss_tolerance_mb:
        problems.append(f"RSS grew {growth:.1f} MB after the warm-up "
                        f"(tolerance {rss_tolerance_mb} MB)")
    if final.fds > idle_start.fds:
        problems.append(f"open file descriptors {idle_start.fds} -> {final.fds}")
    if final.threads != idle_start.threads:
        problems.append(f"threads {idle_start.threads} -> {final.threads}")
    for name in ("sessions", "topics", "locks"):
        if final.stats.get(name) != 0:
            problems.append(f"{name} left at the end: {final.stats.get(name)}")
    peak = max([s.rss_kb for s in samples] + [final.rss_kb]) / 1024
    print(f"soak: {ops} operations by {started} client processes ({len(killed)} killed) in "
          f"{duration:.0f}s; the listener received {received} messages and counted "
          f"{dropped} lost", flush=True)
    print(f"soak: owner RSS {idle_start.rss_kb / 1024:.1f} MB idle, "
          f"{baseline.rss_kb / 1024:.1f} MB after warm-up, {final.rss_kb / 1024:.1f} MB at "
          f"the end (peak {peak:.1f} MB, growth {growth:+.1f} MB); fds {idle_start.fds} -> "
          f"{final.fds}; threads {idle_start.threads} -> {final.threads}", flush=True)
    if failures:
        print(f"soak: FAILED: {failures} client(s) failed", flush=True)
        return 2
    if problems:
        print("soak: NOT FLAT: " + "; ".join(problems), flush=True)
        return 1
    print("soak: FLAT", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default 10)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between reports (default: a tenth of the run, <= 30)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=16.0,
                        help="allowed RSS growth after the warm-up (default 16 MB)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    duration = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    interval = args.interval or min(30.0, max(1.0, duration / 10))
    return run(duration, interval, args.rss_tolerance_mb, args.seed)


if __name__ == "__main__":
    sys.exit(main())
