"""``zkv bench`` runs end to end and reports every workload: a figure, or why there is none.

These tests pin the tool, not its timings: a ``--smoke`` run's numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zkv.bench.runner import Case, CaseResult, Rep, Row, RowResult, Target

ROWS = {
    "child_get", "child_set", "owner_get", "owner_set",
    "set_1mb", "get_1mb", "set_2mb", "get_2mb",  # smoke runs use 2 MB for the large value
    "get_many", "set_many", "pipeline", "cached_get", "cache_staleness",
    "pub_rate_1", "pub_rate_4", "pub_receive_1", "pub_iter_1", "pub_callback_1",
    "pub_worker_1", "pub_worker_receive_1", "pub_worker_iter_1", "pub_worker_callback_1",
    "pub_float_1", "pub_latency_1", "pub_latency_4",
    "clients_1", "clients_4", "clients_16", "busy_owner",
    "async_get", "async_gather", "snapshot_pause",
    "redis_get", "redis_set", "redis_get_many", "redis_set_many", "redis_pub_1",
}
REPORTED = {"ok", "skipped", "not available"}
#: Seconds a --smoke run may take: about 3 s on an idle 2-core machine; generous for a loaded
#: one (the tests below have a pytest timeout above it).
SMOKE_LIMIT = 150


def _bench(args: list[str], tmp_path: Path, path: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("ZKV_ENDPOINT", None)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "zkv", "bench", *args], capture_output=True,
                          text=True, timeout=SMOKE_LIMIT, env=env, cwd=tmp_path, check=False)


@pytest.mark.timeout(SMOKE_LIMIT + 30)
class TestSmokeRun:
    """A --smoke run reports every row, writes the JSON and the chart (or says why not)."""

    def test_every_row_is_reported(self, tmp_path: Path) -> None:
        out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
        proc = _bench(["--smoke", "--json", str(out), "--plot", str(chart)], tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data: dict[str, Any] = json.loads(out.read_text())
        assert {row["id"] for row in data["rows"]} == ROWS

        for row in data["rows"]:
            assert row["title"] in proc.stdout
            assert row["cases"][0]["subject"].startswith("zkv")
            for case in row["cases"]:
                where = f"{row['id']}/{case['subject']}"
                assert case["status"] in REPORTED, f"{where}: {case['status']} {case['reason']}"
                if case["status"] == "ok":
                    assert case["reps"] and all(rep["values"] for rep in case["reps"]), where
                    assert math.isfinite(case["median"]) and case["median"] >= 0, where
                    assert case["speed"] > 0, where
                else:
                    assert case["reason"], where
                    assert f"{case['status']}: {case['reason']}" in proc.stdout, where
            for target in row["targets"]:
                assert target["met"] in (True, False, None)
                if target["met"] is not None:
                    state = "met" if target["met"] else "NOT met"
                    assert f"{target['label']}: {state}" in proc.stdout

        # zkv's pub/sub accounting: every message was received or reported dropped.
        for row_id in sorted(r for r in ROWS if r.startswith("pub_")):
            row = next(r for r in data["rows"] if r["id"] == row_id)
            extra = row["cases"][0]["reps"][0]["extra"]
            assert extra["received"] + extra["dropped"] == extra["sent"] > 0, (row_id, extra)
            assert extra["silent"] == 0, (row_id, extra)

        machine = data["machine"]
        for field in ("cpu", "cores", "python", "pyzmq", "libzmq"):
            assert machine[field], field
        assert f"pyzmq {machine['pyzmq']} (libzmq {machine['libzmq']})" in proc.stdout
        assert "zkv bench [" in proc.stderr  # the progress line

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            assert "chart skipped: matplotlib is not installed" in proc.stdout
            assert not chart.exists()
        else:
            assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_redis_rows_are_skipped_without_redis_server(self, tmp_path: Path) -> None:
        empty = tmp_path / "bin"
        empty.mkdir()
        proc = _bench(["--smoke", "--only", "child_get"], tmp_path, path=str(empty))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # (without redis-py installed the reason is that one instead: either way, a skip
        # that says what to install)
        assert "skipped: redis-server is not on PATH" in proc.stdout \
            or "skipped: the redis Python package is not installed" in proc.stdout, proc.stdout
        assert "bare zmq echo" in proc.stdout


def _row(zkv_seconds: float, echo_seconds: float | None) -> RowResult:
    row = Row(id="r", title="r", metric="latency", unit="",
              cases=[Case("zkv", None), Case("echo", None)],
              targets=[Target("<=1.2x slower", against="echo", min_ratio=1 / 1.2),
                       Target("fast", min_speed=1000.0)])
    echo = CaseResult("echo", reps=[Rep([echo_seconds])]) if echo_seconds else \
        CaseResult("echo", status="skipped", reason="not here")
    return RowResult(row, [CaseResult("zkv", reps=[Rep([zkv_seconds])]), echo])


class TestVerdicts:
    """The target column compares speeds the right way round, and says n/a without data."""

    def test_ratio_and_targets(self) -> None:
        result = _row(zkv_seconds=110e-6, echo_seconds=100e-6)
        ratio = result.ratio(result.cases[1])
        assert ratio == pytest.approx(100 / 110)
        met = {t.target.label: t.met for t in result.judge()}
        assert met == {"<=1.2x slower": True, "fast": True}

        slow = _row(zkv_seconds=130e-6, echo_seconds=100e-6)
        assert {t.target.label: t.met for t in slow.judge()}["<=1.2x slower"] is False

    def test_missing_alternative_is_not_judged(self) -> None:
        result = _row(zkv_seconds=110e-6, echo_seconds=None)
        verdicts = {t.target.label: t.met for t in result.judge()}
        assert verdicts["<=1.2x slower"] is None
