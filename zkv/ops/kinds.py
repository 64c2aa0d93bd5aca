"""How the arguments and results of operations travel: an :class:`Arg` or :class:`Result`
says how a value is encoded by a client, decoded by the owner, and passed in the owner's own
process. :mod:`zkv.ops` builds its table from these kinds."""

from __future__ import annotations

import dataclasses
import math
import pickle
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from .. import codec, wire
from ..codec import Frame
from ..errors import DecodeError, EncodeError, ProtocolError
from ..state import MISSING, Entry, check_ttl
from .context import Context, Pickled

__all__ = ["BYTES", "DATA", "ENTRY", "FOUND", "INT", "ITEMS", "ITEM_SECTIONS", "JSON", "KEY",
           "KEYS",
           "KEY_LIST", "MANY", "NAME", "NOTHING", "NUMBER", "OBJECT", "PICKLE", "PREFIXES",
           "SEQ", "TIMEOUT", "TTL", "VALUE", "Arg", "Result"]


@dataclasses.dataclass(frozen=True)
class Arg:
    """How one argument travels: ``encode`` (client: value -> frames), ``decode`` (owner:
    frames -> what ``apply`` gets; raises ProtocolError or DecodeError), ``local`` (owner-local:
    value -> what ``apply`` gets). ``single``: always exactly one frame. ``key``: the argument
    is a key of the store, or ``keys`` a list of them (for the read cache)."""

    name: str
    single: bool
    encode: Callable[[Any], list[Frame]]
    decode: Callable[[list[Any]], Any]
    local: Callable[[Any], Any]
    key: bool = False
    keys: bool = False


def _same(value: Any) -> Any:
    return value


def _one_str(frames: list[Any]) -> str:
    return wire.key_str(frames[0])


def _one_bytes(frames: list[Any]) -> bytes:
    return bytes(frames[0])


def _str_frame(value: str) -> list[Frame]:
    return [wire.key_bytes(value)]


_TTL = struct.Struct("<d")


def _encode_ttl(ttl: float | None) -> list[Frame]:
    return [b"" if ttl is None else _TTL.pack(ttl)]


def _decode_ttl(frames: list[Any]) -> float | None:
    raw = bytes(frames[0])
    if not raw:
        return None
    if len(raw) != _TTL.size:
        raise ProtocolError(f"bad ttl of {len(raw)} bytes")
    return check_ttl(_TTL.unpack(raw)[0])


def _encode_timeout(timeout: float | None) -> list[Frame]:
    return [wire.encode_json(timeout)]


def _decode_timeout(frames: list[Any]) -> float | None:
    value = wire.decode_json(frames[0])
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value >= 0):
        raise ValueError(f"a lock timeout must be null or a number >= 0, not {value!r}")
    return None if value is None or math.isinf(value) else float(value)


_INT = struct.Struct("<q")


def _encode_int(value: int) -> list[Frame]:
    return [_INT.pack(value)]


def _decode_int(frames: list[Any]) -> int:
    raw = bytes(frames[0])
    if len(raw) != _INT.size:
        raise ProtocolError(f"bad integer of {len(raw)} bytes")
    return int(_INT.unpack(raw)[0])


def _encode_keys(keys: Sequence[str]) -> list[Frame]:
    joined = wire.join_keys(keys)  # one frame, split at C speed: the usual case
    return [joined] if joined is not None else wire.pack_frames(wire.keys_bytes(keys))


def _decode_keys(frames: list[Any]) -> list[str]:
    if len(frames) == 1:
        return wire.split_keys(frames[0])
    return wire.keys_str(wire.unpack_frames(frames))


def _encode_items(items: Sequence[tuple[str, Any]]) -> list[Frame]:
    """Plain values (the usual batch): the keys joined and one pickle of the values (2
    frames). Else: frame counts (empty: one frame each), packed keys, packed value frames."""
    keys = [key for key, _value in items]
    joined = wire.join_keys(keys)
    if joined is not None:
        plain = codec.dumps_plain([value for _key, value in items])
        if plain is not None:
            return [joined, plain]
    counts, values = codec.dumps_many([value for _key, value in items])
    return [counts, *wire.pack_frames(wire.keys_bytes(keys)), *wire.pack_frames(values)]


def _decode_items(frames: list[Any]) -> list[tuple[str, Entry]]:
    if len(frames) == 2:  # plain values: read by an unpickler that loads no global
        names = wire.split_keys(frames[0])
        try:
            values = codec.loads_plain(frames[1], len(names))
        except DecodeError as exc:
            raise ProtocolError(f"set_many: {exc}") from None
        return list(zip(names, Entry.many_from_objects(values), strict=True))
    if len(frames) < 5:
        raise ProtocolError("set_many needs an index, keys and values")
    names = wire.keys_str(wire.unpack_frames(frames[1:3]))
    values = wire.unpack_frames(frames[3:])
    if not frames[0]:
        if len(values) != len(names):
            raise ProtocolError("set_many has not one value per key")
        return list(zip(names, Entry.many_from_frames(values), strict=True))
    counts = wire.read_index(frames[0], "I", "set_many index")
    if len(counts) != len(names) or sum(counts) != len(values) or 0 in counts:
        raise ProtocolError("set_many index does not match its frames")
    entries = []
    at = 0
    for n in counts:
        entries.append(Entry.from_frames(values[at:at + n]))
        at += n
    return list(zip(names, entries, strict=True))


