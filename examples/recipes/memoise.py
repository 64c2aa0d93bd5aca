"""A memoised function shared by a pool: each result is computed once, by one process.

The results live in the store, so every worker (and the main process) reuses what any of
them computed. A lock per argument makes the first caller compute while the others wait
for its result, instead of computing it too.
"""

import functools
import multiprocessing as mp

import zkv


def shared_memo(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        kv = zkv.store()
        key = f"memo:{fn.__qualname__}:{args!r}"
        value = kv.get(key, zkv.MISSING)
        if value is zkv.MISSING:
            with kv.lock(key):  # one process computes; the others wait, then read
                value = kv.get(key, zkv.MISSING)
                if value is zkv.MISSING:
                    value = fn(*args)
                    kv.set(key, value)
                    kv.incr("memo:computed")
        return value
    return wrapper


@shared_memo
def slow_square(n):
    return sum(n for _ in range(n))  # stands for an expensive computation


if __name__ == "__main__":
    kv = zkv.store()
    with mp.Pool(3) as pool:
        results = pool.map(slow_square, [1, 2, 3, 4] * 5)
    assert results == [1, 4, 9, 16] * 5
    print(f"{len(results)} calls, {kv['memo:computed']} computed")
