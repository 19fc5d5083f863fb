"""Training options of the loop: fp16 autocast with gradient scaling, gradient accumulation, any torch.optim
optimiser by name, and the optional Weights & Biases logger (a stand-in module: the real one needs a login)."""

from __future__ import annotations

import json
import signal
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from featkd.config import build_config
from featkd.engine.build import configure_process
from featkd.engine.trainer import Trainer
from featkd.errors import ConfigError, FeatkdError

QUIET = lambda _m: None  # noqa: E731


def config(**sections: Any):
    raw: dict[str, Any] = {
        "name": "t",
        "data": {"dataset": "digits", "train_subset": 256, "batch_size": 64},
        "student": {"model": "resnet8"},
        "method": {"name": "none"},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return build_config(raw)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "student.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------------------
# train.amp: fp16 with a GradScaler


def test_amp_names_map_to_autocast_dtypes_on_the_cpu(one_thread):
    cpu = torch.device("cpu")
    for amp, dtype in (("auto", None), ("none", None), (False, None), ("bf16", torch.bfloat16),
                       (True, torch.bfloat16), ("fp16", torch.float16)):
        assert configure_process(config(train={"amp": amp}), cpu) is dtype, amp


def test_fp16_runs_under_autocast_keeps_the_scaler_in_the_checkpoint_and_resumes_exactly(tmp_path, one_thread):
    cfg = config(train={"amp": "fp16"}, optim={"grad_clip": 5.0})
    trainer = Trainer(cfg, tmp_path / "full", log=QUIET)
    assert trainer.scaler.is_enabled()
    with trainer.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    trainer.fit()
    saved = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["scaler"]
    assert saved["scale"] == trainer.scaler.get_scale() > 0

    stopped = Trainer(config(train={"amp": "fp16", "stop_after": 1}, optim={"grad_clip": 5.0}), tmp_path / "split",
                      log=QUIET)
    stopped.fit()
    scale_after_one = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["scaler"]["scale"]
    resumed = Trainer(cfg, tmp_path / "split", resume=True, log=QUIET)
    assert resumed.scaler.get_scale() == scale_after_one  # the scale goes on where it stood
    resumed.fit()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_lowered(one_thread):
    trainer = Trainer(config(train={"amp": "fp16"}), log=QUIET)
    trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 3e38})  # loss x scale overflows
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    x, y = next(iter(trainer.train_loader))
    losses, _ = trainer.train_step(x, y, 0)
    assert all(torch.isfinite(v) for v in losses.values())  # the loss itself is fine: no divergence error
    assert trainer.scaler.get_scale() == pytest.approx(1.5e38)
    assert trainer.global_step == 1  # the schedule moves on, the weights do not
    for key, value in trainer.student.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------------------------
# train.accumulate


def test_accumulating_two_batches_of_16_equals_one_batch_of_32(tmp_path, one_thread):
    """plaincnn has no BatchNorm, so a sample's output does not depend on its batch: two micro-batches of 16
    averaged make the gradient of their 32 samples at once, and the same optimiser steps follow."""
    common = {"student": {"model": "plaincnn", "options": {"widths": [8, 16], "hidden": 16}},
              "optim": {"lr": 0.1, "schedule": "cosine", "weight_decay": 5e-4}}
    data = {"dataset": "digits", "train_subset": 96, "augment": False}
    one = Trainer(config(data={**data, "batch_size": 32}, **common), tmp_path / "one", log=QUIET)
    two = Trainer(config(data={**data, "batch_size": 16}, train={"accumulate": 2}, **common), tmp_path / "two",
                  log=QUIET)
    assert (one.batches_per_epoch, one.steps_per_epoch) == (3, 3)
    assert (two.batches_per_epoch, two.steps_per_epoch) == (6, 3)
    ends: list[int] = []
    two.distiller.on_step_end = lambda step, _ctx: ends.append(step)
    one.fit()
    two.fit()
    assert ends == list(range(6))  # per optimiser step: 3 per epoch, 2 epochs
    assert one.global_step == two.global_step == 6
    assert one.optimizer.param_groups[0]["lr"] == two.optimizer.param_groups[0]["lr"]  # the same schedule
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    hist_one, hist_two = (
        [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
        for p in (tmp_path / "one", tmp_path / "two"))
    for r1, r2 in zip(hist_one, hist_two, strict=True):
        assert r1["step"] == r2["step"]
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)  # a mean over forwards either way


