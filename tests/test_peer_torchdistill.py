"""``benchmarks/peer_torchdistill.py --smoke``: featkd and torchdistill on digits for one epoch (issue 16).

The two arms start from the same weights and see the same batches, so their first losses must agree (a
different loss convention, temperature or weighting would show here), the learning rates must follow the same
schedule, and a second call must skip the finished cells (the full benchmark is resumable per cell).
torchdistill is an optional benchmark package (``pip install -c constraints-dev.txt torchdistill``, or the
``peer`` extra), not part of ``.[dev]``, so the test is skipped where it is not installed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdistill", reason="torchdistill not installed (optional benchmark peer: "
                                           "pip install -c constraints-dev.txt torchdistill)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_torchdistill.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_smoke_both_libraries_agree_on_the_first_step_and_resume_skips(tmp_path: Path) -> None:
    out = tmp_path / "peer.json"
    proc = run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["cells"]) == {f"{lib}/{m}/0" for lib in ("featkd", "torchdistill") for m in ("kd", "fitnets")}
    for method in ("kd", "fitnets"):
        f, t = result["cells"][f"featkd/{method}/0"], result["cells"][f"torchdistill/{method}/0"]
        assert math.isclose(f["first_step_loss"], t["first_step_loss"], rel_tol=1e-5), method
        assert f["max_lr_difference"] < 1e-9
        assert f["steps_per_epoch"] == t["steps_per_epoch"] == 9  # digits: 300 images, batch 32, drop_last
        for cell in (f, t):
            assert cell["epochs"] == 1 and cell["images_per_s"] > 0 and 10.0 < cell["test_acc"] <= 100.0
        assert abs(f["test_acc"] - t["test_acc"]) < 5.0  # same batches and weights; float rounding only
    rows = {(r["method"], r["library"]): r for r in result["rows"]}
    assert rows[("kd", "featkd")]["images_per_s_ratio_vs_featkd"] == 1.0
    assert result["torchdistill"] and result["differences"]["fitnets"]

    again = run("--smoke", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 2
    assert json.loads(out.read_text())["cells"] == result["cells"]
    report = run("--report", "--out", str(out))
    assert report.returncode == 0 and "| kd | torchdistill | 1 |" in report.stdout
