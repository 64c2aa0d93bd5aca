"""Large frames through shared memory: files in a private tmpfs directory, for ipc stores.

Through a unix socket a frame is copied twice by the kernel (into it, out of it) and once more
into the value the reader gets; through a file in tmpfs it is copied once by the writer and once
by the reader, and the owner copies nothing. So an ipc owner makes a *blob directory*,
``/dev/shm/zkv-<uid>/<its socket directory's name>/`` (mode 0700, like the sockets), and:

- a client writes each frame of a request of at least the owner's ``blob_threshold`` bytes to
  a new file there, and sends the file's name instead (see :mod:`zkv.wire`, ``SPILLED``);
- the owner maps the file read-only (no copy) and uses the mapping as the frame: a value set
  this way is stored as that mapping. The file lives as long as the owner holds the frame;
- when the value is overwritten or deleted (or the message sent), the owner's poller renames
  the file ``free-<size>-<name>`` (after the reply it was busy with): a client that writes a
  large frame next claims a free file by renaming it and writes over its pages, which is much
  faster than making new ones in tmpfs (a 64 MB write: about 16 ms against 26 ms here). At most
  :data:`POOL_FILES` free files are kept, each for at most :data:`POOL_SECONDS`;
- a reply to ``GET``/``GET_MANY`` names the stored files instead of sending their bytes, and the
  client reads each file into the value, then checks that the name still leads to the file it
  read. If not (the key was overwritten in between and the file freed), it asks again without
  names and gets the bytes through the socket.

Anything that goes wrong with a file (no ``/dev/shm``, a full tmpfs, a file removed behind
zkv's back) falls back to the socket: the blob directory makes large values faster, never less
reliable. The files are as private as the sockets: only the owner's user can read or write them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import shutil
import stat
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import wire
from .codec import Frame, frame_size
from .endpoint import ensure_private_dir, sweep_stale
from .errors import ProtocolError

__all__ = ["SHM_ROOT", "Blob", "BlobDir", "name_blobs", "new_name", "read_blob",
           "read_spilled", "spill", "write_blob"]

#: Where owners make their blob directories: RAM-backed on Linux.
SHM_ROOT = Path("/dev/shm")

_NAME = re.compile(rb"[0-9a-f]{32}")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_MAX = 1 << 30  # bytes per read(2): Linux returns at most about 2 GiB per call
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_FREE = "free-"

#: Free files the owner keeps for reuse, and for how long (seconds).
POOL_FILES = 4
POOL_SECONDS = 5.0


class Blob(mmap.mmap):
    """A stored frame: a read-only mapping of a file in the owner's blob directory. It is a
    buffer like any frame (``len``, ``bytes(blob)``, zero-copy sends). ``name`` is the file's
    name; the file is unlinked when the last reference to the blob goes."""

    name: bytes


class BlobDir:
    """The owner's blob directory. Use :meth:`create`; :meth:`close` removes it."""

    def __init__(self, path: Path, threshold: int) -> None:
        self.path = path
        self.threshold = threshold
        #: Files of blobs that are gone: ``(path, size)``, to free (:meth:`sweep`).
        self.dead: list[tuple[str, int]] = []
        self._pool: list[tuple[float, str]] = []  # free files: (since, path)
        self._pid = os.getpid()

    @classmethod
    def create(cls, name: str, threshold: int, root: Path = SHM_ROOT) -> BlobDir | None:
        """Make ``<root>/zkv-<uid>/<name>``, or return None if that cannot be done (no tmpfs,
        a directory that is not private, ...) or ``threshold`` is 0: the store then sends
        every frame through its sockets. Stale directories of dead owners are removed."""
        if threshold <= 0:
            return None
        base = root / f"zkv-{os.getuid()}"
        try:
            ensure_private_dir(base)
            sweep_stale(base)
            path = base / name
            path.mkdir(mode=0o700)
        except OSError:
            return None
        return cls(path, threshold)

    def close(self) -> None:
        """Remove the directory and every file in it (mappings the owner still holds stay
        valid). Idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)

    def adopt(self, sent: bytes, size: int) -> Blob:
        """Map the file named ``sent`` that a client wrote here (after renaming it). Raises
        ValueError if the name is not one zkv makes, or the file is not a regular file of
        ``size`` bytes, owned by this user, with no other link; OSError if it cannot be
        renamed, opened or mapped."""
        if not _NAME.fullmatch(sent):
            raise ValueError(f"bad blob name {sent[:40]!r}")
        # Renamed first: a name is adopted once at most (a request that names a file twice,
        # or two requests that name the same file, get an error, not two mappings of it), and
        # the writer's name no longer leads to it.
        name = new_name()
        path = os.path.join(self.path, name.decode())
        os.rename(os.path.join(self.path, sent.decode()), path)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            self.dead.append((path, 0))
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() \
                    or info.st_nlink != 1 or info.st_size != size or size <= 0:
                raise ValueError(f"blob {sent.decode()} is not a file of {size} bytes")
            blob = Blob(fd, size, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            self.dead.append((path, 0))
            raise
        os.close(fd)  # the mapping keeps the pages
        blob.name = name
        weakref.finalize(blob, self.dead.append, (path, size))
        return blob

    def counts(self) -> dict[str, int]:
        """``blob_files``: files in the directory that hold frames (or are being written);
        ``blob_free``: free files kept for reuse."""
        try:
            names = os.listdir(self.path)
        except OSError:
            names = []
        free = sum(1 for n in names if n.startswith(_FREE))
        return {"blob_files": len(names) - free, "blob_free": free}

    @property
    def pooled(self) -> bool:
        """Whether free files are kept for reuse (:meth:`sweep` expires them)."""
        return bool(self._pool)

    def sweep(self, now: float | None = None) -> None:
        """Free the files of blobs that are gone: keep a few for reuse, unlink the others and
        those kept too long (the poller calls this when it has a moment). Does nothing in a
        forked child, whose copies of the owner's blobs are not its own to remove."""
        if os.getpid() != self._pid:
            return
        now = time.monotonic() if now is None else now
        pool: list[tuple[float, str]] = []
        for since, path in self._pool:
            if now - since >= POOL_SECONDS:
                _unlink(path)
            elif os.path.exists(path):  # else a client has claimed it
                pool.append((since, path))
        self._pool = pool
        dead = self.dead
        while dead:
            try:
                path, size = dead.pop()
            except IndexError:
                break
            if size > 0 and len(pool) < POOL_FILES:
                free = os.path.join(self.path, f"{_FREE}{size}-{new_name().decode()}")
                try:
                    os.rename(path, free)
                except OSError:
                    continue
                pool.append((now, free))
            else:
                _unlink(path)

    def resolve(self, args: list[Any]) -> list[Any]:
        """The arguments of a ``SPILLED`` request with its files mapped in place of their
        placeholders (and its index dropped). Raises ProtocolError, after removing the
        request's files, if the index or a file is not as it should be."""
        if not args:
            raise ProtocolError("spilled request without its index")
        entries = wire.unpack_spill(args[-1])
        out = args[:-1]
        try:
            for position, size, name in entries:
                if position >= len(out) or len(out[position]) != 0:
                    raise ValueError(f"spill index names frame {position}, not a placeholder")
                out[position] = self.adopt(name, size)
        except (OSError, ValueError) as exc:
            out.clear()  # unmaps (and unlinks) what was adopted
            self.discard([name for _position, _size, name in entries])
            raise ProtocolError(f"spilled frames: {exc}") from None
        return out

    def store(self, frames: list[Frame]) -> list[Frame]:
        """``frames`` with each frame of at least the threshold written to a file here and
        mapped in its place (so that clients read it from the file); unchanged if that cannot
        be done."""
        out = list(frames)
        for i, frame in enumerate(frames):
            size = frame_size(frame)
            if size < self.threshold or isinstance(frame, Blob):
                continue
            name = write_blob(str(self.path), frame)
            if name is not None:
                with contextlib.suppress(OSError, ValueError):
                    out[i] = self.adopt(name, size)
        return out

    def discard(self, names: Sequence[bytes]) -> None:
        """Remove files named in a request the owner refused (names zkv would not make are
        left alone)."""
        for name in names:
            if _NAME.fullmatch(name):
                self.dead.append((os.path.join(self.path, name.decode()), 0))


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def new_name() -> bytes:
    return secrets.token_hex(16).encode()


