"""Each baseline loss against a value computed by hand (numpy / plain loops) on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featkd.config import from_dict
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import METHODS
from featkd.methods.base import Batch, hinton_kd_loss
from tests.helpers import tiny_context


def make(name: str, ctx, **options):
    cls = METHODS.get(name)
    return cls(from_dict(cls.Config, options, "method"), ctx)


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_cross_entropy_only():
    ctx = tiny_context()
    d = make("none", ctx)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    y = torch.tensor([0, 2])
    losses = d(Batch(torch.zeros(2, 1, 4, 4), y, logits, {}))
    p = np_softmax(logits.numpy())
    expected = -(math.log(p[0, 0]) + math.log(p[1, 2])) / 2
    assert set(losses) == {"ce"}
    assert losses["ce"].item() == pytest.approx(expected, rel=1e-6)


def test_hinton_kd_against_hand_computation():
    s = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    t = np.array([[3.0, 2.0, 1.0], [0.5, 0.5, -2.0]])
    T = 2.0
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean() * T * T
    got = hinton_kd_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(kl, rel=1e-6)
    ctx = tiny_context()
    d = make("kd", ctx, kd_temperature=T, ce_weight=0.25, kd_weight=0.75)
    y = torch.tensor([2, 1])
    losses = d(Batch(torch.zeros(2, 1, 4, 4), y, torch.tensor(s, dtype=torch.float32), {},
                     torch.tensor(t, dtype=torch.float32), {}))
    ce = -(np.log(np_softmax(s)[0, 2]) + np.log(np_softmax(s)[1, 1])) / 2
    assert losses["kd"].item() == pytest.approx(0.75 * kl, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.25 * ce, rel=1e-5)


def test_kd_needs_positive_weight():
    with pytest.raises(ConfigError, match=r"method\.kd_weight"):
        make("kd", tiny_context(), kd_weight=0.0)


def test_fitnets_against_hand_computation():
    ctx = tiny_context(s_width=2, t_width=3)
    d = make("fitnets", ctx, pairs=[["conv", "conv"]], weight=2.0)
    conv = d.connectors[0]
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    b = np.array([0.5, 0.0, -0.5])
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w, dtype=torch.float32).view(3, 2, 1, 1))
        conv.bias.copy_(torch.tensor(b, dtype=torch.float32))
    rng = np.random.default_rng(0)
    fs = rng.normal(size=(2, 2, 4, 4))
    ft = rng.normal(size=(2, 3, 4, 4))
    mapped = np.einsum("oc,nchw->nohw", w, fs) + b[None, :, None, None]
    expected = 2.0 * ((mapped - ft) ** 2).mean()
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3),
                  {"conv": torch.tensor(fs, dtype=torch.float32)}, torch.zeros(2, 3),
                  {"conv": torch.tensor(ft, dtype=torch.float32)})
    assert d.loss(batch)["fitnets"].item() == pytest.approx(expected, rel=1e-5)


def test_fitnets_spatial_mismatch_is_a_clear_error():
    ctx = tiny_context()
    with pytest.raises(FeatkdError, match=r"spatial sizes differ: student 'conv' is \(2, 4, 4\), teacher 'pool' "
                       r"is \(3, 1, 1\); .*method.resize_teacher"):
        make("fitnets", ctx, pairs=[["conv", "pool"]])
    with pytest.raises(FeatkdError, match=r"expected feature maps of shape \(C, H, W\)"):
        make("fitnets", ctx, pairs=[["conv", "fc:input"]])
    resized = make("fitnets", ctx, pairs=[["pool", "conv"]], resize_teacher=True)
    assert resized.connectors[0].out_channels == 3
    with pytest.raises(ConfigError, match=r"method.pairs\[0\]"):
        make("fitnets", ctx, pairs=[["conv"]])


def test_attention_transfer_against_hand_computation():
    ctx = tiny_context(s_width=2, t_width=3)
    d = make("at", ctx, pairs=[["conv", "conv"]], weight=1000.0, p=2.0)
    rng = np.random.default_rng(1)
    fs = rng.normal(size=(2, 2, 4, 4))
    ft = rng.normal(size=(2, 3, 4, 4))

    def att(f):
        a = (np.abs(f) ** 2).mean(axis=1).reshape(f.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = 1000.0 * ((att(fs) - att(ft)) ** 2).mean()
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3),
                  {"conv": torch.tensor(fs, dtype=torch.float32)}, torch.zeros(2, 3),
                  {"conv": torch.tensor(ft, dtype=torch.float32)})
    assert d.loss(batch)["at"].item() == pytest.approx(expected, rel=1e-5)


def test_distiller_parameters_are_not_the_teachers():
    ctx = tiny_context()
    d = make("fitnets", ctx, pairs=[["conv", "conv"]])
    teacher_params = {id(p) for p in ctx.teacher.parameters()}
    assert all(id(p) not in teacher_params for p in d.parameters())
    assert list(d.state_dict()) == ["connectors.0.weight", "connectors.0.bias"]
