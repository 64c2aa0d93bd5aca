"""The owner's fan-out: subscriptions and welcomes on the XPUB socket, published messages and
change events sequenced per topic, and cache invalidations pushed to caching clients.

Every publish and every change goes through here, in one order; each topic numbers its
messages (``seq``), so a subscriber sees what it lost as a gap. A subscription is live when the
subscriber's *probe* topic arrives (subscriptions travel in order): the owner answers it with a
welcome carrying the current ``seq`` of each topic subscribed before it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .. import codec, wire
from ..codec import Frame
from ..errors import EncodeError
from ..sockets import send_frames
from ..state import DELETE, EXPIRE, Entry
from ..wire import Kind

__all__ = ["Fanout"]

log = logging.getLogger("zkv.owner")

_KINDS = {DELETE: Kind.DELETE, EXPIRE: Kind.EXPIRE}


class _Cacher:
    """A client socket that caches reads: the key prefixes it caches and how many
    invalidations it was sent."""

    __slots__ = ("prefixes", "seq")

    def __init__(self) -> None:
        self.prefixes: list[bytes] = []
        self.seq = 0


class Fanout:
    """Subscriptions, sequence numbers and invalidations; used by the loop thread only.

    ``on_watched(flag)`` is called when change events start or stop being wanted (someone
    watches a key, or a client caches): the owner then turns the state's change hook on or off,
    so that change events exist only while someone wants them."""

    def __init__(self, xpub: zmq.Socket[Any], router: zmq.Socket[Any],
                 on_watched: Callable[[bool], None]) -> None:
        self._xpub = xpub
        self._router = router
        self._on_watched = on_watched
        self._subscriptions: collections.Counter[bytes] = collections.Counter()
        self._watch_topics: list[bytes] = []
        self._cachers: dict[bytes, _Cacher] = {}
        self._seqs: dict[bytes, int] = {}
        self._watched = False
        #: Someone listens to the monitor: the owner then describes each request it serves.
        self.monitored = False

    # -- subscriptions -------------------------------------------------------------------------

    def read_subscriptions(self, version: int, before_welcome: Callable[[], None]) -> None:
        """Take in the (un)subscriptions the XPUB socket has seen; answer probes with a
        welcome (after ``before_welcome()``, which sends what was sequenced before them)."""
        changed = False
        while True:
            try:
                msg = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not msg:
                continue
            topic = msg[1:]
            if msg[0] == 1:
                self._subscriptions[topic] += 1
                if topic[:1] == b"w":
                    if changed:  # change events on before the subscriber is told it is live
                        self._update_watched()
                        changed = False
                    before_welcome()
                    self._welcome(topic, version)
                    continue
            elif msg[0] == 0:
                self._subscriptions[topic] -= 1
                if self._subscriptions[topic] <= 0:
                    del self._subscriptions[topic]
            changed = True
        if changed:
            self._update_watched()

    def _welcome(self, probe: bytes, version: int) -> None:
        """A subscriber's probe arrived: everything it subscribed before it is live. Answer
        with the current sequence number of each of its topics, so that it counts gaps from
        here."""
        snapshot: dict[bytes, int] = {}
        for topic in wire.probe_topics(probe):
            if topic.endswith(b"\0"):
                snapshot[topic] = self._seqs.get(topic, 0)
            else:
                snapshot.update((t, s) for t, s in self._seqs.items() if t.startswith(topic))
        send_frames(self._xpub, wire.published(probe, 0, version, Kind.WELCOME,
                                               [wire.pack_welcome(snapshot)]))

    def _update_watched(self) -> None:
        self.monitored = wire.MONITOR_TOPIC in self._subscriptions
        self._watch_topics = [t for t in self._subscriptions if t[:1] == b"k"]
        watched = bool(self._watch_topics or self._cachers)
        if watched != self._watched:
            self._watched = watched
            self._on_watched(watched)

    def before_sending(self) -> None:
        """Let the XPUB socket take in its subscribers' "I have read up to here" notices before
        sending a batch: libzmq counts a subscriber's queue as full, and drops, until it has."""
        self._xpub.getsockopt(zmq.EVENTS)

    # -- fan-out -------------------------------------------------------------------------------

    def publish(self, channel: str, frames: Sequence[Frame], version: int) -> None:
        self._fan_out(wire.channel_topic(channel), Kind.MESSAGE, frames, version)

    def _fan_out(self, topic: bytes, kind: int, frames: Sequence[Frame], version: int) -> None:
        seq = self._seqs.get(topic, 0) + 1
        self._seqs[topic] = seq
        send_frames(self._xpub, wire.published(topic, seq, version, kind, frames))

    def monitor(self, event: dict[str, Any], version: int) -> None:
        """Publish the description of a request the owner served to the monitor's
        listeners."""
        self._fan_out(wire.MONITOR_TOPIC, Kind.MESSAGE, codec.dumps(event), version)

    def change(self, kind: int, key: str, entry: Entry | None, version: int) -> None:
        """A change of ``key``: an invalidation to each client caching it, and an event for
        its watchers."""
        name = wire.key_bytes(key)
        for routing_id, cacher in self._cachers.items():
            if any(name.startswith(p) for p in cacher.prefixes):
                cacher.seq += 1  # counted even if dropped: the client sees the gap
                try:
                    send_frames(self._router, [routing_id,
                                               *wire.invalidation(cacher.seq, version, name)])
                except zmq.ZMQError:
                    pass
        topic = wire.key_topic(key)
        if not any(topic.startswith(t) for t in self._watch_topics):
            return
        frames: list[Frame] = []
        if entry is not None:
            try:
                frames = entry.wire()
            except EncodeError:
                frames = []  # a value the owner holds by reference: the event carries none
        self._fan_out(topic, _KINDS.get(kind, Kind.SET), frames, version)

    # -- caching clients -----------------------------------------------------------------------

    def cache_watch(self, routing_id: bytes, prefixes: list[bytes]) -> int:
        cacher = self._cachers.setdefault(routing_id, _Cacher())
        cacher.prefixes.extend(p for p in prefixes if p not in cacher.prefixes)
        self._update_watched()
        return cacher.seq

    def cache_unwatch(self, routing_id: bytes, prefixes: list[bytes]) -> None:
        cacher = self._cachers.get(routing_id)
        if cacher is not None:
            gone = set(prefixes)
            cacher.prefixes = [p for p in cacher.prefixes if prefixes and p not in gone]
            if not cacher.prefixes:
                del self._cachers[routing_id]
            self._update_watched()

    def cache_sync(self, routing_id: bytes) -> int:
        cacher = self._cachers.get(routing_id)
        return 0 if cacher is None else cacher.seq

    def drop_session(self, session: bytes) -> None:
        """Forget the caching sockets of a session that ended."""
        for routing_id in [r for r in self._cachers if r.startswith(session)]:
            del self._cachers[routing_id]
        self._update_watched()

    # -- counters ------------------------------------------------------------------------------

    @property
    def subscriptions(self) -> int:
        return sum(self._subscriptions.values())

    @property
    def topics(self) -> int:
        return len(self._subscriptions)
