"""Settings of a store, from keyword arguments and environment variables.

====================  ========================  =======  ==========================================
option                environment variable      default  meaning
====================  ========================  =======  ==========================================
``timeout``           ``ZKV_TIMEOUT``           30.0     seconds a request may take before
                                                         :class:`~zkv.ZkvTimeoutError`
``hwm``               ``ZKV_HWM``               100000   high-water mark: messages queued per
                                                         subscriber before it loses some
``max_message_size``  ``ZKV_MAX_MESSAGE_SIZE``  1 GiB    largest message (bytes) a store accepts
``linger``            ``ZKV_LINGER``            1.0      seconds a closing process waits to
                                                         flush what it queued (publishes)
``keys``              ``ZKV_KEYS``              None     tcp only: CURVE credentials, a directory
                                                         made by ``zkv keygen`` (or
                                                         :class:`~zkv.auth.OwnerKeys` /
                                                         :class:`~zkv.auth.ClientKeys`)
``heartbeat``         ``ZKV_HEARTBEAT``         1.0      tcp only: seconds between ZeroMQ
                                                         heartbeats; a peer silent 3 times as
                                                         long is disconnected (owner: its session
                                                         ends; client: OwnerGoneError)
``blob_threshold``    ``ZKV_BLOB_THRESHOLD``    1 MiB    ipc only, set in the owner: frames of at
                                                         least this many bytes go between
                                                         processes through files in ``/dev/shm``
                                                         (:mod:`zkv.blobs`); 0 sends everything
                                                         through the sockets
``owner``             ``ZKV_OWNER``             embedded where a new store's data lives:
                                                         ``"embedded"`` in the process that
                                                         serves it, ``"process"`` in a dedicated
                                                         process it starts (its workers never
                                                         wait on its GIL)
``snapshot``          ``ZKV_SNAPSHOT``          None     set in the owner: a file it loads when it
                                                         starts, saves to every ``snapshot_every``
                                                         seconds (if something changed) and when
                                                         it closes (:mod:`zkv.snapshot`)
``snapshot_every``    ``ZKV_SNAPSHOT_EVERY``    60.0     seconds between saves of ``snapshot``
                                                         (``inf``: only when the owner closes)
====================  ========================  =======  ==========================================

Keyword arguments win over environment variables, which win over the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .auth import ClientKeys, KeysOption, OwnerKeys

__all__ = ["Options"]

_ENV = {
    "timeout": "ZKV_TIMEOUT",
    "hwm": "ZKV_HWM",
    "max_message_size": "ZKV_MAX_MESSAGE_SIZE",
    "linger": "ZKV_LINGER",
    "keys": "ZKV_KEYS",
    "heartbeat": "ZKV_HEARTBEAT",
    "blob_threshold": "ZKV_BLOB_THRESHOLD",
    "owner": "ZKV_OWNER",
    "snapshot": "ZKV_SNAPSHOT",
    "snapshot_every": "ZKV_SNAPSHOT_EVERY",
}
_FLOATS = ("timeout", "linger", "heartbeat", "snapshot_every")
_STRINGS = ("keys", "owner", "snapshot")
#: Where an owner's data lives: in the process that serves (``"embedded"``), or in a
#: dedicated process that it starts (``"process"``; see :mod:`zkv.owner.process`).
OWNERS = ("embedded", "process")
#: ZeroMQ takes linger in int32 milliseconds.
_MAX_LINGER = 3600.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Options:
    """Validated settings of one store (see the module docstring for each field)."""

    timeout: float = 30.0
    hwm: int = 100_000
    max_message_size: int = 1 << 30
    linger: float = 1.0
    keys: KeysOption = None
    heartbeat: float = 1.0
    blob_threshold: int = 1 << 20
    owner: str = "embedded"
    snapshot: str | os.PathLike[str] | None = None
    snapshot_every: float = 60.0

    def __post_init__(self) -> None:
        timeout = self.timeout
        if not _is_number(timeout) or not timeout > 0:  # NaN is not > 0
            raise ValueError(f"timeout must be a number of seconds > 0 (inf: wait as long as "
                             f"the owner lives), not {timeout!r}")
        linger = self.linger
        if not _is_number(linger) or not 0 <= linger <= _MAX_LINGER:
            raise ValueError(f"linger must be a number of seconds in [0, {_MAX_LINGER}], "
                             f"not {linger!r}")
        for name in ("hwm", "max_message_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if not isinstance(self.keys, (str, os.PathLike, OwnerKeys, ClientKeys, type(None))):
            raise TypeError(f"keys must be a directory made by `zkv keygen`, OwnerKeys or "
                            f"ClientKeys, not {type(self.keys).__name__}")
        value = self.blob_threshold
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"blob_threshold must be an int >= 0 (bytes; 0: off), not {value!r}")
        beat = self.heartbeat
        if not _is_number(beat) or not 0.01 <= beat <= 600:
            raise ValueError(f"heartbeat must be a number of seconds in [0.01, 600], not {beat!r}")
        if self.owner not in OWNERS:
            raise ValueError(f"owner must be one of {', '.join(map(repr, OWNERS))}, not "
                             f"{self.owner!r}")
        path = self.snapshot
        if path is not None and (not isinstance(path, (str, os.PathLike))
                                 or not isinstance(os.fspath(path), str) or not os.fspath(path)):
            raise ValueError(f"snapshot must be a file path (str or os.PathLike) or None, not "
                             f"{path!r}")
        every = self.snapshot_every
        if not _is_number(every) or not every > 0:  # NaN is not > 0
            raise ValueError(f"snapshot_every must be a number of seconds > 0 (inf: save only "
                             f"when the owner closes), not {every!r}")

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> Options:
        """Build options from ``overrides`` (keyword arguments), then the environment.

        Raises TypeError for an unknown option and ValueError for a bad value, naming it.
        """
        overrides = dict(overrides or {})
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"unknown zkv option(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(fields))}")
        values: dict[str, Any] = {}
        from_env: dict[str, str] = {}
        for name, var in _ENV.items():
            if name in overrides and overrides[name] is not None:
                values[name] = overrides[name]
            elif environ.get(var):
                raw = environ[var]
                if name in _STRINGS:
                    values[name] = raw
                    from_env[name] = f"{var}={raw}"
                    continue
                kind = float if name in _FLOATS else int
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
                from_env[name] = f"{var}={raw}"
        try:
            return cls(**values)
        except ValueError as exc:
            named = [setting for name, setting in from_env.items() if str(exc).startswith(name)]
            if named:
                raise ValueError(f"{named[0]}: {exc}") from None
            raise

