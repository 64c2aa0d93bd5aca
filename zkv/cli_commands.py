"""The ``zkv`` shell commands: one function each, registered with :func:`~zkv.cli_base.command`.

See docs/cli.md for what each prints and its exit status. To add a command, write a function
``def name(cx: Context) -> int`` under ``@command("name", "summary", arg(...), ...)``; the
parser, ``zkv --help``, the error handling and the exit statuses come with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

from .cli_base import Context, arg, command
from .cli_format import Progress, UsageError, render, show_name
from .cli_owners import format_uptime, live_owners, search_dirs
from .errors import SerializationError, ZkvError
from .pubsub import Change, Message
from .state import MISSING, check_ttl
from .store import connect

__all__ = ["delete", "expire", "get", "incr", "keys", "ls", "monitor", "persist", "ping", "pub",
           "set_", "stats", "sub", "ttl", "watch"]


def _number(text: str) -> int | float:
    """An ``AMOUNT``: an int if it reads as one, else a float."""
    kind: type[int] | type[float]
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    raise argparse.ArgumentTypeError(f"not an int or a float: {text!r}")


# -- keys and values ---------------------------------------------------------------------------

@command("get", "print the value of KEY", arg("key", metavar="KEY"))
def get(cx: Context) -> int:
    """Print the value of KEY: its repr, or JSON with --json. Exit status 1 if KEY is missing,
    or if its value cannot be shown here (a placeholder then names its type or why)."""
    try:
        value = cx.store.get(cx.args.key, MISSING)
    except SerializationError as exc:
        return cx.cannot_show(exc)
    if value is MISSING:
        return cx.missing(cx.args.key)
    cx.show(value)
    return 0


@command("set", "set KEY to VALUE", arg("key", metavar="KEY"),
         arg("--ttl", metavar="SECONDS", type=float, default=None,
             help="make KEY expire SECONDS from now (a number > 0)"),
         value=True)
def set_(cx: Context) -> int:
    """Set KEY to VALUE: a Python literal (42, 'text', {'a': [1, 2]}), the text itself with
    --str, or JSON with --json; - reads VALUE from standard input. With --ttl, KEY expires
    SECONDS from now; without, it keeps no expiry."""
    try:
        ttl = check_ttl(cx.args.ttl)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    value = cx.value()  # a bad VALUE is a usage error, owner or not
    cx.store.set(cx.args.key, value, ttl=ttl)
    return 0


@command("del", "delete KEYs", arg("names", metavar="KEY", nargs="+"))
def delete(cx: Context) -> int:
    """Delete the KEYs, as one atomic step. Exit status 1 if one of them was missing (it is
    named on stderr; the others are deleted all the same)."""
    with cx.store.pipeline() as batch:
        for key in cx.args.names:
            batch.delete(key)
    missing = [key for key, found in zip(cx.args.names, batch.results, strict=True) if not found]
    for key in missing:
        cx.missing(key)
    return 1 if missing else 0


@command("incr", "add AMOUNT to KEY; print the sum",
         arg("key", metavar="KEY"),
         arg("amount", metavar="AMOUNT", nargs="?", type=_number, default=1,
             help="an int or a float; negative to decrement"))
def incr(cx: Context) -> int:
    """Add AMOUNT (default 1) to the number at KEY, atomically (a missing KEY counts as 0),
    and print the new value. Exit status 1 if KEY holds something other than a number."""
    cx.show(cx.store.incr(cx.args.key, cx.args.amount))
    return 0


@command("ttl", "print the seconds until KEY expires", arg("key", metavar="KEY"))
def ttl(cx: Context) -> int:
    """Print the seconds until KEY expires, or None if it has no expiry. Exit status 1 if
    KEY is missing."""
    try:
        left = cx.store.ttl(cx.args.key)
    except KeyError:
        return cx.missing(cx.args.key)
    cx.show(None if left is None else round(left, 3))
    return 0


@command("expire", "make KEY expire in SECONDS",
         arg("key", metavar="KEY"),
         arg("seconds", metavar="SECONDS", type=float,
             help="a number of seconds > 0 (on the owner's clock)"))
def expire(cx: Context) -> int:
    """Make KEY expire SECONDS from now. Exit status 1 if KEY is missing, 2 if SECONDS is
    not a finite number > 0."""
    try:
        found = cx.store.expire(cx.args.key, cx.args.seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0 if found else cx.missing(cx.args.key)


@command("persist", "remove the expiry of KEY", arg("key", metavar="KEY"))
def persist(cx: Context) -> int:
    """Remove the expiry of KEY. Exit status 1 if KEY is missing; a KEY without expiry is
    left as it is (exit status 0, and a note on stderr)."""
    if cx.store.persist(cx.args.key):
        return 0
    if cx.args.key not in cx.store:
        return cx.missing(cx.args.key)
    cx.note(f"{cx.args.key!r} had no expiry")
    return 0


@command("keys", "list the keys",
         arg("--prefix", metavar="P", default="", help="only the keys that start with P"))
def keys(cx: Context) -> int:
    """List the keys, sorted, one a line (a name that would be ambiguous on a line is printed
    as a Python literal), or as one JSON array with --json. On a terminal, a listing that
    takes more than a second shows its progress on stderr."""
    prefix: str = cx.args.prefix
    with Progress("zkv keys", cx.stderr) as progress:
        progress.stage("asking the owner for its keys")
        found = sorted(cx.store.scan(prefix))  # in pages: the owner is never held long
        if cx.json:
            cx.out(json.dumps(found, ensure_ascii=False))
            return 0
        progress.stage("writing", total=len(found))
        for start in range(0, len(found), 1000):
            chunk = found[start:start + 1000]
            cx.stdout.write("".join(show_name(key) + "\n" for key in chunk))
            progress.advance(len(chunk))
        cx.stdout.flush()
    return 0


# -- publish / subscribe -----------------------------------------------------------------------

@command("pub", "publish VALUE on CHANNEL", arg("channel", metavar="CHANNEL"), value=True)
def pub(cx: Context) -> int:
    """Publish VALUE (read as for `zkv set`) on CHANNEL, to every subscriber in every
    process."""
    value = cx.value()  # a bad VALUE is a usage error, owner or not
    cx.store.publish(cx.args.channel, value)
    return 0


def _message_line(message: Message) -> tuple[Any, str]:
    return ({"channel": message.channel, "seq": message.seq, "data": message.data},
            f"{show_name(message.channel)} {render(message.data, False)}")


@command("sub", "print messages of CHANNELs until Ctrl-C",
         arg("channels", metavar="CHANNEL", nargs="+"),
         arg("--prefix", action="store_true",
             help="the CHANNELs are prefixes: every channel that starts with one"))
def sub(cx: Context) -> int:
    """Print every message published on the CHANNELs, one a line as it arrives ("CHANNEL
    DATA", or a JSON object with --json), until Ctrl-C, which ends it with exit status 0.
    Messages lost because this command fell behind are counted on stderr."""
    channels: list[str] = cx.args.channels
    subscriber = cx.store.subscribe(prefix=channels) if cx.args.prefix \
        else cx.store.subscribe(*channels)
    return cx.follow(subscriber, _message_line)


def _change_line(message: Message) -> tuple[Any, str]:
    change: Change = message.data
    data = {"key": change.key, "kind": change.kind, "value": change.value,
            "version": change.version}
    human = f"{change.kind} {show_name(change.key)}"
    if change.kind == "set":
        human += f" {render(change.value, False)}"
    return data, human


@command("watch", "print changes of keys until Ctrl-C",
         arg("key", metavar="KEY", nargs="?"),
         arg("--prefix", action="store_true",
             help="KEY is a prefix: the changes of every key that starts with it"))
def watch(cx: Context) -> int:
    """Print every change of KEY (of the keys starting with KEY with --prefix; of every key
    without KEY), made by any process, one a line as it is applied: "set KEY VALUE" or
    "delete KEY" (a JSON object with --json), until Ctrl-C, which ends it with exit status 0."""
    key: str | None = cx.args.key
    if cx.args.prefix and key is None:
        raise UsageError("--prefix needs a KEY (the prefix); without KEY every key is watched")
    watcher = cx.store.watch(prefix=key) if cx.args.prefix else cx.store.watch(key)
    return cx.follow(watcher, _change_line)


def _monitor_line(message: Message) -> tuple[Any, str]:
    event: dict[str, Any] = message.data
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    stamp += f".{int(event['time'] * 1000) % 1000:03d}"
    subject = "" if event["key"] is None else " " + show_name(event["key"])
    return event, f"{stamp} pid {event['pid']} {event['op']}{subject} {event['status']}"


@command("monitor", "print every request the owner serves, until Ctrl-C")
def monitor(cx: Context) -> int:
    """Print every request the owner serves from other processes as it serves it, one a
    line ("TIME pid PID OP KEY STATUS", or a JSON object with --json), until Ctrl-C. The owner
    describes requests only while someone monitors; the owner process's own calls are not
    requests and do not show (with owner="process" every call is one)."""
    return cx.follow(cx.store.monitor(), _monitor_line)


# -- owners ------------------------------------------------------------------------------------

@command("ls", "list the live owners of this user", target=False)
def ls(cx: Context) -> int:
    """List the live owners of this user on this host: pid, uptime, keys, clients (connected
    processes, not counting this command) and endpoint, oldest first. An owner that does not
    answer within the timeout (2 s at most) is listed with "?" and a note on stderr.
    Standalone tcp owners are not listed: name them with --endpoint."""
    rows: list[dict[str, Any]] = []
    now = time.time()
    for owner in live_owners():
        row: dict[str, Any] = {"pid": owner.pid, "endpoint": owner.endpoint,
                               "uptime": round(now - owner.started, 1), "keys": None,
                               "clients": None, "error": None}
        try:
            with connect(owner.endpoint, timeout=min(cx.timeout, 2.0)) as client:
                counters = client.stats()
            row["keys"] = counters["keys"]
            row["clients"] = max(0, counters["sessions"] - 1)  # not this command's session
        except (ZkvError, OSError) as exc:
            row["error"] = str(exc)
            cx.note(f"owner pid {owner.pid} does not answer: {exc}")
        rows.append(row)
    if cx.json:
        cx.out(json.dumps(rows))
        return 0
    if not rows:
        where = ", ".join(str(d) for d in search_dirs()) or "no runtime directory exists"
        cx.note(f"no live zkv owner of this user (looked in: {where})")
        return 0
    cx.out(f"{'PID':<8} {'UPTIME':>7} {'KEYS':>9} {'CLIENTS':>7}  ENDPOINT")
    for row in rows:
        keys = "?" if row["keys"] is None else row["keys"]
        clients = "?" if row["clients"] is None else row["clients"]
        cx.out(f"{row['pid']:<8} {format_uptime(row['uptime']):>7} {keys:>9} {clients:>7}  "
               f"{row['endpoint']}")
    return 0


@command("stats", "print the owner's counters")
def stats(cx: Context) -> int:
    """Print the owner's counters, one per line: its endpoint, then keys, version (changes
    applied), sessions (connected processes, this command included), subscriptions, topics,
    locks, refused messages, pid and large-value files (see Store.stats)."""
    counters: dict[str, Any] = {"endpoint": cx.store.endpoint, **cx.store.stats()}
    if cx.json:
        cx.out(json.dumps(counters))
    else:
        for name, value in counters.items():
            cx.out(f"{name:<14}{value}")
    return 0


@command("ping", "time a round trip to the owner")
def ping(cx: Context) -> int:
    """Time one request to the owner and its reply (after connecting), and print it with the
    owner's pid and endpoint. Exit status 1 if the owner does not answer."""
    store = cx.store  # connected before the clock starts
    started = time.perf_counter()
    counters = store.stats()
    ms = (time.perf_counter() - started) * 1000
    cx.emit({"endpoint": store.endpoint, "pid": counters["pid"], "ms": round(ms, 3)},
            f"pong from pid {counters['pid']} at {store.endpoint}: {ms:.2f} ms")
    return 0
