"""KDA: full kernel matrix transfer through Nyström landmarks (Qian, Li, Hu, SDM 2022, arXiv 2009.14416).

Similarity-based distillation (SP, RKD) matches the n x n similarity matrix of a mini-batch. KDA targets the
N x N kernel matrix of the whole training set: with m landmarks, the Nyström method approximates
``K ≈ K_nm K_mm^+ K_nm^T``, and the paper bounds the teacher-student difference of the full matrices by the
difference of the partial ones, ``K_nm`` (examples x landmarks, linear in N). So the loss matches, for each
batch, the n x m kernel values between its examples and the landmarks, each network in its own feature space
(the widths need not match)::

    K_s = k(f_s, C_s)  (n, m, with gradient)      K_t = k(f_t, C_t)  (n, m, no gradient)

What is the official code's (GitHub idstcv/KDA) and what is ours:

* Feature: the input of the classifier (the pooled penultimate embedding), not normalised -- official.
  Any other capture point is allowed (``student_point`` / ``teacher_point``; maps are average-pooled to
  (B, C)) -- ours.
* Kernel ``linear`` (dot product) -- official; ``cosine`` and ``rbf`` (per-network bandwidth
  ``1 / mean squared distance`` to the landmarks) -- ours.
* Landmarks ``class-means``: one per class, the class mean of each network's features in its own space,
  summed over the training forward passes of an epoch (train mode, augmented) and used during the next
  epoch, no gradient through them -- official. Ours: the sums and counts are taken *every* epoch (the
  official code counts in epoch 0 only), are buffers of this module (saved in every checkpoint, so a
  resumed run continues with the same centres instead of the official 0/0 = NaN), and are all-reduced
  across DDP ranks at the end of the epoch. A class with no example in an epoch keeps its previous centre
  and is reported (``kda_empty_landmarks``). ``class-means-fresh``: recomputed at the start of each epoch
  by an eval-mode pass over the training split (ours). ``kmeans``: k-means (k = ``num_landmarks``) of the
  teacher's features of the training split fixes k clusters once; each example belongs to its nearest
  teacher centroid and the landmarks are the per-cluster means in each space, accumulated like
  ``class-means`` (ours; needs no labels). ``random``: ``num_landmarks`` fixed training examples, whose
  features are recomputed in eval mode at the start of each epoch (ours).
* Loss ``official``: ``smooth_l1(K_s, K_t, reduction="sum", beta=1) / ||K_t||_F``, weight 0.04. It grows
  like sqrt(n m) (a sum over n m entries over a norm growing like sqrt(n m)), so its weight is tied to the
  official batch 256 and 100 classes -- and under DDP to the per-rank batch. ``normalized`` (ours, the
  default): the same divided by sqrt(n m), i.e. ``mean(smooth_l1) / rms(K_t)``, size-invariant; its default
  weight 6.4 = 0.04 * sqrt(256 * 100) makes the two forms equal at the official recipe.
* Warm-up: the term is off for the first ``warmup_epochs`` epochs (official: 5). When it must be on before
  any centre was accumulated (warm-up 0, or a strategy that does not accumulate), the centres come from
  an eval-mode pass over the training split at the start of the epoch (ours).
* Objective: CE + weight * KDA, no logit KD -- official; ``kd_weight > 0`` adds Hinton KD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.errors import ConfigError, FeatkdError
from featkd.methods import register
from featkd.methods.base import EPOCH_COUNT, Batch, BuildContext, Distiller, DistillerConfig, RunContext
from featkd.methods.kda.landmarks import (
    EPS,
    accumulate,
    kernel,
    kmeans,
    nearest,
    pool_to_vector,
    rbf_gamma,
    update_centres,
)
from featkd.models import classifier_name

#: the official code's alpha, for its loss form (batch 256, 100 classes)
OFFICIAL_WEIGHT = 0.04
#: ours: OFFICIAL_WEIGHT * sqrt(256 * 100), so that "normalized" equals "official" at the official recipe
NORMALIZED_WEIGHT = OFFICIAL_WEIGHT * math.sqrt(256 * 100)

LandmarkStrategy = Literal["class-means", "class-means-fresh", "kmeans", "random"]


@dataclass
class KDAConfig(DistillerConfig):
    """Options of ``method: {name: kda}``; see the module docstring for which are official and which ours."""

    weight: float | None = None  # None: 0.04 for loss_form "official" (official alpha), 6.4 for "normalized"
    loss_form: Literal["normalized", "official"] = "normalized"  # official: sum / ||K_t||_F; ours: / sqrt(nm)
    smooth_l1_beta: float = 1.0  # Huber threshold; official: F.smooth_l1_loss's default 1
    kernel: Literal["linear", "cosine", "rbf"] = "linear"  # official: linear (dot product)
    landmarks: LandmarkStrategy = "class-means"  # official: class-means
    num_landmarks: int | None = None  # kmeans / random: k; None = the number of classes
    # epochs before the term switches on; official `warm` = 5; scaled by a shortened protocol
    warmup_epochs: int = field(default=5, metadata=EPOCH_COUNT)
    student_point: str | None = None  # capture point; None = the classifier's input (official)
    teacher_point: str | None = None  # capture point; None = the classifier's input (official)
    eval_pass_limit: int | None = None  # eval passes (fresh / initial centres): seeded subset size, None = all
    kmeans_samples: int | None = 10000  # kmeans: teacher features clustered (seeded subset), None = all (ours)
    kmeans_iters: int = 100  # kmeans: max Lloyd iterations (stops earlier when converged)
    landmark_seed: int = 0  # kmeans seeding and the examples of "random" (same on every rank)

    def validate(self, path: str = "method") -> None:
        checks = [
            ("weight", self.weight is None or self.weight >= 0, "must be >= 0"),
            ("smooth_l1_beta", self.smooth_l1_beta > 0, "must be > 0"),
            ("num_landmarks", self.num_landmarks is None or self.num_landmarks >= 1, "must be >= 1"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("eval_pass_limit", self.eval_pass_limit is None or self.eval_pass_limit >= 1, "must be >= 1"),
            ("kmeans_samples", self.kmeans_samples is None or self.kmeans_samples >= 1, "must be >= 1"),
            ("kmeans_iters", self.kmeans_iters >= 1, "must be >= 1"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(f"{path}.{key}: {message}, got {getattr(self, key)!r}")

    @property
    def effective_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        return OFFICIAL_WEIGHT if self.loss_form == "official" else NORMALIZED_WEIGHT


def default_point(model: torch.nn.Module) -> str:
    """The capture point of the classifier's input, for any model with a final ``nn.Linear``."""
    return f"{classifier_name(model)}:input"


