"""MGD under real ``torchrun --nproc_per_node=2`` (gloo, CPU): the matching equals the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PAIRS = [["layer1.0.add", "layer1.2.add"], ["layer2.0.add", "layer2.2.add"], ["layer3.0.add", "layer3.2.add"]]


def config(tmp_path: Path) -> Path:
    raw = {
        "name": "mgd-ddp",
        # 125 images: uneven shards (63 + 62), so a wrong count or a padded shard would show
        "data": {"dataset": "digits", "train_subset": 125, "batch_size": 32, "eval_batch_size": 40},
        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"},
        "student": {"model": "resnet8", "options": {"widths": [12, 24, 48]}},
        "method": {"name": "mgd", "reducer": "amp", "pairs": PAIRS},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False, "deterministic": True},
    }
    path = tmp_path / "mgd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_two_process_matching_equals_single_process(tmp_path):
    cfg = config(tmp_path)
    run([sys.executable, "-m", "featkd", "match", str(cfg), "--out", str(tmp_path / "single"), "--no-plots"])
    proc = run([*TORCHRUN, "-m", "featkd", "match", str(cfg), "--out", str(tmp_path / "ddp"), "--no-plots"])
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes
    assert "on 125 images" in proc.stdout  # the shards' counts were summed
    single = json.loads((tmp_path / "single" / "matching.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "matching.json").read_text())
    for a, b in zip(single, ddp, strict=True):
        assert a["assignment"] == b["assignment"]
        assert abs(a["mean_cost"] - b["mean_cost"]) < 1e-6  # only the order of float sums differs

    # a real 2-process training epoch starts from the same matching on both ranks (buffers in last.pt)
    run([*TORCHRUN, "-m", "featkd", "train", str(cfg), "--out", str(tmp_path / "train")])
    state = torch.load(tmp_path / "train" / "last.pt", weights_only=True)["distiller"]
    assert int(state["updates"]) == 1  # 1 epoch: the initial solve only
    for i, row in enumerate(single):
        groups, sizes = state[f"stage{i}_groups"], state[f"stage{i}_sizes"]
        got = [groups[j, : sizes[j]].tolist() for j in range(len(sizes))]
        assert got == row["groups"]
