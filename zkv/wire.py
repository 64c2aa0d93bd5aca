"""The zkv wire protocol: message layouts as pure functions (no sockets here; those are in
:mod:`zkv.sockets`, and what each operation carries is in :mod:`zkv.ops`).

A connection opens with a HELLO greeting and its WELCOME (:func:`pack_greeting`). Then:

Request (client DEALER -> owner ROUTER)::

    [header: rid u32, op u8, flags u8] [argument frames ...]

Reply (owner ROUTER -> client DEALER)::

    [header: rid u32, status u8, flags u8, before u64, after u64] [result frames ...]

When the first argument (result) is small it rides in the header frame, after the header, and
the ``MERGED`` flag says so: one frame less each way. ``rid`` is chosen by the client per
request, so that a late reply to a request that timed out is recognised and dropped.
``before``/``after`` are the store's change counter just before and just after the request was
applied: a value read by the request reflects every change numbered up to ``before``, and a
change made by it is numbered at most ``after`` (the client-side read cache relies on both).

A value is the list of frames made by :mod:`zkv.codec`. When a message carries several values,
they are packed as *sections*: a frame holding the frame count of each section (u32), followed
by the sections' frames. Many small frames travel as *packed frames*: their lengths, and their
bytes joined.

Published message (owner XPUB -> SUB)::

    [topic + meta: seq u64, version u64, kind u8 (+ the value's first frame)] [value frames ...]

(the meta rides in the topic frame, after the topic: ZeroMQ matches subscriptions against the
start of the first frame only, and a frame less per message is a fifth of the cost of a small
one). The kind byte's ``KIND_MERGED`` flag says the value's first frame rides there too, after
the meta (the usual message: one frame in all); its ``KIND_MORE`` flag says frames follow, so
that a subscriber never asks ZeroMQ whether there are more. A topic ends at its NUL (names hold
none: see below); a welcome's topic (a probe) may hold any byte, so its meta ends its frame and
its payload follows.

Topics: ``c<channel>\\0`` for channel messages (``c<prefix>`` for a prefix subscription),
``k<key>\\0`` for change events of a key, ``w<token>`` for the welcome that makes a
subscription live. Names are escaped (:func:`topic`: ``\\x01`` becomes ``\\x01\\x02`` and
NUL ``\\x01\\x01``) so that no name holds NUL: the NUL of an exact topic is its end, and a
prefix topic matches exactly the names that start with the prefix. ``seq`` counts messages
per topic, so a subscriber sees its losses as gaps.

Cache invalidation (owner ROUTER -> a client's cache DEALER, on the same pipe as that socket's
replies, so a reply proves which invalidations came before it)::

    [header: rid 0, status INVALIDATE, flags 0, seq u64, version u64] [key]

Integers are little-endian. The full description is docs/protocol.md.
"""

from __future__ import annotations

import enum
import itertools
import json
import operator
import os
import pickle
import struct
import traceback
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from .codec import SMALL, Frame
from .errors import ProtocolError, RemoteError

__all__ = [
    "CHANNEL_TOPIC",
    "HELLO_MAGIC",
    "KEY_TOPIC",
    "KIND_FLAGS",
    "KIND_MERGED",
    "KIND_MORE",
    "MERGED",
    "MONITOR_TOPIC",
    "MORE",
    "PLAIN_VALUES",
    "PROBE_TOPIC",
    "PROTOCOL_VERSION",
    "REFS",
    "REPLY_HEADER",
    "REQUEST_HEADER",
    "SPILLED",
    "WELCOME_MAGIC",
    "Kind",
    "Status",
    "channel_topic",
    "decode_error",
    "decode_json",
    "encode_error",
    "encode_json",
    "invalidation",
    "join_keys",
    "key_bytes",
    "key_str",
    "key_topic",
    "keys_bytes",
    "keys_str",
    "make_probe",
    "pack_frames",
    "pack_greeting",
    "pack_header",
    "pack_key_value",
    "pack_meta",
    "pack_sections",
    "pack_seq",
    "pack_spill",
    "pack_welcome",
    "parse_greeting",
    "parse_head",
    "parse_reply",
    "parse_request",
    "parse_welcome",
    "probe_topics",
    "published",
    "read_index",
    "reply",
    "request",
    "split_keys",
    "split_published",
    "topic",
    "topic_name",
    "unpack_frames",
    "unpack_key_value",
    "unpack_meta",
    "unpack_sections",
    "unpack_seq",
    "unpack_spill",
]

