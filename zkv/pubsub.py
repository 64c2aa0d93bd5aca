"""Publish/subscribe on the client side: topics, messages, and the pull-style Subscriber.

Every publish goes through the owner, which numbers the messages of each topic and fans them
out on its PUB socket; so every subscriber sees one order, and a gap in the numbers is a
message this subscriber lost (its high-water mark overflowed). :attr:`Subscriber.dropped`
counts them, and a warning is logged.

A subscription is live when :meth:`zkv.Store.subscribe` returns: after subscribing, the
subscriber also subscribes to a one-off *probe* topic; the owner answers the probe with a
*welcome* once it has seen it, and since subscriptions travel in order, every topic subscribed
before the probe is then in place. ZeroMQ's "slow joiner" window is closed, not slept away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq
import zmq.asyncio

from . import codec, wire
from .errors import OwnerGoneError, ProtocolError, StoreClosedError, ZkvTimeoutError
from .sockets import poll as _poll
from .sockets import recv_rest
from .wire import Kind

__all__ = ["Change", "Message", "Subscriber", "Topics"]

log = logging.getLogger("zkv.pubsub")

_SLICE = 0.1  # seconds between owner-liveness checks while waiting
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_MESSAGE, _SET, _EXPIRE = int(Kind.MESSAGE), int(Kind.SET), int(Kind.EXPIRE)
_MERGED, _MORE, _FLAGS = wire.KIND_MERGED, wire.KIND_MORE, wire.KIND_FLAGS
_parse_head = wire.parse_head
_monotonic = time.monotonic
_SKIP = object()  # not a message for this subscriber
#: Topics whose match and name a Subscriber remembers (then it starts again: a prefix
#: subscription may see any number of channels).
_NAMES_KEPT = 4096

#: Seconds to wait for a welcome before probing again: when a subscriber's queue is full, the
#: owner drops a welcome like any other message.
REPROBE_AFTER = 0.5


@dataclasses.dataclass(frozen=True)
class Message:
    """A published message: its ``channel``, its ``data``, and ``seq``, its number among the
    messages of that channel (1, 2, 3, ...)."""

    channel: str
    data: Any
    seq: int


_new = object.__new__


def _message(channel: str, data: Any, seq: int) -> Message:
    """``Message(channel, data, seq)`` in half the time: a frozen dataclass's ``__init__``
    sets each field through ``object.__setattr__``; this fills the instance's ``__dict__``
    (the same result: Message has no ``__post_init__`` and no slots)."""
    message = _new(Message)
    fields = message.__dict__
    fields["channel"] = channel
    fields["data"] = data
    fields["seq"] = seq
    return message


@dataclasses.dataclass(frozen=True)
class Change:
    """A change to a key: ``kind`` is ``"set"``, ``"delete"`` or ``"expire"`` (the key's time
    to live ran out); ``value`` is the new value (None for a delete or an expiry); ``version``
    is the store's change counter after the change."""

    key: str
    kind: str
    value: Any
    version: int


class Topics:
    """The ZeroMQ topics of one subscription, and the exact-match check that goes with them.

    ZeroMQ matches topics by prefix; an exact channel's topic ends in a NUL byte, and a
    received topic is checked again here, so ``"news"`` never receives ``"newsletter"`` (nor
    ``"news\\0x"``).
    """

    def __init__(self, namespace: bytes, exact: Iterable[str] = (),
                 prefixes: Iterable[str] = ()) -> None:
        self.namespace = namespace
        self.exact = {wire.topic(namespace, wire.key_bytes(name)) for name in exact}
        self.prefixes = [wire.topic(namespace, wire.key_bytes(p), exact=False) for p in prefixes]

    @classmethod
    def channels(cls, channels: Sequence[str], prefix: str | Iterable[str] | None) -> Topics:
        return cls(wire.CHANNEL_TOPIC, _check_names(channels, "channel"), _prefix_list(prefix))

    @classmethod
    def keys(cls, key: str | None, prefix: str | Iterable[str] | None) -> Topics:
        exact = [] if key is None else _check_names([key], "key")
        prefixes = _prefix_list(prefix)
        if key is None and not prefixes:
            prefixes = [""]  # every key
        return cls(wire.KEY_TOPIC, exact, prefixes)

    @classmethod
    def monitor(cls) -> Topics:
        """The owner's monitor (see :meth:`zkv.Store.monitor`)."""
        topics = cls(wire.MONITOR_TOPIC[:1])
        topics.exact = {wire.MONITOR_TOPIC}
        return topics

    def all(self) -> list[bytes]:
        return sorted(self.exact) + self.prefixes

    def matches(self, topic: bytes) -> bool:
        if topic in self.exact:
            return True
        return any(topic.startswith(p) for p in self.prefixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)


