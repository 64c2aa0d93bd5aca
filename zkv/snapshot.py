"""Snapshots: the whole store in a file, written atomically, loaded when an owner starts.

A save has two steps. The *listing* takes references to every entry and the keys' deadlines,
under the store's lock: that is the only time the store is held (the *pause*, tens of
milliseconds for 100,000 keys). The *writing* pickles what is not pickled yet and writes the
file, holding nothing: the store goes on serving, and since the entries listed are never
changed in place (a write replaces an entry), the file holds exactly the store as it was at
the listing. Writing is done by one thread per owner, in the order the listings were taken, so
a later save never loses to an earlier one.

The file is written aside (``.NAME.PID.RANDOM.tmp`` in the same directory, mode 0600),
flushed to disk (``fsync``), then renamed over ``NAME`` and the directory flushed: whenever
the owner is killed, ``NAME`` is the previous snapshot or the new one, whole. A temporary file
left by a killed owner is removed by the next save to that directory.

Layout (integers little-endian)::

    MAGIC (8 bytes) | format u16 | flags u16 | header length u32 | header (JSON)
    per key:  key length u32 | frame count u32 | expires f64 (unix time; NaN: never)
              | frame lengths (u64 each) | key (UTF-8) | frames
    END (8 bytes) | key count u64 | CRC-32 of every byte before it, u32

Values are kept as they travel (:mod:`zkv.codec` frames): loading unpickles nothing, and a
class only the clients can import still round-trips. A value the owner holds by reference
because it cannot be pickled is left out and named in the result (and in a warning, for
periodic saves). A key's expiry is kept as a wall-clock time: a key whose time passed while
no owner ran is not loaded.

Loading checks everything before the store holds a single key: a file that is not a zkv
snapshot, from a newer zkv, truncated or corrupt (its checksum) raises
:class:`~zkv.SnapshotError` naming the file, and the owner does not start. So does a file
that another user owns or may write (unpickling runs code: a value planted in it would run in
every process that reads it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import re
import secrets
import struct
import threading
import time
import zlib
from typing import Any, BinaryIO

from . import wire
from ._version import __version__
from .codec import SMALL, Frame, frame_size
from .errors import EncodeError, SnapshotError
from .state import Entry, State

__all__ = ["FORMAT", "MAGIC", "Listing", "SaveResult", "Snapshots", "read", "take", "write"]

log = logging.getLogger("zkv.snapshot")

#: The first bytes of every snapshot file (a high byte first, as PNG does, so that a file
#: mangled as text is seen as such).
MAGIC = b"\x89ZKVSNP\n"
_END = b"ZKVSNEND"
#: The layout's version; a file of a later one is refused with a clear error.
FORMAT = 1

_HEAD = struct.Struct("<8sHHI")
_RECORD = struct.Struct("<IId")
_LENGTH = struct.Struct("<Q")
_TRAILER = struct.Struct("<8sQI")
_NICE = 10  # the writing thread's niceness (Linux)
_YIELD_EVERY = 256  # keys written between two offers of the GIL to other threads
_BUFFER = 1 << 20  # bytes gathered before a write(2); larger frames are written as they are
_MAX_HEADER = 1 << 20
_wall = time.time  # the clock of expiry times in files (tests move it)
_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp\Z")


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """What :meth:`zkv.Store.save` did: the file written (``path``), the keys it holds
    (``keys``), the keys left out because their value cannot be pickled (``skipped``: values
    set in the owner that it keeps by reference, such as a lock), the file's size (``bytes``),
    how long the store was held to list its entries (``pause``, seconds) and how long the
    whole save took (``seconds``)."""

    path: str
    keys: int
    skipped: tuple[str, ...]
    bytes: int
    pause: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaveResult:
        return cls(path=str(data["path"]), keys=int(data["keys"]),
                   skipped=tuple(data["skipped"]), bytes=int(data["bytes"]),
                   pause=float(data["pause"]), seconds=float(data["seconds"]))


@dataclasses.dataclass(frozen=True)
class Listing:
    """References to a store's entries at one moment (see :func:`take`)."""

    version: int
    items: dict[str, Entry]
    deadlines: dict[str, float]  # monotonic
    monotonic: float  # when it was taken, on each clock
    wall: float
    pause: float  # seconds the store was held


