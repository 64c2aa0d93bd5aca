"""A process that exits, is killed, or closes its store drops its subscriptions.

The owner keeps no work for it: its subscriptions, topics and session disappear from
``store.stats()`` (waited for with a deadline), and so do those of a closed Subscriber or
removed callback in a live process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
from typing import Any

import pytest

import zkv
from zkv.testing import wait_for


def _subscribing_child(how: str, go: Any, done: Any) -> None:
    """Subscribe in every way, say ready, and when told to, leave as ``how`` says."""
    kv = zkv.store()
    subs = [kv.subscribe("news"), kv.subscribe(prefix="sport."), kv.watch(prefix="config.")]
    kv.on_subscriber_receive("events")(print)
    kv.on_change("flag")(print)
    kv.set("child.ready", True)
    assert go.wait(60)  # "kill": killed before this
    if how == "close":
        kv.close()  # the process stays alive, holding nothing
        assert done.wait(60)
    # "exit": leave normally, without closing anything by hand
    assert len(subs) == 3


def _counts(kv: zkv.Store) -> tuple[int, int, int]:
    stats = kv.stats()
    return stats["subscriptions"], stats["topics"], stats["sessions"]


class TestLeavingProcessesDropSubscriptions:
    """Subscriptions and sessions of a process that leaves are forgotten by the owner."""

    @pytest.mark.parametrize(("method", "how"), [
        ("fork", "exit"), ("fork", "close"), ("fork", "kill"), ("spawn", "exit"),
        ("spawn", "close")])
    def test_child_leaves(self, kv: zkv.Store, how: str, method: str) -> None:
        ctx = mp.get_context(method)
        before = _counts(kv)
        go, done = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_subscribing_child, args=(how, go, done))
        proc.start()
        wait_for(lambda: kv.get("child.ready"), 30, what="child subscribed")
        subscriptions, topics, sessions = _counts(kv)
        assert subscriptions >= before[0] + 5 and topics >= before[1] + 5
        assert sessions == before[2] + 1
        if how == "kill":
            os.kill(proc.pid, signal.SIGKILL)  # (its events must not be set any more)
        else:
            go.set()
        # Sessions of killed processes are swept every few seconds: a generous deadline.
        wait_for(lambda: _counts(kv) == before, 30, what=f"owner forgot the child ({how})")
        kv.set("x", 1)  # change events for nobody: nothing queued, nothing breaks
        kv.publish("news", "to nobody")
        assert _counts(kv) == before
        if how != "kill":
            done.set()
        proc.join(30)
        assert proc.exitcode == (-signal.SIGKILL if how == "kill" else 0)


class TestClosingInTheOwner:
    """In the owner too, closing a Subscriber or removing callbacks releases their topics."""

    def test_close_and_remove_return_to_baseline(self, kv: zkv.Store) -> None:
        before = _counts(kv)
        sub = kv.subscribe("a", "b", prefix="c")
        watch = kv.watch("k")
        kv.on_subscriber_receive("d")(print)
        assert _counts(kv)[1] >= before[1] + 5
        sub.close()
        watch.close()
        kv.remove_callback(print)
        wait_for(lambda: _counts(kv) == before, 10, what="owner forgot them")


def _blocked_callback_child() -> None:
    kv = zkv.store()
    kv.on_subscriber_receive("block")(lambda data: threading.Event().wait())
    with kv.subscribe("go") as go:
        kv.set("child.ready", True)
        go.receive(timeout=30)
    # The callback now blocks for ever; leaving must not wait for it.


def _dropped_subscriber_child() -> None:
    unraisable: list[str] = []
    sys.unraisablehook = lambda info: unraisable.append(repr(info.exc_value))
    kv = zkv.store()
    kv.subscribe("dropped")  # never closed: garbage at once (warnings are errors here)
    kv.set("unraisable", unraisable)


class TestLeavingDoesNotHang:
    """A process leaves promptly even with a callback that never returns, or a Subscriber it
    dropped without closing (which warns), and the owner forgets its subscriptions."""

    def test_exit_with_a_blocked_callback(self, kv: zkv.Store) -> None:
        before = _counts(kv)
        proc = mp.get_context("fork").Process(target=_blocked_callback_child)
        proc.start()
        wait_for(lambda: kv.get("child.ready"), 30, what="child registered")
        kv.publish("block", 1)
        kv.publish("go", True)
        proc.join(30)  # the dispatcher gives a running callback CLOSE_WAIT (2 s)
        assert proc.exitcode == 0
        wait_for(lambda: _counts(kv) == before, 30, what="owner forgot the child")

    def test_exit_after_dropping_a_subscriber(self, kv: zkv.Store) -> None:
        before = _counts(kv)
        proc = mp.get_context("fork").Process(target=_dropped_subscriber_child)
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        assert any("ResourceWarning" in text and "zkv.Subscriber" in text
                   for text in kv["unraisable"])
        wait_for(lambda: _counts(kv) == before, 30, what="owner forgot the child")
