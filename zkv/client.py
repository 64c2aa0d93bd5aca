"""A client's link to the owner: requests over per-thread DEALER sockets.

Each thread that calls the store gets its own DEALER socket (ZeroMQ sockets are not
thread-safe), sends from the calling thread and waits on that socket for the reply: no thread
hop on the request path, and replies cannot cross between threads. Every request carries an id,
so a late reply to a request that timed out is recognised and dropped.

While it waits, a request checks every ``_SLICE`` seconds that the owner still exists (for ipc:
its pid lives and its socket file is there), so a dead owner is reported within a fraction of a
second, not at the end of the timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import zmq

from . import codec, endpoint, wire
from .codec import Frame
from .config import Options
from .errors import (
    MessageTooLargeError,
    NoOwnerError,
    OwnerGoneError,
    ProtocolError,
    StoreClosedError,
    ZkvTimeoutError,
)
from .wire import Op, Status

__all__ = ["Connection"]

log = logging.getLogger("zkv.client")

_SLICE = 0.1  # seconds between owner-liveness checks while a request waits
_LARGE = 64 * 1024


class Connection:
    """Request/reply link from this process to one owner.

    Raises :class:`~zkv.NoOwnerError` at once if nothing is listening at ``address``.
    """

    def __init__(self, address: str, options: Options) -> None:
        self.address = address
        self.options = options
        self.endpoint = endpoint.parse(address)
        if self.endpoint.is_ipc:
            endpoint.check_ipc_reachable(self.endpoint)
        self._pid = os.getpid()
        self._ctx = zmq.Context(io_threads=1)
        self._session = os.urandom(8)
        self._local = threading.local()
        self._sockets: dict[int, tuple[weakref.ref[threading.Thread], zmq.Socket[Any]]] = {}
        self._sockets_lock = threading.Lock()
        self._next_socket = 0
        self._closed = False
        self._lost = False
        self._busy: set[int] = set()  # threads inside request()
        self.max_message_size = options.max_message_size
        codec.register_main_by_value()
        try:
            status, reply = self.request(
                Op.HELLO,
                [wire.encode_json({"pid": os.getpid(), "host": socket.gethostname()})],
                timeout=min(options.timeout, 10.0),
            )
            if status != Status.OK or not reply:
                raise ProtocolError("the owner refused HELLO")
            info = wire.decode_json(reply[0])
        except ZkvTimeoutError:
            self.close(linger=0)
            raise NoOwnerError(f"no zkv owner answered at {address}") from None
        except BaseException:
            self.close(linger=0)
            raise
        if info.get("version") != wire.PROTOCOL_VERSION:
            self.close(linger=0)
            raise ProtocolError(f"owner speaks zkv protocol {info.get('version')}, "
                                f"this process {wire.PROTOCOL_VERSION}")
        self.owner_pid: int = int(info["pid"])
        self.pub_address: str = self.endpoint.pub_address(info["pub"])
        self.max_message_size = int(info.get("max_message_size", options.max_message_size))
        self.hwm = int(info.get("hwm", options.hwm))

    @property
    def context(self) -> zmq.Context[Any]:
        return self._ctx

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sockets ---------------------------------------------------------------------------------

    def _socket(self) -> zmq.Socket[Any]:
        try:
            return self._local.sock  # type: ignore[no-any-return]
        except AttributeError:
            pass
        if self._closed:
            raise StoreClosedError("this zkv store is closed")
        if os.getpid() != self._pid:
            raise StoreClosedError("this connection belongs to the parent process")
        with self._sockets_lock:
            self._reap_dead_threads()
            sock = self._ctx.socket(zmq.DEALER)
            self._next_socket += 1
            sock.setsockopt(zmq.ROUTING_ID,
                            self._session + self._next_socket.to_bytes(4, "little"))
            sock.setsockopt(zmq.LINGER, int(self.options.linger * 1000))
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(self.address)
            self._sockets[threading.get_ident()] = (weakref.ref(threading.current_thread()), sock)
        self._local.sock = sock
        self._local.rid = int.from_bytes(os.urandom(4), "little")
        return sock

    def _reap_dead_threads(self) -> None:
        for ident, (ref, sock) in list(self._sockets.items()):
            thread = ref()
            if thread is None or not thread.is_alive():
                # Linger: what the thread sent last (publishes: no reply) is still delivered.
                sock.close(int(self.options.linger * 1000))
                del self._sockets[ident]

    # -- requests --------------------------------------------------------------------------------

    def owner_alive(self) -> bool:
        """Cheap check that the owner still exists (see the module docstring)."""
        return self.endpoint.owner_present()

    def _check_size(self, frames: Sequence[Frame]) -> None:
        if len(frames) > 1 or (frames and len(frames[0]) >= _LARGE):
            size = codec.frames_size(frames)
            if size > self.max_message_size:
                raise MessageTooLargeError(
                    f"message of {size} bytes is over the store's max_message_size "
                    f"({self.max_message_size} bytes); nothing was sent")

    def request(self, op: int, frames: Sequence[Frame],
                timeout: float | None = None) -> tuple[int, list[Any]]:
        """Send a request and wait for its reply; return ``(status, frames)``.

        ``timeout`` defaults to the store's; ``float("inf")`` waits as long as the owner lives.
        Raises ZkvTimeoutError, OwnerGoneError, MessageTooLargeError or StoreClosedError.
        """
        if self._lost:
            raise OwnerGoneError(f"the zkv owner at {self.address} is gone")
        sock = self._socket()
        self._check_size(frames)
        local = self._local
        rid = local.rid = (local.rid + 1) & 0xFFFFFFFF
        if timeout is None:
            timeout = self.options.timeout
        deadline = time.monotonic() + timeout
        me = threading.get_ident()
        self._busy.add(me)
        try:
            return self._exchange(sock, rid, op, frames, deadline, timeout)
        finally:
            self._busy.discard(me)

    def _exchange(self, sock: zmq.Socket[Any], rid: int, op: int, frames: Sequence[Frame],
                  deadline: float, timeout: float) -> tuple[int, list[Any]]:
        self._send(sock, [wire.pack_header(rid, op), *frames], deadline)
        while True:
            remaining = deadline - time.monotonic()
            wait = _SLICE if remaining > _SLICE else max(remaining, 0.0)
            if sock.poll(int(wait * 1000), zmq.POLLIN):
                reply = sock.recv_multipart(copy=False)
                try:
                    got, status = wire.unpack_header(reply[0].bytes)
                except ProtocolError:
                    log.warning("dropped a malformed reply")
                    continue
                if got != rid:
                    continue  # the late reply of a request that timed out
                return status, [f.bytes if len(f) < _LARGE else f for f in reply[1:]]
            self._check_owner()
            if remaining <= 0:
                raise ZkvTimeoutError(
                    f"no reply from the zkv owner within {timeout}s ({Op(op).name}); "
                    "the timeout is settable per store (timeout=...) or with ZKV_TIMEOUT")

    def send(self, op: int, frames: Sequence[Frame]) -> None:
        """Send a one-way message (no reply). Blocks, up to the timeout, only while the owner
        is too far behind to accept more."""
        if self._lost:
            raise OwnerGoneError(f"the zkv owner at {self.address} is gone")
        sock = self._socket()
        self._check_size(frames)
        deadline = time.monotonic() + self.options.timeout
        self._send(sock, [wire.pack_header(0, op), *frames], deadline)

    def _send(self, sock: zmq.Socket[Any], frames: list[Frame], deadline: float) -> None:
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ZkvTimeoutError("the zkv owner is not accepting requests (queue full)")
            sock.poll(int(min(remaining, _SLICE) * 1000), zmq.POLLOUT)
            self._check_owner()

    def _check_owner(self) -> None:
        if self._closed:
            raise StoreClosedError("this zkv store was closed while a request was waiting")
        if not self.owner_alive():
            self._lost = True
            raise OwnerGoneError(
                f"the zkv owner (pid {self.owner_pid if hasattr(self, 'owner_pid') else '?'}) "
                f"at {self.address} is gone")

    @property
    def lost(self) -> bool:
        return self._lost

    def mark_lost(self) -> None:
        self._lost = True

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
            try:
                self.send(Op.BYE, [])
            except Exception:  # best effort: the owner also notices a dead process
                pass
        self._closed = True
        # Requests waiting in other threads notice within one slice and stop using their socket.
        give_up = time.monotonic() + 3 * _SLICE
        me = threading.get_ident()
        while self._busy - {me} and time.monotonic() < give_up:
            time.sleep(0.01)
        with self._sockets_lock:
            for _ref, sock in self._sockets.values():
                sock.close(int(linger * 1000))
            self._sockets.clear()
        self._ctx.term()

