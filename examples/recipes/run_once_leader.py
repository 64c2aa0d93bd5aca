"""Run-once with compare_and_set, and leader election with a lock.

- compare_and_set(key, zkv.MISSING, me) succeeds for exactly one caller: that one runs the
  set-up, the others skip it.
- A lock has one holder at a time and is released when its holder dies: the candidate that
  holds it leads, and when the leader crashes the next waiting candidate takes over.
"""

import multiprocessing as mp
import os

import zkv


def start(worker):
    kv = zkv.store()
    if kv.compare_and_set("setup:by", zkv.MISSING, worker):
        kv.incr("setup:runs")  # the one-time set-up goes here
    return kv["setup:by"]


def candidate(name):
    kv = zkv.store()
    kv.lock("leader").acquire()  # waits while another process leads
    term = kv.incr("term")
    kv.modify("terms", lambda terms: [*terms, (term, name)], default=[])
    os._exit(0)  # the leader crashes: the owner releases its lock


if __name__ == "__main__":
    kv = zkv.store()
    with mp.Pool(4) as pool:
        chosen = set(pool.map(start, range(8)))
    assert len(chosen) == 1  # every worker agrees on who ran it
    print(f"set-up ran {kv['setup:runs']} time(s) for 8 workers")

    candidates = [mp.Process(target=candidate, args=(name,)) for name in "abc"]
    for process in candidates:
        process.start()
    for process in candidates:
        process.join()
    terms = kv["terms"]
    assert sorted(name for _, name in terms) == ["a", "b", "c"]
    assert [term for term, _ in terms] == [1, 2, 3]
    print(f"{len(terms)} leaders, one after the other")
