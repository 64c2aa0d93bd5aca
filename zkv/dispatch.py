"""The process's callback dispatcher: one thread, one SUB socket, callbacks run in order.

Callbacks registered with :meth:`zkv.Store.on_subscriber_receive` or
:meth:`zkv.Store.on_change` run here, off the publisher's thread and off the caller's, one at a
time in the order messages were sequenced by the owner. A callback that raises is logged and
the others still run. Coroutine functions are run on an event loop (zkv's own, started on
first use, or one handed over with ``loop=``), in order per loop.

Registering only records the callback and asks the dispatcher thread to subscribe; the thread is
started by the first registration and stopped by :meth:`Dispatcher.close` (the store's close).
A handler gets messages from the owner's welcome on (the same handshake as
:class:`~zkv.pubsub.Subscriber`, probed again if a welcome is lost), never older ones.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import codec, wire
from .errors import OwnerGoneError, ProtocolError, ZkvTimeoutError
from .pubsub import REPROBE_AFTER, GapCounter, Topics, decode_data, open_sub_socket, read_frames
from .sockets import Waker
from .wire import Kind

__all__ = ["Dispatcher"]

log = logging.getLogger("zkv.dispatch")

#: Seconds :meth:`Dispatcher.close` waits for a running callback to return.
CLOSE_WAIT = 2.0

_DRAIN_MS = 2  # while messages flow, the thread waits this long in recv for the next one
_BATCH = 1000  # messages between two looks at pending subscriptions (reprobes, deadlines)
_ROUTES_KEPT = 4096  # topics whose handlers are remembered (prefix callbacks see any number)
_MESSAGE, _WELCOME = int(Kind.MESSAGE), int(Kind.WELCOME)
_FLAGS = wire.KIND_FLAGS
_parse_head = wire.parse_head


@dataclasses.dataclass(eq=False)
class _Pending:
    """A subscription waiting for the owner's welcome."""

    handler: _Handler
    done: threading.Event
    box: dict[str, BaseException]
    deadline: float
    reprobe_at: float
    probes: list[bytes]


@dataclasses.dataclass(eq=False)
class _Handler:
    topics: Topics
    callback: Callable[[Any], Any]
    runner: _AsyncRunner | None
    #: Set (on the dispatcher thread) when the owner's welcome arrives: from then on the
    #: handler gets every message, and none published before its subscription was live.
    live: bool = False


class _AsyncRunner:
    """Runs coroutine callbacks on one event loop, one after another in submission order.

    Without a ``loop`` it runs its own on a thread of its own, which closes the loop when it
    stops (so that :meth:`close` works from a coroutine on that loop too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._serve, args=(loop,),
                                            name="zkv-asyncio", daemon=True)
            self._thread.start()
        self.loop = loop
        self._gate: asyncio.Lock | None = None

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_forever()
        finally:
            loop.close()

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._run(fn, arg), self.loop)
        except RuntimeError:  # the loop is closed (the coroutine object is dropped unawaited)
            log.warning("dropped a coroutine callback: its event loop is closed")

    async def _run(self, fn: Callable[[Any], Any], arg: Any) -> None:
        if self._gate is None:
            self._gate = asyncio.Lock()
        async with self._gate:
            try:
                await fn(arg)
            except Exception:
                log.exception("zkv coroutine callback %r raised", fn)

    def close(self) -> None:
        """Stop zkv's loop after the running coroutine; wait for that at most CLOSE_WAIT
        seconds (not at all when called from the loop's own thread, by a coroutine)."""
        if self._thread is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            return
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_WAIT)  # if a coroutine blocks it, leave it be


