"""SP and RKD losses against values worked out by hand on 2-3 examples, and through the Distiller interface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featkd.config import from_dict
from featkd.errors import FeatkdError
from featkd.methods import METHODS
from featkd.methods.base import Batch, BuildContext
from featkd.methods.rkd import angles, pairwise_distances, rkd_angle_loss, rkd_distance_loss
from featkd.methods.sp import sp_loss, sp_similarity
from tests.helpers import tiny_context


def make(name: str, ctx, **options):
    cls = METHODS.get(name)
    return cls(from_dict(cls.Config, options, "method"), ctx)


def test_sp_by_hand():
    # f_t rows (1, 0), (1, 1): G_t = [[1, 1], [1, 2]] -> rows / (sqrt 2, sqrt 5)
    # f_s rows (2), (1):       G_s = [[4, 2], [2, 1]] -> rows / (sqrt 20, sqrt 5) = both (2, 1) / sqrt 5
    # squared differences: row 0: 2 - 6 / sqrt 10, row 1: 2 / 5; divided by b^2 = 4
    f_t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    f_s = torch.tensor([[2.0], [1.0]])
    torch.testing.assert_close(sp_similarity(f_t), torch.tensor([[2**-0.5, 2**-0.5], [5**-0.5, 2 * 5**-0.5]]))
    expected = (2.4 - 6 / math.sqrt(10)) / 4
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-6)


def test_sp_flattens_maps_and_sums_pairs_through_the_distiller():
    ctx = tiny_context(s_width=2, t_width=3)
    d = make("sp", ctx, pairs=[["conv", "conv"], ["fc:input", "fc:input"]], weight=10.0)
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    vs, vt = torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g)
    batch = Batch(torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), torch.zeros(4, 3),
                  {"conv": fs, "fc:input": vs}, torch.zeros(4, 3), {"conv": ft, "fc:input": vt})

    def by_loops(a, b):  # plain numpy: Gram of flattened features, rows L2-normalised, squared Frobenius / b^2
        out = 0.0
        for f1, f2 in ((a, b),):
            g1, g2 = f1 @ f1.T, f2 @ f2.T
            g1 = g1 / np.linalg.norm(g1, axis=1, keepdims=True)
            g2 = g2 / np.linalg.norm(g2, axis=1, keepdims=True)
            out += ((g1 - g2) ** 2).sum() / len(f1) ** 2
        return out

    expected = 10.0 * (by_loops(fs.flatten(1).numpy(), ft.flatten(1).numpy()) + by_loops(vs.numpy(), vt.numpy()))
    assert d(batch)["sp"].item() == pytest.approx(expected, rel=1e-5)


def test_sp_and_rkd_default_to_the_classifier_input():
    ctx = tiny_context()
    assert make("sp", ctx).pairs == [("fc:input", "fc:input")]
    assert make("rkd", ctx).pairs == [("fc:input", "fc:input")]
    assert make("sp", ctx).cfg.weight == 3000.0
    rkd = make("rkd", ctx)
    assert (rkd.cfg.distance_weight, rkd.cfg.angle_weight) == (25.0, 50.0)
    with pytest.raises(FeatkdError, match="no capture point 'layer9'"):
        make("rkd", ctx, pairs=[["conv", "layer9"]])


# teacher: right triangle (0,0), (3,0), (0,4): sides 3, 4, 5; student: collinear (0,0), (1,0), (2,0)
T3 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
S3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])


def test_rkd_distance_by_hand():
    # teacher distances / mean 4: (0,1) .75, (0,2) 1, (1,2) 1.25; student / mean 4/3: .75, 1.5, .75
    # differences 0, .5, -.5 -> Huber .125 each, twice in the symmetric 3x3 matrix -> 0.5 / 9
    torch.testing.assert_close(pairwise_distances(T3), torch.tensor([[0, 3, 4], [3, 0, 5], [4, 5, 0.0]]))
    assert rkd_distance_loss(S3, T3).item() == pytest.approx(0.5 / 9, rel=1e-6)


def test_rkd_angle_by_hand():
    # cosines at each vertex j between the directions to the two other points:
    # teacher: vertex 0: 0 (right angle), vertex 1: 9/15 = .6, vertex 2: 16/20 = .8
    # student: vertex 0: 1, vertex 1: -1, vertex 2: 1
    # Huber of the differences 1, -1.6, .2: .5, 1.1, .02, each for (i, k) and (k, i); i = k entries are 1 on
    # both sides and triplets with i = j or k = j are 0 on both sides -> 3.24 / 27
    a = angles(T3).view(3, 3, 3)  # a[j, i, k]
    assert a[1, 0, 2].item() == pytest.approx(0.6, abs=1e-6) and a[2, 0, 1].item() == pytest.approx(0.8, abs=1e-6)
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-6) and a[0, 0, 1].item() == 0.0
    assert rkd_angle_loss(S3, T3).item() == pytest.approx(3.24 / 27, rel=1e-6)


def test_rkd_through_the_distiller_weights_and_gradient_only_to_the_student():
    ctx = tiny_context(s_width=2, t_width=2)
    d = make("rkd", ctx, distance_weight=2.0, angle_weight=3.0)
    s = S3.clone().requires_grad_(True)
    t = T3.clone().requires_grad_(True)
    batch = Batch(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3, 3),
                  {"fc:input": s}, torch.zeros(3, 3), {"fc:input": t})
    losses = d.loss(batch)
    assert losses["rkd_distance"].item() == pytest.approx(2.0 * 0.5 / 9, rel=1e-6)
    assert losses["rkd_angle"].item() == pytest.approx(3.0 * 3.24 / 27, rel=1e-6)
    sum(losses.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and t.grad is None
    only_distance = make("rkd", ctx, angle_weight=0.0).loss(batch)
    assert set(only_distance) == {"rkd_distance"}


def test_rkd_works_across_widths_on_real_models():
    from featkd.models import create_model

    teacher = create_model("resnet20", num_classes=10, in_channels=1)
    student = create_model("resnet8", num_classes=10, in_channels=1, widths=[8, 16, 32])
    ctx = BuildContext(teacher, student, (1, 8, 8), 10, torch.device("cpu"))
    from featkd.capture.capture import CapturingModel

    x = torch.randn(6, 1, 8, 8)
    for name in ("rkd", "sp"):
        d = make(name, ctx)
        _, ft = CapturingModel(teacher.eval(), d.teacher_points, x)(x)
        logits, fs = CapturingModel(student, d.student_points, x)(x)
        losses = d.loss(Batch(x, torch.arange(6) % 10, logits, fs, logits.detach(), ft))
        total = sum(losses.values())
        total.backward()
        assert torch.isfinite(total) and student.fc.weight.grad is None  # the classifier input: fc is after it
        assert student.conv1.weight.grad is not None
        student.zero_grad(set_to_none=True)