def take(state: State) -> Listing:
    """List ``state`` (holding its lock only for that: the pause of a save)."""
    started = time.perf_counter()
    version, items, deadlines = state.listing()
    pause = time.perf_counter() - started
    return Listing(version, items, deadlines, time.monotonic(), _wall(), pause)


# -- writing --------------------------------------------------------------------------------------

def _view(frame: Frame) -> Any:
    """A frame as something ``write`` and ``crc32`` take without copying."""
    buffer = getattr(frame, "buffer", None)  # a zmq.Frame
    return frame if buffer is None else buffer


class _Writer:
    """Writes pieces to a file descriptor, gathering small ones, keeping the CRC and size."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.crc = 0
        self.size = 0
        self._buffer = bytearray()

    def add(self, piece: Any) -> None:
        if len(piece) < SMALL:
            self._buffer += piece
            if len(self._buffer) >= _BUFFER:
                self.flush()
        else:
            self.flush()
            self._write(memoryview(piece).cast("B"))

    def flush(self) -> None:
        if self._buffer:
            self._write(memoryview(self._buffer))
            self._buffer = bytearray()

    def _write(self, data: memoryview) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        while data:
            done = os.write(self.fd, data[:1 << 30])
            data = data[done:]


def _sweep_temporaries(directory: str) -> None:
    """Remove temporary files left in ``directory`` by saves whose process is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _TMP.match(name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive: maybe its save is running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))


def write(listing: Listing, path: str) -> SaveResult:
    """Write ``listing`` to ``path`` atomically (see the module docstring). Raises OSError if
    the file cannot be written (``path`` is then untouched)."""
    started = time.perf_counter()
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    _sweep_temporaries(directory)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    skipped: list[str] = []
    count = 0
    try:
        out = _Writer(fd)
        header = wire.encode_json({"zkv": __version__, "saved": listing.wall,
                                   "version": listing.version, "pid": os.getpid()})
        out.add(_HEAD.pack(MAGIC, FORMAT, 0, len(header)))
        out.add(header)
        nan = math.nan
        offset = listing.wall - listing.monotonic  # monotonic -> unix time
        deadlines = listing.deadlines
        for key, entry in listing.items.items():
            if not count % _YIELD_EVERY:
                time.sleep(0)  # the GIL to the owner's serving threads, if they wait for it
            try:
                frames = entry.encoded()
            except EncodeError:
                skipped.append(key)
                continue
            deadline = deadlines.get(key)
            name_bytes = wire.key_bytes(key)
            out.add(_RECORD.pack(len(name_bytes), len(frames),
                                 nan if deadline is None else deadline + offset))
            out.add(b"".join(_LENGTH.pack(frame_size(f)) for f in frames))
            out.add(name_bytes)
            for frame in frames:
                out.add(_view(frame))
            count += 1
        out.flush()
        trailer = _TRAILER.pack(_END, count, 0)[:-4]
        crc = zlib.crc32(trailer, out.crc)
        os.write(fd, trailer + struct.pack("<I", crc))
        size = out.size + len(trailer) + 4
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return SaveResult(path, count, tuple(skipped), size, listing.pause,
                      listing.pause + time.perf_counter() - started)


# -- reading --------------------------------------------------------------------------------------

