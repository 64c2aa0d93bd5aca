"""Two network namespaces joined by a veth pair stand for two hosts: `zkv serve` in one, clients
in the other, talking over a real network interface (not loopback). Needs root and iproute2;
skipped otherwise."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zkv import keygen

pytestmark = pytest.mark.netns

# RFC 2544's benchmarking range: a private link between our own two namespaces.
OWNER_ADDR, CLIENT_ADDR = "198.18.0.1", "198.18.0.2"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs `ip` from iproute2 (apt-get install iproute2)"
    return None


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """Two fresh namespaces (owner, client) linked by a veth pair; removed afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    owner_ns, client_ns = f"zkv-{tag}-owner", f"zkv-{tag}-client"
    owner_if, client_if = f"zo{tag}", f"zc{tag}"
    try:
        made = _ip("netns", "add", owner_ns)
        if made.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
        steps = [
            ("netns", "add", client_ns),
            ("link", "add", owner_if, "type", "veth", "peer", "name", client_if),
            ("link", "set", owner_if, "netns", owner_ns),
            ("link", "set", client_if, "netns", client_ns),
            ("-n", owner_ns, "addr", "add", f"{OWNER_ADDR}/30", "dev", owner_if),
            ("-n", client_ns, "addr", "add", f"{CLIENT_ADDR}/30", "dev", client_if),
            ("-n", owner_ns, "link", "set", owner_if, "up"),
            ("-n", client_ns, "link", "set", client_if, "up"),
            ("-n", owner_ns, "link", "set", "lo", "up"),
            ("-n", client_ns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield owner_ns, client_ns
    finally:
        _ip("link", "del", owner_if)  # in case it never moved into a namespace
        _ip("netns", "del", owner_ns)
        _ip("netns", "del", client_ns)


CLIENT = r"""
import json, sys, zkv
endpoint, keys, mode = sys.argv[1:4]
kv = zkv.connect(endpoint, keys=keys)
if mode == "work":
    kv["greeting"] = {"from": "the other host"}
    with kv.subscribe("news") as sub:
        kv.publish("news", [1, 2, 3])
        received = sub.receive(10)
    print(json.dumps({"get": kv["greeting"], "incr": kv.incr("n", 2), "received": received,
                      "sessions": kv.stats()["sessions"]}), flush=True)
elif mode == "hold":
    lock = kv.lock("shared")
    lock.acquire()
    print("held", flush=True)
    sys.stdin.readline()
    try:
        kv.get("x")
        print("no error", flush=True)
    except zkv.OwnerGoneError as exc:
        print("OwnerGoneError", exc, flush=True)
elif mode == "take":
    print("took" if kv.lock("shared").acquire(timeout=10) else "timed out", flush=True)
kv.close()
"""


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _serve(ns: str, keys: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        _in(ns, sys.executable, "-m", "zkv", "serve", "--bind", f"tcp://{OWNER_ADDR}:0",
            "--keys", str(keys)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ZKV_HEARTBEAT": "0.2"})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ZKV_ENDPOINT="):
        proc.kill()
        pytest.fail(f"zkv serve did not start in {ns}: {line} {proc.communicate()[1]}")
    return proc, line.split("=", 1)[1]


def _client(ns: str, endpoint: str, keys: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_in(ns, sys.executable, "-c", CLIENT, endpoint, str(keys), mode),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ZKV_HEARTBEAT": "0.2"})


class TestAcrossHosts:
    """The owner and its clients in different network namespaces, over a veth link."""

    @pytest.mark.timeout(90)
    def test_store_and_pubsub_between_namespaces(self, hosts: tuple[str, str],
                                                 tmp_path: Path) -> None:
        owner_ns, client_ns = hosts
        keygen.make_keys(tmp_path / "keys")
        client_keys = tmp_path / "copied-to-client"  # what an admin would copy over
        shutil.copytree(tmp_path / "keys" / "client", client_keys)
        owner, endpoint = _serve(owner_ns, tmp_path / "keys")
        try:
            assert endpoint.startswith(f"tcp://{OWNER_ADDR}:")
            out, err = _client(client_ns, endpoint, client_keys, "work").communicate(timeout=60)
            result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            assert result == {"get": {"from": "the other host"}, "incr": 2,
                              "received": [1, 2, 3], "sessions": 1}, err
            owner.send_signal(signal.SIGTERM)
            _out, log = owner.communicate(timeout=30)
            assert owner.returncode == 0, log
            assert f"from {CLIENT_ADDR}" in log  # the session came over the veth link
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.communicate()

    @pytest.mark.timeout(90)
    def test_link_down_ends_session_and_fails_client(self, hosts: tuple[str, str],
                                                     tmp_path: Path) -> None:
        """No FIN ever arrives when the network goes away: heartbeats tell both sides."""
        owner_ns, client_ns = hosts
        keys = tmp_path / "keys"
        keygen.make_keys(keys)
        owner, endpoint = _serve(owner_ns, keys)
        holder = _client(client_ns, endpoint, keys, "hold")
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "held"
            client_if = "zc" + client_ns.split("-")[1]
            assert _ip("-n", client_ns, "link", "set", client_if, "down").returncode == 0
            taker = _client(owner_ns, endpoint, keys, "take")
            out, err = taker.communicate(timeout=60)
            assert out.strip() == "took", err  # the silent session's lock was released
            holder.stdin.write("go\n")
            holder.stdin.flush()
            out, err = holder.communicate(timeout=60)
            assert out.startswith("OwnerGoneError"), err
        finally:
            for proc in (holder, owner):
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
