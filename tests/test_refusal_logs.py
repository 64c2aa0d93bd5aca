"""What the owner refuses is counted in ``stats()`` and logged with a rate limit: a warning for
each of the first 10 refusals, then one for every 1000th, so that a peer sending garbage
cannot flood the owner's log (docs/reliability.md, docs/security.md)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

import zkv
from zkv import keygen
from zkv.auth import ClientKeys
from zkv.testing import wait_for

LOOPBACK = "tcp://127.0.0.1:0"


def _numbers(caplog: pytest.LogCaptureFixture, logger: str, pattern: str) -> list[int]:
    """The running counts that the warnings of ``logger`` matching ``pattern`` carry."""
    return [int(m.group(1)) for r in caplog.records
            if r.name == logger and r.levelno == logging.WARNING
            and (m := re.search(pattern, r.getMessage()))]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context for the peers that get refused (not zkv's)."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(0)


class TestRefusedRequests:
    """Requests the owner cannot parse: counted in ``refused``, and logged (logger
    ``zkv.owner``) for the 1st to 10th, then the 1000th, 2000th..."""

    def test_first_ten_then_every_thousandth(self, kv: zkv.Store, ctx: zmq.Context[Any],
                                             caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.WARNING, logger="zkv.owner")
        peer = ctx.socket(zmq.DEALER)
        peer.linger = 0
        peer.connect(kv.endpoint)
        try:
            for _ in range(2001):
                peer.send_multipart([b"\x01\x02"])  # no valid header: refused, not answered
            wait_for(lambda: kv.stats()["refused"] == 2001, timeout=30, what="2001 refusals")
        finally:
            peer.close()
        with zkv.connect(kv.endpoint) as client:  # and the owner serves on
            client.set("k", 1)
        assert _numbers(caplog, "zkv.owner", r"refused a message \((\d+) so far\)") == \
            [*range(1, 11), 1000, 2000]


class TestRefusedConnections:
    """tcp peers refused at the handshake: counted in ``refused_auth``, and logged with their
    address for the first 10 (an unknown client key: logger ``zkv.auth``; no CURVE at all:
    logger ``zkv.owner``), then only every 1000th."""

    @pytest.fixture
    def tcp_owner(self, tmp_path: Path) -> Iterator[tuple[zkv.Store, Path]]:
        directory = tmp_path / "keys"
        keygen.make_keys(directory)
        with zkv.serve(LOOPBACK, keys=directory) as owner:
            yield owner, directory

    def test_unknown_keys(self, tcp_owner: tuple[zkv.Store, Path],
                          caplog: pytest.LogCaptureFixture) -> None:
        owner, directory = tcp_owner
        caplog.set_level(logging.WARNING, logger="zkv.auth")
        server_key = zmq.auth.load_certificate(directory / "server.key")[0]
        for _ in range(12):
            stranger = ClientKeys(server_key, *zmq.curve_keypair())
            with pytest.raises(zkv.AuthenticationError):
                zkv.connect(owner.endpoint, keys=stranger)
        wait_for(lambda: owner.stats()["refused_auth"] >= 12, what="12 refusals")
        assert _numbers(caplog, "zkv.auth", r"\((\d+) refused so far\)") == list(range(1, 11))
        assert all("from 127.0.0.1" in r.getMessage() for r in caplog.records
                   if r.name == "zkv.auth")

    def test_peers_without_curve(self, tcp_owner: tuple[zkv.Store, Path],
                                 ctx: zmq.Context[Any],
                                 caplog: pytest.LogCaptureFixture) -> None:
        owner, directory = tcp_owner
        caplog.set_level(logging.WARNING, logger="zkv.owner")
        for _ in range(12):
            peer = ctx.socket(zmq.DEALER)
            peer.linger = 0
            peer.connect(owner.endpoint)
            peer.send(b"let me in", zmq.NOBLOCK)
            before = owner.stats()["refused_auth"]
            wait_for(lambda before=before: owner.stats()["refused_auth"] > before,
                     what="the handshake refused")
            peer.close()
        assert _numbers(caplog, "zkv.owner", r"handshake failed.*; (\d+) so far\)") == \
            list(range(1, 11))
        with zkv.connect(owner.endpoint, keys=directory / "client") as client:
            client.set("k", 1)  # and the owner serves on

    def test_handshake_refusals_say_what_failed(self, tcp_owner: tuple[zkv.Store, Path],
                                              ctx: zmq.Context[Any],
                                              caplog: pytest.LogCaptureFixture) -> None:
        owner, _directory = tcp_owner
        caplog.set_level(logging.WARNING, logger="zkv.owner")
        peer = ctx.socket(zmq.DEALER)
        peer.linger = 0
        peer.connect(owner.endpoint)
        try:
            peer.send(b"let me in", zmq.NOBLOCK)
            wait_for(lambda: owner.stats()["refused_auth"] > 0, what="the handshake refused")
        finally:
            peer.close()
        refusals = [r.getMessage() for r in caplog.records
                    if r.name == "zkv.owner" and "handshake failed" in r.getMessage()]
        # libzmq reports a failed handshake with the owner's endpoint only: the log says what
        # failed, without the peer's address (docs/security.md says so).
        assert refusals and all("CURVE handshake failed" in message for message in refusals)
