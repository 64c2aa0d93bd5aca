"""Publish/subscribe and watches on Redis: :class:`RedisSubscriber` and :class:`RedisDispatcher`,
with the public interface of :class:`zkv.Subscriber` and of zkv's callback dispatcher.

Channel ``c`` of namespace ``ns`` is the Redis channel ``{ns}:c:c``; a prefix subscription is
a ``PSUBSCRIBE`` of ``{ns}:c:<prefix>*`` (glob characters escaped), so matching is exact as
in zkv. Change events of key ``k`` go to ``{ns}:w:k`` (see :mod:`~zkv.backends.redis_scripts`);
expiry comes from Redis itself, as the keyspace event ``__keyevent@<db>__:expired``, which
needs ``notify-keyspace-events`` to hold ``E`` and ``x``: a watcher turns them on if they are
off (``CONFIG SET``; where CONFIG is refused it logs a warning and watches go without
``"expire"`` events).

``subscribe()`` returns once Redis has confirmed the subscription (it is live); a subscriber
reconnects by itself and counts what it missed (:attr:`RedisSubscriber.dropped`): see
:mod:`~zkv.backends.redis_stream`, which both classes read from.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import pickle
import select
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import wire
from ..dispatch import Dispatcher, _AsyncRunner
from ..errors import StoreClosedError, ZkvConnectionError, ZkvTimeoutError
from ..pubsub import Change, Message, Subscriber, Topics, _message
from ..sockets import Waker
from . import UnsupportedError, redis_codec
from .redis_stream import EXPIRE, MSG, RECONNECT_EVERY, SKIP, SLICE, Stream, Waiter, enc, names

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisCore

__all__ = ["RedisDispatcher", "RedisSubscriber"]

log = logging.getLogger("zkv.redis")

_loads = pickle.loads
_decode = redis_codec.loads
_monotonic = time.monotonic


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
        exact, prefixes = names(topics)
        self._keys = topics.namespace == wire.KEY_TOPIC
        self._exact_keys = {enc(k) for k in exact} if self._keys else set()
        self._key_prefixes = [enc(p) for p in prefixes] if self._keys else []
        self._stream = Stream(core, what)
        done = Waiter()
        args = ([], [], exact, prefixes) if self._keys else (exact, prefixes, [], [])
        self._stream.add(*args, done=done)
        deadline = None if core.timeout is None else _monotonic() + core.timeout
        try:
            while not done.is_set():  # read until Redis confirms: then it is live
                if deadline is not None and _monotonic() >= deadline:
                    raise ZkvTimeoutError(f"Redis did not confirm a subscription within "
                                          f"{core.timeout}s")
                item = self._stream.next(SLICE)
                if item is not None and item is not SKIP:
                    self._pending.append(item)
            if done.error is not None:
                raise done.error
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
        if kind == MSG:
            value = _loads(data) if data[:1] == b"\x80" else _decode(bytes(data))
            if not whole:
                return value
            return _message(name.decode("utf-8", "surrogatepass"), value, seq)
        if not (name in self._exact_keys or any(name.startswith(p)
                                                for p in self._key_prefixes)):
            return SKIP
        key = name.decode("utf-8", "surrogatepass")
        if kind == EXPIRE:
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
                    item = self._stream.next(SLICE if left is None else min(SLICE, left))
                if item is not None and item is not SKIP:
                    got = self._decode(item, whole)
                    if got is not SKIP:
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
                if item is SKIP:
                    continue  # (a confirmation or a welcome: more may be buffered)
                if item is not None:
                    got = self._decode(item, True)
                    if got is not SKIP:
                        return got  # type: ignore[no-any-return]
                    continue
                sock = self._stream.socket()
            if sock is None:
                await asyncio.sleep(RECONNECT_EVERY)
                continue
            readable = loop.create_future()
            fd = sock.fileno()
            loop.add_reader(fd, _resolve, readable)
            self._async_waiter = readable
            try:
                await asyncio.wait_for(readable, SLICE)
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
        exact, prefixes = names(self._topics)
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
        self._stream: Stream | None = None
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
        exact, prefixes = names(topics)
        keys = topics.namespace == wire.KEY_TOPIC
        wanted = ([], [], exact, prefixes) if keys else (exact, prefixes, [], [])
        handler = _Handler(topics, callback, runner, wanted, {enc(n) for n in exact},
                           [enc(p) for p in prefixes], keys)
        done = _Live(handler)
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
        failed = self._failed or done.error
        if failed is not None:
            with self._mutex:  # (its subscriptions were undone with the refusal)
                if handler in self._rhandlers:
                    self._rhandlers.remove(handler)
            raise failed

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
            stream = self._stream = Stream(self._core, "zkv callbacks", self._waker)
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
                        channels, prefixes, keys, key_prefixes = handler.names
                        stream.add(channels, prefixes, keys, key_prefixes, done=command[2])
                    else:
                        stream.remove(*handler.names)
                try:
                    item = stream.next(SLICE)
                except ZkvConnectionError as exc:  # Redis away for long: keep trying
                    log.warning("%s; callbacks resume when it is back", exc)
                    self._waker_wait(1.0)
                    continue
                if item is None or item is SKIP:
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
                        if h.live and h.keys == (kind != MSG) and h.matches(name)]
        if not handlers:
            return
        try:
            text = name.decode("utf-8", "surrogatepass")
            if kind == MSG:
                value = _loads(data) if data[:1] == b"\x80" else _decode(bytes(data))
            elif kind == EXPIRE:
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


class _Live(Waiter):
    """Set by the stream when a handler's subscription is confirmed: the handler is live."""

    def __init__(self, handler: _Handler) -> None:
        super().__init__()
        self._handler = handler

    def set(self) -> None:
        self._handler.live = True
        super().set()
