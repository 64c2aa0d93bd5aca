"""A client's asyncio side of a store: :class:`AsyncRemoteCore`, over the process's
:class:`~zkv.remote.RemoteCore` (same connection, same session, same read cache).

Each event loop that uses the store gets one :class:`Channel`: a DEALER socket opened by the
connection (a routing id of the session that said HELLO), watched by the loop
(``add_reader`` on ZeroMQ's file descriptor). A request is tagged with a request id, sent at
once without waiting, and its future waits in a table until the reply with that id comes:
many requests of one loop are in flight together (``asyncio.gather`` of 100 gets sends 100
requests, then reads 100 replies). A request is sent whole, in one synchronous step, or not at
all: a cancellation can only come while it waits for room (nothing sent yet) or for its reply,
and then the reply, when it comes, finds no one waiting and is dropped (counted in
:attr:`Channel.late`).

While requests wait, a timer checks every :data:`SLICE` seconds that the owner lives (as the
sync client does) and fails the requests whose absolute deadline has passed; with nothing in
flight, nothing runs. Encoding and decoding come from the table of operations and from
:mod:`zkv.remote`, layouts from :mod:`zkv.wire`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import zmq

from .. import blobs, ops, wire
from ..codec import SMALL, Frame
from ..core import Call
from ..errors import ProtocolError, StoreClosedError, ZkvError, ZkvTimeoutError
from ..ops import Op
from ..pubsub import Subscriber, Topics
from ..remote import RemoteCore, encode_pipeline, read_get, read_pipeline
from ..sockets import raw_send, recv_rest, send_frames
from . import threads

__all__ = ["SLICE", "AsyncRemoteCore", "Channel"]

log = logging.getLogger("zkv.client")

P = ParamSpec("P")
R = TypeVar("R")

#: Seconds between owner-liveness checks while requests wait (as in the sync client).
SLICE = 0.1

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_FLAGS_AT = 5  # where the flags byte is in a reply header
_MORE = wire.MORE
_SPILLED = wire.SPILLED
_GET = ops.GET.code
_SET = ops.SET.code
_ERROR = int(wire.Status.ERROR)
_MERGED = wire.MERGED
_REPLY_SIZE = wire.REPLY_HEADER.size
_unpack_reply = wire.REPLY_HEADER.unpack_from
_pack_header = wire.REQUEST_HEADER.pack

#: ``(status, flags, results, before, after)`` of a reply.
Reply = tuple[int, int, list[Any], int, int]


def _copy(exc: BaseException) -> BaseException:
    """A fresh exception like ``exc`` (one per waiting future: tracebacks do not pile up)."""
    try:
        return type(exc)(*exc.args)
    except Exception:  # pragma: no cover - an exception type with another signature
        return exc


class Channel:
    """One event loop's link to the owner (see the module docstring). Used only from its
    loop's thread, except :meth:`close` when the loop is not running."""

    def __init__(self, core: AsyncRemoteCore, loop: asyncio.AbstractEventLoop) -> None:
        conn = core.conn
        self.conn = conn
        self.loop = loop
        self.timeout = core.options.timeout
        self._linger = int(core.options.linger * 1000)
        # Replies are read as soon as they arrive, and as many requests may be in flight as
        # the caller starts: no receive limit, so the owner never has to drop a reply.
        self.sock = conn.open_socket(rcvhwm=0)
        self._get: Callable[[int], int] = self.sock.get  # type: ignore[assignment]
        self.fd: int = self._get(zmq.FD)
        # A request of one small argument (a get, a small set) is one frame, made here.
        self._small = min(SMALL, conn.max_message_size - 64)
        self._refs = _MERGED | (wire.REFS if conn.blob_dir is not None else 0)
        #: rid -> (future, deadline on the loop's clock, op code, timeout)
        self.pending: dict[int, tuple[asyncio.Future[Reply], float, int, float]] = {}
        self._rid = int.from_bytes(os.urandom(4), "little")
        self._room: asyncio.Future[None] | None = None  # woken when sending may work again
        self._blocked = 0  # requests waiting for room
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_at = 0.0
        self._later: set[asyncio.Task[None]] = set()  # one-way sends waiting for room
        self.closed = False
        #: Replies that came for no waiting request (it was cancelled or timed out).
        self.late = 0
        loop.add_reader(self.fd, self._readable)

    # -- requests ------------------------------------------------------------------------------

    async def request(self, op: int, frames: Sequence[Frame], named: bool = False,
                      timeout: float | None = None) -> tuple[int, list[Any], int, int]:
        """Send request ``op`` and await its reply: ``(status, results, before, after)``
        (see :meth:`zkv.client.Connection.request`). ``timeout``: seconds (default: the
        store's; ``inf``: as long as the owner lives)."""
        flags, sent = self.conn.prepare(frames, named)
        status, rflags, results, before, after = await self._exchange(op, sent, flags, timeout)
        if rflags & _SPILLED:  # the reply names files that hold large frames
            blob_dir = self.conn.blob_dir
            assert blob_dir is not None
            try:
                results = blobs.read_spilled(blob_dir, results)
            except (OSError, ValueError):  # overwritten meanwhile: ask again, bytes by socket
                return await self.request(op, frames, False, timeout)
        return status, results, before, after

    async def request_small(self, op: int, arg: bytes, named: bool = False
                            ) -> tuple[int, list[Any], int, int]:
        """:meth:`request` of one small argument (a get, a small set), made and sent in as
        few steps as it takes (the request is one frame)."""
        if len(arg) > self._small or self.closed or self.conn.lost:
            return await self.request(op, [arg], named)
        rid = self._rid = (self._rid + 1) & 0xFFFFFFFF or 1  # (0: one-way messages)
        message = _pack_header(rid, op, self._refs if named else _MERGED) + arg
        deadline = self.loop.time() + self.timeout
        try:
            raw_send(self.sock, message, _NOBLOCK)
        except zmq.Again:
            await self._send_later([message], deadline)
        except zmq.ZMQError as exc:
            raise self.conn.translate(exc) from exc
        future = self._register(rid, deadline, op, self.timeout)
        try:
            status, flags, results, before, after = await future
        finally:
            self.pending.pop(rid, None)  # (cancelled: its reply, if it comes, is dropped)
        if flags & _SPILLED:  # the reply names files that hold large frames
            blob_dir = self.conn.blob_dir
            assert blob_dir is not None
            try:
                results = blobs.read_spilled(blob_dir, results)
            except (OSError, ValueError):  # overwritten meanwhile: ask again, bytes by socket
                return await self.request(op, [arg], False)
        return status, results, before, after

    async def _exchange(self, op: int, frames: Sequence[Frame], flags: int,
                        timeout: float | None) -> Reply:
        if self.closed:
            raise StoreClosedError("this zkv store is closed")
        rid = self._rid = (self._rid + 1) & 0xFFFFFFFF or 1
        message = wire.request(rid, op, frames, flags)
        if timeout is None:
            timeout = self.timeout
        deadline = self.loop.time() + timeout
        if not self._try_send(message):
            await self._send_later(message, deadline)
        future = self._register(rid, deadline, op, timeout)
        try:
            return await future
        finally:
            self.pending.pop(rid, None)  # (cancelled: its reply, if it comes, is dropped)

    def _register(self, rid: int, deadline: float, op: int, timeout: float
                  ) -> asyncio.Future[Reply]:
        """The future of request ``rid``, just sent, in the table of those in flight."""
        future: asyncio.Future[Reply] = self.loop.create_future()
        self.pending[rid] = (future, deadline, op, timeout)
        if self._get(_EVENTS) & _POLLIN:
            # ZeroMQ's descriptor signals edges: a reply that came in during the send has
            # been noticed by the send, not by the descriptor.
            self.loop.call_soon(self._readable)
        if self._ticker is None or deadline < self._tick_at:
            self._arm(deadline)
        return future

    async def send(self, op: int, frames: Sequence[Frame]) -> None:
        """Send a one-way message, waiting (up to the timeout) only while the owner is too
        far behind to take more."""
        if self.closed:
            raise StoreClosedError("this zkv store is closed")
        flags, sent = self.conn.prepare(frames)
        message = wire.request(0, op, sent, flags)
        if not self._try_send(message):
            await self._send_later(message, self.loop.time() + self.timeout)

    def send_soon(self, op: int, frames: Sequence[Frame]) -> None:
        """Send a one-way message now, or as soon as there is room, without awaiting (for
        clean-up after a cancellation). Best effort: errors are dropped."""
        if self.closed:
            return
        try:
            flags, sent = self.conn.prepare(frames)
            message = wire.request(0, op, sent, flags)
            if self._try_send(message):
                return
        except ZkvError:
            return
        task = self.loop.create_task(self._send_later(message, self.loop.time() + self.timeout))
        self._later.add(task)
        task.add_done_callback(self._sent_later)

    def _sent_later(self, task: asyncio.Task[None]) -> None:
        self._later.discard(task)
        if not task.cancelled():
            task.exception()  # (retrieved: a failed clean-up is not worth a warning)

    def _try_send(self, message: list[Frame]) -> bool:
        """Send ``message`` whole if the socket takes it now (False: its queue is full)."""
        try:
            send_frames(self.sock, message)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise self.conn.translate(exc) from exc

    async def _send_later(self, message: list[Frame], deadline: float) -> None:
        """Wait for room in the socket's queue (nothing is sent until then), then send."""
        loop = self.loop
        self._blocked += 1
        try:
            while True:
                room = self._room
                if room is None or room.done():
                    room = self._room = loop.create_future()
                self._arm(deadline)
                await room
                if self.closed:
                    raise StoreClosedError("this zkv store was closed while a request waited")
                if self._try_send(message):
                    return
                if loop.time() >= deadline:
                    raise ZkvTimeoutError("the zkv owner is not accepting requests (queue full)")
        finally:
            self._blocked -= 1

    # -- replies -------------------------------------------------------------------------------

    def _readable(self) -> None:
        """Read every reply that has come (the loop calls this when the socket's descriptor
        signals, and the timer once a slice), and hand each to its request."""
        if self.closed:
            return
        sock, get, pending = self.sock, self._get, self.pending
        try:
            while True:
                events = get(_EVENTS)
                if events & _POLLOUT:
                    room = self._room
                    if room is not None and not room.done():
                        room.set_result(None)
                if not events & _POLLIN:
                    return
                head = sock.recv(_NOBLOCK)
                if len(head) < _REPLY_SIZE:
                    if len(head) > _FLAGS_AT and head[_FLAGS_AT] & _MORE:
                        recv_rest(sock)
                    raise ProtocolError(f"bad reply header of {len(head)} bytes")
                rid, status, flags, before, after = _unpack_reply(head)
                results = [head[_REPLY_SIZE:]] if flags & _MERGED else []
                if flags & _MORE:
                    results.extend(recv_rest(sock))
                elif not flags & _MERGED and len(head) != _REPLY_SIZE:
                    raise ProtocolError(f"bad reply header of {len(head)} bytes")
                waiting = pending.pop(rid, None)
                if waiting is None:
                    self.late += 1  # its request was cancelled or timed out
                    continue
                future = waiting[0]
                if not future.done():
                    future.set_result((status, flags, results, before, after))
        except ProtocolError:
            log.warning("dropped a malformed reply")
            self.loop.call_soon(self._readable)
        except zmq.Again:
            return
        except zmq.ZMQError as exc:
            if not self.closed:
                self._fail(self.conn.translate(exc))

    # -- the timer: deadlines and the owner's life ---------------------------------------------

    def _arm(self, deadline: float) -> None:
        """Make sure the timer runs by ``deadline`` (and within a slice)."""
        if self._ticker is not None:
            if self._tick_at <= deadline:
                return
            self._ticker.cancel()
        at = min(deadline, self.loop.time() + SLICE)
        self._tick_at = at
        self._ticker = self.loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        if self.closed or not (self.pending or self._blocked):
            return
        try:
            self.conn.check_owner()
        except ZkvError as exc:
            self._fail(exc)
            return
        self._readable()  # never rely on one edge of the descriptor for more than a slice
        now = self.loop.time()
        nearest = math.inf
        for rid, (future, deadline, op, timeout) in list(self.pending.items()):
            if deadline <= now:
                del self.pending[rid]
                if not future.done():
                    future.set_exception(ZkvTimeoutError(
                        f"no reply from the zkv owner within {timeout}s ({_name(op)}); the "
                        f"timeout is settable per store (timeout=...) or with ZKV_TIMEOUT"))
            elif deadline < nearest:
                nearest = deadline
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)  # requests waiting for room try again
        if self.pending or self._blocked:
            self._arm(nearest)

    def _fail(self, exc: BaseException) -> None:
        """Every request waiting fails with ``exc`` (the owner is gone, the store closed)."""
        waiting, self.pending = self.pending, {}
        for future, *_rest in waiting.values():
            if not future.done():
                future.set_exception(_copy(exc))
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; requests still waiting fail with StoreClosedError. Call it in the
        loop's thread, or when the loop is not running (see :meth:`AsyncRemoteCore.close`)."""
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if not loop.is_closed():
            try:
                loop.remove_reader(self.fd)
            except Exception:  # pragma: no cover - a loop that is going away
                pass
            waiting, self.pending = self.pending, {}
            for future, *_rest in waiting.values():
                if not future.done():
                    future.set_exception(StoreClosedError(
                        "this zkv store was closed while a request waited"))
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)
        self.pending = {}
        self.sock.close(self._linger)