def _local_items(items: Sequence[tuple[str, Any]]) -> list[tuple[str, Entry]]:
    return [(key, Entry.from_object(value)) for key, value in items]


def _decode_prefixes(frames: list[Any]) -> list[bytes]:
    return [bytes(frame) for frame in frames]


def _encode_prefixes(prefixes: Sequence[str]) -> list[Frame]:
    return [wire.key_bytes(p) for p in prefixes]


def _decode_number(frames: list[Any]) -> Any:
    amount = codec.loads(frames)
    if type(amount) not in (int, float):
        raise TypeError(f"incr amount must be an int or float, not {type(amount).__name__}")
    return amount


def _local_publish(data: Any) -> list[Frame]:
    return codec.dumps(data, copy_buffers=True)  # the caller may change its object right after


#: A key of the store.
KEY = Arg("key", True, _str_frame, _one_str, _same, key=True)
#: A name that is not a key (a lock, a channel, a prefix).
NAME = Arg("name", True, _str_frame, _one_str, _same)
#: A value to store: frames in the owner (it does not unpickle what it only stores).
VALUE = Arg("value frames", False, codec.dumps, Entry.from_frames, Entry.from_object)
#: A value the owner uses (a function, a default, an expected value): unpickled there.
OBJECT = Arg("pickle", False, codec.dumps, codec.loads, _same)
#: An int or float.
NUMBER = Arg("pickled number", False, codec.dumps, _decode_number, _same)
#: Published data: frames, passed on as they are.
DATA = Arg("value frames", False, codec.dumps, list, _local_publish)
#: A time to live in seconds, or none (f64; empty: none).
TTL = Arg("ttl", True, _encode_ttl, _decode_ttl, _same)
#: Raw bytes (a lock's token, a probe topic).
BYTES = Arg("bytes", True, lambda value: [value], _one_bytes, _same)
#: An integer (i64).
INT = Arg("i64", True, _encode_int, _decode_int, _same)
#: A wait in seconds, or none (JSON).
TIMEOUT = Arg("JSON timeout", True, _encode_timeout, _decode_timeout, _same)
#: Keys of the store: joined by NUL in one frame, or packed.
KEYS = Arg("keys", False, _encode_keys, _decode_keys, list, keys=True)
#: (key, value) pairs to store.
ITEMS = Arg("items", False, _encode_items, _decode_items, _local_items, keys=True)
#: Key prefixes, one frame each.
PREFIXES = Arg("prefixes", False, _encode_prefixes, _decode_prefixes,
               lambda prefixes: [wire.key_bytes(p) for p in prefixes])


# -- result kinds ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Result:
    """How a result travels back: ``reply`` (owner: what ``apply`` returned -> status and
    frames), ``read`` (client: status, frames and the call's arguments -> the result),
    ``local`` (owner-local: what ``apply`` returned -> the result)."""

    name: str
    reply: Callable[[Any, Context], tuple[int, list[Frame]]]
    read: Callable[[int, list[Any], tuple[Any, ...]], Any]
    local: Callable[[Any, tuple[Any, ...]], Any]


_OK = int(wire.Status.OK)
_NONE = int(wire.Status.NONE)


def _reply_nothing(value: Any, ctx: Context) -> tuple[int, list[Frame]]:
    return _OK, []


def _reply_found(value: Any, ctx: Context) -> tuple[int, list[Frame]]:
    return (_OK if value else _NONE), []


def _reply_entry(value: Entry | None, ctx: Context) -> tuple[int, list[Frame]]:
    if value is None:
        return _NONE, []
    return _OK, ctx.entry_frames(value)


def _read_entry(status: int, frames: list[Any], args: tuple[Any, ...]) -> Any:
    return codec.loads(frames) if status == _OK else MISSING


def _local_entry(value: Entry | None, args: tuple[Any, ...]) -> Any:
    return MISSING if value is None else value.load()


def _reply_object(value: Any, ctx: Context) -> tuple[int, list[Frame]]:
    return _OK, (value.frames if isinstance(value, Pickled) else codec.dumps(value))


def _reply_keys(value: list[str], ctx: Context) -> tuple[int, list[Frame]]:
    return _OK, wire.pack_frames(wire.keys_bytes(value)) if value else []