#: Goes up with every change of a layout; peers of different versions refuse each other.
PROTOCOL_VERSION = 3

#: The first frame of a HELLO (client -> owner) and of its WELCOME (owner -> client): a magic
#: value, the sender's protocol version (u16), then a JSON object. The layout never changes
#: between versions, so that peers of different versions can tell each other theirs.
HELLO_MAGIC = b"zkv-helo"
WELCOME_MAGIC = b"zkv-wlcm"
_GREETING = struct.Struct("<8sH")

#: The request header (rid u32, op u8, flags u8) and the reply header (rid u32, status u8,
#: flags u8, before u64, after u64).
REQUEST_HEADER = struct.Struct("<IBB")
REPLY_HEADER = struct.Struct("<IBBQQ")
_META = struct.Struct("<QQB")
_SEQ = struct.Struct("<Q")

# Flags of a request (the header's flags byte).
#: The first argument (request) or result (reply) is carried in the header frame, after it.
MERGED = 0x01
#: The message's last frame is a spill index, naming the files (in the owner's blob
#: directory, see :mod:`zkv.blobs`) that hold the frames at the positions it gives (each sent
#: as an empty placeholder frame).
SPILLED = 0x02
#: Request only: the client can read the owner's blob directory, so the reply (to a read) may
#: name files instead of carrying large frames.
REFS = 0x04
#: Reply only: more frames follow the header frame. The client reads them only then, instead
#: of asking ZeroMQ after every reply (a getsockopt costs about as much as the recv itself).
MORE = 0x08


class Status(enum.IntEnum):
    """Reply status."""

    OK = 0
    NONE = 1  # missing key, failed comparison, lock not acquired in time
    ERROR = 2
    INVALIDATE = 3  # not a reply: an invalidation pushed to a caching client


class Kind(enum.IntEnum):
    """What a published message is."""

    MESSAGE = 0
    SET = 1
    DELETE = 2
    WELCOME = 3
    EXPIRE = 4


#: First frame of a GET_MANY reply whose second frame is one pickle of the list of values.
PLAIN_VALUES = b"p"


# -- greetings -----------------------------------------------------------------------------------

def pack_greeting(magic: bytes, info: dict[str, Any], version: int | None = None) -> bytes:
    """A HELLO or WELCOME frame: ``magic``, ``version`` (default: :data:`PROTOCOL_VERSION`)
    and ``info`` as JSON."""
    return _GREETING.pack(magic, PROTOCOL_VERSION if version is None else version) \
        + encode_json(info)


def parse_greeting(magic: bytes, frame: Frame) -> tuple[int, dict[str, Any]] | None:
    """``(version, info)`` of a HELLO or WELCOME frame, or None if ``frame`` does not start
    with ``magic``. Raises ProtocolError if it does but the rest is not a JSON object."""
    data = bytes(frame)
    if len(data) < _GREETING.size or not data.startswith(magic):
        return None
    _magic, version = _GREETING.unpack_from(data)
    info = decode_json(data[_GREETING.size:])
    if not isinstance(info, dict):
        raise ProtocolError("a zkv greeting must carry a JSON object")
    return version, info


# -- requests and replies ------------------------------------------------------------------------

def pack_header(rid: int, op: int, flags: int = 0) -> bytes:
    """A request header frame (with nothing merged into it)."""
    return REQUEST_HEADER.pack(rid, op, flags)


def request(rid: int, op: int, args: Sequence[Frame], flags: int = 0) -> list[Frame]:
    """The frames of a request (see the module docstring)."""
    if args:
        first = args[0]
        if type(first) is bytes and len(first) < SMALL:
            return [REQUEST_HEADER.pack(rid, op, flags | MERGED) + first, *args[1:]]
    return [REQUEST_HEADER.pack(rid, op, flags), *args]


