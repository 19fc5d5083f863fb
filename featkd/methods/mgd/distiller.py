"""Matching Guided Distillation (Yue, Deng & Zhou, ECCV 2020; official code github.com/KaiyuYue/mgd).

Not to be confused with *Masked Generative Distillation* (Yang et al. 2022), also abbreviated MGD: this is
:class:`MatchingGuidedDistiller`, registered as ``mgd``.

Instead of a learned adapter from student to teacher channels, every teacher channel is *assigned* to a
student channel by a linear assignment on a channel-to-channel distance; the teacher channels assigned to one
student channel are *reduced* to a single target map, and the student (through a trainable per-channel
BatchNorm2d that is not part of the exported student) is pulled towards it. Training alternates (coordinate
descent): fix the weights and solve the assignment, then fix the assignment and train for N epochs/steps.

For each pair ``[student_point, teacher_point]`` (pre-ReLU features of equal spatial size; the residual sum
``layerK.J.add`` of a CIFAR/torchvision ResNet) and one training batch of size B::

    s = BN_i(student feature)                             (B, sc, H, W), BN_i trainable, in the distiller
    t, m = reducer(teacher feature, groups_i, margins_i)  (B, sc, H, W), margin (1 or B, sc, 1 or H, 1 or W)
    t = max(t, m)                                         margin-ReLU on the target (OFD, Heo et al. 2019)
    L_i = sum((s - t)^2 * ((s > t) | (t > 0)))            partial L2 over B, sc, H, W
    loss = sum_i w_i * L_i / (B * normalizer)             w_i = 1 / 2^(L-1-i) by default

Which parts are whose:

* **paper / official code**: the cost (mean over images of ``2 - 2 cos`` between spatially normalised maps,
  raw student features, both nets in eval mode), the balanced stacked assignment for ``tc % sc == 0``, the
  reducers AMP (absolute max, sign kept, group margin = mean of its margins; the official code lacked the
  ``abs`` until March 2021, ``amp_absolute: false`` restores that), RD and SM, the student-side BN (a
  SyncBatchNorm under ``train.sync_batchnorm`` on CUDA, as the official ``--sync-bn`` makes it), the
  margins from the teacher BN that precedes the feature (``m - s * phi(m/s) / Phi(-m/s)`` if
  ``Phi(-m/s) > 1e-3`` else ``-3 s``, with s = |gamma|, m = beta), the partial L2, the stage weights, the
  ``/ batch / 1e4`` normaliser, ~20k images for the statistics, drawn anew (shuffled) at every matching
  update (``stats_subset: redraw``, the default), the Hinton term with T = 1.5.
* **ours** (the official code does not do these, or does them differently): non-divisible widths keep every
  teacher channel (``tc % sc`` student channels take one more, chosen optimally; the official code drops
  the highest-index teacher channels); a wider student is supported (``wide_student``; the official code
  crashes); statistics are accumulated per DDP shard and all-reduced (official: every rank sees the same
  images and rank 0's solution is broadcast); the redrawn subset of update u comes from a generator seeded
  by (``train.seed``, u), the same on every rank (each then takes its shard) and repeated on resume (u is the
  checkpointed ``updates`` buffer; official: a shuffled DataLoader, not repeated on resume); ``stats_subset:
  fixed`` uses one seeded subset for every update instead; the matching is a persistent buffer, saved in every
  checkpoint and restored on resume (official: recomputed); margins are computed from the *loaded*
  teacher; where no BatchNorm precedes a feature (pre-activation WRN blocks, post-ReLU points) the margin
  is the measured mean of the negative teacher responses E[t | t < 0] (the quantity the BN formula
  estimates under a Gaussian assumption) instead of the following BN OFD uses for WRNs; RD's margin is the
  margin of the teacher channel actually drawn for each element (``rd_margin: member``; the official code
  draws an independent random member per channel, ``rd_margin: random``); optional adaptive-average-pool
  resizing of the teacher map (``resize_teacher``; default: a clear error, like the official code, which
  never resizes); iteration-based update schedules.

See ``docs/methods/mgd.md`` for every option, the commands and the measured evidence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from featkd.capture.trace import preceding_batchnorm
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig, RunContext
from featkd.methods.common import check_spatial, resize_like, use_pairs
from featkd.methods.mgd.matching import (
    Matching,
    StageStatistics,
    all_reduce_statistics,
    default_matching,
    solve_matching,
)

if TYPE_CHECKING:
    from featkd.data import Loader

#: official cut-off of the BN margin: below this probability of a negative response the margin is -3 s
MARGIN_MIN_NEGATIVE_PROBABILITY = 1e-3
#: official fallback margin, in units of the BN scale |gamma|
MARGIN_FALLBACK_SIGMAS = 3.0
#: official global normaliser (ImageNet, 224 px): MGD term = sum / batch / 1e4
OFFICIAL_NORMALIZER = 1e4
#: stage weight x student elements per image of every stage in the official ResNet-50 -> MobileNetV1 run at
#: 224 px: 128x56x56 / 8 = 256x28x28 / 4 = 512x14x14 / 2 = 1024x7x7 = 50,176 (the weights 1/2^(L-1-i)
#: exactly compensate the halving of the element count per stage); normalizer "scaled" keeps this ratio
OFFICIAL_WEIGHTED_ELEMENTS_PER_STAGE = 50176.0
#: separates the statistics-subset stream (seed, update index) from the other streams drawn from the run's seed
STATS_SUBSET_STREAM = 0x6D676473


@dataclass
class MatchingGuidedConfig(DistillerConfig):
    """Options of ``method: {name: mgd, ...}``. Defaults are the official code's unless marked *ours*."""

    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...], shallow first
    reducer: Literal["amp", "rd", "sm"] = "amp"  # official default: amp
    # stage i of L is multiplied by stage_weights[i]; null = official 1 / 2^(L-1-i) (1/4, 1/2, 1 for L = 3)
    stage_weights: list[float] | None = None
    # MGD term = sum_i w_i L_i / (batch * normalizer); official 1e4, tuned for 224 px ImageNet maps. "scaled"
    # (ours): 1e4 x (mean over stages of w_i x student elements per image) / 50,176, i.e. the per-element
    # weight of the official ResNet-50 -> MobileNetV1 run (625 for ResNet-8 at 28 px, 51 at 8 px; see docs)
    normalizer: float | Literal["scaled"] = OFFICIAL_NORMALIZER
    kd_temperature: float = 1.5  # official T for the optional Hinton term (kd_weight > 0; official weight 1)
    stats_images: int | None = 20000  # images of the training split per matching update (official ~20k); null = all
    # which stats_images: "redraw" (official: a new shuffled draw at every update, seeded by (train.seed, update
    # index)); "fixed" (the same seeded subset at every update)
    stats_subset: Literal["redraw", "fixed"] = "redraw"
    stats_batch_size: int | None = None  # batch of the statistics pass; null = data.eval_batch_size
    # re-solve every N epochs/steps after the initial solve; 0 = solve once (official 1); in epochs, scaled by a
    # shortened protocol
    update_every: int = field(default=1, metadata={"epoch_count": ("update_unit", "epoch")})
    update_unit: Literal["epoch", "step"] = "epoch"  # ours: "step" for iteration schedules
    wide_student: Literal["subset", "share"] = "subset"  # ours: the rule when a student stage is wider
    margin: Literal["bn", "empirical"] = "bn"  # bn: official formula (empirical where no BN precedes); ours
    amp_absolute: bool = True  # AMP picks argmax |t| (official since 2021-03); false: argmax t (older code)
    rd_margin: Literal["member", "random"] = "member"  # ours: margin of the drawn member; random: official
    resize_teacher: bool = False  # ours: adaptive-average-pool teacher maps to the student's size
    plots: bool = False  # ours: write matching.json and heatmaps to OUT/matching/update-N/ at every update

    def validate(self, path: str = "method") -> None:
        if not isinstance(self.normalizer, str) and (self.normalizer <= 0 or not math.isfinite(self.normalizer)):
            raise ConfigError(f"{path}.normalizer: must be a positive number, got {self.normalizer!r}")
        if self.update_every < 0:
            raise ConfigError(f"{path}.update_every: must be >= 0 (0 = solve once), got {self.update_every}")
        if self.stats_images is not None and self.stats_images < 1:
            raise ConfigError(f"{path}.stats_images: must be null or >= 1, got {self.stats_images}")
        if self.stats_batch_size is not None and self.stats_batch_size < 1:
            raise ConfigError(f"{path}.stats_batch_size: must be null or >= 1, got {self.stats_batch_size}")
        if self.stage_weights is not None:
            if len(self.stage_weights) != len(self.pairs):
                raise ConfigError(f"{path}.stage_weights: {len(self.stage_weights)} weights for "
                                  f"{len(self.pairs)} pairs")
            if any(w < 0 or not math.isfinite(w) for w in self.stage_weights):
                raise ConfigError(f"{path}.stage_weights: must be finite and >= 0, got {self.stage_weights}")


