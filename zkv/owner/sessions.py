"""Who may talk to the owner: sessions opened by HELLO, ended by BYE, by the client's death
(its pid, for local clients) or by its tcp connection dropping; and the refusal of everything
else, counted and logged at a bounded rate.

A session is a client process's connection: the first 8 bytes of the routing id of each of its
sockets. Only a connection whose session said HELLO (magic value and protocol version, see
:func:`zkv.wire.pack_greeting`) can run an operation; the owner checks that with one
dictionary lookup per request.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import auth, endpoint, ops, wire
from ..errors import ProtocolError
from ..locks import LockTable
from ..sockets import send_frames
from .binding import Bound
from .fanout import Fanout

__all__ = ["OWNER_SESSION", "Refusals", "Sessions"]

log = logging.getLogger("zkv.owner")

#: The session id under which the owner's own threads hold locks.
OWNER_SESSION = b"\0" * 8
#: Seconds a session's publishes are still delivered after it ended (see late_publish).
LATE_PUBLISH = 30.0
#: Ticks between checks of every local client's pid (lock holders: every few ticks).
_SWEEP_EVERY = 100
_LIVENESS_EVERY = 4


class Refusals:
    """Counts what the owner refused, and logs it: the first 10, then every 1000th."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, why: str) -> None:
        self.count += 1
        if self.count <= 10 or self.count % 1000 == 0:
            log.warning("zkv owner refused a message (%d so far): %s", self.count, why)


class _Session:
    __slots__ = ("fd", "host", "local", "pid")

    def __init__(self, pid: int, host: str, local: bool) -> None:
        self.pid = pid
        self.host = host
        self.local = local
        self.fd: int | None = None  # tcp: the connection that said HELLO


def _connection_fd(frame: zmq.Frame) -> int | None:
    """The file descriptor of the connection a message came on (ZMQ_SRCFD), by which a tcp
    session is ended when its connection drops. libzmq has deprecated the option; where it is
    gone, None: such a session then ends with its BYE (or when its client's process is seen
    gone), not with its connection, and a warning says so once."""
    global _NO_SRCFD_WARNED
    try:
        return int(frame.get(zmq.SRCFD))
    except (AttributeError, ValueError, TypeError, zmq.ZMQError):
        if not _NO_SRCFD_WARNED:
            _NO_SRCFD_WARNED = True
            log.warning("this libzmq cannot tell which connection a message came on "
                        "(ZMQ_SRCFD): tcp sessions end with their BYE, not when their "
                        "connection drops")
        return None


_NO_SRCFD_WARNED = False


