"""Migrating from multiprocessing.Manager().dict(): the same counts, with less code.

With a Manager, the shared dict and its lock must be passed to every worker, and a
read-modify-write needs the lock. With zkv, workers find the store themselves, and the
read-modify-write is one atomic operation in the owner.
"""

import multiprocessing as mp

import zkv

WORDS = "a b a c b a".split()


# Before: a Manager dict and a Manager lock, passed to every task.
def count_with_manager(shared, lock, word):
    with lock:
        shared[word] = shared.get(word, 0) + 1


# After: nothing to pass; incr is atomic.
def count_with_zkv(word):
    zkv.store().incr(f"count:{word}")


if __name__ == "__main__":
    with mp.Manager() as manager, mp.Pool(3) as pool:
        shared, lock = manager.dict(), manager.Lock()
        pool.starmap(count_with_manager, [(shared, lock, w) for w in WORDS])
        before = dict(sorted(shared.items()))

    kv = zkv.store()  # in the main process, before the pool: the owner
    with mp.Pool(3) as pool:
        pool.map(count_with_zkv, WORDS)
    after = {key.removeprefix("count:"): n for key, n in sorted(kv.items())}

    print("Manager:", before)
    print("zkv:    ", after)
    assert before == after
