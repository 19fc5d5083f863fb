"""Value checks of the ``train`` and ``optim`` sections: one line naming the key and the value, before any run."""

from __future__ import annotations

from pathlib import Path

import pytest

from featkd.cli import main
from featkd.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits-none-resnet8.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.eval_every=0", "train.eval_every: must be a positive integer, got 0"),
        ("optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
        ("train.epochs=-1", "train.epochs: must be a positive integer, got -1"),
    ],
)
def test_bad_train_or_optim_value_is_one_line_exit_2_and_writes_no_run_folder(tmp_path, capsys, override,
                                                                             message):
    out = tmp_path / "run"
    code = main(["train", CONFIG, "--set", override, "--set", "train.progress=off", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0] == "featkd: error: " + message, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"train": {"epochs": 0}}, "train.epochs: must be a positive integer, got 0"),
        ({"train": {"stop_after": 0}}, "train.stop_after: must be null or a positive integer, got 0"),
        ({"train": {"seed": -3}}, "train.seed: must be >= 0, got -3"),
        ({"train": {"num_threads": 0}}, "train.num_threads: must be null or a positive integer, got 0"),
        ({"train": {"checkpoint_every_steps": -1}}, "train.checkpoint_every_steps: must be >= 0"),
        ({"train": {"teacher_cache_max_gb": -1}}, "train.teacher_cache_max_gb: must be >= 0, got -1.0"),
        ({"optim": {"lr": 0}}, "optim.lr: must be > 0, got 0.0"),
        ({"optim": {"momentum": 1}}, "optim.momentum: must be in [0, 1), got 1.0"),
        ({"optim": {"momentum": -0.5}}, "optim.momentum: must be in [0, 1), got -0.5"),
        ({"optim": {"weight_decay": -1e-4}}, "optim.weight_decay: must be >= 0, got -0.0001"),
        ({"optim": {"gamma": 0}}, "optim.gamma: must be > 0, got 0.0"),
        ({"optim": {"warmup_epochs": -1}}, "optim.warmup_epochs: must be >= 0, got -1.0"),
        ({"optim": {"min_lr": 1.0}}, "optim.min_lr: must be in [0, optim.lr = 0.05], got 1.0"),
        ({"optim": {"grad_clip": -1}}, "optim.grad_clip: must be null or >= 0 (0: off), got -1.0"),
        ({"optim": {"milestones": [0.5, -2]}}, "optim.milestones: must be positive"),
        ({"optim": {"schedule": "step", "milestones": [1, 3]}},
         "optim.milestones[1]: 3 is not inside the run (3 epochs)"),
        ({"optim": {"schedule": "step", "milestones": [2, 1]}}, "optim.milestones: must increase, got [2.0, 1.0]"),
        ({"optim": {"schedule": "step", "milestones": [0.75, 2]}}, "optim.milestones: must increase"),
    ],
)
def test_every_train_and_optim_key_is_range_checked(section, message):
    raw = {"method": {"name": "none"}, "optim": {"lr": 0.05}, "train": {"epochs": 3}}
    for key, value in section.items():
        raw[key] = {**raw[key], **value}
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_valid_schedules_still_build():
    for optim in ({"schedule": "step", "milestones": [0.5, 0.75]}, {"schedule": "step", "milestones": [1, 2]},
                  {"schedule": "cosine", "milestones": [10, 20], "warmup_epochs": 2.5},
                  {"warmup_epochs": 3},  # not shorter than the run: the schedule shortens it (tests/test_first_hour.py)
                  {"grad_clip": 0}, {"momentum": 0, "weight_decay": 0, "min_lr": 0.05}):
        build_config({"method": {"name": "none"}, "optim": {"lr": 0.05, **optim}, "train": {"epochs": 3}})