def parse_request(head: bytes, rest: list[Any]) -> tuple[int, int, int, list[Any]]:
    """``(rid, op, flags, args)`` from a request's header frame and the frames after it.
    Raises ProtocolError."""
    try:
        rid, op, flags = REQUEST_HEADER.unpack_from(head)
    except struct.error:
        raise ProtocolError(f"bad header frame of {len(head)} bytes") from None
    if flags & MERGED:
        return rid, op, flags, [head[REQUEST_HEADER.size:], *rest]
    if len(head) != REQUEST_HEADER.size:
        raise ProtocolError(f"bad header frame of {len(head)} bytes")
    return rid, op, flags, rest


def reply(rid: int, status: int, before: int, after: int, out: Sequence[Frame],
          flags: int = 0) -> list[Frame]:
    """The frames of a reply (after the routing id)."""
    if out:
        first = out[0]
        if type(first) is bytes and len(first) < SMALL:
            if len(out) == 1:  # the usual reply: one frame
                return [REPLY_HEADER.pack(rid, status, flags | MERGED, before, after) + first]
            return [REPLY_HEADER.pack(rid, status, flags | MERGED | MORE, before, after) + first,
                    *out[1:]]
        return [REPLY_HEADER.pack(rid, status, flags | MORE, before, after), *out]
    return [REPLY_HEADER.pack(rid, status, flags, before, after)]


def parse_reply(head: bytes, rest: list[Any]) -> tuple[int, int, int, int, int, list[Any]]:
    """``(rid, status, flags, before, after, results)`` from a reply's frames. Raises
    ProtocolError."""
    try:
        rid, status, flags, before, after = REPLY_HEADER.unpack_from(head)
    except struct.error:
        raise ProtocolError(f"bad reply header of {len(head)} bytes") from None
    if flags & MERGED:
        return rid, status, flags, before, after, [head[REPLY_HEADER.size:], *rest]
    if len(head) != REPLY_HEADER.size:
        raise ProtocolError(f"bad reply header of {len(head)} bytes")
    return rid, status, flags, before, after, rest


def invalidation(seq: int, version: int, key: bytes) -> list[Frame]:
    """An invalidation pushed to a caching client (see the module docstring)."""
    return [REPLY_HEADER.pack(0, Status.INVALIDATE, 0, seq, version), key]


def pack_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def unpack_seq(frame: Frame) -> int:
    try:
        return int(_SEQ.unpack(bytes(frame))[0])
    except struct.error:
        raise ProtocolError(f"bad sequence number of {len(frame)} bytes") from None


# -- spilled frames ------------------------------------------------------------------------------

_SPILL = struct.Struct("<IQ32s")  # position, size, file name


def pack_spill(entries: Sequence[tuple[int, int, bytes]]) -> bytes:
    """A spill index: ``(position, size, name)`` per frame sent as a file."""
    return b"".join(_SPILL.pack(*entry) for entry in entries)


def unpack_spill(frame: Frame) -> list[tuple[int, int, bytes]]:
    """Inverse of :func:`pack_spill`. Raises ProtocolError."""
    data = bytes(frame)
    if not data or len(data) % _SPILL.size:
        raise ProtocolError(f"bad spill index of {len(data)} bytes")
    return list(_SPILL.iter_unpack(data))



# -- several values in one message ------------------------------------------------------------

def pack_sections(sections: Iterable[Sequence[Frame]]) -> list[Frame]:
    """Flatten several values (each a list of frames) into one frame list."""
    counts = array("I")
    out: list[Frame] = [b""]
    for section in sections:
        counts.append(len(section))
        out.extend(section)
    out[0] = counts.tobytes()
    return out


def read_index(frame: Frame, typecode: str, what: str) -> array[int]:
    """An index frame as an array of ``typecode`` items. Raises ProtocolError ("bad
    ``what``") if its length is not a whole number of items."""
    index = array(typecode)
    try:
        index.frombytes(frame)
    except (ValueError, TypeError):
        raise ProtocolError(f"bad {what}") from None
    return index


