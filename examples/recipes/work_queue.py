"""A work queue with transact: each job is taken by exactly one worker.

transact(fn) runs fn in the owner with the whole store to itself, so reading the queue and
removing its head is one atomic step: no two workers can take the same job.
"""

import multiprocessing as mp

import zkv


def take_job(store):  # runs in the owner, atomically
    queue = store.get("queue", [])
    if not queue:
        return None
    store["queue"] = queue[1:]
    return queue[0]


def worker(_):
    kv = zkv.store()
    done = 0
    while (job := kv.transact(take_job)) is not None:
        kv.set(f"result:{job}", job * job)
        done += 1
    return done


if __name__ == "__main__":
    kv = zkv.store()
    kv.set("queue", list(range(30)))
    with mp.Pool(3) as pool:
        per_worker = pool.map(worker, range(3))
    results = kv.get_many(f"result:{n}" for n in range(30))
    assert results == {f"result:{n}": n * n for n in range(30)}
    print(f"{sum(per_worker)} jobs done by {len(per_worker)} workers, each job once")
