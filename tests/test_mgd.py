"""Matching Guided Distillation: margins, reducers, loss, life cycle, checkpoints, CLI (small, real runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import norm
from torch import nn

from featkd.capture.capture import CapturingModel
from featkd.config import from_dict
from featkd.data import DataConfig, build_data
from featkd.distributed import DistInfo
from featkd.engine import checkpoint as ckpt
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import METHODS
from featkd.methods.base import Batch, BuildContext, RunContext
from featkd.methods.mgd.distiller import (
    MatchingGuidedDistiller,
    bn_margins,
    official_stage_weights,
    partial_l2,
    reduce_amp,
    reduce_rd,
    reduce_sm,
)
from featkd.models import create_model
from featkd.models.zoo import resolve_weights
from tests.helpers import tiny_context

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
PAIRS = [["layer1.0.add", "layer1.2.add"], ["layer2.0.add", "layer2.2.add"], ["layer3.0.add", "layer3.2.add"]]


def make(ctx: BuildContext, **options) -> MatchingGuidedDistiller:
    cls = METHODS.get("mgd")
    return cls(from_dict(cls.Config, options, "method"), ctx)


def digits_context(student_options: dict | None = None, load_teacher: bool = True) -> BuildContext:
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10, in_channels=1)
    if load_teacher:
        ckpt.load_model_weights(teacher, resolve_weights("zoo:digits-resnet20"))
    student = create_model("resnet8", num_classes=10, in_channels=1, **(student_options or {}))
    return BuildContext(teacher.eval(), student, (1, 8, 8), 10, torch.device("cpu"))


def run_context(build: BuildContext, d: MatchingGuidedDistiller, images: int = 120) -> RunContext:
    data = build_data(DataConfig(dataset="digits", train_subset=images))
    example = torch.zeros(2, 1, 8, 8)
    return RunContext(
        teacher=build.teacher, student=build.student,
        teacher_capture=CapturingModel(build.teacher, d.teacher_points, example),
        student_capture=CapturingModel(build.student, d.student_points, example),
        data=data, device=torch.device("cpu"), dist=DistInfo(), epochs=2, steps_per_epoch=3,
        log=lambda _m: None, eval_batch_size=64,
    )


# ---- margins ------------------------------------------------------------------------------------------------


def scipy_margin(gamma: float, beta: float) -> float:
    s, m = abs(gamma), beta
    if norm.cdf(-m / s) > 1e-3:
        return m - s * norm.pdf(m / s) / norm.cdf(-m / s)
    return -3.0 * s


def test_bn_margins_match_scipy_stats_norm():
    gamma = torch.tensor([1.0, 0.5, -2.0, 0.3, 1.2, 0.05, 2.0, 1.0])
    beta = torch.tensor([0.0, 0.3, -1.0, 1.0, -0.2, 0.2, 7.0, 3.2])  # last two: Phi(-m/s) <= 1e-3 -> -3s
    got = bn_margins(gamma, beta)
    expected = [scipy_margin(g, b) for g, b in zip(gamma.tolist(), beta.tolist(), strict=True)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal mean
    assert got[6].item() == pytest.approx(-6.0) and got[7].item() == pytest.approx(-3.0)
    assert (got < 0).all()  # a mean of negative values
    # gamma = 0: the limit, no division by zero
    zero = bn_margins(torch.tensor([0.0, 0.0]), torch.tensor([-0.5, 0.5]))
    assert zero[0].item() == pytest.approx(-0.5) and abs(zero[1].item()) < 1e-9


def test_margins_come_from_the_loaded_teacher_and_change_when_weights_are_loaded():
    untrained = make(digits_context(load_teacher=False), pairs=PAIRS)
    for i in range(3):  # fresh BN: gamma 1, beta 0 -> the half-normal mean everywhere
        np.testing.assert_allclose(untrained.stage0_margins.numpy() if i == 0 else untrained._buf(i, "margins"),
                                   -math.sqrt(2 / math.pi), rtol=1e-6)
    ctx = digits_context()
    d = make(ctx, pairs=PAIRS)
    for i, bn_name in enumerate(["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"]):
        bn = ctx.teacher.get_submodule(bn_name)
        expected = [scipy_margin(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist(), strict=True)]
        np.testing.assert_allclose(d._buf(i, "margins").numpy(), expected, rtol=1e-5, atol=1e-6)
        assert d.stages[i].margin_source == bn_name
        assert not torch.allclose(d._buf(i, "margins"), untrained._buf(i, "margins"))
    # loading weights into the teacher after building: refresh_bn_margins (called by setup) picks them up
    ctx_late = digits_context(load_teacher=False)
    late = make(ctx_late, pairs=PAIRS)
    ckpt.load_model_weights(ctx_late.teacher, resolve_weights("zoo:digits-resnet20"))
    late.refresh_bn_margins(ctx_late.teacher)
    for i in range(3):
        torch.testing.assert_close(late._buf(i, "margins"), d._buf(i, "margins"))


def test_no_preceding_batchnorm_falls_back_to_the_measured_negative_mean():
    ctx = tiny_context(s_width=2, t_width=3, size=4)  # TinyNet 'conv' has no BN before it
    d = make(ctx, pairs=[["conv", "conv"]])
    assert d.stages[0].margin_source == "empirical"
    data = build_data(DataConfig(dataset="digits", train_subset=50))
    ctx.teacher.conv = torch.nn.Conv2d(1, 3, 3, padding=1)  # 8x8 digits into a fresh tiny teacher
    ctx.student.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    example = torch.zeros(2, 1, 8, 8)
    run = RunContext(ctx.teacher, ctx.student, CapturingModel(ctx.teacher, ["conv"], example),
                     CapturingModel(ctx.student, ["conv"], example), data, torch.device("cpu"), DistInfo(), 1, 1,
                     log=lambda _m: None)
    d.stages[0].size = (8, 8)
    d.update_matching(run)
    x = torch.cat([x for x, _ in data.train_eval_loader(64)])
    with torch.no_grad():
        t = ctx.teacher.conv(x).transpose(0, 1).reshape(3, -1)
    expected = torch.stack([row[row < 0].mean() for row in t])
    torch.testing.assert_close(d.stage0_margins, expected, rtol=1e-5, atol=1e-6)


# ---- reducers: vectorised vs loops --------------------------------------------------------------------------


def random_groups(rng: np.random.Generator, sc: int, tc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced-rule-like grouping with unequal sizes (k or k+1), padded with 0."""
    owner = rng.permutation(np.arange(tc) % sc)
    width = -(-tc // sc)
    groups = np.zeros((sc, width), dtype=np.int64)
    sizes = np.zeros(sc, dtype=np.int64)
    for t in range(tc):
        groups[owner[t], sizes[owner[t]]] = t
        sizes[owner[t]] += 1
    return torch.from_numpy(groups), torch.from_numpy(sizes)


@pytest.mark.parametrize("absolute", [True, False])
def test_amp_equals_a_loop(absolute):
    rng = np.random.default_rng(0)
    b, sc, tc, h, w = 2, 3, 7, 3, 2
    t = torch.tensor(rng.normal(size=(b, tc, h, w)), dtype=torch.float32)
    margins = torch.tensor(rng.normal(size=tc), dtype=torch.float32)
    groups, sizes = random_groups(rng, sc, tc)
    target, margin = reduce_amp(t, groups, sizes, margins, absolute=absolute)
    assert target.shape == (b, sc, h, w) and margin.shape == (1, sc, 1, 1)
    for j in range(sc):
        members = groups[j, : sizes[j]].tolist()
        assert margin[0, j, 0, 0].item() == pytest.approx(float(np.mean([margins[m].item() for m in members])))
        for n, y, x in np.ndindex(b, h, w):
            values = [t[n, m, y, x].item() for m in members]
            best = max(values, key=abs) if absolute else max(values)
            assert target[n, j, y, x].item() == best  # sign kept
    if absolute:  # a negative value of large magnitude wins
        t2 = torch.zeros(1, 2, 1, 1)
        t2[0, 0], t2[0, 1] = 0.5, -2.0
        out, _ = reduce_amp(t2, torch.tensor([[0, 1]]), torch.tensor([2]), torch.zeros(2))
        assert out.item() == -2.0


@pytest.mark.parametrize(("mode", "tc"), [("member", 8), ("random", 8), ("member", 9), ("random", 9)])
def test_rd_draws_a_valid_member_per_element_and_redraws_every_call(mode, tc):
    rng = np.random.default_rng(1)
    b, sc, h, w = 4, 3, 6, 6
    uniform = tc % sc == 0  # 9 = 3 full groups of 3 (the randint path); 8 = groups of 3, 3, 2
    # teacher channel k is the constant k, so the drawn member is readable off the target
    t = torch.arange(tc, dtype=torch.float32).view(1, tc, 1, 1).expand(b, tc, h, w).contiguous()
    margins = -torch.arange(tc, dtype=torch.float32) - 1.0
    groups, sizes = random_groups(rng, sc, tc)
    gen = torch.Generator().manual_seed(0)
    target, margin = reduce_rd(t, groups, sizes, margins, mode, generator=gen, uniform=uniform)
    assert target.shape == (b, sc, h, w)
    for j in range(sc):
        members = set(groups[j, : sizes[j]].tolist())
        drawn = target[:, j].long()
        assert set(drawn.unique().tolist()) == members  # all members appear over 144 draws, nothing else
        if mode == "member":  # the margin of exactly the drawn member, element by element
            torch.testing.assert_close(margin[:, j], -(target[:, j] + 1.0))
    if mode == "random":
        assert margin.shape == (1, sc, 1, 1)
        for j in range(sc):
            assert int(-margin[0, j, 0, 0].item() - 1) in set(groups[j, : sizes[j]].tolist())
    again, _ = reduce_rd(t, groups, sizes, margins, mode, generator=gen, uniform=uniform)
    assert not torch.equal(again, target)  # redrawn every forward
    # uniform: member frequencies over many elements are close to 1/size
    big = torch.arange(tc, dtype=torch.float32).view(1, tc, 1, 1).expand(64, tc, 16, 16).contiguous()
    draws, _ = reduce_rd(big, groups, sizes, margins, mode, generator=gen, uniform=uniform)
    j = int(torch.argmax(sizes))
    freq = torch.bincount(draws[:, j].long().flatten(), minlength=tc).float() / draws[:, j].numel()
    for m in groups[j, : sizes[j]].tolist():
        assert freq[m].item() == pytest.approx(1.0 / sizes[j].item(), abs=0.02)


def test_reducers_coincide_when_every_group_holds_one_channel():
    """Equal widths (ResNet-20 -> ResNet-8 is 16-32-64 on both sides): AMP = RD = SM, matching and loss."""
    ctx = digits_context()
    ds = {r: make(ctx, pairs=PAIRS, reducer=r) for r in ("amp", "rd", "sm")}
    run = run_context(ctx, ds["amp"], images=60)
    rows = {r: d.update_matching(run) for r, d in ds.items()}
    assert rows["amp"][0]["assignment"] == rows["rd"][0]["assignment"] == rows["sm"][0]["assignment"]
    x = torch.cat([x for x, _ in run.data.train_eval_loader(64)])[:4]
    with torch.no_grad():
        _, tf = run.teacher_capture(x)
    _, sf = run.student_capture(x)
    losses = [d.loss(Batch(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 10), sf, torch.zeros(4, 10), tf))
              ["mgd"].item() for d in ds.values()]
    assert losses[0] == losses[1] == losses[2]


