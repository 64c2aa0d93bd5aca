"""Only zkv peers can touch the data.

A connection that never completed HELLO cannot run any operation: whatever a non-zkv peer sends
to any socket the owner binds (DEALER, REQ, PUSH, PUB, XSUB and SUB peers, raw bytes on the unix
sockets, a STREAM socket on a tcp endpoint), including perfectly well-formed zkv requests for
every operation, leaves the data byte-identical: every key, every value and the change counter.

``make test`` runs a fixed (derandomized) set of over 20,000 hostile messages; ``make fuzz``
runs random rounds for ``ZKV_FUZZ_SECONDS`` (default 180) and prints what it tried.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zkv
from zkv import ops, wire
from zkv.testing import wait_for
from zkv.wire import Status

#: Seconds of random rounds (``make fuzz``); unset: the fixed set of ``make test``.
FUZZ_SECONDS = float(os.environ.get("ZKV_FUZZ_SECONDS", "0") or 0)
FIXED_SEED = 20261201
BARRIER_RID = 0xFFFF_FFF0

Snapshot = tuple[int, dict[str, bytes]]


def snapshot(client: zkv.Store) -> Snapshot:
    """The change counter and every key with its value's pickle: equal snapshots mean
    byte-identical data."""
    data = client.get_all()
    return client.stats()["version"], {k: pickle.dumps(v, 5) for k, v in sorted(data.items())}


def fill(store: zkv.Store) -> None:
    """Data of every shape, so that any operation that ran would show."""
    store.set_many({f"n{i}": i for i in range(50)})
    store["text"] = "héllo \0 wörld"
    store["blob"] = os.urandom(200_000)
    store["nested"] = {"a": [1, 2, {"b": (3, 4.5)}], "c": None}
    store["counter"] = 7
    store["token"] = b"x" * 100


# -- what hostile peers send -----------------------------------------------------------------------

def _samples(key: str, value: Any) -> dict[str, tuple[Any, ...]]:
    """Arguments a real client could send, for every operation of the table."""
    return {
        "get": (key,), "set": (key, value, None), "delete": (key,), "get_all": ("",),
        "keys": ("",), "len": (), "delete_prefix": ("n",), "scan": (0, "", 10),
        "contains": (key,), "clear": (), "modify": (key, str, None),
        "incr": (key, 1), "setdefault": ("new", value), "pop": (key,),
        "compare_and_set": (key, zkv.MISSING, value), "transact": (dict.clear,),
        "lock": ("L", b"t" * 16, None), "unlock": ("L", b"t" * 16),
        "publish": ("chan", value), "bye": (), "stats": (), "cache_watch": ([""],),
        "cache_unwatch": ([""],), "cache_sync": (), "get_many": ([key, "n2"],),
        "set_many": ([(key, value), ("n3", value)], 5.0), "expire": (key, 0.001),
        "ttl": (key,), "persist": (key,), "save": ("/nonexistent-zkv-dir/hostile.zkv",),
    }


def _well_formed(rng: random.Random) -> list[list[bytes]]:
    """Requests a real client would send (made by the table's own encoders), one for every
    operation, with keys that exist: the ones that write would do harm if they ran."""
    key = rng.choice(["n1", "text", "blob", "counter", "nested", "new"])
    samples = _samples(key, rng.random())
    out = []
    for op in ops.OPS.values():
        if op is ops.PIPELINE:
            frames = [b"".join(n.to_bytes(4, "little") for n in (ops.CLEAR.code, 0)),
                      *wire.pack_frames([])]
        else:
            frames = op.encode(*samples[op.name])
        out.append(wire.request(rng.randrange(1 << 32), op.code, frames))
    return out


def hostile_messages(rng: random.Random, count: int) -> Iterator[list[bytes]]:
    """``count`` messages: random frames, valid headers of every op code (with and without
    flag bits) followed by random frames, greetings that are not quite HELLOs, and well-formed
    requests for every operation that writes."""
    codes = list(range(256))
    while count > 0:
        kind = rng.randrange(5)
        if kind == 0:
            batch = [[rng.randbytes(rng.randrange(0, 80)) for _ in range(rng.randrange(1, 5))]]
        elif kind == 1:
            code = codes[count % 256]
            batch = [[wire.pack_header(rng.randrange(1 << 32), code),
                      *(rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(4)))]]
        elif kind == 2:
            batch = [[wire.HELLO_MAGIC[:rng.randrange(9)] + rng.randbytes(rng.randrange(12))],
                     [wire.HELLO_MAGIC + rng.randbytes(2) + b"{not json"],
                     [wire.pack_greeting(wire.HELLO_MAGIC, {"pid": os.getpid()}), b"extra"]]
        else:
            batch = _well_formed(rng)
        for message in batch:
            yield message
            count -= 1


def _dealer_barrier(sock: zmq.Socket[Any]) -> None:
    """A request after everything else on this DEALER, and its answer: the owner has handled
    all that came before it on the same pipe."""
    sock.send_multipart(wire.request(BARRIER_RID, ops.GET.code, [b"n1"]))
    deadline = time.monotonic() + 30
    while True:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), \
            "the owner stopped answering"
        reply = sock.recv_multipart()
        rid = wire.parse_reply(reply[0], reply[1:])[0]
        if rid == BARRIER_RID:
            return


class Attack:
    """Sends hostile traffic to one owner and counts what it sent, by kind of peer."""

    def __init__(self, ctx: zmq.Context[Any], store: zkv.Store, rng: random.Random) -> None:
        self.ctx = ctx
        self.store = store
        self.rng = rng
        self.sent: collections.Counter[str] = collections.Counter()
        self.must_refuse = 0  # messages that each reach the owner and are refused once

    def _peer(self, kind: int, address: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.connect(address)
        return sock

    def dealers(self, address: str, peers: int, each: int) -> None:
        for _ in range(peers):
            sock = self._peer(zmq.DEALER, address)
            try:
                for message in hostile_messages(self.rng, each):
                    sock.send_multipart(message)
                    self.sent["DEALER"] += 1
                    self.must_refuse += 1
                _dealer_barrier(sock)
                self.must_refuse += 1
            finally:
                sock.close()

    def reqs(self, address: str, peers: int) -> None:
        # A REQ peer puts an empty delimiter before the message and then waits for an answer
        # that never comes: one message per peer.
        for message in hostile_messages(self.rng, peers):
            sock = self._peer(zmq.REQ, address)
            sock.send_multipart(message)
            sock.close(linger=10_000)  # delivered before the socket goes
            self.sent["REQ"] += 1
            self.must_refuse += 1

    def unmatched(self, kinds: tuple[int, ...], address: str, each: int) -> None:
        """Socket types ZeroMQ turns away at the handshake (PUSH, PUB to the ROUTER; DEALER,
        PUSH, PUB, ROUTER to the XPUB)."""
        for kind in kinds:
            sock = self._peer(kind, address)
            for message in hostile_messages(self.rng, each):
                try:
                    sock.send_multipart(message, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                self.sent[zmq.SocketType(kind).name] += 1
            sock.close()

    def subscribers(self, address: str, each: int) -> None:
        """XSUB peers send raw (un)subscription messages and anything else; SUB peers
        subscribe to random topics, probes included."""
        xsub = self._peer(zmq.XSUB, address)
        sub = self._peer(zmq.SUB, address)
        try:
            for message in hostile_messages(self.rng, each):
                xsub.send_multipart([bytes([self.rng.choice((0, 1, 2))]) + message[0],
                                     *message[1:]])
                self.sent["XSUB"] += 1
                sub.setsockopt(zmq.SUBSCRIBE, self.rng.choice((b"w", b"k", b"c", b""))
                               + message[0][:40])
                self.sent["SUB"] += 1
        finally:
            xsub.close()
            sub.close()

    def raw(self, family: int, address: Any, connections: int) -> None:
        for _ in range(connections):
            with socket.socket(family, socket.SOCK_STREAM) as raw:
                raw.settimeout(5)
                raw.connect(address)
                try:
                    raw.sendall(self.rng.randbytes(self.rng.randrange(1, 3000)))
                    # Sometimes a valid ZMTP greeting first, then garbage.
                    raw.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00NULL" + bytes(16 + 20)
                                + self.rng.randbytes(200))
                except OSError:  # the owner may hang up first
                    pass
            self.sent["raw bytes"] += 1

    def streams(self, address: str, connections: int) -> None:
        """Raw bytes from a ZeroMQ STREAM socket (a plain tcp peer)."""
        for _ in range(connections):
            sock = self._peer(zmq.STREAM, address)
            try:
                routing_id = sock.getsockopt(zmq.ROUTING_ID)
                # A STREAM peer learns its connection's id from the first (empty) message.
                if sock.poll(2000):
                    routing_id = sock.recv_multipart()[0]
                for _ in range(20):
                    try:
                        sock.send_multipart([routing_id, self.rng.randbytes(
                            self.rng.randrange(1, 500))], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        break
                    self.sent["STREAM"] += 1
            finally:
                sock.close()


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _rounds() -> Iterator[int]:
    """The seeds to run: one fixed seed, or random seeds for FUZZ_SECONDS."""
    if not FUZZ_SECONDS:
        yield FIXED_SEED
        return
    end = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < end:
        yield random.SystemRandom().randrange(1 << 32)


def _check_untouched(store: zkv.Store, client: zkv.Store, attack: Callable[[Attack], None],
                     ctx: zmq.Context[Any], minimum: int) -> None:
    fill(client)
    total: collections.Counter[str] = collections.Counter()
    for seed in _rounds():
        before = snapshot(client)
        refused_before = store.stats()["refused"]
        run = Attack(ctx, store, random.Random(seed))
        attack(run)
        # The DEALERs' barriers show their messages have been handled.
        assert snapshot(client) == before, f"data changed (seed {seed})"
        # Everything that reached the owner was refused (so it has all been handled).
        expected = refused_before + run.must_refuse
        wait_for(lambda: store.stats()["refused"] >= expected,  # noqa: B023
                 timeout=60, what=f"every hostile message handled ({run.must_refuse} refusals "
                 f"expected; {store.stats()['refused'] - refused_before} so far)")
        assert snapshot(client) == before, f"data changed (seed {seed})"
        total += run.sent
        if FUZZ_SECONDS:
            print(f"seed {seed}: {sum(run.sent.values())} messages {dict(run.sent)}; data "
                  f"unchanged", flush=True)
    assert sum(total.values()) >= minimum, total
    # And the owner still serves real clients.
    client.set("after", 1)
    assert client.get("after") == 1
    print(f"hostile messages sent: {sum(total.values())} {dict(total)}")


@pytest.mark.timeout(0 if FUZZ_SECONDS else 120)
def test_ipc_owner_data_is_untouched(kv: zkv.Store, ctx: zmq.Context[Any]) -> None:
    """Every kind of non-zkv peer, to both ipc sockets of the owner."""
    router = kv.endpoint
    pub = router[:-1] + "p"

    def attack(run: Attack) -> None:
        run.dealers(router, peers=20, each=900)
        run.reqs(router, peers=300)
        run.unmatched((zmq.PUSH, zmq.PUB), router, each=200)
        run.unmatched((zmq.DEALER, zmq.PUSH, zmq.PUB, zmq.ROUTER), pub, each=100)
        run.subscribers(pub, each=500)
        run.raw(socket.AF_UNIX, router[len("ipc://"):], connections=30)
        run.raw(socket.AF_UNIX, pub[len("ipc://"):], connections=30)

    with zkv.connect(kv.endpoint) as client:
        _check_untouched(kv, client, attack, ctx, minimum=20_000)
        # Hostile subscribers left no trace once gone.
        wait_for(lambda: kv.stats()["topics"] == 0, timeout=30, what="hostile topics forgotten")


@pytest.mark.timeout(0 if FUZZ_SECONDS else 120)
def test_tcp_owner_data_is_untouched(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    """Raw bytes (STREAM), and ZeroMQ peers without CURVE keys, to both tcp sockets: all turned
    away before any message reaches the owner."""
    from zkv import keygen

    keygen.main([str(tmp_path / "keys")])
    owner = zkv.serve("tcp://127.0.0.1:0", keys=tmp_path / "keys")
    client = zkv.connect(owner.endpoint, keys=tmp_path / "keys" / "client")
    try:
        router = owner.endpoint
        pub = client._core.conn.pub_address  # the port the owner announced for publications

        def attack(run: Attack) -> None:
            run.streams(router, connections=40)
            run.streams(pub, connections=40)
            run.unmatched((zmq.DEALER, zmq.REQ), router, each=300)
            run.unmatched((zmq.SUB, zmq.XSUB), pub, each=300)
            for address in (router, pub):
                host, port = address[len("tcp://"):].rsplit(":", 1)
                run.raw(socket.AF_INET, (host, int(port)), connections=20)

        _check_untouched(owner, client, attack, ctx, minimum=2_000)
        assert owner.stats()["refused"] == 0  # nothing got as far as the owner's loop
    finally:
        client.close()
        owner.close()


def test_a_request_before_hello_is_answered_with_an_error(kv: zkv.Store,
                                                         ctx: zmq.Context[Any]) -> None:
    """A well-formed request from a connection that did not say HELLO: refused, counted, and
    answered with an error that says why."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(kv.endpoint)
    try:
        sock.send_multipart([wire.pack_header(5, ops.CLEAR.code)])
        assert sock.poll(30_000)
        rid, status, _flags, _before, _after, results = wire.parse_reply(
            *_split(sock.recv_multipart()))
    finally:
        sock.close()
    assert (rid, status) == (5, Status.ERROR)
    assert "HELLO" in str(wire.decode_error(results))
    assert kv.stats()["refused"] == 1


def _split(frames: list[bytes]) -> tuple[bytes, list[bytes]]:
    return frames[0], frames[1:]


class TestProtocolVersion:
    """HELLO carries a magic value and the protocol version both ways; peers of different
    versions refuse each other at once, with an error naming both versions."""

    def test_owner_refuses_a_client_of_another_version(self, kv: zkv.Store) -> None:
        script = textwrap.dedent("""
            import sys, zkv, zkv.wire
            zkv.wire.PROTOCOL_VERSION = 99
            try:
                zkv.connect(sys.argv[1], timeout=20)
            except zkv.ProtocolError as exc:
                print(exc)
                sys.exit(3)
        """)
        sessions = kv.stats()["sessions"]
        done = subprocess.run([sys.executable, "-c", script, kv.endpoint], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 3, done.stderr
        assert f"protocol {wire.PROTOCOL_VERSION}" in done.stdout
        assert "99" in done.stdout
        assert kv.stats()["sessions"] == sessions  # no session was opened

    def test_client_refuses_an_owner_of_another_version(self, tmp_path: Path) -> None:
        # A fake owner that answers every HELLO with the welcome of protocol 99.
        directory = tmp_path / f"{os.getpid()}-fake"
        directory.mkdir(mode=0o700)
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(f"ipc://{directory}/r")
        try:
            import threading

            def answer() -> None:
                if router.poll(20_000):
                    routing_id, _hello = router.recv_multipart()
                    router.send_multipart([routing_id, wire.pack_greeting(
                        wire.WELCOME_MAGIC, {"pid": os.getpid()}, version=99)])

            thread = threading.Thread(target=answer)
            thread.start()
            started = time.monotonic()
            with pytest.raises(zkv.ProtocolError) as info:
                zkv.connect(f"ipc://{directory}/r", timeout=30)
            thread.join()
            assert time.monotonic() - started < 15  # at once, not at the timeout
            assert "99" in str(info.value) and f"{wire.PROTOCOL_VERSION}" in str(info.value)
        finally:
            router.close()
            ctx.term()
