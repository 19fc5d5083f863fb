"""MGD under real ``torchrun --nproc_per_node=2`` (gloo, CPU): both ranks solve the single-process matching."""

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
        # 99 of the 125 images per update, redrawn at every update: each rank takes its shard (50 + 49) of the
        # same draw
        "method": {"name": "mgd", "reducer": "amp", "pairs": PAIRS, "stats_images": 99},
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
    """Each rank's own matching (two updates, statistics sharded and all-reduced) equals the other rank's and
    the single-process one; then a real 2-process training epoch checkpoints that matching."""
    from featkd.config import load_config
    from tests.rank_worker import matching_updates

    cfg = config(tmp_path)
    out = tmp_path / "ddp"
    proc = run([*TORCHRUN, "-m", "tests.rank_worker", str(cfg), str(out), "--mgd-updates", "2", "--train"])
    single = matching_updates(load_config(cfg), 2)
    ranks = [json.loads((out / f"matching-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every number of both ranks' matchings, bit for bit
    assert [u["images"] for u in ranks[0]] == [u["images"] for u in single] == [99, 99]  # 50 + 49 summed
    for ddp_update, single_update in zip(ranks[0], single, strict=True):
        for a, b in zip(single_update["rows"], ddp_update["rows"], strict=True):
            assert a["assignment"] == b["assignment"] and a["groups"] == b["groups"]
            assert abs(a["mean_cost"] - b["mean_cost"]) < 1e-6  # only the order of float sums differs
    first, second = ([r["mean_cost"] for r in u["rows"]] for u in single)
    assert first != second  # the second update drew other images

    # the 2-process training epoch starts from that matching (its buffers in rank 0's last.pt; the
    # matching itself is a buffer DDP keeps equal, and each rank's own solve is compared above)
    assert "mgd: matching update 1 on 99 images" in proc.stdout  # the trainer's own solve, shards summed
    state = torch.load(out / "run" / "last.pt", weights_only=True)["distiller"]
    assert int(state["updates"]) == 1  # 1 epoch: the initial solve only
    for i, row in enumerate(single[0]["rows"]):
        groups, sizes = state[f"stage{i}_groups"], state[f"stage{i}_sizes"]
        got = [groups[j, : sizes[j]].tolist() for j in range(len(sizes))]
        assert got == row["groups"]
    costs = [torch.load(out / f"state-rank{r}.pt", weights_only=True)["distiller"]["_extra_state"]["cost"]
             for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*costs, strict=True))  # the same all-reduced statistics
