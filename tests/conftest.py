"""Shared fixtures. Every test runs against a private store and has a timeout (pyproject).

The behavioural suites of the store -- modules marked ``pytestmark = pytest.mark.contract``
-- run against every backend: their ``kv`` fixture is a zkv owner (``[zkv]``) and then a
store on a private ``redis-server`` (``[redis]``). A test of such a module that checks
something only a zkv owner gives is marked ``@pytest.mark.zkv_only("why")``: its Redis twin is
skipped with that reason, visibly. When Redis cannot be started the Redis twins are skipped
with the install command; under ``CI=true`` the run then fails.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import multiprocessing.forkserver
import os
from collections.abc import Iterator
from typing import Any

import pytest
from store_helpers import is_redis

import zkv
from zkv.backends.redis_server import INSTALL, RedisServer, RedisUnavailable
from zkv.testing import private_store, wait_for

__all__ = ["BACKENDS", "is_redis", "wait_for"]

BACKENDS = ("zkv", "redis")
#: The beginning of the reason of a Redis test skipped because Redis is missing.
UNAVAILABLE = "Redis unavailable"
_namespaces = itertools.count(1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kv" not in metafunc.fixturenames or \
            metafunc.definition.get_closest_marker("contract") is None:
        return
    only = metafunc.definition.get_closest_marker("zkv_only")
    redis_marks = [] if only is None else \
        [pytest.mark.skip(reason="zkv only: " + (only.args[0] if only.args else ""))]
    metafunc.parametrize("kv", [pytest.param("zkv", id="zkv"),
                                pytest.param("redis", id="redis", marks=redis_marks)],
                         indirect=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session (unix socket, no persistence); each test
    gets a namespace of its own in it."""
    server = RedisServer()
    try:
        server.start()
    except RedisUnavailable as exc:
        pytest.skip(f"{UNAVAILABLE}: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _redis_store(server: RedisServer) -> Iterator[zkv.Store]:
    """A store in a fresh namespace of ``server``, exported in ZKV_ENDPOINT (children find
    it as they find an owner) and made this process's zkv.store()."""
    namespace = f"t{next(_namespaces)}.{os.getpid()}"
    before = os.environ.get("ZKV_ENDPOINT")
    os.environ["ZKV_ENDPOINT"] = server.url(namespace, lease=2)
    try:
        store = zkv.store()
        try:
            yield store
        finally:
            store.close()
            client = server.client()
            try:
                names = client.keys("{" + namespace + "}*")
                if names:
                    client.delete(*names)
            finally:
                client.close()
    finally:
        if before is None:
            os.environ.pop("ZKV_ENDPOINT", None)
        else:
            os.environ["ZKV_ENDPOINT"] = before


@pytest.fixture
def kv(request: pytest.FixtureRequest) -> Iterator[zkv.Store]:
    """A fresh store: by default an owner in this (pytest) process; in the contract suites
    also (``[redis]``) a namespace of a private redis-server. Children started in the test
    find it through ZKV_ENDPOINT. Closed, and its sockets or keys removed, after the test."""
    backend = getattr(request, "param", "zkv")
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        yield from _redis_store(server)
        return
    with private_store() as store:
        yield store


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def mp_context(request: pytest.FixtureRequest) -> Iterator[mp.context.BaseContext]:
    """Each multiprocessing start method in turn. A forkserver keeps the environment it
    started with, so for a Redis store (whose URL children find in ZKV_ENDPOINT) it is
    started afresh, and stopped after the test."""
    restart = request.param == "forkserver" and "kv" in request.fixturenames and \
        getattr(getattr(request.node, "callspec", None), "params", {}).get("kv") == "redis"
    if restart:
        request.getfixturevalue("kv")  # (ZKV_ENDPOINT is set from here on)
        _stop_forkserver()
    yield mp.get_context(request.param)
    if restart:
        _stop_forkserver()


def _stop_forkserver() -> None:
    server: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    server._stop()


@pytest.fixture(autouse=True)
def _no_leftover_endpoint() -> Iterator[None]:
    before = os.environ.get("ZKV_ENDPOINT")
    yield
    assert os.environ.get("ZKV_ENDPOINT") == before, "a test leaked ZKV_ENDPOINT"


# -- CI: the Redis twins must run ---------------------------------------------------------------

_unavailable: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple) and \
            UNAVAILABLE in str(report.longrepr[2]):
        _unavailable.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unavailable and os.environ.get("CI", "").lower() == "true":
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"CI=true: {len(_unavailable)} Redis tests were skipped "
                                f"(Redis unavailable); install it: {INSTALL}", red=True)
        session.exitstatus = 1
