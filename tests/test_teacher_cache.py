"""``train.teacher_cache``: a cached run equals the uncached one bit for bit and runs no teacher in its steps;
a changed key ingredient misses; resume mid-epoch, corrupt files, a stale input, the size cap, DDP ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from featkd.config import build_config
from featkd.engine.teacher_cache import TeacherCache
from featkd.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
STEPS = 10  # 640 training images / 64
KD = {"name": "kd", "ce_weight": 0.5, "kd_weight": 0.5}
FITNETS = {"name": "fitnets", "pairs": [["layer3", "layer3.2.add"]], "weight": 1.0, "kd_weight": 0.5}
#: per-epoch numbers that are wall-clock times, not results
TIMES = ("epoch_time", "train_images_per_s")


def config(method: dict, cache: Path | None = None, teacher: str = "zoo:digits-resnet20", **train):
    return build_config({
        "name": "t", "data": {"dataset": "digits", "train_subset": 640, "batch_size": BATCH},
        "teacher": {"model": "resnet20", "checkpoint": teacher}, "student": {"model": "resnet8"},
        "method": method, "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 3, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False,
                  "teacher_cache": str(cache) if cache else None, **train},
    })


def count_teacher_steps(trainer: Trainer) -> list[int]:
    """Training-batch forwards through the teacher (its first conv sees every forward, hooks and fx alike;
    the teacher's evaluation runs 450-image batches)."""
    calls: list[int] = []
    conv = next(m for m in trainer.teacher.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda _m, args, _o: calls.append(1) if args[0].shape[0] == BATCH else None)
    return calls


def fit(cfg, out: Path, resume: bool = False, logs: list[str] | None = None) -> tuple[dict, int]:
    """(summary.json, teacher forwards in training steps) of one run."""
    trainer = Trainer(cfg, out, resume=resume, log=(logs.append if logs is not None else lambda _m: None))
    calls = count_teacher_steps(trainer)
    trainer.fit()
    return json.loads((out / "summary.json").read_text()), len(calls)


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p / "student.pt", weights_only=True) for p in (a, b))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"
    ha, hb = ([{k: v for k, v in json.loads(line).items() if k not in TIMES}
               for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b))
    assert ha == hb


@pytest.mark.parametrize("method", [KD, FITNETS], ids=["kd", "fitnets"])
def test_cached_runs_equal_the_uncached_run_bit_for_bit_and_skip_the_teacher(tmp_path, method):
    cache = tmp_path / "cache"
    plain, plain_calls = fit(config(method), tmp_path / "plain")
    first, first_calls = fit(config(method, cache), tmp_path / "first")
    second, second_calls = fit(config(method, cache), tmp_path / "second")
    assert plain_calls == first_calls == 3 * STEPS and second_calls == 0
    assert "teacher_cache" not in plain
    assert first["teacher_cache"]["written_epochs"] == 3 and first["teacher_cache"]["teacher_steps"] == 3 * STEPS
    assert second["teacher_cache"]["read_steps"] == 3 * STEPS and second["teacher_cache"]["teacher_steps"] == 0
    assert_same_run(tmp_path / "plain", tmp_path / "first")
    assert_same_run(tmp_path / "plain", tmp_path / "second")
    (stream,) = cache.iterdir()
    assert sorted(p.name for p in (stream / "rank0").iterdir()) == ["epoch0.pt", "epoch1.pt", "epoch2.pt"]
    key = json.loads((stream / "key.json").read_text())
    assert key["seed"] == 0 and key["points"] == list(dict.fromkeys(p for _s, p in method.get("pairs", [])))
    if method is FITNETS:  # the features are in the file, keyed by capture point
        saved = torch.load(stream / "rank0" / "epoch0.pt", weights_only=True)
        assert list(saved["features"]) == ["layer3.2.add"] and len(saved["features"]["layer3.2.add"]) == STEPS


def test_a_changed_seed_or_teacher_misses_the_cache_and_a_method_option_hits(tmp_path):
    cache = tmp_path / "cache"
    one = {"epochs": 1}
    _, calls = fit(config(KD, cache, **one), tmp_path / "a")
    assert calls == STEPS
    _, calls = fit(config({**KD, "kd_weight": 2.0}, cache, **one), tmp_path / "b")  # same stream
    assert calls == 0
    _, calls = fit(config(KD, cache, **{**one, "seed": 1}), tmp_path / "c")
    assert calls == STEPS
    state = torch.load(ROOT / "zoo" / "digits-resnet20.pt", weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1e-3  # one value of the teacher changed
    torch.save(state, tmp_path / "teacher.pt")
    _, calls = fit(config(KD, cache, teacher=str(tmp_path / "teacher.pt"), **one), tmp_path / "d")
    assert calls == STEPS
    assert len(list(cache.iterdir())) == 3  # seed 0, seed 1, the other teacher
    _, calls = fit(config(KD, cache, **{**one, "seed": 1}), tmp_path / "e")
    assert calls == 0


def stop_at(monkeypatch, at_step: int) -> None:
    """SIGUSR1 just before global optimiser step ``at_step`` (0-based): the run stops after that step."""
    original = Trainer.train_step

    def train_step(self, *args, **kw):
        if self.global_step == at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kw)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="stops the run with SIGUSR1")
