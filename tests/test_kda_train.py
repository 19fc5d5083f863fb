"""KDA in real short trainings on digits: resume, the landmark strategies, DDP (torchrun, gloo), diagnostics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd.config import build_config
from featkd.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CENTRES = ("t_centres", "s_centres")

#: |centre_ddp - centre_single| accepted. Teacher features (eval mode) differ only by the order of float64
#: sums (measured 0); student features come from weights that differ by ~1e-8 (float order in the gradient
#: all-reduce, see test_ddp.py) after 2 epochs of a BatchNorm-free student.
DDP_CENTRE_TOLERANCE = 1e-5


def raw_config(student: str = "resnet8", epochs: int = 4, **method) -> dict:
    return {
        "name": "kda-test",
        "data": {"dataset": "digits", "train_subset": 300, "batch_size": 32},
        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"},
        "student": {"model": student},
        "method": {"name": "kda", "warmup_epochs": 1, **method},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": epochs, "deterministic": True, "num_threads": 1, "progress": "off",
                  "tensorboard": False, "eval_every": 100},
    }


def quiet(_msg: str) -> None:
    pass


def distiller_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["distiller"]


def test_resume_keeps_the_centres_no_nan_and_equals_the_uninterrupted_run(tmp_path):
    full = train(build_config(raw_config()), tmp_path / "full", log=quiet)
    stop = raw_config()
    stop["train"]["stop_after"] = 2
    first = train(build_config(stop), tmp_path / "split", log=quiet)
    assert first.status == "stopped"
    after_stop = distiller_state(tmp_path / "split")
    assert after_stop["has_centre"].all() and all(torch.isfinite(after_stop[k]).all() for k in CENTRES)
    assert after_stop["counts"].sum() == 0  # saved between epochs: the sums start empty after a resume
    resumed = train(build_config(raw_config()), tmp_path / "split", resume=True, log=quiet)
    assert resumed.status == "finished" and resumed.epochs == 4
    a, b = distiller_state(tmp_path / "full"), distiller_state(tmp_path / "split")
    for key in CENTRES:
        assert torch.isfinite(b[key]).all()
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    sa = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    sb = torch.load(tmp_path / "split" / "student.pt", weights_only=True)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    history = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [h["kda_active"] for h in history] == [0.0, 1.0, 1.0, 1.0]  # warm-up 1 epoch
    assert all(h["train_kda"] > 0 for h in history[1:]) and resumed.test_acc == full.test_acc


@pytest.mark.parametrize("strategy", ["class-means-fresh", "kmeans", "random"])
def test_every_landmark_strategy_trains(tmp_path, strategy):
    options = {"landmarks": strategy, "warmup_epochs": 0}
    if strategy != "class-means-fresh":
        options["num_landmarks"] = 16
    result = train(build_config(raw_config(epochs=2, **options)), tmp_path / "run", log=quiet)
    assert result.status == "finished"
    state = distiller_state(tmp_path / "run")
    m = 10 if strategy == "class-means-fresh" else 16
    assert state["t_centres"].shape == (m, 64) and state["has_centre"].all()
    assert all(torch.isfinite(state[k]).all() and state[k].abs().sum() > 0 for k in CENTRES)
    if strategy == "kmeans":
        assert state["has_clusters"] and torch.isfinite(state["clusters"]).all()
    assert all(h["kda_active"] == 1.0 and h["train_kda"] > 0 for h in result.history)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "epochs", "warmup"), [("class-means", 2, 2), ("class-means-fresh", 1, 0)])
def test_two_process_gloo_run_gives_the_same_centres_as_one_process(tmp_path, strategy, epochs, warmup):
    # A BatchNorm-free student, so that train-mode features do not depend on the per-rank batch.
    # class-means: the training passes' sums, all-reduced at each epoch end, with the term kept off
    # (warm-up = epochs): with it on, each rank normalises its loss by its own half batch's ||K_t||, so the
    # two runs' weights legitimately part (by ~5e-4 in the centres after one epoch), which would hide a
    # bookkeeping error of that size. class-means-fresh: the eval pass over each rank's shard at the start of
    # epoch 1 (same initial weights in both runs), all-reduced; the term is on during that epoch under DDP.
    raw = raw_config(student="plaincnn", epochs=epochs, landmarks=strategy, warmup_epochs=warmup)
    cfg = tmp_path / "kda.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for cmd, out in (([sys.executable, "-m", "featkd"], single), ([*TORCHRUN, "-m", "featkd"], ddp)):
        proc = subprocess.run([*cmd, "train", str(cfg), "--out", str(out)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    a, b = distiller_state(single), distiller_state(ddp)
    assert a["has_centre"].all() and b["has_centre"].all()
    for key in CENTRES:
        diff = (a[key] - b[key]).abs().max().item()
        print(f"{strategy} {key}: max |ddp - single| = {diff:.3e}")
        assert diff < DDP_CENTRE_TOLERANCE, key
    # and not trivially: the centres are far from zero and differ between classes
    assert a["s_centres"].abs().max() > 0.1 and (a["t_centres"][0] - a["t_centres"][1]).abs().max() > 1e-2


def featkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featkd", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_kernel_command_on_a_trained_pair_and_on_identical_networks(tmp_path):
    from featkd.models.zoo import resolve_weights

    cfg = tmp_path / "kda.yaml"
    cfg.write_text(yaml.safe_dump(raw_config()))
    same = tmp_path / "same"
    # the teacher as its own student: every difference is 0, the Nyström errors agree
    proc = featkd("kernel", str(cfg), "--n", "120", "--out", str(same), "--set", "student.model=resnet20",
                  "--student-checkpoint", str(resolve_weights("zoo:digits-resnet20")))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((same / "kernel.json").read_text())
    assert report["n"] == 120 and report["m"] == 10 and report["teacher_dim"] == 64
    assert report["full_diff"] == 0 and report["partial_diff"] == 0
    assert report["centered"]["full_diff"] == 0 and report["centered"]["nystrom_error_teacher"] > 0
    assert report["nystrom_error_teacher"] == pytest.approx(report["nystrom_error_student"])
    assert (same / "kernel.png").stat().st_size > 10_000
    # a short KDA run, then its stored landmarks
    run = tmp_path / "run"
    train(build_config(raw_config(epochs=2)), run, log=quiet)
    stored = tmp_path / "stored"
    proc = featkd("kernel", str(cfg), "--n", "120", "--out", str(stored), "--student-checkpoint",
                  str(run / "last.pt"), "--landmarks", "stored", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((stored / "kernel.json").read_text())
    assert r["landmark_source"] == "stored" and r["full_diff"] > 0 and r["partial_diff"] > 0
    assert r["full_diff"] <= r["triangle_bound"] * (1 + 1e-9)
    assert not (stored / "kernel.png").exists()
    # user errors: one line, exit 2, nothing overwritten
    before = (stored / "kernel.json").read_bytes()
    for args, message in (
        (["--n", "120", "--out", str(stored), "--no-plot"], "exists; pass --force"),
        (["--n", "1", "--out", str(tmp_path / "x")], "--n 1: need at least 2"),
        (["--n", "100000", "--out", str(tmp_path / "x")], "more than --memory-budget-gib"),
        (["--n", "50", "--out", str(tmp_path / "x"), "--landmarks", "stored"], "--landmarks stored needs"),
    ):
        proc = featkd("kernel", str(cfg), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert (stored / "kernel.json").read_bytes() == before


@pytest.mark.slow
def test_scaling_benchmark_reports_exponents_and_refuses_the_full_kernel_over_budget(tmp_path):
    out = tmp_path / "scaling.json"
    # budget 1 MiB: the full loss at N=200 (estimated 4 x 200^2 x 4 B = 0.6 MiB) runs, at N=400 (2.4 MiB) not
    proc = subprocess.run([sys.executable, "benchmarks/kda_scaling.py", "--n", "200", "400", "--widths", "8",
                           "--landmarks", "4", "--rounds", "1", "--full-budget-gib", str(1 / 1024),
                           "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["scaling"]
    status = {(r["loss"], r["n"]): r["status"] for r in result["rows"]}
    assert status == {("kda", 200): "ok", ("kda", 400): "ok", ("full", 200): "ok", ("full", 400): "oom"}
    oom = next(r for r in result["rows"] if r["status"] == "oom")
    assert oom["estimated_bytes"] == 4 * 400 * 400 * 4 and "not run" in oom["reason"]
    fits = {(f["loss"], f["width"]): f for f in result["fits"]}
    assert fits[("kda", 8)]["n_fitted"] == [200, 400] and fits[("kda", 8)]["time_exponent"] is not None
    assert fits[("full", 8)]["time_exponent"] is None  # one point: nothing to fit
