"""Multi-teacher feature distillation without labels (``method: multiteacher``): one student regresses the
features of several frozen teachers through small adaptors, in the spirit of Theia (Shang et al. 2024: one
student, several vision foundation models, cosine + smooth-L1), RADIO (Ranzinger et al. 2024; PHI-S, Ranzinger
et al. 2024, for balancing teachers of different scales) and MobileSAM (Zhang et al. 2023: a small image encoder
regresses SAM's ViT-H encoder output on unlabelled images).

The teachers are the members of ``teachers:`` (:class:`~featkd.models.ensemble.TeacherEnsemble`): a pair's
teacher point names its teacher (``dino.blocks.11:tokens``, or ``dino:blocks.11:tokens``). With a single
``teacher:`` every pair belongs to the teacher called ``teacher``. For every pair ``[s, t]``::

    F_t  = standardise_t(teacher feature)       statistics of a pass over training images (setup), frozen
    P_s  = adaptor(student feature)             resized (bilinear) to F_t's grid for maps
    L_p  = mse(P_s, F_t)   or   (1 - cos(P_s, F_t)) + smoothL1(P_s, F_t)     (loss: mse | cos-smoothl1)
    L_T  = mean of L_p over teacher T's pairs   logged as mt_<T> (weighted)
    L    = sum over teachers of w_T * L_T                  (balance: none)
           sum over teachers of w_T * L_T / EMA(L_T)       (balance: equal; EMA detached)

Feature kinds (per-example shapes probed at build time): a map (C, H, W); tokens (N, C); pooled (C,).

* map -> map: ``adaptor: conv1x1`` (default) or ``mlp`` (CWT's 1x1-conv MLP C_s -> hidden -> C_t with a ReLU);
  the adapted student map is bilinearly resized to the teacher's grid (students are usually coarser than
  their teachers' patch grids or finer than a 1/16 ViT; the teacher side is never resized, so its statistics
  are those of its own grid).
* map -> tokens (N, C): the tokens are read as a patch grid, class / register tokens dropped
  (:func:`featkd.capture.layouts.token_grid`: 0, 1 or 2 leading tokens inferred from N and the input's aspect;
  ``t:tokens=P`` captures with exactly P, e.g. 5 for a class + 4 register tokens); then as map -> map.
* tokens -> tokens with the same N, pooled -> pooled, and map or tokens -> pooled (the student's map or tokens
  averaged first): a linear adaptor (``mlp``: Linear -> GELU -> Linear). Anything else (a pooled student
  feature for a teacher map, token counts that differ) is a one-line error naming the teacher and its point.

Standardisation (``standardize``; RADIO's finding: raw teacher features differ in scale by orders of magnitude,
so an unbalanced sum is ruled by the largest): before training, ``setup`` runs the teacher on
``stats_images`` training images (eval view, seeded subset, this rank's shard) and all-reduces float64 sums
over the ranks (:class:`Moments`), per teacher point and channel:

* ``channel`` (default): ``(f - mean_c) / std_c`` per channel;
* ``phi-s``: PHI-S, ``R (f - mean)`` with ``R = H U^T / sqrt(mean(lambda))``: the covariance's eigenvectors U,
  then a normalised Hadamard matrix H spreads the variance evenly, so every output channel has variance
  ``mean(lambda)`` / ``mean(lambda)`` = 1 while the feature is only rotated and scaled as a whole (distances keep
  their geometry, unlike per-channel whitening). H exists here for C = 2^k * m with m in {1, 12, 20, 28, ...}
  (Sylvester x Paley; 192, 384, 768, 1024, 1280 included); another C is refused with one line;
* ``none``: the raw features (a teacher whose scale you trust).

The statistics are buffers (checkpointed; a resumed run does not measure them again). The loss compares
float32 tensors; the teacher side is detached.

Balancing (``weights`` per teacher, default 1; ``balance``): ``none`` sums ``w_T * L_T``. ``equal`` divides each
teacher's term by a detached exponential moving average of its own value (``balance_momentum``, started at its
first value), so each teacher contributes about ``w_T`` whatever its loss scale -- the same gradient share a
standardised teacher would get if its residual were equally hard to fit, without one teacher's slow,
large residual drowning the others. The EMA buffer is updated in each training forward; under DDP every
rank's forward starts from rank 0's buffers (DDP broadcasts them), so all ranks divide by the same number.

Evaluation: :meth:`MultiTeacher.eval_metrics` logs ``agree_<T>``, the mean cosine between the adaptor output and
the standardised teacher feature (per position, over the channels) on ``agree_images`` held-out test images.
The adaptors are distiller parameters: in the optimiser, in the module DDP wraps, in checkpoints, never in the
exported student.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.capture.layouts import Layout, to_map, token_grid
from featkd.distributed import DistInfo
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig, RunContext
from featkd.methods.common import use_pairs
from featkd.modes import eval_mode

#: the teacher name of every pair when the run has one ``teacher:`` (no ensemble)
SINGLE_TEACHER = "teacher"


@dataclass
class MultiTeacherConfig(DistillerConfig):
    """Options of ``method: multiteacher`` (see the module docstring)."""

    ce_weight: float = 0.0  # label-free by default; with labels, a task term may be added
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...] (required)
    adaptor: Literal["conv1x1", "mlp", "linear"] = "conv1x1"  # maps: 1x1 conv | CWT-style MLP; linear = conv1x1
    hidden_channels: int | None = None  # mlp: hidden width (None: the teacher's channels)
    standardize: Literal["channel", "phi-s", "none"] = "channel"
    stats_images: int = 2048  # training images of the statistics pass (all of them when fewer)
    loss: Literal["mse", "cos-smoothl1"] = "mse"
    weights: dict[str, float] = field(default_factory=dict)  # teacher name -> weight (default 1)
    balance: Literal["none", "equal"] = "none"
    balance_momentum: float = 0.99
    agree_images: int = 1000  # held-out test images of the agreement numbers per evaluation (0: off)

    def validate(self, path: str = "method") -> None:
        checks = [(self.stats_images >= 1, "stats_images", "a positive integer"),
                  (0.0 <= self.balance_momentum < 1.0, "balance_momentum", "in [0, 1)"),
                  (self.agree_images >= 0, "agree_images", ">= 0 (0: off)"),
                  (self.hidden_channels is None or self.hidden_channels >= 1, "hidden_channels", "null or >= 1"),
                  (all(isinstance(w, (int, float)) and w >= 0 for w in self.weights.values()), "weights",
                   "a mapping of teacher name -> weight >= 0")]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"{path}.{key}: must be {want}, got {getattr(self, key)!r}")


# ---- pure functions: statistics, standardisation, Hadamard, losses, balancing ---------------------------------


def channel_rows(feature: Tensor) -> Tensor:
    """A feature as (M, C) rows of channels: (B, C, H, W) -> (B*H*W, C); (B, N, C) -> (B*N, C); (B, C) as is."""
    if feature.ndim == 4:
        return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])
    return feature.reshape(-1, feature.shape[-1])


def _per_channel(v: Tensor, feature: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast over ``feature``'s channel dimension (dim 1 of a map, the last otherwise)."""
    return v.view(1, -1, 1, 1) if feature.ndim == 4 else v


