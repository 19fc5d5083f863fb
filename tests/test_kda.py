"""KDA: the loss forms against hand computation, landmark bookkeeping, kernels, k-means, Nyström, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featkd.config import from_dict
from featkd.distributed import DistInfo
from featkd.errors import ConfigError
from featkd.methods import METHODS
from featkd.methods.base import Batch, BuildContext, RunContext
from featkd.methods.kda.distiller import KDA, NORMALIZED_WEIGHT, OFFICIAL_WEIGHT, KDAConfig, kda_loss
from featkd.methods.kda.landmarks import kernel, kernel_diagnostics, kmeans, nystrom, pool_to_vector
from tests.helpers import tiny_context


def make(ctx, **options) -> KDA:
    return KDA(from_dict(KDAConfig, options, "method"), ctx)


def run_context(d: KDA, messages: list[str]) -> RunContext:
    """A real single-process RunContext for hooks that need no data (accumulating strategies)."""
    return RunContext(teacher=None, student=torch.nn.Linear(1, 1), teacher_capture=None, student_capture=None,
                      data=None, device=torch.device("cpu"), dist=DistInfo(), epochs=10, steps_per_epoch=1,
                      log=messages.append)


def batch_of(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, epoch: int) -> Batch:
    n = len(y)
    return Batch(torch.zeros(n, 1, 4, 4), y, torch.zeros(n, 3), {"fc:input": s}, torch.zeros(n, 3),
                 {"fc:input": t}, epoch=epoch)


def test_both_loss_forms_by_hand():
    k_s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    k_t = torch.tensor([[1.0, 0.0], [3.0, 6.0]])
    # differences 0, 2, 0, -2: smooth-L1 (beta 1) is |x| - 0.5 = 1.5 for |x| = 2 -> sum 3; ||k_t||_F = sqrt 46
    assert kda_loss(k_s, k_t, "official").item() == pytest.approx(3 / math.sqrt(46), rel=1e-6)
    assert kda_loss(k_s, k_t, "normalized").item() == pytest.approx(3 / math.sqrt(46) / 2, rel=1e-6)
    # beta 4: all |x| < 4 -> 0.5 x^2 / 4 = 0.5 each -> sum 1
    assert kda_loss(k_s, k_t, "official", beta=4.0).item() == pytest.approx(1 / math.sqrt(46), rel=1e-6)


def test_normalized_form_is_size_invariant_and_the_official_grows_like_sqrt_nm():
    g = torch.Generator().manual_seed(0)
    k_s, k_t = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    big_s, big_t = k_s.repeat(4, 2), k_t.repeat(4, 2)  # n x4, m x2: sqrt(nm) grows x sqrt 8
    assert kda_loss(big_s, big_t, "normalized").item() == pytest.approx(kda_loss(k_s, k_t).item(), rel=1e-5)
    ratio = kda_loss(big_s, big_t, "official").item() / kda_loss(k_s, k_t, "official").item()
    assert ratio == pytest.approx(math.sqrt(8), rel=1e-5)
    assert math.isclose(NORMALIZED_WEIGHT, OFFICIAL_WEIGHT * 160)  # equal at batch 256, 100 classes


def test_distiller_loss_by_hand_with_different_widths_and_warmup():
    ctx = tiny_context(s_width=2, t_width=3)  # 3 classes
    d = make(ctx, loss_form="official", warmup_epochs=2)
    assert d.weight == OFFICIAL_WEIGHT
    assert (d.s_point, d.t_point) == ("fc:input", "fc:input")
    assert d.s_centres.shape == (3, 2) and d.t_centres.shape == (3, 3)
    cs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ct = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    s = np.array([[0.5, 1.0], [2.0, 0.0]])
    t = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1])
    batch = batch_of(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), y, epoch=2)
    assert d.loss(batch)["kda"].item() == 0.0  # no centres yet: off even after the warm-up
    with torch.no_grad():
        d.s_centres.copy_(torch.tensor(cs))
        d.t_centres.copy_(torch.tensor(ct))
        d.has_centre.fill_(True)
    k_s, k_t = s @ cs.T, t @ ct.T
    diff = np.abs(k_s - k_t)
    huber = np.where(diff < 1, 0.5 * diff**2, diff - 0.5).sum()
    expected = OFFICIAL_WEIGHT * huber / np.linalg.norm(k_t)
    assert d.loss(batch)["kda"].item() == pytest.approx(expected, rel=1e-5)
    early = batch_of(batch.student_features["fc:input"], batch.teacher_features["fc:input"], y, epoch=1)
    assert d.loss(early)["kda"].item() == 0.0  # warm-up epoch
    # only landmarks with a centre take part: m' = 2 columns
    d.has_centre[2] = False
    huber2 = np.where(diff[:, :2] < 1, 0.5 * diff[:, :2] ** 2, diff[:, :2] - 0.5).sum()
    assert d.loss(batch)["kda"].item() == pytest.approx(OFFICIAL_WEIGHT * huber2 / np.linalg.norm(k_t[:, :2]),
                                                        rel=1e-5)
    # the normalized default form and its default weight
    n = make(ctx)
    n.load_state_dict(d.state_dict())
    n.has_centre.fill_(True)
    n.cfg.warmup_epochs = 0
    assert n.weight == NORMALIZED_WEIGHT
    assert n.loss(batch)["kda"].item() == pytest.approx(NORMALIZED_WEIGHT * huber / np.linalg.norm(k_t) / math.sqrt(6),
                                                        rel=1e-5)


def test_gradient_reaches_the_student_features_only():
    ctx = tiny_context(s_width=2, t_width=3)
    d = make(ctx, warmup_epochs=0)
    with torch.no_grad():
        d.s_centres.normal_()
        d.t_centres.normal_()
        d.has_centre.fill_(True)
    s = torch.randn(4, 2, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    d.loss(batch_of(s, t, torch.tensor([0, 1, 2, 0]), epoch=0))["kda"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert d.s_centres.grad is None  # buffers, never trained


def test_class_sums_every_epoch_empty_class_keeps_its_centre_and_is_reported():
    ctx = tiny_context(s_width=2, t_width=3)
    d = make(ctx, warmup_epochs=0)
    messages: list[str] = []
    rc = run_context(d, messages)
    g = torch.Generator().manual_seed(1)
    # epoch 0: all three classes
    s0, t0, y0 = torch.randn(6, 2, generator=g), torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    d.has_centre.fill_(True)  # pretend an eval pass gave centres, so the term is on
    d.loss(batch_of(s0[:3], t0[:3], y0[:3], 0))
    d.loss(batch_of(s0[3:], t0[3:], y0[3:], 0))
    d.on_epoch_end(0, rc)
    for c in range(3):
        torch.testing.assert_close(d.s_centres[c], s0[y0 == c].mean(0))
        torch.testing.assert_close(d.t_centres[c], t0[y0 == c].mean(0))
    assert d.counts.sum() == 0 and d.s_sums.abs().sum() == 0  # reset for the next epoch
    assert d.metrics()["kda_empty_landmarks"] == 0 and d.metrics()["kda_active"] == 1.0
    kept = d.s_centres[2].clone()
    # epoch 1: class 2 absent -> keeps its centre, reported in metrics and the log
    d.on_epoch_start(1, rc)
    s1, t1 = torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g)
    y1 = torch.tensor([0, 1, 1, 0])
    d.loss(batch_of(s1, t1, y1, 1))
    d.on_epoch_end(1, rc)
    torch.testing.assert_close(d.s_centres[2], kept)
    torch.testing.assert_close(d.s_centres[1], s1[1:3].mean(0))
    assert d.metrics()["kda_empty_landmarks"] == 1.0
    assert any("1 of 3 landmarks got no example in epoch 2" in m and "[2]" in m for m in messages), messages
    assert torch.isfinite(d.s_centres).all() and torch.isfinite(d.t_centres).all()


def test_kernels_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(kernel(a, b, "linear"), torch.tensor([[8.0], [0.0]]))
    torch.testing.assert_close(kernel(a, b, "cosine"), torch.tensor([[0.8], [0.0]]))
    # squared distances 9 + 4 = 13 and 1 + 4 = 5
    torch.testing.assert_close(kernel(a, b, "rbf", gamma=0.1), torch.exp(torch.tensor([[-1.3], [-0.5]])))
    assert pool_to_vector(torch.ones(2, 3, 4, 4) * torch.arange(3.0).view(1, 3, 1, 1)).tolist() == [[0, 1, 2]] * 2


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(x, 3, iters=50, seed=3)
    for c in centres:
        assert (found - c).norm(dim=1).min() < 0.1
    torch.testing.assert_close(found, kmeans(x, 3, iters=50, seed=3), rtol=0, atol=0)
    with pytest.raises(ValueError):
        kmeans(x[:2], 3, iters=5, seed=0)


def test_nystrom_is_exact_when_landmarks_span_the_features_and_diagnostics_add_up():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(20, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)  # 4 generic landmarks span R^3
    torch.testing.assert_close(nystrom(f @ c.T, c @ c.T), f @ f.T)
    same = kernel_diagnostics(f, f, c, c)
    assert same["full_diff"] == 0 and same["partial_diff"] == 0 and same["nystrom_error_teacher"] < 1e-9
    f_s = torch.randn(20, 5, generator=g, dtype=torch.float64)
    c_s = torch.randn(2, 5, generator=g, dtype=torch.float64)  # 2 landmarks cannot span R^5
    diag = kernel_diagnostics(f, f_s, c[:2], c_s)
    k_s = f_s @ f_s.T
    expected_err = torch.linalg.matrix_norm(k_s - nystrom(f_s @ c_s.T, c_s @ c_s.T)).item()
    assert diag["nystrom_error_student"] == pytest.approx(expected_err, rel=1e-9) and expected_err > 0
    assert diag["full_diff"] == pytest.approx(torch.linalg.matrix_norm(f @ f.T - k_s).item(), rel=1e-9)
    assert diag["full_diff"] <= diag["triangle_bound"] + 1e-9


def test_options_are_checked():
    ctx = tiny_context()
    with pytest.raises(ConfigError, match=r"method\.weight: must be >= 0"):
        make(ctx, weight=-1.0)
    with pytest.raises(ConfigError, match=r"method\.num_landmarks: 'class-means' has one landmark per class"):
        make(ctx, num_landmarks=5)
    with pytest.raises(ConfigError, match=r"method\.landmarks: 'kmean' is not allowed"):
        make(ctx, landmarks="kmean")
    assert make(ctx, landmarks="kmeans", num_landmarks=7).t_centres.shape == (7, 3)
    assert KDA.rank_local_buffers == ("t_sums", "s_sums", "counts")
    assert METHODS.get("kda") is KDA


@pytest.mark.parametrize(("teacher", "student", "points"), [
    ("torchvision:resnet18", "torchvision:mobilenet_v2", ("fc:input", "classifier.1:input")),
    ("resnet20", "mobilenetv2", ("fc:input", None)),
])
def test_default_feature_is_the_classifier_input_for_any_model(teacher, student, points):
    from featkd.capture.capture import CapturingModel
    from featkd.models import classifier_name, create_model

    t = create_model(teacher, num_classes=10, in_channels=3).eval()
    s = create_model(student, num_classes=10, in_channels=3)
    d = make(BuildContext(t, s, (3, 32, 32), 10, torch.device("cpu")), warmup_epochs=0)
    assert d.t_point == points[0]
    assert d.s_point == (points[1] or f"{classifier_name(s)}:input")
    x = torch.randn(4, 3, 32, 32)
    _, ft = CapturingModel(t, d.teacher_points, x)(x)
    logits, fs = CapturingModel(s, d.student_points, x)(x)
    with torch.no_grad():
        d.t_centres.normal_()
        d.s_centres.normal_()
        d.has_centre.fill_(True)
    loss = d.loss(Batch(x, torch.tensor([0, 1, 2, 3]), logits, fs, None, ft))["kda"]
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