# ---------------------------------------------------------------------------------------------------------
# margins, reducers, loss (pure functions)
# ---------------------------------------------------------------------------------------------------------


def bn_margins(weight: Tensor, bias: Tensor) -> Tensor:
    """Expected value of the negative part of N(beta, gamma^2), per channel (OFD's margin).

    ``margin = m - s * phi(m/s) / Phi(-m/s)`` with s = |gamma|, m = beta, if ``Phi(-m/s) > 1e-3``, else
    ``-3 s``. Shapes: (C,), (C,) -> (C,) float32. Computed in float64; s is clamped to 1e-12 so that a zero
    gamma gives the limit (m for m < 0, ~0 otherwise) instead of a division by zero.
    """
    s = weight.detach().double().abs().clamp(min=1e-12)
    m = bias.detach().double()
    z = m / s
    p_neg = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    margin = m - s * pdf / p_neg.clamp(min=1e-300)
    margin = torch.where(p_neg > MARGIN_MIN_NEGATIVE_PROBABILITY, margin, -MARGIN_FALLBACK_SIGMAS * s)
    return margin.float()


def gather_groups(teacher: Tensor, groups: Tensor) -> Tensor:
    """(B, tc, H, W) and groups (sc, g) -> (B, sc, g, H, W): the teacher maps of each student's group."""
    b, _, h, w = teacher.shape
    sc, g = groups.shape
    return teacher.index_select(1, groups.reshape(-1)).view(b, sc, g, h, w)


