"""Agent processes: the children that do the measuring.

The benchmark forks its agents once, early, before the main process starts any thread, so
they inherit what only inheritance can share (``multiprocessing`` pipes and queues, the
Manager's proxy). The main process then sends each agent a function and its keyword arguments
over a private pipe; the agent calls ``fn(agent, **kwargs)`` and sends back the result.

A function may call :meth:`Agent.ready` once it is set up (subscribed, connected), so that the
main process can start its part (publishing, busy work) only when every agent is in place; it
may also read :meth:`Agent.stop_requested` for a message sent with :meth:`Agents.tell`.

Agents keep their clients (sockets, connections) between calls in :attr:`Agent.clients`, so
repetitions measure warm connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["ABORT", "Agent", "AgentError", "Agents", "NotAvailable", "detach"]

#: Sent by :meth:`Agents.abandon`: a function waiting for something should return early.
ABORT = "abort"

_READY = "ready"
_OK = "ok"
_ERROR = "error"
_NOT_AVAILABLE = "na"


def detach() -> None:
    """For the benchmark's helper processes: ignore Ctrl-C (the main process handles it and
    stops them), die at once on SIGTERM (not the main process's handler, inherited through
    fork), and, on Linux, die with the main process if it is killed outright."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class NotAvailable(Exception):
    """Raised by a measurement whose subject lacks the feature it measures (the row then
    says "not available" with this message)."""


class AgentError(Exception):
    """A measurement failed in an agent; the message is the agent's last traceback line and
    :attr:`details` the whole traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class Agent:
    """The agent's own view, passed to every function it runs."""

    def __init__(self, index: int, conn: multiprocessing.connection.Connection,
                 resources: dict[str, Any]) -> None:
        self.index = index
        self.resources = resources
        self.clients: dict[Any, Any] = {}
        self._conn = conn

    def ready(self) -> None:
        """Tell the main process this agent is set up for the current call."""
        self._conn.send((_READY, None))

    def message(self, timeout: float = 0.0) -> Any:
        """A message the main process sent with :meth:`Agents.tell`, or None."""
        if self._conn.poll(timeout):
            return self._conn.recv()
        return None

    def aborted(self) -> bool:
        """Whether the main process gave up on the current call (:meth:`Agents.abandon`)."""
        return bool(self.message() == ABORT)

    def client(self, key: Any, make: Callable[[], Any]) -> Any:
        """The client cached under ``key``, made by ``make()`` on first use."""
        found = self.clients.get(key)
        if found is None:
            found = self.clients[key] = make()
        return found

    def close(self) -> None:
        for client in self.clients.values():
            try:
                client.close()
            except Exception:
                pass
        self.clients.clear()


def _agent_main(index: int, conn: multiprocessing.connection.Connection,
                resources: dict[str, Any]) -> None:
    detach()
    agent = Agent(index, conn, resources)
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if request is None:
                return
            if not isinstance(request, tuple):  # ABORT or a message for a call that ended
                continue
            fn, kwargs = request
            try:
                result = fn(agent, **kwargs)
            except NotAvailable as exc:
                conn.send((_NOT_AVAILABLE, str(exc)))
            except BaseException as exc:
                lines = traceback.format_exception_only(type(exc), exc)
                conn.send((_ERROR, (lines[-1].strip(), traceback.format_exc())))
            else:
                conn.send((_OK, result))
    finally:
        agent.close()