def unpack_sections(frames: Sequence[Frame]) -> list[Sequence[Frame]]:
    """Inverse of :func:`pack_sections`. Raises ProtocolError on a malformed layout."""
    if not frames:
        raise ProtocolError("missing section index")
    counts = read_index(frames[0], "I", "section index")
    if sum(counts) != len(frames) - 1:
        raise ProtocolError(f"section index says {sum(counts)} frames, got {len(frames) - 1}")
    out: list[Sequence[Frame]] = []
    at = 1
    for n in counts:
        out.append(frames[at:at + n])
        at += n
    return out


def pack_frames(frames: Sequence[Frame]) -> list[Frame]:
    """Many small frames as two: their lengths (i64 each; -1 for a large frame, which follows
    as a frame of its own, not copied) and their bytes joined. Each ZeroMQ frame costs
    microseconds on both sides; joining bytes costs nanoseconds."""
    if not frames or max(map(len, frames)) < SMALL:  # the common case, at C speed
        return [array("q", map(len, frames)).tobytes(), b"".join(frames)]
    lengths = array("q")
    small: list[bytes] = []
    large: list[Frame] = []
    for frame in frames:
        if type(frame) is bytes and len(frame) < SMALL:
            lengths.append(len(frame))
            small.append(frame)
        else:
            lengths.append(-1)
            large.append(frame)
    return [lengths.tobytes(), b"".join(small), *large]


def unpack_frames(frames: Sequence[Any]) -> list[Any]:
    """Inverse of :func:`pack_frames`. Raises ProtocolError if the parts do not add up."""
    if len(frames) < 2:
        raise ProtocolError("packed frames need a length index and a body")
    lengths = read_index(frames[0], "q", "packed-frame index")
    blob = bytes(frames[1])
    if len(frames) == 2 and (not lengths or min(lengths) >= 0):  # no large frames
        ends = list(itertools.accumulate(lengths))
        if (ends[-1] if ends else 0) != len(blob):
            raise ProtocolError("packed-frame index does not match its frames")
        return list(map(blob.__getitem__, map(slice, [0, *ends[:-1]], ends)))
    out: list[Any] = []
    at = 0
    large = 2
    for n in lengths:
        if n >= 0:
            out.append(blob[at:at + n])
            at += n
        else:
            if large >= len(frames):
                raise ProtocolError("packed-frame index names more large frames than sent")
            out.append(frames[large])
            large += 1
    if at != len(blob) or large != len(frames):
        raise ProtocolError("packed-frame index does not match its frames")
    return out



# -- keys ---------------------------------------------------------------------------------------

_KEY_LENGTH = struct.Struct("<I")


def pack_key_value(key: bytes, value: bytes) -> bytes:
    """Key and value in one frame (a small ``set``): one frame less than ``[key, value]``."""
    return _KEY_LENGTH.pack(len(key)) + key + value


def unpack_key_value(frame: bytes) -> tuple[bytes, bytes]:
    try:
        (n,) = _KEY_LENGTH.unpack_from(frame)
    except struct.error:
        raise ProtocolError("packed key and value: frame too short") from None
    if 4 + n > len(frame):
        raise ProtocolError("packed key and value: the key length runs past the frame")
    return frame[4:4 + n], frame[4 + n:]


_encode_keys = operator.methodcaller("encode", "utf-8", "surrogatepass")
_decode_keys = operator.methodcaller("decode", "utf-8", "surrogatepass")


def keys_bytes(keys: Iterable[str]) -> list[bytes]:
    """:func:`key_bytes` of many keys, at C speed."""
    return list(map(_encode_keys, keys))


def keys_str(frames: Iterable[Any]) -> list[str]:
    """:func:`key_str` of many frames, at C speed when they are all small (bytes). Raises
    ProtocolError."""
    frames = list(frames)
    try:
        return list(map(_decode_keys, frames))
    except (UnicodeDecodeError, AttributeError, TypeError):
        return [key_str(frame) for frame in frames]  # large keys (zmq.Frame), or the error


def join_keys(keys: Sequence[str]) -> bytes | None:
    """Many keys as one frame, separated by NUL (one C call each way instead of one per key),
    or None when there are none or some key contains NUL itself."""
    joined = "\0".join(keys)
    if not keys or joined.count("\0") != len(keys) - 1:
        return None
    return joined.encode("utf-8", "surrogatepass")