def test_an_epoch_whose_batches_do_not_divide_ends_with_a_shorter_group(one_thread):
    trainer = Trainer(config(data={"batch_size": 32, "train_subset": 160}, train={"accumulate": 2}), log=QUIET)
    assert (trainer.batches_per_epoch, trainer.steps_per_epoch) == (5, 3)
    assert [trainer._group(b) for b in range(5)] == [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]
    trainer.fit()
    assert trainer.global_step == 6


def test_a_stop_mid_epoch_falls_on_an_optimiser_step_and_the_resumed_run_is_exact(tmp_path, one_thread):
    cfg = config(data={"batch_size": 32}, train={"accumulate": 2, "epochs": 1})  # 8 micro-batches, 4 steps
    Trainer(cfg, tmp_path / "full", log=QUIET).fit()
    trainer = Trainer(cfg, tmp_path / "split", log=QUIET)

    def stop_after_step_1(step: int, _ctx: Any) -> None:
        if step == 1:
            trainer._stop_signal = int(signal.SIGTERM)  # what the signal handler sets

    trainer.distiller.on_step_end = stop_after_step_1
    assert trainer.fit().status == "preempted"
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["batch"] == 2 * state["step"] and 0 < state["batch"] < 8  # at a group's end, never inside one
    Trainer(cfg, tmp_path / "split", resume=True, log=QUIET).fit()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


# ---------------------------------------------------------------------------------------------------------
# optim.optimizer: any torch.optim class