def valid_members(groups: Tensor, sizes: Tensor) -> Tensor:
    """(sc, g) bool: which entries of the padded ``groups`` are real teacher channels."""
    return torch.arange(groups.shape[1], device=groups.device).unsqueeze(0) < sizes.unsqueeze(1)


def group_mean_margin(margins: Tensor, groups: Tensor, sizes: Tensor) -> Tensor:
    """Mean margin of each group: (tc,), (sc, g), (sc,) -> (1, sc, 1, 1)."""
    valid = valid_members(groups, sizes)
    total = (margins[groups] * valid).sum(1)
    return (total / sizes.clamp(min=1)).view(1, -1, 1, 1)


def reduce_amp(teacher: Tensor, groups: Tensor, sizes: Tensor, margins: Tensor,
               absolute: bool = True) -> tuple[Tensor, Tensor]:
    """Absolute Max Pooling: per element, the group member with the largest |t|, its sign kept.

    Shapes: teacher (B, tc, H, W), groups (sc, g), sizes (sc,), margins (tc,) -> target (B, sc, H, W),
    margin (1, sc, 1, 1) = mean of the group's margins. ``absolute=False``: argmax of t (pre-2021 code).
    Ties go to the lower position in the group. Vectorised over channels and elements; the loop runs over
    the g positions of a group (g = ceil(tc / sc), small) because an ``argmax`` over the group dimension
    of a (B, sc, g, H, W) gather is ~15x slower on CPU.
    """
    best = teacher.index_select(1, groups[:, 0])
    if groups.shape[1] == 1:
        return best, margins[groups[:, 0]].view(1, -1, 1, 1)
    score = best.abs() if absolute else best
    for p in range(1, groups.shape[1]):
        cand = teacher.index_select(1, groups[:, p])
        cand_score = cand.abs() if absolute else cand
        better = (cand_score > score) & (sizes > p).view(1, -1, 1, 1)  # padding never wins
        best = torch.where(better, cand, best)
        score = torch.where(better, cand_score, score)
    return best, group_mean_margin(margins, groups, sizes)


