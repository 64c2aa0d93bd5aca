"""Values to frames and back. No I/O happens here.

A value travels as a short list of frames:

- ``[pickle]`` — the common case: one pickle (protocol 5);
- ``[pickle, buf, ...]`` — pickle protocol 5 with large out-of-band buffers (``bytearray``,
  NumPy arrays, ...) as their own frames, so they are never copied into the pickle;
- ``[b"", data]`` — a large ``bytes`` value sent as it is (an empty first frame is never a
  pickle).

Serialization is cloudpickle's, with a fast path: plain data (scalars, and containers whose
standard pickle refers to no ``__main__`` object) is pickled by the C pickler, which is several
times faster; anything the standard pickler refuses (lambdas, closures, ...) or that refers to
``__main__``/``__mp_main__`` (which another process may not be able to import) is pickled by
value with cloudpickle. Either output is read by :func:`pickle.loads`.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import cloudpickle

from .errors import DecodeError, EncodeError

__all__ = ["IMMUTABLE_TYPES", "PLAIN_TYPES", "RAW_THRESHOLD", "SMALL", "Frame", "dumps",
           "dumps_many",
           "dumps_plain", "frame_size", "frames_size", "loads", "loads_plain"]

#: Anything zkv can put in a frame: bytes, a memoryview, or a ``zmq.Frame``.
Frame = bytes | memoryview | Any

#: Types whose values cannot change after creation; zkv hands these out without copying.
IMMUTABLE_TYPES: frozenset[type] = frozenset(
    {str, int, float, bool, type(None), bytes, complex}
)

#: Types of the values :func:`dumps_plain` takes: plain data whose pickle names no class.
PLAIN_TYPES: frozenset[type] = frozenset({str, int, float, bool, type(None), bytes})

#: Frames smaller than this are *small*: copied (into a pickle, a joined frame, a header
#: frame) where that saves a frame. Larger ones travel as frames of their own, not copied.
SMALL = 64 * 1024

#: ``bytes`` values at least this large travel as their own frame, without pickling.
RAW_THRESHOLD = SMALL

#: Out-of-band buffers smaller than this are kept inside the pickle (fewer frames).
_OOB_THRESHOLD = SMALL

_PROTOCOL = 5
_SCALARS = (str, int, float, bool, type(None), complex)
_RAW_MARK = b""


def dumps(obj: object, copy_buffers: bool = False) -> list[Frame]:
    """Serialize ``obj`` into frames.

    ``copy_buffers=True`` copies out-of-band buffers, so that the frames stay a snapshot even if
    the caller mutates ``obj`` afterwards (the owner needs this; a client sends and waits for
    the acknowledgement, so it does not).

    Raises :class:`EncodeError` naming the type of ``obj`` when it cannot be pickled.
    """
    kind = type(obj)
    if kind in _SCALARS:
        return [pickle.dumps(obj, _PROTOCOL)]
    if kind is bytes:
        if len(obj) >= RAW_THRESHOLD:  # type: ignore[arg-type]
            return [_RAW_MARK, obj]
        return [pickle.dumps(obj, _PROTOCOL)]
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            view = buf.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if view.nbytes < _OOB_THRESHOLD:
            return True
        buffers.append(view)
        return False

    data: bytes | None
    try:
        data = pickle.dumps(obj, _PROTOCOL, buffer_callback=keep)
    except Exception:
        data = None
    if data is None or b"main__" in data:
        # Refused by the C pickler, or it refers to __main__ / __mp_main__ by name: pickle
        # by value with cloudpickle so that any process can load it.
        buffers.clear()
        try:
            data = cloudpickle.dumps(obj, _PROTOCOL, buffer_callback=keep)
        except Exception as exc:
            raise EncodeError(
                f"cannot serialize a value of type {_type_name(obj)}: {exc}"
            ) from exc
    if not buffers:
        return [data]
    if copy_buffers:
        return [data, *(bytes(view) for view in buffers)]
    return [data, *buffers]


def dumps_many(values: Sequence[object]) -> tuple[bytes, list[Frame]]:
    """Serialize many values for one message: returns the number of frames of each value
    (u32 each; empty when every value is one frame, the usual case) and all the frames in
    order. Scalars, the common case of a batch, are pickled at C speed."""
    if set(map(type, values)) <= _SCALAR_SET:
        return b"", list(map(_pickle_scalar, values))
    dumped = [dumps(v) for v in values]
    if all(len(frames) == 1 for frames in dumped):
        return b"", [frames[0] for frames in dumped]
    return array("I", map(len, dumped)).tobytes(), [f for frames in dumped for f in frames]


def dumps_plain(values: Sequence[object]) -> bytes | None:
    """Many plain values (``str``, ``int``, ``float``, ``bool``, ``None``, ``bytes`` smaller
    than :data:`RAW_THRESHOLD`) as one pickle of a list, or None when some value is not plain.

    One pickle costs a tenth of a pickle per value, and the owner reads it back with
    :func:`loads_plain`, which runs no code."""
    kinds = set(map(type, values))
    if not kinds <= PLAIN_TYPES:
        return None
    if bytes in kinds and max(len(v) for v in values if type(v) is bytes) >= RAW_THRESHOLD:  # type: ignore[arg-type]
        return None
    return pickle.dumps(list(values), _PROTOCOL)


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that loads no global at all, so no class and no function: a pickle it
    accepts holds only built-in data (it can run no code)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def loads_plain(data: Frame, count: int) -> list[Any]:
    """Inverse of :func:`dumps_plain`, safe on untrusted input: raises :class:`DecodeError`
    unless ``data`` is the pickle of a list of ``count`` plain values."""
    try:
        values = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise DecodeError(f"bad plain values: {type(exc).__name__}: {exc}") from exc
    if type(values) is not list or len(values) != count \
            or not set(map(type, values)) <= PLAIN_TYPES:
        raise DecodeError(f"plain values must be a list of {count} str, int, float, bool, "
                          "None or bytes values")
    return values


_SCALAR_SET = frozenset(_SCALARS)
_pickle_scalar = functools.partial(pickle.dumps, protocol=_PROTOCOL)


def loads(frames: Sequence[Frame]) -> Any:
    """Rebuild the value held by ``frames`` (as made by :func:`dumps`).

    Out-of-band buffers are handed to the unpickler as writable copies, so that, for example,
    a NumPy array read from the store can be modified like any other. Raises
    :class:`DecodeError` with the original reason when the value cannot be unpickled here (a
    class this process cannot import, a corrupted pickle, ...).
    """
    if not frames:
        raise DecodeError("malformed value: no frames")
    first = frames[0]
    if len(first) == 0:
        if len(frames) != 2:
            raise DecodeError(f"malformed raw value: {len(frames)} frames")
        return bytes(frames[1])
    try:
        if len(frames) == 1:
            return pickle.loads(first)
        return pickle.loads(first, buffers=[bytearray(f) for f in frames[1:]])
    except Exception as exc:
        raise DecodeError(f"cannot unpickle value: {type(exc).__name__}: {exc}") from exc


def frame_size(frame: Frame) -> int:
    """Bytes in a frame (a memoryview's ``len`` counts items, not bytes)."""
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def frames_size(frames: Sequence[Frame]) -> int:
    """Total number of bytes in ``frames``."""
    return sum(map(frame_size, frames))


def _type_name(obj: object) -> str:
    kind = type(obj)
    module = kind.__module__
    if module in ("builtins", None):
        return kind.__qualname__
    return f"{module}.{kind.__qualname__}"


def register_main_by_value() -> None:
    """Make cloudpickle pickle the objects of a ``spawn``/``forkserver`` child's re-imported main
    module (``__mp_main__``) by value: the owner and other processes cannot import it by name."""
    module = sys.modules.get("__mp_main__")
    if module is None or getattr(module, "__name__", None) != "__mp_main__":
        return
    try:
        cloudpickle.register_pickle_by_value(module)
    except (ValueError, TypeError):  # already registered, or not a module cloudpickle accepts
        pass
