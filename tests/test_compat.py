"""zkv uses two things of pyzmq and libzmq that are not promised forever: pyzmq's compiled
``Socket.send`` (without its Python wrapper) and libzmq's ``ZMQ_SRCFD``. Each sits behind a
check that falls back to the public API; the store works either way. (``make compat`` runs
the suite with the oldest pyzmq that pyproject.toml allows.)"""

from __future__ import annotations

import types
from typing import Any

import pytest
import zmq

import zkv
from zkv import client as client_module
from zkv import sockets
from zkv.owner import sessions


def test_raw_send_falls_back_to_the_public_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq, "backend", types.SimpleNamespace(Socket=object()))
    assert sockets._find_raw_send() is zmq.Socket.send


def test_a_store_works_with_the_public_send(kv: zkv.Store, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    sent: list[int] = []

    def public_send(sock: zmq.Socket[Any], data: Any, flags: int = 0, copy: bool = True
                    ) -> Any:
        sent.append(1)
        return zmq.Socket.send(sock, data, flags, copy=copy)

    monkeypatch.setattr(sockets, "raw_send", public_send)
    monkeypatch.setattr(client_module, "raw_send", public_send)
    with zkv.connect(kv.endpoint) as client:
        client.set("a", {"x": 1})
        client.set("big", b"x" * 200_000)
        assert client.get("a") == {"x": 1} and len(client.get("big")) == 200_000
    assert sent  # the public path was the one taken


def test_without_srcfd_a_session_still_opens(caplog: pytest.LogCaptureFixture) -> None:
    class NoSrcfd:
        def get(self, option: Any) -> Any:
            raise zmq.ZMQError(zmq.EINVAL)

    assert sessions._connection_fd(NoSrcfd()) is None  # type: ignore[arg-type]