def test_resume_mid_epoch_reads_or_runs_the_rest_of_the_epoch_and_equals_the_uninterrupted_run(tmp_path,
                                                                                              monkeypatch):
    cache = tmp_path / "cache"
    fit(config(KD), tmp_path / "plain")
    # the stream's first run is stopped in epoch 2: no file for it; the resumed run runs the teacher there
    stop_at(monkeypatch, STEPS + 4)
    stopped, calls = fit(config(KD, cache), tmp_path / "first")
    assert stopped["status"] == "preempted" and calls == STEPS + 5
    monkeypatch.undo()
    resumed, calls = fit(config(KD, cache), tmp_path / "first", resume=True)
    assert resumed["status"] == "finished" and calls == 2 * STEPS - 5
    assert resumed["teacher_cache"]["written_epochs"] == 1  # epoch 3; epoch 2 lacks its first steps
    assert_same_run(tmp_path / "plain", tmp_path / "first")
    rank0 = next(cache.iterdir()) / "rank0"
    assert sorted(p.name for p in rank0.iterdir()) == ["epoch0.pt", "epoch2.pt"]
    fit(config(KD, cache), tmp_path / "fill")  # writes epoch 2 (index 1)
    # stopped in epoch 3, whose file exists: the resumed run reads from the step it stopped at
    stop_at(monkeypatch, 2 * STEPS + 3)
    _, calls = fit(config(KD, cache), tmp_path / "second")
    monkeypatch.undo()
    resumed, calls = fit(config(KD, cache), tmp_path / "second", resume=True)
    assert calls == 0 and resumed["teacher_cache"]["read_steps"] == STEPS - 4
    assert_same_run(tmp_path / "plain", tmp_path / "second")


def test_a_corrupt_file_is_refused_rewritten_and_leftover_temporary_files_are_never_read(tmp_path, capfd):
    cache = tmp_path / "cache"
    one = {"epochs": 1}
    fit(config(KD, cache, **one), tmp_path / "a")
    path = next(cache.iterdir()) / "rank0" / "epoch0.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    (path.parent / ".epoch0.pt.123.tmp").write_bytes(b"half a file")  # what a killed write would leave
    capfd.readouterr()
    summary, calls = fit(config(KD, cache, **one), tmp_path / "b")
    assert calls == STEPS and summary["teacher_cache"]["written_epochs"] == 1
    err = capfd.readouterr().err
    assert "featkd: warning: teacher cache:" in err and str(path) in err, err
    _, calls = fit(config(KD, cache, **one), tmp_path / "c")
    assert calls == 0
    assert_same_run(tmp_path / "a", tmp_path / "c")


def test_epochs_over_the_size_cap_run_the_teacher_and_are_not_written(tmp_path):
    cache = tmp_path / "cache"
    logs: list[str] = []
    # one step's KD logits are 64 x 10 float32 = 2,560 bytes: an epoch's file takes ~32 kB, estimated at 36 kB
    # beforehand, so an 80 kB cap holds two epochs
    cfg = config(KD, cache, teacher_cache_max_gb=80e3 / 1e9)
    summary, calls = fit(cfg, tmp_path / "a", logs=logs)
    assert calls == 3 * STEPS and summary["teacher_cache"]["written_epochs"] == 2
    assert any("epoch 3 would take 36 kB, over train.teacher_cache_max_gb" in line for line in logs), logs
    summary, calls = fit(cfg, tmp_path / "b")
    assert calls == STEPS and summary["teacher_cache"]["read_epochs"] == 2
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_an_input_that_differs_from_the_written_one_is_never_served_from_the_file(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    teacher = nn.Linear(64, 3)
    calls: list[int] = []

    def run(x):
        def forward():
            calls.append(1)
            return teacher(x.flatten(1)), {"h": x.mean(1)}
        return forward

    def epoch(inputs):
        cache = TeacherCache(tmp_path / "key", {"any": 1}, steps_per_epoch=3, max_bytes=10**9,
                             device=torch.device("cpu"), log=lambda _m: None)
        cache.begin_epoch(0)
        outs = [cache.outputs(0, i, x, run(x)) for i, x in enumerate(inputs)]
        cache.end_epoch(0)
        return cache, outs

    _, written = epoch(batches)
    cache, read = epoch(batches)
    assert len(calls) == 3 and cache.counts["read_steps"] == 3
    for (la, fa), (lb, fb) in zip(written, read):
        assert torch.equal(la, lb) and torch.equal(fa["h"], fb["h"])
    changed = [batches[0], batches[1].clone(), batches[2]]
    changed[1][0, 0, 0, 0] += 1 / 255  # one pixel, one grey level
    cache, outs = epoch(changed)
    assert cache.counts == {"read_steps": 1, "teacher_steps": 2, "read_epochs": 1, "written_epochs": 0}
    assert torch.equal(outs[1][0], teacher(changed[1].flatten(1)))
    # outside an epoch begun by the trainer (a benchmark calling train_step), the teacher just runs
    assert cache.outputs(0, 0, batches[0], run(batches[0]))[0] is not None and len(calls) == 6


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX system")
def test_two_ranks_write_and_read_their_own_files_under_torchrun(tmp_path):
    raw = {"name": "ddp", "data": {"dataset": "digits", "train_subset": 640, "batch_size": BATCH},
           "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"}, "student": {"model": "plaincnn"},
           "method": KD, "optim": {"lr": 0.05},
           "train": {"epochs": 2, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False,
                     "teacher_cache": str(tmp_path / "cache")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for name in ("first", "second"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "featkd",
               "train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (stream,) = (tmp_path / "cache").iterdir()
    for rank in (0, 1):
        assert sorted(p.name for p in (stream / f"rank{rank}").iterdir()) == ["epoch0.pt", "epoch1.pt"]
    assert json.loads((stream / "key.json").read_text())["world_size"] == 2
    first, second = (json.loads((tmp_path / n / "summary.json").read_text())["teacher_cache"]
                     for n in ("first", "second"))
    assert first["teacher_steps"] == 2 * STEPS and second == {**second, "teacher_steps": 0, "read_steps": 2 * STEPS}
    assert_same_run(tmp_path / "first", tmp_path / "second")