class Sessions:
    """The table of sessions, kept by the loop thread."""

    def __init__(self, bound: Bound, locks: LockTable, fanout: Fanout, refuse: Refusals,
                 welcome: Callable[[bool], dict[str, Any]]) -> None:
        self._bound = bound
        self._locks = locks
        self._fanout = fanout
        self._refuse = refuse
        self._welcome = welcome  # what the WELCOME tells a (local?) client
        self._hostname = socket.gethostname()
        #: session id -> session; ``routing_id[:8] in table`` admits a request.
        self.table: dict[bytes, _Session] = {}
        self._ended: dict[bytes, float] = {}  # sessions ended lately -> until when publishes pass
        self._fd_sessions: dict[int, bytes] = {}  # tcp: HELLO connection -> session
        self.handshake_failures = 0

    def __len__(self) -> int:
        return len(self.table)

    # -- HELLO -----------------------------------------------------------------------------------

    def greet(self, routing_id: bytes, frames: list[Any], raw: list[zmq.Frame] | None) -> None:
        """A message from a connection with no session: a HELLO opens one; anything else is
        refused (counted, logged, never applied) and, if it looks like a request, answered
        with an error that says why. ``raw``: the message's zmq frames (tcp: which
        connection it came on)."""
        try:
            greeting = wire.parse_greeting(wire.HELLO_MAGIC, frames[0]) \
                if len(frames) == 1 else None
        except ProtocolError as exc:
            self._refuse(f"bad HELLO: {exc}")
            return
        if greeting is None:
            self._refuse("a message from a connection that did not say HELLO")
            self._answer_stranger(routing_id, frames)
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
                reply.update(self._open(routing_id[:8], info, raw))
            except ProtocolError as exc:
                self._refuse(f"bad HELLO: {exc}")
                reply["error"] = f"the zkv owner refused HELLO: {exc}"
        try:
            send_frames(self._bound.router,
                        [routing_id, wire.pack_greeting(wire.WELCOME_MAGIC, reply)])
        except zmq.ZMQError as exc:  # peer gone
            log.debug("welcome to %r dropped: %s", routing_id, exc)

    def _answer_stranger(self, routing_id: bytes, frames: list[Any]) -> None:
        try:
            rid, code, _flags, _args = wire.parse_request(frames[0], frames[1:])
        except ProtocolError:
            return
        op = ops.BY_CODE.get(code)
        if op is not None and op.one_way:
            return
        error = ProtocolError("this connection has not said HELLO to the zkv owner; nothing "
                              "was done")
        try:
            send_frames(self._bound.router, [routing_id, *wire.reply(
                rid, wire.Status.ERROR, 0, 0, wire.encode_error(error))])
        except zmq.ZMQError:
            pass

    def _open(self, session: bytes, info: dict[str, Any], raw: list[zmq.Frame] | None
              ) -> dict[str, Any]:
        """Record the session of a client that said HELLO; return what the welcome tells it."""
        pid = info.get("pid")
        if type(pid) is not int or pid <= 0:  # a session the liveness checks could never end
            raise ProtocolError("HELLO needs the client's pid")
        host = str(info.get("host", ""))
        local = host == self._hostname and self._bound.directory is not None
        if raw is not None:  # tcp
            # Disconnections queued before this HELLO are settled first: the fd it came on
            # may be the reused fd of a connection that has just closed.
            self.read_monitor()
        record = self.table[session] = _Session(pid, host, local)
        peer = ""
        if raw is not None:
            frame = raw[1]
            record.fd = _connection_fd(frame)
            if record.fd is not None:
                self._fd_sessions[record.fd] = session
            peer = f" as {frame.get('User-Id')!r} from {frame.get('Peer-Address')}"
        log.info("zkv session %s: HELLO from pid %d on %s%s", session.hex(), pid, host, peer)
        return {"host": self._hostname, **self._welcome(local)}

    def late_publish(self, routing_id: bytes, head: bytes) -> bool:
        """Whether a message (header frame ``head``) is a PUBLISH from a session that ended
        lately. A closing client says BYE on one socket while another (of a thread that ended)
        may still be flushing what it published: those messages come after the BYE and are
        still delivered."""
        ended = self._ended.get(routing_id[:8])
        if ended is None or len(head) < wire.REQUEST_HEADER.size:
            return False
        return head[4] == ops.PUBLISH.code and ended > time.monotonic()

    # -- the end of sessions ---------------------------------------------------------------------

    def end(self, session: bytes, why: str) -> None:
        """End a session: release its locks, forget its caching sockets."""
        info = self.table.pop(session, None)
        if info is None:
            return
        log.info("zkv session %s: %s", session.hex(), why)
        self._ended[session] = time.monotonic() + LATE_PUBLISH
        if info.fd is not None and self._fd_sessions.get(info.fd) == session:
            del self._fd_sessions[info.fd]
        self._locks.drop_session(session)
        self._fanout.drop_session(session)

    def check(self, ticks: int, now: float) -> None:
        """End the sessions of local client processes that died without saying BYE: every few
        ticks for those that hold or wait for locks, every few seconds for the others (so that
        short-lived workers do not pile up). Forget sessions that ended long ago."""
        if ticks % _LIVENESS_EVERY:
            return
        if ticks % _SWEEP_EVERY == 0:
            suspects = list(self.table)
            for session, until in list(self._ended.items()):
                if until < now:
                    del self._ended[session]
        else:
            suspects = [s for s in self._locks.sessions() if s != OWNER_SESSION]
        for session in suspects:
            info = self.table.get(session)
            if info is not None and info.local and not endpoint.pid_alive(info.pid):
                self.end(session, f"client pid {info.pid} is gone; ending its session")

    # -- tcp: authentication and connections -----------------------------------------------------

    def answer_zap(self) -> None:
        bound = self._bound
        assert bound.zap is not None and bound.authenticator is not None
        while True:
            try:
                request = bound.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            bound.zap.send_multipart(bound.authenticator.handle(request))

    def read_monitor(self) -> None:
        """End the sessions whose HELLO connection dropped (the client died, closed, or
        stopped answering heartbeats: its locks are released); log failed handshakes."""
        bound = self._bound
        assert bound.monitor is not None and bound.xpub_monitor is not None
        events = auth.drain_events(bound.monitor) + auth.drain_events(bound.xpub_monitor)
        for event, value in events:
            if event == zmq.EVENT_DISCONNECTED:
                session = self._fd_sessions.pop(value, None)
                if session is not None:
                    self.end(session, "connection lost; ending it")
            else:
                self.handshake_failures += 1
                if self.handshake_failures <= 10 or self.handshake_failures % 1000 == 0:
                    log.warning("zkv owner refused a connection: CURVE handshake failed (the "
                                "peer does not speak CURVE or uses a wrong server key; %d so "
                                "far)", self.handshake_failures)

    @property
    def refused_auth(self) -> int:
        authenticator = self._bound.authenticator
        return 0 if authenticator is None else authenticator.refused + self.handshake_failures
