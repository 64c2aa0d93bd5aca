"""A client's link to the owner: requests over per-thread DEALER sockets.

Each thread that calls the store gets its own DEALER socket (ZeroMQ sockets are not
thread-safe), sends from the calling thread and waits on that socket for the reply: no thread
hop on the request path, and replies cannot cross between threads. Every request carries an id,
so a late reply to a request that timed out is recognised and dropped.

While it waits, a request checks every ``_SLICE`` seconds that the owner still exists, so a
dead owner is reported within a fraction of a second, not at the end of the timeout. How that is
checked depends on the transport (an *owner watch*, chosen once per connection):

- ipc (:class:`IpcWatch`): the owner's pid lives and its socket file is there. Nothing is
  added to the request path.
- tcp (:class:`TcpWatch`): every socket speaks CURVE with this process's keys and exchanges
  ZeroMQ heartbeats with the owner. One extra DEALER, the *session socket*, says HELLO and BYE
  and is otherwise idle; a monitor on it reports the owner gone when that connection drops (the
  owner's kernel closes it when the owner dies; heartbeats close it when the owner's host or the
  network goes silent), and turns a refused handshake into :class:`~zkv.AuthenticationError`
  at once. The owner, for its part, ends this process's session (and releases its locks) when
  the session socket's connection drops.
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from . import auth, blobs, codec, endpoint, ops, reentry, wire
from .codec import SMALL, Frame
from .config import Options
from .errors import (
    AuthenticationError,
    MessageTooLargeError,
    NoOwnerError,
    OwnerGoneError,
    ProtocolError,
    StoreClosedError,
    ZkvConnectionError,
    ZkvError,
    ZkvTimeoutError,
)
from .sockets import poll as _poll
from .sockets import raw_send, recv_message, recv_reply, recv_rest, send_frames

__all__ = ["Connection", "IpcWatch", "TcpWatch"]

log = logging.getLogger("zkv.client")

_SLICE = 0.1  # seconds between owner-liveness checks while a request waits
_SLICE_MS = int(_SLICE * 1000)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_MAX_SOCKETS = 65_536


_NOBLOCK = int(zmq.NOBLOCK)
_REPLY_SIZE = wire.REPLY_HEADER.size
_FLAGS_AT = 5  # where the flags byte is in a reply header (after rid u32, status u8)
_pack_header = wire.REQUEST_HEADER.pack
_unpack_reply = wire.REPLY_HEADER.unpack_from
_UNUSUAL = wire.MORE | wire.SPILLED  # replies request_small leaves to the general path
_MERGED = wire.MERGED
_get_ident = threading.get_ident


def _private_dir(path: Any) -> str | None:
    """``path`` if it is a directory of this user that nobody else can open, else None."""
    if not isinstance(path, str):
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return path


def _name(op: int) -> str:
    known = ops.BY_CODE.get(op)
    return known.name if known is not None else f"operation {op}"


def _context() -> zmq.Context[Any]:
    """A ZeroMQ context for one connection, allowed as many sockets as the process may open
    files (one per calling thread; ZeroMQ's default stops at 1023)."""
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = _MAX_SOCKETS
    ctx.set(zmq.MAX_SOCKETS, max(1024, min(int(soft), _MAX_SOCKETS)))
    return ctx


class _ThreadSocket:
    """One thread's request socket and the id of its last request. Held only by the thread's
    slot of a ``threading.local``: when the thread ends, the slot is dropped and the socket is
    closed at once (no socket, and no file descriptor, outlives its thread)."""

    __slots__ = ("items", "release", "rid", "sock")

    def __init__(self, sock: zmq.Socket[Any],
                 release: Callable[[_ThreadSocket], None] | None) -> None:
        self.sock = sock
        self.items = [(sock, _POLLIN)]
        self.rid = int.from_bytes(os.urandom(4), "little")
        self.release = release

    def __del__(self) -> None:
        release = self.release
        if release is not None:
            self.release = None
            try:
                release(self)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


class IpcWatch:
    """Owner liveness for ipc: its pid lives and its socket file exists."""

    session_socket: zmq.Socket[Any] | None = None

    def __init__(self, ep: endpoint.Endpoint) -> None:
        endpoint.check_ipc_reachable(ep)
        self._endpoint = ep

    def alive(self) -> bool:
        return self._endpoint.owner_present()

    def failure(self, address: str, owner_pid: object) -> ZkvConnectionError:
        return OwnerGoneError(f"the zkv owner (pid {owner_pid}) at {address} is gone")

    def close(self, linger: float) -> None:
        """Nothing to close: the ipc check uses no socket of its own."""


_CLIENT_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class TcpWatch:
    """Owner liveness and authentication outcome for tcp (see the module docstring).

    Sets this process's CURVE keys and heartbeats as defaults of ``ctx``, so that every
    socket made from it afterwards (request DEALERs, subscribers' SUBs) uses them.
    """

    def __init__(self, ctx: zmq.Context[Any], address: str, routing_id: bytes,
                 keys: auth.ClientKeys, options: Options) -> None:
        beat = int(options.heartbeat * 1000)
        ctx.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key)
        ctx.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key)
        ctx.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key)
        ctx.setsockopt(zmq.HEARTBEAT_IVL, beat)
        ctx.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * beat)
        ctx.setsockopt(zmq.HEARTBEAT_TTL, min(3 * beat, 6_553_000))
        self._address = address
        self._lock = threading.Lock()
        self._up = False
        self._error: ZkvConnectionError | None = None
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.LINGER, int(options.linger * 1000))
        sock.setsockopt(zmq.RCVTIMEO, int(_SLICE * 1000))  # HELLO waits in slices
        self._monitor = auth.monitor(sock, _CLIENT_EVENTS)
        sock.connect(address)
        self.session_socket: zmq.Socket[Any] | None = sock

    def alive(self) -> bool:
        with self._lock:
            if self._error is None and self.session_socket is not None:
                for event, value in auth.drain_events(self._monitor):
                    self._on_event(event, value)
            return self._error is None

    def _on_event(self, event: int, value: int) -> None:
        where = self._address
        if self._error is not None:
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._up = True
        elif self._up:
            if event == zmq.EVENT_DISCONNECTED:
                self._error = OwnerGoneError(
                    f"the connection to the zkv owner at {where} was lost: the owner died or "
                    f"closed, or it stopped answering heartbeats")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._error = AuthenticationError(
                f"the zkv owner at {where} refused this client's key (ZAP status {value}): "
                f"its public key is not among the owner's allowed clients (DIR/clients/*.key "
                f"of the owner's `zkv keygen` directory)")
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self._error = AuthenticationError(
                f"the CURVE handshake with {where} failed: the server key this client was "
                f"given (server.key) is not the owner's, or the peer is not a zkv tcp owner")
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self._error = NoOwnerError(f"no zkv owner at {where}: the connection was refused "
                                       f"or the host cannot be reached")

    def failure(self, address: str, owner_pid: object) -> ZkvConnectionError:
        """A new exception saying why the owner is not reachable."""
        error = self._error or OwnerGoneError(f"the zkv owner at {address} is gone")
        return type(error)(str(error))

    def close(self, linger: float) -> None:
        with self._lock:
            if self.session_socket is not None:
                self.session_socket.close(int(linger * 1000))
                self._monitor.close(0)
                self.session_socket = None


