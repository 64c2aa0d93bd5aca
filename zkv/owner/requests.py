"""Serving requests from other processes: each is decoded, applied and answered as its entry
in :mod:`zkv.ops` says, one at a time, on the loop thread.

Only a session that said HELLO is served (see :mod:`zkv.owner.sessions`). An exception raised
while serving (by user code run here, by unpickling, by a malformed request) becomes an error
reply carrying it, with the owner's traceback; a malformed request is also refused (counted).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .. import blobs, codec, ops, wire
from ..codec import Frame
from ..errors import ProtocolError
from ..locks import LockTable
from ..ops import DEFERRED
from ..ops.kinds import NAME
from ..sockets import send_frames
from ..state import Entry, State
from .binding import Bound
from .fanout import Fanout
from .outbox import Grant, Outbox, Publish, Reply
from .sessions import Refusals, Sessions

if TYPE_CHECKING:
    from ..snapshot import SaveResult, Snapshots

__all__ = ["Requests"]

log = logging.getLogger("zkv.owner")

_ERROR = int(wire.Status.ERROR)
_OK = int(wire.Status.OK)
_NONE = int(wire.Status.NONE)
_GET = ops.GET.code
_PUBLISH = ops.PUBLISH.code
_STATUS_NAMES = {_OK: "ok", _NONE: "none", _ERROR: "error"}
_PIPELINE = ops.PIPELINE.code


class Requests:
    """Serves requests: an :class:`~zkv.ops.Context` for the request being served."""

    remote = True

    def __init__(self, state: State, locks: LockTable, outbox: Outbox, fanout: Fanout,
                 sessions: Sessions, bound: Bound, refuse: Refusals,
                 stats: Callable[[], dict[str, int]]) -> None:
        self.state = state
        self._locks = locks
        self._outbox = outbox
        self._fanout = fanout
        self._sessions = sessions
        self._table = sessions.table
        self._bound = bound
        self._blobs = bound.blobs
        self._refuse = refuse
        self._stats = stats
        self._router = bound.router
        # The request being served (the Context's view of it), and its arguments.
        self.routing_id = b""
        self.rid = 0
        self._decoded: list[Any] = []
        #: The owner's snapshots (set by the owner-local core, which makes them).
        self.snapshots: Snapshots | None = None

    # -- serving ---------------------------------------------------------------------------------

    def serve(self, frames: list[Any], raw: list[zmq.Frame] | None = None) -> None:
        """Serve one request: ``[routing_id, header, *args]`` (bytes; large args as Frames).
        ``raw``: the zmq frames it came in (tcp: HELLO needs their metadata)."""
        if len(frames) < 2:
            self._refuse("message without a header frame")
            return
        routing_id = frames[0]
        if routing_id[:8] not in self._table and \
                not self._sessions.late_publish(routing_id, frames[1]):
            self._sessions.greet(routing_id, frames[1:], raw)
            return
        try:
            rid, code, flags, args = wire.parse_request(frames[1], frames[2:])
        except ProtocolError as exc:
            self._refuse(str(exc))
            return
        op = ops.BY_CODE.get(code)
        before = self.state.version
        if op is None:
            self._refuse(f"unknown operation {code}")
            self._reply(routing_id, rid, _ERROR, wire.encode_error(
                ProtocolError(f"unknown operation {code}")), before)
            return
        if flags & wire.SPILLED:
            try:
                if self._blobs is None:
                    raise ProtocolError("this owner has no blob directory")
                args = self._blobs.resolve(args)
            except ProtocolError as exc:
                self._refuse(str(exc))
                if not op.one_way:
                    self._reply(routing_id, rid, _ERROR, wire.encode_error(exc), before)
                return
        self.routing_id = routing_id
        self.rid = rid
        if code == _GET and len(args) == 1 and type(args[0]) is bytes:
            # The most frequent request, on a short path: what ops.GET does (a test checks
            # that both answer alike), without the generic decode and result steps.
            try:
                key = args[0].decode("utf-8", "surrogatepass")
                self._decoded = [key]
                entry = self.state.get(key)
                status, out = (_NONE, []) if entry is None else (_OK, self.entry_frames(entry))
            except UnicodeDecodeError:
                status, out = self._apply(op, args)  # (which says what is wrong)
            except Exception as exc:  # a value the owner holds that cannot travel
                status, out = _ERROR, wire.encode_error(exc)
        elif code == _PUBLISH and len(args) >= 2 and not len(self._outbox) \
                and type(args[0]) is bytes:
            # A publish while nothing else waits to be sent: fanned out at once (what
            # ops.PUBLISH does through the outbox, where it keeps its place after the change
            # events queued before it; with none queued, the order is the same).
            try:
                channel = args[0].decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                self._apply(op, args)  # (which refuses it, saying why)
                return
            self._decoded = [channel]
            self._fanout.before_sending()
            self._fanout.publish(channel, args[1:], self.state.version)
            if self._fanout.monitored:
                self._monitor(op, args, -1)
            return
        elif code == _PIPELINE:
            self._decoded = []
            status, out = self._pipeline(args)
        else:
            status, out = self._apply(op, args)
            if status < 0:  # one-way, or answered later
                if self._fanout.monitored:
                    self._monitor(op, args, status)
                return
        named = bool(flags & wire.REFS) and op.named_reply
        self._reply(routing_id, rid, status, out, before, named)
        if self._fanout.monitored:
            self._monitor(op, args, status)
        if self._blobs is not None and self._blobs.dead:
            self._blobs.sweep()  # after the reply: the client goes on meanwhile

    def _apply(self, op: ops.Op[..., Any], frames: list[Any]) -> tuple[int, list[Frame]]:
        """Status and result frames of ``op``; status -1: no reply now."""
        self._decoded = []
        try:
            self._decoded = decoded = op.decode(frames)
            value = op.apply(self, *decoded)
            if op.one_way or value is DEFERRED:
                return -1, []
            return op.result.reply(value, self)
        except BaseException as exc:  # user code run here (modify, unpickling) may raise anything
            if isinstance(exc, ProtocolError):
                self._refuse(f"{op.name}: {exc}")
            if op.one_way:  # the sender waits for no answer
                return -1, []
            return _ERROR, wire.encode_error(exc)

    def _pipeline(self, args: list[Any]) -> tuple[int, list[Frame]]:
        """``[index: (op u32, frame count u32)*, *packed frames]`` -> ``[index: (status,
        frame count)*, *packed frames]``; the operations run in order, as one atomic step."""
        try:
            if not args:
                raise ProtocolError("a pipeline needs an index")
            index = wire.read_index(args[0], "I", "pipeline index")
            flat = wire.unpack_frames(args[1:])
            if len(index) % 2 or sum(index[1::2]) != len(flat):
                raise ProtocolError("pipeline index does not match its frames")
        except ProtocolError as exc:
            self._refuse(f"pipeline: {exc}")
            return _ERROR, wire.encode_error(exc)
        out_index = array("I")
        out: list[Frame] = []
        at = 0
        with self.state.lock:
            for i in range(0, len(index), 2):
                code, n = index[i], index[i + 1]
                sub = flat[at:at + n]
                at += n
                op = ops.BY_CODE.get(code)
                if op is None or not op.pipelined:
                    status, frames = _ERROR, wire.encode_error(
                        ProtocolError(f"operation {code} cannot be pipelined"))
                else:
                    status, frames = self._apply(op, sub)
                out_index.append(status)
                out_index.append(len(frames))
                out.extend(frames)
        return _OK, [out_index.tobytes(), *wire.pack_frames(out)]

    def _monitor(self, op: ops.Op[..., Any], frames: list[Any], status: int) -> None:
        """Describe a request just served, for the monitor (only while someone listens)."""
        session = self._table.get(self.routing_id[:8])
        subject = None
        for kind, value in zip(op.args, self._decoded, strict=False):
            if kind.key or kind is NAME:  # the key (or the name) it was about
                subject = value
                break
        event = {"time": time.time(), "pid": None if session is None else session.pid,
                 "op": op.name, "key": subject,
                 "status": _STATUS_NAMES.get(status, "one-way" if op.one_way
                                             else "answered later")}
        self._fanout.monitor(event, self.state.version)

    def _reply(self, routing_id: bytes, rid: int, status: int, out: list[Frame],
               before: int, named: bool = False) -> None:
        flags = 0
        if named:  # the client reads large stored frames from their files
            names = blobs.name_blobs(out)
            if names is not None:
                out = names
                flags = wire.SPILLED
        message = wire.reply(rid, status, before, self.state.version, out, flags)
        try:
            send_frames(self._router, [routing_id, *message])
        except zmq.ZMQError as exc:  # peer gone: its request dies with it
            log.debug("reply to %r dropped: %s", routing_id, exc)

    # -- the Context of a request from another process ---------------------------------------

    def entry_frames(self, entry: Entry) -> list[Frame]:
        frames = entry.wire()
        store = self._blobs
        if len(frames) > 1 and store is not None and type(frames[-1]) is not blobs.Blob \
                and codec.frame_size(frames[-1]) >= store.threshold:
            # A large value set in the owner: written to a file once, read from it from now on.
            entry.frames = frames = store.store(frames)
        return frames

    def acquire_lock(self, name: str, token: bytes, timeout: float | None) -> Any:
        routing_id, rid, outbox = self.routing_id, self.rid, self._outbox

        def grant(granted: bool) -> None:  # (called with the lock table's lock held)
            outbox.put(Grant(routing_id, rid, granted))

        deadline = None if timeout is None else time.monotonic() + timeout
        got = self._locks.acquire(name, routing_id[:8], token, deadline, grant)
        return DEFERRED if got is None else got

    def release_lock(self, name: str, token: bytes) -> bool:
        return self._locks.release(name, token)

    def publish(self, channel: str, frames: list[Frame]) -> None:
        with self.state.lock:  # in order with the change events of concurrent writes
            self._outbox.put(Publish(channel, frames))

    def end_session(self) -> None:
        self._sessions.end(self.routing_id[:8], "BYE")

    def cache_watch(self, prefixes: list[bytes]) -> int:
        return self._fanout.cache_watch(self.routing_id, prefixes)

    def cache_unwatch(self, prefixes: list[bytes]) -> None:
        self._fanout.cache_unwatch(self.routing_id, prefixes)

    def cache_sync(self) -> int:
        return self._fanout.cache_sync(self.routing_id)

    def stats(self) -> dict[str, int]:
        return self._stats()

    def save(self, path: str) -> Any:
        """List the store now (the pause), and answer when another thread has written the
        file: the loop goes on serving meanwhile."""
        if self.snapshots is None:
            raise RuntimeError("this owner has no snapshots")
        routing_id, rid, outbox = self.routing_id, self.rid, self._outbox

        def answer(done: concurrent.futures.Future[SaveResult]) -> None:
            try:
                status, frames = ops.SAVE.result.reply(done.result().to_dict(), self)
            except BaseException as exc:
                status, frames = _ERROR, wire.encode_error(exc)
            outbox.put(Reply(routing_id, rid, status, frames))

        self.snapshots.submit(path).add_done_callback(answer)
        return DEFERRED

    def send_reply(self, reply: Reply) -> None:
        """Send a late reply (from the outbox)."""
        self._reply(reply.routing_id, reply.rid, reply.status, reply.frames, self.state.version)

    def send_grant(self, grant: Grant) -> None:
        """Answer a lock wait that ended (from the outbox)."""
        status = _OK if grant.granted else int(wire.Status.NONE)
        version = self.state.version
        try:
            send_frames(self._router, [grant.routing_id,
                                       *wire.reply(grant.rid, status, version, version, [])])
        except zmq.ZMQError:
            pass
