"""The table of operations is the one definition of each operation: the owner, both cores,
pipelines and the protocol docs follow it, and the short paths agree with it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from _raw import say_hello

import zkv
from zkv import codec, ops, wire
from zkv.ops import kinds
from zkv.state import Entry


class TestTable:
    """Codes are unique and fit the header; every property the docs list comes from it."""

    def test_codes(self) -> None:
        codes = [op.code for op in ops.OPS.values()]
        assert len(codes) == len(set(codes)) and all(0 < c < 256 for c in codes)
        assert ops.BY_CODE[ops.GET.code] is ops.GET

    def test_store_methods_use_the_table(self, kv: zkv.Store) -> None:
        """Each operation a client may send is reachable from the public API (a table entry
        nobody uses would be dead code)."""
        used = {"get", "set", "delete", "get_all", "keys", "len", "contains", "clear",
                "modify", "incr", "setdefault", "pop", "compare_and_set", "transact", "lock",
                "unlock", "publish", "stats", "get_many", "set_many", "expire", "ttl",
                "persist", "pipeline", "bye", "cache_watch", "cache_unwatch", "cache_sync",
                "delete_prefix", "scan", "save"}
        assert set(ops.OPS) == used


SAMPLES: dict[str, tuple[Any, ...]] = {
    "get": ("k",), "set": ("k", {"v": 1}, 2.5), "delete": ("k",), "get_all": ("p",),
    "keys": ("",), "delete_prefix": ("p\0",), "scan": (7, "p", 100),
    "len": (), "contains": ("k",), "clear": (), "modify": ("k", len, []), "incr": ("k", 2),
    "setdefault": ("k", [1]), "pop": ("k",), "compare_and_set": ("k", 1, 2),
    "transact": (len,), "lock": ("L", b"t" * 16, 1.5), "unlock": ("L", b"t" * 16),
    "publish": ("c", (1, "x")), "bye": (), "stats": (), "cache_watch": (["a", "b"],),
    "cache_unwatch": (["a"],), "cache_sync": (), "get_many": (["a", "b\0c"],),
    "set_many": ([("a", 1), ("b", object)], None), "expire": ("k", 3.0), "ttl": ("k",),
    "persist": ("k",), "save": ("/tmp/a.zkv",),
}


def _plain(kind: ops.Arg, value: Any) -> Any:
    """What an owner-side argument stands for, comparable with the client's argument."""
    if kind is kinds.VALUE:
        return value.load()
    if kind is kinds.DATA:
        return codec.loads(value)
    if kind is kinds.PREFIXES:
        return [v.decode() for v in value]
    if kind is kinds.ITEMS:
        return [(k, e.load() if isinstance(e, Entry) else e) for k, e in value]
    return value


@pytest.mark.parametrize("name", sorted(set(ops.OPS) - {"pipeline"}))
def test_what_a_client_encodes_the_owner_decodes(name: str) -> None:
    """For every operation, the owner decodes exactly the arguments the client encoded (the
    generic layout, and the packed ones)."""
    op = ops.OPS[name]
    args = SAMPLES[name]
    frames = op.encode(*args)
    request = wire.request(1, op.code, frames)
    _rid, code, _flags, got = wire.parse_request(request[0], request[1:])
    assert code == op.code
    decoded = [_plain(kind, v) for kind, v in zip(op.args, op.decode(got), strict=True)]
    assert decoded == list(args)


def test_a_set_without_ttl_is_packed() -> None:
    assert len(ops.SET.encode("k", 1, None)) == 1
    assert len(ops.SET.encode("k", 1, 5.0)) == 3
    assert len(ops.SET.encode("k", b"x" * 100_000, None)) == 4  # key, ttl, raw value (2)


@pytest.fixture
def dealer(kv: zkv.Store) -> Iterator[zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(kv.endpoint)
    say_hello(sock)
    yield sock
    sock.close()


def _ask(sock: zmq.Socket[Any], code: int, frames: list[Any]) -> tuple[int, list[bytes]]:
    sock.send_multipart(wire.request(7, code, frames))
    assert sock.poll(10_000)
    reply = sock.recv_multipart()
    _rid, status, _flags, _b, _a, results = wire.parse_reply(reply[0], reply[1:])
    return status, results


class TestShortPaths:
    """The owner's short path for get answers exactly as the table's get (run here through a
    pipeline, which takes the generic path)."""

    @pytest.mark.parametrize("key", ["small", "big", "missing", "héllo\udcff"])
    def test_get(self, kv: zkv.Store, dealer: zmq.Socket[Any], key: str) -> None:
        kv["small"] = {"a": 1}
        kv["big"] = b"x" * 200_000
        kv["héllo\udcff"] = "odd key"
        short = _ask(dealer, ops.GET.code, ops.GET.encode(key))
        index = b"".join(n.to_bytes(4, "little") for n in (ops.GET.code, 1))
        status, frames = _ask(dealer, ops.PIPELINE.code,
                              [index, *wire.pack_frames(ops.GET.encode(key))])
        assert status == wire.Status.OK
        sub = wire.unpack_frames(frames[1:])
        generic = (int.from_bytes(frames[0][:4], "little"), [bytes(f) for f in sub])
        assert short[0] == generic[0] and [bytes(f) for f in short[1]] == generic[1]

    def test_get_with_a_key_that_is_not_utf8(self, dealer: zmq.Socket[Any]) -> None:
        status, frames = _ask(dealer, ops.GET.code, [b"\xff\xfe"])
        assert status == wire.Status.ERROR
        assert isinstance(wire.decode_error(frames), zkv.ProtocolError)
