"""The ``zkv`` shell, run as a user runs it (``python -m zkv ...`` in a subprocess) against a
real owner: the ``kv`` fixture's owner in this process, or ``zkv serve`` owners in child
processes for the tests of ``zkv ls`` and of how the target owner is chosen."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import zkv
from zkv.cli import TOOLS
from zkv.cli_base import COMMANDS
from zkv.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
ZKV = [sys.executable, "-m", "zkv"]


def run(*args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``zkv ARGS``, to completion (the environment of this process unless ``env``)."""
    return subprocess.run([*ZKV, *args], capture_output=True, text=True, input=stdin,
                          env=dict(os.environ if env is None else env), timeout=30, check=False)


def ok(*args: str, env: Mapping[str, str] | None = None) -> str:
    """``zkv ARGS``'s stdout; the command must succeed and say nothing on stderr."""
    done = run(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


class Running:
    """A ``zkv`` command running in the background, its stdout and stderr read line by line."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*ZKV, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ if env is None else env))
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.stderr_text = ""
        self._pumps = [threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
                       for stream, lines in ((self.proc.stdout, self.out),
                                             (self.proc.stderr, self.err))]
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(stream: object, lines: queue.Queue[str]) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line on stdout within {timeout}s") from None

    def wait_live(self, timeout: float = 10.0) -> None:
        """Wait for the note that the subscription is live."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                note = self.err.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.stderr_text += note + "\n"
            if "listening" in note:
                return
        raise AssertionError(f"not live within {timeout}s; stderr: {self.stderr_text!r}")

    def interrupt(self) -> int:
        """Ctrl-C; returns the exit status. What it wrote on stderr is in ``stderr_text``."""
        self.proc.send_signal(signal.SIGINT)
        status = self.proc.wait(timeout=10)
        for pump in self._pumps:
            pump.join(timeout=10)  # the pipes close when the command exits
        while not self.err.empty():
            self.stderr_text += self.err.get_nowait() + "\n"
        return status

    def close(self) -> None:
        """Kill the command if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pump in self._pumps:
            pump.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for each in started:
        each.close()


class TestValues:
    """get / set / del / incr change and show the owner's data; exit status 1 for a missing
    key, with no traceback."""

    def test_set_reads_a_literal_text_json_or_stdin(self, kv: zkv.Store) -> None:
        ok("set", "doc", "{'a': [1, 2.5, None], 't': (1,), 's': {3}}")
        ok("set", "text", "--str", "hello world")
        ok("set", "js", "--json", '{"on": true, "off": null}')
        done = run("set", "piped", "-", stdin="[1, 2]\n")
        assert done.returncode == 0, done.stderr
        assert kv["doc"] == {"a": [1, 2.5, None], "t": (1,), "s": {3}}
        assert kv["text"] == "hello world"
        assert kv["js"] == {"on": True, "off": None}
        assert kv["piped"] == [1, 2]

    def test_get_prints_repr_or_json(self, kv: zkv.Store) -> None:
        kv.set("doc", {"a": [1, 2.5, None], "s": {3}, "b": b"\x00"})
        assert ok("get", "doc") == "{'a': [1, 2.5, None], 's': {3}, 'b': b'\\x00'}\n"
        expected = {"a": [1, 2.5, None], "s": {"$type": "set", "$repr": "{3}"},
                    "b": {"$type": "bytes", "$repr": "b'\\x00'"}}
        assert json.loads(ok("get", "doc", "--json")) == expected
        assert json.loads(ok("--json", "get", "doc")) == expected  # before the command too

    def test_missing_key_is_exit_status_1(self, kv: zkv.Store) -> None:
        done = run("get", "nope")
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == "zkv get: no key 'nope'\n"

    def test_a_value_that_cannot_be_shown_names_its_type(self, kv: zkv.Store) -> None:
        kv.set("lock", threading.Lock())  # the owner keeps it; it cannot travel
        done = run("get", "lock")
        assert done.returncode == 1
        assert done.stdout == "<_thread.lock that cannot be shown here>\n"
        assert "_thread.lock" in done.stderr and "Traceback" not in done.stderr
        shown = json.loads(run("get", "lock", "--json").stdout)
        assert shown["$type"] == "_thread.lock" and "cannot" in shown["$error"]

        # A class only the owner can import: the command says which module it lacks.
        module = types.ModuleType("zkv_owner_only")
        exec("class Thing:\n    pass\n", module.__dict__)
        sys.modules[module.__name__] = module
        try:
            kv.set("thing", module.Thing())
            done = run("get", "thing")
        finally:
            del sys.modules[module.__name__]
        assert done.returncode == 1
        assert done.stdout == "<a value that cannot be shown here>\n"
        assert "No module named 'zkv_owner_only'" in done.stderr
        assert "PYTHONPATH" in done.stderr and "Traceback" not in done.stderr

    def test_incr_prints_the_sum_and_refuses_a_non_number(self, kv: zkv.Store) -> None:
        assert ok("incr", "n") == "1\n"
        assert ok("incr", "n", "2.5") == "3.5\n"
        assert ok("incr", "n", "-1") == "2.5\n"
        assert kv["n"] == 2.5
        kv.set("word", "x")
        done = run("incr", "word")
        assert done.returncode == 1 and done.stderr.startswith("zkv incr: ")
        assert "str" in done.stderr and "Traceback" not in done.stderr
        assert kv["word"] == "x"

    def test_del_deletes_and_names_the_missing_keys(self, kv: zkv.Store) -> None:
        kv.set_many({"a": 1, "b": 2, "c": 3})
        done = run("del", "a", "zzz", "b")
        assert done.returncode == 1
        assert done.stderr == "zkv del: no key 'zzz'\n"
        assert sorted(kv) == ["c"]
        assert ok("del", "c") == "" and len(kv) == 0


class TestUsage:
    """A wrong command line exits with status 2 and says what is wrong on stderr."""

    @pytest.mark.parametrize(("args", "says"), [
        ([], "usage: zkv"),
        (["--json"], "a COMMAND is needed"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["get"], "the following arguments are required: KEY"),
        (["set", "k", "hello"], "--str"),
        (["set", "k", "--json", "{bad"], "not valid JSON"),
        (["incr", "k", "x"], "not an int or a float: 'x'"),
        (["get", "k", "--endpoint", "localhost:5555"], "--endpoint"),
        (["get", "k", "--timeout", "0"], "must be > 0 seconds"),
    ])
    def test_usage_errors(self, kv: zkv.Store, args: list[str], says: str) -> None:
        done = run(*args)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert says in done.stderr
        assert "Traceback" not in done.stderr
        assert "k" not in kv

    def test_version(self) -> None:
        assert ok("--version").startswith(f"zkv {zkv.__version__} (pyzmq ")


class TestKeys:
    """keys lists the keys sorted, filters by prefix, survives a closed pipe, and shows its
    progress on a terminal when it takes more than a second."""

    def test_sorted_filtered_and_unambiguous(self, kv: zkv.Store) -> None:
        kv.set_many({"b": 1, "a": 1, "job:2": 1, "job:1": 1, "two words": 1, "": 1})
        assert ok("keys").splitlines() == ["''", "a", "b", "job:1", "job:2", "'two words'"]
        assert ok("keys", "--prefix", "job:").splitlines() == ["job:1", "job:2"]
        assert json.loads(ok("keys", "--json")) == ["", "a", "b", "job:1", "job:2", "two words"]

    def test_closed_pipe_ends_quietly(self, kv: zkv.Store) -> None:
        kv.set_many({f"key{i:06d}": i for i in range(30_000)})  # far more than a pipe holds
        proc = subprocess.Popen([*ZKV, "keys"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == b"key000000\n"
        proc.stdout.close()  # as `head -1` does
        status = proc.wait(timeout=20)
        assert proc.stderr.read() == b""  # no traceback, no "Exception ignored"
        proc.stderr.close()
        assert status == 141  # as a program killed by SIGPIPE

    def test_progress_on_a_terminal(self, kv: zkv.Store) -> None:
        kv.set_many({f"key{i:06d}": i for i in range(30_000)})
        leader, follower = pty.openpty()
        proc = subprocess.Popen([*ZKV, "keys"], stdout=subprocess.PIPE, stderr=follower)
        os.close(follower)
        assert proc.stdout is not None
        try:
            # stdout is not read yet: the command blocks on a full pipe and, after a second,
            # shows how far it got on the terminal.
            seen = b""
            deadline = time.monotonic() + 15
            while b"/30,000" not in seen and time.monotonic() < deadline:
                if select.select([leader], [], [], 0.2)[0]:
                    seen += os.read(leader, 4096)
            assert b"zkv keys: writing " in seen and b"/30,000" in seen, seen
            assert len(proc.stdout.read().splitlines()) == 30_000
            assert proc.wait(timeout=20) == 0
            with contextlib.suppress(OSError):  # EIO once the command has closed the pty
                while select.select([leader], [], [], 0.2)[0]:
                    seen += os.read(leader, 4096)
            assert seen.endswith(b"\r\x1b[K"), seen[-80:]  # the line is erased at the end
        finally:
            proc.stdout.close()
            os.close(leader)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class TestOwnerInfo:
    """stats and ping report on the target owner."""

    def test_stats(self, kv: zkv.Store) -> None:
        kv.set_many({"a": 1, "b": 2})
        counters = json.loads(ok("stats", "--json"))
        assert counters["endpoint"] == kv.endpoint
        assert counters["pid"] == os.getpid()
        assert counters["keys"] == 2
        lines = dict(line.split(None, 1) for line in ok("stats").splitlines())
        assert lines["keys"] == "2" and lines["endpoint"] == kv.endpoint

    def test_ping(self, kv: zkv.Store) -> None:
        assert ok("ping").startswith(f"pong from pid {os.getpid()} at {kv.endpoint}: ")
        assert json.loads(ok("ping", "--json"))["ms"] > 0


class TestPubSub:
    """pub reaches subscribers in other processes; sub and watch print lines as messages and
    changes arrive, and end with status 0 and no traceback on Ctrl-C."""

    def test_pub(self, kv: zkv.Store) -> None:
        with kv.subscribe("news") as sub:
            ok("pub", "news", "{'id': 1}")
            ok("pub", "news", "--str", "plain text")
            assert sub.receive(timeout=10) == {"id": 1}
            assert sub.receive(timeout=10) == "plain text"

    def test_sub_exact_channels(self, kv: zkv.Store, running: list[Running]) -> None:
        cmd = Running("sub", "news", "alerts")
        running.append(cmd)
        cmd.wait_live()
        kv.publish("news", {"id": 1})
        kv.publish("newsletter", "not subscribed")
        kv.publish("alerts", "fire")
        assert cmd.line() == "news {'id': 1}"
        assert cmd.line() == "alerts 'fire'"
        assert cmd.interrupt() == 0
        assert "Traceback" not in cmd.stderr_text

    def test_sub_prefix_json(self, kv: zkv.Store, running: list[Running]) -> None:
        cmd = Running("sub", "job:", "--prefix", "--json")
        running.append(cmd)
        cmd.wait_live()
        kv.publish("job:1", {"n": 1})
        kv.publish("jobs", "no")
        kv.publish("job:2", {1, 2})
        assert json.loads(cmd.line()) == {"channel": "job:1", "seq": 1, "data": {"n": 1}}
        assert json.loads(cmd.line()) == {"channel": "job:2", "seq": 1,
                                          "data": {"$type": "set", "$repr": "{1, 2}"}}
        assert cmd.interrupt() == 0
        assert "Traceback" not in cmd.stderr_text

    def test_watch_prefix(self, kv: zkv.Store, running: list[Running]) -> None:
        cmd = Running("watch", "cfg.", "--prefix")
        running.append(cmd)
        cmd.wait_live()
        kv.set("cfg.rate", 3)
        kv.set("other", 1)
        kv.incr("cfg.n")
        kv.delete("cfg.rate")
        assert [cmd.line() for _ in range(3)] == ["set cfg.rate 3", "set cfg.n 1",
                                                  "delete cfg.rate"]
        assert cmd.interrupt() == 0
        assert "Traceback" not in cmd.stderr_text

    def test_watch_every_key_json(self, kv: zkv.Store, running: list[Running]) -> None:
        cmd = Running("watch", "--json")
        running.append(cmd)
        cmd.wait_live()
        kv.set("a", [1])
        event = json.loads(cmd.line())
        assert event == {"key": "a", "kind": "set", "value": [1], "version": event["version"]}
        assert event["version"] == kv.stats()["version"]
        assert cmd.interrupt() == 0


class TestExpiryCommands:
    """ttl, expire and persist, against a real owner."""

    def test_ttl_expire_persist(self, kv: zkv.Store) -> None:
        kv["a"] = 1
        assert ok("ttl", "a").strip() == "None"
        ok("expire", "a", "30")
        left = float(ok("ttl", "a"))
        assert 25 < left <= 30 and 25 < (kv.ttl("a") or 0) <= 30
        ok("persist", "a")
        assert kv.ttl("a") is None
        for args in (["ttl", "missing"], ["expire", "missing", "5"], ["persist", "missing"]):
            done = run(*args)
            assert done.returncode == 1 and "missing" in done.stderr, args
        done = run("expire", "a", "-1")
        assert done.returncode == 2 and "seconds" in done.stderr
        assert kv.ttl("a") is None  # the bad request changed nothing

    def test_set_with_ttl(self, kv: zkv.Store) -> None:
        ok("set", "s", "1", "--ttl", "30")
        assert kv["s"] == 1 and 25 < (kv.ttl("s") or 0) <= 30
        ok("set", "s", "2")  # a set without --ttl clears the expiry
        assert kv["s"] == 2 and kv.ttl("s") is None
        for bad in ("0", "-3", "inf", "nan"):
            done = run("set", "s", "3", "--ttl", bad)
            assert done.returncode == 2 and "ttl" in done.stderr, (bad, done.stderr)
        assert kv["s"] == 2 and kv.ttl("s") is None  # the bad requests changed nothing


class TestMonitor:
    """monitor prints the requests the owner serves, as it serves them, until Ctrl-C."""

    def test_monitor(self, kv: zkv.Store, running: list[Running]) -> None:
        cmd = Running("monitor", "--json")
        running.append(cmd)
        cmd.wait_live()
        with zkv.connect(kv.endpoint) as client:
            client.set("k", 1)
            client.incr("n")
            client.get("missing")
            events = [json.loads(cmd.line()) for _ in range(3)]
        assert [(e["op"], e["key"], e["status"]) for e in events] == [
            ("set", "k", "ok"), ("incr", "n", "ok"), ("get", "missing", "none")]
        assert {e["pid"] for e in events} == {os.getpid()}
        assert cmd.interrupt() == 0
        assert "Traceback" not in cmd.stderr_text
        wait_for(lambda: not kv._core.owner.fanout.monitored, timeout=10,  # type: ignore
                 what="the owner to stop describing requests")


# -- the target owner: several owners, in child processes -----------------------------------

@pytest.fixture
def private_env() -> Iterator[dict[str, str]]:
    """An environment whose owners live in a runtime directory of their own (short enough
    for unix socket paths), with no ZKV_ENDPOINT."""
    directory = tempfile.mkdtemp(prefix="zkv-cli-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    env["ZKV_RUNTIME_DIR"] = directory
    yield env
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def owners(private_env: dict[str, str]) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    """Start ``zkv serve`` owners with ``start(n)``; they are stopped after the test."""
    started: list[tuple[subprocess.Popen[str], str]] = []
    yield started
    for proc, _endpoint in started:
        proc.send_signal(signal.SIGINT)
    for proc, _endpoint in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def start_owner(env: Mapping[str, str], into: list[tuple[subprocess.Popen[str], str]]) -> str:
    proc = subprocess.Popen([*ZKV, "serve", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(env))
    assert proc.stdout is not None
    into.append((proc, ""))
    ready = select.select([proc.stdout], [], [], 20)[0]
    assert ready, "zkv serve did not announce its endpoint"
    first = proc.stdout.readline().strip()
    assert first.startswith("ZKV_ENDPOINT="), first
    endpoint = first.split("=", 1)[1]
    into[-1] = (proc, endpoint)
    return endpoint


class TestTarget:
    """The target is --endpoint, else ZKV_ENDPOINT, else the only live owner of this user;
    anything else is a clear error. ls lists the live owners."""

    def test_the_only_owner_is_found(self, private_env: dict[str, str],
                                     owners: list[tuple[subprocess.Popen[str], str]]) -> None:
        start_owner(private_env, owners)
        ok("set", "a", "1", env=private_env)
        assert ok("get", "a", env=private_env) == "1\n"

    def test_several_owners(self, private_env: dict[str, str],
                            owners: list[tuple[subprocess.Popen[str], str]]) -> None:
        first = start_owner(private_env, owners)
        second = start_owner(private_env, owners)
        ok("set", "x", "1", "--endpoint", first, env=private_env)
        with zkv.connect(second) as client:  # one client process of the second owner
            client.set("y", 2)
            client.set("z", 3)
            rows = json.loads(ok("ls", "--json", env=private_env))
        by_endpoint = {row["endpoint"]: row for row in rows}
        assert set(by_endpoint) == {first, second}
        assert [by_endpoint[e]["pid"] for e in (first, second)] == [p.pid for p, _e in owners]
        assert (by_endpoint[first]["keys"], by_endpoint[first]["clients"]) == (1, 0)
        assert (by_endpoint[second]["keys"], by_endpoint[second]["clients"]) == (2, 1)
        assert all(row["uptime"] >= 0 and row["error"] is None for row in rows)

        table = ok("ls", env=private_env).splitlines()
        assert table[0].split() == ["PID", "UPTIME", "KEYS", "CLIENTS", "ENDPOINT"]
        assert [line.split()[0] for line in table[1:]] == [str(p.pid) for p, _e in owners]

        done = run("get", "x", env=private_env)
        assert done.returncode == 1 and done.stdout == ""
        assert "2 live zkv owners" in done.stderr and "--endpoint" in done.stderr
        for proc, endpoint in owners:
            assert f"pid {proc.pid}" in done.stderr and endpoint in done.stderr
        assert ok("get", "x", "-e", first, env=private_env) == "1\n"
        assert ok("get", "x", env={**private_env, "ZKV_ENDPOINT": first}) == "1\n"

    def test_no_owner(self, private_env: dict[str, str]) -> None:
        assert run("set", "x", "bare word", env=private_env).returncode == 2  # usage first
        done = run("get", "x", env=private_env)
        assert done.returncode == 1 and done.stdout == ""
        assert "no live zkv owner" in done.stderr and "zkv serve" in done.stderr
        assert json.loads(ok("ls", "--json", env=private_env)) == []
        listing = run("ls", env=private_env)
        assert (listing.returncode, listing.stdout) == (0, "")
        assert "no live zkv owner" in listing.stderr

    def test_stale_zkv_endpoint(self, private_env: dict[str, str]) -> None:
        gone = f"ipc://{private_env['ZKV_RUNTIME_DIR']}/999999999-0badc0de/r"
        done = run("get", "x", env={**private_env, "ZKV_ENDPOINT": gone})
        assert done.returncode == 1
        assert f"ZKV_ENDPOINT={gone} names an owner that is gone" in done.stderr


def test_every_command_is_documented() -> None:
    page = (ROOT / "docs" / "cli.md").read_text()
    for name in [*COMMANDS, *TOOLS]:
        assert f"`zkv {name}" in page, f"docs/cli.md does not describe zkv {name}"


def test_lines_arrive_before_ctrl_c(kv: zkv.Store, running: list[Running]) -> None:
    """A reader of a pipe gets each line as it is printed, not when the command ends."""
    cmd = Running("sub", "tick")
    running.append(cmd)
    cmd.wait_live()
    for n in range(3):
        kv.publish("tick", n)
        assert cmd.line() == f"tick {n}"
    assert cmd.proc.poll() is None  # still running
    assert cmd.interrupt() == 0
