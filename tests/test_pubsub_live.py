"""A subscription is live when subscribe() (or the decorator) returns.

ZeroMQ's "slow joiner": a SUB socket that has just connected misses what is published before its
subscription reaches the publisher. zkv closes that window with a welcome handshake, so a
message published right after subscribe() returns -- by the owner, by the subscriber itself,
or by a freshly started child -- is always received. Each test repeats this over many fresh
subscriptions (every Subscriber is a new SUB socket, a new connection) and freshly started
processes, without sleeping.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue
from collections.abc import Callable
from typing import Any

import pytest

import zkv

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

FRESH_EVERY = 10  # every so many rounds, a freshly started child publishes instead of the owner


def _second(r: int) -> str:
    return f"second.{r}"


def _publish_once(channel: str, data: Any) -> None:
    """A freshly started child: publish one message and exit."""
    zkv.store().publish(channel, data)


def _subscribe_rounds(first: int, rounds: int) -> None:
    """Child: for each round, subscribe to a fresh channel (Subscriber or decorator), publish
    to it at once, tell the owner on "ctl", and expect its own message then the owner's."""
    kv = zkv.store()
    results = []
    for r in range(first, first + rounds):
        channel = f"live.{r}"
        if r % 2:
            inbox: queue.Queue[Any] = queue.Queue()
            kv.on_subscriber_receive(channel)(inbox.put)
            got = _take_two(functools.partial(inbox.get, timeout=20), channel, kv, r)
            assert kv.remove_callback(inbox.put) == 1
        else:
            with kv.subscribe(channel) as sub:
                got = _take_two(functools.partial(sub.receive, timeout=20), channel, kv, r)
        results.append(got)
    kv.set(f"results.{first}", results)


def _take_two(take: Callable[[], Any], channel: str, kv: zkv.Store, r: int) -> list[Any]:
    kv.publish(channel, "self")  # right after subscribing, from this process
    kv.publish("ctl", r)  # the owner (or a fresh child) publishes _second(r) when it sees this
    try:
        return [take(), take()]
    except (queue.Empty, zkv.ZkvTimeoutError):
        return ["lost"]


class TestLiveOnReturnInChildren:
    """A child's subscription is live on return, for messages from itself, the owner and a
    freshly started child; first subscriptions of fresh processes included."""

    @pytest.mark.timeout(120)
    def test_many_fresh_subscriptions_and_processes(self, kv: zkv.Store) -> None:
        fork, spawn = mp.get_context("fork"), mp.get_context("spawn")
        # (start method, rounds): long-lived children with many rounds, and fresh processes
        # whose first subscription is the one tested.
        batches = [(fork, 40), (fork, 40), (spawn, 10)] + [(fork, 1)] * 12 + [(spawn, 1)] * 2
        first = 0
        launched = []
        with kv.subscribe("ctl") as ctl:
            for ctx, rounds in batches:
                proc = ctx.Process(target=_subscribe_rounds, args=(first, rounds))
                proc.start()
                for r in range(first, first + rounds):
                    assert ctl.receive(timeout=30) == r
                    if r % FRESH_EVERY == FRESH_EVERY - 1:
                        helper = fork.Process(target=_publish_once,
                                              args=(f"live.{r}", _second(r)))
                        helper.start()
                        launched.append(helper)
                    else:
                        kv.publish(f"live.{r}", _second(r))
                proc.join(30)
                assert proc.exitcode == 0
                results = kv[f"results.{first}"]
                assert results == [["self", _second(r)] for r in range(first, first + rounds)]
                first += rounds
        for helper in launched:
            helper.join(30)
            assert helper.exitcode == 0
        assert first >= 100


class TestLiveOnReturnInOwner:
    """The owner's subscriptions (Subscriber and decorator) are live on return, for its own
    messages and those of a freshly started child."""

    @pytest.mark.timeout(90)
    def test_many_fresh_subscriptions(self, kv: zkv.Store) -> None:
        fork = mp.get_context("fork")
        lost = []
        for r in range(200):
            channel = f"owner.{r}"
            fresh = r % (2 * FRESH_EVERY) == 0
            if r % 2:
                inbox: queue.Queue[Any] = queue.Queue()
                kv.on_subscriber_receive(channel)(inbox.put)
                take: Callable[[], Any] = functools.partial(inbox.get, timeout=20)
                sub = None
            else:
                sub = kv.subscribe(channel)
                take = functools.partial(sub.receive, timeout=20)
            kv.publish(channel, r)
            if fresh:
                helper = fork.Process(target=_publish_once, args=(channel, _second(r)))
                helper.start()
            try:
                got = [take()] + ([take()] if fresh else [])
            except (queue.Empty, zkv.ZkvTimeoutError):
                got = ["lost"]
            if got != ([r, _second(r)] if fresh else [r]):
                lost.append((r, got))
            if fresh:
                helper.join(30)
                assert helper.exitcode == 0
            if sub is not None:
                sub.close()
            else:
                assert kv.remove_callback(inbox.put) == 1
        assert lost == []
