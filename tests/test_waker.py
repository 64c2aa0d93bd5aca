"""The owner's wake-up pipe never loses a wake-up.

Owner threads that publish (or write while someone watches) hand their work to the poller
thread and wake it through this pipe. A lost wake-up leaves that work waiting for the poller's
next tick (0.2 s) -- for every later message too, if the pipe's state gets stuck.
"""

from __future__ import annotations

import select
import threading
import time

from zkv.sockets import Waker


def test_wakeups_racing_with_drain_are_never_lost() -> None:
    waker = Waker()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            waker.wake()

    thread = threading.Thread(target=hammer)
    thread.start()
    rounds = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            readable, _, _ = select.select([waker.fd], [], [], 5.0)
            assert readable, f"a wake-up was lost after {rounds} rounds"
            waker.drain()
            rounds += 1
    finally:
        stop.set()
        thread.join()
    waker.wake()
    assert select.select([waker.fd], [], [], 5.0)[0], "the last wake-up was lost"
    waker.close()