def _check_names(names: Iterable[str], what: str) -> list[str]:
    out = list(names)
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"{what} names must be str, not {type(name).__name__}")
    return out


def _prefix_list(prefix: str | Iterable[str] | None) -> list[str]:
    if prefix is None:
        return []
    if isinstance(prefix, str):
        return [prefix]
    return _check_names(prefix, "prefix")


def read_frames(sock: zmq.Socket[Any], head: bytes, kind: int, at: int) -> list[Any]:
    """The value frames of a published message whose first frame is ``head`` (parsed by
    :func:`zkv.wire.parse_head`: ``kind`` with its flags, ``at``): the one riding in ``head``
    and those that follow it on ``sock`` (which must be read even if the message is then
    skipped)."""
    frames: list[Any] = [head[at:]] if kind & _MERGED else []
    if kind & _MORE:
        frames.extend(recv_rest(sock))
    return frames


def decode_data(name: str, version: int, kind: int, frames: Sequence[Any]) -> Any:
    """The data of a received message of channel or key ``name`` (``kind`` without flags):
    the value published, or a :class:`Change` of the key. Raises
    :class:`~zkv.DecodeError` if the value cannot be unpickled here."""
    if kind == _MESSAGE:
        return codec.loads(frames)
    if kind == _SET:
        return Change(name, "set", codec.loads(frames) if frames else None, version)
    return Change(name, "expire" if kind == _EXPIRE else "delete", None, version)


class GapCounter:
    """Counts messages lost per topic from their sequence numbers; logs a warning when it
    finds some: at most once a second per counter, with what was lost since the last one (the
    rest is reported by the next message after that second, or by :meth:`report`)."""

    def __init__(self, what: str, hwm: int) -> None:
        self.what = what
        self.hwm = hwm
        self.dropped = 0
        self._last: dict[bytes, int] = {}
        self._unreported = 0
        self._reported_at = 0.0

    def start(self, snapshot: dict[bytes, int],
              followed: Callable[[bytes], bool] | None = None) -> None:
        """Count from the welcome's snapshot for topics not already followed (``followed``
        says which are; by default, those seen before)."""
        for topic, seq in snapshot.items():
            if followed is None or followed(topic):
                self._last.setdefault(topic, seq)
            else:
                self._last[topic] = seq

    def accept(self, topic: bytes, seq: int) -> bool:
        """Record ``seq`` for ``topic``; False if the message is older than the subscription."""
        last = self._last
        prev = last.get(topic, 0)
        if seq == prev + 1 and not self._unreported:  # the usual case: the next one
            last[topic] = seq
            return True
        if seq <= prev:
            return False
        self._last[topic] = seq
        gap = seq - prev - 1
        if gap:
            self.dropped += gap
            self._unreported += gap
        if self._unreported and time.monotonic() - self._reported_at >= 1.0:
            self.report()
        return True

    def report(self) -> None:
        """Log the losses not reported yet, if any."""
        if self._unreported:
            log.warning("%s lost %d message(s) (%d in all): it fell behind by more than its "
                        "high-water mark (hwm=%d)", self.what, self._unreported, self.dropped,
                        self.hwm)
            self._unreported = 0
            self._reported_at = time.monotonic()


