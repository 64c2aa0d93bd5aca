"""A client's side of a store: each operation encoded as a request to the owner.

Every operation is written once as an *encoder* ``_<name>(*args) -> (op, frames, decode)``;
a single call sends it and decodes the reply, and a pipeline packs many into one message.
"""

from __future__ import annotations

import json
import pickle
from array import array
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from . import codec, reentry, wire
from .cache import NOHIT, ReadCache
from .client import Connection
from .codec import Frame
from .config import Options
from .errors import ProtocolError
from .state import MISSING
from .wire import Op, Status

__all__ = ["RemoteCore"]

Decode = Callable[[int, list[Any]], Any]
#: An encoded operation: op, frames, how to decode the reply, and the keys it reads or writes
#: (a key, a list of keys, None for none, ``ALL`` for any key). The read cache drops what it
#: holds of them once the reply is in, and takes no older value for them from then on: so a
#: write is seen by this process's next read, and a value read directly (get_many, a pipeline,
#: get_all) is never followed by an older one from the cache.
Encoded = tuple[int, list[Frame], Decode, Any]
ALL: Any = object()
_PACK_LIMIT = 32 * 1024  # bytes: smaller values are sent in one frame with their key
_GET = int(Op.GET)
_SET_PACKED = int(Op.SET_PACKED)
_OK = int(Status.OK)
_NONE = int(Status.NONE)
_ERROR = int(Status.ERROR)
_LONG_KEY = 16 * 1024  # characters: a key this long may not fit a packed frame (64 KiB)


def _ok(status: int, frames: list[Any]) -> None:
    return None


def _found(status: int, frames: list[Any]) -> bool:
    return status == Status.OK


def _value(status: int, frames: list[Any]) -> Any:
    return codec.loads(frames)