def split_keys(frame: Frame) -> list[str]:
    """Inverse of :func:`join_keys`. Raises ProtocolError."""
    try:
        return bytes(frame).decode("utf-8", "surrogatepass").split("\0")
    except UnicodeDecodeError:
        raise ProtocolError("joined keys must be UTF-8") from None


def key_bytes(key: str) -> bytes:
    """Encode a key or channel name for the wire (any ``str``, lone surrogates included)."""
    return key.encode("utf-8", "surrogatepass")


def key_str(frame: Frame) -> str:
    try:
        return bytes(frame).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ProtocolError("key is not valid UTF-8") from None



# -- publish/subscribe --------------------------------------------------------------------------

#: The namespaces of topics: channel messages, key change events, welcomes (probes).
CHANNEL_TOPIC = b"c"
KEY_TOPIC = b"k"
PROBE_TOPIC = b"w"
#: The one topic of the owner's monitor (every request it serves, while someone listens).
MONITOR_TOPIC = b"m\0"


def topic(namespace: bytes, name: bytes, exact: bool = True) -> bytes:
    """The topic of a channel or key (``namespace`` ``b"c"`` or ``b"k"``, ``name`` its
    :func:`key_bytes`), or with ``exact=False`` the topic of a prefix subscription.

    ZeroMQ matches topics by prefix. The name is escaped so that it holds no NUL (``\\x01``
    becomes ``\\x01\\x02``, then NUL ``\\x01\\x01``: a prefix code, so one escaped name
    starts with another exactly when the names do), and an exact topic ends with NUL. So an
    exact topic matches only its own name, and a prefix topic exactly the names that start
    with the prefix, whatever bytes they hold. The one encoder of topics, for the owner and
    the subscribers; :func:`topic_name` decodes."""
    escaped = name.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
    return namespace + escaped + b"\0" if exact else namespace + escaped


def topic_name(exact_topic: bytes) -> str:
    """The channel or key name of an exact topic (inverse of :func:`topic`). Raises
    ProtocolError if it is not UTF-8."""
    escaped = exact_topic[1:-1]
    if b"\x01" in escaped:
        escaped = escaped.replace(b"\x01\x01", b"\x00").replace(b"\x01\x02", b"\x01")
    return key_str(escaped)


_TOPIC_LEN = struct.Struct("<H")


def channel_topic(channel: str) -> bytes:
    """The topic of an exact channel: what its messages are published under."""
    return topic(CHANNEL_TOPIC, key_bytes(channel))


def key_topic(key: str) -> bytes:
    """The topic of an exact key: what its change events are published under."""
    return topic(KEY_TOPIC, key_bytes(key))


def make_probe(topics: Sequence[bytes]) -> bytes:
    """A one-off probe topic listing ``topics``: ``w`` + 8 random bytes + (u16 length, topic)*.
    The owner answers it with a welcome (see :mod:`zkv.pubsub`)."""
    return b"w" + os.urandom(8) + b"".join(_TOPIC_LEN.pack(len(t)) + t for t in topics)


def probe_topics(probe: bytes) -> list[bytes]:
    """The topics listed in a probe."""
    topics = []
    at = 9
    while at + 2 <= len(probe):
        (n,) = _TOPIC_LEN.unpack_from(probe, at)
        at += 2
        topics.append(probe[at:at + n])
        at += n
    return topics


def pack_welcome(snapshot: dict[bytes, int]) -> bytes:
    """The welcome payload: (u16 length, topic, u64 last sequence number)*."""
    return b"".join(_TOPIC_LEN.pack(len(t)) + t + _SEQ.pack(s) for t, s in snapshot.items())


def parse_welcome(payload: bytes) -> dict[bytes, int]:
    """Inverse of :func:`pack_welcome`."""
    out: dict[bytes, int] = {}
    at = 0
    while at + 2 <= len(payload):
        (n,) = _TOPIC_LEN.unpack_from(payload, at)
        at += 2
        topic = payload[at:at + n]
        at += n
        (seq,) = _SEQ.unpack_from(payload, at)
        at += 8
        out[topic] = seq
    return out



def pack_meta(seq: int, version: int, kind: int) -> bytes:
    return _META.pack(seq, version, kind)


