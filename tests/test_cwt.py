"""CWT (channel-wise transformation distillation): shapes, gradient flow, hand-computed loss, real training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from featkd.capture.capture import CapturingModel
from featkd.config import build_config, from_dict, load_config
from featkd.engine.trainer import train
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import METHODS
from featkd.methods.base import Batch
from featkd.methods.cwt import CWT, cwt_l2
from featkd.models import create_model
from tests.helpers import tiny_context

ROOT = Path(__file__).resolve().parents[1]


def make(ctx, **options) -> CWT:
    cls = METHODS.get("cwt")
    return cls(from_dict(cls.Config, options, "method"), ctx)


def feature_batch(fs: dict, ft: dict) -> Batch:
    """A Batch holding only features (numpy arrays -> float32 tensors)."""
    as_t = lambda d: {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()}  # noqa: E731
    return Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3), as_t(fs),
                 torch.zeros(2, 3), as_t(ft))


# ---- structure and shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize(("c_s", "c_t"), [(2, 5), (5, 2), (3, 3)])
def test_mismatched_channel_counts_map_student_to_teacher_channels(c_s, c_t):
    ctx = tiny_context(s_width=c_s, t_width=c_t, size=4)
    d = make(ctx, pairs=[["conv", "conv"], ["act", "conv"], ["fc:input", "fc:input"]])
    assert len(d.transforms) == 3
    w1, _relu, w2 = d.transforms[0]
    assert (w1.in_channels, w1.out_channels, w2.in_channels, w2.out_channels) == (c_s, c_t, c_t, c_t)
    x = torch.randn(6, 1, 4, 4)
    _, fs = CapturingModel(ctx.student, d.student_points, x)(x)
    for transform in d.transforms[:2]:
        assert transform(fs["conv"]).shape == (6, c_t, 4, 4)
    losses = d.loss(Batch(x, torch.zeros(6, dtype=torch.long), torch.zeros(6, 3), fs,
                          torch.zeros(6, 3), CapturingModel(ctx.teacher, d.teacher_points, x)(x)[1]))
    assert set(losses) == {"cwt"} and losses["cwt"].shape == () and torch.isfinite(losses["cwt"])
    assert d.student_points == ("conv", "act", "fc:input") and d.teacher_points == ("conv", "fc:input")


def test_hidden_width_bias_and_batchnorm_options():
    ctx = tiny_context(s_width=2, t_width=5)
    w1, _, w2 = make(ctx, pairs=[["conv", "conv"]], hidden_channels=7).transforms[0]
    assert (w1.out_channels, w2.in_channels, w2.out_channels) == (7, 7, 5)
    assert w1.bias is not None and w2.bias is not None
    no_bias = make(ctx, pairs=[["conv", "conv"]], bias=False).transforms[0]
    assert all(m.bias is None for m in no_bias if isinstance(m, nn.Conv2d))
    kinds = {place: [type(m).__name__ for m in make(ctx, pairs=[["conv", "conv"]], batchnorm=place).transforms[0]]
             for place in ("none", "hidden", "output", "both")}
    assert kinds == {
        "none": ["Conv2d", "ReLU", "Conv2d"],
        "hidden": ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"],
        "output": ["Conv2d", "ReLU", "Conv2d", "BatchNorm2d"],
        "both": ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"],
    }
    both = make(ctx, pairs=[["conv", "conv"]], batchnorm="both").transforms[0]
    assert all(m.bias is None for m in both if isinstance(m, nn.Conv2d))  # BN cancels a preceding bias


def test_bad_options_and_spatial_mismatch_are_clear_errors():
    ctx = tiny_context()
    with pytest.raises(ConfigError, match=r"method\.alpha: must be >= 0"):
        make(ctx, pairs=[["conv", "conv"]], alpha=-1.0)
    with pytest.raises(ConfigError, match=r"method\.hidden_channels: must be a positive integer"):
        make(ctx, pairs=[["conv", "conv"]], hidden_channels=0)
    with pytest.raises(ConfigError, match=r"method\.reduction: 'sum' is not allowed"):
        make(ctx, pairs=[["conv", "conv"]], reduction="sum")
    with pytest.raises(ConfigError, match=r"method\.pairs: give at least one"):
        make(ctx)
    with pytest.raises(FeatkdError, match=r"spatial sizes differ: student 'conv' is \(2, 4, 4\), teacher 'pool' "
                       r"is \(3, 1, 1\); .*method.resize_teacher"):
        make(ctx, pairs=[["conv", "pool"]])
    with pytest.raises(FeatkdError, match=r"expected feature maps of shape \(C, H, W\)"):
        make(ctx, pairs=[["conv", "fc:input"]])
    # resize_teacher: the teacher's 4x4 map is average-pooled to the student's 1x1
    d = make(ctx, pairs=[["pool", "conv"]], resize_teacher=True)
    rng = np.random.default_rng(3)
    fs, ft = rng.normal(size=(2, 2, 1, 1)), rng.normal(size=(2, 3, 4, 4))
    got = d.loss(feature_batch({"pool": fs}, {"conv": ft}))["cwt"]
    with torch.no_grad():
        mapped = d.transforms[0](torch.tensor(fs, dtype=torch.float32)).numpy()
    expected = ((mapped - ft.mean(axis=(2, 3), keepdims=True)) ** 2).mean()
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ---- the loss against numpy ----------------------------------------------------------------------------

def np_transform(x: np.ndarray, w1, b1, w2, b2) -> np.ndarray:
    """(B, C_s, H, W) -> (B, C_t, H, W): W2 relu(W1 x + b1) + b2 applied at every position."""
    h = np.einsum("oc,nchw->nohw", w1, x) + b1[None, :, None, None]
    h = np.maximum(h, 0.0)
    return np.einsum("oc,nchw->nohw", w2, h) + b2[None, :, None, None]


def set_transform(transform: nn.Module, w1, b1, w2, b2) -> None:
    conv1, _, conv2 = transform
    with torch.no_grad():
        for conv, w, b in ((conv1, w1, b1), (conv2, w2, b2)):
            conv.weight.copy_(torch.tensor(w, dtype=torch.float32)[:, :, None, None])
            conv.bias.copy_(torch.tensor(b, dtype=torch.float32))


@pytest.mark.parametrize("reduction", ["mean", "per_example_sum"])
def test_loss_against_hand_computation(reduction):
    ctx = tiny_context(s_width=2, t_width=3, size=4)
    d = make(ctx, pairs=[["conv", "conv"], ["fc:input", "fc:input"]], alpha=0.7, hidden_channels=4,
             reduction=reduction)
    rng = np.random.default_rng(0)
    params = []
    for transform in d.transforms:  # 2 -> 4 -> 3 for both pairs
        p = (rng.normal(size=(4, 2)), rng.normal(size=4), rng.normal(size=(3, 4)), rng.normal(size=3))
        set_transform(transform, *p)
        params.append(p)
    fs_map, ft_map = rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    fs_vec, ft_vec = rng.normal(size=(2, 2)), rng.normal(size=(2, 3))

    def l2(s, t):
        sq = (s - t) ** 2
        return sq.mean() if reduction == "mean" else sq.reshape(sq.shape[0], -1).sum(axis=1).mean()

    map_term = l2(np_transform(fs_map, *params[0]), ft_map)
    vec_term = l2(np_transform(fs_vec[:, :, None, None], *params[1])[:, :, 0, 0], ft_vec)
    batch = feature_batch({"conv": fs_map, "fc:input": fs_vec}, {"conv": ft_map, "fc:input": ft_vec})
    pair_losses = d.pair_losses(batch)
    assert pair_losses[0].item() == pytest.approx(map_term, rel=1e-5)
    assert pair_losses[1].item() == pytest.approx(vec_term, rel=1e-5)
    assert d.loss(batch)["cwt"].item() == pytest.approx(0.7 * (map_term + vec_term), rel=1e-5)
    # per_example_sum is the per-element mean times C*H*W
    s, t = torch.tensor(fs_map[:, :1]).repeat(1, 3, 1, 1), torch.tensor(ft_map)
    assert cwt_l2(s, t, "per_example_sum").item() == pytest.approx(3 * 16 * cwt_l2(s, t, "mean").item())


def test_hinton_term_is_added_for_cwt_plus_kd():
    ctx = tiny_context(s_width=2, t_width=3)
    d = make(ctx, pairs=[["conv", "conv"]], kd_weight=0.5, ce_weight=0.5, alpha=2.0)
    rng = np.random.default_rng(1)
    batch = feature_batch({"conv": rng.normal(size=(2, 2, 4, 4))}, {"conv": rng.normal(size=(2, 3, 4, 4))})
    batch.student_logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    batch.teacher_logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    losses = d(batch)
    assert set(losses) == {"ce", "kd", "cwt"}
    assert losses["cwt"].item() == pytest.approx(2.0 * d.pair_losses(batch)[0].item(), rel=1e-6)


# ---- gradient flow ----------------------------------------------------------------------------------------

def test_gradient_reaches_student_and_mlp_but_never_the_teacher():
    ctx = tiny_context(s_width=2, t_width=5, size=4)
    d = make(ctx, pairs=[["conv", "conv"], ["fc:input", "fc:input"]], batchnorm="hidden")
    assert all(p.requires_grad for p in ctx.teacher.parameters())  # nothing froze the teacher for us
    x = torch.randn(4, 1, 4, 4)
    student = CapturingModel(ctx.student, d.student_points, x)
    teacher = CapturingModel(ctx.teacher, d.teacher_points, x)
    t_logits, t_feats = teacher(x)  # deliberately WITH autograd: the distiller itself must cut the graph
    assert t_feats["conv"].requires_grad
    s_logits, s_feats = student(x)
    losses = d(Batch(x, torch.tensor([0, 1, 2, 0]), s_logits, s_feats, t_logits, t_feats))
    losses["cwt"].backward()  # the feature term alone: the student's grads can only come through the MLPs
    assert all(p.grad is None for p in ctx.teacher.parameters())
    for name, p in [*ctx.student.named_parameters(), *d.named_parameters()]:
        if name.startswith("fc."):  # the classifier is after every captured point
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    distiller_ids = {id(p) for p in d.parameters()}
    assert not distiller_ids & {id(p) for p in [*ctx.student.parameters(), *ctx.teacher.parameters()]}


# ---- real trainings ---------------------------------------------------------------------------------------

def digits_config(tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "digits-cwt-resnet20-resnet8.yaml").read_text())
    raw["base"] = str(ROOT / "configs" / raw["base"])
    raw["train"] = {"epochs": 2, "num_threads": 1, "progress": "off", "tensorboard": False, "eval_every": 1,
                    **train}
    path = tmp_path / "cwt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_featkd_train_on_digits_keeps_the_mlp_out_of_the_exported_student(tmp_path):
    cfg = digits_config(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "featkd", "train", str(cfg), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["method"] == "cwt"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_cwt"] > 0
    # the exported student is exactly a plain ResNet-8 state_dict: no transform weights in it
    exported = torch.load(out / "student.pt", weights_only=True)
    assert set(exported) == set(create_model("resnet8", num_classes=10, in_channels=1).state_dict())
    assert not any("transform" in k for k in exported)
    # ... while the training checkpoint holds them, trained by the optimiser (its second param group)
    state = torch.load(out / "last.pt", weights_only=True)
    mlp_keys = {"transforms.0.0.weight", "transforms.0.0.bias", "transforms.0.2.weight", "transforms.0.2.bias"}
    assert set(state["distiller"]) == mlp_keys
    assert state["distiller"]["transforms.0.0.weight"].shape == (64, 64, 1, 1)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and len(groups[1]["params"]) == 4
    assert all(state["optimizer"]["state"][i]["momentum_buffer"].abs().sum() > 0 for i in groups[1]["params"])


def test_resume_restores_the_mlp_exactly(tmp_path):
    quiet = lambda _m: None  # noqa: E731
    full_cfg = load_config(digits_config(tmp_path, deterministic=True))
    train(full_cfg, tmp_path / "full", log=quiet)
    stop_cfg = load_config(digits_config(tmp_path, deterministic=True, stop_after=1))
    assert train(stop_cfg, tmp_path / "split", log=quiet).status == "stopped"
    train(full_cfg, tmp_path / "split", resume=True, log=quiet)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for part in ("student", "distiller"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=0, msg=f"{part}.{key}")


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*-cwt-*.yaml")):
        cfg = load_config(path)
        assert cfg.method["name"] == "cwt", path
    cfg = build_config({"teacher": {"model": "resnet20"}, "method": {"name": "cwt", "pairs": [["a", "b"]]}})
    assert cfg.method["alpha"] == 1.0 and cfg.method["reduction"] == "mean"
