"""Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020): NCE against memory banks.

Both networks' penultimate features go through an embedding head (linear to ``feat_dim``, then L2
normalisation): ``v_s``, ``v_t``. Two memory banks of shape (train_size, feat_dim) hold one past embedding per
training sample, ``M_s`` of the student's and ``M_t`` of the teacher's. For a sample i with K negatives j:

* student anchor: ``P_s(i, j) = exp(<M_t[j], v_s(i)> / T) / Z_s`` for j in {i, negatives} (column 0 = i);
  teacher anchor: ``P_t(i, j) = exp(<M_s[j], v_t(i)> / T) / Z_t``;
* NCE with noise ``P_n = 1 / N`` (N = train_size), per anchor
  ``-log(P(i, i) / (P(i, i) + K P_n + eps)) - sum_j log(K P_n / (P(i, j) + K P_n + eps))``, batch mean;
  ``loss = weight * (NCE(P_s) + NCE(P_t))``;
* after the loss, the rows of the batch's samples move: ``M[i] <- normalize(m M[i] + (1 - m) v(i))``.

This is RepDistiller's ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``, ``Embed``) and ``crd/memory.py``
(``ContrastMemory``), the code users compare against, with its training defaults (``train_student.py``):
``feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5``, ``-b 0.8`` (the README's CRD command), CE weight 1, no
KD term; banks initialised uniform in ``[-1/sqrt(d/3), 1/sqrt(d/3)]``; ``Z`` estimated once, on the first
batch, as ``mean(exp(scores / T)) * N`` for each side, then kept (a buffer, so it is in the checkpoint).
Negatives as its ``--mode exact`` data set (``CIFAR100InstanceSample``): K draws per sample among the samples
of *other* classes, without replacement unless there are fewer than K of them; ``negatives: uniform`` is
``ContrastMemory``'s own sampler (uniform over all samples, with replacement) instead.

Ours: K is capped at N - 1 (a 2,000-image subset has no 16,384 distinct negatives); negatives come from a
generator seeded by (run seed, step), so a resume draws the same ones; under DDP every rank all-gathers the
batch's indices and embeddings before the bank update and ``Z``'s first estimate is the mean over ranks, so
all ranks hold identical banks (which DDP therefore does not broadcast); a sample present twice in one global
step (DistributedSampler's padding) updates its row once, with its first embedding. The scores are a matmul
with the whole bank then a gather when K + 1 is at least half of N (cheaper here; the same numbers),
RepDistiller's gather of the K + 1 rows otherwise. Float32 under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.distributed import DistInfo
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig, RunContext
from featkd.methods.common import embedding_pairs

#: added to the NCE denominators (RepDistiller ``crd/criterion.py``: ``eps = 1e-7``)
EPS = 1e-7
#: stream id mixed into the negatives' seed, so they never share draws with the data augmentation
NEGATIVES_STREAM = 0xC4D
NEGATIVES = ("other_class", "uniform")


@dataclass
class CRDConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # one [student_point, teacher_point]; [] = classifier input
    weight: float = 0.8  # RepDistiller README's CRD command: -b 0.8 (with -r 1 CE, -a 0 KD)
    feat_dim: int = 128  # --feat_dim
    nce_k: int = 16384  # --nce_k (negatives per sample), capped at train_size - 1 (ours)
    nce_t: float = 0.07  # --nce_t (temperature)
    nce_m: float = 0.5  # --nce_m (momentum of the memory update)
    negatives: str = "other_class"  # --mode exact data set sampler; "uniform": ContrastMemory's own sampler


def nce_scores(anchor: Tensor, bank: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``exp(<bank[rows[b, j]], anchor[b]> / T)``: (B, d) anchors, (N, d) bank, (B, K+1) rows -> (B, K+1)."""
    if 2 * rows.shape[1] >= bank.shape[0]:  # a copy: backward needs the bank as it was before the update
        dots = (anchor @ bank.clone().T).gather(1, rows)
    else:
        dots = torch.bmm(bank[rows], anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / temperature)