class Dispatcher:
    """Receives the messages that this process's callbacks subscribed to, and runs them."""

    def __init__(self, ctx: zmq.Context[Any], address: str, *, hwm: int, timeout: float,
                 alive: Callable[[], bool],
                 announce: Callable[[bytes], None] | None = None) -> None:
        self._ctx = ctx
        self._address = address
        self._hwm = hwm
        self._timeout = timeout
        self._alive = alive
        self._announce = announce
        self._handlers: list[_Handler] = []
        #: topic -> its live handlers; replaced (under the mutex) when the handlers change.
        self._routes: dict[bytes, list[_Handler]] = {}
        self._runners: dict[int, _AsyncRunner] = {}
        self._mutex = threading.Lock()
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._stopping = False
        self.gaps = GapCounter("zkv callbacks", hwm)

    @property
    def dropped(self) -> int:
        return self.gaps.dropped

    # -- registration (any thread) ---------------------------------------------------------------

    def add(self, topics: Topics, callback: Callable[[Any], Any],
            loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Register ``callback`` for ``topics``; when this returns, the subscription is live
        (except when called from a callback: then it is live shortly after that returns)."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        runner = None
        if inspect.iscoroutinefunction(callback):
            runner = self._runner(loop)
        handler = _Handler(topics, callback, runner)
        done = threading.Event()
        box: dict[str, BaseException] = {}
        with self._mutex:
            self._handlers.append(handler)
            self._start()
            self._commands.append(("sub", handler, done, box))
        self._waker.wake()
        if threading.current_thread() is self._thread:
            return
        wait = None if math.isinf(self._timeout) else self._timeout  # inf: as long as it takes
        if not done.wait(wait) or "error" in box:
            self._drop(handler)
            raise box.get("error") or ZkvTimeoutError(
                f"the zkv owner did not confirm a subscription within {self._timeout}s")

    def remove(self, callback: Callable[[Any], Any]) -> int:
        """Unregister ``callback`` everywhere it is registered; return how many registrations
        were removed."""
        with self._mutex:
            gone = [h for h in self._handlers if h.callback == callback]
        for handler in gone:
            self._drop(handler)
        return len(gone)

    def _drop(self, handler: _Handler) -> None:
        with self._mutex:
            if handler in self._handlers:
                self._handlers.remove(handler)
                self._routes = {}
                self._commands.append(("unsub", handler.topics.all()))
        self._waker.wake()

    def _runner(self, loop: asyncio.AbstractEventLoop | None) -> _AsyncRunner:
        key = id(loop)
        with self._mutex:
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = _AsyncRunner(loop)
            return runner

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zkv-dispatch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (after the callback running now, if any, has returned; waits at
        most CLOSE_WAIT seconds for it) and the event loops. Returns at once when called
        from a callback: its socket is closed now (closing the ZeroMQ context waits for every
        socket), and the thread stops when the callback returns."""
        self._stopping = True
        self._waker.wake()
        thread = self._thread
        if thread is not None and thread is threading.current_thread():
            if self._sock is not None:  # this thread's own socket: safe to close here
                self._sock.close(0)
        elif thread is not None:
            thread.join(timeout=CLOSE_WAIT)
            if thread.is_alive() and self._sock is not None:
                # A callback is still running. Close its socket from here, or closing the
                # ZeroMQ context (and so the process's exit) would wait for the callback;
                # the thread stops when it returns, without touching the socket again.
                log.warning("a zkv callback is still running after %.0fs; closing without "
                            "waiting for it", CLOSE_WAIT)
                self._sock.close(0)
        for runner in self._runners.values():
            runner.close()
        self._waker.close()

    # -- the dispatcher thread -------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock = open_sub_socket(self._ctx, self._address, self._hwm)
        sock.setsockopt(zmq.RCVTIMEO, _DRAIN_MS)
        recv = sock.recv
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        pending: dict[bytes, _Pending] = {}
        try:
            while not self._stopping:
                ready = dict(poller.poll(100))
                if self._waker.fd in ready:
                    self._waker.drain()
                while self._commands:
                    command = self._commands.popleft()
                    if command[0] == "sub":
                        _, handler, done, box = command
                        topics = handler.topics.all()
                        for topic in topics:
                            sock.setsockopt(zmq.SUBSCRIBE, topic)
                        probe = wire.make_probe(topics)
                        sock.setsockopt(zmq.SUBSCRIBE, probe)
                        self._announce_probe(probe)
                        now = time.monotonic()
                        pending[probe] = _Pending(handler, done, box, now + self._timeout,
                                                  now + REPROBE_AFTER, [probe])
                    else:
                        for topic in command[1]:
                            sock.setsockopt(zmq.UNSUBSCRIBE, topic)
                if sock in ready:
                    # While messages keep coming, wait for the next one in recv (up to
                    # _DRAIN_MS: the socket's RCVTIMEO): no poll and no exception per message.
                    # Commands and close are checked after each one.
                    for _ in range(_BATCH):
                        try:
                            head = recv()
                        except zmq.Again:
                            break
                        self._on_message(sock, head, pending)
                        if self._stopping:
                            return
                        if self._commands:
                            break
                if pending:
                    self._expire(sock, pending)
        except Exception:  # pragma: no cover - a bug; keep the traceback
            log.exception("zkv dispatcher thread crashed")
        finally:
            sock.close(0)
            self.gaps.report()

    def _announce_probe(self, probe: bytes) -> None:
        if self._announce is not None:
            try:
                self._announce(probe)
            except Exception as exc:  # the welcome still comes, at the owner's next tick
                log.debug("could not announce a probe: %s", exc)

    def _expire(self, sock: zmq.Socket[Any], pending: dict[bytes, _Pending]) -> None:
        """Fail the subscriptions that waited too long; probe again for those that waited a
        while (a welcome can be dropped like any message when this socket's queue is full)."""
        now = time.monotonic()
        gone = not self._alive()
        for waiting in {id(w): w for w in pending.values()}.values():
            if gone or now > waiting.deadline:
                waiting.box["error"] = OwnerGoneError("the zkv owner is gone") if gone else \
                    ZkvTimeoutError("the zkv owner did not confirm a subscription")
                self._settle(sock, pending, waiting)
            elif now > waiting.reprobe_at:  # the answer to any of its probes will do
                probe = wire.make_probe(waiting.handler.topics.all())
                sock.setsockopt(zmq.SUBSCRIBE, probe)
                self._announce_probe(probe)
                waiting.probes.append(probe)
                waiting.reprobe_at = now + REPROBE_AFTER
                pending[probe] = waiting

    @staticmethod
    def _settle(sock: zmq.Socket[Any], pending: dict[bytes, _Pending], waiting: _Pending) -> None:
        for probe in waiting.probes:
            pending.pop(probe, None)
            sock.setsockopt(zmq.UNSUBSCRIBE, probe)
        waiting.done.set()

    def _on_message(self, sock: zmq.Socket[Any], head: bytes,
                    pending: dict[bytes, _Pending]) -> None:
        """A received message (its first frame; the others are read here): a welcome, or
        data for the callbacks of its topic."""
        try:
            topic, seq, version, kind, at = _parse_head(head)
        except ProtocolError:
            while sock.get(zmq.RCVMORE):  # skip the rest of it
                sock.recv()
            return
        frames = read_frames(sock, head, kind, at) if kind & _FLAGS else ()
        kind &= ~_FLAGS
        if kind == _WELCOME:
            waiting = pending.get(topic)
            if waiting is not None:  # (else: a late answer to a probe already answered)
                self._welcomed(sock, pending, waiting,
                               wire.parse_welcome(frames[0]) if frames else {})
            return
        handlers = self._routes.get(topic)
        if handlers is None:
            handlers = self._route(topic)
        if not handlers or not self.gaps.accept(topic, seq):
            return
        try:
            data = codec.loads(frames) if kind == _MESSAGE else \
                decode_data(wire.topic_name(topic), version, kind, frames)
        except Exception:
            log.exception("zkv dispatcher could not decode a message on %r", topic)
            return
        for handler in handlers:
            if self._stopping:  # a callback closed the store
                return
            if handler.runner is not None:
                handler.runner.submit(handler.callback, data)
                continue
            try:
                handler.callback(data)
            except Exception:
                log.exception("zkv callback %r raised", handler.callback)

    def _welcomed(self, sock: zmq.Socket[Any], pending: dict[bytes, _Pending],
                  waiting: _Pending, snapshot: dict[bytes, int]) -> None:
        """The owner's welcome for a subscription: its handler is live from here."""
        with self._mutex:
            live = [h for h in self._handlers if h.live]
        # Count gaps from the welcome for topics no live handler follows; keep counting
        # (losses before the welcome included) for those one does.
        self.gaps.start(snapshot, lambda t: any(h.topics.matches(t) for h in live))
        with self._mutex:
            waiting.handler.live = True
            self._routes = {}
        self._settle(sock, pending, waiting)

    def _route(self, topic: bytes) -> list[_Handler]:
        """The live handlers of ``topic``, in registration order (remembered until the
        handlers change)."""
        with self._mutex:
            handlers = [h for h in self._handlers if h.live and h.topics.matches(topic)]
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes = {}
            self._routes[topic] = handlers
        return handlers
