"""Publish/subscribe and watches on Redis: :class:`RedisSubscriber` and :class:`RedisDispatcher`,
with the public interface of :class:`zkv.Subscriber` and of zkv's callback dispatcher.

Channel ``c`` of namespace ``ns`` is the Redis channel ``{ns}:c:c``; a prefix subscription is
a ``PSUBSCRIBE`` of ``{ns}:c:<prefix>*`` (glob characters escaped), so matching is exact as
in zkv. Change events of key ``k`` go to ``{ns}:w:k`` (see :mod:`~zkv.backends.redis_scripts`);
expiry comes from Redis itself, as the keyspace event ``__keyevent@<db>__:expired``, which
needs ``notify-keyspace-events`` to hold ``E`` and ``x``: a watcher turns them on if they are
off (``CONFIG SET``; where CONFIG is refused it logs a warning and watches go without
``"expire"`` events).

**Live on return.** ``subscribe()`` returns once Redis has confirmed the subscription: a
message published after that reaches it.

**Losses are counted.** Redis drops nothing while a subscriber stays connected; it loses
messages when the connection ends -- the server restarts, the network fails, or the server
disconnects a subscriber that fell behind by more than ``client-output-buffer-limit pubsub``.
A subscriber then reconnects by itself, subscribes again, and asks for a *welcome*: a script
that publishes, on the subscriber's own probe channel (so that it arrives in order with the
messages), the sequence number every one of its channels has reached. Each message carries its
channel's number, so the subscriber counts exactly what it missed (:attr:`dropped`), and logs
a warning. For watches the count is the number of changes the namespace saw while it was
away (Redis cannot tell which keys they touched): it may count more than were lost, never
fewer. Expiry events are not numbered: one missed while disconnected is not counted.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import os
import pickle
import select
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import wire
from ..dispatch import Dispatcher, _AsyncRunner
from ..errors import StoreClosedError, ZkvConnectionError, ZkvError, ZkvTimeoutError
from ..pubsub import Change, Message, Subscriber, Topics, _message
from ..sockets import Waker
from . import UnsupportedError, redis_codec
from .redis_scripts import WELCOME

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisCore

__all__ = ["RedisDispatcher", "RedisSubscriber"]

log = logging.getLogger("zkv.redis")

_SLICE = 0.1  # seconds between looks at close() and the connection while waiting
_RECONNECT_EVERY = 0.1
_MSG, _CHANGE, _EXPIRE = 1, 2, 3
_loads = pickle.loads
_decode = redis_codec.loads
_monotonic = time.monotonic
_SKIP: Any = object()


def _names(topics: Topics) -> tuple[list[str], list[str]]:
    """The exact names and the prefixes of a zkv :class:`~zkv.pubsub.Topics`."""
    exact = [wire.topic_name(t) for t in sorted(topics.exact)]
    prefixes = [wire.topic_name(p + b"\0") for p in topics.prefixes]
    return exact, prefixes


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@dataclasses.dataclass(eq=False)
class _Request:
    """Subscriptions sent, waiting for their confirmations (then a welcome is asked for)."""

    confirmations: int
    channels: list[bytes]  # exact channel names (without prefix) to welcome
    prefixes: list[bytes]  # channel prefixes to welcome
    reconnect: bool
    done: list[threading.Event]


@dataclasses.dataclass(eq=False)
class _Welcome:
    channels: list[bytes]
    prefixes: list[bytes]
    reconnect: bool


class _Stream:
    """One Redis connection in subscribe mode: its subscriptions (reference counted), kept
    across reconnections, and the accounting of what it received (see the module
    docstring). Used by one thread at a time."""

    def __init__(self, core: RedisCore, what: str, waker: Waker | None = None) -> None:
        space = core.space
        self.core = core
        self.what = what
        self._waker = waker
        self._cp = _enc(space.channel_prefix)
        self._cpl = len(self._cp)
        self._wp = _enc(space.watch_prefix)
        self._wpl = len(self._wp)
        self._vp = space.value_prefix_bytes
        self._vpl = len(self._vp)
        self._marker = _enc(space.watch_marker)
        self._expired = f"__keyevent@{core.url.db}__:expired".encode()
        self._probe = _enc(space.probe_prefix) + os.urandom(8).hex().encode()
        self._channels: dict[bytes, int] = {}  # Redis channel -> how many want it
        self._patterns: dict[bytes, int] = {}
        self._requests: collections.deque[_Request] = collections.deque()
        self._welcomes: collections.deque[_Welcome] = collections.deque()
        # What was received: per channel the last number delivered and the highest known.
        self._seen: dict[bytes, int] = {}
        self._hw: dict[bytes, int] = {}
        self._welcomed: set[bytes] = set()
        self._welcomed_prefixes: set[bytes] = set()
        self._version_seen = 0
        self._version_at_loss: int | None = None
        self._since_loss = 0
        self._epoch: bytes | None = None
        self._run_id: str | None = None
        self.dropped = 0
        self._unreported = 0
        self._reported_at = 0.0
        self._lost_at: float | None = None
        self._conn: Any = core.new_connection()
        try:
            self._conn.connect()
            self._run_id = self._server_id()
            self._send([("SUBSCRIBE", self._probe)])
            self._conn.read_response()
        except Exception as exc:
            self._conn.disconnect()
            raise core.translate(exc) if isinstance(exc, core._redis_error) else exc from exc

    # -- subscribing -------------------------------------------------------------------------

    def _send(self, commands: list[tuple[Any, ...]]) -> None:
        if commands:
            self._conn.send_packed_command(self._conn.pack_commands(commands))

    def _server_id(self) -> str | None:
        try:
            info = self.core.command("INFO", "server")
            return str(info.get("run_id"))
        except ZkvError:
            return None

    def add(self, channels: list[str], prefixes: list[str], keys: list[str],
            key_prefixes: list[str], done: threading.Event | None = None) -> _Request:
        """Subscribe to channels and prefixes, and to the change events of keys and key
        prefixes. Their confirmations come in the stream; ``done`` is set once they all
        came (the subscription is then live)."""
        new_channels: list[bytes] = []
        new_patterns: list[bytes] = []
        wanted = [self.core.space.channel(c) for c in channels] + \
            [self.core.space.watch_channel(k) for k in keys]
        patterns = [self.core.space.channel_pattern(p) for p in prefixes] + \
            [self.core.space.watch_pattern(p) for p in key_prefixes]
        if keys or key_prefixes:
            wanted += [self._marker, self._expired]
            _enable_expiry_events(self.core)
        for name in wanted:
            self._channels[name] = self._channels.get(name, 0) + 1
            new_channels.append(name)
        for pattern in patterns:
            self._patterns[pattern] = self._patterns.get(pattern, 0) + 1
            new_patterns.append(pattern)
        request = _Request(len(new_channels) + len(new_patterns),
                           [_enc(c) for c in channels], [_enc(p) for p in prefixes], False,
                           [done] if done is not None else [])
        self._requests.append(request)
        try:
            self._send(([("SUBSCRIBE", *new_channels)] if new_channels else [])
                       + ([("PSUBSCRIBE", *new_patterns)] if new_patterns else []))
        except Exception as exc:
            self._lost(exc)
        return request

    def remove(self, channels: list[str], prefixes: list[str], keys: list[str],
               key_prefixes: list[str]) -> None:
        """Undo an :meth:`add` (the subscriptions nobody else wants end)."""
        gone_channels: list[bytes] = []
        gone_patterns: list[bytes] = []
        wanted = [self.core.space.channel(c) for c in channels] + \
            [self.core.space.watch_channel(k) for k in keys]
        if keys or key_prefixes:
            wanted += [self._marker, self._expired]
        for name in wanted:
            self._channels[name] -= 1
            if not self._channels[name]:
                del self._channels[name]
                gone_channels.append(name)
        for pattern in [self.core.space.channel_pattern(p) for p in prefixes] + \
                [self.core.space.watch_pattern(p) for p in key_prefixes]:
            self._patterns[pattern] -= 1
            if not self._patterns[pattern]:
                del self._patterns[pattern]
                gone_patterns.append(pattern)
        # Forget what was received on channels nobody follows now: a later subscription
        # starts from its own welcome, without counting what was published meanwhile.
        for channel in channels:
            if self.core.space.channel(channel) not in self._channels:
                self._welcomed.discard(_enc(channel))
        for prefix in prefixes:
            if self.core.space.channel_pattern(prefix) not in self._patterns:
                self._welcomed_prefixes.discard(_enc(prefix))
        for known in [k for k in self._hw if not self._followed(k)]:
            self._hw.pop(known, None)
            self._seen.pop(known, None)
        try:
            self._send(([("UNSUBSCRIBE", *gone_channels)] if gone_channels else [])
                       + ([("PUNSUBSCRIBE", *gone_patterns)] if gone_patterns else []))
        except Exception as exc:
            self._lost(exc)

    def _followed(self, name: bytes) -> bool:
        if self._cp + name in self._channels:
            return True
        return any((self._cp + name).startswith(_unglob(p)) for p in self._patterns)

    # -- receiving ---------------------------------------------------------------------------

    def next(self, timeout: float | None, deadline_error: bool = True) -> Any:
        """The next delivery -- ``(_MSG, channel bytes, seq, data bytes)``, ``(_CHANGE, key
        bytes, version, payload)`` or ``(_EXPIRE, key bytes, version, None)`` -- or None if
        nothing came within ``timeout`` (0: only what is here). Handles confirmations,
        welcomes and reconnections on the way."""
        deadline = None if timeout is None else _monotonic() + timeout
        conn = self._conn
        while True:
            if self._lost_at is not None:
                if not self._reconnect(deadline):
                    return None
                conn = self._conn
            try:
                if conn.can_read(0):
                    reply = conn.read_response()
                else:
                    left = _SLICE if deadline is None else min(_SLICE, deadline - _monotonic())
                    if left <= 0:
                        return None
                    if not self._wait(left):
                        if deadline is not None and _monotonic() >= deadline:
                            return None
                        return _SKIP  # (a slice passed: the caller looks at close())
                    continue
            except Exception as exc:
                self._lost(exc)
                continue
            item = self._handle(reply)
            return _SKIP if item is None else item  # (the caller looks at what changed)

    def _wait(self, seconds: float) -> bool:
        """Wait for the socket (or the waker); True if something may be readable."""
        sock = self._conn._sock
        if sock is None:
            return True  # (can_read connects, or fails and reconnects)
        fds = [sock] if self._waker is None else [sock, self._waker.fd]
        try:
            ready, _, _ = select.select(fds, [], [], seconds)
        except (OSError, ValueError):
            return True
        if self._waker is not None and self._waker.fd in ready:
            return False
        return bool(ready)

    def _handle(self, reply: Any) -> Any:
        kind = reply[0]
        if kind == b"message":
            channel, data = reply[1], reply[2]
        elif kind == b"pmessage":
            channel, data = reply[2], reply[3]
        elif kind in (b"subscribe", b"psubscribe"):
            self._confirmed()
            return None
        else:
            return None  # (unsubscribe confirmations, pongs)
        if channel.startswith(self._cp):
            bar = data.index(b"|")
            name = channel[self._cpl:]
            seq = int(data[:bar])
            hw = self._hw.get(name)
            if hw is not None and seq == hw + 1:  # the usual case: the next one
                self._hw[name] = self._seen[name] = seq
            elif not self._accept(name, seq):
                return None
            return (_MSG, name, seq, memoryview(data)[bar + 1:])
        if channel.startswith(self._wp):
            bar = data.index(b"|")
            version = int(data[:bar])
            if version <= self._version_seen:
                return None  # (the same event through an exact and a prefix subscription)
            self._version_seen = version
            if self._version_at_loss is not None:
                self._since_loss += 1
            return (_CHANGE, channel[self._wpl:], version, memoryview(data)[bar + 1:])
        if channel == self._expired:
            if data.startswith(self._vp):
                return (_EXPIRE, data[self._vpl:], self._version_seen, None)
            return None
        if channel == self._probe:
            self._welcome(data)
        return None

    def _accept(self, name: bytes, seq: int) -> bool:
        """Whether message ``seq`` of channel ``name`` is new (counting any gap before it)."""
        last = self._seen.get(name)
        if last is not None and seq <= last:
            return False  # (the same message through an exact and a prefix subscription)
        self._seen[name] = seq
        base = self._hw.get(name)
        if base is None and (name in self._welcomed
                             or any(name.startswith(p) for p in self._welcomed_prefixes)):
            base = 0  # a channel that had no message when the subscription began
        if base is not None and seq > base + 1:
            self._count(seq - base - 1)
        if base is None or seq > base:
            self._hw[name] = seq
        return True

    def _confirmed(self) -> None:
        if not self._requests:
            return
        request = self._requests[0]
        request.confirmations -= 1
        if request.confirmations > 0:
            return
        self._requests.popleft()
        self._ask_welcome(request.channels, request.prefixes, request.reconnect)
        for done in request.done:
            done.set()

    def _ask_welcome(self, channels: list[bytes], prefixes: list[bytes],
                     reconnect: bool) -> None:
        space = self.core.space
        self._welcomes.append(_Welcome(channels, prefixes, reconnect))
        try:
            self.core.script(WELCOME, [space.seqs, space.version, space.epoch],
                             [self._probe, os.urandom(8).hex(), len(channels), *channels,
                              *prefixes])
        except ZkvError as exc:  # the connection is probably going too: it will be redone
            log.debug("%s: could not ask for a welcome: %s", self.what, exc)
            self._welcomes.pop()

    def _welcome(self, payload: bytes) -> None:
        if not self._welcomes:
            return
        welcome = self._welcomes.popleft()
        epoch, version_text, rest = payload.split(b"\n", 2)
        version = int(version_text)
        snapshot: dict[bytes, int] = {}
        at = 0
        while at < len(rest):
            colon = rest.index(b":", at)
            length = int(rest[at:colon])
            name = rest[colon + 1:colon + 1 + length]
            comma = rest.index(b",", colon + 1 + length)
            snapshot[name] = int(rest[colon + 1 + length:comma])
            at = comma + 1
        if self._epoch is None:
            self._epoch = epoch
        for name, seq in snapshot.items():
            known = self._hw.get(name)
            if known is None and welcome.reconnect and self._covered(name):
                known = 0
            if known is not None and welcome.reconnect and seq > known:
                self._count(seq - known)  # published while this subscriber was away
            self._hw[name] = max(seq, known or 0)
        if welcome.reconnect:
            if self._version_at_loss is not None and (self._marker in self._channels):
                missed = version - self._version_at_loss - self._since_loss
                if missed > 0:
                    self._count(missed)
            self._version_at_loss = None
            self._since_loss = 0
        self._welcomed.update(welcome.channels)
        self._welcomed_prefixes.update(welcome.prefixes)

    def _covered(self, name: bytes) -> bool:
        return name in self._welcomed or any(name.startswith(p)
                                             for p in self._welcomed_prefixes)

    def _count(self, lost: int) -> None:
        self.dropped += lost
        self._unreported += lost
        if _monotonic() - self._reported_at >= 1.0:
            self.report()

    def report(self) -> None:
        """Log the losses not reported yet, if any."""
        if self._unreported:
            log.warning("%s lost %d message(s) (%d in all): its connection to Redis ended "
                        "(a restart, the network, or Redis's output buffer limit for a "
                        "subscriber that falls behind)", self.what, self._unreported,
                        self.dropped)
            self._unreported = 0
            self._reported_at = _monotonic()

    # -- connection loss ---------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self._lost_at is None:
            log.info("%s: connection to Redis lost (%s); reconnecting", self.what, exc)
            self._lost_at = _monotonic()
            if self._version_at_loss is None:
                self._version_at_loss = self._version_seen
                self._since_loss = 0
        try:
            self._conn.disconnect()
        except Exception:  # pragma: no cover
            pass

    def _reconnect(self, deadline: float | None) -> bool:
        """Connect again and subscribe to everything again; False if Redis could not be
        reached before ``deadline``. Raises ZkvConnectionError once Redis has been away for
        longer than the store's timeout."""
        assert self._lost_at is not None
        timeout = self.core.timeout
        while True:
            try:
                self._conn.connect()
                break
            except Exception as exc:
                now = _monotonic()
                if timeout is not None and now - self._lost_at >= timeout:
                    raise ZkvConnectionError(
                        f"{self.what}: Redis has been unreachable for {timeout}s: {exc}"
                    ) from exc
                if deadline is not None and now >= deadline:
                    return False
                time.sleep(min(_RECONNECT_EVERY, max(0.0, (deadline or now + 1) - now)))
        self._lost_at = None
        run_id = self._server_id()
        try:
            epoch = self.core.command("GET", self.core.space.epoch)
        except ZkvError:
            epoch = None
        if run_id != self._run_id:
            self._seen.clear()  # another server (a restart, a failover): numbers may repeat
            self._run_id = run_id
        if self._epoch is not None and epoch != self._epoch:
            log.warning("%s: Redis lost this namespace's state (a restart without "
                        "persistence?); what was published before that is not counted",
                        self.what)
            self._hw.clear()
            self._seen.clear()
            self._version_seen = 0
            self._version_at_loss = 0
            self._epoch = None
        if self._marker in self._channels:
            _enable_expiry_events(self.core, again=True)
        waiting = [done for request in self._requests for done in request.done]
        self._requests.clear()
        self._welcomes.clear()
        channels = [c[self._cpl:] for c in self._channels if c.startswith(self._cp)]
        prefixes = sorted({_unglob(p[self._cpl:]) for p in self._patterns
                           if p.startswith(self._cp)})
        self._requests.append(_Request(1 + len(self._channels) + len(self._patterns),
                                       channels, prefixes, True, waiting))
        try:
            self._send([("SUBSCRIBE", self._probe, *self._channels)]
                       + ([("PSUBSCRIBE", *self._patterns)] if self._patterns else []))
        except Exception as exc:
            self._lost(exc)
        return True

    def close(self) -> None:
        try:
            self._conn.disconnect()
        except Exception:  # pragma: no cover
            pass
        self.report()


