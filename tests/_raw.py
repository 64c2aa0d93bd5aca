"""Raw ZeroMQ peers that speak zkv's protocol by hand (for tests of hostile or malformed
input)."""

from __future__ import annotations

import os
import socket
from typing import Any

import zmq

from zkv import wire

__all__ = ["say_hello"]


def say_hello(sock: zmq.Socket[Any]) -> None:
    """Open a zkv session on a raw DEALER, as a zkv client does: HELLO, then the WELCOME."""
    sock.send_multipart([wire.pack_greeting(wire.HELLO_MAGIC, {
        "pid": os.getpid(), "host": socket.gethostname()})])
    assert sock.poll(15_000), "no welcome"
    version, info = wire.parse_greeting(wire.WELCOME_MAGIC, sock.recv()) or (0, {})
    assert version == wire.PROTOCOL_VERSION and "error" not in info, info
