"""``zkv serve``: a standalone owner process.

``zkv serve`` owns a store on private ipc sockets (for processes of this user on this host);
``zkv serve --bind tcp://0.0.0.0:PORT --keys DIR`` owns one on authenticated tcp, for processes
on several hosts. Either way the store outlives the application processes that use it.

It prints what a client needs on stdout, first as ``NAME=value`` lines (``ZKV_ENDPOINT``,
and for tcp ``ZKV_KEYS``, the client credentials on this host), then a hint for other hosts;
logs sessions (HELLO, BYE, dropped connections) and refused peers on stderr; and on SIGINT or
SIGTERM closes the store (sockets closed, ipc directory removed) and exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import auth
from .errors import ZkvError
from .store import serve

__all__ = ["main"]

log = logging.getLogger("zkv.serve")


def _client_keys_hint(keys: str | None) -> str | None:
    """Where a client on this host finds its credentials, for a keys directory."""
    if keys is None:
        return None
    directory = Path(keys).absolute()
    if (directory / "server.key_secret").exists() and (directory / auth.DEFAULT_CLIENT).is_dir():
        return str(directory / auth.DEFAULT_CLIENT)
    return str(directory)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zkv serve",
        description="Run a standalone zkv owner until SIGINT or SIGTERM. Settings not given "
                    "here come from ZKV_TIMEOUT, ZKV_HWM, ZKV_MAX_MESSAGE_SIZE, ZKV_HEARTBEAT.")
    parser.add_argument("--bind", metavar="tcp://HOST:PORT",
                        help="bind authenticated tcp (PORT 0: any free port); default: private "
                             "ipc sockets for this user")
    parser.add_argument("--keys", metavar="DIR", default=os.environ.get("ZKV_KEYS") or None,
                        help="credentials made by `zkv keygen DIR` (default: $ZKV_KEYS); "
                             "required with tcp")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log only warnings (refused peers), not sessions")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("zkv serve: %s received, closing", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            owner = serve(args.bind, keys=args.keys) if args.bind else serve()
        except (ZkvError, OSError, ValueError) as exc:
            print(f"zkv serve: {exc}", file=sys.stderr)
            return 1
        with owner:
            _announce(owner.endpoint, _client_keys_hint(args.keys) if args.bind else None)
            log.info("zkv serve: owner pid %d serving at %s", os.getpid(), owner.endpoint)
            while not stop.wait(0.5):
                pass
        log.info("zkv serve: closed")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce(endpoint: str, client_keys: str | None) -> None:
    lines = [f"ZKV_ENDPOINT={endpoint}"]
    if client_keys is not None:
        lines.append(f"ZKV_KEYS={client_keys}")
        host, _sep, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("0.0.0.0", "*", "::", "[::]"):
            host = socket.gethostname()
        lines.append(f"# clients on other hosts: copy {client_keys} there, then "
                     f"ZKV_ENDPOINT=tcp://{host}:{port} ZKV_KEYS=<that copy>")
    else:
        lines.append("# clients: processes of this user on this host, "
                     "with ZKV_ENDPOINT set as above")
    lines.append("# stop with Ctrl-C or SIGTERM")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