class Connection:
    """Request/reply link from this process to one owner.

    Raises :class:`~zkv.NoOwnerError` at once if nothing is listening at ``address``.
    """

    def __init__(self, address: str, options: Options) -> None:
        reentry.refuse("connecting to a zkv owner")
        self.address = address
        self.options = options
        self.endpoint = endpoint.parse(address)
        self._pid = os.getpid()
        self._session = os.urandom(8)
        self._watch: IpcWatch | TcpWatch
        if self.endpoint.is_ipc:
            self._watch = IpcWatch(self.endpoint)
            self._ctx = _context()
        else:
            keys = auth.client_keys(options.keys, address)  # before anything is opened
            self._ctx = _context()
            try:
                self._watch = TcpWatch(self._ctx, address, self._session + bytes(4), keys,
                                       options)
            except BaseException:
                self._ctx.term()
                raise
        self._local = threading.local()
        self._sockets: dict[int, zmq.Socket[Any]] = {}  # every thread's socket, for close()
        self._sockets_lock = threading.Lock()
        self._socket_ids = itertools.count(1)
        self._closed = False
        self._lost = False
        self._busy: set[int] = set()  # threads inside request()
        #: The owner's blob directory, when this process can use it (see zkv.blobs); None
        #: until HELLO has been answered (so HELLO itself never goes by file).
        self.blob_dir: str | None = None
        self.blob_threshold = 0
        # Flags of a small request whose reply may name files (a read).
        self._refs = wire.MERGED
        self._small_limit = 0  # bytes: larger arguments take the general path (size checks)
        self.max_message_size = options.max_message_size
        codec.register_main_by_value()
        try:
            timeout = min(options.timeout, 10.0)
            sock = self._watch.session_socket or self._thread_socket().sock
            info = self._hello(sock, timeout)
        except ZkvTimeoutError:
            self.close(linger=0)
            raise NoOwnerError(f"no zkv owner answered HELLO at {address} within "
                               f"{timeout}s") from None
        except BaseException:
            self.close(linger=0)
            raise
        self.owner_pid: int = int(info["pid"])
        self.pub_address: str = self.endpoint.pub_address(info["pub"])
        self.max_message_size = int(info.get("max_message_size", options.max_message_size))
        self.hwm = int(info.get("hwm", options.hwm))
        self._small_limit = min(SMALL, self.max_message_size - 64)
        self.blob_dir = _private_dir(info.get("blobs"))
        self.blob_threshold = int(info.get("blob_threshold", 0) or 0)
        if self.blob_dir is not None:
            self._refs = wire.MERGED | wire.REFS

    def _hello(self, sock: zmq.Socket[Any], timeout: float) -> dict[str, Any]:
        """Say HELLO on ``sock`` and return the owner's welcome. Raises ProtocolError if the
        owner speaks another protocol version or refuses, ZkvTimeoutError if it does not
        answer within ``timeout``, OwnerGoneError if it dies meanwhile."""
        hello = wire.pack_greeting(wire.HELLO_MAGIC,
                                   {"pid": os.getpid(), "host": socket.gethostname()})
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.send(hello, _NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise ZkvTimeoutError("the zkv owner is not accepting connections") from None
                _poll([(sock, _POLLOUT)], _SLICE_MS)
        items = [(sock, _POLLIN)]
        while True:
            if not _poll(items, _SLICE_MS):
                self._check_owner()
                if time.monotonic() >= deadline:
                    raise ZkvTimeoutError(f"no welcome from the zkv owner within {timeout}s")
                continue
            frames = recv_message(sock, _NOBLOCK)
            greeting = wire.parse_greeting(wire.WELCOME_MAGIC, frames[0]) \
                if len(frames) == 1 else None
            if greeting is None:
                continue  # not the welcome (nothing else is sent before it)
            version, info = greeting
            if version != wire.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"zkv protocol mismatch: the owner at {self.address} (pid "
                    f"{info.get('pid', '?')}) speaks protocol {version}, this process "
                    f"{wire.PROTOCOL_VERSION}; use the same zkv version in every process")
            if "error" in info:
                raise ProtocolError(str(info["error"]))
            return info

    @property
    def context(self) -> zmq.Context[Any]:
        return self._ctx

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sockets ---------------------------------------------------------------------------------

    def _thread_socket(self) -> _ThreadSocket:
        """This thread's request socket, opened on first use."""
        try:
            return self._local.ts  # type: ignore[no-any-return]
        except AttributeError:
            pass
        if self._closed:
            raise StoreClosedError("this zkv store is closed")
        if os.getpid() != self._pid:
            raise StoreClosedError("this connection belongs to the parent process")
        sock = self.open_socket()
        ts = _ThreadSocket(sock, self._release)
        with self._sockets_lock:
            if self._closed:
                sock.close(0)
                raise StoreClosedError("this zkv store is closed")
            self._sockets[id(ts)] = sock
        self._local.ts = ts
        return ts

    def _release(self, ts: _ThreadSocket) -> None:
        """Close a thread's socket: its thread ended (the thread-local slot holding it was
        dropped) or a request on it was interrupted. Lingers, so that what was sent whole (a
        publish) is still delivered; a message cut off mid-way is dropped by ZeroMQ, never
        completed by the next one."""
        if os.getpid() != self._pid:
            return  # a forked child's copy of the parent's socket: never touch it
        with self._sockets_lock:
            sock = self._sockets.pop(id(ts), None)
        if sock is not None:
            sock.close(int(self.options.linger * 1000))

    def _abandon(self, ts: _ThreadSocket) -> None:
        """A request on this thread's socket was interrupted (KeyboardInterrupt, an exception
        from a signal handler): the socket may hold half a message or an unread reply, so it is
        closed and the thread's next request opens a new one."""
        if getattr(self._local, "ts", None) is ts:
            del self._local.ts
        ts.release = None
        self._release(ts)

    def open_socket(self, rcvhwm: int = 1000) -> zmq.Socket[Any]:
        """A new DEALER connected to the owner, with a routing id of this session. The caller
        owns it (and closes it before this connection closes). Raises ZkvConnectionError if
        no socket can be opened (out of file descriptors)."""
        number = next(self._socket_ids)
        try:
            sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as exc:
            raise ZkvConnectionError(
                f"cannot open a socket to the zkv owner: {exc} ({len(self._sockets)} threads "
                f"of this process hold one; raise the limit with `ulimit -n`)") from exc
        sock.setsockopt(zmq.ROUTING_ID, self._session + number.to_bytes(4, "little"))
        sock.setsockopt(zmq.LINGER, int(self.options.linger * 1000))
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVTIMEO, int(_SLICE * 1000))
        sock.connect(self.address)
        return sock

    # -- requests --------------------------------------------------------------------------------

    def owner_alive(self) -> bool:
        """Cheap check that the owner still exists (see the module docstring)."""
        return self._watch.alive()

    def _check_size(self, frames: Sequence[Frame]) -> None:
        # Even one frame over the limit must be caught here: the owner's ZeroMQ would drop the
        # connection without a word, and the caller would wait for its timeout.
        if len(frames) > 1 or (frames and len(frames[0]) > min(SMALL, self.max_message_size - 64)):
            size = codec.frames_size(frames)
            if size > self.max_message_size:
                raise MessageTooLargeError(
                    f"message of {size} bytes is over the store's max_message_size "
                    f"({self.max_message_size} bytes); nothing was sent")

    def request(self, op: int, frames: Sequence[Frame], timeout: float | None = None,
                named: bool = False) -> tuple[int, list[Any], int, int]:
        """Send request ``op`` and wait for its reply; return ``(status, results, before,
        after)``: ``before``/``after`` are the store's change counter just before and just
        after the owner applied it (see :mod:`zkv.wire`).

        ``timeout`` defaults to the store's; ``float("inf")`` waits as long as the owner lives.
        With a blob directory, large frames of the request go by file, and (if ``named``) the
        reply may name files that hold large frames. Raises ZkvTimeoutError, OwnerGoneError,
        MessageTooLargeError, StoreClosedError or ZkvConnectionError."""
        if self._lost:
            raise OwnerGoneError(f"the zkv owner at {self.address} is gone")
        ts = self._thread_socket()
        self._check_size(frames)
        flags = 0
        if self.blob_dir is not None:
            flags, frames = self._spill(frames)
            if named:
                flags |= wire.REFS
        rid = ts.rid = (ts.rid + 1) & 0xFFFFFFFF
        if timeout is None:
            timeout = self.options.timeout
        deadline = time.monotonic() + timeout
        me = threading.get_ident()
        busy = self._busy
        busy.add(me)
        try:
            self._send(ts, wire.request(rid, op, frames, flags), deadline)
            status, rflags, results, before, after = self._receive(ts, rid, op, deadline,
                                                                   timeout)
        except ZkvError:
            raise  # a timeout or a dead owner: the socket is fine (late replies are dropped)
        except zmq.ZMQError as exc:
            self._abandon(ts)
            raise self._translate(exc) from exc
        except BaseException:
            self._abandon(ts)
            raise
        finally:
            busy.discard(me)
        if rflags & wire.SPILLED:
            return self._read_named(op, frames, timeout, status, results, before, after)
        return status, results, before, after

    def _read_named(self, op: int, frames: Sequence[Frame], timeout: float | None, status: int,
                    results: list[Any], before: int, after: int
                    ) -> tuple[int, list[Any], int, int]:
        """A reply that names blob files, with the files read; if one is gone (the value was
        overwritten since), the request's reply asked for again without names."""
        assert self.blob_dir is not None
        try:
            results = blobs.read_spilled(self.blob_dir, results)
        except (OSError, ValueError):
            return self.request(op, frames, timeout, named=False)
        return status, results, before, after

    def request_small(self, op: int, arg: bytes, named: bool = False
                      ) -> tuple[int, list[Any], int, int]:
        """:meth:`request` of a request with one small argument (a get, a small set): the
        same result, with as few Python calls as it takes. Each call on this path costs a
        microsecond or two, not a tenth of one: the wait for the reply leaves the CPU caches
        cold, and a small round trip is only about 100 µs."""
        ts = getattr(self._local, "ts", None)
        if ts is None or self._lost or len(arg) > self._small_limit:
            return self.request(op, [arg], named=named)
        sock = ts.sock
        rid = ts.rid = (ts.rid + 1) & 0xFFFFFFFF
        me = _get_ident()
        busy = self._busy
        busy.add(me)
        try:
            message = _pack_header(rid, op, self._refs if named else _MERGED) + arg
            try:
                raw_send(sock, message, _NOBLOCK)
            except zmq.Again:  # the owner is behind: wait for room, up to the timeout
                self._send(ts, [message], time.monotonic() + self.options.timeout)
            # A poll, then a recv that does not wait: a blocking recv would restart its
            # timeout after every signal (pyzmq retries on EINTR), a poll counts it down.
            head = sock.recv(_NOBLOCK) if _poll(ts.items, _SLICE_MS) else None
            if head is not None and len(head) >= _REPLY_SIZE:
                got, status, flags, before, after = _unpack_reply(head)
                if got == rid and not flags & _UNUSUAL:
                    return (status, [head[_REPLY_SIZE:]] if flags & _MERGED else [], before,
                            after)
            # Anything else (a late reply, more frames, named files, a long wait): as usual.
            reply: list[Any] | None = None
            if head is not None:
                reply = [head, *recv_rest(sock)] if len(head) > _FLAGS_AT and \
                    head[_FLAGS_AT] & wire.MORE else [head]
            status, flags, results, before, after = self._receive(
                ts, rid, op, time.monotonic() + self.options.timeout, self.options.timeout,
                reply)
        except ZkvError:
            raise
        except zmq.ZMQError as exc:
            self._abandon(ts)
            raise self._translate(exc) from exc
        except BaseException:
            self._abandon(ts)
            raise
        finally:
            busy.discard(me)
        if flags & wire.SPILLED:
            return self._read_named(op, [arg], None, status, results, before, after)
        return status, results, before, after

    def _receive(self, ts: _ThreadSocket, rid: int, op: int, deadline: float,
                 timeout: float, reply: list[Any] | None = None
                 ) -> tuple[int, int, list[Any], int, int]:
        """Wait for the reply to request ``rid`` (starting with ``reply`` if one has already
        been received), checking every slice that the owner lives; return ``(status, flags,
        results, before, after)``. The deadline is absolute: signals (which make pyzmq
        restart a blocking recv) do not stretch it."""
        sock = ts.sock
        while True:
            if reply is None:
                wait = min(deadline - time.monotonic(), _SLICE)
                if wait > 0 and _poll(ts.items, max(1, int(wait * 1000))):
                    # Copying costs nothing more: every value is copied once when it is
                    # unpickled anyway.
                    reply = recv_reply(sock, _NOBLOCK)
                else:
                    self._check_owner()
                    if time.monotonic() >= deadline:
                        raise ZkvTimeoutError(
                            f"no reply from the zkv owner within {timeout}s ({_name(op)}); "
                            "the timeout is settable per store (timeout=...) or with "
                            "ZKV_TIMEOUT") from None
                    continue
            try:
                got, status, flags, before, after, results = wire.parse_reply(reply[0],
                                                                              reply[1:])
            except ProtocolError:
                log.warning("dropped a malformed reply")
                reply = None
                continue
            if got == rid:
                return status, flags, results, before, after
            reply = None  # the late reply of a request that timed out

    def send(self, op: int, frames: Sequence[Frame]) -> None:
        """Send a one-way message (no reply). Blocks, up to the timeout, only while the owner
        is too far behind to accept more."""
        if self._lost:
            raise OwnerGoneError(f"the zkv owner at {self.address} is gone")
        ts = self._thread_socket()
        self._check_size(frames)
        flags = 0
        if self.blob_dir is not None:
            flags, frames = self._spill(frames)
        deadline = time.monotonic() + self.options.timeout
        try:
            self._send(ts, wire.request(0, op, frames, flags), deadline)
        except ZkvError:
            raise
        except zmq.ZMQError as exc:
            self._abandon(ts)
            raise self._translate(exc) from exc
        except BaseException:
            self._abandon(ts)
            raise

    def _spill(self, frames: Sequence[Frame]) -> tuple[int, Sequence[Frame]]:
        """``(flags, frames)`` with the request's large frames sent by file (zkv.blobs), when
        this process can use the owner's blob directory and some frame is that large."""
        assert self.blob_dir is not None
        if len(frames) > 1 or (frames and len(frames[0]) >= self.blob_threshold):
            spilled = blobs.spill(self.blob_dir, frames, self.blob_threshold)
            if spilled is not None:
                return wire.SPILLED, spilled
        return 0, frames

    def _send(self, ts: _ThreadSocket, frames: list[Frame], deadline: float) -> None:
        """Send one message, waiting (up to ``deadline``) while the owner's queue is full.
        Whatever interrupts it mid-message, the caller abandons the socket (see _abandon)."""
        sock = ts.sock
        while True:
            try:
                send_frames(sock, frames)
                return
            except zmq.Again:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ZkvTimeoutError("the zkv owner is not accepting requests (queue full)")
            _poll([(sock, _POLLOUT)], max(1, int(min(remaining, _SLICE) * 1000)))
            self._check_owner()

    def _translate(self, exc: zmq.ZMQError) -> ZkvError:
        """A ZeroMQ error on a request, as the zkv error a caller can handle."""
        if self._closed or exc.errno == zmq.ETERM:
            return StoreClosedError("this zkv store was closed while a request was running")
        return ZkvConnectionError(f"the link to the zkv owner at {self.address} failed: {exc}")

    def _check_owner(self) -> None:
        if self._closed:
            raise StoreClosedError("this zkv store was closed while a request was waiting")
        if not self._watch.alive():
            self._lost = True
            raise self._watch.failure(self.address, getattr(self, "owner_pid", "?"))

    @property
    def lost(self) -> bool:
        return self._lost

    # -- for request paths of other kinds (the asyncio client, zkv.aio) -------------------------

    def prepare(self, frames: Sequence[Frame], named: bool = False
                ) -> tuple[int, Sequence[Frame]]:
        """The flags and frames of a request as they go on the wire (sizes checked, large
        frames sent by file; ``named``: the reply may name files). Raises OwnerGoneError or
        MessageTooLargeError."""
        if self._lost:
            raise OwnerGoneError(f"the zkv owner at {self.address} is gone")
        self._check_size(frames)
        flags = 0
        if self.blob_dir is not None:
            flags, frames = self._spill(frames)
            if named:
                flags |= wire.REFS
        return flags, frames

    def check_owner(self) -> None:
        """Raise StoreClosedError, or the error that says why the owner cannot be reached
        (remembered: every later request fails at once), unless all is well."""
        self._check_owner()

    def translate(self, exc: zmq.ZMQError) -> ZkvError:
        """A ZeroMQ error on a request, as the zkv error a caller can handle."""
        return self._translate(exc)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self, linger: float | None = None) -> None:
        """Say goodbye to the owner (releasing this process's locks) and close the sockets.
        Waits at most ``linger`` seconds (default: the store's) for queued messages."""
        if self._closed:
            return
        if os.getpid() != self._pid:
            self._closed = True  # the parent's sockets: never touch them
            return
        if linger is None:
            linger = 0.0 if self._lost or not self.owner_alive() else self.options.linger
        if not self._lost and hasattr(self, "owner_pid"):
            try:  # best effort, never waiting: the owner also notices a dead process
                sock = self._watch.session_socket or self._thread_socket().sock
                sock.send_multipart(wire.request(0, ops.BYE.code, []), zmq.NOBLOCK)
            except Exception:
                pass
        self._closed = True
        # Requests waiting in other threads notice within one slice and stop using their socket.
        give_up = time.monotonic() + 3 * _SLICE
        me = threading.get_ident()
        while self._busy - {me} and time.monotonic() < give_up:
            time.sleep(0.01)
        with self._sockets_lock:
            for sock in self._sockets.values():
                sock.close(int(linger * 1000))
            self._sockets.clear()
        self._watch.close(linger)
        self._ctx.term()

