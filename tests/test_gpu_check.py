"""``benchmarks/gpu_check.py`` in its CPU mode, run the way the GPU machine runs it (issue 11), so it cannot rot.

Two steps, as documented in the script: ``--make-data`` writes the Fashion-MNIST .npz that is carried to the GPU
machine, then the check reads it with ``--data`` from the source tree (``PYTHONPATH=.``, no install needed).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
#: the methods of issue 11; dense / segmentation configs add labels when they exist
METHODS = {"none", "kd", "fitnets", "at", "sp", "rkd", "mgd-amp", "mgd-rd", "mgd-sm", "cwt", "kda", "dfa"}


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_every_sub_check(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    npz = tmp_path / "fashion-mnist-small.npz"
    made = run("--make-data", str(npz), "--source-dir", str(fashion_mnist_dir), timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    assert npz.stat().st_size < 16 * 2**20  # carried within the 64 MiB limit with room to spare
    with np.load(npz) as z:
        assert z["train_images"].shape == (12000, 28, 28) and z["test_labels"].shape == (2000,)
        assert z["train_images"].dtype == np.uint8

    out = tmp_path / "gpu_check.json"
    proc = run("--data", str(npz), "--device", "cpu", "--out", str(out), timeout=300)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failed"] == {} and report["mode"] == "cpu"
    env = report["environment"]
    for key in ("torch", "torchvision", "python", "device_name", "gpu_count", "bf16_supported"):
        assert key in env

    methods = report["checks"]["methods"]
    runs = methods["runs"]
    ran = {label: r for label, r in runs.items() if "skipped" not in r}
    assert set(ran) >= METHODS, f"missing method checks: {METHODS - set(ran)}"
    assert all(label.startswith("scenes-seg:") for label in set(runs) - set(ran))  # dense: skipped on the CPU
    for label, r in ran.items():
        assert r["ok"], (label, r.get("error"))
        assert math.isfinite(r["train_loss"]), label
        assert r["test_acc"] > r["chance"] and r["cpu_test_acc"] > r["chance"], label
        assert r["last_equals_student"] and r["epoch"] == 1, label
        assert "train.amp=bf16" in r["overrides"] and "train.epochs=1" in r["overrides"], label
    assert "method.warmup_epochs=0" in runs["kda"]["overrides"] and runs["kda"]["terms"]["kda"] > 0

    ddp = report["checks"]["ddp"]
    assert ddp["ok"], ddp.get("error")
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["first"]["processes"] == 2  # real gloo DDP
    assert ddp["first"]["summary"]["epochs"] == 1 and ddp["resume"]["summary"]["epochs"] == 2
    assert ddp["resume"]["resumed"] and [e["epoch"] for e in ddp["epochs"]] == [1, 2]
    assert "--resume" in ddp["resume"]["command"] and "train.sync_batchnorm=true" in ddp["resume"]["command"]

    rows = report["checks"]["throughput"]["rows"]
    measured = [r for r in rows if "images_per_s" in r]
    combos = {(r["pair"], r["dtype"], r["channels_last"]) for r in measured}
    pairs = {r["pair"] for r in measured}
    assert len(pairs) == 2 and len(combos) == 8  # both pairs x fp32/bf16 x channels-last off/on, eager
    for r in measured:
        assert r["ok"]
        assert set(r["images_per_s"]) == {"featkd", "hand", "hand_inference_mode"}
        assert all(v > 0 and math.isfinite(v) for v in r["images_per_s"].values())
        assert r["ratio_featkd_over_hand"] > 0 and r["ratio_inference_mode_over_no_grad"] > 0
    assert all(r.get("skipped") for r in rows if r["compile"])  # compile rows: off by default on the CPU
    # the detection pair (RetinaNet R50-FPN -> R18-FPN, FitNets on the FPN levels, bf16), tiny on the CPU
    det = report["checks"]["throughput"]["detection_rows"]
    assert [(r["pair"], r["image_size"], r["batch"]) for r in det] == [("tv-retinanet-r50-r18@128", 128, 2)]
    for r in det:
        assert r["ok"] and r["task"] == "detection" and r["dtype"] == "bf16" and r["method"].startswith("fitnets")
        assert set(r["images_per_s"]) == {"featkd", "hand"}
        assert all(v > 0 and math.isfinite(v) for v in r["images_per_s"].values()) and r["ratio_featkd_over_hand"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not list((ROOT / "configs").glob("scenes-seg-none-*.yaml")), reason="no dense configs yet")
def test_gpu_check_runs_a_dense_config_when_asked(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    # The CPU mode skips dense families by default (their nets cost ~10-30 s a config on one core); on CUDA all
    # run. Here the segmentation baseline (no teacher) runs through the same checks.
    out = tmp_path / "dense.json"
    proc = run("--device", "cpu", "--only", "methods", "--methods", "scenes-seg:none", "--dense-limit", "1",
               "--source-dir", str(fashion_mnist_dir), "--out", str(out), timeout=300)
    report = json.loads(out.read_text())
    runs = report["checks"]["methods"]["runs"]
    assert set(runs) == {"scenes-seg:none"}
    r = runs["scenes-seg:none"]
    assert proc.returncode == 0 and r["ok"], (r.get("error"), proc.stdout[-2000:])
    assert math.isfinite(r["train_loss"]) and r["test_acc"] > r["chance"] and r["cpu_test_acc"] > r["chance"]
    assert r["test_miou"] is not None and r["last_equals_student"]