class Agents:
    """``n`` agent processes forked now. Use :meth:`start` to give some of them a call, then
    :meth:`wait_ready` (if the call says ready), :meth:`done` / :meth:`results`."""

    def __init__(self, n: int, resources_for: Callable[[int], dict[str, Any]],
                 ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("fork")
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[Any] = []
        self._busy: list[int] = []
        self._pending: dict[int, Any] = {}
        self.broken: str | None = None
        for i in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_agent_main, args=(i, theirs, resources_for(i)),
                               name=f"zkv-bench-agent-{i}", daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)

    def __len__(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self, fn: Callable[..., Any], kwargs: list[dict[str, Any]]) -> None:
        """Call ``fn(agent, **kwargs[i])`` in agents 0 .. len(kwargs)-1."""
        if self.broken:
            raise AgentError(f"agents unusable: {self.broken}")
        if self._busy:
            raise RuntimeError("the previous call has not been collected")
        if len(kwargs) > len(self._procs):
            raise ValueError(f"{len(kwargs)} calls for {len(self._procs)} agents")
        self._pending = {}
        self._busy = list(range(len(kwargs)))
        for i, kw in enumerate(kwargs):
            self._conns[i].send((fn, kw))

    def tell(self, message: Any, among: Sequence[int] | None = None) -> None:
        """Send ``message`` to every busy agent, or those of ``among`` (read there with
        :meth:`Agent.message`)."""
        for i in self._busy if among is None else among:
            if i not in self._pending:
                self._conns[i].send(message)

    def _take(self, i: int, timeout: float) -> bool:
        conn = self._conns[i]
        if not conn.poll(timeout):
            return False
        try:
            self._pending[i] = conn.recv()
        except (EOFError, OSError):
            self._pending[i] = (_ERROR, (f"agent {i} died (exit code "
                                         f"{self._procs[i].exitcode})", ""))
        return True

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every busy agent called :meth:`Agent.ready` (or finished early, which
        :meth:`results` then reports)."""
        deadline = time.monotonic() + timeout
        for i in self._busy:
            while True:
                if not self._take(i, max(0.0, min(0.1, deadline - time.monotonic()))):
                    self._check_alive(i, deadline, "to get ready")
                    continue
                if self._pending[i][0] == _READY:
                    del self._pending[i]
                break

    def done(self, timeout: float = 0.0, among: Sequence[int] | None = None) -> bool:
        """Whether every busy agent (or those of ``among``) has finished its call (waits up
        to ``timeout``)."""
        deadline = time.monotonic() + timeout
        for i in self._busy if among is None else among:
            while i not in self._pending:
                if not self._take(i, max(0.0, deadline - time.monotonic())):
                    return False
                if self._pending[i][0] == _READY:
                    del self._pending[i]
        return True

    def results(self, timeout: float = 120.0) -> list[Any]:
        """The results of the current call, in agent order. Raises :class:`NotAvailable` or
        :class:`AgentError` (the first one) if an agent reported one."""
        deadline = time.monotonic() + timeout
        for i in self._busy:
            while i not in self._pending or self._pending[i][0] == _READY:
                self._pending.pop(i, None)
                if not self._take(i, max(0.0, min(0.1, deadline - time.monotonic()))):
                    self._check_alive(i, deadline, "to finish")
        busy, self._busy = self._busy, []
        out = []
        for i in busy:
            status, value = self._pending.pop(i)
            if status == _NOT_AVAILABLE:
                raise NotAvailable(value)
            if status == _ERROR:
                raise AgentError(*value)
            out.append(value)
        return out

    def _check_alive(self, i: int, deadline: float, what: str) -> None:
        if not self._procs[i].is_alive():
            self._pending[i] = (_ERROR, (f"agent {i} died (exit code "
                                         f"{self._procs[i].exitcode})", ""))
            return
        if time.monotonic() >= deadline:
            self.broken = f"agent {i} took too long {what}"
            self._busy = []
            raise AgentError(self.broken)

    def abandon(self, timeout: float = 30.0) -> None:
        """Give up on the current call: tell its agents to stop waiting, and collect and
        discard what they send back. Agents that do not answer make the pool unusable."""
        if not self._busy:
            return
        self.tell(ABORT)
        try:
            self.results(timeout)
        except (AgentError, NotAvailable):
            pass
        finally:
            self._busy = []

    @contextlib.contextmanager
    def session(self, fn: Callable[..., Any], kwargs: list[dict[str, Any]]) -> Iterator[Agents]:
        """:meth:`start` a call for the main process to take part in; if the block raises,
        the call is :meth:`abandon`-ed, so the next call finds the agents free."""
        self.start(fn, kwargs)
        try:
            yield self
        except BaseException:
            self.abandon()
            raise

    def call(self, fn: Callable[..., Any], kwargs: list[dict[str, Any]],
             timeout: float = 120.0) -> list[Any]:
        """:meth:`start` then :meth:`results`."""
        self.start(fn, kwargs)
        return self.results(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Ask every agent to exit; terminate those that do not (idempotent)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, 9)
                proc.join(1.0)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self._busy = [], [], []
