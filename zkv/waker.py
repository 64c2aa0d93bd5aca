"""Wake a poller thread from other threads without touching its sockets: a pipe it polls."""

from __future__ import annotations

import os

__all__ = ["Waker"]


class Waker:
    """A self-pipe. Other threads call :meth:`wake`; the poller thread polls :attr:`fd` and
    calls :meth:`drain` when it is readable. Wake-ups coalesce: at most one byte is in flight."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._pending = False

    def wake(self) -> None:
        if not self._pending:
            self._pending = True
            try:
                os.write(self._w, b"x")
            except OSError:  # full (already awake) or closed (shutting down)
                pass

    def drain(self) -> None:
        """Call before handling the queued work, so that work queued meanwhile wakes again.

        Empties the pipe *before* clearing the flag: cleared first, a wake-up written between
        the two would be read here and leave the flag set over an empty pipe, and every later
        wake() would be skipped (the poller then only noticed work at its next tick)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except OSError:
            pass
        self._pending = False

    def close(self) -> None:
        for fd in (self.fd, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