def _read_keys(status: int, frames: list[Any], args: tuple[Any, ...]) -> list[str]:
    return wire.keys_str(wire.unpack_frames(frames)) if frames else []


def _reply_items(value: list[tuple[str, Entry]], ctx: Context) -> tuple[int, list[Frame]]:
    """Sections: key, value frames, key, value frames, ... (refused whole, naming the keys,
    if the owner holds values that cannot be pickled)."""
    sections: list[Sequence[Frame]] = []
    failed: list[str] = []
    for key, entry in value:
        try:
            frames = entry.wire()
        except EncodeError:
            failed.append(key)
            continue
        sections.append([wire.key_bytes(key)])
        sections.append(frames)
    if failed:
        raise EncodeError(
            f"the owner holds values that cannot be pickled, under keys "
            f"{failed[:5]!r}{'...' if len(failed) > 5 else ''}")
    return _OK, wire.pack_sections(sections)


def _read_items(status: int, frames: list[Any], args: tuple[Any, ...]) -> dict[str, Any]:
    sections = wire.unpack_sections(frames)
    if len(sections) % 2:
        raise ProtocolError("items reply has an odd number of sections")
    return {wire.key_str(sections[i][0]): codec.loads(sections[i + 1])
            for i in range(0, len(sections), 2)}


def _local_items_result(value: list[tuple[str, Entry]], args: tuple[Any, ...]
                        ) -> dict[str, Any]:
    return {key: entry.load() for key, entry in value}


def _reply_many(value: list[Entry | None], ctx: Context) -> tuple[int, list[Frame]]:
    """``[counts: i32 per key (-1 missing), *packed value frames]``; or ``[PLAIN_VALUES, one
    pickle of the list of values]`` when every key is there with a plain value kept as an
    object."""
    if None not in value:
        plain = codec.dumps_plain([entry.obj for entry in value])  # type: ignore[union-attr]
        if plain is not None:
            return _OK, [wire.PLAIN_VALUES, plain]
    counts = array("i")
    out: list[Frame] = []
    for entry in value:
        if entry is None:
            counts.append(-1)
            continue
        frames = entry.wire()
        counts.append(len(frames))
        out.extend(frames)
    return _OK, [counts.tobytes(), *wire.pack_frames(out)]


def _read_many(status: int, frames: list[Any], args: tuple[Any, ...]) -> dict[str, Any]:
    keys: list[str] = args[0]
    if len(frames) == 2 and frames[0] == wire.PLAIN_VALUES:  # one pickle of them all
        values = pickle.loads(frames[1])
        if type(values) is not list or len(values) != len(keys):
            raise ProtocolError("get_many reply does not match the request")
        return dict(zip(keys, values, strict=True))
    counts = wire.read_index(frames[0], "i", "get_many counts")
    values = wire.unpack_frames(frames[1:])
    if len(counts) != len(keys) or sum(n for n in counts if n > 0) != len(values):
        raise ProtocolError("get_many reply does not match the request")
    if len(values) == len(keys) and (not counts or min(counts) == 1):
        try:  # one pickle per key, all there: the common case, at C speed
            return dict(zip(keys, map(pickle.loads, values), strict=True))
        except Exception:
            pass  # the loop below says which value and why
    out: dict[str, Any] = {}
    at = 0
    for key, n in zip(keys, counts, strict=True):
        if n > 0:
            out[key] = codec.loads(values[at:at + n])
            at += n
    return out


def _local_many(value: list[Entry | None], args: tuple[Any, ...]) -> dict[str, Any]:
    return {key: entry.load() for key, entry in zip(args[0], value, strict=True)
            if entry is not None}


def _read_json(status: int, frames: list[Any], args: tuple[Any, ...]) -> Any:
    return wire.decode_json(frames[0])


NOTHING = Result("—", _reply_nothing, lambda status, frames, args: None,
                 lambda value, args: None)
FOUND = Result("OK / NONE", _reply_found, lambda status, frames, args: status == _OK,
               lambda value, args: bool(value))
ENTRY = Result("value frames, or NONE", _reply_entry, _read_entry, _local_entry)
PICKLE = Result("pickle", _reply_object, lambda status, frames, args: codec.loads(frames),
                lambda value, args: value)
KEY_LIST = Result("packed keys", _reply_keys, _read_keys, lambda value, args: value)
ITEM_SECTIONS = Result("sections: key, value frames, ...", _reply_items, _read_items,
                       _local_items_result)
MANY = Result("i32 frame count per key (-1: missing), packed frames; or b\"p\", one pickle",
              _reply_many, _read_many, _local_many)
JSON = Result("JSON", lambda value, ctx: (_OK, [wire.encode_json(value)]), _read_json,
              lambda value, args: value)
SEQ = Result("u64", lambda value, ctx: (_OK, [wire.pack_seq(value)]),
             lambda status, frames, args: wire.unpack_seq(frames[0]),
             lambda value, args: value)
