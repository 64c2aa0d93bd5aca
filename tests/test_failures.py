"""When the owner dies, stops answering, or is sent something it cannot keep, callers get a
clear error quickly (never a hang), and the owner keeps serving everyone else."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
from store_helpers import call_in_child, owner_process

import zkv
from zkv.testing import wait_for

#: An owner that is gone must be reported well before this (the request timeout in these tests).
LONG_TIMEOUT = 60.0
#: ... within this many seconds: a fraction of a second is expected, and this is generous for
#: a loaded 2-core machine while staying far under LONG_TIMEOUT.
QUICK = 20.0


class TestOwnerKilled:
    """The owner killed with SIGKILL: the next call, and a call already waiting, raise a
    ConnectionError-family error within seconds, not at the end of the request timeout."""

    def test_next_call_fails_fast(self) -> None:
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=LONG_TIMEOUT)
            try:
                assert client.get("owner-pid") == owner.pid
                owner.kill()
                owner.proc.join(10)
                started = time.monotonic()
                with pytest.raises(zkv.ZkvConnectionError) as info:
                    client.get("owner-pid")
                elapsed = time.monotonic() - started
                assert isinstance(info.value, ConnectionError)
                assert elapsed < QUICK, f"took {elapsed:.1f}s to notice the owner died"
                # and it stays failed, fast, for every later call
                with pytest.raises(zkv.OwnerGoneError):
                    client.set("k", 1)
            finally:
                client.close()

    def test_unreaped_owner_counts_as_dead(self) -> None:
        """A killed owner that its parent has not reaped yet (a zombie) is dead too."""
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=LONG_TIMEOUT)
            try:
                client.set("k", 1)
                owner.kill()
                started = time.monotonic()
                with pytest.raises(zkv.ZkvConnectionError):
                    while True:  # the kill lands asynchronously; calls may succeed before it
                        client.get("k")
                        assert time.monotonic() - started < QUICK
                assert time.monotonic() - started < QUICK
            finally:
                client.close()

    def test_pending_call_fails_fast(self) -> None:
        """A lock wait (timeout=None: wait until free) is pending when the owner dies."""
        with owner_process(hold_lock="busy") as owner:
            client = zkv.connect(owner.endpoint, timeout=LONG_TIMEOUT)
            outcome: list[Any] = []

            def wait_for_lock() -> None:
                started = time.monotonic()
                try:
                    client.lock("busy").acquire()
                    outcome.append("acquired")
                except Exception as exc:
                    outcome.append(exc)
                outcome.append(time.monotonic() - started)

            try:
                waiter = threading.Thread(target=wait_for_lock)
                waiter.start()
                # the owner holds the lock and the client's wait is queued: 2 lock sessions
                wait_for(lambda: client.stats()["locks"] == 2, what="client waiting")
                killed = time.monotonic()
                owner.kill()
                waiter.join(LONG_TIMEOUT)
                noticed = time.monotonic() - killed
                assert isinstance(outcome[0], zkv.ZkvConnectionError), outcome
                assert noticed < QUICK, f"took {noticed:.1f}s to notice the owner died"
            finally:
                client.close()

    def test_client_exit_after_owner_death_is_prompt(self) -> None:
        """A client whose owner died closes (and its process exits) without waiting."""
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=LONG_TIMEOUT)
            client.set("k", 1)
            owner.kill()
            owner.proc.join(10)
            client.publish("ch", b"x" * 1000)  # queued, never deliverable
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < QUICK


class TestTimeouts:
    """Every request has a timeout: per store, from ZKV_TIMEOUT, or the default."""

    def test_default_timeout(self) -> None:
        assert zkv.Options().timeout == 30.0

    def test_stopped_owner_times_out(self) -> None:
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=0.5)
            try:
                client.set("k", "before")
                owner.stop()
                started = time.monotonic()
                with pytest.raises(zkv.ZkvTimeoutError) as info:
                    client.get("k")
                elapsed = time.monotonic() - started
                assert isinstance(info.value, TimeoutError)
                assert 0.45 <= elapsed < QUICK
                assert "ZKV_TIMEOUT" in str(info.value)
                # set times out too, and the store is still usable once the owner runs again:
                with pytest.raises(zkv.ZkvTimeoutError):
                    client.set("k", "lost?")
                owner.resume()
                # the late replies of the timed-out requests are not taken for new ones
                wait_for(lambda: _answers(client), what="owner back")
                client.set("k2", "after")
                assert client.get("k2") == "after"
                assert client.get("missing", "default") == "default"
            finally:
                owner.resume()
                client.close()

    def test_env_var_sets_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ZKV_TIMEOUT", "0.6")
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint)
            assert client.options.timeout == 0.6
            explicit = zkv.connect(owner.endpoint, timeout=7)
            assert explicit.options.timeout == 7  # a keyword argument wins over the variable
            explicit.close()
            try:
                owner.stop()
                started = time.monotonic()
                with pytest.raises(zkv.ZkvTimeoutError):
                    client.get("k")
                assert 0.55 <= time.monotonic() - started < QUICK
            finally:
                owner.resume()
                client.close()

    def test_lock_wait_times_out(self, kv: zkv.Store) -> None:
        with kv.lock("held"):
            client = zkv.connect(kv.endpoint)
            try:
                started = time.monotonic()
                assert client.lock("held").acquire(timeout=0.3) is False
                with pytest.raises(zkv.ZkvTimeoutError):
                    with client.lock("held", timeout=0.3):
                        pass
                assert time.monotonic() - started < QUICK
            finally:
                client.close()


class _Call:
    """A store call in a thread of its own: its outcome, and how long it took."""

    def __init__(self, call: Any) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.took = 0.0
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.value = self._call()
        except BaseException as exc:
            self.error = exc
        self.took = time.monotonic() - started
        self.done.set()


#: Set while the owner runs :func:`_keep_the_owner_busy` (the owner is this process).
_BUSY = threading.Event()
_FREE = threading.Event()


def _keep_the_owner_busy(old: Any) -> Any:
    """A modify function: runs in the owner's poller thread, which serves nothing meanwhile."""
    _BUSY.set()
    _FREE.wait(90)
    return old


