"""Shared fixtures. Every test runs against a private owner and has a timeout (pyproject)."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator

import pytest

import zkv
from zkv.testing import private_store, wait_for

__all__ = ["wait_for"]


@pytest.fixture
def kv() -> Iterator[zkv.Store]:
    """A fresh owner in this (pytest) process; children started in the test find it through
    ZKV_ENDPOINT. Closed, and its sockets removed, after the test."""
    with private_store() as store:
        yield store


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def mp_context(request: pytest.FixtureRequest) -> mp.context.BaseContext:
    """Each multiprocessing start method in turn."""
    return mp.get_context(request.param)


@pytest.fixture(autouse=True)
def _no_leftover_endpoint() -> Iterator[None]:
    before = os.environ.get("ZKV_ENDPOINT")
    yield
    assert os.environ.get("ZKV_ENDPOINT") == before, "a test leaked ZKV_ENDPOINT"
