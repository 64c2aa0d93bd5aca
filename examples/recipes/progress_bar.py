"""A progress bar across a pool: workers publish, the main process draws.

publish() costs a worker no round trip; the main process subscribes before it starts the
work, so it counts every message. On a terminal the bar is redrawn in place.
"""

import multiprocessing as mp
import sys

import zkv

TASKS = 40


def task(n):
    zkv.store().publish("progress", n)  # one-way: the worker does not wait
    return n * n


def bar(done, total, width=30):
    filled = width * done // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


if __name__ == "__main__":
    kv = zkv.store()
    with kv.subscribe("progress") as progress, mp.Pool(3) as pool:
        pending = pool.map_async(task, range(TASKS))
        for done in range(1, TASKS + 1):
            progress.receive(timeout=30)
            if sys.stdout.isatty():
                print("\r" + bar(done, TASKS), end="", flush=True)
        results = pending.get(timeout=30)
    print(("\r" if sys.stdout.isatty() else "") + bar(TASKS, TASKS))
    assert sum(results) == sum(n * n for n in range(TASKS))