class RemoteCore:
    """Store operations for a process that is not the owner."""

    is_owner = False

    def __init__(self, address: str, options: Options) -> None:
        self.options = options
        self.conn = Connection(address, options)
        self.endpoint = address
        self.pub_address = self.conn.pub_address
        self.context: zmq.Context[Any] = self.conn.context
        self._cache: ReadCache | None = None

    def expect_probe(self, probe: bytes) -> None:
        """Tell the owner that a subscriber of this process waits for the welcome of
        ``probe`` (one-way: the owner then watches for its subscription)."""
        self.conn.send(Op.PROBE, [probe])

    def owner_alive(self) -> bool:
        return not self.conn.lost and self.conn.owner_alive()

    def _call(self, encoded: Encoded, timeout: float | None = None) -> Any:
        op, frames, decode, writes = encoded
        status, reply, _before, after = self.conn.request_versioned(op, frames, timeout)
        if writes is not None and self._cache is not None:
            if writes is ALL:
                self._cache.written(None, after)
            else:
                self._cache.written(writes if isinstance(writes, list) else [writes], after)
        if status == Status.ERROR:
            raise wire.decode_error(reply)
        return decode(status, reply)

    # -- the read cache --------------------------------------------------------------------------

    def enable_cache(self, prefix: str, max_entries: int) -> None:
        if self._cache is None:
            hwm = self.conn.hwm
            self._cache = ReadCache(self.conn.open_socket(rcvhwm=hwm), hwm=hwm,
                                    timeout=self.options.timeout, alive=self.owner_alive,
                                    max_entries=max_entries)
        self._cache.max_entries = max_entries
        self._cache.add(prefix)

    def disable_cache(self, prefix: str | None) -> None:
        if self._cache is not None:
            self._cache.remove(prefix)

    @property
    def cache(self) -> ReadCache | None:
        return self._cache

    def _cached_get(self, cache: ReadCache, key: str, default: Any) -> Any:
        value = cache.lookup(key)
        if value is NOHIT:
            status, reply, before, _after = self.conn.request_versioned(
                Op.GET, [wire.key_bytes(key)])
            if status == Status.ERROR:
                raise wire.decode_error(reply)
            value = cache.fill(key, before, reply if status == Status.OK else None)
        return default if value is MISSING else value

    # -- encoders --------------------------------------------------------------------------------

    def _get(self, key: str, default: Any = None) -> Encoded:
        def decode(status: int, frames: list[Any]) -> Any:
            return codec.loads(frames) if status == Status.OK else default
        return Op.GET, [wire.key_bytes(key)], decode, key

    def _set(self, key: str, value: Any) -> Encoded:
        name = wire.key_bytes(key)
        frames = codec.dumps(value)
        first = frames[0]
        if len(frames) == 1 and isinstance(first, bytes) and len(first) < _PACK_LIMIT:
            return Op.SET_PACKED, [wire.pack_key_value(name, first)], _ok, key  # the usual
        return Op.SET, [name, *frames], _ok, key

    def _delete(self, key: str) -> Encoded:
        return Op.DELETE, [wire.key_bytes(key)], _found, key

    def _contains(self, key: str) -> Encoded:
        return Op.CONTAINS, [wire.key_bytes(key)], _found, key

    def _modify(self, key: str, fn: Callable[[Any], Any], default: Any) -> Encoded:
        frames = wire.pack_sections([[wire.key_bytes(key)], codec.dumps(fn),
                                     codec.dumps(default)])
        return Op.MODIFY, frames, _value, key

    def _incr(self, key: str, amount: int | float) -> Encoded:
        return Op.INCR, [wire.key_bytes(key), *codec.dumps(amount)], _value, key

    def _setdefault(self, key: str, default: Any) -> Encoded:
        return Op.SETDEFAULT, [wire.key_bytes(key), *codec.dumps(default)], _value, key

    def _pop(self, key: str, default: Any) -> Encoded:
        def decode(status: int, frames: list[Any]) -> Any:
            if status == Status.OK:
                return codec.loads(frames)
            if default is MISSING:
                raise KeyError(key)
            return default
        return Op.POP, [wire.key_bytes(key)], decode, key

    def _compare_and_set(self, key: str, expected: Any, new: Any) -> Encoded:
        frames = wire.pack_sections([[wire.key_bytes(key)], codec.dumps(expected),
                                     codec.dumps(new)])
        return Op.CAS, frames, _found, key

    # -- operations ------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        cache = self._cache
        if cache is not None and cache.covers(key):
            return self._cached_get(cache, key, default)
        # _call(_get(...)) without the closure: the most frequent request of all.
        status, reply, _before, _after = self.conn.request_small(
            _GET, key.encode("utf-8", "surrogatepass"))
        if status == _OK:
            if len(reply) == 1:
                try:
                    return pickle.loads(reply[0])  # one pickle: the usual value
                except Exception:
                    pass  # codec.loads says what is wrong with it, or reads a raw value
            return codec.loads(reply)
        if status == _NONE:
            return default
        raise wire.decode_error(reply)

    def set(self, key: str, value: Any) -> None:
        encoded = self._set(key, value)
        if encoded[0] is not Op.SET_PACKED:
            self._call(encoded)
            return
        status, reply, _before, after = self.conn.request_small(
            _SET_PACKED, encoded[1][0])  # type: ignore[arg-type]  # _set made it bytes
        if self._cache is not None:
            self._cache.written([key], after)
        if status == _ERROR:
            raise wire.decode_error(reply)

    def delete(self, key: str) -> bool:
        return bool(self._call(self._delete(key)))

    def contains(self, key: str) -> bool:
        return bool(self._call(self._contains(key)))

    def modify(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        return self._call(self._modify(key, fn, default))

    def incr(self, key: str, amount: int | float) -> int | float:
        return self._call(self._incr(key, amount))  # type: ignore[no-any-return]

    def setdefault(self, key: str, default: Any) -> Any:
        return self._call(self._setdefault(key, default))

    def pop(self, key: str, default: Any) -> Any:
        return self._call(self._pop(key, default))

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        return bool(self._call(self._compare_and_set(key, expected, new)))

    def length(self) -> int:
        return self._call((Op.LEN, [], _value, None))  # type: ignore[no-any-return]

    def keys(self) -> list[str]:
        def decode(status: int, frames: list[Any]) -> list[str]:
            return [wire.key_str(f) for f in frames]
        return self._call((Op.KEYS, [], decode, ALL))  # type: ignore[no-any-return]

    def clear(self) -> None:
        self._call((Op.CLEAR, [], _ok, ALL))

    def get_all(self) -> dict[str, Any]:
        def decode(status: int, frames: list[Any]) -> dict[str, Any]:
            sections = wire.unpack_sections(frames)
            if len(sections) % 2:
                raise ProtocolError("get_all reply has an odd number of sections")
            return {wire.key_str(sections[i][0]): codec.loads(sections[i + 1])
                    for i in range(0, len(sections), 2)}
        return self._call((Op.GET_ALL, [], decode, ALL))  # type: ignore[no-any-return]

    def transact(self, fn: Callable[[Any], Any]) -> Any:
        return self._call((Op.TRANSACT, codec.dumps(fn), _value, ALL))

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        if not keys:
            return {}
        joined = wire.join_keys(keys)
        if joined is None and any(len(key) >= _LONG_KEY for key in keys):  # too long to pack
            values = self.execute([("get", (key, MISSING)) for key in keys])
            return {key: value for key, value in zip(keys, values, strict=True)
                    if value is not MISSING}

        def decode(status: int, frames: list[Any]) -> dict[str, Any]:
            if len(frames) == 2 and frames[0] == wire.PLAIN_VALUES:  # one pickle of them all
                values = pickle.loads(frames[1])
                if type(values) is not list or len(values) != len(keys):
                    raise ProtocolError("get_many reply does not match the request")
                return dict(zip(keys, values, strict=True))
            counts = array("i")
            counts.frombytes(frames[0])
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
            loads = pickle.loads
            for key, n in zip(keys, counts, strict=True):
                if n == 1 and values[at]:  # one pickle: the common case, unpickled directly
                    try:
                        out[key] = loads(values[at])
                    except Exception:
                        out[key] = codec.loads(values[at:at + 1])  # raises DecodeError
                elif n > 0:
                    out[key] = codec.loads(values[at:at + n])
                at += max(n, 0)
            return out
        frames: list[Frame] = [joined] if joined is not None \
            else wire.pack_frames(wire.keys_bytes(keys))
        return self._call((Op.GET_MANY, frames, decode, keys))  # type: ignore[no-any-return]

    def set_many(self, items: list[tuple[str, Any]]) -> None:
        keys = [key for key, _value in items]
        joined = wire.join_keys(keys)
        if joined is not None:  # plain values (the usual batch): one pickle, no frame per key
            plain = codec.dumps_plain([value for _key, value in items])
            if plain is not None:
                self._call((Op.SET_PLAIN, [joined, plain], _ok, keys))
                return
        if any(len(key) >= _LONG_KEY for key in keys):  # keys too long to pack: a pipeline
            self.execute([("set", item) for item in items])
            return
        counts, values = codec.dumps_many([value for _key, value in items])
        frames = [counts, *wire.pack_frames(wire.keys_bytes(keys)),
                  *wire.pack_frames(values)]
        self._call((Op.SET_MANY, frames, _ok, keys))

    def execute(self, calls: list[tuple[str, tuple[Any, ...]]],
                out: list[Any] | None = None) -> list[Any]:
        """Send queued operations as one PIPELINE request; return their results in order (also
        appended to ``out``, which keeps them when an error is raised). The owner applies them
        as one atomic step; every operation runs, and the first error is raised after all of
        them."""
        if not calls:
            return []
        index = array("I")
        flat: list[Frame] = []
        decoders: list[Decode] = []
        written: list[str] = []
        for name, args in calls:
            op, sub, decode, writes = getattr(self, "_" + name)(*args)
            index.append(op)
            index.append(len(sub))
            flat.extend(sub)
            decoders.append(decode)
            if writes is not None:
                written.append(writes)
        frames = [index.tobytes(), *wire.pack_frames(flat)]
        status, reply, _before, after = self.conn.request_versioned(Op.PIPELINE, frames)
        if written and self._cache is not None:
            self._cache.written(written, after)
        if status == Status.ERROR:
            raise wire.decode_error(reply)
        out_index = array("I")
        out_index.frombytes(reply[0])
        if len(out_index) != 2 * len(calls):
            raise ProtocolError("pipeline reply does not match the request")
        reply = wire.unpack_frames(reply[1:])
        results: list[Any] = [] if out is None else out
        first_error: BaseException | None = None
        at = 0
        for i, decode in enumerate(decoders):
            sub_status, n = out_index[2 * i], out_index[2 * i + 1]
            sub = reply[at:at + n]
            at += n
            try:
                if sub_status == Status.ERROR:
                    raise wire.decode_error(sub)
                results.append(decode(sub_status, sub))
            except Exception as exc:
                results.append(exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results

    # -- locks -----------------------------------------------------------------------------------

    def lock_acquire(self, name: str, token: bytes, timeout: float | None) -> bool:
        reentry.refuse(f"waiting for lock {name!r}")
        frames = [wire.key_bytes(name), token, json.dumps(timeout).encode()]
        wait = float("inf") if timeout is None else timeout + self.options.timeout
        try:
            status, reply = self.conn.request(Op.LOCK, frames, timeout=wait)
        except BaseException:
            # Gave up (timeout, interrupt): withdraw the wait, or give back a late grant.
            try:
                self.conn.send(Op.UNLOCK, [wire.key_bytes(name), token])
            except Exception:
                pass
            raise
        if status == Status.ERROR:
            raise wire.decode_error(reply)
        return status == Status.OK

    def lock_release(self, name: str, token: bytes) -> bool:
        status, reply = self.conn.request(Op.UNLOCK, [wire.key_bytes(name), token])
        if status == Status.ERROR:
            raise wire.decode_error(reply)
        return status == Status.OK

    # -- publish ---------------------------------------------------------------------------------

    def publish(self, channel: str, data: Any) -> None:
        self.conn.send(Op.PUBLISH, [wire.key_bytes(channel), *codec.dumps(data)])

    def stats(self) -> dict[str, int]:
        def decode(status: int, frames: list[Any]) -> dict[str, int]:
            return wire.decode_json(frames[0])  # type: ignore[no-any-return]
        return self._call((Op.STATS, [], decode, None))  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self.conn.close()