def open_sub_socket(ctx: zmq.Context[Any], address: str, hwm: int) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def await_welcome(sock: zmq.Socket[Any], topics: Sequence[bytes], timeout: float,
                  alive: Callable[[], bool],
                  announce: Callable[[bytes], None] | None = None) -> dict[bytes, int]:
    """Probe for ``topics`` (subscribed on ``sock`` already) and wait for the owner's welcome;
    discard anything received before it (published before the subscription was live).
    Probes again every REPROBE_AFTER seconds (the answer to any probe will do). ``announce``
    tells the owner a probe is coming, so that it watches for it at once. Returns the
    welcome's snapshot."""
    now = time.monotonic()
    deadline = now + timeout
    probes: list[bytes] = []
    reprobe_at = now
    while True:
        now = time.monotonic()
        if now >= reprobe_at:
            probes.append(wire.make_probe(topics))
            sock.setsockopt(zmq.SUBSCRIBE, probes[-1])
            if announce is not None:
                announce(probes[-1])
            reprobe_at = now + REPROBE_AFTER
        remaining = deadline - now
        if sock.poll(int(max(0.0, min(remaining, _SLICE)) * 1000)):
            try:
                topic, _seq, _version, kind, values = wire.split_published(
                    sock.recv_multipart())
            except ProtocolError:
                continue
            if topic in probes and kind == Kind.WELCOME and len(values) == 1:
                for probe in probes:
                    sock.setsockopt(zmq.UNSUBSCRIBE, probe)
                return wire.parse_welcome(values[0])
        elif not alive():
            raise OwnerGoneError("the zkv owner is gone")
        if remaining <= 0:
            raise ZkvTimeoutError(f"the zkv owner did not confirm a subscription within {timeout}s")