class _Reader:
    """Reads exact amounts from a file, keeping the CRC; every shortfall is a clear error."""

    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self._f = f
        self._path = path
        self.left = size
        self.crc = 0

    def read(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise SnapshotError(f"{self._path}: the file ends early (in {what}): it is "
                                f"truncated or corrupt")
        data = self._f.read(n)
        if len(data) != n:
            raise SnapshotError(f"{self._path}: the file ends early (in {what})")
        self.left -= n
        self.crc = zlib.crc32(data, self.crc)
        return data


def _check_private(path: str, info: os.stat_result) -> None:
    if not os.path.isfile(path):
        raise SnapshotError(f"{path}: not a regular file")
    if info.st_uid != os.getuid():
        raise SnapshotError(f"{path}: owned by another user (uid {info.st_uid}): a zkv owner "
                            f"loads only its own user's snapshots (values are unpickled)")
    if info.st_mode & 0o022:
        raise SnapshotError(f"{path}: other users may write it (mode "
                            f"{info.st_mode & 0o777:o}): a value planted in it would run code "
                            f"in every process that reads it; `chmod go-w` it if it is yours")


def read(path: str | os.PathLike[str]) -> list[tuple[str, list[Frame], float | None]]:
    """The keys of the snapshot at ``path``: ``(key, frames, expires)`` each (``expires``: a
    unix time, or None). Reads and checks the whole file first. Raises SnapshotError (naming
    the file) for a file that is not a zkv snapshot, from a newer zkv, truncated or corrupt,
    or not private; OSError if it cannot be opened."""
    path = os.path.abspath(os.fspath(path))
    with open(path, "rb", buffering=_BUFFER) as f:
        info = os.fstat(f.fileno())
        _check_private(path, info)
        reader = _Reader(f, path, info.st_size)
        if info.st_size < _HEAD.size + _TRAILER.size:
            raise SnapshotError(f"{path}: not a zkv snapshot (only {info.st_size} bytes)")
        magic, version, _flags, header_size = _HEAD.unpack(reader.read(_HEAD.size, "header"))
        if magic != MAGIC:
            raise SnapshotError(f"{path}: not a zkv snapshot (it starts with {magic[:8]!r})")
        if version > FORMAT:
            raise SnapshotError(f"{path}: written by a newer zkv (snapshot format {version}; "
                                f"this zkv {__version__} reads format {FORMAT} and older)")
        if header_size > _MAX_HEADER:
            raise SnapshotError(f"{path}: corrupt (a header of {header_size} bytes)")
        try:
            wire.decode_json(reader.read(header_size, "header"))
        except Exception as exc:
            raise SnapshotError(f"{path}: corrupt header ({exc})") from None
        items: list[tuple[str, list[Frame], float | None]] = []
        while True:
            if reader.left == _TRAILER.size:
                break
            key_size, n_frames, expires = _RECORD.unpack(reader.read(_RECORD.size, "a record"))
            if n_frames == 0:
                raise SnapshotError(f"{path}: corrupt (a value without frames)")
            raw = reader.read(_LENGTH.size * n_frames, "a record")
            lengths = [n for (n,) in _LENGTH.iter_unpack(raw)]
            name = reader.read(key_size, "a key")
            try:
                key = wire.key_str(name)
            except Exception as exc:
                raise SnapshotError(f"{path}: corrupt key ({exc})") from None
            frames: list[Frame] = [reader.read(n, f"the value of {key!r}") for n in lengths]
            items.append((key, frames, None if math.isnan(expires) else expires))
        crc_before = reader.crc
        end, count, crc = _TRAILER.unpack(f.read(_TRAILER.size))
        crc_before = zlib.crc32(_TRAILER.pack(end, count, 0)[:-4], crc_before)
        if end != _END:
            raise SnapshotError(f"{path}: corrupt (no end marker: the file is truncated or "
                                f"was changed)")
        if crc != crc_before:
            raise SnapshotError(f"{path}: corrupt (checksum mismatch)")
        if count != len(items):
            raise SnapshotError(f"{path}: corrupt ({len(items)} keys, the end says {count})")
        return items


def _entries(items: list[tuple[str, list[Frame], float | None]]
             ) -> list[tuple[str, Entry, float | None]]:
    """What :func:`read` gave, as :meth:`State.restore` takes it: a key whose expiry has
    passed is left out."""
    now = _wall()
    out = []
    for key, frames, expires in items:
        ttl = None if expires is None else expires - now
        if ttl is None or ttl > 0:
            out.append((key, Entry.from_frames(frames), ttl))
    return out


def load(state: State, path: str | os.PathLike[str]) -> int:
    """Load the snapshot at ``path`` into ``state`` (all of it, or nothing: see :func:`read`);
    return how many keys were loaded."""
    entries = _entries(read(path))
    state.restore(entries)
    return len(entries)


# -- an owner's snapshots -------------------------------------------------------------------------

_Job = tuple[Listing, str, "concurrent.futures.Future[SaveResult]"]

#: The snapshot files (real paths) the owners of this process use.
_CLAIMED: set[str] = set()
_CLAIMS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _CLAIMS_LOCK
    _CLAIMS_LOCK = threading.Lock()
    _CLAIMED.clear()  # the parent's owners' files: a child holds no record lock


os.register_at_fork(after_in_child=_after_fork_in_child)


class Snapshots:
    """An owner's snapshots: its ``snapshot`` file (loaded at start, saved every ``every``
    seconds when something changed, and at close) and the saves asked for (:meth:`save`,
    :meth:`submit`). One thread writes, in the order the listings were taken."""

    def __init__(self, path: str | os.PathLike[str] | None, every: float) -> None:
        self.state = State()  # until start() gives the owner's
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.every = every
        self._saved_version = -1  # of the state last saved to (or loaded from) self.path
        self._queue: collections.deque[_Job] = collections.deque()
        self._mutex = threading.Lock()  # listing + queueing, so that jobs are in order
        self._wake = threading.Condition(self._mutex)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self._claimed = ""
        self._pid = os.getpid()
        self._loaded: list[tuple[str, Entry, float | None]] = []
        self._attached = False  # start() gave the owner's state: saves may write its file
        #: Files written so far, and periodic checks made (whether or not they saved).
        self.saves = 0
        self.periods = 0

    # -- start -------------------------------------------------------------------------------

    def open(self) -> int:
        """Claim the snapshot file (no other owner may use it meanwhile) and read it, if it
        exists; return the number of keys read. Raises SnapshotError (the file is corrupt,
        foreign, or in use by another owner): call it before the owner binds anything."""
        if self.path is None:
            return 0
        self._claim(self.path)
        try:
            self._loaded = _entries(read(self.path))
        except FileNotFoundError:
            log.info("no snapshot at %s yet: starting empty", self.path)
        except SnapshotError:
            self._release_claim()
            raise
        except OSError as exc:
            self._release_claim()
            raise SnapshotError(f"{self.path}: cannot be read: {exc}") from exc
        except BaseException:
            self._release_claim()
            raise
        return len(self._loaded)

    def start(self, state: State) -> None:
        """Put what :meth:`open` read into ``state`` (the owner's, before it serves) and start
        the periodic saves."""
        self.state = state
        loaded, self._loaded = self._loaded, []
        state.restore(loaded)
        self._saved_version = state.version
        self._attached = True
        if self.path is not None and math.isfinite(self.every):
            self._start()

    def _claim(self, path: str) -> None:
        """Take ``NAME.lock``: a POSIX record lock, which belongs to this process (a forked
        child, a pool worker that outlives its owner, does not hold it) and goes when it
        dies; and, in this process, the set of files its owners use (record locks do not
        exclude each other within a process)."""
        key = os.path.realpath(path)
        in_use = f"{path}: in use by another zkv owner (pid {{}}); one snapshot file " \
                 f"serves one owner at a time"
        with _CLAIMS_LOCK:
            if key in _CLAIMED:
                raise SnapshotError(in_use.format(os.getpid()))
            lock_path = path + ".lock"
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
            except OSError as exc:
                raise SnapshotError(f"{path}: cannot make its lock file {lock_path}: "
                                    f"{exc}") from exc
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise SnapshotError(in_use.format(holder)) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            _CLAIMED.add(key)
        self._lock_fd = fd
        self._claimed = key

    def _release_claim(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with _CLAIMS_LOCK:
                _CLAIMED.discard(self._claimed)
            if os.getpid() == self._pid:  # (a forked child holds no lock: nothing to let go)
                os.close(fd)  # the lock goes (the file stays: removing it races a new owner)

    def _start(self) -> None:
        with self._mutex:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="zkv-snapshot",
                                                daemon=True)
                self._thread.start()

    # -- saves ---------------------------------------------------------------------------------

    def submit(self, path: str) -> concurrent.futures.Future[SaveResult]:
        """List the store now (in the calling thread: the pause) and have it written to
        ``path`` (empty: the snapshot file); the future gives the :class:`SaveResult`, or the
        error (OSError, or ValueError if there is no snapshot file to save to)."""
        done: concurrent.futures.Future[SaveResult] = concurrent.futures.Future()
        target = path or self.path
        if not target:
            done.set_exception(ValueError(
                "no path given, and this store has no snapshot file (zkv.serve(snapshot=...) "
                "or ZKV_SNAPSHOT)"))
            return done
        if not os.path.isabs(target):  # (the caller makes a path absolute: see zkv.calls)
            done.set_exception(ValueError(f"a snapshot path must be absolute, not {target!r}"))
            return done
        with self.state.lock, self._mutex:  # (in this order, everywhere)
            if self._stopping:
                done.set_exception(RuntimeError("the store is closing"))
                return done
            self._queue.append((take(self.state), target, done))
            self._wake.notify()
        self._start()
        return done

    def save(self, path: str) -> SaveResult:
        """:meth:`submit`, and wait for the file to be written."""
        return self.submit(path).result()

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # (Linux: a thread's own niceness)
            # Writing is background work: when the CPUs are busy, the owner's serving
            # threads go first.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        next_save = time.monotonic() + self.every
        while True:
            with self._mutex:
                while not self._queue and not self._stopping:
                    wait = next_save - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(min(wait, 3600.0))
                job = self._queue.popleft() if self._queue else None
                if job is None and self._stopping:
                    return
            if job is not None:
                self._write(job)
                continue
            next_save = time.monotonic() + self.every  # time for a periodic save
            self.periods += 1
            if self.path is not None and self.changed:
                with self.state.lock, self._mutex:  # queued: after the saves asked for before
                    self._queue.append((take(self.state), self.path,
                                        concurrent.futures.Future()))

    def _write(self, job: _Job) -> None:
        listing, path, done = job
        try:
            result = write(listing, path)
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            log.error("zkv snapshot to %s failed: %s", path, exc)
            return
        self.saves += 1
        if path == self.path:
            self._saved_version = max(self._saved_version, listing.version)
        if result.skipped:
            log.warning("zkv snapshot to %s left out %d key(s) whose value cannot be pickled: "
                        "%s", path, len(result.skipped), ", ".join(result.skipped[:10]))
        if not done.done():
            done.set_result(result)

    # -- close ---------------------------------------------------------------------------------

    @property
    def changed(self) -> bool:
        """Whether the store changed since it was last saved to (or loaded from) its file."""
        return self.state.version != self._saved_version

    def close(self) -> None:
        """Finish the saves asked for, save to the snapshot file one last time if the store
        changed, stop the thread and let the file go. A failed last save is logged."""
        with self._mutex:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        while self._queue:  # (never started, or stopped before them)
            self._write(self._queue.popleft())
        if self.path is not None and self._lock_fd is not None and self._attached \
                and self.changed:
            self._write((take(self.state), self.path, concurrent.futures.Future()))
        self._release_claim()

