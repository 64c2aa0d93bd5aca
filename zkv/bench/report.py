"""The results as a table (stdout), as JSON (raw samples) and as a chart (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .runner import OK, CaseResult, RowResult, Settings, TargetResult

__all__ = ["format_table", "plot", "to_json"]


def format_seconds(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 0:
        return "-" + format_seconds(-seconds)
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return _three(seconds / scale) + " " + unit
    return _three(seconds / 1e-9) + " ns"


def _three(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def format_speed(value: float, unit: str) -> str:
    if value >= 1000:
        return f"{value:,.0f} {unit}"
    return f"{_three(value)} {unit}"


def format_ratio(ratio: float | None) -> str:
    if ratio is None or ratio <= 0:
        return ""
    if ratio >= 1:
        return f"{ratio:.2f}x faster"
    return f"{1 / ratio:.2f}x slower"


def figure(row: RowResult, case: CaseResult) -> tuple[str, str]:
    """The (median, p99) cells of a case."""
    if not case.ok:
        return "", ""
    if row.row.metric == "latency":
        return format_seconds(case.median()), format_seconds(case.p99())
    speed = row.speed(case)
    return (format_speed(speed, row.row.unit) if speed is not None else "-"), ""


def _verdict(t: TargetResult) -> str:
    state = "n/a" if t.met is None else ("met" if t.met else "NOT met")
    return f"{t.target.label}: {state}"


def _notes(case: CaseResult) -> str:
    if case.status != OK:
        return f"{case.status}: {case.reason}"
    parts = []
    sent = case.extra_total("sent")
    if sent is not None:
        parts.append(f"sent {sent:,.0f}, received {case.extra_total('received') or 0:,.0f}, "
                     f"dropped {case.extra_total('dropped') or 0:,.0f}, "
                     f"lost silently {case.extra_total('silent') or 0:,.0f}")
    cpu, received = case.extra_total("cpu"), case.extra_total("received")
    if cpu and received:
        parts.append(f"subscriber CPU {format_seconds(cpu / received)}/msg")
    ops, seconds = case.extra_total("ops"), case.extra_total("seconds")
    if ops and seconds:
        p99 = max(rep.extra.get("p99", math.nan) for rep in case.reps)
        parts.append(f"mean latency {format_seconds(seconds / ops)}, worst p99 "
                     f"{format_seconds(p99)}")
    saves = case.extra_total("saves")
    if saves:
        stall = max(rep.extra.get("stall", math.nan) for rep in case.reps)
        parts.append(f"whole save {format_seconds((case.extra_total('save') or 0) / saves)}, "
                     f"{(case.extra_total('bytes') or 0) / saves / 1e6:,.1f} MB; a client's "
                     f"slowest get meanwhile {format_seconds(stall)}")
    unseen = case.extra_total("unseen")
    if unseen:
        parts.append(f"{unseen:,.0f} writes overtaken before they were read")
    return "; ".join(parts)


def format_table(results: Sequence[RowResult], subjects: dict[str, str] | None = None) -> str:
    """The report: one block per workload, zkv first, each alternative with its ratio and,
    where the issue sets one, the target and whether it was met."""
    head = f"{'workload / subject':<34}{'median':>16}{'p99':>12}  {'zkv vs this':<15}target"
    lines = [head, "-" * len(head)]
    met = missed = unjudged = 0
    for row in results:
        lines.append(row.row.title)
        verdicts = row.judge()
        for t in verdicts:
            if t.met is None:
                unjudged += 1
            elif t.met:
                met += 1
            else:
                missed += 1
        for i, case in enumerate(row.cases):
            median, p99 = figure(row, case)
            ratio = format_ratio(row.ratio(case)) if i and case.ok else ""
            mine = [t for t in verdicts if (t.target.against == case.subject) or
                    (i == 0 and t.target.against is None)]
            target = "; ".join(_verdict(t) for t in mine)
            notes = _notes(case)
            if case.status != OK:
                lines.append(f"  {case.subject:<32}{notes}")
                continue
            line = f"  {case.subject:<32}{median:>16}{p99:>12}  {ratio:<15}{target}"
            if notes:
                line += ("   " if target else "") + f"[{notes}]"
            lines.append(line.rstrip())
    lines.append("-" * len(head))
    lines.append(f"targets: {met} met, {missed} NOT met, {unjudged} not judged")
    if subjects:
        lines.append("")
        lines.extend(f"  {name:<24}{meaning}" for name, meaning in subjects.items())
    return "\n".join(lines)


def _case_json(row: RowResult, case: CaseResult) -> dict[str, Any]:
    out: dict[str, Any] = {"subject": case.subject, "status": case.status,
                           "reason": case.reason}
    if case.ok:
        speed = row.speed(case)
        out.update(median=case.median(), p99=case.p99(), speed=speed,
                   zkv_speedup=row.ratio(case), display=figure(row, case)[0])
    out["reps"] = [{"values": list(rep.values), "extra": rep.extra,
                    **({} if rep.raw is None else {"raw": list(rep.raw)})}
                   for rep in case.reps]
    return out


def to_json(results: Sequence[RowResult], machine: dict[str, Any], settings: Settings,
            elapsed: float, subjects: dict[str, str]) -> dict[str, Any]:
    """Everything, raw samples included. Latency and throughput samples are seconds per
    operation; rate samples are per second; ``zkv_speedup`` is speed(zkv)/speed(subject)."""
    rows = []
    for row in results:
        r = row.row
        rows.append({
            "id": r.id, "title": r.title, "metric": r.metric, "unit": r.unit, "work": r.work,
            "note": r.note,
            "cases": [_case_json(row, c) for c in row.cases],
            "targets": [{"label": t.target.label, "against": t.target.against,
                         "value": t.value, "met": t.met} for t in row.judge()],
        })
    return {"tool": "zkv bench", "format": 1, "mode": settings.mode,
            "settings": settings.__dict__, "machine": machine, "elapsed_s": round(elapsed, 1),
            "subjects": subjects, "rows": rows}


def plot(results: Sequence[RowResult], path: str, machine: dict[str, Any],
         mode: str = "") -> str | None:
    """Draw zkv's speed relative to each alternative (log scale, targets marked) to
    ``path``. Returns None, or why no chart was drawn (matplotlib missing)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "matplotlib is not installed (pip install 'zkv[bench]'): no chart drawn"
    labels: list[str] = []
    ratios: list[float] = []
    marks: list[float | None] = []
    for row in results:
        thresholds = {t.against: t.min_ratio for t in row.row.targets if t.against}
        for case in row.cases[1:]:
            ratio = row.ratio(case)
            if ratio is None:
                continue
            labels.append(f"{row.row.title}  vs  {case.subject}")
            ratios.append(ratio)
            marks.append(thresholds.get(case.subject))
    if not ratios:
        return "no comparison to draw"
    height = 0.26 * len(ratios) + 1.8
    fig, ax = plt.subplots(figsize=(11, height))
    ys = list(range(len(ratios)))[::-1]
    colors = ["#2a9d55" if r >= 1 else "#d0743c" for r in ratios]
    # Bars grow from 1: to the right where zkv is faster, to the left where it is slower.
    ax.barh(ys, [r - 1 for r in ratios], left=1.0, color=colors, height=0.7)
    for y, ratio, mark in zip(ys, ratios, marks, strict=True):
        if mark is not None:
            ax.plot([mark, mark], [y - 0.45, y + 0.45], color="black", linewidth=2)
        text = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"
        ax.text(ratio * (1.06 if ratio >= 1 else 1 / 1.06), y, text,
                va="center", ha="left" if ratio >= 1 else "right", fontsize=6)
    ax.set_xscale("log")
    low, high = min([*ratios, *(m for m in marks if m)]), max([*ratios, *(m for m in marks if m)])
    ax.set_xlim(min(low, 1.0) / 2, max(high, 1.0) * 2)
    left, right = min(low, 1.0) / 2, max(high, 1.0) * 2
    steps = (1, 2, 5) if right / left < 1000 else (1,)  # sparser ticks on a wide range
    ticks = [m * 10.0 ** e for e in range(-4, 5) for m in steps
             if left <= m * 10.0 ** e <= right]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.axvline(1.0, color="grey", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(-0.8, len(ratios) - 0.2)
    ax.set_xlabel("zkv's speed / the alternative's (log scale; right of 1: zkv faster; "
                  "black tick: the target)")
    ax.set_title(f"zkv bench ({mode}): {machine.get('cpu', '?')}, {machine.get('cores', '?')} "
                 f"cores, {machine.get('python', '')}, libzmq {machine.get('libzmq', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