def test_sm_selects_the_matched_channel():
    t = torch.randn(2, 5, 3, 3)
    margins = torch.arange(5, dtype=torch.float32)
    groups = torch.tensor([[4], [0], [2]])
    target, margin = reduce_sm(t, groups, margins)
    for j, k in enumerate([4, 0, 2]):
        assert torch.equal(target[:, j], t[:, k])
        assert margin[0, j, 0, 0].item() == k


# ---- loss ---------------------------------------------------------------------------------------------------


def test_partial_l2_against_hand_computation():
    s = torch.tensor([[[[1.0, -2.0], [0.5, -0.1]]]])
    t = torch.tensor([[[[0.5, -1.0], [-3.0, 2.0]]]])
    m = torch.tensor(-0.5).view(1, 1, 1, 1)
    # targets after max(t, m): [0.5, -0.5, -0.5, 2.0]
    # element 0: t > 0 -> (1 - 0.5)^2 = 0.25; element 1: s = -2 < t = -0.5 and t <= 0 -> ignored
    # element 2: s = 0.5 > t = -0.5 -> (1.0)^2 = 1.0; element 3: t > 0 -> (-0.1 - 2)^2 = 4.41
    assert partial_l2(s, t, m).item() == pytest.approx(0.25 + 1.0 + 4.41)
    two = torch.cat([s, s], 1)
    assert partial_l2(two, torch.cat([t, t], 1), m, torch.tensor([True, False])).item() == pytest.approx(5.66)