def unpack_meta(frame: Frame) -> tuple[int, int, int]:
    try:
        return _META.unpack(frame)  # type: ignore[return-value]
    except struct.error:
        raise ProtocolError(f"bad meta frame of {len(frame)} bytes") from None


def published(topic: bytes, seq: int, version: int, kind: int,
              frames: Sequence[Frame]) -> list[Frame]:
    """The frames of a published message (see the module docstring): ``topic`` (exact, or a
    probe for a welcome), the meta, and the value's ``frames``, the first of them in the head
    frame when it is small (never for a welcome)."""
    if not frames:
        return [topic + _META.pack(seq, version, kind)]
    first = frames[0]
    if type(first) is bytes and len(first) < SMALL and topic[0] != _PROBE:
        if len(frames) == 1:
            return [topic + _META.pack(seq, version, kind | KIND_MERGED) + first]
        return [topic + _META.pack(seq, version, kind | KIND_MERGED | KIND_MORE) + first,
                *frames[1:]]
    return [topic + _META.pack(seq, version, kind | KIND_MORE), *frames]


_PROBE = PROBE_TOPIC[0]
_META_SIZE = _META.size
_META_FROM = _META.unpack_from
#: Flags of a published message's kind byte (see :func:`published`): the value's first frame
#: rides in the head frame; value frames follow the head frame.
KIND_MERGED = 0x80
KIND_MORE = 0x40
KIND_FLAGS = KIND_MERGED | KIND_MORE


def parse_head(head: bytes) -> tuple[bytes, int, int, int, int]:
    """``(topic, seq, version, kind, at)`` of a published message's first frame. ``kind``
    keeps its flags: with ``KIND_MERGED`` the value's first frame is ``head[at:]``; with
    ``KIND_MORE`` value frames follow this one. Raises ProtocolError."""
    try:
        if head[0] == _PROBE:  # a welcome: the meta ends the frame
            end = len(head) - _META_SIZE
            if end < 1:
                raise ValueError
        else:
            end = head.index(0) + 1
        seq, version, kind = _META_FROM(head, end)
    except (IndexError, ValueError, struct.error):
        raise ProtocolError(f"malformed published message of {len(head)} bytes") from None
    return head[:end], seq, version, kind, end + _META_SIZE


def split_published(frames: Sequence[Any]) -> tuple[bytes, int, int, int, list[Any]]:
    """``(topic, seq, version, kind, value_frames)`` of a whole received published message
    (``kind`` without its flags). Raises ProtocolError."""
    head = frames[0]
    topic, seq, version, kind, at = parse_head(head)
    values: list[Any] = [head[at:]] if kind & KIND_MERGED else []
    if kind & KIND_MORE:
        values.extend(frames[1:])
    elif len(frames) > 1:
        raise ProtocolError("published message with frames its kind does not announce")
    return topic, seq, version, kind & ~KIND_FLAGS, values


# -- JSON and errors -----------------------------------------------------------------------------

def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(frame: Frame) -> Any:
    try:
        return json.loads(bytes(frame))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad JSON frame") from None


def encode_error(exc: BaseException) -> list[Frame]:
    """An exception raised while serving a request, as reply frames: the pickled exception
    (when it can be pickled) and its formatted traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        import cloudpickle

        blob = cloudpickle.dumps(exc, 5)
        pickle.loads(blob)  # an exception that cannot be rebuilt is sent as text only
    except Exception:
        blob = b""
    return [blob, f"{type(exc).__qualname__}: {exc}".encode(), text.encode()]


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def decode_error(frames: Sequence[Frame]) -> BaseException:
    """Rebuild the exception carried by an error reply, with the owner's traceback as its
    ``__cause__``."""
    if len(frames) != 3:
        return ProtocolError(f"malformed error reply ({len(frames)} frames)")
    blob, summary, text = (bytes(f) for f in frames)
    exc: BaseException | None = None
    if blob:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(f"{summary.decode(errors='replace')}\n\n"
                          f"Owner traceback:\n{text.decode(errors='replace')}")
        return exc
    exc.__cause__ = _RemoteTraceback(f'\n"""\nOwner traceback:\n{text.decode(errors="replace")}"""')
    return exc
