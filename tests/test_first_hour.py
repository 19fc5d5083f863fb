"""A user's first hour: resuming after train.stop_after, a warm-up longer than a short run, progress lines off a
terminal, the teacher's evaluation computed once, and where a relative path was looked for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd.config import OptimConfig, build_config, load_config
from featkd.data import DataConfig, build_data
from featkd.engine import build as build_module
from featkd.engine.checkpoint import load_model_weights
from featkd.engine.logging import StepLines, format_epoch
from featkd.engine.schedule import lr_factor
from featkd.engine.trainer import Trainer, train
from featkd.errors import DataError, FeatkdError
from featkd.methods.kda.distiller import KDA, KDAConfig
from featkd.models import create_model
from tests.helpers import OutputWatcher, tiny_context
from tests.test_train import ENV, ROOT, featkd, write_config

QUIET = lambda _m: None  # noqa: E731


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ---- 1. a resumed run goes on to train.epochs unless stop_after is given again --------------------------------


def test_resume_after_stop_after_continues_to_the_end_unless_given_again(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", train={"epochs": 3})
    out = tmp_path / "run"
    first = featkd("train", str(cfg), "--out", str(out), "--set", "train.stop_after=1")
    assert summary(out)["status"] == "stopped" and "after 1 of 3 epochs" in first.stdout
    # stop_after given again on this command line: it applies
    featkd("train", "--resume", "--out", str(out), "--set", "train.stop_after=2")
    assert summary(out)["epochs"] == 2
    # the same again: nothing left before it, and one line says so (exit 0, nothing trained)
    again = featkd("train", "--resume", "--out", str(out), "--set", "train.stop_after=2")
    assert "train.stop_after=2: 2 epochs are done already" in again.stdout
    assert summary(out)["epochs"] == 2
    # the run folder's config.yaml still holds stop_after 2: a plain --resume goes on to train.epochs
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["stop_after"] == 2
    last = featkd("train", "--resume", "--out", str(out))
    assert summary(out)["status"] == "finished" and summary(out)["epochs"] == 3
    assert "after 3 epochs" in last.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_with_the_run_config_yaml_given_as_config_continues_too(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", train={"epochs": 2})
    out = tmp_path / "run"
    featkd("train", str(cfg), "--out", str(out), "--set", "train.stop_after=1")
    featkd("train", str(out / "config.yaml"), "--out", str(out), "--resume")
    assert summary(out)["status"] == "finished" and summary(out)["epochs"] == 2


# ---- 2. warm-ups longer than the run ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scenes-seg-none-deeplab_resnet20", "scenes-det-none-fcos_resnet20",
                                  "scenes-inst-none-maskrcnn_resnet20"])
def test_a_one_epoch_run_of_the_scenes_configs_is_a_valid_config(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["train.epochs=1"])
    assert cfg.optim.warmup_epochs >= 1  # kept as written; the schedule fits it to the run


def test_the_lr_warm_up_is_fitted_to_a_shorter_run():
    factor = lr_factor(OptimConfig(warmup_epochs=5, schedule="constant"), epochs=1, steps_per_epoch=8)
    values = [factor(i) for i in range(8)]
    assert values[0] == pytest.approx(0.01) and values[1] < 1.0 and values[2:] == [1.0] * 6  # 0.25 x 8 = 2 steps
    # a warm-up shorter than the run is unchanged
    factor = lr_factor(OptimConfig(warmup_epochs=1, schedule="constant"), epochs=2, steps_per_epoch=8)
    assert factor(7) < 1.0 and factor(8) == 1.0


def _warnings(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("featkd: warning: ")]


def test_a_warm_up_longer_than_the_run_is_one_warning_and_trains(tmp_path, capsys):
    raw = yaml.safe_load(write_config(tmp_path / "cfg.yaml", optim={"lr": 0.1, "warmup_epochs": 5},
                                      train={"epochs": 1}).read_text())
    result = train(build_config(raw), tmp_path / "run", log=QUIET)
    assert result.status == "finished"
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "optim.warmup_epochs: 5" in warnings[0] and "0.25 epochs" in warnings[0]


def test_a_method_weight_still_ramping_at_the_last_epoch_is_one_warning(tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), teacher)
    raw = yaml.safe_load(write_config(tmp_path / "cfg.yaml", teacher={"model": "resnet8", "checkpoint": str(teacher)},
                                      method={"name": "dkd", "warmup": 20}, train={"epochs": 2}).read_text())
    Trainer(build_config(raw), None, log=QUIET)
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "method.warmup: 20" in warnings[0] and "10%" in warnings[0]  # min(2 / 20, 1) at the last epoch
    raw["method"]["warmup"] = 2  # full weight at the second (last) epoch: nothing to say
    Trainer(build_config(raw), None, log=QUIET)
    assert _warnings(capsys.readouterr().err) == []


def test_kda_says_when_its_term_never_switches_on():
    kda = KDA(KDAConfig(warmup_epochs=5), tiny_context())
    note = kda.warmup_note(5)
    assert "method.warmup_epochs: 5" in note and "never" in note
    assert kda.warmup_note(6) is None


# ---- 3. progress lines off a terminal ---------------------------------------------------------------------


def test_progress_lines_off_a_terminal_every_log_every_s(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", data={"dataset": "digits", "batch_size": 16},
                       student={"model": "resnet20"}, train={"epochs": 1, "progress": "auto"})
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # as a log file or a cluster job sees it
    proc = subprocess.Popen([sys.executable, "-m", "featkd", "train", str(cfg), "--out", str(tmp_path / "run"),
                             "--set", "train.log_every_s=0.3"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        watch = OutputWatcher(proc)
        line = watch.wait_for(lambda x: x.startswith("step "), "progress line")
        assert proc.poll() is None  # it came while the run went on: the line was flushed, not buffered
        out, err = watch.finish(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    pattern = (r"step \d+/84 of epoch 1/1  [\d.]+ img/s  loss [\d.]+  "
               r"eta \d+:\d\d of the epoch, \d+:\d\d of the run")
    assert re.fullmatch(pattern, line.strip()), line
    steps = [x for x in out.splitlines() if x.startswith("step ")]
    epochs = [x for x in out.splitlines() if x.startswith("epoch ")]
    assert len(steps) >= 2 and all(re.fullmatch(pattern, x) for x in steps), out
    assert len(epochs) == 1 and all(re.search(r"  \d+ img/s  ", x) for x in epochs), epochs


def test_step_lines_every_log_every_s_with_the_rates_and_etas():
    now = [0.0]
    lines: list[str] = []
    step_lines = StepLines(30, lines.append, epochs=10, end=4, steps=100, batch_size=64, clock=lambda: now[0])
    step_lines.start(epoch=1, first=20)  # the second epoch, resumed after 20 steps
    for done in range(21, 101):
        now[0] += 0.5  # 2 steps/s
        step_lines.after(done, lambda d=done: 1.5 * d)
    # after 30 s (step 80) and 60 s would be step 140: one line; the epoch's last step leaves it to the epoch line
    assert lines == ["step 80/100 of epoch 2/10  128 img/s  loss 1.5000  eta 0:10 of the epoch, 1:50 of the run"]
    off = StepLines(0, lines.append, epochs=10, end=10, steps=100, batch_size=64, clock=lambda: now[0])
    off.start(0)
    now[0] += 100
    off.after(1, lambda: 1.0)
    assert len(lines) == 1
    record = {"epoch": 2, "train_loss": 0.5, "train_ce": 0.5, "train_acc": 90.0, "test_acc": 91.0, "lr": 0.1,
              "epoch_time": 3.0, "train_images_per_s": 1234.4}
    assert format_epoch(record, 10) == ("epoch 2/10  loss 0.5000 (ce 0.5)  train_acc 90.00  test_acc 91.00  lr 0.1  "
                                        "1234 img/s  3.0s")


# ---- 4. the teacher's test evaluation, computed once ------------------------------------------------------


@pytest.fixture
def teacher_evals(monkeypatch, tmp_path):
    """Counts the evaluations of a teacher; the cache under a fresh FEATKD_CACHE."""
    monkeypatch.setenv("FEATKD_CACHE", str(tmp_path / "cache"))
    calls = []
    original = build_module.Run.evaluate

    def counting(self, model, split="test"):
        if model is self.teacher:
            calls.append(split)
        return original(self, model, split)

    monkeypatch.setattr(build_module.Run, "evaluate", counting)
    return calls


def _kd_config(tmp_path: Path, **train_options) -> dict:
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), teacher)
    return yaml.safe_load(write_config(
        tmp_path / "kd.yaml", teacher={"model": "resnet8", "checkpoint": str(teacher)},
        method={"name": "kd", "kd_weight": 0.5}, train={"epochs": 2, **train_options}).read_text())


def test_the_teacher_is_evaluated_once_per_teacher_and_data(tmp_path, teacher_evals):
    raw = _kd_config(tmp_path, stop_after=1)
    logs: list[str] = []
    first = train(build_config(raw), tmp_path / "a", log=logs.append)
    assert teacher_evals == ["test"]
    line = next(x for x in logs if x.startswith("teacher resnet8: test_acc "))
    assert "(cached)" not in line
    cached = list((tmp_path / "cache" / "teacher-evals").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["metrics"]["acc"] == first.teacher_test_acc
    assert (tmp_path / "a" / "teacher_eval.json").is_file()

    # a resume reads the run folder's number (the shared file gone), and writes the shared file again
    cached[0].unlink()
    logs.clear()
    resumed = train(build_config({**raw, "train": {**raw["train"], "stop_after": None}}), tmp_path / "a",
                    resume=True, log=logs.append)
    assert teacher_evals == ["test"] and resumed.teacher_test_acc == first.teacher_test_acc
    assert f"teacher resnet8: test_acc {first.teacher_test_acc:.2f} (cached)" in logs
    assert cached[0].is_file()

    # another run with the same teacher and evaluation data reads the shared file; training settings do not matter
    other = {**raw, "optim": {**raw["optim"], "lr": 0.05}, "data": {**raw["data"], "batch_size": 32}}
    logs.clear()
    again = train(build_config(other), tmp_path / "b", log=logs.append)
    assert teacher_evals == ["test"] and again.teacher_test_acc == first.teacher_test_acc
    assert f"teacher resnet8: test_acc {first.teacher_test_acc:.2f} (cached)" in logs
    assert summary(tmp_path / "b")["teacher_test_acc"] == first.teacher_test_acc

    # other evaluation data (or other teacher weights): a miss
    changed = {**other, "data": {**other["data"], "eval_batch_size": 100}}
    train(build_config(changed), tmp_path / "c", log=QUIET)
    assert teacher_evals == ["test", "test"]
    torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), tmp_path / "teacher.pt")
    train(build_config(other), tmp_path / "d", log=QUIET)
    assert teacher_evals == ["test", "test", "test"]
    assert len(list((tmp_path / "cache" / "teacher-evals").glob("*.json"))) == 3


def test_teacher_eval_always_and_off(tmp_path, teacher_evals):
    train(build_config(_kd_config(tmp_path, stop_after=1)), tmp_path / "a", log=QUIET)
    train(build_config(_kd_config(tmp_path, stop_after=1, teacher_eval="always")), tmp_path / "b", log=QUIET)
    assert len(teacher_evals) == 2
    logs: list[str] = []
    result = train(build_config(_kd_config(tmp_path, stop_after=1, teacher_eval="off")), tmp_path / "c",
                   log=logs.append)
    assert len(teacher_evals) == 2 and result.teacher_test_acc is None
    assert not any(x.startswith("teacher ") for x in logs)


# ---- 5. relative paths: the errors say where they were looked for ------------------------------------------


def test_a_missing_relative_data_dir_names_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        build_data(DataConfig(dataset="fashion-mnist", data_dir="imgs"))
    assert f"data.data_dir: 'imgs' not found (relative to {tmp_path}, the current folder)" in str(info.value)
    with pytest.raises(DataError) as info:  # an absolute one needs no note
        build_data(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "imgs")))
    assert "the current folder" not in str(info.value)


def test_a_missing_relative_checkpoint_names_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    for name in ("ckpts/t.pt", "ckpts/t.safetensors"):
        with pytest.raises(FeatkdError) as info:
            load_model_weights(model, name, what="teacher.checkpoint")
        assert str(info.value) == (f"teacher.checkpoint {name!r} not found (relative to {tmp_path}, "
                                   "the current folder)")
    with pytest.raises(FeatkdError) as info:
        load_model_weights(model, str(tmp_path / "t.pt"), what="student.checkpoint")
    assert str(info.value) == f"student.checkpoint {str(tmp_path / 't.pt')!r} not found"


def test_the_cli_error_for_a_relative_checkpoint_is_one_line(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", student={"model": "resnet8", "checkpoint": "no/such/student.pt"})
    proc = featkd("train", str(cfg), "--out", str(tmp_path / "run"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"featkd: error: student.checkpoint 'no/such/student.pt' not found (relative to {ROOT}, "
                        "the current folder)")
    assert not (tmp_path / "run").exists()


def test_the_note_is_written_in_one_place():
    from featkd.errors import relative_note

    assert relative_note("/abs/x") == ""
    assert relative_note("x") == f" (relative to {os.getcwd()}, the current folder)"
    assert relative_note("~/x") == ""  # expanded to the home folder


def test_poly_schedule_is_mmseg_polylr():
    """``schedule: poly``: lr x (1 - it / total)^power down to min_lr, mmseg's PolyLR(power 0.9, eta_min)."""
    cfg = OptimConfig(lr=0.01, schedule="poly", power=0.9, min_lr=1e-4)
    factor = lr_factor(cfg, epochs=2, steps_per_epoch=50)
    floor = 1e-4 / 0.01
    for it in (0, 1, 37, 99):
        assert factor(it) == pytest.approx(floor + (1 - floor) * (1 - it / 100) ** 0.9)
    assert factor(100) == pytest.approx(floor)