def test_partial_l2_gradient_equals_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    s = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    m = torch.randn(1, 4, 1, 1, dtype=torch.float64) - 1.0
    mask = torch.tensor([True, True, False, True])
    partial_l2(s, t, m, mask).backward()
    fused = s.grad.clone()
    s.grad = None
    tt = torch.maximum(t, m)
    (((s - tt) ** 2) * (((s > tt) | (tt > 0)) & mask.view(1, -1, 1, 1))).sum().backward()
    torch.testing.assert_close(fused, s.grad, rtol=1e-5, atol=1e-5)  # the fused term runs in float32
    assert (fused[:, 2] == 0).all()


def test_official_stage_weights():
    assert official_stage_weights(4) == [1 / 8, 1 / 4, 1 / 2, 1]
    assert official_stage_weights(3) == [1 / 4, 1 / 2, 1]


def test_scaled_normalizer_keeps_the_official_per_element_weight():
    # ResNet-8 on 8x8 digits: (16*8*8/4 + 32*4*4/2 + 64*2*2) / 3 = 256 weighted elements per stage
    d = make(digits_context(), pairs=PAIRS, normalizer="scaled")
    assert d.normalizer == pytest.approx(1e4 * 256 / 50176)
    assert make(digits_context(), pairs=PAIRS).normalizer == 1e4  # default: the official value
    # the official ResNet-50 -> MobileNetV1 shapes at 224 px give back exactly 1e4
    mobilenet = [128 * 56 * 56, 256 * 28 * 28, 512 * 14 * 14, 1024 * 7 * 7]
    weighted = [w * n for w, n in zip(official_stage_weights(4), mobilenet, strict=True)]
    assert sum(weighted) / 4 == 50176


