"""The owner's sockets: a ROUTER for requests and an XPUB for fan-out, bound on private ipc
endpoints (with a blob directory for large values) or on tcp with CURVE.

A tcp owner requires CURVE on both sockets and answers ZAP requests in its loop (no extra
thread: the allowed keys are checked where every other decision about peers is taken); it is
refused without credentials (:class:`~zkv.AuthenticationError` saying how to make them).
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import zmq

from .. import auth, blobs, endpoint
from ..config import Options

__all__ = ["MONITOR_EVENTS", "ROUTER_HWM_FLOOR", "Bound", "bind"]

#: Messages: the floor of the ROUTER's send high-water mark. A request socket has one reply
#: outstanding, but ZeroMQ learns that its peer has read in batches of half the high-water
#: mark, and late: with a mark of a few dozen, a reply could be dropped although the peer
#: reads everything.
ROUTER_HWM_FLOOR = 1000

#: Events of the tcp ROUTER that the owner watches: a session ends when its HELLO connection
#: drops; failed handshakes are logged.
MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclasses.dataclass
class Bound:
    """The owner's bound sockets and where clients find them."""

    ctx: zmq.Context[Any]
    router: zmq.Socket[Any]
    xpub: zmq.Socket[Any]
    endpoint: str  # what clients connect their DEALERs to
    pub_announce: str  # what the WELCOME tells clients about the XPUB (a path, or a port)
    inproc_pub: str  # the XPUB for the owner's own subscribers
    directory: Path | None = None  # ipc: the private socket directory
    blobs: blobs.BlobDir | None = None  # ipc: large frames go by file
    zap: zmq.Socket[Any] | None = None  # tcp: ZAP requests (RFC 27)
    authenticator: auth.Authenticator | None = None
    monitor: zmq.Socket[Any] | None = None  # tcp: the ROUTER's connection events
    xpub_monitor: zmq.Socket[Any] | None = None  # tcp: failed SUB handshakes

    def close(self, linger: float) -> None:
        """Close the sockets and the context (from the loop thread, which owns them)."""
        self.router.close(0)
        self.xpub.close(int(linger * 1000))
        for extra in (self.monitor, self.xpub_monitor, self.zap):
            if extra is not None:
                extra.close(0)
        self.ctx.term()

    def remove_files(self) -> None:
        """Remove the socket directory and the blob directory (idempotent)."""
        if self.directory is not None:
            endpoint.remove_ipc_dir(self.directory)
        if self.blobs is not None:
            self.blobs.close()  # the owner's own reads of stored blobs keep working


def bind(options: Options, address: str | None) -> Bound:
    """Make and bind the owner's sockets. ``address`` is None for private ipc sockets, or a
    ``tcp://host:port`` address (which needs credentials in ``options.keys``)."""
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    ctx.setsockopt(zmq.LINGER, 0)
    router = ctx.socket(zmq.ROUTER)
    xpub = ctx.socket(zmq.XPUB)
    router.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
    router.setsockopt(zmq.RCVHWM, 0)
    # A peer that does not read (a caching client gone idle) loses messages past this, instead
    # of making the owner buffer without bound.
    router.setsockopt(zmq.SNDHWM, max(options.hwm, ROUTER_HWM_FLOOR))
    # Plain XPUB: it reports a topic when its first subscriber comes and when its last one
    # goes, deduplicated by ZeroMQ per connection, so the owner's topic set stays exact
    # (verbose modes report every duplicate subscription and leak counts).
    xpub.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
    xpub.setsockopt(zmq.SNDHWM, options.hwm)
    xpub.setsockopt(zmq.LINGER, int(options.linger * 1000))
    bound = Bound(ctx, router, xpub, "", "", f"inproc://zkv-pub-{secrets.token_hex(6)}")
    try:
        if address is None:
            bound.directory, bound.endpoint, pub = endpoint.make_ipc_dir()
            bound.blobs = blobs.BlobDir.create(bound.directory.name, options.blob_threshold)
            router.bind(bound.endpoint)
            xpub.bind(pub)
            bound.pub_announce = pub
        else:
            ep = endpoint.parse(address)
            if ep.transport != "tcp":
                raise ValueError(f"serve() binds ipc sockets itself; pass None or tcp://, not "
                                 f"{address!r}")
            _secure(bound, auth.owner_keys(options.keys, address), options)
            router.bind(address)
            bound.endpoint = router.get_string(zmq.LAST_ENDPOINT)
            xpub.bind(f"tcp://{ep.host or '*'}:*")
            bound.pub_announce = xpub.get_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        xpub.bind(bound.inproc_pub)
    except BaseException:
        bound.close(0)
        bound.remove_files()
        raise
    return bound


def _secure(bound: Bound, keys: auth.OwnerKeys, options: Options) -> None:
    """Make both tcp sockets CURVE servers that let in only allowed client keys, with
    heartbeats so that silent peers are dropped."""
    bound.authenticator = auth.Authenticator(keys)
    bound.zap = bound.ctx.socket(zmq.REP)
    bound.zap.bind("inproc://zeromq.zap.01")  # before any CURVE socket binds
    beat = int(options.heartbeat * 1000)
    for sock in (bound.router, bound.xpub):
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key)
        sock.setsockopt(zmq.ZAP_DOMAIN, auth.ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never allow
        sock.setsockopt(zmq.HEARTBEAT_IVL, beat)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * beat)
    bound.monitor = auth.monitor(bound.router, MONITOR_EVENTS)
    bound.xpub_monitor = auth.monitor(bound.xpub, MONITOR_EVENTS & ~zmq.EVENT_DISCONNECTED)
