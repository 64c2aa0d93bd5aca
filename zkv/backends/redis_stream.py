"""One Redis connection in subscribe mode, for :mod:`~zkv.backends.redis_pubsub`: its
subscriptions (kept across reconnections), and the accounting of what it received.

**Live on return.** A subscription is live once Redis has confirmed it: the stream reads the
confirmations in order with the messages.

**Losses are counted.** Redis drops nothing while a subscriber stays connected; it loses
messages when the connection ends -- the server restarts, the network fails, or the server
disconnects a subscriber that fell behind by more than ``client-output-buffer-limit pubsub``.
The stream then reconnects by itself, subscribes again, and asks for a *welcome*: a script
(:data:`~zkv.backends.redis_scripts.WELCOME`) that publishes, on the stream's own probe
channel (so that it arrives in order with the messages), the sequence number every one of its
channels has reached. Each message carries its channel's number, so the stream counts exactly
what it missed. For watches the count is the number of changes the namespace saw while it was
away (Redis cannot tell which keys they touched): it may count more than were lost, never
fewer. Expiry events are not numbered: one missed while disconnected is not counted. A server
that restarted (another ``run_id``) or lost the namespace's state (another ``{ns}:epoch``)
starts the numbers afresh.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import wire
from ..errors import ZkvConnectionError, ZkvError
from ..pubsub import Topics
from ..sockets import Waker
from .redis_scripts import WELCOME

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisCore

__all__ = ["CHANGE", "EXPIRE", "MSG", "RECONNECT_EVERY", "SKIP", "SLICE", "Stream", "Waiter",
           "enc", "names"]

log = logging.getLogger("zkv.redis")

#: Seconds between looks at close() and the connection while waiting.
SLICE = 0.1
#: Seconds between two attempts to reconnect.
RECONNECT_EVERY = 0.1
#: Kinds of delivery: a published message, a change event, an expiry.
MSG, CHANGE, EXPIRE = 1, 2, 3
#: What :meth:`Stream.next` returns when something else than a delivery was read (a
#: confirmation, a welcome) or a slice passed: the caller looks at what changed.
SKIP: Any = object()
_monotonic = time.monotonic


def names(topics: Topics) -> tuple[list[str], list[str]]:
    """The exact names and the prefixes of a zkv :class:`~zkv.pubsub.Topics`."""
    exact = [wire.topic_name(t) for t in sorted(topics.exact)]
    prefixes = [wire.topic_name(p + b"\0") for p in topics.prefixes]
    return exact, prefixes


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Waiter:
    """Told when Redis has confirmed a subscription (:meth:`set`), or refused it
    (:meth:`fail`: :attr:`error` holds why)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def set(self) -> None:
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self.event.wait(timeout)


@dataclasses.dataclass(eq=False)
class _Request:
    """Subscriptions sent, waiting for their confirmations (then a welcome is asked for).
    ``pending``: for each command sent (SUBSCRIBE, PSUBSCRIBE), the confirmations still to
    come; Redis answers a refused command with one error instead."""

    pending: collections.deque[int]
    channels: list[bytes]  # exact channel names (without prefix) to welcome
    prefixes: list[bytes]  # channel prefixes to welcome
    reconnect: bool
    done: list[Waiter]
    topics: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
    error: BaseException | None = None


@dataclasses.dataclass(eq=False)
class _Welcome:
    channels: list[bytes]
    prefixes: list[bytes]
    reconnect: bool


