"""The owner's loop: one thread that owns the sockets and serves them.

It polls the ROUTER (requests), the XPUB (subscriptions), the outbox's wake-up pipe (work from
the owner's other threads) and, over tcp, the ZAP and monitor sockets; serves what is queued;
sends what the outbox holds; and, every :data:`TICK`, does its housekeeping: lock deadlines,
dead clients, blob files, expired keys.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from .. import reentry
from ..codec import SMALL
from ..config import Options
from ..locks import LockTable
from ..sockets import recv_request
from ..state import Entry, State
from .binding import Bound, bind
from .fanout import Fanout
from .gil import GilWatch
from .outbox import Change, Grant, Outbox, Publish, Reply
from .requests import Requests
from .sessions import Refusals, Sessions

__all__ = ["TICK", "Owner"]

log = logging.getLogger("zkv.owner")

#: Seconds between housekeeping turns (the longest the loop waits for something to do).
TICK = 0.05
_BATCH = 256  # requests served per wake-up before looking at the other sockets
_FLUSH_BATCH = 1024  # outbox items sent per turn, so that requests are served in between
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)


class Owner:
    """The data (a :class:`~zkv.state.State`), the locks, and the loop thread that serves
    them to other processes. ``address``: None for private ipc sockets, or ``tcp://``."""

    def __init__(self, options: Options, address: str | None = None) -> None:
        self.options = options
        self.state = State()
        self.locks = LockTable()
        self.bound: Bound = bind(options, address)
        self.outbox = Outbox(options.timeout)
        self.refused = Refusals()
        self.fanout = Fanout(self.bound.xpub, self.bound.router, self._watched)
        self.sessions = Sessions(self.bound, self.locks, self.fanout, self.refused,
                                 self._welcome_info)
        self.requests = Requests(self.state, self.locks, self.outbox, self.fanout,
                                 self.sessions, self.bound, self.refused, self.stats)
        self.state.pace = self.wait_for_room
        self.gil = GilWatch()
        self._served = 0  # requests served (to know whether a tick had any)
        self._served_at_tick = 0
        self._stopping = False
        self._ticks = 0
        self._started = time.time()
        self._thread = threading.Thread(target=self._run, name="zkv-owner", daemon=True)
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return self.bound.endpoint

    @property
    def blob_dir(self) -> Path | None:
        """The directory through which large frames travel (ipc owners; see zkv.blobs)."""
        return None if self.bound.blobs is None else self.bound.blobs.path

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def close(self) -> None:
        """Stop the loop, close the sockets and remove the socket and blob directories."""
        if self._stopping:
            return
        self._stopping = True
        self.outbox.waker.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.options.linger + 5)
        self.bound.remove_files()

    # -- hand-offs from the owner's other threads ---------------------------------------------

    def wait_for_room(self) -> None:
        """Make an owner thread wait while the outbox is full (publishing, or writing watched
        keys) — unless it holds the store's lock or runs a function for the owner."""
        self.outbox.wait_for_room(self._may_wait)

    def _may_wait(self) -> bool:
        return not reentry.active() and not self.state.lock._is_owned()  # type: ignore[attr-defined]

    def _watched(self, watched: bool) -> None:
        """Change events are wanted (someone watches, or caches) or no longer wanted."""
        hook = self._on_change if watched else None
        with self.state.lock:
            self.state.on_change = hook

    def _on_change(self, kind: int, key: str, entry: Entry | None, version: int) -> None:
        self.outbox.put(Change(kind, key, entry, version))

    def _welcome_info(self, local: bool) -> dict[str, Any]:
        info: dict[str, Any] = {
            "pub": self.bound.pub_announce,
            "max_message_size": self.options.max_message_size,
            "hwm": self.options.hwm,
        }
        store = self.bound.blobs
        if local and store is not None:
            info["blobs"] = str(store.path)
            info["blob_threshold"] = store.threshold
        return info

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        self.outbox.loop_thread = threading.get_ident()
        bound = self.bound
        router, xpub, waker = bound.router, bound.xpub, self.outbox.waker
        tcp = bound.zap is not None
        # One wait for everything: select.poll on the sockets' file descriptors and the
        # waker's pipe (cheaper per wake-up than zmq_poll). A ZeroMQ socket's descriptor
        # signals a change, not a level, so what is queued is always taken (EVENTS) before
        # waiting again.
        watched: list[zmq.Socket[Any]] = [router, xpub]
        if tcp:
            assert bound.zap is not None and bound.monitor is not None
            assert bound.xpub_monitor is not None
            watched += [bound.zap, bound.monitor, bound.xpub_monitor]
        waiter = select.poll()
        for sock in watched:
            waiter.register(int(sock.getsockopt(zmq.FD)), select.POLLIN)
        waiter.register(waker.fd, select.POLLIN)
        self._ready.set()
        next_tick = time.monotonic() + TICK
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + TICK
                busy = False
                if router.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                    self._serve(router, tcp)
                    busy = True
                if xpub.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                    self.fanout.read_subscriptions(self.state.version, self._flush_all)
                    busy = True
                if tcp:
                    self.sessions.answer_zap()
                    self.sessions.read_monitor()
                if len(self.outbox):
                    self._flush(_FLUSH_BATCH)
                    busy = True
                if busy:
                    continue  # (look again before waiting: more may have come meanwhile)
                wait = next_tick - time.monotonic()
                if self.locks.waiting:
                    nearest = self.locks.expire(now)
                    if nearest is not None:
                        wait = min(wait, nearest - now)
                for fd, _events in waiter.poll(max(1, int(wait * 1000) + 1)):
                    if fd == waker.fd:
                        waker.drain()
        except BaseException:  # a bug; keep the traceback
            log.exception("zkv owner loop crashed")
            raise
        finally:
            self.state.on_change = None
            bound.close(self.options.linger)
            self.outbox.close()
            if not self._stopping:
                # Nobody serves this store any more: remove the socket files so that clients
                # get OwnerGoneError at once instead of waiting for their timeouts.
                bound.remove_files()

    def _serve(self, router: zmq.Socket[Any], tcp: bool) -> None:
        """Serve what is queued on the ROUTER, up to a batch."""
        serve = self.requests.serve
        self._served += 1
        for _ in range(_BATCH):
            try:
                if not tcp:
                    serve(recv_request(router, _NOBLOCK))
                else:  # tcp: HELLO needs the frames' metadata (which connection)
                    raw = router.recv_multipart(_NOBLOCK, copy=False)
                    serve([f.bytes if i < 2 or len(f) < SMALL else f
                           for i, f in enumerate(raw)], raw)
            except zmq.Again:
                return

    def _flush_all(self) -> None:
        """Send everything queued (before a welcome: what was sequenced before the
        subscription keeps its place)."""
        while len(self.outbox):
            self._flush(len(self.outbox))

    def _flush(self, limit: int) -> None:
        """Send up to ``limit`` outbox items (a batch at a time: an owner thread that keeps
        publishing must not keep this thread from serving requests)."""
        fanout = self.fanout
        fanout.before_sending()
        version = self.state.version
        for item in self.outbox.take(limit):
            if type(item) is Change:
                fanout.change(item.kind, item.key, item.entry, item.version)
            elif type(item) is Publish:
                fanout.publish(item.channel, item.frames, version)
            elif type(item) is Grant:
                self.requests.send_grant(item)
            elif type(item) is Reply:
                self.requests.send_reply(item)

    def _tick(self, now: float) -> None:
        """Housekeeping, every TICK: blob files, dead clients, lock deadlines, expired keys."""
        self._ticks += 1
        store = self.bound.blobs
        if store is not None and (store.dead or store.pooled):
            store.sweep(now)  # free files of dropped values; expire unused free ones
        self.sessions.check(self._ticks, now)
        self.locks.expire(now)
        if self.state.expiring:
            self.state.purge_expired()
        if self._served != self._served_at_tick:  # someone is being served: are they waiting?
            self._served_at_tick = self._served
            self.gil.probe(now)

    # -- counters ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters that show what the owner holds on to (see :meth:`zkv.Store.stats`)."""
        store = self.bound.blobs
        return {
            "keys": self.state.stored,
            "expiring": self.state.expiring,
            "version": self.state.version,
            "sessions": len(self.sessions),
            "subscriptions": self.fanout.subscriptions,
            "topics": self.fanout.topics,
            "locks": len(self.locks.sessions()),
            "refused": self.refused.count,
            "refused_auth": self.sessions.refused_auth,
            "pid": os.getpid(),
            "uptime": int(time.time() - self._started),
            **(store.counts() if store is not None else {"blob_files": 0, "blob_free": 0}),
        }
