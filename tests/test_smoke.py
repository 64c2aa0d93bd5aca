"""The store works across a real child process."""

from __future__ import annotations

import multiprocessing as mp

import zkv


def _child() -> None:
    kv = zkv.store()
    kv.set("from-child", kv.get("from-owner") + 1)


def test_child_reads_and_writes(kv: zkv.Store) -> None:
    kv.set("from-owner", 41)
    proc = mp.get_context("spawn").Process(target=_child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert kv["from-child"] == 42
