"""The public names of zkv are pinned: ``zkv.__all__``, the exception tree, the Store methods
named by the issue, and the names kept for code written against the original
``shared_memory`` module."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import pytest
from store_helpers import call_in_child

import zkv

EXPECTED_ALL = [
    "MISSING",
    "AsyncLock",
    "AsyncPipeline",
    "AsyncStore",
    "AuthenticationError",
    "Change",
    "DecodeError",
    "EncodeError",
    "GlobalKeyValueStore",
    "KeyValueStore",
    "Lock",
    "LockError",
    "Message",
    "MessageTooLargeError",
    "NoOwnerError",
    "Options",
    "OwnerGoneError",
    "Pipeline",
    "ProtocolError",
    "ReentrancyError",
    "RemoteError",
    "SerializationError",
    "SnapshotError",
    "Store",
    "StoreClosedError",
    "Subscriber",
    "ZkvConnectionError",
    "ZkvError",
    "ZkvTimeoutError",
    "__version__",
    "aconnect",
    "astore",
    "connect",
    "serve",
    "store",
]

STORE_METHODS = [
    "set", "get", "delete", "get_all", "modify", "incr", "decr", "setdefault", "pop",
    "compare_and_set", "transact", "lock", "get_many", "set_many", "pipeline", "close",
    "publish", "subscribe", "on_subscriber_receive", "__enter__", "__exit__",
    "__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "__len__",
    "keys", "items", "values", "update", "clear", "popitem",
]


class TestNames:
    """Exactly these names are public, and each of them exists."""

    def test_all_is_pinned(self) -> None:
        assert zkv.__all__ == EXPECTED_ALL

    def test_every_name_resolves(self) -> None:
        for name in EXPECTED_ALL:
            assert getattr(zkv, name) is not None, name
        with pytest.raises(AttributeError):
            zkv.no_such_name  # noqa: B018

    def test_store_methods(self) -> None:
        for name in STORE_METHODS:
            assert callable(getattr(zkv.Store, name)), name
        for name in ("endpoint", "is_owner", "closed", "options"):
            assert isinstance(getattr(zkv.Store, name), property), name

    def test_typed(self) -> None:
        assert (Path(zkv.__file__).parent / "py.typed").exists()

    def test_version(self) -> None:
        assert isinstance(zkv.__version__, str) and zkv.__version__.count(".") >= 1


class TestExceptionTree:
    """zkv errors derive from ZkvError and from the builtin that means the same thing."""

    @pytest.mark.parametrize(("exc", "bases"), [
        (zkv.ZkvConnectionError, (zkv.ZkvError, ConnectionError)),
        (zkv.NoOwnerError, (zkv.ZkvConnectionError, ConnectionError)),
        (zkv.OwnerGoneError, (zkv.ZkvConnectionError, ConnectionError)),
        (zkv.AuthenticationError, (zkv.ZkvConnectionError, PermissionError)),
        (zkv.ZkvTimeoutError, (zkv.ZkvError, TimeoutError)),
        (zkv.EncodeError, (zkv.SerializationError, pickle.PicklingError)),
        (zkv.DecodeError, (zkv.SerializationError, pickle.UnpicklingError)),
        (zkv.MessageTooLargeError, (zkv.ZkvError, ValueError)),
        (zkv.StoreClosedError, (zkv.ZkvError, RuntimeError)),
        (zkv.LockError, (zkv.ZkvError, RuntimeError)),
        (zkv.ReentrancyError, (zkv.ZkvError, RuntimeError)),
        (zkv.SnapshotError, (zkv.ZkvError, ValueError)),
        (zkv.ProtocolError, (zkv.ZkvError,)),
        (zkv.RemoteError, (zkv.ZkvError,)),
    ])
    def test_bases(self, exc: type, bases: tuple[type, ...]) -> None:
        assert issubclass(exc, bases)

    def test_missing_sentinel(self) -> None:
        assert repr(zkv.MISSING) == "zkv.MISSING" and not zkv.MISSING
        assert pickle.loads(pickle.dumps(zkv.MISSING)) is zkv.MISSING


def _original_style() -> object:
    from zkv import shared_memory  # as code written for the original module imports it

    shared_memory.set("from-child", shared_memory.get("from-owner") * 2)
    shared_memory.delete("gone")
    return sorted(shared_memory.get_all())


class TestCompat:
    """zkv.shared_memory, zkv.KeyValueStore and GlobalKeyValueStore.get_instance() are the
    process-wide store and its type, in the owner and in children."""

    def test_names_are_the_store(self, kv: zkv.Store) -> None:
        assert zkv.KeyValueStore is zkv.Store
        assert zkv.shared_memory is kv is zkv.store()
        assert zkv.GlobalKeyValueStore.get_instance() is kv
        assert isinstance(zkv.shared_memory, zkv.KeyValueStore)

    def test_original_api_in_a_child(self, kv: zkv.Store) -> None:
        kv.set("from-owner", 21)
        kv.set("gone", True)
        keys = call_in_child(mp.get_context("spawn"), _original_style)
        assert keys == ["from-child", "from-owner"]
        assert kv["from-child"] == 42