def kda_loss(k_s: Tensor, k_t: Tensor, form: str = "normalized", beta: float = 1.0) -> Tensor:
    """The KDA matching loss between partial kernel matrices (n, m) -> scalar.

    ``official``: ``smooth_l1(k_s, k_t, sum, beta) / ||k_t||_F`` (idstcv/KDA); ``normalized`` (ours): the same
    divided by ``sqrt(n m)``, i.e. ``mean(smooth_l1) / rms(k_t)``.
    """
    loss = F.smooth_l1_loss(k_s, k_t, reduction="sum", beta=beta) / k_t.norm().clamp_min(EPS)
    if form == "normalized":
        loss = loss / math.sqrt(k_t.numel())
    return loss


@register("kda")
class KDA(Distiller):
    """Kernel matrix transfer through m landmarks; options :class:`KDAConfig`.

    Buffers (in every checkpoint): ``t_centres`` (m, d_t), ``s_centres`` (m, d_s), ``has_centre`` (m,),
    the running ``t_sums`` / ``s_sums`` (m, d) and ``counts`` (m,) of the current epoch (float64, per rank
    until all-reduced at the epoch end), and for ``kmeans`` the teacher-space ``clusters`` (m, d_t).
    """

    Config = KDAConfig
    tasks = ("classification",)
    task_reason = "its landmarks are class means of per-example embeddings"
    rank_local_buffers: ClassVar[tuple[str, ...]] = ("t_sums", "s_sums", "counts")

    def __init__(self, cfg: KDAConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.teacher is None:
            raise FeatkdError("method 'kda' needs a teacher")
        self.s_point = cfg.student_point or default_point(ctx.student)
        self.t_point = cfg.teacher_point or default_point(ctx.teacher)
        self.student_points, self.teacher_points = (self.s_point,), (self.t_point,)
        d_s = ctx.feature_shapes("student", [self.s_point])[self.s_point][0]
        d_t = ctx.feature_shapes("teacher", [self.t_point])[self.t_point][0]
        class_based = cfg.landmarks in ("class-means", "class-means-fresh")
        if class_based and cfg.num_landmarks not in (None, ctx.num_classes):
            raise ConfigError(f"method.num_landmarks: {cfg.landmarks!r} has one landmark per class "
                              f"({ctx.num_classes}); num_landmarks is for 'kmeans' and 'random'")
        m = ctx.num_classes if class_based else (cfg.num_landmarks or ctx.num_classes)
        self.num_landmarks, self.weight = m, cfg.effective_weight
        self.accumulates = cfg.landmarks in ("class-means", "kmeans")
        self.class_targets = cfg.landmarks == "class-means"  # the batch's labels pick the landmarks it adds to
        f32, f64 = torch.float32, torch.float64
        self.register_buffer("t_centres", torch.zeros(m, d_t, dtype=f32))
        self.register_buffer("s_centres", torch.zeros(m, d_s, dtype=f32))
        self.register_buffer("has_centre", torch.zeros(m, dtype=torch.bool))
        self.register_buffer("t_sums", torch.zeros(m, d_t, dtype=f64))
        self.register_buffer("s_sums", torch.zeros(m, d_s, dtype=f64))
        self.register_buffer("counts", torch.zeros(m, dtype=f64))
        if cfg.landmarks == "kmeans":
            self.register_buffer("clusters", torch.zeros(m, d_t, dtype=f32))
            self.register_buffer("has_clusters", torch.zeros((), dtype=torch.bool))
        self._landmark_inputs: Tensor | None = None  # "random": the k fixed examples (k, C, H, W)
        self._epoch_stats = {"active": 0.0, "empty": 0.0}
        self._rel_diff: Tensor | None = None  # this epoch's sum of ||K_s - K_t||_F / ||K_t||_F, and batches

    # ---- loss ------------------------------------------------------------------------------------------
    def landmark_of(self, t: Tensor, targets: Tensor) -> Tensor:
        """Landmark index (n,) of each example: its class, or its nearest teacher cluster for kmeans."""
        return nearest(t, self.clusters) if self.cfg.landmarks == "kmeans" else targets

    @torch.no_grad()
    def add_examples(self, t: Tensor, s: Tensor, targets: Tensor) -> None:
        """Add teacher / student feature vectors ``t`` (n, d_t), ``s`` (n, d_s) to their landmarks' sums
        (:meth:`centres_from_sums` turns the sums into centres)."""
        labels = self.landmark_of(t, targets)
        accumulate(self.t_sums, self.counts, t, labels)
        self.s_sums.index_add_(0, labels, s.detach().double())

    def kernels(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Partial kernel matrices (n, m') of student features ``s`` (n, d_s) and teacher features ``t``
        (n, d_t) against the m' landmarks that have a centre; the teacher's without gradient."""
        cs, ct = self.s_centres[self.has_centre], self.t_centres[self.has_centre]
        kind = self.cfg.kernel
        with torch.no_grad():
            k_t = kernel(t, ct, kind, rbf_gamma(t, ct) if kind == "rbf" else None)
        k_s = kernel(s, cs, kind, rbf_gamma(s, cs) if kind == "rbf" else None)
        return k_s, k_t

    def warmup_note(self, epochs: int) -> str | None:
        if self.cfg.warmup_epochs < epochs or not self.cfg.effective_weight:
            return None
        return (f"method.warmup_epochs: {self.cfg.warmup_epochs}: the KDA term never switches on in a run of "
                f"{epochs} epochs (it starts after the warm-up); lower method.warmup_epochs")

    def active(self, epoch: int) -> bool:
        return epoch >= self.cfg.warmup_epochs and bool(self.has_centre.any())

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        s_raw = batch.student_features[self.s_point]
        # float32 and autocast off: the n x m products are tiny, and bf16 would blur the kernel values
        with torch.autocast(s_raw.device.type, enabled=False):
            s = pool_to_vector(s_raw).float()
            t = pool_to_vector(batch.teacher_features[self.t_point]).float()
            if self.accumulates:
                self.add_examples(t, s, batch.targets)
            if not self.active(batch.epoch):
                return {"kda": s.new_zeros(())}
            k_s, k_t = self.kernels(s, t)
            with torch.no_grad():  # kept on the device: read once per epoch by metrics(), no per-step sync
                rel = ((k_s - k_t).norm() / k_t.norm().clamp_min(EPS)).double()
                if self._rel_diff is None:
                    self._rel_diff = torch.zeros(2, dtype=torch.float64, device=rel.device)
                self._rel_diff += torch.stack([rel, torch.ones_like(rel)])
            return {"kda": self.weight * kda_loss(k_s, k_t, self.cfg.loss_form, self.cfg.smooth_l1_beta)}

    # ---- landmarks ---------------------------------------------------------------------------------------
    @staticmethod
    def point_vectors(out: tuple[Tensor, dict[str, Tensor]], point: str) -> Tensor:
        """The (n, d) float32 vectors KDA compares, from a captured ``(logits, features)`` output's ``point``."""
        return pool_to_vector(out[1][point]).float()

    def centres_from_sums(self, ctx: RunContext, what: str) -> None:
        """All-reduce this epoch's sums and counts over the ranks, update the centres, reset the sums."""
        for buf in (self.t_sums, self.s_sums, self.counts):
            ctx.dist.all_reduce_sum(buf)
        update_centres(self.t_centres, self.has_centre, self.t_sums, self.counts)
        empty = update_centres(self.s_centres, self.has_centre, self.s_sums, self.counts)
        self._epoch_stats["empty"] = float(empty.sum())
        if empty.any():
            kept = "keep their previous centre" if self.has_centre[empty].all() else "have no centre yet"
            ctx.log(f"kda: {int(empty.sum())} of {self.num_landmarks} landmarks got no example in {what} "
                    f"(indices {empty.nonzero().flatten().tolist()[:10]}); they {kept}")
        for buf in (self.t_sums, self.s_sums, self.counts):
            buf.zero_()

    @torch.no_grad()
    def centres_from_pass(self, ctx: RunContext, loader) -> None:
        """Centres from an eval-mode pass of both networks over ``loader`` (this rank's shard; all-reduced)."""
        for buf in (self.t_sums, self.s_sums, self.counts):
            buf.zero_()
        for _x, y, t_out, s_out in ctx.iter_features(loader):
            self.add_examples(self.point_vectors(t_out, self.t_point), self.point_vectors(s_out, self.s_point), y)
        self.centres_from_sums(ctx, "the eval pass")

    @torch.no_grad()
    def random_centres(self, ctx: RunContext) -> None:
        """Centres = both networks' eval-mode features of the fixed landmark examples (identical on all ranks)."""
        x = self._landmark_inputs
        ((_, _, t_out, s_out),) = list(ctx.iter_features([(x, torch.zeros(len(x), dtype=torch.long))]))
        self.t_centres.copy_(self.point_vectors(t_out, self.t_point))
        self.s_centres.copy_(self.point_vectors(s_out, self.s_point))
        self.has_centre.fill_(True)

    def _draw_examples(self, ctx: RunContext, k: int) -> Tensor:
        """The first ``k`` examples of a seeded permutation of the whole training split (eval view); every
        rank draws the same ones, so no broadcast is needed."""
        if k > ctx.data.train_size:
            raise ConfigError(f"method.num_landmarks: {k} is more than the {ctx.data.train_size} training examples")
        loader = ctx.data.train_eval_loader(k, rank=0, world_size=1, device=ctx.device, limit=k,
                                            seed=self.cfg.landmark_seed)
        return torch.cat([x for x, _ in loader])

    @torch.no_grad()
    def _fit_clusters(self, ctx: RunContext) -> None:
        """k-means of the teacher's eval-mode features over a seeded subset of the whole split, computed alike
        on every rank (same data, same seed), so the clusters agree without communication."""
        cfg = self.cfg
        limit = min(cfg.kmeans_samples or ctx.data.train_size, ctx.data.train_size)
        if self.num_landmarks > limit:
            raise ConfigError(f"method.num_landmarks: {self.num_landmarks} clusters need at least as many "
                              f"examples; kmeans_samples gives {limit}")
        loader = ctx.data.train_eval_loader(ctx.eval_batch_size, rank=0, world_size=1, device=ctx.device,
                                            limit=limit, seed=cfg.landmark_seed)
        feats = []
        for x, _ in loader:
            with ctx.autocast():
                feats.append(self.point_vectors(ctx.teacher_capture(x), self.t_point))
        self.clusters.copy_(kmeans(torch.cat(feats), self.num_landmarks, cfg.kmeans_iters, cfg.landmark_seed))
        self.has_clusters.fill_(True)

    def prepare(self, ctx: RunContext) -> None:
        """What a strategy needs before its first landmarks: the clusters (kmeans), the examples (random)."""
        if self.cfg.landmarks == "kmeans" and not bool(self.has_clusters):
            self._fit_clusters(ctx)
        if self.cfg.landmarks == "random" and self._landmark_inputs is None:
            self._landmark_inputs = self._draw_examples(ctx, self.num_landmarks)

    def eval_pass_loader(self, ctx: RunContext):
        return ctx.train_eval_loader(limit=self.cfg.eval_pass_limit)

    # ---- life cycle ------------------------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        # a resumed run has its centres (and kmeans clusters) back from the checkpoint already
        self.prepare(ctx)

    def on_epoch_start(self, epoch: int, ctx: RunContext) -> None:
        self._rel_diff = None
        self._epoch_stats["empty"] = 0.0
        if epoch < self.cfg.warmup_epochs:
            return
        strategy = self.cfg.landmarks
        if strategy == "random":
            self.random_centres(ctx)
        elif strategy == "class-means-fresh" or not bool(self.has_centre.any()):
            # fresh: every epoch; accumulating strategies: only when the term starts before any epoch was summed
            self.centres_from_pass(ctx, self.eval_pass_loader(ctx))

    def on_epoch_end(self, epoch: int, ctx: RunContext) -> None:
        self._epoch_stats["active"] = float(self.active(epoch))
        if self._rel_diff is not None:  # every rank summed its own shard's batches: log the whole epoch's mean
            ctx.dist.all_reduce_sum(self._rel_diff)
        if self.accumulates:
            self.centres_from_sums(ctx, f"epoch {epoch + 1}")

    def metrics(self) -> dict[str, float]:
        out = {"kda_active": self._epoch_stats["active"], "kda_empty_landmarks": self._epoch_stats["empty"]}
        if self._rel_diff is not None:
            total, batches = self._rel_diff.tolist()
            out["kda_knm_rel_diff"] = total / batches
        return out
