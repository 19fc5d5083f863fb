"""The plain-loop API (featkd.Distillation): the example script, equality with the build step, parameters,
hooks that need data, and errors."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featkd import Distillation, create_model
from featkd.config import load_config
from featkd.engine.build import build_run
from featkd.errors import FeatkdError
from featkd.methods.base import Batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_own_loop_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"epoch 2: loss (\S+) \(ce \S+, mgd \S+\)  test_acc (\S+)", last)
    assert match, proc.stdout
    assert math.isfinite(float(match[1])) and float(match[2]) > 30  # chance is 10 %
    assert "mgd: matching update 2" in proc.stdout  # re-matched after epoch 1 through on_epoch_end


def test_losses_equal_the_build_steps(one_thread):
    """Same models, method and batch: Distillation's terms are the ones build_run's distiller computes."""
    cfg = load_config(ROOT / "configs" / "digits-at-resnet20-resnet8.yaml", ["method.kd_weight=0.5"])
    run = build_run(cfg, log=lambda _m: None)
    x, y = next(iter(run.data.train_loader(16, seed=0)))
    kd = Distillation(run.teacher, run.student, "at", {k: v for k, v in cfg.method.items() if k != "name"},
                      example_input=x[:2])
    run.student.eval()  # no BatchNorm update between the two forwards
    ours = kd(x, y)
    t_out, t_feats = run.teacher_capture(x)
    s_out, s_feats = run.student_capture(x)
    theirs = run.distiller(Batch(inputs=x, targets=y, student_logits=s_out, student_features=s_feats,
                                 teacher_logits=t_out, teacher_features=t_feats))
    assert set(ours) == {"ce", "kd", "at"} == set(theirs)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key]), key
    assert torch.equal(kd.student_output, s_out)


def test_connector_parameters_train_with_the_student(one_thread):
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10, in_channels=1)
    student = create_model("resnet8", num_classes=10, in_channels=1, widths=[8, 16, 32])
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    kd = Distillation(teacher, student, "fitnets", {"pairs": [["layer3", "layer3"]]}, example_input=x[:2])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    params = list(kd.parameters())
    assert params and all(p.requires_grad for p in params)  # the 1x1 connector 32 -> 64
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD([*student.parameters(), *params], lr=0.1)
    for _ in range(2):
        losses = kd(x, y)
        assert set(losses) == {"ce", "fitnets"}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        kd.on_step_end()
    assert kd.step == 2 and any(not torch.equal(a, b) for a, b in zip(before, params))
    assert set(kd.state_dict()) == set(kd.distiller.state_dict())


def test_statistics_from_a_plain_loader(one_thread):
    """KDA's k-means landmarks and MGD's matching come from the loop's own DataLoader, re-batched."""
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10, in_channels=1)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 1, 8, 8), torch.arange(40) % 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7)
    x, y = dataset.tensors[0][:8], dataset.tensors[1][:8]
    kd = Distillation(teacher, student, "kda", {"landmarks": "kmeans", "num_landmarks": 4, "warmup_epochs": 0},
                      example_input=x[:2], train_loader=loader, epochs=1, log=lambda _m: None)
    assert kd.ctx.data.train_size == 40 and kd.ctx.steps_per_epoch == 6
    kd.on_epoch_start(0)
    losses = kd(x, y)
    assert set(losses) == {"ce", "kda"} and torch.isfinite(losses["kda"])
    pairs = [["layer3.0.add", "layer3.2.add"]]
    mgd = Distillation(teacher, student, "mgd", {"pairs": pairs}, example_input=x[:2], train_loader=loader,
                       log=lambda _m: None)
    mgd.setup()
    assert bool(mgd.distiller.solved) and torch.isfinite(mgd(x, y)["mgd"])
    batches = list(kd.ctx.data.train_eval_loader(16, limit=35))
    assert [len(b[0]) for b in batches] == [16, 16, 3]


def test_errors_are_one_line(one_thread):
    teacher = create_model("resnet8", num_classes=10, in_channels=1)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(FeatkdError, match=r"method\.wieght: unknown key \(did you mean 'weight'"):
        Distillation(teacher, student, "fitnets", {"pairs": [["layer3", "layer3"]], "wieght": 2},
                     example_input=x[:2])
    with pytest.raises(FeatkdError, match="has no capture point 'layer9'"):
        Distillation(teacher, student, "at", {"pairs": [["layer9", "layer3"]]}, example_input=x[:2])
    with pytest.raises(FeatkdError, match="method 'kd' needs a teacher"):
        Distillation(None, student, "kd", example_input=x[:2])
    mgd = Distillation(teacher, student, "mgd", {"pairs": [["layer3.0.add", "layer3.0.add"]]},
                       example_input=x[:2], log=lambda _m: None)
    with pytest.raises(FeatkdError, match=r"statistics over the training data: pass train_loader="):
        mgd(x, y)
    none = Distillation(None, student, "none", example_input=x[:2])
    assert set(none(x, y)) == {"ce"} and list(none.parameters()) == []


ACCELERATE_EXAMPLE = ROOT / "examples" / "own_loop_accelerate.py"


def _run_accelerate_example(cmd: list[str], cwd: Path) -> str:
    pytest.importorskip("accelerate", reason="examples/own_loop_accelerate.py needs accelerate (the examples extra)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_accelerate_example_under_torchrun_gives_every_rank_the_same_matching(tmp_path):
    """Two processes (gloo, Accelerate's DDP): MGD's statistics are summed over the ranks, so both solve one
    matching; the distilled student beats chance by far."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = _run_accelerate_example([*torchrun, str(ACCELERATE_EXAMPLE)], tmp_path)
    digests = dict(re.findall(r"rank (\d): matching (\w+)", out))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], out
    assert "mgd: matching update 2" in out
    acc = float(re.search(r"epoch 2: loss \S+ \(ce \S+, mgd \S+\)  test_acc (\S+)", out)[1])
    assert acc > 30, out  # chance is 10 %
