"""The owner's poller thread: a ROUTER socket for requests and an XPUB socket for fan-out.

One thread serves both sockets. It applies every request from other processes to the
:class:`~zkv.state.State` (one at a time, so operations from all processes fall in one order),
sequences and fans out published messages and change events, answers lock waits when locks are
released, and notices sessions whose processes died.

The owner's own threads never touch these sockets: what they publish, and the change events of
what they write, are put on an outbox (under the state lock, so in the order the changes were
applied) and the poller thread is woken through a pipe.
"""

from __future__ import annotations

import collections
import logging
import operator
import os
import secrets
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from . import auth, blobs, codec, endpoint, wire
from .codec import Frame
from .config import Options
from .errors import DecodeError, EncodeError, ProtocolError, ZkvTimeoutError
from .locks import LockTable
from .state import DELETE, Entry, State
from .wire import Kind, Op, Status, send_frames

__all__ = ["OWNER_SESSION", "Server"]

log = logging.getLogger("zkv.server")

#: The session id under which the owner's own threads hold locks.
OWNER_SESSION = b"\0" * 8

_LARGE = 64 * 1024
_BATCH = 256  # requests handled per poll wake-up before looking at the other sockets
_FLUSH_BATCH = 1024  # outbox items sent per poller turn, so that requests are served between
_OUTBOX_LIMIT = 4096  # owner threads publishing past this wait for the poller to catch up
_TICK = 0.05  # seconds between housekeeping turns (the longest the poller blocks in recv)
_LIVENESS_EVERY = 4  # ticks between checks that lock-holding clients are alive
_SWEEP_EVERY = 100  # ticks between checks of every client session
_PROBE_MEMORY = 10.0  # seconds an announced probe is awaited, and an answered one remembered
_LATE_PUBLISH = 30.0  # seconds a session's publishes are still delivered after it ended
_WAKE_ID = b"\x00zkv-wake"  # routing id of the owner threads' wake socket (clients use 12 bytes)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_entry_obj = operator.attrgetter("obj")

Reply = tuple[int, list[Frame]] | None
Handler = Callable[[bytes, bytes, int, list[Any]], Reply]


class _Session:
    __slots__ = ("fd", "host", "last_seen", "local", "pid")

    def __init__(self, pid: int, host: str, local: bool) -> None:
        self.pid = pid
        self.host = host
        self.local = local
        self.last_seen = time.monotonic()
        self.fd: int | None = None  # tcp: the connection that said HELLO


#: Events of the owner's tcp ROUTER that it watches: a session ends when its HELLO connection
#: drops; failed handshakes are logged.
_MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _Cacher:
    """A client socket that caches reads: the key prefixes it caches and how many
    invalidations it was sent."""

    __slots__ = ("prefixes", "seq")

    def __init__(self) -> None:
        self.prefixes: list[bytes] = []
        self.seq = 0


