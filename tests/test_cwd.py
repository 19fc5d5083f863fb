"""CWD (channel-wise distillation): the loss against a hand computation, its invariances, the method on models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featkd.capture.capture import CapturingModel
from featkd.config import ConfigError
from featkd.errors import FeatkdError
from featkd.methods import METHODS
from featkd.methods.base import Batch, BuildContext
from featkd.methods.cwd import CWDConfig, channel_wise_divergence
from featkd.models import create_model
from tests.helpers import tiny_context


def cwd_by_hand(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """MMRazor's ChannelWiseDivergence written out: per (n, c) a softmax over the H*W positions, KL(T || S)."""
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            zs = [float(v) / tau for v in s[i, j].reshape(h * w)]
            zt = [float(v) / tau for v in t[i, j].reshape(h * w)]
            ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
            pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
            total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    return total * tau * tau / (n * c)


def test_matches_the_hand_computation_and_its_tau_scaling():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 2, 3)), rng.normal(size=(2, 3, 2, 3)) * 2
    for tau in (1.0, 4.0):
        got = channel_wise_divergence(torch.tensor(s), torch.tensor(t), tau).item()
        assert got == pytest.approx(cwd_by_hand(s, t, tau), rel=1e-6)
    # tau only rescales the maps and multiplies by tau^2
    at_4 = channel_wise_divergence(torch.tensor(s), torch.tensor(t), 4.0)
    at_1 = channel_wise_divergence(torch.tensor(s / 4), torch.tensor(t / 4), 1.0)
    torch.testing.assert_close(at_4, 16 * at_1)
    # a constant added to a channel does not change its spatial softmax
    shifted = channel_wise_divergence(torch.tensor(s + rng.normal(size=(2, 3, 1, 1))), torch.tensor(t), 1.0)
    torch.testing.assert_close(shifted, channel_wise_divergence(torch.tensor(s), torch.tensor(t), 1.0))


def test_zero_for_equal_maps_and_gradients_reach_the_student_only():
    s = torch.randn(2, 4, 5, 5, requires_grad=True)
    t = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert channel_wise_divergence(s, s.detach().clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    loss = channel_wise_divergence(s, t, 2.0)
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is a target


def test_float32_under_bfloat16_autocast():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = channel_wise_divergence(s.bfloat16(), t.bfloat16(), 1.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, channel_wise_divergence(s.bfloat16().float(), t.bfloat16().float(), 1.0))


def build(ctx: BuildContext, **options):
    cls = METHODS.get("cwd")
    return cls(CWDConfig(**options), ctx)


def captured_batch(ctx: BuildContext, distiller, x: torch.Tensor) -> Batch:
    s_logits, s_feats = CapturingModel(ctx.student, distiller.student_points, x)(x)
    t_logits, t_feats = CapturingModel(ctx.teacher, distiller.teacher_points, x)(x)
    return Batch(inputs=x, targets=torch.zeros(len(x), dtype=torch.long), student_logits=s_logits,
                 student_features=s_feats, teacher_logits=t_logits, teacher_features=t_feats)


def test_channel_mismatch_needs_the_connector_option_and_trains_it():
    ctx = tiny_context(s_width=2, t_width=3, size=4)  # TinyNet 'conv' points: 2 vs 3 channels, 4x4
    with pytest.raises(FeatkdError, match=r"2 channels and teacher 'conv' 3.*method\.connector: conv1x1"):
        build(ctx, pairs=[["conv", "conv"]])
    distiller = build(ctx, pairs=[["conv", "conv"]], connector="conv1x1", weight=2.0, tau=1.0)
    assert list(distiller.connectors) == ["0"]
    x = torch.randn(4, 1, 4, 4)
    batch = captured_batch(ctx, distiller, x)
    loss = distiller.loss(batch)["cwd"]
    expected = 2.0 * channel_wise_divergence(distiller.connectors["0"](batch.student_features["conv"]),
                                             batch.teacher_features["conv"], 1.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert distiller.connectors["0"].weight.grad.abs().sum() > 0
    assert ctx.student.conv.weight.grad.abs().sum() > 0
    with_bn = build(ctx, pairs=[["conv", "conv"]], connector="conv1x1-bn-relu")
    assert [type(m).__name__ for m in with_bn.connectors["0"].modules()][-2:] == ["BatchNorm2d", "ReLU"]


def test_pkd_shares_the_connector_rule():
    """PKD, the other per-channel method, builds its connectors by the same rule (one 1x1 conv, no BN)."""
    from featkd.methods.pkd import PKDConfig, pkd_loss

    ctx = tiny_context(s_width=2, t_width=3, size=4)
    with pytest.raises(FeatkdError, match=r"2 channels and teacher 'conv' 3: PKD .*method\.connector: conv1x1 "):
        METHODS.get("pkd")(PKDConfig(pairs=[["conv", "conv"]]), ctx)
    distiller = METHODS.get("pkd")(PKDConfig(pairs=[["conv", "conv"]], connector="conv1x1", weight=3.0), ctx)
    assert [type(m).__name__ for m in distiller.connectors["0"].modules()] == ["Conv2d"]
    batch = captured_batch(ctx, distiller, torch.randn(4, 1, 4, 4))
    expected = 3.0 * pkd_loss(distiller.connectors["0"](batch.student_features["conv"]),
                              batch.teacher_features["conv"], distiller.cfg.resize_student)
    torch.testing.assert_close(distiller.loss(batch)["pkd"], expected)


def test_segmenter_logits_before_upsampling():
    torch.manual_seed(0)
    teacher = create_model("deeplab_resnet8", num_classes=3, in_channels=1)
    student = create_model("fcn_resnet8", num_classes=3, in_channels=1, widths=[4, 8, 8])
    ctx = BuildContext(teacher=teacher.eval(), student=student, input_shape=(1, 16, 16), num_classes=3,
                       device=torch.device("cpu"))
    distiller = build(ctx, pairs=[["classifier", "classifier"]])
    assert len(distiller.connectors) == 0  # K = K: class c against class c
    x = torch.randn(2, 1, 16, 16)
    batch = captured_batch(ctx, distiller, x)
    assert batch.student_features["classifier"].shape == (2, 3, 4, 4)  # output stride 4
    got = distiller.loss(batch)["cwd"]
    s, t = batch.student_features["classifier"], batch.teacher_features["classifier"]
    assert got.item() == pytest.approx(5.0 * cwd_by_hand(s.detach().numpy(), t.detach().numpy(), 1.0), rel=1e-5)


def test_spatial_mismatch_and_bad_options():
    torch.manual_seed(0)
    student = create_model("fcn_resnet8", num_classes=3, in_channels=1, widths=[4, 8, 8])
    teacher = create_model("fcn_mobilenetv2", num_classes=3, in_channels=1, width_mult=0.25)  # stride 8
    ctx = BuildContext(teacher=teacher, student=student, input_shape=(1, 16, 16), num_classes=3,
                       device=torch.device("cpu"))
    with pytest.raises(FeatkdError, match=r"spatial sizes differ.*resize_teacher: true"):
        build(ctx, pairs=[["classifier", "classifier"]])
    distiller = build(ctx, pairs=[["classifier", "classifier"]], resize_teacher=True)
    batch = captured_batch(ctx, distiller, torch.randn(2, 1, 16, 16))
    assert batch.teacher_features["classifier"].shape[-2:] == (2, 2)
    assert torch.isfinite(distiller.loss(batch)["cwd"])
    with pytest.raises(ConfigError, match=r"method\.tau: must be > 0"):
        CWDConfig(pairs=[["a", "b"]], tau=0.0).validate()