def reduce_rd(teacher: Tensor, groups: Tensor, sizes: Tensor, margins: Tensor,
              margin_mode: Literal["member", "random"] = "member", generator: torch.Generator | None = None,
              uniform: bool = False) -> tuple[Tensor, Tensor]:
    """Random Drop: per element (n, j, y, x) a uniformly random member of group j, redrawn every call.

    Shapes: teacher (B, tc, H, W) -> target (B, sc, H, W); margin (B, sc, H, W) for ``member`` (the margin
    of the member drawn for that element) or (1, sc, 1, 1) for ``random`` (official: an independent random
    member's margin per channel). Student channels with an empty group draw position 0 (masked by the loss).
    ``uniform=True`` promises that every group is full (``sizes == g``, i.e. tc % sc == 0), which allows one
    ``randint`` instead of a scaled ``rand``.
    """
    b, _, h, w = teacher.shape
    sc, g = groups.shape
    if g == 1:
        return reduce_sm(teacher, groups, margins)
    dev = teacher.device
    count = sizes.clamp(min=1).view(1, sc, 1, 1)
    if uniform:  # every group holds g members: one randint
        pick = torch.randint(g, (b, sc, h, w), device=dev, generator=generator)
    else:  # (B, sc, H, W), uniform over each group's valid positions
        u = torch.rand((b, sc, h, w), device=dev, generator=generator)
        pick = torch.minimum((u * count).long(), count - 1)
    target = teacher.index_select(1, groups[:, 0])
    member_margin = margins[groups[:, 0]].view(1, sc, 1, 1)
    for p in range(1, g):  # loop over group positions (g small), vectorised over channels and elements
        chosen = pick == p
        target = torch.where(chosen, teacher.index_select(1, groups[:, p]), target)
        if margin_mode == "member":
            member_margin = torch.where(chosen, margins[groups[:, p]].view(1, sc, 1, 1), member_margin)
    if margin_mode == "member":
        return target, member_margin
    per_channel = torch.minimum((torch.rand(sc, device=dev, generator=generator) * count.view(sc)).long(),
                                count.view(sc) - 1)
    member = groups.gather(1, per_channel.unsqueeze(1)).squeeze(1)
    return target, margins[member].view(1, sc, 1, 1)


def reduce_sm(teacher: Tensor, groups: Tensor, margins: Tensor) -> tuple[Tensor, Tensor]:
    """Sparse Matching: the single matched teacher channel. (B, tc, H, W), (sc, 1) -> (B, sc, H, W), (1, sc, 1, 1)."""
    index = groups[:, 0]
    return teacher.index_select(1, index), margins[index].view(1, -1, 1, 1)


class _MaskedSquaredError(torch.autograd.Function):
    """``sum((keep * (s - t))^2)`` with ``keep = (s > t) | (t > 0) [& channel mask]``, gradient 2 keep (s - t).

    One fused forward (the masked difference is computed once and reused by the backward) instead of
    autograd's chain of sub/pow/mul/sum: ~40 % less time for this term on CPU. ``t`` carries no gradient.
    """

    @staticmethod
    def forward(ctx, student: Tensor, target: Tensor, channel_mask: Tensor | None) -> Tensor:
        d = student - target
        keep = (d > 0) | (target > 0)
        if channel_mask is not None:
            keep &= channel_mask.view(1, -1, 1, 1)
        d.mul_(keep)
        ctx.save_for_backward(d)
        flat = d.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (d,) = ctx.saved_tensors
        return d * (2.0 * grad), None, None


def partial_l2(student: Tensor, target: Tensor, margin: Tensor, channel_mask: Tensor | None = None) -> Tensor:
    """OFD's distillation loss, summed: ``sum((s - t)^2 * ((s > t) | (t > 0)))`` with ``t = max(target, margin)``.

    Where the teacher is negative (t <= 0 after the margin-ReLU) a student below it is not penalised.
    Shapes: student, target (B, C, H, W); margin broadcastable to them; channel_mask (C,) bool or None
    (False: the channel has no target and adds nothing). Returns a scalar (float32).
    """
    t = torch.maximum(target.detach().float(), margin.float())
    return _MaskedSquaredError.apply(student.float(), t, channel_mask)


def official_stage_weights(num_stages: int) -> list[float]:
    """1 / 2^(L-1-i): the deepest stage 1, each shallower one half of the next (official ``loss_factors``)."""
    return [1.0 / 2 ** (num_stages - 1 - i) for i in range(num_stages)]