def _unglob(pattern: bytes) -> bytes:
    """The prefix of a ``PSUBSCRIBE`` pattern made by KeySpace (escapes removed, ``*`` off)."""
    out = bytearray()
    escaped = False
    for byte in pattern[:-1]:
        if byte == 0x5C and not escaped:
            escaped = True
            continue
        escaped = False
        out.append(byte)
    return bytes(out)


def _enable_expiry_events(core: RedisCore, again: bool = False) -> None:
    """Make sure Redis publishes expired-key events (``notify-keyspace-events`` with ``E``
    and ``x``): once per core, and ``again`` after a reconnection (a restarted server
    forgets a ``CONFIG SET``)."""
    if core.expiry_events_checked and not again:
        return
    core.expiry_events_checked = True
    try:
        current = core.command("CONFIG", "GET", "notify-keyspace-events")
        flags = ""
        if isinstance(current, dict):
            flags = str(next(iter(current.values()), ""))
        elif isinstance(current, list) and len(current) == 2:
            flags = current[1].decode() if isinstance(current[1], bytes) else str(current[1])
        if "E" in flags and ("x" in flags or "A" in flags):
            return
        wanted = "".join(sorted(set(flags) | {"E", "x"}))
        core.command("CONFIG", "SET", "notify-keyspace-events", wanted)
    except ZkvError as exc:
        log.warning("watch(): could not turn on Redis's expired-key events (%s); watchers "
                    "will not see 'expire' changes. Set notify-keyspace-events to include "
                    "'Ex' in the server's configuration", exc)