class Moments:
    """Running float64 sums of (M, C) rows: count, sum, and the sum of squares (``cov`` False) or of outer products
    (``cov`` True); :meth:`all_reduce` sums them over the DDP ranks."""

    def __init__(self, channels: int, cov: bool = False) -> None:
        self.n = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sq = torch.zeros((channels, channels) if cov else channels, dtype=torch.float64)
        self.cov = cov

    def update(self, rows: Tensor) -> None:
        r = rows.detach().double().cpu()
        self.n += r.shape[0]
        self.sum += r.sum(0)
        self.sq += r.T @ r if self.cov else r.pow(2).sum(0)

    def all_reduce(self, dist: DistInfo, device: torch.device) -> None:
        flat = torch.cat([self.n.view(1), self.sum, self.sq.reshape(-1)]).to(device)
        dist.all_reduce_sum(flat)
        flat = flat.cpu()
        c = self.sum.numel()
        self.n, self.sum, self.sq = flat[0], flat[1:1 + c], flat[1 + c:].view_as(self.sq)

    @property
    def mean(self) -> Tensor:
        return self.sum / self.n.clamp_min(1)

    @property
    def var(self) -> Tensor:
        """Per-channel (population) variance."""
        sq = self.sq.diagonal() if self.cov else self.sq
        return (sq / self.n.clamp_min(1) - self.mean.pow(2)).clamp_min(0)

    @property
    def covariance(self) -> Tensor:
        if not self.cov:
            raise FeatkdError("Moments: built without the covariance")
        m = self.mean
        return self.sq / self.n.clamp_min(1) - torch.outer(m, m)