def _name(op: int) -> str:
    known = ops.BY_CODE.get(op)
    return known.name if known is not None else f"operation {op}"


class AsyncRemoteCore:
    """Store operations for a process that is not the owner, awaited (an
    :class:`~zkv.aio.core.AsyncCore`)."""

    is_owner = False

    def __init__(self, remote: RemoteCore) -> None:
        #: The sync core this one is the asyncio face of.
        self.sync = remote
        self._sync = remote
        self.conn = remote.conn
        self.options = remote.options
        self.endpoint = remote.endpoint
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._channels: dict[int, Channel] = {}  # id(loop) -> its channel (it holds the loop)
        self._last: Channel | None = None
        self._closed = False
        remote.attach(self)  # its sockets are closed before the connection

    # -- the channel of the running loop -------------------------------------------------------

    def channel(self) -> Channel:
        """The running event loop's channel (opened on first use)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last.loop is loop and not last.closed:
            return last
        return self._open(loop)

    def _open(self, loop: asyncio.AbstractEventLoop) -> Channel:
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                raise StoreClosedError("this zkv store is closed")
            found = self._channels.get(id(loop))
            if found is None or found.closed or found.loop is not loop:
                for key, old in list(self._channels.items()):  # loops closed since: let go
                    if old.closed or old.loop.is_closed():
                        old.close()
                        del self._channels[key]
                found = self._channels[id(loop)] = Channel(self, loop)
        self._last = found
        return found

    # -- operations ----------------------------------------------------------------------------

    async def get(self, key: str, default: Any) -> Any:
        channel = self._last
        if channel is None or channel.loop is not asyncio.get_running_loop() or channel.closed:
            channel = self.channel()
        status, reply, _before, after = await channel.request_small(
            _GET, key.encode("utf-8", "surrogatepass"), True)
        if self._sync.cache_enabled:
            self._sync.touched([key], after)
        return read_get(status, reply, default)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        frames = ops.SET.encode(key, value, ttl)
        packed = frames[0]
        if len(frames) == 1 and type(packed) is bytes:  # key and small value in one frame
            status, reply, _before, after = await self.channel().request_small(_SET, packed)
        else:
            status, reply, _before, after = await self.channel().request(_SET, frames)
        if self._sync.cache_enabled:
            self._sync.touched([key], after)
        if status == _ERROR:
            raise wire.decode_error(reply)

    async def call(self, op: Op[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        frames = op.encode(*args)
        channel = self.channel()
        if op.one_way:
            await channel.send(op.code, frames)
            return cast(R, None)
        status, reply, _before, after = await channel.request(op.code, frames,
                                                              op.named_reply)
        if self._sync.cache_enabled:
            self._sync.touched(op.touches(args), after)
        return op.read(status, reply, args)

    async def execute(self, calls: list[Call], out: list[Any]) -> list[Any]:
        if not calls:
            return out
        frames, touched = encode_pipeline(calls)
        status, reply, _before, after = await self.channel().request(ops.PIPELINE.code, frames)
        self._sync.touched(touched, after)
        return read_pipeline(calls, status, reply, out)

    async def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        frames = ops.LOCK.encode(name, token, timeout)
        wait = math.inf if timeout is None else timeout + self.options.timeout
        channel = self.channel()
        try:
            status, reply, _before, _after = await channel.request(ops.LOCK.code, frames,
                                                                   timeout=wait)
        except BaseException:
            # Gave up (timeout, cancellation): withdraw the wait, or give back a late grant.
            # Same socket, so the owner reads it after the request.
            channel.send_soon(ops.UNLOCK.code, ops.UNLOCK.encode(name, token))
            raise
        return bool(ops.LOCK.read(status, reply, (name, token, timeout)))

    async def lock_release(self, name: str, token: bytes) -> bool:
        return await self.call(ops.UNLOCK, name, token)

    async def subscriber(self, topics: Topics, what: str) -> Subscriber:
        return await threads.run(self._sync.subscriber, topics, what, cleanup=Subscriber.close)

    def owner_alive(self) -> bool:
        return self._sync.owner_alive()

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every loop's channel (idempotent; any thread). A channel whose loop runs in
        another thread is closed there; one whose loop does not run is closed here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
            self._last = None
        if os.getpid() != self._pid:
            return  # a forked child's copy: the sockets are the parent's
        for channel in channels:
            _close_channel(channel)


def _close_channel(channel: Channel) -> None:
    loop = channel.loop
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop or not loop.is_running():
        channel.close()
        return
    closed = threading.Event()

    def close_there() -> None:
        channel.close()
        closed.set()

    try:
        loop.call_soon_threadsafe(close_there)
    except RuntimeError:  # the loop closed meanwhile
        channel.close()
        return
    if not closed.wait(2.0):  # that loop is stuck (a blocking call in a coroutine)
        log.warning("closed an asyncio channel of a stuck event loop from another thread")
        channel.close()