def _claim(directory: str, size: int) -> tuple[int, str] | None:
    """Take a free file for a frame of ``size`` bytes (the smallest that is large enough but
    not twice as large, else the largest smaller one): rename it to a new name, which only one
    process can do. Returns its open descriptor and path."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_FREE)]
    except OSError:
        return None
    sized: list[tuple[int, str]] = []
    for n in names:
        try:
            sized.append((int(n.split("-", 2)[1]), n))
        except (IndexError, ValueError):
            continue
    sized.sort()
    # Shrinking a much larger file would free more pages than writing them costs.
    big_enough = [item for item in sized if size <= item[0] <= 2 * size]
    smaller = [item for item in sized if item[0] < size][::-1]
    for _free_size, free in (big_enough + smaller)[:3]:
        path = os.path.join(directory, new_name().decode())
        try:
            os.rename(os.path.join(directory, free), path)
        except OSError:  # another process claimed it first
            continue
        try:
            return os.open(path, _WRITE_FLAGS), path
        except OSError:
            _unlink(path)
    return None


def write_blob(directory: str, frame: Frame) -> bytes | None:
    """Write ``frame`` to a file in the blob directory (a free one if there is one, else a new
    one); return its name, or None (and leave nothing behind) if the file cannot be written:
    the frame then goes by socket."""
    view = memoryview(frame).cast("B")
    claimed = _claim(directory, len(view))
    try:
        if claimed is not None:
            fd, path = claimed
        else:
            path = os.path.join(directory, new_name().decode())
            fd = os.open(path, _CREATE_FLAGS, 0o600)
    except OSError:
        return None
    try:
        if claimed is not None:
            os.ftruncate(fd, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + _READ_MAX], done)
    except OSError:  # ENOSPC: a small /dev/shm (containers default to 64 MB)
        os.close(fd)
        _unlink(path)
        return None
    os.close(fd)
    return os.path.basename(path).encode()


def read_blob(directory: str, name: bytes, size: int) -> bytes:
    """The ``size`` bytes of the blob ``name``. Raises FileNotFoundError if it is gone, or
    was freed while it was being read (the owner dropped the value), OSError or ValueError if
    it cannot be read as announced."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad blob name {name[:40]!r}")
    path = os.path.join(directory, name.decode())
    fd = os.open(path, _OPEN_FLAGS)
    try:
        inode = os.fstat(fd).st_ino
        if size <= _READ_MAX:
            data = os.read(fd, size)  # one read into the bytes handed out: one copy
        else:
            chunks: list[bytes] = []
            left = size
            while left:
                chunk = os.read(fd, min(left, _READ_MAX))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ValueError(f"blob {name.decode()} has not the {size} bytes announced")
    # Freed files keep no name of ours, and are rewritten only once claimed under a new one:
    # if the name still leads to the inode read, nobody wrote to it while it was read.
    if os.stat(path).st_ino != inode:
        raise FileNotFoundError(f"blob {name.decode()} was freed while it was read")
    return data