def test_full_loss_against_numpy(tmp_path):
    ctx = digits_context(student_options={"widths": [12, 24, 48]})
    d = make(ctx, pairs=PAIRS, normalizer=250.0)
    run = run_context(ctx, d)
    d.update_matching(run)
    x = torch.cat([x for x, _ in run.data.train_eval_loader(64)])[:6]
    with torch.no_grad():
        _, t_feats = run.teacher_capture(x)
    _, s_feats = run.student_capture(x)
    batch = Batch(x, torch.zeros(6, dtype=torch.long), torch.zeros(6, 10), s_feats, torch.zeros(6, 10), t_feats)
    got = d.loss(batch)["mgd"]
    expected = 0.0
    for i, ((sp, tp), wgt) in enumerate(zip(PAIRS, [0.25, 0.5, 1.0], strict=True)):
        s = s_feats[sp].detach().numpy().astype(np.float64)
        mu, var = s.mean(axis=(0, 2, 3), keepdims=True), s.var(axis=(0, 2, 3), keepdims=True)
        s = (s - mu) / np.sqrt(var + 1e-5)  # the fresh student-side BN in training mode
        t = t_feats[tp].numpy().astype(np.float64)
        margins = d._buf(i, "margins").numpy()
        m = d.matching(i)
        for j in range(m.student_channels):
            members = m.groups[j, : m.sizes[j]]
            g = t[:, members]
            pick = np.abs(g).argmax(axis=1)
            target = np.take_along_axis(g, pick[:, None], axis=1)[:, 0]
            target = np.maximum(target, margins[members].mean())
            keep = (s[:, j] > target) | (target > 0)
            expected += wgt * (((s[:, j] - target) ** 2) * keep).sum()
    assert got.item() == pytest.approx(expected / (6 * 250.0), rel=1e-4)
    got.backward()
    assert d.norms[0].weight.grad is not None  # the student-side BN trains


# ---- construction, options, errors ---------------------------------------------------------------------------