class Server:
    """Binds the owner's sockets and runs its poller thread.

    ``bind`` is None for private ipc sockets, or a ``tcp://host:port`` address. A tcp owner
    requires CURVE on both sockets and answers ZAP requests in its poller thread (no extra
    thread; the allowed keys are checked where every other decision about peers is taken);
    refused without credentials (:class:`~zkv.AuthenticationError` saying how to make them).
    """

    def __init__(self, state: State, options: Options, locks: LockTable,
                 bind: str | None = None) -> None:
        self.state = state
        self.options = options
        self.locks = locks
        self._ctx = zmq.Context(io_threads=1)
        self._ctx.setsockopt(zmq.LINGER, 0)
        self.directory: Path | None = None
        self._blobs: blobs.BlobDir | None = None  # ipc only: large frames go by file
        self._router = self._ctx.socket(zmq.ROUTER)
        self._xpub = self._ctx.socket(zmq.XPUB)
        self._router.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
        self._router.setsockopt(zmq.RCVHWM, 0)
        # A peer that does not read (a caching client gone idle) loses messages past this,
        # instead of making the owner buffer without bound; request sockets have at most one
        # reply outstanding, so they never get near it.
        self._router.setsockopt(zmq.SNDHWM, options.hwm)
        # Plain XPUB: it reports a topic when its first subscriber comes and when its last one
        # goes, deduplicated by ZeroMQ per connection, so the owner's topic set stays exact
        # (verbose modes report every duplicate subscription and leak counts).
        self._xpub.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
        self._xpub.setsockopt(zmq.SNDHWM, options.hwm)
        self._xpub.setsockopt(zmq.LINGER, int(options.linger * 1000))
        self._zap: zmq.Socket[Any] | None = None  # tcp only: ZAP requests (RFC 27)
        self._monitor: zmq.Socket[Any] | None = None  # tcp only: the ROUTER's connection events
        self._xpub_monitor: zmq.Socket[Any] | None = None  # tcp only: failed SUB handshakes
        self._auth: auth.Authenticator | None = None
        self._fd_sessions: dict[int, bytes] = {}  # tcp: HELLO connection -> session
        self._current: list[zmq.Frame] | None = None  # tcp: the request being handled
        self.handshake_failures = 0
        try:
            if bind is None:
                self.directory, self.endpoint, pub = endpoint.make_ipc_dir()
                self._blobs = blobs.BlobDir.create(self.directory.name, options.blob_threshold)
                self._router.bind(self.endpoint)
                self._xpub.bind(pub)
                self.pub_announce = pub
            else:
                ep = endpoint.parse(bind)
                if ep.transport != "tcp":
                    raise ValueError(f"serve() binds ipc sockets itself; pass None or tcp://, "
                                     f"not {bind!r}")
                self._secure(auth.owner_keys(options.keys, bind))
                self._router.bind(bind)
                self.endpoint = self._router.get_string(zmq.LAST_ENDPOINT)
                host = ep.host or "*"
                self._xpub.bind(f"tcp://{host}:*")
                self.pub_announce = self._xpub.get_string(zmq.LAST_ENDPOINT)
                self.pub_announce = self.pub_announce.rsplit(":", 1)[1]
            self.inproc_pub = f"inproc://zkv-pub-{secrets.token_hex(6)}"
            self._xpub.bind(self.inproc_pub)
        except BaseException:
            self._router.close()
            self._xpub.close()
            for extra in (self._zap, self._monitor, self._xpub_monitor):
                if extra is not None:
                    extra.close()
            self._ctx.term()
            if self.directory is not None:
                endpoint.remove_ipc_dir(self.directory)
            if self._blobs is not None:
                self._blobs.close()
            raise
        # Owner threads wake the poller with an empty message on this inproc DEALER (under a
        # lock: any thread may use it), so that the poller can block in a plain recv on its
        # ROUTER, the cheapest wait there is, instead of polling several sockets.
        self._wake_address = f"inproc://zkv-wake-{secrets.token_hex(6)}"
        self._router.bind(self._wake_address)
        self._wake_sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        self._wake_sock.setsockopt(zmq.ROUTING_ID, _WAKE_ID)
        self._wake_sock.setsockopt(zmq.SNDHWM, 0)
        self._wake_sock.connect(self._wake_address)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._expected: dict[bytes, float] = {}  # probes announced but not yet seen
        self._welcomed: dict[bytes, float] = {}  # probes answered lately
        self._outbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._room = threading.Condition()
        self._room_waiters = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="zkv-owner", daemon=True)
        self._thread_id: int | None = None
        self._sessions: dict[bytes, _Session] = {}
        self._ended: dict[bytes, float] = {}  # sessions ended lately -> until when publishes pass
        self._ticks = 0
        self._subscriptions: collections.Counter[bytes] = collections.Counter()
        self._watch_topics: list[bytes] = []
        self._cachers: dict[bytes, _Cacher] = {}
        self._seqs: dict[bytes, int] = {}
        self.refused = 0
        self._hostname = socket.gethostname()
        self._handlers: dict[int, Handler] = {
            Op.GET: self._get,
            Op.SET: self._set,
            Op.DELETE: self._delete,
            Op.PIPELINE: self._pipeline,
            Op.GET_ALL: self._get_all,
            Op.KEYS: self._keys,
            Op.LEN: self._len,
            Op.CONTAINS: self._contains,
            Op.CLEAR: self._clear,
            Op.MODIFY: self._modify,
            Op.INCR: self._incr,
            Op.SETDEFAULT: self._setdefault,
            Op.POP: self._pop,
            Op.CAS: self._cas,
            Op.TRANSACT: self._transact,
            Op.LOCK: self._lock,
            Op.UNLOCK: self._unlock,
            Op.PUBLISH: self._publish,
            Op.PING: self._ping,
            Op.BYE: self._bye,
            Op.STATS: self._stats,
            Op.CACHE_WATCH: self._cache_watch,
            Op.CACHE_UNWATCH: self._cache_unwatch,
            Op.CACHE_SYNC: self._cache_sync,
            Op.PROBE: self._probe,
            Op.GET_MANY: self._get_many,
            Op.SET_MANY: self._set_many,
            Op.SET_PLAIN: self._set_plain,
            Op.SET_PACKED: self._set_packed,
        }

    def _secure(self, keys: auth.OwnerKeys) -> None:
        """Make both tcp sockets CURVE servers that let in only allowed client keys, with
        heartbeats so that silent peers are dropped."""
        self._auth = auth.Authenticator(keys)
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.bind("inproc://zeromq.zap.01")  # before any CURVE socket binds
        beat = int(self.options.heartbeat * 1000)
        for sock in (self._router, self._xpub):
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key)
            sock.setsockopt(zmq.ZAP_DOMAIN, auth.ZAP_DOMAIN)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never allow
            sock.setsockopt(zmq.HEARTBEAT_IVL, beat)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * beat)
        self._monitor = auth.monitor(self._router, _MONITOR_EVENTS)
        self._xpub_monitor = auth.monitor(self._xpub, _MONITOR_EVENTS & ~zmq.EVENT_DISCONNECTED)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        started = threading.Event()
        self._started = started
        self._thread.start()
        started.wait()

    def close(self) -> None:
        """Stop the poller thread, close the sockets and remove the socket directory."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.options.linger + 5)
        if self.directory is not None:
            endpoint.remove_ipc_dir(self.directory)
        if self._blobs is not None:
            self._blobs.close()  # the owner's own reads of stored blobs keep working

    # -- hand-off from the owner's own threads ---------------------------------------------------

    def post(self, item: tuple[Any, ...]) -> None:
        """Queue work for the poller thread: ``("pub", channel_bytes, frames)``,
        ``("chg", kind, key, entry, version)`` or ``("reply", routing_id, frames)``."""
        self._outbox.append(item)
        if threading.get_ident() != self._thread_id:
            self._wake()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        with self._wake_lock:
            if self._wake_pending or self._wake_sock.closed:
                return
            self._wake_pending = True
            try:
                self._wake_sock.send(b"", _NOBLOCK)
            except zmq.ZMQError:
                self._wake_pending = False

    def expect_probe(self, probe: bytes) -> None:
        """A subscriber (of this process) subscribed to ``probe`` and waits for its welcome."""
        self.post(("probe", probe))

    def wait_for_room(self) -> None:
        """Block an owner thread (holding no store lock) while the outbox is over its limit:
        publishing in a tight loop then goes at the pace the poller thread sends, instead of
        queueing without bound. Raises ZkvTimeoutError if the poller does not catch up within
        the store's timeout."""
        if len(self._outbox) < _OUTBOX_LIMIT or threading.get_ident() == self._thread_id:
            return
        deadline = time.monotonic() + self.options.timeout
        with self._room:
            self._room_waiters += 1
            try:
                while len(self._outbox) >= _OUTBOX_LIMIT and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ZkvTimeoutError(
                            f"the zkv owner's poller thread did not catch up with "
                            f"{len(self._outbox)} queued messages within {self.options.timeout}s")
                    self._room.wait(min(remaining, 0.1))
            finally:
                self._room_waiters -= 1

    def _on_change(self, kind: int, key: str, entry: Entry | None, version: int) -> None:
        self.post(("chg", kind, key, entry, version))

    # -- the poller thread -----------------------------------------------------------------------

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        router, xpub = self._router, self._xpub
        items: list[Any] = [(router, _POLLIN), (xpub, _POLLIN)]
        if self._zap is not None:  # tcp
            items += [(self._zap, _POLLIN), (self._monitor, _POLLIN),
                      (self._xpub_monitor, _POLLIN)]
        router.setsockopt(zmq.RCVTIMEO, int(_TICK * 1000))
        self._started.set()
        next_tick = time.monotonic() + _TICK
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + _TICK
                if self._expected or self.locks.waiting or self._zap is not None:
                    # Something needs the other sockets watched (a subscriber waits for its
                    # welcome, a lock wait has a deadline, tcp's ZAP and monitors): poll.
                    self._poll(items, now, next_tick)
                else:
                    # Nothing but requests to wait for: block in recv, up to the next tick
                    # (the socket's RCVTIMEO). Owner threads wake it with a message.
                    try:
                        frames = wire.recv_request(router, _NOBLOCK if self._outbox else 0)
                    except zmq.Again:
                        frames = None
                    if frames is not None:
                        self._handle(frames)
                if self._outbox:
                    self._flush_outbox()
        except BaseException:  # a bug; keep the traceback
            log.exception("zkv owner poller thread crashed")
            raise
        finally:
            self.state.on_change = None
            with self._wake_lock:
                self._wake_sock.close(0)
            self._router.close(0)
            self._xpub.close(int(self.options.linger * 1000))
            for extra in (self._monitor, self._xpub_monitor, self._zap):
                if extra is not None:
                    extra.close(0)
            self._ctx.term()
            if not self._stopping and self.directory is not None:
                # Nobody serves this store any more: remove the socket files so that clients
                # get OwnerGoneError at once instead of waiting for their timeouts.
                endpoint.remove_ipc_dir(self.directory)

    def _tick(self, now: float) -> None:
        """Housekeeping, every ``_TICK``: (un)subscriptions that arrived while the poller was
        blocked in recv, lock deadlines, old probes, and now and then dead sessions."""
        self._ticks += 1
        if self._blobs is not None and (self._blobs.dead or self._blobs.pooled):
            self._blobs.sweep(now)  # free files of dropped values; expire unused free ones
        if self._ticks % _LIVENESS_EVERY == 0:
            self._check_sessions()
        self.locks.expire(now)
        self._read_subscriptions()
        for table in (self._expected, self._welcomed, self._ended):
            for probe, deadline in list(table.items()):
                if deadline < now:
                    del table[probe]

    def _poll(self, items: list[Any], now: float, next_tick: float) -> None:
        router = self._router
        timeout = next_tick - now
        if self.locks.waiting:
            nearest = self.locks.expire(now)
            if nearest is not None:
                timeout = min(timeout, nearest - now)
        if self._outbox:
            timeout = 0
        try:
            ready = zmq.zmq_poll(items, max(0, int(timeout * 1000) + 1) if timeout else 0)
        except zmq.ZMQError as exc:  # pragma: no cover - EINTR and the like
            log.debug("poll failed: %s", exc)
            return
        for sock, _events in ready:
            if sock is router:
                # Serve what is queued, checking for more without raising Again.
                for _ in range(_BATCH):
                    try:
                        if self._zap is None:
                            frames = wire.recv_request(router, _NOBLOCK)
                        else:  # tcp: HELLO needs the frames' metadata (which connection)
                            raw = router.recv_multipart(_NOBLOCK, copy=False)
                            self._current = raw
                            frames = [f.bytes if i < 2 or len(f) < _LARGE else f
                                      for i, f in enumerate(raw)]
                    except zmq.Again:
                        break
                    try:
                        self._handle(frames)
                    finally:
                        self._current = None
                    if not router.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                        break
            elif sock is self._xpub:
                self._read_subscriptions()
            else:  # tcp: a ZAP request or a connection event
                self._answer_zap()
                self._read_monitor()

    def _handle(self, frames: list[Any]) -> None:
        """Serve one request: ``[routing_id, header, *args]`` (bytes, large args as Frames)."""
        if len(frames) == 2 and not frames[1] and frames[0] == _WAKE_ID:
            self._wake_pending = False  # an owner thread queued work: the loop flushes it
            return
        if len(frames) < 2:
            self._refuse("message without a header frame")
            return
        routing_id = frames[0]
        if routing_id[:8] not in self._sessions and not self._late_publish(routing_id, frames):
            # Only a peer that completed HELLO may run an operation (one dict lookup here).
            self._greet(routing_id, frames[1:])
            return
        try:
            rid, op, args = wire.parse_request(frames[1], frames[2:])
        except ProtocolError as exc:
            self._refuse(str(exc))
            return
        refs = False
        if op & _FLAGS:
            refs = bool(op & wire.REFS) and op & wire.OP_MASK in _NAMED_REPLIES
            if op & wire.SPILLED:
                try:
                    if self._blobs is None:
                        raise ProtocolError("this owner has no blob directory")
                    args = self._blobs.resolve(args)
                except ProtocolError as exc:
                    self._refuse(str(exc))
                    if op & wire.OP_MASK not in _ONE_WAY:
                        self._reply(routing_id, rid, Status.ERROR, wire.encode_error(exc),
                                    self.state.version)
                    return
            op &= wire.OP_MASK
        handler = self._handlers.get(op)
        session = routing_id[:8]
        before = self.state.version
        if handler is None:
            self._refuse(f"unknown operation {op}")
            self._reply(routing_id, rid, Status.ERROR,
                        wire.encode_error(ProtocolError(f"unknown operation {op}")), before)
            return
        try:
            result = handler(session, routing_id, rid, args)
        except BaseException as exc:  # user code run here (modify, unpickling) may raise anything
            if isinstance(exc, ProtocolError):
                self._refuse(f"{Op(op).name}: {exc}")
            if op in _ONE_WAY:  # the sender waits for no answer
                return
            result = (Status.ERROR, wire.encode_error(exc))
        if result is not None:
            self._reply(routing_id, rid, result[0], result[1], before, refs)
        if self._blobs is not None and self._blobs.dead:
            self._blobs.sweep()  # after the reply: the client goes on meanwhile

    def _reply(self, routing_id: bytes, rid: int, status: int, out: list[Frame],
               before: int, refs: bool = False) -> None:
        if refs:  # the client reads large stored frames from their files
            named = blobs.name_blobs(out)
            if named is not None:
                out = named
                status |= wire.SPILLED
        message = wire.reply(rid, status, before, self.state.version, out)
        try:
            send_frames(self._router, [routing_id, *message])
        except zmq.ZMQError as exc:  # peer gone: its request dies with it
            log.debug("reply to %r dropped: %s", routing_id, exc)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:
            log.warning("zkv owner refused a message (%d so far): %s", self.refused, why)

    # -- tcp: authentication and connections -----------------------------------------------------

    def _answer_zap(self) -> None:
        assert self._zap is not None and self._auth is not None
        while True:
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._zap.send_multipart(self._auth.handle(request))

    def _read_monitor(self) -> None:
        """End the sessions whose HELLO connection dropped (the client died, closed, or
        stopped answering heartbeats: its locks are released); log failed handshakes."""
        assert self._monitor is not None and self._xpub_monitor is not None
        events = auth.drain_events(self._monitor) + auth.drain_events(self._xpub_monitor)
        for event, value in events:
            if event == zmq.EVENT_DISCONNECTED:
                session = self._fd_sessions.pop(value, None)
                if session is not None and session in self._sessions:
                    log.info("zkv session %s: connection lost; ending it", session.hex())
                    self._end_session(session)
            else:
                self.handshake_failures += 1
                if self.handshake_failures <= 10 or self.handshake_failures % 1000 == 0:
                    log.warning("zkv owner refused a connection: CURVE handshake failed (the "
                                "peer does not speak CURVE or uses a wrong server key; %d so "
                                "far)", self.handshake_failures)

    # -- subscriptions and fan-out ---------------------------------------------------------------

    def _read_subscriptions(self) -> None:
        while True:
            try:
                msg = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                continue
            topic = msg[1:]
            if msg[0] == 1:
                self._subscriptions[topic] += 1
                if topic[:1] == b"w":
                    self._welcome(topic)
                    self._expected.pop(topic, None)
                    self._welcomed[topic] = time.monotonic() + _PROBE_MEMORY
            elif msg[0] == 0:
                self._subscriptions[topic] -= 1
                if self._subscriptions[topic] <= 0:
                    del self._subscriptions[topic]
            self._update_watch_hook()

    def _expect(self, probe: bytes) -> None:
        """A subscriber announced ``probe``: watch the XPUB socket until its subscription
        arrives (it may have already; then it was answered)."""
        if probe[:1] != b"w" or probe in self._welcomed:
            return
        self._expected[probe] = time.monotonic() + _PROBE_MEMORY
        self._read_subscriptions()

    def _update_watch_hook(self) -> None:
        self._watch_topics = [t for t in self._subscriptions if t[:1] == b"k"]
        hook = self._on_change if self._watch_topics or self._cachers else None
        if self.state.on_change is not hook:
            with self.state.lock:
                self.state.on_change = hook

    def _welcome(self, probe: bytes) -> None:
        """A subscriber's probe arrived: everything it subscribed before it is live. Answer
        with the current sequence number of each of its topics, so that it counts gaps from
        here."""
        self._flush_outbox()  # messages sequenced before the probe keep their place
        snapshot: dict[bytes, int] = {}
        for topic in wire.probe_topics(probe):
            if topic.endswith(b"\0"):
                snapshot[topic] = self._seqs.get(topic, 0)
            else:
                snapshot.update((t, s) for t, s in self._seqs.items() if t.startswith(topic))
        send_frames(self._xpub, wire.published(probe, 0, self.state.version, Kind.WELCOME,
                                               [wire.pack_welcome(snapshot)]))

    def _flush_outbox(self) -> None:
        outbox = self._outbox
        # Let the XPUB socket take in its subscribers' "I have read up to here" notices before
        # sending: libzmq counts a subscriber's queue as full, and drops, until it has. The
        # poller does not otherwise touch the XPUB socket while it waits in recv.
        self._xpub.getsockopt(_EVENTS)
        # A batch at a time: an owner thread that keeps publishing must not keep this thread
        # from serving requests. What is left is sent on the next turn, at once.
        for _ in range(_FLUSH_BATCH):
            try:
                item = outbox.popleft()
            except IndexError:  # emptied (a welcome flushes too, from inside this loop)
                break
            what = item[0]
            if what == "pub":
                self._fan_out(wire.topic(b"c", item[1]), Kind.MESSAGE, item[2],
                             self.state.version)
            elif what == "chg":
                self._change_event(item[1], item[2], item[3], item[4])
            elif what == "reply":
                try:
                    self._router.send_multipart(item[1], copy=False)
                except zmq.ZMQError:
                    pass
            elif what == "probe":
                self._expect(item[1])
        if self._room_waiters:
            with self._room:
                self._room.notify_all()

    def _fan_out(self, topic: bytes, kind: int, frames: Sequence[Frame], version: int) -> None:
        seq = self._seqs.get(topic, 0) + 1
        self._seqs[topic] = seq
        send_frames(self._xpub, wire.published(topic, seq, version, kind, frames))

    def _change_event(self, kind: int, key: str, entry: Entry | None, version: int) -> None:
        name = wire.key_bytes(key)
        for routing_id, cacher in self._cachers.items():
            if any(name.startswith(p) for p in cacher.prefixes):
                cacher.seq += 1  # counted even if dropped: the client sees the gap
                message = wire.reply(0, Status.INVALIDATE, cacher.seq, version, [name])
                try:
                    send_frames(self._router, [routing_id, *message])
                except zmq.ZMQError:
                    pass
        topic = wire.topic(b"k", name)
        if not any(topic.startswith(t) for t in self._watch_topics):
            return
        frames: list[Frame] = []
        if entry is not None:
            try:
                frames = entry.wire()
            except EncodeError:
                frames = []
        self._fan_out(topic, Kind.DELETE if kind == DELETE else Kind.SET, frames, version)

    # -- sessions --------------------------------------------------------------------------------

    def _check_sessions(self) -> None:
        """End the sessions of local client processes that died without saying BYE: at every
        tick for those that hold or wait for locks, every few seconds for the others (so that
        short-lived workers do not pile up)."""
        if self._ticks % _SWEEP_EVERY == 0:
            suspects = list(self._sessions)
        else:
            suspects = [s for s in self.locks.sessions() if s != OWNER_SESSION]
        for session in suspects:
            info = self._sessions.get(session)
            if info is not None and info.local and not endpoint.pid_alive(info.pid):
                log.info("zkv client pid %d is gone; ending its session", info.pid)
                self._end_session(session)

    def _end_session(self, session: bytes) -> None:
        info = self._sessions.pop(session, None)
        if info is not None:
            self._ended[session] = time.monotonic() + _LATE_PUBLISH
        if info is not None and info.fd is not None and self._fd_sessions.get(info.fd) == session:
            del self._fd_sessions[info.fd]
        self.locks.drop_session(session)
        for routing_id in [r for r in self._cachers if r.startswith(session)]:
            del self._cachers[routing_id]
        self._update_watch_hook()

    # -- request handlers: (session, routing_id, rid, args) -> (status, frames) or None ----------

    def _greet(self, routing_id: bytes, frames: list[Any]) -> None:
        """A message from a connection with no session: a HELLO opens one; anything else is
        refused (counted, logged, never applied) and, if it looks like a request, answered
        with an error that says why."""
        try:
            greeting = wire.parse_greeting(wire.HELLO_MAGIC, frames[0]) \
                if len(frames) == 1 else None
        except ProtocolError as exc:
            self._refuse(f"bad HELLO: {exc}")
            return
        if greeting is None:
            self._refuse("a message from a connection that did not say HELLO")
            try:
                rid, op, _args = wire.parse_request(frames[0], frames[1:])
            except ProtocolError:
                return
            if op & wire.OP_MASK not in _ONE_WAY:
                self._reply(routing_id, rid, Status.ERROR, wire.encode_error(ProtocolError(
                    "this connection has not said HELLO to the zkv owner; nothing was done")),
                    self.state.version)
            return
        version, info = greeting
        reply: dict[str, Any] = {"pid": os.getpid()}
        if version != wire.PROTOCOL_VERSION:
            reply["error"] = (f"zkv protocol mismatch: the owner (pid {os.getpid()}) speaks "
                              f"protocol {wire.PROTOCOL_VERSION}, this client {version}; use "
                              f"the same zkv version in every process")
            self._refuse(reply["error"])
        else:
            try:
                reply.update(self._open_session(routing_id[:8], info))
            except ProtocolError as exc:
                self._refuse(f"bad HELLO: {exc}")
                reply["error"] = f"the zkv owner refused HELLO: {exc}"
        try:
            send_frames(self._router, [routing_id, wire.pack_greeting(wire.WELCOME_MAGIC, reply)])
        except zmq.ZMQError as exc:  # peer gone
            log.debug("welcome to %r dropped: %s", routing_id, exc)

    def _late_publish(self, routing_id: bytes, frames: list[Any]) -> bool:
        """Whether ``frames`` is a PUBLISH from a session that ended lately. A closing client
        says BYE on one socket while another (of a thread that ended) may still be flushing
        what it published: those messages come after the BYE and are still delivered."""
        ended = self._ended.get(routing_id[:8])
        if ended is None or len(frames[1]) < wire.REQUEST_HEADER.size:
            return False
        return frames[1][4] & wire.OP_MASK == Op.PUBLISH and ended > time.monotonic()

    def _open_session(self, session: bytes, info: dict[str, Any]) -> dict[str, Any]:
        """Record the session of a client that said HELLO; return what the welcome tells it."""
        pid = info.get("pid")
        if type(pid) is not int or pid <= 0:  # a session the liveness checks could never end
            raise ProtocolError("HELLO needs the client's pid")
        host = str(info.get("host", ""))
        local = host == self._hostname and self.directory is not None
        if self._current is not None:  # tcp
            # Disconnections queued before this HELLO are settled first: the fd it came on
            # may be the reused fd of a connection that has just closed.
            self._read_monitor()
        record = self._sessions[session] = _Session(pid, host, local)
        peer = ""
        if self._current is not None:
            frame = self._current[1]
            record.fd = frame.get(zmq.SRCFD)
            self._fd_sessions[record.fd] = session
            peer = f" as {frame.get('User-Id')!r} from {frame.get('Peer-Address')}"
        log.info("zkv session %s: HELLO from pid %d on %s%s", session.hex(), pid, host, peer)
        reply: dict[str, Any] = {
            "host": self._hostname,
            "pub": self.pub_announce,
            "max_message_size": self.options.max_message_size,
            "hwm": self.options.hwm,
        }
        if local and self._blobs is not None:
            reply["blobs"] = str(self._blobs.path)
            reply["blob_threshold"] = self._blobs.threshold
        return reply

    def _get(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        entry = self.state.data.get(_key(args, "GET"))
        if entry is None:
            return Status.NONE, []
        frames = entry.wire()
        if len(frames) > 1 and self._blobs is not None and type(frames[-1]) is not blobs.Blob \
                and codec.frame_size(frames[-1]) >= self._blobs.threshold:
            # A large value set in the owner: written to a file once, read from it from now on.
            entry.frames = frames = self._blobs.store(frames)
        return Status.OK, frames

    def _set(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) < 2:
            raise ProtocolError("SET needs a key and a value")
        self.state.put(wire.key_str(args[0]), Entry.from_frames(args[1:]))
        return Status.OK, []

    def _set_packed(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]
                    ) -> Reply:
        if len(args) != 1:
            raise ProtocolError("SET_PACKED needs one frame")
        name, value = wire.unpack_key_value(bytes(args[0]))
        self.state.put(wire.key_str(name), Entry.from_frames([value]))
        return Status.OK, []

    def _delete(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        entry = self.state.delete(_key(args, "DELETE"))
        return (Status.NONE if entry is None else Status.OK), []

    def _pipeline(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        """``[index: (op u32, frame count u32)*, *packed frames]`` -> ``[index: (status,
        frame count)*, *packed frames]``; the operations run in order, as one atomic step."""
        if not args:
            raise ProtocolError("PIPELINE needs an index")
        index = wire.read_index(args[0], "I", "pipeline index")
        flat = wire.unpack_frames(args[1:])
        if len(index) % 2 or sum(index[1::2]) != len(flat):
            raise ProtocolError("pipeline index does not match its frames")
        out_index = array("I")
        out: list[Frame] = []
        at = 0
        with self.state.lock:
            for i in range(0, len(index), 2):
                op, n = index[i], index[i + 1]
                sub = flat[at:at + n]
                at += n
                handler = self._handlers.get(op)
                if handler is None or op in _NOT_PIPELINED:
                    result: Reply = (Status.ERROR, wire.encode_error(
                        ProtocolError(f"operation {op} cannot be pipelined")))
                else:
                    try:
                        result = handler(session, routing_id, rid, sub)
                    except BaseException as exc:  # as in _handle
                        result = (Status.ERROR, wire.encode_error(exc))
                assert result is not None
                out_index.append(result[0])
                out_index.append(len(result[1]))
                out.extend(result[1])
        return Status.OK, [out_index.tobytes(), *wire.pack_frames(out)]

    def _get_many(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        """``[keys joined by NUL]`` or ``[*packed keys]`` -> ``[counts: i32 per key (-1
        missing), *packed value frames]``, read atomically; or ``[PLAIN_VALUES, one pickle of
        the list of values]`` when every key is there with a plain value kept as an object."""
        names = wire.split_keys(args[0]) if len(args) == 1 \
            else wire.keys_str(wire.unpack_frames(args))
        with self.state.lock:
            entries = list(map(self.state.data.get, names))
        if None not in entries:
            plain = codec.dumps_plain(list(map(_entry_obj, entries)))
            if plain is not None:
                return Status.OK, [wire.PLAIN_VALUES, plain]
        counts = array("i")
        out: list[Frame] = []
        for entry in entries:
            if entry is None:
                counts.append(-1)
                continue
            frames = entry.wire()
            counts.append(len(frames))
            out.extend(frames)
        return Status.OK, [counts.tobytes(), *wire.pack_frames(out)]

    def _set_many(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        """``[counts: u32 frames per value (empty: one each), *packed keys (2 frames),
        *packed value frames]``, applied as one atomic step."""
        if len(args) < 5:
            raise ProtocolError("SET_MANY needs an index, keys and values")
        names = wire.keys_str(wire.unpack_frames(args[1:3]))
        values = wire.unpack_frames(args[3:])
        if not args[0]:
            if len(values) != len(names):
                raise ProtocolError("SET_MANY has not one value per key")
            entries = Entry.many_from_frames(values)
        else:
            counts = wire.read_index(args[0], "I", "SET_MANY index")
            if len(counts) != len(names) or sum(counts) != len(values) or 0 in counts:
                raise ProtocolError("SET_MANY index does not match its frames")
            entries = []
            at = 0
            for n in counts:
                entries.append(Entry.from_frames(values[at:at + n]))
                at += n
        self.state.put_many(list(zip(names, entries, strict=True)))
        return Status.OK, []

    def _set_plain(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        """``[keys joined by NUL, one pickle of the list of plain values]``, applied as one
        atomic step. The owner keeps the values as objects (they are immutable) and pickles
        each one only when a client reads it."""
        if len(args) != 2:
            raise ProtocolError("SET_PLAIN needs the joined keys and the values")
        names = wire.split_keys(args[0])
        try:
            values = codec.loads_plain(args[1], len(names))
        except DecodeError as exc:
            raise ProtocolError(f"SET_PLAIN: {exc}") from None
        self.state.put_many(list(zip(names, Entry.many_from_objects(values), strict=True)))
        return Status.OK, []

    def _get_all(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        sections: list[Sequence[Frame]] = []
        failed: list[str] = []
        for key, entry in self.state.snapshot().items():
            try:
                frames = entry.wire()
            except EncodeError:
                failed.append(key)
                continue
            sections.append([wire.key_bytes(key)])
            sections.append(frames)
        if failed:
            raise EncodeError(f"get_all: the owner holds values that cannot be pickled, under "
                              f"keys {failed[:5]!r}{'...' if len(failed) > 5 else ''}")
        return Status.OK, wire.pack_sections(sections)

    def _keys(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        with self.state.lock:
            keys = list(self.state.data)
        return Status.OK, [wire.key_bytes(k) for k in keys]

    def _len(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        return Status.OK, codec.dumps(len(self.state.data))

    def _contains(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        found = _key(args, "CONTAINS") in self.state.data
        return (Status.OK if found else Status.NONE), []

    def _clear(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        self.state.clear()
        return Status.OK, []

    def _modify(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        key, fn, default = _sections(args, 3, "MODIFY")
        entry = self.state.modify(wire.key_str(key[0]), codec.loads(fn), codec.loads(default),
                                  travel=True)
        return Status.OK, entry.wire()

    def _incr(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) < 2:
            raise ProtocolError("INCR needs a key and an amount")
        new = self.state.incr(wire.key_str(args[0]), codec.loads(args[1:]))
        return Status.OK, codec.dumps(new)

    def _setdefault(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) < 2:
            raise ProtocolError("SETDEFAULT needs a key and a value")
        entry = self.state.setdefault(wire.key_str(args[0]), Entry.from_frames(args[1:]))
        return Status.OK, entry.wire()

    def _pop(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        key = _key(args, "POP")
        with self.state.lock:
            entry = self.state.data.get(key)
            if entry is None:
                return Status.NONE, []
            frames = entry.wire()  # fails before the key is removed if it cannot travel
            self.state.delete(key)
        return Status.OK, frames

    def _cas(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        key, expected, new = _sections(args, 3, "CAS")
        expected_obj = codec.loads(expected)
        done = self.state.compare_and_set(wire.key_str(key[0]), expected_obj,
                                          Entry.from_frames(list(new)))
        return (Status.OK if done else Status.NONE), []

    def _transact(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if not args:
            raise ProtocolError("TRANSACT needs a function")
        fn = codec.loads(args)
        # The result is pickled inside the transaction: if it cannot travel, nothing changes.
        frames = self.state.transact(lambda view: codec.dumps(fn(view)), travel=True)
        return Status.OK, frames

    def _lock(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) != 3:
            raise ProtocolError("LOCK needs a name, a token and a timeout")
        name = wire.key_str(args[0])
        token = bytes(args[1])
        timeout = wire.decode_json(args[2])
        deadline = None if timeout is None else time.monotonic() + float(timeout)

        def grant(granted: bool) -> None:
            status = Status.OK if granted else Status.NONE
            version = self.state.version
            self.post(("reply", [routing_id, *wire.reply(rid, status, version, version, [])]))

        got = self.locks.acquire(name, session, token, deadline, grant)
        if got is None:
            return None  # answered by grant() later
        return (Status.OK if got else Status.NONE), []

    def _unlock(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) != 2:
            raise ProtocolError("UNLOCK needs a name and a token")
        done = self.locks.release(wire.key_str(args[0]), bytes(args[1]))
        return (Status.OK if done else Status.NONE), []

    def _publish(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) < 2:
            raise ProtocolError("PUBLISH needs a channel and a value")
        wire.key_str(args[0])  # a channel name subscribers can decode, or refused
        with self.state.lock:  # in order with the change events of concurrent writes
            self._outbox.append(("pub", bytes(args[0]), args[1:]))
        return None

    def _ping(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        info = self._sessions.get(session)
        if info is not None:
            info.last_seen = time.monotonic()
        return Status.OK, []

    def stats(self) -> dict[str, int]:
        """Counters that show what the owner holds on to (see :meth:`zkv.Store.stats`)."""
        return {
            "keys": len(self.state.data),
            "version": self.state.version,
            "sessions": len(self._sessions),
            "subscriptions": sum(self._subscriptions.values()),
            "topics": len(self._subscriptions),
            "locks": len(self.locks.sessions()),
            "refused": self.refused,
            "refused_auth": (0 if self._auth is None
                             else self._auth.refused + self.handshake_failures),
            "pid": os.getpid(),
            **(self._blobs.counts() if self._blobs is not None
               else {"blob_files": 0, "blob_free": 0}),
        }

    @property
    def blob_dir(self) -> Path | None:
        """The directory through which large frames travel (ipc owners; see zkv.blobs)."""
        return None if self._blobs is None else self._blobs.path

    def _stats(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        return Status.OK, [wire.encode_json(self.stats())]

    def _cache_watch(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]
                     ) -> Reply:
        cacher = self._cachers.setdefault(routing_id, _Cacher())
        cacher.prefixes.extend(bytes(a) for a in args if bytes(a) not in cacher.prefixes)
        self._update_watch_hook()
        return Status.OK, [_SEQ.pack(cacher.seq)]

    def _cache_unwatch(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]
                       ) -> Reply:
        cacher = self._cachers.get(routing_id)
        if cacher is not None:
            gone = {bytes(a) for a in args}
            cacher.prefixes = [p for p in cacher.prefixes if args and p not in gone]
            if not cacher.prefixes:
                del self._cachers[routing_id]
            self._update_watch_hook()
        return Status.OK, []

    def _cache_sync(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]
                    ) -> Reply:
        cacher = self._cachers.get(routing_id)
        return Status.OK, [_SEQ.pack(0 if cacher is None else cacher.seq)]

    def _probe(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if len(args) != 1:
            raise ProtocolError("PROBE needs a probe topic")
        self._expect(bytes(args[0]))
        return None

    def _bye(self, session: bytes, routing_id: bytes, rid: int, args: list[Any]) -> Reply:
        if session in self._sessions:
            log.info("zkv session %s: BYE", session.hex())
        self._end_session(session)
        return None


_NOT_PIPELINED = frozenset({Op.PIPELINE, Op.LOCK, Op.PUBLISH, Op.BYE,
                            Op.CACHE_WATCH, Op.CACHE_UNWATCH, Op.CACHE_SYNC, Op.PROBE})
_SEQ = struct.Struct("<Q")


_ONE_WAY = frozenset({Op.PUBLISH, Op.BYE, Op.PROBE})
_FLAGS = wire.SPILLED | wire.REFS
#: Requests whose replies may name blob files: reads, which the client can simply repeat if a
#: file is gone by the time it looks (the value was overwritten in between).
_NAMED_REPLIES = frozenset({Op.GET, Op.GET_MANY})


def _key(args: list[Any], what: str) -> str:
    if not args:
        raise ProtocolError(f"{what} needs a key")
    return wire.key_str(args[0])


def _sections(args: list[Any], count: int, what: str) -> list[Sequence[Frame]]:
    sections = wire.unpack_sections(args)
    if len(sections) != count or not all(sections):
        raise ProtocolError(f"{what} needs {count} non-empty sections")
    return sections
