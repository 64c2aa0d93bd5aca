"""``zkv bench``: zkv side by side with what a user would pick instead, on this machine.

Compares a bare pyzmq echo (the floor for zkv's design), ``multiprocessing.Manager().dict()``,
a ``multiprocessing.Pipe`` server, Redis (when ``redis-server`` is installed), bare pyzmq
PUB/SUB and ``multiprocessing.Queue``, over the workloads of docs/benchmarks.md. Repetitions
are interleaved and medians quoted; the table gives zkv's ratio to each alternative and
whether the targets are met::

    zkv bench                      # full run (a few minutes)
    zkv bench --quick              # well under a minute
    zkv bench --json out.json --plot docs/benchmarks.png

Progress goes to stderr, the report to stdout. The exit status is 1 if a measurement
failed (an error, not a missed target), else 0.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import report
from .machine import describe, format_machine
from .runner import Progress, Settings, run_rows
from .suite import SUBJECTS, Lab

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zkv bench",
        description="Measure zkv against a bare pyzmq echo, Manager().dict(), a Pipe server, "
                    "Redis, bare PUB/SUB and multiprocessing.Queue on this machine.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="fewer and shorter repetitions: well under a minute")
    mode.add_argument("--smoke", action="store_true",
                      help="one tiny repetition of everything (checks the tool; the numbers "
                           "mean nothing)")
    p.add_argument("--json", metavar="FILE", help="write every raw sample to FILE")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw zkv's ratios to FILE.png (needs matplotlib: the zkv[bench] extra)")
    p.add_argument("--only", metavar="PATTERNS",
                   help="comma-separated row ids or shell patterns (e.g. 'child_*,pub_*')")
    p.add_argument("--reps", type=int, metavar="N", help="repetitions per subject")
    p.add_argument("--list", action="store_true", help="list the row ids and exit")
    return p


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = Settings.smoke() if args.smoke else Settings.quick() if args.quick \
        else Settings.full()
    settings = settings.with_reps(args.reps)
    machine = describe()
    progress = Progress()
    started = time.monotonic()
    if not args.list:
        print(f"zkv bench ({settings.mode}: {settings.reps} interleaved repetitions per "
              "subject, medians)")
        print(format_machine(machine))
        print(flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C: every helper is stopped.
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args, settings, machine, progress, started)
    except KeyboardInterrupt:
        progress.note("interrupted; every helper process was stopped")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, settings: Settings, machine: dict[str, Any],
         progress: Progress, started: float) -> int:
    with Lab(settings, progress) as lab:
        rows = lab.rows()
        if args.list:
            width = max(len(row.id) for row in rows) + 2
            for row in rows:
                print(f"{row.id:<{width}}{row.title}")
            return 0
        if args.only:
            patterns = [p.strip() for p in args.only.split(",") if p.strip()]
            rows = [r for r in rows if any(fnmatch.fnmatch(r.id, p) for p in patterns)]
            if not rows:
                print(f"zkv bench: no row matches {args.only!r} (see --list)", file=sys.stderr)
                return 2
        results = run_rows(rows, settings, progress)
    elapsed = time.monotonic() - started
    print(report.format_table(results, SUBJECTS))
    print(f"\n{len(results)} workloads in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_json(results, machine, settings, elapsed, SUBJECTS), f)
        print(f"raw samples: {args.json}")
    if args.plot:
        why_not = report.plot(results, args.plot, machine, settings.mode)
        print(f"chart: {args.plot}" if why_not is None else f"chart skipped: {why_not}")
    failed = [f"{r.row.id}/{c.subject}" for r in results for c in r.cases if c.status == "error"]
    if failed:
        print(f"measurements that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