class TestBusyOwner:
    """While the owner is alive but busy in user code, a process that connects gets
    NoOwnerError once its hello has waited min(timeout, 10 s), and subscribe() gives up with
    ZkvTimeoutError after the timeout; once the owner is free, both work."""

    @pytest.mark.timeout(120)
    def test_connect_and_subscribe_give_up(self, kv: zkv.Store) -> None:
        _BUSY.clear()
        _FREE.clear()
        subscriber = zkv.connect(kv.endpoint, timeout=2)  # connected while the owner is free
        busy = zkv.connect(kv.endpoint, timeout=120)
        holder = _Call(lambda: busy.modify("k", _keep_the_owner_busy, 0))
        try:
            assert _BUSY.wait(30)
            short = _Call(lambda: zkv.connect(kv.endpoint, timeout=1))
            long = _Call(lambda: zkv.connect(kv.endpoint, timeout=120))  # 10 s, not 120
            sub = _Call(lambda: subscriber.subscribe("news"))  # after 2 s
            for call in (short, long, sub):
                assert call.done.wait(90)
        finally:
            _FREE.set()
        try:
            assert holder.done.wait(30) and holder.error is None
            assert isinstance(short.error, zkv.NoOwnerError), short.error
            assert 0.9 <= short.took < 8, short.took  # ~1 s: its own timeout, under 10 s
            assert isinstance(long.error, zkv.NoOwnerError), long.error
            assert 9.9 <= long.took < 60, long.took  # ~10 s: the cap, far under 120 s
            assert isinstance(sub.error, zkv.ZkvTimeoutError), sub.error
            assert 1.9 <= sub.took < 60, sub.took  # ~2 s
            # Free again: connecting and subscribing work.
            with zkv.connect(kv.endpoint) as late, late.subscribe("news") as s:
                late.publish("news", "served")
                assert s.receive(timeout=30) == "served"
        finally:
            subscriber.close()
            busy.close()


