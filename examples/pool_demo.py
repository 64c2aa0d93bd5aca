"""A multiprocessing pool whose workers share one zkv store.

Run it with ``make demo`` (or ``python examples/pool_demo.py``). The main process owns the
store; the pool workers find it through ZKV_ENDPOINT, which ``zkv.store()`` exported, and need
no set-up of their own. Workers count what they do, publish results and report progress; the
main process watches the progress live while they work.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import zkv

TASKS = 40


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    factor = 2
    while factor * factor <= n:
        if n % factor == 0:
            return False
        factor += 1
    return True


def work(task: int) -> int:
    """Runs in a pool worker: no store set-up needed, zkv.store() finds the owner."""
    kv = zkv.store()
    lo = task * 20_000
    found = sum(1 for n in range(lo, lo + 20_000) if is_prime(n))
    kv.set(f"result:{task}", found)                      # results, readable by everyone
    kv.incr("primes", found)                             # an atomic counter
    me = os.getpid()  # the closure carries it: modify() runs the function in the owner
    kv.modify("workers", lambda seen: seen | {me}, default=frozenset())
    done = kv.incr("done")                               # progress
    kv.publish("progress", (done, os.getpid()))
    return found


def main() -> None:
    kv = zkv.store()  # this process becomes the owner
    print(f"owner pid {os.getpid()}, endpoint {kv.endpoint}")
    kv.set("done", 0)
    progress = kv.subscribe("progress")  # live now: no message can be missed

    with mp.get_context("spawn").Pool(4) as pool:
        pending = pool.map_async(work, range(TASKS))
        best = 0
        for data in progress:  # watch the workers from the main process
            done, pid = data
            best = max(best, done)  # messages arrive in publish order, not counter order
            bar = "#" * (30 * max(best, done) // TASKS)
            print(f"\r[{bar:<30}] {best}/{TASKS} tasks (last by pid {pid})", end="", flush=True)
            if best == TASKS:
                break
        total = sum(pending.get(timeout=60))
    print()
    print(f"primes below {TASKS * 20_000}: {kv['primes']} (workers say {total})")
    print(f"workers that took part: {sorted(kv['workers'])}")
    print(f"results stored: {len([k for k in kv if k.startswith('result:')])} keys")
    assert kv["primes"] == total and kv["done"] == TASKS
    progress.close()
    kv.close()


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f}s")