class Stream:
    """One Redis connection in subscribe mode: its subscriptions (reference counted), kept
    across reconnections, and the accounting of what it received (see the module
    docstring). Used by one thread at a time."""

    def __init__(self, core: RedisCore, what: str, waker: Waker | None = None) -> None:
        space = core.space
        self.core = core
        self.what = what
        self._waker = waker
        self._cp = enc(space.channel_prefix)
        self._cpl = len(self._cp)
        self._wp = enc(space.watch_prefix)
        self._wpl = len(self._wp)
        self._vp = space.value_prefix_bytes
        self._vpl = len(self._vp)
        self._marker = enc(space.watch_marker)
        self._expired = f"__keyevent@{core.url.db}__:expired".encode()
        self._probe = enc(space.probe_prefix) + os.urandom(8).hex().encode()
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
            key_prefixes: list[str], done: Waiter | None = None) -> _Request:
        """Subscribe to channels and prefixes, and to the change events of keys and key
        prefixes. Their confirmations come in the stream; ``done`` is set once they all
        came (the subscription is then live), or failed if Redis refused it."""
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
        request = _Request(collections.deque(n for n in (len(new_channels),
                                                          len(new_patterns)) if n),
                           [enc(c) for c in channels], [enc(p) for p in prefixes], False,
                           [done] if done is not None else [],
                           (channels, prefixes, keys, key_prefixes))
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
                self._welcomed.discard(enc(channel))
        for prefix in prefixes:
            if self.core.space.channel_pattern(prefix) not in self._patterns:
                self._welcomed_prefixes.discard(enc(prefix))
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
        """The next delivery -- ``(MSG, channel bytes, seq, data bytes)``, ``(CHANGE, key
        bytes, version, payload)`` or ``(EXPIRE, key bytes, version, None)`` -- or None if
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
                    left = SLICE if deadline is None else min(SLICE, deadline - _monotonic())
                    if left <= 0:
                        return None
                    if not self._wait(left):
                        if deadline is not None and _monotonic() >= deadline:
                            return None
                        return SKIP  # (a slice passed: the caller looks at close())
                    continue
            except self.core.response_error as exc:  # Redis refused a subscription
                self._refused(exc)
                return SKIP
            except Exception as exc:
                self._lost(exc)
                continue
            item = self._handle(reply)
            return SKIP if item is None else item  # (the caller looks at what changed)

    def socket(self) -> Any:
        """The connection's socket (None while disconnected), for an event loop to watch."""
        return self._conn._sock

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
            return (MSG, name, seq, memoryview(data)[bar + 1:])
        if channel.startswith(self._wp):
            bar = data.index(b"|")
            version = int(data[:bar])
            if version <= self._version_seen:
                return None  # (the same event through an exact and a prefix subscription)
            self._version_seen = version
            if self._version_at_loss is not None:
                self._since_loss += 1
            return (CHANGE, channel[self._wpl:], version, memoryview(data)[bar + 1:])
        if channel == self._expired:
            if data.startswith(self._vp):
                return (EXPIRE, data[self._vpl:], self._version_seen, None)
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
        request.pending[0] -= 1
        if request.pending[0] <= 0:
            request.pending.popleft()
            self._settle(request)

    def _refused(self, exc: BaseException) -> None:
        """Redis answered a subscription with an error (no permission, most likely): the
        request it belongs to fails, and what it subscribed to is undone."""
        if not self._requests:
            log.warning("%s: Redis refused a command: %s", self.what, exc)
            return
        request = self._requests[0]
        request.error = request.error or self.core.translate(exc)
        if request.pending:
            request.pending.popleft()  # (one error stands for the command's confirmations)
        self._settle(request)

    def _settle(self, request: _Request) -> None:
        if request.pending:
            return
        self._requests.popleft()
        if request.error is not None:
            if not request.reconnect:
                self.remove(*request.topics)
            for done in request.done:
                done.fail(request.error)
            return
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
                time.sleep(min(RECONNECT_EVERY, max(0.0, (deadline or now + 1) - now)))
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
        self._requests.append(_Request(
            collections.deque(n for n in (1 + len(self._channels), len(self._patterns)) if n),
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
        if again:
            return  # (said once already)
        log.warning("watch(): could not check or turn on Redis's expired-key events (%s): "
                    "unless the server's notify-keyspace-events holds 'E' and 'x', watchers "
                    "will not see 'expire' changes", exc)


# -- the pull-style subscriber -----------------------------------------------------------------
