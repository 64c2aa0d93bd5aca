"""Values as Redis strings, and keys as Redis key names. No I/O happens here.

A value is stored as one Redis string:

- an ``int`` (not a ``bool``) that fits in 64 bits as its decimal digits, so that ``INCRBY``
  works on it natively and any Redis client reads it as the number it is;
- anything else as one pickle (protocol 5, buffers in-band), made as zkv makes every value
  (:func:`zkv.codec.dumps`: cloudpickle for what the standard pickler refuses or what refers
  to ``__main__``). A pickle always starts with the byte ``0x80``.

Reading: a string that starts with ``0x80`` is unpickled; decimal digits (with an optional
``-``) are an ``int``; anything else, written by another client, is returned as ``bytes``.

Key names: the keys of namespace ``ns`` all start with the hash tag ``{ns}``, so that on a
Redis Cluster they live in one hash slot and multi-key operations (``get_many``,
``transact``, pipelines, scripts) work. A zkv key ``k`` is the Redis key ``{ns}:v:k`` (UTF-8,
surrogates passed through, any character allowed).
"""

from __future__ import annotations

import itertools
import operator
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

from .. import codec
from ..errors import DecodeError

__all__ = ["KeySpace", "dumps", "dumps_many", "glob_escape", "loads", "loads_many"]

_PROTOCOL = 5
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_PICKLE_MARK = 0x80
_first = operator.itemgetter(0)
_loads = pickle.loads
_dumps = pickle.dumps
_FIVE = itertools.repeat(_PROTOCOL)
#: Types :func:`dumps_many` pickles at C speed (no ``int``: those are stored as digits).
_C_PICKLED = frozenset({str, float, bool, type(None), bytes})


def dumps(value: Any) -> bytes:
    """``value`` as one Redis string. Raises :class:`~zkv.EncodeError` (naming its type)
    when it cannot be pickled."""
    kind = type(value)
    if kind is int and _INT_MIN <= value <= _INT_MAX:
        return str(value).encode()
    if kind in _C_PICKLED and (kind is not bytes or len(value) < codec.RAW_THRESHOLD):
        return _dumps(value, _PROTOCOL)
    frames = codec.dumps(value)
    if len(frames) == 1:
        return bytes(frames[0])
    if len(frames) == 2 and len(frames[0]) == 0:  # a large bytes value, sent raw by zkv
        return _dumps(bytes(frames[1]), _PROTOCOL)
    return _inband(value)  # out-of-band buffers: one pickle with the buffers in it


def _inband(value: Any) -> bytes:
    """One pickle of ``value``, buffers in-band (codec.dumps succeeded: it can be pickled)."""
    try:
        data: bytes | None = _dumps(value, _PROTOCOL)
    except Exception:
        data = None
    if data is None or b"main__" in data:
        data = cloudpickle.dumps(value, _PROTOCOL)
    return data


def dumps_many(values: Sequence[Any]) -> list[bytes]:
    """:func:`dumps` of each value (plain data at C speed)."""
    kinds = set(map(type, values))
    if kinds <= _C_PICKLED and (bytes not in kinds or max(
            (len(v) for v in values if type(v) is bytes), default=0) < codec.RAW_THRESHOLD):
        return list(map(_dumps, values, _FIVE))
    return list(map(dumps, values))


def loads(raw: bytes) -> Any:
    """The value held by a Redis string (see the module docstring). Raises
    :class:`~zkv.DecodeError` with the reason when a pickle cannot be loaded here."""
    if raw and raw[0] == _PICKLE_MARK:
        try:
            return _loads(raw)
        except Exception as exc:
            raise DecodeError(f"cannot unpickle value: {type(exc).__name__}: {exc}") from exc
    if raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit()):
        return int(raw)
    return bytes(raw)


def loads_many(raws: Sequence[bytes]) -> list[Any]:
    """:func:`loads` of each string (pickles only: at C speed)."""
    if raws and bytes(map(_first, raws)).count(_PICKLE_MARK) == len(raws):
        try:
            return list(map(_loads, raws))
        except Exception:
            pass  # loads names the one that fails
    return list(map(loads, raws))


def glob_escape(text: str) -> str:
    """``text`` with the characters that Redis's glob patterns treat specially escaped."""
    for char in "\\*?[]":
        text = text.replace(char, "\\" + char)
    return text


class KeySpace:
    """The Redis names of one namespace: data keys, bookkeeping keys and channels."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        tag = "{" + namespace + "}"
        self.tag = tag
        #: Data keys: ``{ns}:v:`` + key.
        self.value_prefix = tag + ":v:"
        self.value_prefix_bytes = _enc(self.value_prefix)
        #: The change counter (``Change.version``), bumped by every write made through zkv.
        self.version = tag + ":version"
        #: Sequence numbers of channels (a hash: channel -> messages published so far).
        self.seqs = tag + ":seq"
        #: A random id, set once: a new one means the server lost the namespace's state.
        self.epoch = tag + ":epoch"
        self.lock_prefix = tag + ":l:"
        self.scan_prefix = tag + ":scan:"
        self.scan_counter = tag + ":scans"
        #: Channels: published messages, change events of keys, welcomes, lock releases.
        self.channel_prefix = tag + ":c:"
        self.watch_prefix = tag + ":w:"
        #: Every watcher subscribes here: ``PUBSUB NUMSUB`` of it says whether anyone watches.
        self.watch_marker = tag + ":w"
        self.probe_prefix = tag + ":p:"
        self.release_prefix = tag + ":lr:"

    def key(self, key: str) -> str | bytes:
        """The Redis name of zkv key ``key``."""
        name = self.value_prefix + key
        return name if name.isascii() else _enc(name)

    def keys(self, keys: Iterable[str]) -> list[Any]:
        """The Redis names of many keys."""
        names = list(map(self.value_prefix.__add__, keys))
        if "".join(names).isascii():
            return names
        return [_enc(name) for name in names]

    def key_of(self, name: bytes) -> str:
        """The zkv key of a data key's Redis name."""
        return name[len(self.value_prefix_bytes):].decode("utf-8", "surrogatepass")

    def pattern(self, prefix: str) -> bytes:
        """A glob pattern of the data keys starting with ``prefix``."""
        return _enc(glob_escape(self.value_prefix + prefix) + "*")

    def channel(self, name: str) -> bytes:
        return _enc(self.channel_prefix + name)

    def channel_pattern(self, prefix: str) -> bytes:
        return _enc(glob_escape(self.channel_prefix + prefix) + "*")

    def watch_channel(self, key: str) -> bytes:
        return _enc(self.watch_prefix + key)

    def watch_pattern(self, prefix: str) -> bytes:
        return _enc(glob_escape(self.watch_prefix + prefix) + "*")

    def lock(self, name: str) -> bytes:
        return _enc(self.lock_prefix + name)

    def release_channel(self, name: str) -> bytes:
        return _enc(self.release_prefix + name)


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