def nce_loss(p: Tensor, n_data: int) -> Tensor:
    """RepDistiller's ``ContrastLoss`` of (B, K+1) normalised scores (column 0 the positive) -> scalar."""
    k = p.shape[1] - 1
    noise = k / n_data  # K * P_n
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def first_occurrences(idx: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``idx`` (B,), in order of value."""
    unique, inverse = torch.unique(idx, return_inverse=True)
    pos = torch.arange(len(idx), device=idx.device)
    return torch.full((len(unique),), len(idx), device=idx.device).scatter_reduce(0, inverse, pos, "amin")


@torch.no_grad()
def momentum_update(bank: Tensor, idx: Tensor, v: Tensor, momentum: float) -> None:
    """``bank[i] <- normalize(m bank[i] + (1 - m) v)`` for the rows ``idx`` (B,) of (B, d) ``v``, in place.
    A repeated index is updated once, with its first row of ``v``."""
    keep = first_occurrences(idx)
    idx, v = idx[keep], v[keep]
    rows = F.normalize(bank[idx] * momentum + v * (1 - momentum), dim=1)
    bank.index_copy_(0, idx, rows)


class Embed(nn.Module):
    """RepDistiller's ``Embed``: flatten, linear to ``dim_out``, L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@register("crd")
class CRD(Distiller):
    Config = CRDConfig
    tasks = ("classification",)
    task_reason = "it contrasts per-example embeddings (the classifier's input by default) of the training samples"
    needs_indices = True
    self_synced_buffers = ("bank_s", "bank_t", "z")

    def __init__(self, cfg: CRDConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.train_size is None:
            raise FeatkdError("method 'crd' keeps one memory row per training sample: it needs the training "
                              "split's size (Distillation(..., train_size=N) or data=...)")
        if ctx.train_size < 2:
            raise FeatkdError(f"method 'crd': the training split has {ctx.train_size} sample(s); needs 2 or more")
        for key, ok, what in (("feat_dim", cfg.feat_dim >= 1, ">= 1"), ("nce_k", cfg.nce_k >= 1, ">= 1"),
                              ("nce_t", cfg.nce_t > 0, "> 0"), ("nce_m", 0 <= cfg.nce_m < 1, "in [0, 1)")):
            if not ok:
                raise ConfigError(f"method.{key}: must be {what}, got {getattr(cfg, key)}")
        if cfg.negatives not in NEGATIVES:
            raise ConfigError(f"method.negatives: expected one of {', '.join(NEGATIVES)}, got {cfg.negatives!r}")
        self.class_targets = cfg.negatives == "other_class"  # negatives of other classes than the target's
        self.pairs = embedding_pairs(cfg.pairs, ctx)
        if len(self.pairs) != 1:
            raise ConfigError(f"method.pairs: CRD contrasts one embedding pair, got {len(self.pairs)}")
        [(sp, tp)] = self.pairs
        self.student_points, self.teacher_points = (sp,), (tp,)
        s_dim = math.prod(ctx.feature_shapes("student", [sp])[sp])
        t_dim = math.prod(ctx.feature_shapes("teacher", [tp])[tp])
        self.embed_s, self.embed_t = Embed(s_dim, cfg.feat_dim), Embed(t_dim, cfg.feat_dim)
        n = ctx.train_size
        self.k = min(cfg.nce_k, n - 1)
        stdv = 1.0 / math.sqrt(cfg.feat_dim / 3)  # RepDistiller ContrastMemory
        self.register_buffer("bank_s", torch.rand(n, cfg.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("bank_t", torch.rand(n, cfg.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # [Z_s, Z_t]; < 0: not estimated yet
        self._dist, self._seed = DistInfo(), 0
        self._labels: Tensor | None = None  # (N,) class of every training sample (negatives: other_class)

    @property
    def train_size(self) -> int:
        return self.bank_s.shape[0]

    def setup(self, ctx: RunContext) -> None:
        self._dist, self._seed = ctx.dist, ctx.seed
        if self.cfg.negatives == "other_class":
            self._labels = self.training_labels(ctx)

    def training_labels(self, ctx: RunContext) -> Tensor:
        """(N,) class ids by training-split index, from one pass of the eval view (each rank its shard,
        summed over ranks: the shards cover every sample once)."""
        table = torch.zeros(self.train_size, dtype=torch.long, device=ctx.device)
        loader = ctx.train_eval_loader()
        for _x, y in loader:
            ix = getattr(loader, "batch_indices", None)
            if ix is None:
                raise FeatkdError(f"method.negatives 'other_class' needs each training sample's class by index, "
                                  f"which {ctx.data.name} does not give; pass data=... or set negatives: uniform")
            table[ix] = y.to(table.device) + 1
        ctx.dist.all_reduce_sum(table)
        if int((table == 0).sum()):
            raise FeatkdError(f"method 'crd': {int((table == 0).sum())} of {self.train_size} training samples "
                              "were not seen by the label pass (the training split changed size?)")
        return table - 1

    def draw_contrast(self, idx: Tensor, targets: Tensor, step: int) -> Tensor:
        """(B, K+1) sample indices: column 0 the positives ``idx``, then K negatives per sample."""
        from featkd.data.augment import mix_seed  # featkd.data is heavy to import; loaded by now anyway

        n, k, b = self.train_size, self.k, len(idx)
        g = torch.Generator(device=idx.device)
        g.manual_seed(mix_seed(self._seed, NEGATIVES_STREAM, step))
        if self.cfg.negatives == "uniform":
            neg = torch.randint(0, n, (b, k), generator=g, device=idx.device)
        else:
            if self._labels is None:
                raise FeatkdError("method 'crd' with negatives 'other_class': call setup() before the first batch")
            same = self._labels.unsqueeze(0) == targets.unsqueeze(1)  # (B, N)
            keys = torch.rand(b, n, generator=g, device=idx.device).masked_fill_(same, 2.0)
            order = keys.argsort(1)  # each row: the other classes' samples first, shuffled
            neg = order[:, :k]  # without replacement
            others = (~same).sum(1, keepdim=True)  # (B, 1)
            short = others < k  # fewer other-class samples than K: with replacement (RepDistiller)
            if bool(short.any()):
                pos = (torch.rand(b, k, generator=g, device=idx.device) * others).long().clamp_(max=others - 1)
                neg = torch.where(short, order.gather(1, pos), neg)
        return torch.cat([idx.unsqueeze(1), neg], 1)

    def nce(self, v_s: Tensor, v_t: Tensor, idx: Tensor, contrast: Tensor) -> Tensor:
        """NCE(P_s) + NCE(P_t) of embeddings (B, d) against the banks' ``contrast`` rows (B, K+1); sets ``Z``
        on the first call, then updates the banks' rows ``idx`` (all ranks' under DDP)."""
        t, n = self.cfg.nce_t, self.train_size
        e_s = nce_scores(v_s, self.bank_t, contrast, t)  # student anchor, teacher memory (RepDistiller out_v1)
        e_t = nce_scores(v_t, self.bank_s, contrast, t)  # teacher anchor, student memory (out_v2)
        if bool((self.z < 0).any()):
            with torch.no_grad():
                mean = self._dist.all_reduce_sum(torch.stack([e_s.mean(), e_t.mean()]).detach())
                self.z.copy_(mean / self._dist.world_size * n)
        loss = nce_loss(e_s / self.z[0], n) + nce_loss(e_t / self.z[1], n)
        with torch.no_grad():
            all_idx = self._dist.all_gather(idx)
            both = self._dist.all_gather(torch.cat([v_s, v_t], 1).detach())
            d = v_s.shape[1]
            momentum_update(self.bank_s, all_idx, both[:, :d], self.cfg.nce_m)
            momentum_update(self.bank_t, all_idx, both[:, d:], self.cfg.nce_m)
        return loss

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        if batch.indices is None:
            raise FeatkdError("method 'crd' needs each sample's training-split index (Batch.indices; "
                              "Distillation: kd(x, y, indices=...))")
        [(sp, tp)] = self.pairs
        with torch.autocast(batch.inputs.device.type, enabled=False):
            v_s = self.embed_s(batch.student_features[sp].float())
            v_t = self.embed_t(batch.teacher_features[tp].float().detach())
            contrast = self.draw_contrast(batch.indices, batch.targets, batch.step)
            loss = self.nce(v_s, v_t, batch.indices, contrast)
        return {"crd": self.cfg.weight * loss}
