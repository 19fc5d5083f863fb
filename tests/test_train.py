"""End-to-end training through the real CLI: accuracy, outputs, resume, SIGKILL, divergence, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd.config import build_config
from featkd.engine.trainer import train
from featkd.models import create_model
from tests.helpers import OutputWatcher

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def write_config(path: Path, **sections) -> Path:
    raw = {
        "name": "t",
        "data": {"dataset": "digits", "batch_size": 64},
        "student": {"model": "resnet8"},
        "method": {"name": "none"},
        "optim": {"lr": 0.1, "schedule": "cosine"},
        "train": {"epochs": 3, "num_threads": 1, "progress": "off", "tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def featkd(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_train_cli_on_digits_beats_chance_and_writes_outputs(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", train={"epochs": 6})
    out = tmp_path / "run"
    proc = featkd("train", str(cfg), "--out", str(out))
    assert "done: test_acc" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 6
    assert summary["test_acc"] > 80.0, summary  # chance is 10 %
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.csv").read_text().startswith("epoch,")
    # the exported student is a plain state_dict of the unmodified model
    state = torch.load(out / "student.pt", weights_only=True)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    model.load_state_dict(state)
    assert set(state) == set(model.state_dict())
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 6 and set(ckpt) >= {"student", "distiller", "optimizer", "scheduler", "rng"}
    # featkd eval reproduces the final test accuracy from the checkpoint
    ev = json.loads(featkd("eval", str(out), "--json").stdout)
    assert ev["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert ev["samples"] == 450


def test_resume_equals_uninterrupted_run(tmp_path):
    common = {"train": {"epochs": 4, "deterministic": True, "num_threads": 1, "progress": "off",
                        "tensorboard": False}}
    cfg_path = write_config(tmp_path / "cfg.yaml", method={"name": "none"}, **common)
    cfg = build_config(yaml.safe_load(cfg_path.read_text()))
    quiet = lambda _m: None  # noqa: E731
    full = train(cfg, tmp_path / "full", log=quiet)

    cfg_path_stop = write_config(tmp_path / "stop.yaml", method={"name": "none"},
                                 train={**common["train"], "stop_after": 2})
    first = train(build_config(yaml.safe_load(cfg_path_stop.read_text())), tmp_path / "split", log=quiet)
    assert first.status == "stopped" and first.epochs == 2
    resumed = train(cfg, tmp_path / "split", resume=True, log=quiet)
    assert resumed.status == "finished" and resumed.epochs == 4
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "student.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    assert resumed.test_acc == full.test_acc
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_sigkill_mid_epoch_keeps_an_intact_checkpoint_and_resumes(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", data={"dataset": "digits", "batch_size": 16},
                       student={"model": "resnet20"}, train={"epochs": 40})
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "featkd", "train", str(cfg), "--out", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        watch = OutputWatcher(proc)
        # logged after epoch 1's checkpoint and metrics: the kill lands in a later epoch's steps
        watch.wait_for(lambda x: x.startswith("epoch 1/"), "first epoch line")
        assert (out / "metrics.jsonl").exists()
        proc.send_signal(signal.SIGKILL)
        watch.finish(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(out / "last.pt", weights_only=True)  # intact: the atomic rename never half-writes
    done = state["epoch"]
    assert 1 <= done < 40
    featkd("train", "--resume", "--out", str(out), "--set", "train.stop_after=" + str(done + 1))
    after = torch.load(out / "last.pt", weights_only=True)
    assert after["epoch"] == done + 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == done + 1


def test_divergence_stops_with_the_term_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path):
    # lr x 10^4 after the first epoch: a BatchNorm-free CNN with logit KD blows up in epoch 2
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("plaincnn", num_classes=10, in_channels=1).state_dict(), teacher)
    cfg = write_config(
        tmp_path / "cfg.yaml", student={"model": "plaincnn"},
        teacher={"model": "plaincnn", "checkpoint": str(teacher)},
        method={"name": "kd", "kd_temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
        optim={"lr": 0.05, "schedule": "step", "milestones": [1], "gamma": 10000.0},
        train={"epochs": 5},
    )
    out = tmp_path / "run"
    proc = featkd("train", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "became nan" in err[0] or "became inf" in err[0]
    assert "'kd'" in err[0] or "'ce'" in err[0]
    assert "epoch 2, step" in err[0] and "last.pt (epoch 1) is kept" in err[0]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values()
                                       if v.is_floating_point())
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"optim": {"lr": 0.1, "lrr": 1}}, "optim.lrr: unknown key (did you mean 'lr'?"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
        ({"optim": {"schedule": "cosin"}}, "optim.schedule: 'cosin' is not allowed (did you mean 'cosine'?)"),
        ({"student": {"model": "resnt8"}}, "unknown model 'resnt8' (did you mean 'resnet8'"),
        ({"method": {"name": "fitnets", "pairs": [["layer3", "layer9"]]},
          "teacher": {"model": "resnet8"}}, "no capture point 'layer9'"),
        ({"data": {"dataset": "fashion-mnist", "data_dir": "/nonexistent/fm"}}, "/nonexistent/fm"),
        ({"method": {"name": "kd"}}, "teacher: method 'kd' needs a teacher section"),
        ({"method": {"name": "mystery"}}, "unknown method 'mystery'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, sections, message):
    cfg = write_config(tmp_path / "cfg.yaml", **sections)
    out = tmp_path / "run"
    proc = featkd("train", str(cfg), "--out", str(out), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featkd: error: "), proc.stderr
    assert message in lines[0]
    assert not out.exists()


def test_existing_run_is_never_overwritten(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", train={"epochs": 1})
    out = tmp_path / "run"
    featkd("train", str(cfg), "--out", str(out))
    before = (out / "last.pt").read_bytes()
    proc = featkd("train", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "last.pt").read_bytes() == before
    missing = featkd("train", str(tmp_path / "nope.yaml"), check=False)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