def spill(directory: str, frames: Sequence[Frame], threshold: int) -> list[Frame] | None:
    """A client's request frames with each frame of at least ``threshold`` bytes written to a
    file in ``directory`` and replaced by an empty placeholder, followed by the spill index;
    None if no frame went to a file (none is that large, or no file could be written)."""
    entries: list[tuple[int, int, bytes]] = []
    out = list(frames)
    for i, frame in enumerate(frames):
        size = frame_size(frame)
        if size < threshold:
            continue
        name = write_blob(directory, frame)
        if name is not None:
            out[i] = b""
            entries.append((i, size, name))
    if not entries:
        return None
    out.append(wire.pack_spill(entries))
    return out


def name_blobs(frames: Sequence[Frame]) -> list[Frame] | None:
    """Reply frames with each :class:`Blob` replaced by an empty placeholder, followed by the
    spill index naming their files; None if there is no blob among them."""
    entries = [(i, len(f), f.name) for i, f in enumerate(frames) if type(f) is Blob]
    if not entries:
        return None
    out = list(frames)
    for i, _size, _name in entries:
        out[i] = b""
    out.append(wire.pack_spill(entries))
    return out


def read_spilled(directory: str, frames: list[Any]) -> list[Any]:
    """A ``SPILLED`` reply's frames with the named files read in place of their placeholders.
    Raises FileNotFoundError if a file is gone (ask again without names), ProtocolError if the
    reply is malformed, OSError or ValueError if a file cannot be read as announced."""
    if not frames:
        raise ProtocolError("spilled reply without its index")
    entries = wire.unpack_spill(frames[-1])
    out = frames[:-1]
    for position, size, name in entries:
        if position >= len(out):
            raise ProtocolError(f"spill index names frame {position} of {len(out)}")
        out[position] = read_blob(directory, name, size)
    return out


