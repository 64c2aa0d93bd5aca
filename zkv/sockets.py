"""Sending and receiving zkv messages on ZeroMQ sockets, and waking a thread that polls.

The layouts are :mod:`zkv.wire`'s; this module only moves frames. Small frames (below
:data:`zkv.codec.SMALL`) are copied, large ones go by reference.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .codec import SMALL, Frame
from .wire import MORE

__all__ = ["Waker", "poll", "raw_send", "recv_message", "recv_reply", "recv_request",
           "recv_rest", "send_frames"]

_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_FLAGS_AT = 5  # where the flags byte is in a reply header (after rid u32, status u8)


def _find_raw_send() -> Callable[..., Any]:
    """pyzmq's ``Socket.send`` without its Python wrapper, which only adds options for draft
    sockets that zkv does not use (on the request path each Python call costs microseconds,
    and this one is on every send). Falls back to the public ``zmq.Socket.send`` if this pyzmq
    does not have the compiled method zkv expects."""
    backend = getattr(getattr(zmq, "backend", None), "Socket", None)
    send = getattr(backend, "send", None)
    if send is None or not isinstance(backend, type) or not issubclass(zmq.Socket, backend):
        return zmq.Socket.send
    return send  # type: ignore[no-any-return]


#: ``raw_send(socket, frame, flags, copy)``: see :func:`_find_raw_send`.
raw_send: Callable[..., Any] = _find_raw_send()

#: ``poll([(socket_or_fd, events), ...], timeout_ms)``: counts its timeout down across signals
#: (a blocking ``recv`` restarts its own timeout after each one).
poll: Callable[..., list[tuple[Any, int]]] = zmq.zmq_poll


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Frame], noblock: bool = True) -> None:
    """Send ``frames`` as one message (as ``send_multipart`` does, minus its per-frame enum
    arithmetic, which costs more than the send itself for small frames). Large frames go
    without copying. Raises zmq.Again if the queue is full and ``noblock``."""
    flags = _NOBLOCK if noblock else 0
    *head, last = frames
    for frame in head:
        raw_send(sock, frame, flags | _SNDMORE, type(frame) is bytes and len(frame) < SMALL)
    raw_send(sock, last, flags, type(last) is bytes and len(last) < SMALL)


def recv_request(sock: zmq.Socket[Any], flags: int = 0) -> list[Any]:
    """Receive one request on a ROUTER: ``[routing_id, header, *args]``. The first two frames
    come as bytes; later frames as bytes when small, as ``zmq.Frame`` (not copied) when
    large. Cheaper than ``recv_multipart(copy=False)`` plus ``.bytes``. Raises zmq.Again."""
    frames: list[Any] = [sock.recv(flags)]  # the routing id: a message follows it
    frames.append(sock.recv())
    if sock.get(_RCVMORE):
        while True:
            frame = sock.recv(copy=False)
            frames.append(frame.bytes if len(frame) < SMALL else frame)
            if not frame.more:
                break
    return frames


def recv_reply(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """Receive one reply from the owner as bytes frames: the frames after the header only if
    its ``MORE`` flag says there are some. Raises zmq.Again."""
    head = sock.recv(flags)
    if len(head) > _FLAGS_AT and head[_FLAGS_AT] & MORE:
        return [head, *recv_rest(sock)]
    return [head]


def recv_rest(sock: zmq.Socket[Any]) -> list[bytes]:
    """The remaining frames of a message whose first frame has been received."""
    rest = []
    while True:
        frame = sock.recv(copy=False)
        rest.append(frame.bytes)
        if not frame.more:
            return rest


def recv_message(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """Receive one message as bytes frames (a client copies every value once anyway when it
    unpickles it). Raises zmq.Again."""
    frames = [sock.recv(flags)]
    while sock.get(_RCVMORE):
        frames.append(sock.recv())
    return frames


class Waker:
    """Wakes a thread that polls, from other threads, without touching its sockets: a pipe
    whose read end (:attr:`fd`) the thread polls along with its sockets. Other threads call
    :meth:`wake`; the polling thread calls :meth:`drain` before handling the work queued for
    it. Wake-ups coalesce: at most one byte is in flight."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._pending = False
        self._lock = threading.Lock()  # (so that a wake-up never writes into a closed fd)
        self._closed = False

    def wake(self) -> None:
        if not self._pending:
            with self._lock:
                if self._pending or self._closed:
                    return
                self._pending = True
                try:
                    os.write(self._w, b"x")
                except OSError:  # full: already awake
                    pass

    def drain(self) -> None:
        """Call before handling the queued work, so that work queued meanwhile wakes again.

        Empties the pipe *before* clearing the flag: cleared first, a wake-up written between
        the two would be read here and leave the flag set over an empty pipe, and every later
        wake() would be skipped."""
        try:
            while os.read(self.fd, 4096):
                pass
        except OSError:
            pass
        self._pending = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._w):
                try:
                    os.close(fd)
                except OSError:
                    pass