def test_config_validation_and_spatial_errors():
    ctx = digits_context()
    with pytest.raises(ConfigError, match=r"method.stage_weights: 2 weights for 3 pairs"):
        make(ctx, pairs=PAIRS, stage_weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match=r"method.normalizer"):
        make(ctx, pairs=PAIRS, normalizer=0)
    with pytest.raises(ConfigError, match=r"method.normalizer"):
        make(ctx, pairs=PAIRS, normalizer="auto")
    with pytest.raises(ConfigError, match=r"method.reducer: 'max' is not allowed"):
        make(ctx, pairs=PAIRS, reducer="max")
    with pytest.raises(ConfigError, match=r"method.update_every"):
        make(ctx, pairs=PAIRS, update_every=-1)
    with pytest.raises(FeatkdError, match=r"spatial sizes differ: student 'layer1.0.add' is \(16, 8, 8\), teacher "
                       r"'layer2.2.add' is \(32, 4, 4\); .*method.resize_teacher: true"):
        make(ctx, pairs=[["layer1.0.add", "layer2.2.add"]])
    with pytest.raises(FeatkdError, match=r"no capture point 'layer9.add'"):
        make(ctx, pairs=[["layer9.add", "layer1.2.add"]])


def pool2x2(t: np.ndarray) -> np.ndarray:
    """(B, C, 2H, 2W) -> (B, C, H, W): the mean of each 2x2 block, by hand."""
    b, c, h, w = t.shape
    return t.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def test_resize_teacher_pools_the_teacher_map():
    """Student layer2.0.add (32, 4, 4) <- teacher layer1.2.add (16, 8, 8): the teacher map is 2x2-averaged in
    the statistics pass (cost by hand) and in the loss (partial L2 of the pooled map by hand)."""
    ctx = digits_context()
    d = make(ctx, pairs=[["layer2.0.add", "layer1.2.add"]], resize_teacher=True)
    run = run_context(ctx, d, images=60)
    d.update_matching(run)
    # cost: mean over the 60 images of 2 - 2 cos(raw student map, pooled teacher map)
    cost = np.zeros((32, 16))
    for _x, _y, (_, tf), (_, sf) in run.iter_features(run.data.train_eval_loader(64)):
        s = sf["layer2.0.add"].numpy().astype(np.float64).reshape(len(_x), 32, -1)
        t = pool2x2(tf["layer1.2.add"].numpy().astype(np.float64)).reshape(len(_x), 16, -1)
        s /= np.linalg.norm(s, axis=2, keepdims=True)
        t /= np.linalg.norm(t, axis=2, keepdims=True)
        cost += (2.0 - 2.0 * np.einsum("bsh,bth->bst", s, t)).sum(0)
    np.testing.assert_allclose(d.costs[0].double().numpy(), cost / 60, rtol=1e-5, atol=1e-5)
    # loss: partial L2 of BN(student) against the pooled teacher map of its matched channel
    x = torch.cat([x for x, _ in run.data.train_eval_loader(64)])[:4]
    with torch.no_grad():
        _, tf = run.teacher_capture(x)
    _, sf = run.student_capture(x)
    loss = d.loss(Batch(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 10), sf, torch.zeros(4, 10), tf))["mgd"]
    s = sf["layer2.0.add"].detach().numpy().astype(np.float64)
    s = (s - s.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(s.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    t = pool2x2(tf["layer1.2.add"].numpy().astype(np.float64))
    margins, m = d._buf(0, "margins").numpy(), d.matching(0)
    assert sorted(m.sizes.tolist()) == [0] * 16 + [1] * 16  # wider student: 16 channels without a target
    expected = 0.0
    for j in range(32):
        for k in m.groups[j, : m.sizes[j]]:
            target = np.maximum(t[:, k], margins[k])
            keep = (s[:, j] > target) | (target > 0)
            expected += (((s[:, j] - target) ** 2) * keep).sum()
    assert loss.item() == pytest.approx(expected / (4 * 1e4), rel=1e-5)  # one stage: weight 1, official 1e4


@pytest.mark.parametrize(("reducer", "wide"), [("amp", "subset"), ("rd", "share"), ("sm", "subset"), ("sm", "share")])
def test_any_channel_counts_work(reducer, wide):
    """Non-divisible (16 -> 12) and wider-student (32 -> 48) stages, every reducer, both wide rules."""
    ctx = digits_context(student_options={"widths": [12, 48, 48]})
    d = make(ctx, pairs=PAIRS, reducer=reducer, wide_student=wide)
    run = run_context(ctx, d, images=60)
    rows = d.update_matching(run)
    assert [(r["student_channels"], r["teacher_channels"]) for r in rows] == [(12, 16), (48, 32), (48, 64)]
    a0 = rows[0]["assignment"]
    if reducer == "sm":
        assert sum(a is None for a in a0) == 4  # one-to-one: 4 teacher channels ignored
    else:
        assert None not in a0 and sorted(np.bincount(a0, minlength=12).tolist()) == [1] * 8 + [2] * 4
    a1 = rows[1]["assignment"]
    if wide == "subset":
        assert all(isinstance(a, int) for a in a1) and len(set(a1)) == 32  # 16 student channels free
        assert int((d.stage1_sizes == 0).sum()) == 16
    else:
        assert sorted(x for a in a1 for x in (a if isinstance(a, list) else [a])) == list(range(48))
    x = torch.cat([x for x, _ in run.data.train_eval_loader(64)])[:4]
    with torch.no_grad():
        _, tf = run.teacher_capture(x)
    _, sf = run.student_capture(x)
    loss = d.loss(Batch(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 10), sf, torch.zeros(4, 10), tf))["mgd"]
    loss.backward()
    assert torch.isfinite(loss)
    assert ctx.student.conv1.weight.grad is not None


def test_statistics_subset_is_redrawn_per_update_the_same_on_every_rank_and_after_resume():
    """stats_subset: redraw (default) draws update u's 40 of 120 images with (train.seed, u); fixed: always the
    same seeded subset. Ranks draw the same subset and take its shards; a resumed distiller draws the same."""
    ctx = digits_context()
    pairs = PAIRS[:1]
    redraw, fixed = make(ctx, pairs=pairs, stats_images=40), make(ctx, pairs=pairs, stats_images=40,
                                                                    stats_subset="fixed")
    run = run_context(ctx, redraw, images=120)

    def images(d: MatchingGuidedDistiller, dist: DistInfo | None = None) -> torch.Tensor:
        return torch.cat([x for x, _ in d.stats_loader(replace(run, dist=dist or DistInfo()))])

    seeded = torch.cat([x for x, _ in run.data.train_eval_loader(64, limit=40, seed=run.seed)])
    first = {"redraw": images(redraw), "fixed": images(fixed)}
    assert torch.equal(first["fixed"], seeded) and len(first["redraw"]) == 40
    # two simulated ranks: the same subset, rank r takes its r-th of every 2 images
    for r in (0, 1):
        assert torch.equal(images(redraw, DistInfo(rank=r, world_size=2)), first["redraw"][r::2])
    costs = {}
    for name, d in (("redraw", redraw), ("fixed", fixed)):
        costs[name] = []
        for _ in range(2):  # two consecutive matching updates
            d.update_matching(run)
            costs[name].append(d.costs[0].clone())
            assert d.metrics()["mgd_images"] == 40
    second = images(redraw)  # the subset of the next update (u = 2)
    assert not torch.equal(second, first["redraw"]) and torch.equal(images(fixed), seeded)
    assert not torch.equal(costs["redraw"][0], costs["redraw"][1])  # other images, other statistics
    assert torch.equal(costs["fixed"][0], costs["fixed"][1])  # same images, same models: the same sums
    resumed = make(ctx, pairs=pairs, stats_images=40)
    resumed.load_state_dict(redraw.state_dict())  # the update index is the checkpointed `updates` buffer
    assert torch.equal(images(resumed), second)
    with pytest.raises(ConfigError, match=r"^method.stats_subset: 'random' is not allowed"):
        make(ctx, pairs=pairs, stats_subset="random")


def test_loss_before_any_matching_is_a_clear_error():
    ctx = digits_context()
    d = make(ctx, pairs=PAIRS)
    x = torch.zeros(2, 1, 8, 8)
    run = run_context(ctx, d, images=20)
    with torch.no_grad():
        _, tf = run.teacher_capture(x)
    _, sf = run.student_capture(x)
    with pytest.raises(FeatkdError, match="no matching yet"):
        d.loss(Batch(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, 10), sf, torch.zeros(2, 10), tf))


