"""Rows, repetitions and statistics.

A :class:`Row` is one workload: a reference subject (zkv, first) and the alternatives, each a
:class:`Case` whose ``run(warmup)`` does **one** repetition and returns a :class:`Rep`. The
runner warms every case up once, then interleaves the repetitions (A B C A B C ...), so that
a slow moment of a shared machine spreads over every subject instead of hitting one.

Metrics:

- ``latency``: samples are seconds per operation; median and p99 of all samples;
- ``throughput``: samples are seconds per operation of ``work`` units (bytes, keys); the
  figure is ``work / median`` (MB/s, keys/s);
- ``rate``: one sample per repetition, already a rate (messages/s, requests/s); median.

*Speed* (higher is better) makes them comparable: ``1/median``, ``work/median``, ``median``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from .agents import AgentError, NotAvailable

__all__ = [
    "OK",
    "Case",
    "CaseResult",
    "Progress",
    "Rep",
    "Row",
    "RowResult",
    "Settings",
    "Skip",
    "Target",
    "percentile",
    "run_rows",
]

OK = "ok"
SKIPPED = "skipped"
NOT_AVAILABLE = "not available"
ERROR = "error"


class Skip(Exception):
    """Raised by a case that cannot run here (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long and how often to measure. :meth:`full`, :meth:`quick` and :meth:`smoke`
    are the three presets."""

    mode: str
    reps: int
    latency_s: float        # seconds per repetition of a latency loop
    min_ops: int            # at least this many operations per latency repetition
    large_ops: int          # operations per repetition for large values
    large_mb: int           # the "large" value (64 MB; smaller in smoke runs)
    batch_s: float          # seconds per repetition of a batch loop
    pub_msgs: int           # messages per throughput repetition ...
    pub_s: float            # ... or this many seconds of publishing, whichever comes first
    pub_latency_msgs: int   # messages per latency repetition (paced)
    clients_s: float        # seconds per repetition of the aggregate throughput
    busy_s: float           # seconds per repetition of the busy-owner test
    staleness_writes: int   # writes per repetition of the staleness test

    @classmethod
    def full(cls) -> Settings:
        return cls("full", reps=7, latency_s=0.5, min_ops=200, large_ops=3, large_mb=64,
                   batch_s=0.5, pub_msgs=30_000, pub_s=1.5, pub_latency_msgs=400,
                   clients_s=0.5, busy_s=0.5, staleness_writes=100)

    @classmethod
    def quick(cls) -> Settings:
        return cls("quick", reps=3, latency_s=0.1, min_ops=50, large_ops=1, large_mb=64,
                   batch_s=0.1, pub_msgs=5000, pub_s=0.3, pub_latency_msgs=60,
                   clients_s=0.15, busy_s=0.15, staleness_writes=30)

    @classmethod
    def smoke(cls) -> Settings:
        return cls("smoke", reps=1, latency_s=0.01, min_ops=5, large_ops=1, large_mb=2,
                   batch_s=0.01, pub_msgs=200, pub_s=0.03, pub_latency_msgs=5,
                   clients_s=0.03, busy_s=0.03, staleness_writes=3)

    def with_reps(self, reps: int | None) -> Settings:
        return self if not reps else dataclasses.replace(self, reps=reps)


@dataclasses.dataclass
class Rep:
    """One repetition's samples, counters worth reporting (drops, losses), and the raw
    samples a derived figure came from (kept in the JSON)."""

    values: Sequence[float]
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    raw: Sequence[float] | None = None  # underlying samples, when values are derived


@dataclasses.dataclass
class Case:
    """One subject of a row. ``run(warmup)`` does one repetition; it raises :class:`Skip` or
    :class:`~zkv.bench.agents.NotAvailable` to be reported as such. ``skip`` skips it up
    front."""

    subject: str
    run: Callable[[bool], Rep] | None
    skip: str | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for zkv in one row.

    ``against`` names the alternative (``speed(zkv) / speed(against) >= min_ratio``);
    without it ``min_speed`` is an absolute floor for zkv's figure. ``no_silent_loss``
    requires the zkv case's ``silent`` counter to stay 0. ``label`` is how the table says it.
    ``subject`` judges another case of the row than the first (zkv's reference case).
    """

    label: str
    against: str | None = None
    min_ratio: float | None = None
    min_speed: float | None = None
    no_silent_loss: bool = False
    subject: str | None = None


@dataclasses.dataclass
class Row:
    id: str
    title: str
    metric: str                      # "latency" | "throughput" | "rate"
    unit: str                        # display unit of throughput/rate rows
    cases: list[Case]
    work: float = 1.0                # units per operation (throughput rows)
    targets: list[Target] = dataclasses.field(default_factory=list)
    note: str = ""
    setup: Callable[[], None] | None = None
    #: Whether the cases are alternatives to compare with the first (False: sizes of one
    #: workload, side by side, with no ratio).
    compare: bool = True


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclasses.dataclass
class CaseResult:
    subject: str
    status: str = OK
    reason: str = ""
    reps: list[Rep] = dataclasses.field(default_factory=list)

    def samples(self) -> list[float]:
        return [v for rep in self.reps for v in rep.values]

    def extra_total(self, name: str) -> float | None:
        found = [rep.extra[name] for rep in self.reps if name in rep.extra]
        return sum(found) if found else None

    @property
    def ok(self) -> bool:
        return self.status == OK and bool(self.samples())

    def median(self) -> float:
        return percentile(self.samples(), 50)

    def p99(self) -> float:
        return percentile(self.samples(), 99)


@dataclasses.dataclass
class TargetResult:
    target: Target
    value: float | None     # the ratio (or zkv's figure, or silent losses)
    met: bool | None        # None: could not be judged (a case did not run)


@dataclasses.dataclass
class RowResult:
    row: Row
    cases: list[CaseResult]

    def case(self, subject: str) -> CaseResult | None:
        for c in self.cases:
            if c.subject == subject:
                return c
        return None

    @property
    def reference(self) -> CaseResult:
        return self.cases[0]

    def speed(self, result: CaseResult) -> float | None:
        """Higher is better; None if the case has no figure."""
        if not result.ok:
            return None
        m = result.median()
        if self.row.metric == "rate":
            return m
        if m <= 0:
            return None
        return (self.row.work if self.row.metric == "throughput" else 1.0) / m

    def ratio(self, result: CaseResult, mine: CaseResult | None = None) -> float | None:
        """speed(mine) / speed(result), ``mine`` being zkv's reference case by default: >1
        means zkv is faster (None: not compared; a row of sizes compares only in targets)."""
        if mine is None and not self.row.compare:
            return None
        ours, theirs = self.speed(mine or self.reference), self.speed(result)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    def judge(self) -> list[TargetResult]:
        out = []
        for t in self.row.targets:
            judged = self.reference if t.subject is None else self.case(t.subject)
            if judged is None:
                out.append(TargetResult(t, None, None))
            elif t.no_silent_loss:
                silent = judged.extra_total("silent") if judged.ok else None
                out.append(TargetResult(t, silent, None if silent is None else silent == 0))
            elif t.against is not None:
                other = self.case(t.against)
                ratio = None if other is None else self.ratio(other, judged)
                met = None if ratio is None or t.min_ratio is None else ratio >= t.min_ratio
                out.append(TargetResult(t, ratio, met))
            else:
                speed = self.speed(judged)
                met = None if speed is None or t.min_speed is None else speed >= t.min_speed
                out.append(TargetResult(t, speed, met))
        return out


class Progress:
    """One line on stderr: rewritten in place on a terminal, a line per row otherwise."""

    def __init__(self, stream: TextIO | None = None, total: int = 0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = total
        self.started = time.monotonic()
        self._last_row = ""

    def show(self, index: int, row: Row, subject: str, rep: str) -> None:
        elapsed = time.monotonic() - self.started
        if self.tty:
            line = (f"\rzkv bench [{index}/{self.total}] {elapsed:5.0f}s  {row.title} · "
                    f"{subject} · {rep}")
            self.stream.write(line[:118].ljust(118))
            self.stream.flush()
        elif row.id != self._last_row:
            self._last_row = row.id
            self.stream.write(f"zkv bench [{index}/{self.total}] {elapsed:5.1f}s  {row.title}\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        self.clear()
        self.stream.write(f"zkv bench: {text}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()


def _fail(result: CaseResult, exc: BaseException) -> None:
    if isinstance(exc, Skip):
        result.status, result.reason = SKIPPED, str(exc)
    elif isinstance(exc, NotAvailable):
        result.status, result.reason = NOT_AVAILABLE, str(exc)
    else:
        result.status = ERROR
        result.reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, AgentError) \
            else str(exc)


def run_row(row: Row, settings: Settings, progress: Progress, index: int) -> RowResult:
    """Warm up, then run ``settings.reps`` interleaved repetitions of every case of ``row``."""
    results = [CaseResult(c.subject) for c in row.cases]
    for case, result in zip(row.cases, results, strict=True):
        if case.skip is not None or case.run is None:
            result.status, result.reason = SKIPPED, case.skip or "no measurement"
    try:
        if row.setup is not None:
            row.setup()
    except Exception as exc:
        for result in results:
            if result.status == OK:
                _fail(result, exc)
        return RowResult(row, results)
    live = [(c, r) for c, r in zip(row.cases, results, strict=True) if r.status == OK]
    for rep in range(-1, settings.reps):  # -1: the warm-up, not kept
        for case, result in live:
            if result.status != OK:
                continue
            progress.show(index, row, case.subject,
                          "warm-up" if rep < 0 else f"rep {rep + 1}/{settings.reps}")
            assert case.run is not None
            try:
                outcome = case.run(rep < 0)
            except Exception as exc:
                _fail(result, exc)
                continue
            if rep >= 0:
                result.reps.append(outcome)
    for result in results:
        if result.status == OK and not result.samples():
            result.status, result.reason = ERROR, "no samples"
    return RowResult(row, results)


def run_rows(rows: Sequence[Row], settings: Settings,
             progress: Progress | None = None) -> list[RowResult]:
    progress = progress or Progress(total=len(rows))
    progress.total = len(rows)
    out = [run_row(row, settings, progress, i + 1) for i, row in enumerate(rows)]
    progress.clear()
    return out