# -- the pull-style subscriber -----------------------------------------------------------------

class RedisSubscriber(Subscriber):
    """A :class:`zkv.Subscriber` on Redis (same interface; see the module docstring)."""

    def __init__(self, core: RedisCore, topics: Topics, what: str) -> None:
        if not topics:
            raise ValueError("subscribe to at least one channel or prefix")
        if topics.namespace not in (wire.CHANNEL_TOPIC, wire.KEY_TOPIC):
            raise UnsupportedError(f"this subscription ({what}) is not available on Redis")
        self._topics = topics
        self._what = what
        self._lock = threading.Lock()
        self._closed = True  # (until it is live)
        self._pending: collections.deque[Any] = collections.deque()
        self._async_waiter: Any = None
        exact, prefixes = _names(topics)
        self._keys = topics.namespace == wire.KEY_TOPIC
        self._exact_keys = {_enc(k) for k in exact} if self._keys else set()
        self._key_prefixes = [_enc(p) for p in prefixes] if self._keys else []
        self._stream = _Stream(core, what)
        done = threading.Event()
        args = ([], [], exact, prefixes) if self._keys else (exact, prefixes, [], [])
        self._stream.add(*args, done=done)
        deadline = None if core.timeout is None else _monotonic() + core.timeout
        try:
            while not done.is_set():  # read until Redis confirms: then it is live
                if deadline is not None and _monotonic() >= deadline:
                    raise ZkvTimeoutError(f"Redis did not confirm a subscription within "
                                          f"{core.timeout}s")
                item = self._stream.next(_SLICE)
                if item is not None and item is not _SKIP:
                    self._pending.append(item)
        except BaseException:
            self._stream.close()
            raise
        self._closed = False

    @property
    def dropped(self) -> int:
        """How many messages this subscriber lost (see the module docstring)."""
        return self._stream.dropped

    @property
    def closed(self) -> bool:
        return self._closed

    def _decode(self, item: Any, whole: bool) -> Any:
        kind, name, seq, data = item
        if kind == _MSG:
            value = _loads(data) if data[:1] == b"\x80" else _decode(bytes(data))
            if not whole:
                return value
            return _message(name.decode("utf-8", "surrogatepass"), value, seq)
        if not (name in self._exact_keys or any(name.startswith(p)
                                                for p in self._key_prefixes)):
            return _SKIP
        key = name.decode("utf-8", "surrogatepass")
        if kind == _EXPIRE:
            change = Change(key, "expire", None, seq)
        elif data[:1] == b"s":
            change = Change(key, "set", _decode(bytes(data[1:])), seq)
        else:
            change = Change(key, "delete", None, seq)
        return _message(key, change, seq) if whole else change

    def _receive(self, timeout: float | None, whole: bool) -> Any:
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise StoreClosedError("this subscriber is closed")
                if self._pending:
                    item = self._pending.popleft()
                else:
                    left = None if deadline is None else max(0.0, deadline - _monotonic())
                    item = self._stream.next(_SLICE if left is None else min(_SLICE, left))
                if item is not None and item is not _SKIP:
                    got = self._decode(item, whole)
                    if got is not _SKIP:
                        return got
                    continue
            if deadline is not None and _monotonic() >= deadline:
                raise ZkvTimeoutError(f"no message within {timeout}s")

    def receive_message(self, timeout: float | None = None) -> Message:
        """The next :class:`~zkv.Message` (see :meth:`zkv.Subscriber.receive_message`)."""
        return self._receive(timeout, True)  # type: ignore[no-any-return]

    def receive(self, timeout: float | None = None) -> Any:
        """The next message's data (see :meth:`receive_message`)."""
        return self._receive(timeout, False)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.receive()
            except StoreClosedError:
                return

    async def _areceive_message(self) -> Message:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._closed:
                    raise StoreClosedError("this subscriber is closed")
                item = self._pending.popleft() if self._pending else self._stream.next(0)
                if item is _SKIP:
                    continue  # (a confirmation or a welcome: more may be buffered)
                if item is not None:
                    got = self._decode(item, True)
                    if got is not _SKIP:
                        return got  # type: ignore[no-any-return]
                    continue
                sock = self._stream._conn._sock
            if sock is None:
                await asyncio.sleep(_RECONNECT_EVERY)
                continue
            readable = loop.create_future()
            fd = sock.fileno()
            loop.add_reader(fd, _resolve, readable)
            self._async_waiter = readable
            try:
                await asyncio.wait_for(readable, _SLICE)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                if self._closed and not _cancelling():
                    raise StoreClosedError("this subscriber is closed") from None
                raise
            finally:
                self._async_waiter = None
                loop.remove_reader(fd)

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
        """Stop receiving; iteration ends. Same as :meth:`close`."""
        self.close()

    def close(self) -> None:
        """Unsubscribe and close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        waiter = self._async_waiter
        if waiter is not None and not waiter.done():
            try:
                waiter.get_loop().call_soon_threadsafe(waiter.cancel)
            except RuntimeError:  # pragma: no cover - its loop is closed
                pass
        with self._lock:
            self._stream.close()

    def __enter__(self) -> RedisSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                return
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "live"
        exact, prefixes = _names(self._topics)
        return f"<zkv.Subscriber {state} (Redis) {exact + [p + '*' for p in prefixes]} " \
               f"dropped={self.dropped}>"


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _cancelling() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


# -- callbacks ---------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Handler:
    topics: Topics
    callback: Callable[[Any], Any]
    runner: _AsyncRunner | None
    names: tuple[list[str], list[str], list[str], list[str]]
    exact: set[bytes]
    prefixes: list[bytes]
    keys: bool
    live: bool = False

    def matches(self, name: bytes) -> bool:
        return name in self.exact or any(name.startswith(p) for p in self.prefixes)


class RedisDispatcher(Dispatcher):
    """zkv's callback dispatcher on Redis: one thread, one subscription connection; callbacks
    run one at a time, in the order Redis delivered the messages (see
    :class:`zkv.dispatch.Dispatcher`)."""

    def __init__(self, core: RedisCore) -> None:
        self._core = core
        self._wait_limit = core.timeout
        self._rhandlers: list[_Handler] = []
        self._runners: dict[int, _AsyncRunner] = {}
        self._mutex = threading.Lock()
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self._stream: _Stream | None = None
        self._stopping = False
        self._failed: BaseException | None = None

    @property
    def dropped(self) -> int:
        return 0 if self._stream is None else self._stream.dropped

    def add(self, topics: Topics, callback: Callable[[Any], Any],
            loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Register ``callback`` for ``topics``; live when this returns (from a callback:
        shortly after it returns)."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if topics.namespace not in (wire.CHANNEL_TOPIC, wire.KEY_TOPIC):
            raise UnsupportedError("this subscription is not available on Redis")
        runner = self._runner(loop) if inspect.iscoroutinefunction(callback) else None
        exact, prefixes = _names(topics)
        keys = topics.namespace == wire.KEY_TOPIC
        names = ([], [], exact, prefixes) if keys else (exact, prefixes, [], [])
        handler = _Handler(topics, callback, runner, names, {_enc(n) for n in exact},
                           [_enc(p) for p in prefixes], keys)
        done = threading.Event()
        with self._mutex:
            self._rhandlers.append(handler)
            self._start()
            self._commands.append(("add", handler, done))
        self._waker.wake()
        if threading.current_thread() is self._thread:
            return
        if not done.wait(self._wait_limit):
            self._unregister(handler)
            raise self._failed or ZkvTimeoutError(
                f"Redis did not confirm a subscription within {self._wait_limit}s")
        if self._failed is not None:
            self._unregister(handler)
            raise self._failed

    def remove(self, callback: Callable[[Any], Any]) -> int:
        with self._mutex:
            gone = [h for h in self._rhandlers if h.callback == callback]
        for handler in gone:
            self._unregister(handler)
        return len(gone)

    def _unregister(self, handler: _Handler) -> None:
        with self._mutex:
            if handler in self._rhandlers:
                self._rhandlers.remove(handler)
                handler.live = False
                self._commands.append(("remove", handler))
        self._waker.wake()

    def _runner(self, loop: asyncio.AbstractEventLoop | None) -> _AsyncRunner:
        key = id(loop)
        with self._mutex:
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = _AsyncRunner(loop)
            return runner

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zkv-dispatch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (after the running callback, at most 2 s) and the event loops."""
        from ..dispatch import CLOSE_WAIT

        self._stopping = True
        self._waker.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=CLOSE_WAIT)
            if thread.is_alive():
                log.warning("a zkv callback is still running after %.0fs; closing without "
                            "waiting for it", CLOSE_WAIT)
        for runner in self._runners.values():
            runner.close()
        if thread is None or not thread.is_alive():
            self._waker.close()

    def _run(self) -> None:
        try:
            stream = self._stream = _Stream(self._core, "zkv callbacks", self._waker)
        except BaseException as exc:
            self._failed = exc
            with self._mutex:
                for command in self._commands:
                    if command[0] == "add":
                        command[2].set()
            return
        try:
            while not self._stopping:
                self._waker.drain()
                while self._commands:
                    command = self._commands.popleft()
                    handler = command[1]
                    if command[0] == "add":
                        done: threading.Event = command[2]
                        request = stream.add(*handler.names)
                        request.done.append(_Live(handler, done))  # type: ignore[arg-type]
                    else:
                        stream.remove(*handler.names)
                try:
                    item = stream.next(_SLICE)
                except ZkvConnectionError as exc:  # Redis away for long: keep trying
                    log.warning("%s; callbacks resume when it is back", exc)
                    self._waker_wait(1.0)
                    continue
                if item is None or item is _SKIP:
                    continue
                self._dispatch(item)
        except Exception as exc:  # pragma: no cover - a bug
            log.exception("zkv dispatcher thread stopped: %s", exc)
        finally:
            stream.close()
            if self._stopping:
                self._waker.close()

    def _waker_wait(self, seconds: float) -> None:
        """Wait ``seconds``, or less if woken (a registration, close)."""
        try:
            select.select([self._waker.fd], [], [], seconds)
        except (OSError, ValueError):  # pragma: no cover - closed meanwhile
            pass

    def _dispatch(self, item: Any) -> None:
        kind, name, seq, data = item
        with self._mutex:
            handlers = [h for h in self._rhandlers
                        if h.live and h.keys == (kind != _MSG) and h.matches(name)]
        if not handlers:
            return
        try:
            text = name.decode("utf-8", "surrogatepass")
            if kind == _MSG:
                value = _loads(data) if data[:1] == b"\x80" else _decode(bytes(data))
            elif kind == _EXPIRE:
                value = Change(text, "expire", None, seq)
            elif data[:1] == b"s":
                value = Change(text, "set", _decode(bytes(data[1:])), seq)
            else:
                value = Change(text, "delete", None, seq)
        except Exception:
            log.exception("zkv dispatcher could not decode a message on %r", name)
            return
        for handler in handlers:
            if self._stopping:
                return
            if handler.runner is not None:
                handler.runner.submit(handler.callback, value)
                continue
            try:
                handler.callback(value)
            except Exception:
                log.exception("zkv callback %r raised", handler.callback)


class _Live:
    """Set by the stream when a handler's subscription is confirmed: the handler is live."""

    def __init__(self, handler: _Handler, done: threading.Event) -> None:
        self._handler = handler
        self._done = done

    def set(self) -> None:
        self._handler.live = True
        self._done.set()
