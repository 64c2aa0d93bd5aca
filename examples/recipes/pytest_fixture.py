"""A pytest fixture with a private store: every test gets a fresh, empty owner.

The code under test calls zkv.store() as usual; inside the fixture that is the test's own
owner, and the processes the code starts find it through ZKV_ENDPOINT. Put the fixture in
your conftest.py. Run this file: python examples/recipes/pytest_fixture.py
"""

import multiprocessing as mp

import pytest

import zkv
from zkv.testing import private_store


@pytest.fixture
def kv():
    with private_store() as store:  # closed, and its sockets removed, after the test
        yield store


def count_words(text):  # code under test: it runs in pool workers
    store = zkv.store()
    for word in text.split():
        store.incr(f"word:{word}")


def test_counts_across_processes(kv):
    with mp.Pool(2) as pool:
        pool.map(count_words, ["a b", "b c", "c c"])
    assert kv.get_many(["word:a", "word:b", "word:c"]) == {
        "word:a": 1, "word:b": 2, "word:c": 3}


def test_every_test_starts_empty(kv):
    assert len(kv) == 0


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
