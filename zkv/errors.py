"""The exceptions zkv raises.

Every zkv exception derives from :class:`ZkvError`, and also from the builtin exception that
means the same thing, so that ``except TimeoutError`` or ``except ConnectionError`` works::

    ZkvError
     ├── ZkvConnectionError (ConnectionError)   the owner cannot be reached
     │    ├── NoOwnerError                      no owner was found to connect to
     │    ├── OwnerGoneError                    the owner died or closed its store
     │    └── AuthenticationError (PermissionError)  credentials missing/refused
     ├── ZkvTimeoutError (TimeoutError)         a request or a receive timed out
     ├── SerializationError
     │    ├── EncodeError (pickle.PicklingError)    a value cannot be pickled (names its type)
     │    └── DecodeError (pickle.UnpicklingError)  a value cannot be unpickled where it is read
     ├── MessageTooLargeError (ValueError)      a message is over the configured maximum size
     ├── StoreClosedError (RuntimeError)        the store was closed by this process
     ├── LockError (RuntimeError)               releasing a lock that is not held
     ├── ReentrancyError (RuntimeError)         a function the owner runs waited for the owner
     ├── SnapshotError (ValueError)             a snapshot file is corrupt, foreign or in use
     ├── ProtocolError                          a peer sent frames zkv does not understand
     └── RemoteError                            the owner failed; the cause cannot be carried back

Errors raised by user code that runs in the owner (the function given to ``modify`` or
``transact``) are re-raised in the caller as themselves, with the owner's traceback attached as
``__cause__`` (as :mod:`concurrent.futures` does). ``KeyError`` and ``TypeError`` keep their
builtin types too.
"""

from __future__ import annotations

import pickle

__all__ = [
    "AuthenticationError",
    "DecodeError",
    "EncodeError",
    "LockError",
    "MessageTooLargeError",
    "NoOwnerError",
    "OwnerGoneError",
    "ProtocolError",
    "ReentrancyError",
    "RemoteError",
    "SerializationError",
    "SnapshotError",
    "StoreClosedError",
    "ZkvConnectionError",
    "ZkvError",
    "ZkvTimeoutError",
]


class ZkvError(Exception):
    """Base class of every exception raised by zkv itself."""


class ZkvConnectionError(ZkvError, ConnectionError):
    """The owner of the store cannot be reached."""


class NoOwnerError(ZkvConnectionError):
    """No owner was found: nothing to connect to, and this process may not become one."""


class OwnerGoneError(ZkvConnectionError):
    """The owner process died or closed its store; the data it held is gone."""


class AuthenticationError(ZkvConnectionError, PermissionError):
    """A TCP peer's credentials are missing, wrong, or were refused by the owner."""


class ZkvTimeoutError(ZkvError, TimeoutError):
    """A request, a lock acquisition or a receive did not complete in time."""


class SerializationError(ZkvError):
    """A value could not be converted to or from its wire form."""


class EncodeError(SerializationError, pickle.PicklingError):
    """A value cannot be pickled; the message names its type. Nothing was changed."""


class DecodeError(SerializationError, pickle.UnpicklingError):
    """A value cannot be unpickled where it is read; the message carries the original reason."""


class MessageTooLargeError(ZkvError, ValueError):
    """A message is larger than the store's ``max_message_size``; it was not sent."""


class StoreClosedError(ZkvError, RuntimeError):
    """The store (or subscriber) was closed by this process and cannot be used any more."""


class LockError(ZkvError, RuntimeError):
    """A lock was released that this holder does not hold."""


class ReentrancyError(ZkvError, RuntimeError):
    """A function that the owner runs (given to ``modify`` or ``transact``) made a call that
    waits for the owner itself: it could never be answered (see :mod:`zkv.reentry`)."""


class SnapshotError(ZkvError, ValueError):
    """A snapshot file cannot be loaded (it is corrupt, truncated, not a zkv snapshot, from a
    newer zkv, or not private to this user) or is in use by another owner. The message names
    the file; an owner that meets one does not start."""


class ProtocolError(ZkvError):
    """A peer sent frames that do not follow the zkv protocol."""


class RemoteError(ZkvError):
    """The owner failed while serving a request, and the original exception could not be
    carried back. The message holds its type, text and the owner's traceback."""
