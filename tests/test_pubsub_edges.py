"""Edges of pub/sub: names that look like zkv's topic encoding, and closing from a callback.

Exact and prefix matching are exact for every string: a channel or key name may contain NUL
(which ends an exact topic on the wire) or the escape byte, and ``"a\\0"`` as a prefix still
only matches names that start with ``"a\\0"``, never ``"a"`` itself. A callback may close the
store: ``close()`` returns promptly, the process exits cleanly, and when it is the owner
that closes, its clients get ``OwnerGoneError`` at once.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any

import pytest

import zkv
from zkv.testing import wait_for

#: Behaviour of the store: runs on every backend (see conftest.py).
pytestmark = pytest.mark.contract

#: Names around the topic encoding: NUL ends an exact topic, \x01 is the escape byte.
NAMES = ["a", "a\0", "a\0b", "\0", "", "a\x01", "\x01", "\x01\x01", "\x01\x02", "\0\x01",
         "ab"]
END = "\x7fend"  # published last; every subscription also takes it


def _expected(subscription: tuple[str, str]) -> list[str]:
    how, name = subscription
    if how == "exact":
        return [n for n in NAMES if n == name]
    return [n for n in NAMES if n.startswith(name)]


SUBSCRIPTIONS = [(how, name) for name in NAMES for how in ("exact", "prefix")]


def _subscribe(kv: zkv.Store, how: str, name: str, keys: bool) -> zkv.Subscriber:
    if keys:  # (END: the only key that starts with it is END)
        if how == "exact":
            return kv.watch(name, prefix=END)
        return kv.watch(prefix=[name, END])
    if how == "exact":
        return kv.subscribe(name, END)
    return kv.subscribe(END, prefix=name)


def _collect(sub: zkv.Subscriber, keys: bool) -> list[str]:
    """Names received until the END marker (in order, duplicates kept)."""
    got = []
    while True:
        data = sub.receive(timeout=30)
        name = data.key if keys else data
        if name == END:
            return got
        got.append(name)


def _subscribing_child(keys: bool, ready: Any) -> None:
    """Child: make every subscription, say ready, report what each received (after END: a
    watch of every key must not see it)."""
    kv = zkv.store()
    subs = [_subscribe(kv, how, name, keys) for how, name in SUBSCRIPTIONS]
    ready.set()
    results = []
    for sub in subs:
        results.append(_collect(sub, keys))
        sub.close()
    kv.set("child.results", results)
    kv.close()


def _publishing_child(keys: bool) -> None:
    """Child: publish on (or set) every name once, then END."""
    kv = zkv.store()
    for name in NAMES:
        if keys:
            kv.set(name, name)
        else:
            kv.publish(name, name)
    if keys:
        kv.set(END, END)
    else:
        kv.publish(END, END)
    kv.close()


class TestNamesWithNul:
    """Exact and prefix subscriptions and watches match exactly, whatever bytes the names
    hold (NUL, the escape byte), in the owner and in a child, published from another child."""

    @pytest.mark.parametrize("keys", [False, True], ids=["channels", "keys"])
    def test_matching_is_exact_for_every_name(self, kv: zkv.Store, keys: bool) -> None:
        spawn = mp.get_context("spawn")
        ready = spawn.Event()
        child = spawn.Process(target=_subscribing_child, args=(keys, ready))
        child.start()
        mine = [_subscribe(kv, how, name, keys) for how, name in SUBSCRIPTIONS]
        wait_for(lambda: ready.is_set() or not child.is_alive(), 60, what="the child subscribed")
        publisher = spawn.Process(target=_publishing_child, args=(keys,))
        publisher.start()
        publisher.join(60)
        assert publisher.exitcode == 0
        results = []
        for sub in mine:
            results.append(_collect(sub, keys))
            sub.close()
        child.join(60)
        assert child.exitcode == 0
        expected = [_expected(s) for s in SUBSCRIPTIONS]
        for where, got in (("owner", results), ("child", kv["child.results"])):
            wrong = {f"{how} {name!r}": (g, e)
                     for (how, name), g, e in zip(SUBSCRIPTIONS, got, expected, strict=True)
                     if g != e}
            assert not wrong, f"{where}: subscription: (received, expected): {wrong}"

    def test_callbacks_match_exactly(self, kv: zkv.Store) -> None:
        got: dict[tuple[str, str], list[str]] = {s: [] for s in SUBSCRIPTIONS}
        ends: list[str] = []

        def recorder(subscription: tuple[str, str]) -> Callable[[Any], None]:
            return lambda data: data == END or got[subscription].append(data)

        for how, name in SUBSCRIPTIONS:
            kv.on_subscriber_receive(name, prefix=how == "prefix")(recorder((how, name)))
        kv.on_subscriber_receive(END)(ends.append)
        publisher = mp.get_context("spawn").Process(target=_publishing_child, args=(False,))
        publisher.start()
        publisher.join(60)
        assert publisher.exitcode == 0
        wait_for(lambda: ends, 30, what="the END message")
        wrong = {f"{how} {name!r}": (got[(how, name)], _expected((how, name)))
                 for how, name in SUBSCRIPTIONS if got[(how, name)] != _expected((how, name))}
        assert not wrong, f"subscription: (received, expected): {wrong}"

    def test_a_message_carries_its_exact_channel_name(self, kv: zkv.Store) -> None:
        with kv.subscribe(prefix="") as sub:
            for name in NAMES:
                kv.publish(name, 1)
            assert [sub.receive_message(timeout=10).channel for _ in NAMES] == NAMES


def _closing_callback(kv: zkv.Store, coroutine: bool, then: Callable[[], None]
                      ) -> Callable[[Any], Any]:
    """A callback (plain or coroutine function) that closes ``kv``, then calls ``then``."""
    if coroutine:
        async def close_async(data: Any) -> None:
            kv.close()
            then()
        return close_async

    def close(data: Any) -> None:
        kv.close()
        then()
    return close


def _client_closing_in_callback(coroutine: bool, ready: Any, returned: Any) -> None:
    """Child (a client): a callback closes the store; exit 0 once that close returned."""
    kv = zkv.store()
    kv.on_subscriber_receive("close")(_closing_callback(kv, coroutine, returned.set))
    ready.set()
    if not returned.wait(10):
        raise SystemExit(3)


def _owner_closing_in_callback(coroutine: bool, conn: Any) -> None:
    """Child (an owner): a callback closes the store; report which zkv owner threads are
    still alive when that close returned."""
    kv = zkv.serve()
    left: list[list[str]] = []
    done = threading.Event()

    def after() -> None:
        left.append([t.name for t in threading.enumerate() if t.name == "zkv-owner"])
        done.set()

    kv.on_subscriber_receive("close")(_closing_callback(kv, coroutine, after))
    conn.send(kv.endpoint)
    if not done.wait(10):
        conn.send("close() called in a callback did not return within 10 s")
        raise SystemExit(3)
    conn.send(left[0])


@pytest.mark.parametrize("coroutine", [False, True], ids=["function", "coroutine"])
class TestCloseFromACallback:
    """A callback that closes its store: close() returns, the process exits cleanly, and an
    owner that closes stops serving at once (its clients get OwnerGoneError)."""

    def test_in_a_client(self, kv: zkv.Store, coroutine: bool) -> None:
        spawn = mp.get_context("spawn")
        ready, returned = spawn.Event(), spawn.Event()
        child = spawn.Process(target=_client_closing_in_callback,
                              args=(coroutine, ready, returned))
        child.start()
        wait_for(lambda: ready.is_set() or not child.is_alive(), 60, what="callback registered")
        kv.publish("close", 1)
        assert returned.wait(10), "close() called in a callback did not return within 10 s"
        child.join(30)
        assert child.exitcode == 0

    def test_in_the_owner(self, coroutine: bool) -> None:
        spawn = mp.get_context("spawn")
        mine, theirs = spawn.Pipe()
        owner = spawn.Process(target=_owner_closing_in_callback, args=(coroutine, theirs))
        owner.start()
        try:
            assert mine.poll(60), "the owner did not start"
            client = zkv.connect(mine.recv())
            with client.subscribe("other") as sub:
                client.publish("close", 1)
                with pytest.raises(zkv.OwnerGoneError):
                    sub.receive(timeout=10)
            client.close()
            assert mine.poll(10)
            assert mine.recv() == [], "the owner's poller thread outlived close()"
            owner.join(30)
            assert owner.exitcode == 0
        finally:
            if owner.is_alive():
                owner.kill()
                owner.join(10)