def test_any_torch_optim_optimizer_by_name_with_its_options(one_thread):
    adam = Trainer(config(optim={"optimizer": "Adam", "lr": 0.01, "options": {"betas": [0.9, 0.99], "eps": 1e-7}}),
                   log=QUIET)
    assert type(adam.optimizer) is torch.optim.Adam
    group = adam.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-7 and group["weight_decay"] == 5e-4
    rms = Trainer(config(optim={"optimizer": "rmsprop", "options": {"momentum": 0.9}}), log=QUIET)
    assert type(rms.optimizer) is torch.optim.RMSprop and rms.optimizer.param_groups[0]["momentum"] == 0.9
    result = Trainer(config(optim={"optimizer": "NAdam", "lr": 0.01}, train={"epochs": 1}), log=QUIET).fit()
    assert result.status == "finished"
    sgd = Trainer(config(), log=QUIET).optimizer  # the default stays SGD with Nesterov momentum
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("optim, message", [
    ({"optimizer": "Adam", "options": {"beta": [0.9, 0.99]}},
     "optim.options.beta: Adam takes no argument 'beta' (did you mean 'betas'?) (it takes: betas, eps, amsgrad"),
    ({"optimizer": "Adm"}, "optim.optimizer: 'Adm' is not a torch.optim optimiser (did you mean 'Adam'"),
    ({"optimizer": "sgd", "options": {"momentum": 0.5}}, "optim.options.momentum: set optim.momentum instead"),
    ({"optimizer": "LBFGS"}, "optim.optimizer: LBFGS cannot be used here: it needs a closure"),
    ({"optimizer": "Rprop"}, "optim.weight_decay: Rprop takes no weight decay; set it to 0"),
])
def test_unknown_optimisers_and_options_are_one_line_config_errors(optim, message):
    with pytest.raises(ConfigError) as err:
        config(optim=optim)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_value_the_optimiser_refuses_is_one_line_before_the_run_folder_exists(tmp_path, one_thread):
    cfg = config(optim={"optimizer": "Adam", "options": {"betas": [1.5, 0.9]}})
    with pytest.raises(ConfigError, match=r"^optim: Adam refused its arguments \(Invalid beta parameter"):
        Trainer(cfg, tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# train.wandb (a stand-in module in sys.modules: the real package needs a network login)


class FakeWandb(types.ModuleType):
    """Records ``wandb.init`` arguments and every ``run.log`` call."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.finished = 0

    def init(self, **kw: Any) -> Any:
        self.inits.append(kw)
        fake = self
        return types.SimpleNamespace(id=kw.get("id") or "run-1", log=lambda rec, step: fake.logged.append((rec, step)),
                                     finish=lambda: setattr(fake, "finished", fake.finished + 1))


def test_wandb_missing_is_one_line_naming_pip_install_before_the_run_folder_exists(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(FeatkdError, match=r"^train\.wandb: the wandb package is not installed; pip install wandb"):
        Trainer(config(train={"wandb": {"project": "p"}}), tmp_path / "run", log=QUIET)
    assert not (tmp_path / "run").exists()


def test_wandb_gets_the_epoch_records_and_a_resume_continues_its_run(tmp_path, monkeypatch, one_thread):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    wandb = {"project": "kd", "tags": ["digits"]}
    out = tmp_path / "run"
    Trainer(config(train={"wandb": wandb, "stop_after": 1}), out, log=QUIET).fit()
    (init,) = fake.inits
    assert init["project"] == "kd" and init["name"] == "run" and init["tags"] == ["digits"] and init["id"] is None
    assert init["config"]["train"]["wandb"]["project"] == "kd" and init["dir"] == str(out)
    assert (out / "wandb_id.txt").read_text().strip() == "run-1"
    ((record, step),) = fake.logged
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step == 1 and record == {k: v for k, v in first.items() if isinstance(v, (int, float))}
    assert {"train_loss", "test_acc", "lr"} <= set(record) and fake.finished == 1

    Trainer(config(train={"wandb": wandb}), out, resume=True, log=QUIET).fit()
    assert fake.inits[1]["id"] == "run-1" and fake.inits[1]["resume"] == "allow"
    assert [s for _r, s in fake.logged] == [1, 2]  # epoch 2 only, into the same run
    assert fake.finished == 2


def test_wandb_null_imports_nothing(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import would fail
    result = Trainer(config(train={"epochs": 1}), tmp_path / "run", log=QUIET).fit()
    assert result.status == "finished" and not (tmp_path / "run" / "wandb_id.txt").exists()


@pytest.mark.slow
def test_two_processes_accumulating_two_micro_batches_equal_one_process_with_the_whole_batch(tmp_path):
    """Under torchrun (gloo): each rank takes 16 of a 32-sample micro-batch, gradients are all-reduced once per
    optimiser step (no_sync on the first micro-batch), and the BatchNorm-free student equals the one a single
    process trains with batches of 64."""
    import subprocess

    import yaml

    from tests.test_ddp import DDP_TOLERANCE, ENV, ROOT, TORCHRUN

    def write(name: str, batch: int, accumulate: int) -> Path:
        raw = {"name": name, "data": {"dataset": "digits", "batch_size": batch, "train_subset": 512},
               "student": {"model": "plaincnn"}, "method": {"name": "none"}, "optim": {"lr": 0.05},
               "train": {"epochs": 2, "deterministic": True, "num_threads": 1, "progress": "off",
                         "tensorboard": False, "accumulate": accumulate}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    for cmd, cfg, out in ((TORCHRUN, write("ddp", 32, 2), "ddp"), ([sys.executable], write("one", 64, 1), "one")):
        proc = subprocess.run([*cmd, "-m", "featkd", "train", str(cfg), "--out", str(tmp_path / out)], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < DDP_TOLERANCE
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
