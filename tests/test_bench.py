"""The benchmark runner: a real (tiny) grid, its results files, and resuming a half-finished grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featkd", "bench", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_bench_grid_results_and_resume(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["digits-smoke", "--runs-dir", str(runs), "--results-dir", str(results),
              "--set", "train.epochs=2", "--set", "train.eval_every=1"]
    first = bench(*common, "--jobs", "2")
    assert first.returncode == 0, first.stderr
    assert "0 of 4 cells already finished" in first.stdout
    data = json.loads((results / "digits-smoke.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "kd"}
    for r in rows.values():
        assert r["seeds"] == 2 and len(r["accs"]) == 2 and 0 < r["acc_mean"] <= 100
        assert {"acc_mean", "acc_se", "delta_vs_ce", "train_s"} <= set(r)
        assert r["step_time_ratio"] > 0
    assert rows["none"]["delta_vs_ce"] == 0
    assert rows["kd"]["step_time_ratio"] == pytest.approx(1.0)
    table = (results / "digits-smoke.md").read_text()
    assert "| kd | 2 |" in table
    # half-finished grid: one cell lost its summary -> only that cell runs again
    (runs / "kd" / "seed1" / "summary.json").unlink()
    report = bench(*common, "--no-timing", "--report")  # tables from what finished, nothing trained
    assert report.returncode == 0, report.stderr
    assert "running" not in report.stdout and not (runs / "kd" / "seed1" / "summary.json").exists()
    assert {r["method"]: r["seeds"] for r in json.loads((results / "digits-smoke.json").read_text())["rows"]} == {
        "none": 2, "kd": 1}
    second = bench(*common, "--no-timing")
    assert second.returncode == 0, second.stderr
    assert "3 of 4 cells already finished; running 1" in second.stdout
    bad = bench("data-limted")
    assert bad.returncode == 2 and "unknown protocol 'data-limted'" in bad.stderr