def test_distiller_state_holds_norms_and_matching_but_not_the_models():
    ctx = digits_context()
    d = make(ctx, pairs=PAIRS)
    keys = set(d.state_dict())
    assert {"stage0_groups", "stage0_sizes", "stage0_margins", "solved", "updates", "_extra_state"} <= keys
    assert "norms.0.weight" in keys and "norms.2.running_var" in keys
    assert not any(k.startswith(("layer", "conv1", "fc")) for k in keys)
    student_params = {id(p) for p in ctx.student.parameters()} | {id(p) for p in ctx.teacher.parameters()}
    assert all(id(p) not in student_params for p in d.parameters())
    assert len(list(d.parameters())) == 6  # weight + bias of 3 BNs


# ---- real short trainings --------------------------------------------------------------------------------------


def write_config(path: Path, method: dict, student_options: dict | None = None, **train) -> Path:
    raw = {
        "name": "mgd-test",
        "data": {"dataset": "digits", "train_subset": 128, "batch_size": 32},
        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"},
        "student": {"model": "resnet8", **({"options": student_options} if student_options else {})},
        "method": {"name": "mgd", "pairs": PAIRS, **method},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "num_threads": 1, "progress": "off", "tensorboard": False, "deterministic": True,
                  **train},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sync_batchnorm_converts_the_distillers_batchnorms_like_the_students(tmp_path, monkeypatch):
    """train.sync_batchnorm under DDP: the distiller's student-side BNs become SyncBatchNorm with the student's
    (built as under torchrun with one process; the CPU is let through SYNC_BATCHNORM_DEVICES, which only
    build_run reads). On the CPU proper nothing is converted."""
    from featkd.config import load_config
    from featkd.engine import build

    cfg = load_config(write_config(tmp_path / "c.yaml", {}, sync_batchnorm=True))
    monkeypatch.setattr(build, "init_distributed",
                        lambda _device: (DistInfo(process_group=True), torch.device("cpu")))
    logs: list[str] = []
    plain = build.build_run(cfg, log=logs.append)
    assert any("train.sync_batchnorm needs CUDA" in m for m in logs)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in [*plain.student.modules(), *plain.distiller.modules()])
    monkeypatch.setattr(build, "SYNC_BATCHNORM_DEVICES", ("cuda", "cpu"))
    run = build.build_run(cfg, log=logs.append)
    norms = [m for m in run.distiller.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(type(m) is nn.SyncBatchNorm for m in norms)
    assert all(type(m) is nn.SyncBatchNorm for m in run.student.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in run.teacher.modules())  # frozen, not synced
    assert run.distiller.state_dict().keys() == plain.distiller.state_dict().keys()  # checkpoints still load


def featkd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_training_saves_the_matching_and_resume_restores_it_exactly(tmp_path):
    """RD (random every forward) over 2 epochs equals 1 epoch + resume: matching, RNG and norms restored.

    The student is half as wide as the teacher (8-16-32 <- 16-32-64), so every student channel has a group of
    two teacher channels and RD really draws (with equal widths it is SM and the RNG never matters)."""
    from featkd.config import load_config
    from featkd.engine.trainer import Trainer

    narrow = [8, 16, 32]
    cfg_path = write_config(tmp_path / "c.yaml", {"reducer": "rd", "update_every": 1},
                            student_options={"widths": narrow})
    logs: list[str] = []
    full = Trainer(load_config(cfg_path), tmp_path / "full", log=logs.append).fit()
    assert full.status == "finished"
    assert sum("matching update" in m for m in logs) == 2  # before epoch 1, after epoch 1 (not after the last)
    part = Trainer(load_config(cfg_path, ["train.stop_after=1"]), tmp_path / "part", log=lambda _m: None).fit()
    assert part.status == "stopped"
    logs2: list[str] = []
    Trainer(load_config(cfg_path), tmp_path / "part", resume=True, log=logs2.append).fit()
    assert any("matching restored from the checkpoint (update 2)" in m for m in logs2)
    assert not any("matching update 1 " in m for m in logs2)  # no silent recompute on resume
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["distiller"].keys() == b["distiller"].keys()
    for k in a["distiller"]:
        torch.testing.assert_close(a["distiller"][k], b["distiller"][k], rtol=0, atol=0, msg=k)
    assert a["distiller"]["_extra_state"]["cost"][0].shape == (8, 16)
    for k in a["student"]:
        torch.testing.assert_close(a["student"][k], b["student"][k], rtol=0, atol=0, msg=k)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])  # the resumed run drew exactly as many
    assert int(a["distiller"]["updates"]) == 2
    # the draws depend on the RNG: with the trained matching (groups of 2), another seed, another target
    d = make(digits_context(student_options={"widths": narrow}), pairs=PAIRS, reducer="rd")
    d.load_state_dict(a["distiller"])
    assert all(tuple(d._buf(i, "groups").shape) == (w, 2) for i, w in enumerate(narrow))
    t = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    draws = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        draws.append(d.reduce(0, t)[0])
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    exported = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    assert not any(k.startswith(("norms", "stage")) for k in exported)  # the BN is not part of the student
    history = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert "mgd_cost0" in history[0] and "mgd_changed" in history[0]


