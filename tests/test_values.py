"""Any value cloudpickle can serialize round-trips between processes: lambdas and closures
(from test modules and from ``__main__``), instances of classes defined in ``__main__``, and a
64 MB bytes value; and values are snapshots, whichever process reads them."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from store_helpers import call_in_child

import zkv

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

BIG = 64 * 1024 * 1024


def _big(seed: int) -> bytes:
    """64 MB that differ with ``seed`` at both ends and in the middle."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    body = bytearray(block * (BIG // len(block)))
    body[BIG // 2] = seed % 256
    return bytes(body)


@dataclasses.dataclass
class Point:
    """A class from a test module (importable by name in every child)."""

    x: int
    y: int

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


def _make_adder(n: int) -> Callable[[int], int]:
    def add(x: int) -> int:
        return x + n
    return add


# -- run in children ---------------------------------------------------------------------------

def _child_sets_callables() -> None:
    kv = zkv.store()
    offset = 100
    kv.set("lambda", lambda x: x * 3)
    kv.set("closure", _make_adder(offset))
    kv.set("point", Point(3, -4))
    kv.set("nested", {"fns": [lambda: "inner"], "p": (Point(1, 1),)})


def _child_calls_callables() -> tuple[int, int, int, str]:
    kv = zkv.store()
    return (kv["lambda"](5), kv["closure"](5), kv["point"].norm1(), kv["nested"]["fns"][0]())


def _child_sets_big(seed: int) -> None:
    zkv.store().set("big", _big(seed))


def _child_checks_big(seed: int) -> tuple[bool, int]:
    got = zkv.store().get("big")
    return got == _big(seed), len(got)


def _child_mutates_copy() -> dict[str, Any]:
    kv = zkv.store()
    got = kv["doc"]
    got["list"].append("child")
    return kv["doc"]


# -- tests -----------------------------------------------------------------------------------------


class TestCallables:
    """Lambdas, closures and instances of test-module classes travel both ways."""

    def test_child_to_owner(self, kv: zkv.Store) -> None:
        call_in_child(mp.get_context("spawn"), _child_sets_callables)
        assert kv["lambda"](5) == 15
        assert kv["closure"](5) == 105
        assert kv["point"] == Point(3, -4)
        assert kv["nested"]["fns"][0]() == "inner"

    def test_owner_to_child(self, kv: zkv.Store, mp_context: mp.context.BaseContext) -> None:
        factor = 3
        kv.set("lambda", lambda x: x * factor)  # a closure over a local of this test
        kv.set("closure", _make_adder(100))
        kv.set("point", Point(3, -4))
        kv.set("nested", {"fns": [lambda: "inner"]})
        assert call_in_child(mp_context, _child_calls_callables) == (15, 105, 7, "inner")

    def test_modify_and_transact_run_closures_in_the_owner(self, kv: zkv.Store) -> None:
        client = zkv.connect(kv.endpoint)
        try:
            bump = 7
            assert client.modify("n", lambda old: old + bump, default=0) == 7
            assert client.transact(lambda m: m.setdefault("p", Point(bump, 0)).norm1()) == 7
            assert kv["p"] == Point(7, 0)
        finally:
            client.close()


MAIN_CLIENT = """
import zkv

class Secret:
    def __init__(self, word):
        self.word = word
    def shout(self):
        return self.word.upper() + "!"

def make_counter(start):
    count = [start]
    def step():
        count[0] += 1
        return count[0]
    return step

if __name__ == "__main__":
    kv = zkv.store()                 # a client: ZKV_ENDPOINT names the test's owner
    assert not kv.is_owner
    suffix = "-main"
    kv["secret"] = Secret("psst")
    kv["lambda"] = lambda s: s + suffix
    kv["counter"] = make_counter(41)
    kv["class"] = Secret
    print("ok")
"""

MAIN_OWNER = """
import multiprocessing as mp
import zkv

def reader(q):
    kv = zkv.store()
    q.put((kv["secret"].shout(), kv["lambda"]("x"), kv["counter"](), kv["cls"]("a").shout()))
    class Reply:                                  # defined only in this child
        def __init__(self, n):
            self.n = n
    kv["reply"] = Reply(5)
    kv["reply_fn"] = lambda: "from child"

if __name__ == "__main__":
    class Secret:                                 # under the guard: a spawn child lacks it
        def __init__(self, word):
            self.word = word
        def shout(self):
            return self.word.upper() + "!"

    def make_counter(start):
        count = [start]
        def step():
            count[0] += 1
            return count[0]
        return step

    kv = zkv.store()                              # the owner
    assert kv.is_owner
    suffix = "-main"
    kv["secret"] = Secret("psst")
    kv["lambda"] = lambda s: s + suffix
    kv["counter"] = make_counter(41)
    kv["cls"] = Secret
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=reader, args=(q,))
    p.start()
    print(q.get(timeout=30))
    p.join(30)
    assert p.exitcode == 0
    print(kv["reply"].n, kv["reply_fn"]())
"""


def _run_script(tmp_path: Path, source: str, env: dict[str, str]) -> str:
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


class TestMainModule:
    """Objects defined in ``__main__`` (which other processes cannot import) round-trip."""

    def test_client_main_to_owner(self, kv: zkv.Store, tmp_path: Path) -> None:
        out = _run_script(tmp_path, MAIN_CLIENT, dict(os.environ))
        assert out.strip() == "ok"
        # This (pytest) process has another __main__: the script's objects came by value.
        assert kv["secret"].shout() == "PSST!"
        assert kv["lambda"]("x") == "x-main"
        counter = kv["counter"]
        assert (counter(), counter()) == (42, 43)
        assert kv["counter"]() == 42  # a snapshot: the stored closure did not advance
        assert kv["class"]("hi").shout() == "HI!"

    def test_owner_main_to_spawn_child_and_back(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ZKV_ENDPOINT"}
        out = _run_script(tmp_path, MAIN_OWNER, env).splitlines()
        assert out == ["('PSST!', 'x-main', 42, 'A!')", "5 from child"]


class TestBigValues:
    """A 64 MB bytes value, child -> owner and owner -> child, arrives equal."""

    @pytest.mark.timeout(90)
    def test_64mb_both_ways(self, kv: zkv.Store) -> None:
        fork = mp.get_context("fork")
        call_in_child(fork, _child_sets_big, 1, timeout=60)
        got = kv["big"]
        assert len(got) == BIG and got == _big(1)
        del got
        kv["big"] = _big(2)
        assert call_in_child(fork, _child_checks_big, 2, timeout=60) == (True, BIG)


class TestSnapshots:
    """Mutating an object read from (or written to) the store does not change the store."""

    def test_owner_side(self, kv: zkv.Store) -> None:
        doc = {"list": [1, 2]}
        kv["doc"] = doc
        doc["list"].append(3)  # after set: the store keeps what was set
        assert kv["doc"] == {"list": [1, 2]}
        got = kv["doc"]
        got["list"].append(4)
        assert kv["doc"] == {"list": [1, 2]}
        big = bytearray(b"a" * 200_000)  # travels as an out-of-band buffer
        kv["buf"] = big
        big[0] = ord("z")
        assert kv["buf"][0] == ord("a")

    def test_child_side(self, kv: zkv.Store) -> None:
        kv["doc"] = {"list": ["owner"]}
        assert call_in_child(mp.get_context("fork"), _child_mutates_copy) == {"list": ["owner"]}
        assert kv["doc"] == {"list": ["owner"]}

    def test_values_of_many_kinds(self, kv: zkv.Store) -> None:
        values: dict[str, Any] = {
            "none": None, "true": True, "int": 2**100, "float": -0.5, "complex": 1 + 2j,
            "str": "héllo ☃", "bytes": b"\x00\xff", "tuple": (1, (2, 3)), "set": {1, 2},
            "frozenset": frozenset("ab"), "list": [[], {}], "dict": {1: "int key"},
            "bytearray": bytearray(b"xy"), "range": range(3), "type": Point,
            "": "empty key", "\udcff surrogate": "odd key",
        }
        client = zkv.connect(kv.endpoint)
        try:
            client.set_many(values)
            assert kv.get_all() == values
            assert client.get_all() == values
        finally:
            client.close()