class TestInfiniteTimeout:
    """``timeout=float("inf")`` waits as long as the owner lives, and no longer."""

    def test_waits_while_the_owner_lives_and_fails_when_it_dies(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ZKV_TIMEOUT", "0.5")  # what a call would wait, were inf lost
        with owner_process() as owner:
            client = zkv.connect(owner.endpoint, timeout=float("inf"))
            try:
                assert client.options.timeout == float("inf")
                # Every kind of call works with it.
                client.set("k", "v")
                assert client.get("k") == "v" and client.incr("n") == 1
                with client.lock("l"):
                    pass
                with client.subscribe("news") as sub:
                    client.publish("news", 1)
                    assert sub.receive(timeout=30) == 1
                client.enable_cache("c.")
                assert client.get("c.x") is None and client.get("c.x") is None
                # The owner stopped (alive): a call waits, far longer than ZKV_TIMEOUT...
                owner.stop()
                waiting = _Call(lambda: client.get("k"))
                assert not waiting.done.wait(4 * 0.5), waiting.error
                owner.resume()
                assert waiting.done.wait(QUICK)
                assert (waiting.value, waiting.error) == ("v", None)
                # ...and ends as soon as the owner dies.
                owner.stop()
                waiting = _Call(lambda: client.get("k"))
                assert not waiting.done.wait(0.5), waiting.error
                owner.kill()
                assert waiting.done.wait(QUICK), "still waiting for a dead owner"
                assert isinstance(waiting.error, zkv.OwnerGoneError), waiting.error
            finally:
                client.close()

    def test_callbacks(self, kv: zkv.Store) -> None:
        with zkv.connect(kv.endpoint, timeout=float("inf")) as client:
            _callbacks_run(client)
        with zkv.serve(timeout=float("inf")) as owner:
            _callbacks_run(owner)


def _callbacks_run(store: zkv.Store) -> None:
    got: list[Any] = []
    store.on_subscriber_receive("news")(got.append)
    store.on_change("k")(lambda change: got.append(change.value))
    store.publish("news", 1)
    store.set("k", 2)
    wait_for(lambda: sorted(got) == [1, 2], timeout=30, what="the callbacks")


def _answers(client: zkv.Store) -> bool:
    try:
        return bool(client.get("probe", "ok") == "ok")
    except zkv.ZkvTimeoutError:  # still catching up with the requests that timed out
        return False


# -- bad values -------------------------------------------------------------------------------

def _set_unpicklable() -> str:
    kv = zkv.store()
    try:
        kv.set("bad", threading.Lock())
    except zkv.EncodeError as exc:
        assert isinstance(exc, zkv.ZkvError)
        return str(exc)
    raise AssertionError("no EncodeError")


def _get_owner_only() -> tuple[str, str, float, Any]:
    kv = zkv.store()
    started = time.monotonic()
    try:
        kv.get("owner-only")
    except zkv.EncodeError as exc:
        message, kind = str(exc), type(exc).__name__
    else:
        raise AssertionError("no error")
    elapsed = time.monotonic() - started
    return message, kind, elapsed, kv.get("fine")


class TestBadValues:
    """Values that cannot travel: a clear error naming the type, and nothing changes."""

    def test_unpicklable_set_in_child(self, kv: zkv.Store) -> None:
        kv.set("bad", "unchanged")
        message = call_in_child(mp.get_context("fork"), _set_unpicklable)
        assert "lock" in message, message  # names the type (_thread.lock)
        assert kv.get("bad") == "unchanged"
        assert kv.stats()["version"] == 1  # nothing was applied

    def test_unpicklable_set_in_client_names_type(self, kv: zkv.Store) -> None:
        client = zkv.connect(kv.endpoint)
        try:
            with pytest.raises(zkv.EncodeError, match=r"_thread\.lock"):
                client.set("bad", {"nested": [threading.Lock()]})
            assert "bad" not in kv
            with pytest.raises(zkv.EncodeError, match="generator"):
                client.set_many({"a": 1, "bad": (i for i in range(3))})
            assert "a" not in kv  # a batch that cannot be sent changes nothing
        finally:
            client.close()

    def test_owner_value_that_cannot_travel(self, kv: zkv.Store) -> None:
        """The owner may keep an unpicklable value for itself; a child reading it gets a clear
        error at once, and the owner goes on serving that child and the others."""
        lock = threading.Lock()
        kv.set("owner-only", lock)
        kv.set("fine", 42)
        assert kv.get("owner-only") is lock  # kept by reference, for the owner's own use
        message, kind, elapsed, fine = call_in_child(mp.get_context("fork"), _get_owner_only)
        assert kind == "EncodeError" and "lock" in message, message
        assert elapsed < QUICK
        assert fine == 42  # same child, next request: still served
        client = zkv.connect(kv.endpoint)
        try:
            assert client.get("fine") == 42
            with pytest.raises(zkv.EncodeError, match="owner-only"):
                client.get_all()
            with pytest.raises(zkv.EncodeError):
                client.pop("owner-only")
            assert kv.get("owner-only") is lock  # pop failed before removing it
            client.set("after", 1)
            assert kv["after"] == 1
        finally:
            client.close()

    def test_client_functions_that_make_unpicklable_values(self, kv: zkv.Store) -> None:
        """modify/transact run a client's function in the owner; if what it makes cannot
        travel back to that client, the client gets EncodeError and nothing changes."""
        kv.set_many({"k": 1, "other": "kept"})
        version = kv.stats()["version"]
        client = zkv.connect(kv.endpoint)
        try:
            with pytest.raises(zkv.EncodeError, match=r"_thread\.lock"):
                client.modify("k", lambda old: threading.Lock())
            with pytest.raises(zkv.EncodeError, match=r"_thread\.lock"):
                client.transact(lambda m: m.update(k=2, new=threading.Lock()))
            with pytest.raises(zkv.EncodeError, match="generator"):
                client.transact(lambda m: (m.update(k=3), (i for i in "ab"))[1])
            with pytest.raises(zkv.EncodeError, match="TransactionView"):
                client.transact(lambda m: m.setdefault("k2", 0) or m)
            assert kv.get_all() == {"k": 1, "other": "kept"}
            assert kv.stats()["version"] == version  # no change was applied
        finally:
            client.close()

    def test_value_that_cannot_be_unpickled_where_read(self, kv: zkv.Store) -> None:
        client = zkv.connect(kv.endpoint)
        try:
            client.set("odd", _Unloadable())
            with pytest.raises(zkv.DecodeError, match="refuses to load"):
                kv.get("odd")
            with pytest.raises(zkv.DecodeError, match="refuses to load"):
                client.get("odd")
            assert client.get("other", 5) == 5
        finally:
            client.close()


def _refuse() -> None:
    raise RuntimeError("refuses to load")


class _Unloadable:
    """Pickles fine, but raises when unpickled."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse, ()