def test_step_schedule_and_plots_during_training(tmp_path):
    from featkd.config import load_config
    from featkd.engine.trainer import Trainer

    cfg_path = write_config(tmp_path / "c.yaml", {"update_every": 2, "update_unit": "step", "plots": True},
                            epochs=1)
    logs: list[str] = []
    Trainer(load_config(cfg_path), tmp_path / "run", log=logs.append).fit()
    # 128 images / 32 = 4 steps: initial solve + after steps 2 (not after the last step 4)
    assert sum("matching update" in m for m in logs) == 2
    for n in (1, 2):
        rows = json.loads((tmp_path / "run" / "matching" / f"update-{n}" / "matching.json").read_text())
        assert [r["stage"] for r in rows] == [0, 1, 2]
        assert (tmp_path / "run" / "matching" / f"update-{n}" / "stage2.png").stat().st_size > 1000


def test_match_cli_writes_json_and_heatmaps_and_keeps_existing_output(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", {"reducer": "amp"},)
    out = tmp_path / "m"
    proc = featkd("match", str(cfg), "--out", str(out), "--images", "64",
                   "--set", "student.options={widths: [12, 24, 48]}")
    assert "stage 0: student layer1.0.add (12 ch) <- teacher layer1.2.add (16 ch)" in proc.stdout
    rows = json.loads((out / "matching.json").read_text())
    assert len(rows) == 3
    for row in rows:
        assert {"stage", "teacher_channels", "student_channels", "assignment", "mean_cost"} <= set(row)
        assert len(row["assignment"]) == row["teacher_channels"]
        assert None not in row["assignment"] and 0 < row["mean_cost"] < 4
        assert (out / f"stage{row['stage']}.png").stat().st_size > 1000
    assert rows[0]["student_channels"] == 12 and max(np.bincount(rows[0]["assignment"])) == 2
    # user errors through the real CLI entry point (in-process: no second interpreter start-up)
    from featkd.cli import main

    before = (out / "matching.json").read_text()
    assert main(["match", str(cfg), "--out", str(out)]) == 2
    assert "exists; choose another --out or pass --force" in capsys.readouterr().err
    assert (out / "matching.json").read_text() == before
    wrong = write_config(tmp_path / "w.yaml", {})
    raw = yaml.safe_load(wrong.read_text())
    raw["method"] = {"name": "kd", "kd_weight": 1.0}
    wrong.write_text(yaml.safe_dump(raw))
    assert main(["match", str(wrong), "--out", str(tmp_path / "x")]) == 2
    assert "featkd: error: method.name: featkd match needs an mgd config" in capsys.readouterr().err


def test_missing_matplotlib_is_a_one_line_error(monkeypatch, tmp_path):
    from featkd.methods.mgd.report import HEATMAPS
    from featkd.plotting import require_pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(FeatkdError, match=r"need matplotlib: pip install matplotlib"):
        require_pyplot(HEATMAPS, "pass --no-plots")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*-mgd-*.yaml")), ids=lambda p: p.stem)
def test_every_mgd_config_builds_its_distiller(path):
    """Config valid, capture points exist, spatial sizes agree (models built without loading weights)."""
    from featkd.config import load_config

    cfg = load_config(path)
    shape = (1, 8, 8) if cfg.data.dataset == "digits" else (1, 28, 28)
    offline = {"weights": None, "weights_backbone": None, "pretrained": False}  # no download: random weights
    teacher = create_model(cfg.teacher.model, num_classes=10, in_channels=1,
                           **{k: offline.get(k, v) for k, v in cfg.teacher.options.items()})
    student = create_model(cfg.student.model, num_classes=10, in_channels=1,
                           **{k: offline.get(k, v) for k, v in cfg.student.options.items()})
    d = make(BuildContext(teacher.eval(), student, shape, 10, torch.device("cpu")), **cfg.method_options())
    assert len(d.stages) == len(cfg.method["pairs"])
