"""DKD against a value worked out with plain formulas on B = 2, K = 3, its warm-up factor, and a short run."""

from __future__ import annotations

import math

import pytest
import torch

from featkd.config import from_dict
from featkd.errors import ConfigError
from featkd.methods import METHODS
from featkd.methods.base import Batch
from featkd.methods.dkd import warmup_factor
from tests.helpers import tiny_context

S = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]  # student logits (B = 2, K = 3)
T_ = [[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # teacher logits
Y = [0, 2]
TEMP = 2.0


def make(**options):
    cls = METHODS.get("dkd")
    return cls(from_dict(cls.Config, options, "method"), tiny_context())


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def by_hand() -> tuple[float, float, float, float]:
    """(TCKD, NCKD, Hinton KD, TCKD + (1 - p_t[y]) NCKD), each T^2 * KL summed over classes, mean of the 2."""
    tckd = nckd = hinton = decomposed = 0.0
    for s, t, y in zip(S, T_, Y):
        ps, pt = softmax([v / TEMP for v in s]), softmax([v / TEMP for v in t])
        tc = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])  # binary: target vs the rest
        qs = [p / (1 - ps[y]) for k, p in enumerate(ps) if k != y]  # among the two non-target classes
        qt = [p / (1 - pt[y]) for k, p in enumerate(pt) if k != y]
        nc = kl(qt, qs)
        tckd, nckd, hinton = tckd + tc, nckd + nc, hinton + kl(pt, ps)
        decomposed += tc + (1 - pt[y]) * nc
    return tuple(TEMP**2 * v / 2 for v in (tckd, nckd, hinton, decomposed))


def batch(epoch: int) -> Batch:
    return Batch(torch.zeros(2, 1, 4, 4), torch.tensor(Y), torch.tensor(S, requires_grad=True), {},
                 torch.tensor(T_), {}, epoch=epoch)


def test_dkd_by_hand():
    tckd, nckd, hinton, decomposed = by_hand()
    assert (tckd, nckd) == pytest.approx((0.513902, 0.193358), abs=1e-6)  # written out: this case's values
    assert hinton == pytest.approx(decomposed, rel=1e-12)  # the paper's eq. 1: KD = TCKD + (1 - p_t) NCKD
    d = make(temperature=TEMP, alpha=1.5, beta=8.0, warmup=20)
    b = batch(epoch=19)  # epoch 20 of mdistiller's 1-based count: the warm-up is over
    losses = d(b)
    assert set(losses) == {"ce", "tckd", "nckd"}
    assert losses["tckd"].item() == pytest.approx(1.5 * tckd, rel=1e-5)
    assert losses["nckd"].item() == pytest.approx(8.0 * nckd, rel=1e-5)
    ce = -(math.log(softmax(S[0])[0]) + math.log(softmax(S[1])[2])) / 2
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-6)
    sum(losses.values()).backward()
    assert torch.isfinite(b.student_logits.grad).all() and b.teacher_logits.grad is None


def test_warmup_is_linear_over_the_first_epochs_as_mdistiller():
    # mdistiller: min(epoch / WARMUP, 1) with epoch 1, 2, ...; featkd's epoch is 0-based
    assert [warmup_factor(e, 20) for e in (0, 1, 9, 18, 19, 30)] == [1 / 20, 2 / 20, 10 / 20, 19 / 20, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0  # no warm-up
    tckd, nckd, _, _ = by_hand()
    d = make(temperature=TEMP, warmup=4)
    first = d(batch(epoch=0))
    assert first["tckd"].item() == pytest.approx(tckd / 4, rel=1e-5)
    assert first["nckd"].item() == pytest.approx(8.0 * nckd / 4, rel=1e-5)  # beta 8: mdistiller's default
    assert d(batch(epoch=1))["nckd"].item() == pytest.approx(8.0 * nckd / 2, rel=1e-5)


def test_defaults_are_mdistillers_and_bad_options_name_the_key():
    cfg = make().cfg
    assert (cfg.ce_weight, cfg.alpha, cfg.beta, cfg.temperature, cfg.warmup, cfg.kd_weight) == \
        (1.0, 1.0, 8.0, 4.0, 20, 0.0)
    for key, value in (("temperature", 0.0), ("beta", -1.0), ("warmup", -1)):
        with pytest.raises(ConfigError, match=rf"method\.{key}"):
            make(**{key: value})


def test_dkd_is_finite_for_a_confident_teacher_under_bf16_autocast():
    # the non-target probabilities underflow to 0 in float32 (exp(-200) at T 4): log-sum-exp, not log(1 - p)
    s = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    b = Batch(torch.zeros(1, 1, 4, 4), torch.tensor([0]), s, {}, torch.tensor([[800.0, 0.0, 0.0]]), {}, epoch=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = make().loss(b)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_is_classification_only():
    from featkd.engine.build import method_options
    from featkd.tasks import TASKS

    with pytest.raises(ConfigError, match="'dkd' is defined for classification only"):
        method_options("dkd", {}, TASKS.get("segmentation")(3))