# ---------------------------------------------------------------------------------------------------------
# the distiller
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StageInfo:
    """Static description of one distilled pair."""

    student_point: str
    teacher_point: str
    student_channels: int
    teacher_channels: int
    size: tuple[int, int]  # (H, W) of the student map (the teacher map is resized to it if enabled)
    margin_source: str  # name of the teacher BN, or "empirical"


@register("mgd")
class MatchingGuidedDistiller(Distiller):
    """Matching Guided Distillation (see the module docstring).

    Persistent buffers per stage i (saved in checkpoints, restored on resume): ``stage{i}_groups`` (sc, g)
    teacher channels of each student channel, ``stage{i}_sizes`` (sc,), ``stage{i}_margins`` (tc,);
    ``solved`` (bool) and ``updates`` (int). The (sc, tc) mean cost of the last solve of every stage is in
    the extra state (also checkpointed) rather than a buffer, so DDP does not broadcast it every step
    (every rank computes the same one from the all-reduced sums).
    """

    Config = MatchingGuidedConfig

    def __init__(self, cfg: MatchingGuidedConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: MatchingGuidedConfig = cfg
        self.pairs, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        self.rule = "one_to_one" if cfg.reducer == "sm" else "balanced"
        self.stage_weights = list(cfg.stage_weights or official_stage_weights(len(self.pairs)))
        if len(self.stage_weights) != len(self.pairs):
            raise ConfigError(f"method.stage_weights: {len(self.stage_weights)} weights for {len(self.pairs)} pairs")
        self.stages: list[StageInfo] = []
        self.norms = nn.ModuleList()
        for i, (s, t) in enumerate(self.pairs):
            check_spatial(s, s_shapes[s], t, t_shapes[t], cfg.resize_teacher)
            sc, tc = s_shapes[s][0], t_shapes[t][0]
            self.stages.append(StageInfo(s, t, sc, tc, tuple(s_shapes[s][1:]), "empirical"))
            self.norms.append(nn.BatchNorm2d(sc))
            init = default_matching(sc, tc, self.rule, cfg.wide_student)
            self.register_buffer(f"stage{i}_groups", torch.from_numpy(init.groups.copy()))
            self.register_buffer(f"stage{i}_sizes", torch.from_numpy(init.sizes.copy()))
            self.register_buffer(f"stage{i}_margins", torch.zeros(tc))
        self.costs = [torch.zeros(st.student_channels, st.teacher_channels) for st in self.stages]  # CPU
        self.normalizer = self.resolve_normalizer()
        self.register_buffer("solved", torch.zeros((), dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._last: dict[str, float] = {}
        if ctx.teacher is not None:
            self.refresh_bn_margins(ctx.teacher)

    def resolve_normalizer(self) -> float:
        """The numeric normaliser: the configured number, or for ``"scaled"`` the official 1e4 scaled by the
        weighted student elements per stage relative to the official 224 px run (see the Config)."""
        if not isinstance(self.cfg.normalizer, str):
            return float(self.cfg.normalizer)
        weighted = [w * st.student_channels * st.size[0] * st.size[1]
                    for w, st in zip(self.stage_weights, self.stages, strict=True)]
        return OFFICIAL_NORMALIZER * (sum(weighted) / len(weighted)) / OFFICIAL_WEIGHTED_ELEMENTS_PER_STAGE

    # ---- buffers --------------------------------------------------------------------------------------
    def _buf(self, i: int, name: str) -> Tensor:
        return getattr(self, f"stage{i}_{name}")

    def matching(self, i: int) -> Matching:
        """Stage i's current matching as numpy arrays."""
        return Matching(self._buf(i, "groups").cpu().numpy().copy(), self._buf(i, "sizes").cpu().numpy().copy(),
                        self.stages[i].teacher_channels)

    def refresh_bn_margins(self, teacher: nn.Module) -> None:
        """Margins from the BN preceding each teacher point, from the teacher's *current* weights.

        Stages without such a BN (or all stages with ``margin: empirical``) keep their margins, which the
        next statistics pass measures.
        """
        for i, st in enumerate(self.stages):
            if self.cfg.margin != "bn":
                continue
            bn = preceding_batchnorm(teacher, st.teacher_point)
            if bn is None or bn.weight is None or bn.num_features != st.teacher_channels:
                st.margin_source = "empirical"
                continue
            st.margin_source = next(n for n, m in teacher.named_modules() if m is bn)
            self._buf(i, "margins").copy_(bn_margins(bn.weight, bn.bias))

    # ---- statistics and assignment ----------------------------------------------------------------------
    def _teacher_map(self, i: int, t: Tensor) -> Tensor:
        return resize_like(t, self.stages[i].size) if self.cfg.resize_teacher else t

    def stats_seed(self, run_seed: int) -> int:
        """The seed of the next update's subset of ``stats_images`` training images.

        ``redraw``: drawn from (run seed, update index), the index being the ``updates`` buffer (0 for the
        first solve), so every update sees other images, every rank draws the same subset, and a resumed run
        (``updates`` is checkpointed) repeats the subsets of the uninterrupted one. ``fixed``: the run's seed.
        """
        if self.cfg.stats_subset == "fixed":
            return run_seed
        from featkd.data.augment import mix_seed  # featkd.data is heavy to import; loaded by now anyway

        return mix_seed(run_seed, STATS_SUBSET_STREAM, int(self.updates))

    def stats_loader(self, ctx: RunContext) -> Loader:
        """This rank's shard of the next update's statistics images (the training split, eval transforms)."""
        return ctx.train_eval_loader(limit=self.cfg.stats_images, batch_size=self.cfg.stats_batch_size,
                                     seed=self.stats_seed(ctx.seed))

    @torch.no_grad()
    def collect_statistics(self, ctx: RunContext) -> list[StageStatistics]:
        """One pass over (up to ``stats_images`` of) the training split, eval transforms, both nets in eval
        mode, no grad; sums all-reduced over ranks (every rank must call this)."""
        device = ctx.device
        stats = [StageStatistics(st.student_channels, st.teacher_channels, device) for st in self.stages]
        loader = self.stats_loader(ctx)
        for _x, _y, t_out, s_out in ctx.iter_features(loader):
            if t_out is None:
                raise FeatkdError("method mgd needs a teacher")
            for i, st in enumerate(self.stages):
                stats[i].add(s_out[1][st.student_point], self._teacher_map(i, t_out[1][st.teacher_point]))
        all_reduce_statistics(stats, ctx.dist.all_reduce_sum)
        if stats and stats[0].images.item() == 0:
            raise FeatkdError("mgd: the statistics pass saw no image (empty training split?)")
        return stats

    @torch.no_grad()
    def update_matching(self, ctx: RunContext) -> list[dict]:
        """Collect statistics, solve every stage, store the result in the buffers; returns the report rows."""
        t0 = time.perf_counter()
        stats = self.collect_statistics(ctx)
        t1 = time.perf_counter()
        changed = total = 0
        for i, (st, stat) in enumerate(zip(self.stages, stats, strict=True)):
            cost = stat.mean_cost()
            new = solve_matching(cost.cpu().numpy(), self.rule, self.cfg.wide_student)
            if self.solved:
                old = self.matching(i).teacher_assignment()
                now = new.teacher_assignment()
                changed += sum(a != b for a, b in zip(old, now, strict=True))
                total += len(now)
            self._buf(i, "groups").copy_(torch.from_numpy(new.groups))
            self._buf(i, "sizes").copy_(torch.from_numpy(new.sizes))
            self.costs[i] = cost.float().cpu()
            if st.margin_source == "empirical":
                self._buf(i, "margins").copy_(stat.negative_mean().float())
        solve_s = time.perf_counter() - t1
        self.solved.fill_(True)
        self.updates += 1
        images = int(stats[0].images.item())
        self._last = {"mgd_update_s": time.perf_counter() - t0, "mgd_solve_s": solve_s, "mgd_images": images}
        if total:
            self._last["mgd_changed"] = changed / total
        rows = self.report()
        for i, row in enumerate(rows):
            self._last[f"mgd_cost{i}"] = row["mean_cost"]
        costs = " ".join(f"{r['mean_cost']:.4f}" for r in rows)
        moved = f", {100 * self._last['mgd_changed']:.1f}% of teacher channels moved" if total else ""
        ctx.log(f"mgd: matching update {int(self.updates)} on {images} images in "
                f"{self._last['mgd_update_s']:.2f}s (solve {solve_s:.3f}s): mean cost per stage {costs}{moved}")
        if self.cfg.plots and ctx.out_dir is not None:
            from featkd.methods.mgd.report import write_report

            write_report(ctx.out_dir / "matching" / f"update-{int(self.updates)}", self, plots=True)
        return rows

    def report(self) -> list[dict]:
        """One JSON-able object per stage: stage, points, channel counts, assignment, mean_cost, groups."""
        rows = []
        for i, st in enumerate(self.stages):
            m = self.matching(i)
            cost = self.costs[i].double().numpy()
            rows.append({
                "stage": i, "student_point": st.student_point, "teacher_point": st.teacher_point,
                "teacher_channels": st.teacher_channels, "student_channels": st.student_channels,
                "assignment": m.teacher_assignment(), "mean_cost": m.mean_cost(cost),
                "groups": [[int(t) for t in m.groups[j, : m.sizes[j]]] for j in range(m.student_channels)],
                "reducer": self.cfg.reducer, "margin_source": st.margin_source,
                "margins": [round(float(v), 6) for v in self._buf(i, "margins").cpu()],
            })
        return rows

    def get_extra_state(self) -> dict:
        return {"cost": [c.clone() for c in self.costs]}

    def set_extra_state(self, state: dict) -> None:
        self.costs = [c.float().cpu() for c in state["cost"]]

    # ---- life cycle ------------------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        if ctx.teacher is None:
            raise FeatkdError("method mgd needs a teacher")
        self.refresh_bn_margins(ctx.teacher)  # the teacher's weights are loaded by now
        sources = ", ".join(f"{st.teacher_point}<-{st.margin_source}" for st in self.stages)
        ctx.log(f"mgd: reducer {self.cfg.reducer}, stage weights {self.stage_weights}, normalizer "
                f"{self.normalizer:g}; margins {sources}")
        if ctx.resumed and bool(self.solved):
            ctx.log(f"mgd: matching restored from the checkpoint (update {int(self.updates)})")
            return
        self.update_matching(ctx)

    def on_epoch_end(self, epoch: int, ctx: RunContext) -> None:
        every = self.cfg.update_every
        if self.cfg.update_unit == "epoch" and every and (epoch + 1) % every == 0 and epoch + 1 < ctx.epochs:
            self.update_matching(ctx)

    def on_step_end(self, step: int, ctx: RunContext) -> None:
        every = self.cfg.update_every
        last = ctx.epochs * ctx.steps_per_epoch
        if self.cfg.update_unit == "step" and every and (step + 1) % every == 0 and step + 1 < last:
            self.update_matching(ctx)

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    # ---- loss ------------------------------------------------------------------------------------------
    def reduce(self, i: int, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Stage i's target (B, sc, H, W) and margin from the teacher map (B, tc, H, W)."""
        groups, sizes, margins = self._buf(i, "groups"), self._buf(i, "sizes"), self._buf(i, "margins")
        if self.cfg.reducer == "amp":
            return reduce_amp(teacher, groups, sizes, margins, self.cfg.amp_absolute)
        if self.cfg.reducer == "rd":
            st = self.stages[i]
            full = st.teacher_channels % st.student_channels == 0  # balanced groups all of size tc / sc
            return reduce_rd(teacher, groups, sizes, margins, self.cfg.rd_margin, uniform=full)
        return reduce_sm(teacher, groups, margins)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        if not bool(self.solved):
            raise FeatkdError("mgd: no matching yet; setup(ctx) solves the first one before training")
        total = 0.0
        for i, st in enumerate(self.stages):
            s = self.norms[i](batch.student_features[st.student_point])
            t = self._teacher_map(i, batch.teacher_features[st.teacher_point].detach().float())
            target, margin = self.reduce(i, t)
            # only the subset rule for a wider student leaves student channels without a target
            mask = self._buf(i, "sizes") > 0 if st.student_channels > st.teacher_channels else None
            total = total + self.stage_weights[i] * partial_l2(s, target, margin, mask)
        return {"mgd": total / (len(batch.inputs) * self.normalizer)}  # per example (detection has no logits)


__all__ = [
    "MatchingGuidedConfig", "MatchingGuidedDistiller", "bn_margins", "gather_groups", "group_mean_margin",
    "official_stage_weights", "partial_l2", "reduce_amp", "reduce_rd", "reduce_sm",
]