def channel_standardize(feature: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(f - mean_c) / std_c`` along the channel dimension of a map, tokens or pooled feature."""
    return (feature - _per_channel(mean, feature)) / _per_channel(std, feature)


def rotate_channels(feature: Tensor, mean: Tensor, matrix: Tensor) -> Tensor:
    """``matrix @ (f - mean)`` for every position's channel vector (PHI-S)."""
    centred = feature - _per_channel(mean, feature)
    if feature.ndim == 4:
        return torch.einsum("bchw,dc->bdhw", centred, matrix)
    return centred @ matrix.T


def _paley(q: int) -> Tensor:
    """A Hadamard matrix of order q + 1 (Paley's first construction; q a prime with q % 4 == 3)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def hadamard(n: int) -> Tensor | None:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``), float64, or None when none is built here:
    n = 2^k (Sylvester) or 2^k * (q + 1) with q a prime, q % 4 == 3 (Paley I x Sylvester)."""
    k, m = 0, n
    while m % 2 == 0 and m > 1:
        m //= 2
        k += 1
    for base_order in sorted({m * 2**j for j in range(k + 1)}):
        if base_order == 1:
            base = torch.ones(1, 1, dtype=torch.float64)
        elif _is_prime(base_order - 1) and (base_order - 1) % 4 == 3:
            base = _paley(base_order - 1)
        else:
            continue
        h = base
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    return None


def phi_s_matrix(covariance: Tensor) -> Tensor:
    """PHI-S: ``R = H U^T / sqrt(mean(lambda))`` for ``covariance`` = U diag(lambda) U^T (C x C, float64), H the
    normalised Hadamard matrix of order C; every channel of ``R (f - mean)`` then has variance 1."""
    c = covariance.shape[0]
    h = hadamard(c)
    if h is None:
        raise FeatkdError(f"no Hadamard matrix of order {c} here (2^k or 2^k * (q + 1), q prime, q % 4 == 3)")
    lam, u = torch.linalg.eigh(covariance.double())
    phi = lam.clamp_min(0).mean().clamp_min(1e-12).sqrt()
    return (h / math.sqrt(c)) @ u.T / phi


def feature_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """``mse``: mean squared error over every element; ``cos-smoothl1``: mean (1 - cosine) over positions (the
    cosine over channels) + mean smooth-L1 (beta 1) over elements (Theia's sum of the two)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    dim = 1 if pred.ndim == 4 else -1
    return (1.0 - F.cosine_similarity(pred, target, dim=dim)).mean() + F.smooth_l1_loss(pred, target, beta=1.0)


def balance_equal(values: Tensor, ema: Tensor, started: Tensor, momentum: float) -> Tensor:
    """``values`` (T,) divided by their detached EMA; updates ``ema`` (T,) and ``started`` (T,) in place first (the
    first value starts the average, so each term is exactly 1 at its first step and about 1 after)."""
    with torch.no_grad():
        v = values.detach().float()
        ema.copy_(torch.where(started.bool(), momentum * ema + (1.0 - momentum) * v, v))
        started.fill_(1.0)
    return values / ema.clamp_min(1e-12)


# ---- the distiller -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    student: str
    teacher_point: str
    teacher: str  # the teacher's name
    s_kind: str  # map | tokens | pooled
    t_kind: str
    t_shape: tuple[int, ...]  # per-example shape of the target (tokens read as a grid: the map's)
    tokens_prefix: int | None  # map <- tokens: the leading tokens dropped


def _kind(shape: Sequence[int]) -> str:
    return {3: "map", 2: "tokens", 1: "pooled"}.get(len(shape), f"{len(shape)}-d")


def _vector_adaptor(c_in: int, c_out: int, mlp: bool, hidden: int | None) -> nn.Module:
    if not mlp:
        return nn.Linear(c_in, c_out)
    return nn.Sequential(nn.Linear(c_in, hidden or c_out), nn.GELU(), nn.Linear(hidden or c_out, c_out))


def _map_adaptor(c_in: int, c_out: int, mlp: bool, hidden: int | None) -> nn.Module:
    if not mlp:
        return nn.Conv2d(c_in, c_out, kernel_size=1)
    return nn.Sequential(nn.Conv2d(c_in, hidden or c_out, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden or c_out, c_out, 1))


@register("multiteacher")
class MultiTeacher(Distiller):
    Config = MultiTeacherConfig

    def __init__(self, cfg: MultiTeacherConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: MultiTeacherConfig = cfg
        parsed, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        members = tuple(getattr(ctx.teacher, "member_names", ()) or ())
        member_of = getattr(ctx.teacher, "member_of", None)
        self.input_hw = tuple(ctx.input_shape[1:])
        self.pairs: list[_Pair] = []
        self.adaptors = nn.ModuleList()
        mlp = cfg.adaptor == "mlp"
        for i, (s, t) in enumerate(parsed):
            name = member_of(t) if member_of is not None else SINGLE_TEACHER
            if name is None:
                raise FeatkdError(f"method.pairs[{i}]: teacher point {t!r} names no teacher; start it with one of "
                                  f"{', '.join(members)} (e.g. {members[0]}.{t})")
            s_shape, t_shape = tuple(s_shapes[s]), tuple(t_shapes[t])
            s_kind, t_kind = _kind(s_shape), _kind(t_shape)
            where = (f"method.pairs[{i}]: teacher {name!r} point {t!r} {t_shape} cannot be matched from student "
                     f"point {s!r} {s_shape}")
            prefix = None
            if s_kind == "map" and t_kind == "tokens":
                grid = token_grid(t_shape[0], self.input_hw, None)
                if grid is None:
                    raise FeatkdError(f"{where}: its {t_shape[0]} tokens are no patch grid with 0-2 leading tokens; "
                                      f"capture '{t}:tokens=P' with P its class / register tokens")
                prefix, h, w = grid
                t_kind, t_shape = "map", (t_shape[1], h, w)
            if s_kind == "map" and t_kind == "map":
                adaptor = _map_adaptor(s_shape[0], t_shape[0], mlp, cfg.hidden_channels)
            elif t_kind == "pooled" and s_kind in ("map", "tokens", "pooled"):
                adaptor = _vector_adaptor(s_shape[0] if s_kind == "map" else s_shape[-1], t_shape[0], mlp,
                                          cfg.hidden_channels)
            elif s_kind == t_kind == "tokens" and s_shape[0] == t_shape[0]:
                adaptor = _vector_adaptor(s_shape[1], t_shape[1], mlp, cfg.hidden_channels)
            else:
                hint = {"pooled": "a pooled student feature has no positions to match a teacher map or tokens; "
                                  "pick a student map", "tokens": "capture both sides as maps (':tokens')"}
                raise FeatkdError(f"{where}: {hint.get(s_kind, 'pick points of matching kinds')}")
            self.adaptors.append(adaptor)
            self.pairs.append(_Pair(s, t, name, s_kind, t_kind, t_shape, prefix))
        self.teachers = list(dict.fromkeys(p.teacher for p in self.pairs))
        unknown = sorted(set(cfg.weights) - set(self.teachers))
        if unknown:
            raise ConfigError(f"method.weights.{unknown[0]}: no pair uses a teacher of that name "
                              f"(teachers: {', '.join(self.teachers)})")
        if cfg.standardize == "phi-s":
            for p in self.pairs:
                if hadamard(p.t_shape[0]) is None:
                    raise ConfigError(f"method.standardize: phi-s needs a Hadamard matrix of teacher {p.teacher!r} "
                                      f"point {p.teacher_point!r}'s {p.t_shape[0]} channels (built for 2^k or "
                                      "2^k * (q + 1), q prime, q % 4 == 3); use standardize: channel")
        self.register_buffer("weights", torch.tensor([float(cfg.weights.get(t, 1.0)) for t in self.teachers]),
                             persistent=False)
        for i, p in enumerate(self.pairs):
            c = p.t_shape[0]
            self.register_buffer(f"mean_{i}", torch.zeros(c))
            if cfg.standardize == "phi-s":
                self.register_buffer(f"rot_{i}", torch.eye(c))
            else:
                self.register_buffer(f"std_{i}", torch.ones(c))
        self.register_buffer("measured", torch.zeros(()))
        self.register_buffer("ema", torch.ones(len(self.teachers)))
        self.register_buffer("ema_started", torch.zeros(len(self.teachers)))

    # ---- features ------------------------------------------------------------------------------------------
    def target(self, i: int, feature: Tensor) -> Tensor:
        """Pair ``i``'s teacher feature, read as its kind (tokens as a grid) and standardised, float32, detached."""
        p = self.pairs[i]
        f = feature.detach().float()
        if p.tokens_prefix is not None:
            f = to_map(f, Layout("tokens", p.tokens_prefix), p.teacher_point, self.input_hw)
        if self.cfg.standardize == "channel":
            return channel_standardize(f, getattr(self, f"mean_{i}"), getattr(self, f"std_{i}"))
        if self.cfg.standardize == "phi-s":
            return rotate_channels(f, getattr(self, f"mean_{i}"), getattr(self, f"rot_{i}"))
        return f

    def predict(self, i: int, feature: Tensor) -> Tensor:
        """Pair ``i``'s adaptor output on the student feature, in the target's shape."""
        p = self.pairs[i]
        f = feature
        if p.t_kind == "pooled" and p.s_kind != "pooled":
            f = f.mean(dim=(2, 3)) if p.s_kind == "map" else f.mean(dim=1)
        out = self.adaptors[i](f)
        if p.t_kind == "map" and tuple(out.shape[-2:]) != tuple(p.t_shape[1:]):
            out = F.interpolate(out.float(), size=tuple(p.t_shape[1:]), mode="bilinear", align_corners=False)
        return out.float()

    # ---- training ------------------------------------------------------------------------------------------
    def teacher_losses(self, batch: Batch) -> Tensor:
        """(T,) unweighted per-teacher losses: the mean of each teacher's pair losses."""
        sums = [[] for _ in self.teachers]
        for i, p in enumerate(self.pairs):
            target = self.target(i, batch.teacher_features[p.teacher_point])
            pred = self.predict(i, batch.student_features[p.student])
            sums[self.teachers.index(p.teacher)].append(feature_loss(pred, target, self.cfg.loss))
        return torch.stack([torch.stack(v).mean() for v in sums])

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        values = self.teacher_losses(batch)
        if self.cfg.balance == "equal":
            values = balance_equal(values, self.ema, self.ema_started, self.cfg.balance_momentum)
        terms = self.weights * values
        return {f"mt_{t}": terms[j] for j, t in enumerate(self.teachers)}

    # ---- statistics pass -------------------------------------------------------------------------------------
    @torch.no_grad()
    def setup(self, ctx: RunContext) -> None:
        """Measure every teacher point's channel statistics on ``stats_images`` training images (all ranks)."""
        if self.cfg.standardize == "none" or (ctx.resumed and bool(self.measured)):
            return
        cov = self.cfg.standardize == "phi-s"
        moments = [Moments(p.t_shape[0], cov) for p in self.pairs]
        task = ctx.task
        if task is None:
            raise FeatkdError("multiteacher: the statistics pass needs the run's task")
        for x, _y in ctx.train_eval_loader(limit=self.cfg.stats_images):
            with ctx.autocast():
                _, feats = task.forward_teacher(ctx.teacher_capture, x)
            for i, p in enumerate(self.pairs):
                f = feats[p.teacher_point].float()
                if p.tokens_prefix is not None:
                    f = to_map(f, Layout("tokens", p.tokens_prefix), p.teacher_point, self.input_hw)
                moments[i].update(channel_rows(f))
        for i, m in enumerate(moments):
            m.all_reduce(ctx.dist, ctx.device)
            getattr(self, f"mean_{i}").copy_(m.mean.float())
            if cov:
                getattr(self, f"rot_{i}").copy_(phi_s_matrix(m.covariance).float())
            else:
                getattr(self, f"std_{i}").copy_(m.var.sqrt().clamp_min(1e-6).float())
        self.measured.fill_(1.0)
        images = int(moments[0].n.item()) if moments else 0
        ctx.log(f"multiteacher: {self.cfg.standardize} statistics of {len(self.pairs)} teacher point(s) over "
                f"{images} positions of up to {self.cfg.stats_images} training images")

    # ---- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def agreement(self, batches: Iterable[tuple[dict[str, Tensor], dict[str, Tensor]]], dist: DistInfo,
                  device: torch.device) -> dict[str, float]:
        """``{"agree_<T>": mean cosine}`` over ``(teacher features, student features)`` batches (all ranks)."""
        sums = torch.zeros(2 * len(self.teachers), dtype=torch.float64, device=device)
        for t_feats, s_feats in batches:
            for i, p in enumerate(self.pairs):
                pred, target = self.predict(i, s_feats[p.student]), self.target(i, t_feats[p.teacher_point])
                cos = F.cosine_similarity(pred, target, dim=1 if pred.ndim == 4 else -1)
                j = self.teachers.index(p.teacher)
                sums[2 * j] += cos.double().sum()
                sums[2 * j + 1] += cos.numel()
        dist.all_reduce_sum(sums)
        return {f"agree_{t}": (sums[2 * j] / sums[2 * j + 1].clamp_min(1)).item() for j, t in enumerate(self.teachers)}

    def eval_metrics(self, ctx: RunContext) -> dict[str, float]:
        if not self.cfg.agree_images or ctx.teacher_capture is None:
            return {}
        per_rank = math.ceil(self.cfg.agree_images / ctx.dist.world_size)

        def batches() -> Iterable[tuple[dict[str, Tensor], dict[str, Tensor]]]:
            seen = 0
            for _x, _y, t_out, s_out in ctx.iter_features(ctx.test_loader()):
                yield t_out[1], s_out[1]
                seen += _x.shape[0]
                if seen >= per_rank:  # no collective inside the loop: each rank may stop on its own
                    break

        with eval_mode(self):
            return self.agreement(batches(), ctx.dist, ctx.device)