def _cancelling() -> bool:
    """Whether the current asyncio task is being cancelled (Python 3.11+; else False)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


class Subscriber:
    """Messages of some channels (or change events of some keys), pulled by the caller.

    Made by :meth:`zkv.Store.subscribe` or :meth:`zkv.Store.watch`; live from the moment it
    is returned. Use :meth:`receive` / :meth:`receive_message` with a timeout, iterate
    (``for data in sub``, ``async for data in sub``), and :meth:`close` it (or use it as a
    context manager). It holds its own SUB socket; one thread at a time may receive.
    """

    def __init__(self, ctx: zmq.Context[Any], address: str, topics: Topics, *, hwm: int,
                 timeout: float, alive: Callable[[], bool], what: str,
                 announce: Callable[[bytes], None] | None = None) -> None:
        if not topics:
            raise ValueError("subscribe to at least one channel or prefix")
        self._topics = topics
        self._alive = alive
        self._lock = threading.Lock()
        self._closed = False
        self._gaps = GapCounter(what, hwm)
        self._sock = open_sub_socket(ctx, address, hwm)
        self._recv = self._sock.recv
        self._items = [(self._sock, _POLLIN)]
        self._names: dict[bytes, str] = {}  # topic -> name, of the topics it asked for
        self._ignored: set[bytes] = set()  # topics it did not ask for (ZeroMQ's prefix match)
        self._async_sock: zmq.asyncio.Socket | None = None
        try:
            for topic in topics.all():
                self._sock.setsockopt(zmq.SUBSCRIBE, topic)
            self._gaps.start(await_welcome(self._sock, topics.all(), timeout, alive, announce))
        except BaseException:
            self._closed = True
            self._sock.close(0)
            raise

    @property
    def dropped(self) -> int:
        """How many messages this subscriber lost because it fell behind (sequence gaps)."""
        return self._gaps.dropped

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`unsubscribe`) was called."""
        return self._closed

    def receive_message(self, timeout: float | None = None) -> Message:
        """The next :class:`Message`. Waits up to ``timeout`` seconds (None: until one comes)
        and then raises :class:`~zkv.ZkvTimeoutError`; raises :class:`~zkv.OwnerGoneError` if
        the owner dies while waiting and :class:`~zkv.StoreClosedError` once closed."""
        return self._receive(timeout, True)  # type: ignore[no-any-return]

    def receive(self, timeout: float | None = None) -> Any:
        """The next message's data (see :meth:`receive_message`)."""
        return self._receive(timeout, False)

    def _receive(self, timeout: float | None, whole: bool) -> Any:
        """The next message (``whole``) or its data. What is queued is taken without waiting;
        else a ``poll`` waits, at most a slice at a time (so that a dead owner is noticed),
        and counts its timeout down across signals (a blocking ``recv`` would restart its own
        after each one, and never end under a profiler's or an alarm's signals)."""
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise StoreClosedError("this subscriber is closed")
                try:
                    head = self._recv(_NOBLOCK)
                except zmq.Again:
                    head = None
                if head is not None:
                    got = self._take(head, whole)
                    if got is not _SKIP:
                        return got
                    continue
                left = _SLICE if deadline is None else min(_SLICE, deadline - _monotonic())
                if left > 0 and _poll(self._items, max(1, int(left * 1000))):
                    continue
            if not self._alive():
                raise OwnerGoneError("the zkv owner is gone")
            if deadline is not None and _monotonic() >= deadline:
                raise ZkvTimeoutError(f"no message within {timeout}s")

    def _take(self, head: bytes, whole: bool) -> Any:
        """The message (``whole``) or the data whose first frame is ``head`` (its other
        frames are read here), or _SKIP if it is not for this subscriber (a prefix match of
        ZeroMQ's that is not one of its own, a late welcome) or older than its welcome."""
        try:
            topic, seq, version, kind, at = _parse_head(head)
        except ProtocolError:
            while self._sock.get(zmq.RCVMORE):  # skip the rest of it
                self._sock.recv()
            return _SKIP
        flags = kind & _FLAGS
        frames = [head[at:]] if flags == _MERGED else \
            read_frames(self._sock, head, kind, at) if flags else ()
        name = self._names.get(topic)
        if name is None:
            name = self._learn(topic)
            if name is None:
                return _SKIP
        if not self._gaps.accept(topic, seq):
            return _SKIP
        kind &= ~_FLAGS
        if kind == _MESSAGE:
            data = codec.loads(frames)
        else:
            data = decode_data(name, version, kind, frames)
        return _message(name, data, seq) if whole else data

    def _learn(self, topic: bytes) -> str | None:
        """The name of ``topic``, or None if this subscriber did not ask for it."""
        if topic in self._ignored:
            return None
        if len(self._names) + len(self._ignored) >= _NAMES_KEPT:
            self._names.clear()
            self._ignored.clear()
        if not self._topics.matches(topic):
            self._ignored.add(topic)
            return None
        name = self._names[topic] = wire.topic_name(topic)
        return name

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.receive()
            except StoreClosedError:
                return

    async def _areceive_message(self) -> Message:
        if self._async_sock is None:
            self._async_sock = zmq.asyncio.Socket.from_socket(self._sock)
        while True:
            if self._closed:
                raise StoreClosedError("this subscriber is closed")
            try:
                events = await self._async_sock.poll(int(_SLICE * 1000))
            except asyncio.CancelledError:
                # close() cancels the pending poll: that ends iteration; a cancelled task
                # stays cancelled.
                if self._closed and not _cancelling():
                    raise StoreClosedError("this subscriber is closed") from None
                raise
            if events:
                with self._lock:
                    if self._closed:
                        raise StoreClosedError("this subscriber is closed")
                    try:
                        head = self._recv(_NOBLOCK)
                    except zmq.Again:
                        continue
                    message = self._take(head, True)
                if message is not _SKIP:
                    return message  # type: ignore[no-any-return]
            elif not self._alive():
                raise OwnerGoneError("the zkv owner is gone")

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        while True:
            try:
                message = await self._areceive_message()
            except StoreClosedError:
                return
            yield message.data

    async def areceive(self, timeout: float | None = None) -> Any:
        """``await`` the next message's data; raises ZkvTimeoutError after ``timeout``."""
        try:
            message = await asyncio.wait_for(self._areceive_message(), timeout)
        except asyncio.TimeoutError:
            raise ZkvTimeoutError(f"no message within {timeout}s") from None
        return message.data

    def unsubscribe(self) -> None:
        """Stop receiving new messages; iteration ends. Same as :meth:`close`."""
        self.close()

    def close(self) -> None:
        """Unsubscribe and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            if self._async_sock is not None:
                self._async_sock.close(0)
            self._sock.close(0)
            self._gaps.report()

    def __enter__(self) -> Subscriber:
        return self

    def __del__(self) -> None:
        # Close the socket before warning (a warning may be an error): an unclosed socket
        # would keep the store's ZeroMQ context, and so the process's exit, waiting.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                return
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "live"
        topics = [t.decode(errors="replace") for t in self._topics.all()]
        return f"<zkv.Subscriber {state} {topics} dropped={self.dropped}>"
