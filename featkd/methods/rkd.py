"""Relational KD (Park, Kim, Lu, Cho, CVPR 2019): match distances and angles within the mini-batch.

With ``t``, ``s`` the (b, d_t), (b, d_s) embeddings (flattened), following the authors' code
(github lenscloth/RKD, ``metric/loss.py``):

* distance-wise: ``psi_D(i, j) = ||x_i - x_j||_2 / mu``, mu the mean of the nonzero off-diagonal distances
  of the batch; loss ``mean_ij huber(psi_D^s, psi_D^t)`` over all b^2 pairs (the diagonal is 0 on both sides);
* angle-wise: ``psi_A(i, j, k) = <e_ij, e_kj>`` with ``e_ij = normalize(x_i - x_j)``; loss
  ``mean_ijk huber(psi_A^s, psi_A^t)`` over all b^3 triplets (degenerate ones are 0 on both sides);

Huber = smooth-L1 with delta 1; the teacher's side has no gradient. Total
``distance_weight * L_D + angle_weight * L_A``, defaults 25 and 50: the paper's image-classification setting
(Sec. 4.2; CRD and mdistiller use the same; the paper's metric-learning setting is 1 and 2). Embedding: the
final pooled feature, i.e. the classifier's input by default (paper: "the final embedding output"; CRD: the
pooled feature); ``pairs`` takes other capture points. Widths need not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig
from featkd.methods.common import embedding_pairs


@dataclass
class RKDConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point]]; [] = classifier input
    distance_weight: float = 25.0  # lambda_RKD-D, paper (classification) / CRD
    angle_weight: float = 50.0  # lambda_RKD-A, paper (classification) / CRD
    eps: float = 1e-12  # clamp of squared distances before the square root (authors' code)


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(b, d) -> (b, b) Euclidean distances with a zero diagonal, as the authors' ``pdist``."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_distance_loss(s: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """Distance-wise RKD loss of embeddings (b, d_s), (b, d_t) -> scalar."""
    with torch.no_grad():
        t_d = pairwise_distances(t, eps)
        t_d = t_d / t_d[t_d > 0].mean()
    s_d = pairwise_distances(s, eps)
    s_d = s_d / s_d[s_d > 0].mean()
    return F.smooth_l1_loss(s_d, t_d)


def angles(e: Tensor) -> Tensor:
    """(b, d) -> (b^3,): ``<e_ij, e_kj>``-style cosines of all triplets, as the authors' code lays them out."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # (b, b, d): diff[j, i] = e_i - e_j
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def rkd_angle_loss(s: Tensor, t: Tensor) -> Tensor:
    """Angle-wise RKD loss of embeddings (b, d_s), (b, d_t) -> scalar."""
    with torch.no_grad():
        t_a = angles(t)
    return F.smooth_l1_loss(angles(s), t_a)


@register("rkd")
class RelationalKD(Distiller):
    Config = RKDConfig
    tasks = ("classification",)
    task_reason = "it relates per-example embeddings (the classifier's input by default)"

    def __init__(self, cfg: RKDConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs = embedding_pairs(cfg.pairs, ctx)
        self.student_points = tuple(s for s, _ in self.pairs)
        self.teacher_points = tuple(t for _, t in self.pairs)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        dist, ang = 0.0, 0.0
        with torch.autocast(batch.inputs.device.type, enabled=False):  # distances and angles in float32
            for sp, tp in self.pairs:
                s = batch.student_features[sp].float().flatten(1)
                t = batch.teacher_features[tp].float().flatten(1)
                if cfg.distance_weight:
                    dist = dist + rkd_distance_loss(s, t, cfg.eps)
                if cfg.angle_weight:
                    ang = ang + rkd_angle_loss(s, t)
        out = {}
        if cfg.distance_weight:
            out["rkd_distance"] = cfg.distance_weight * dist
        if cfg.angle_weight:
            out["rkd_angle"] = cfg.angle_weight * ang
        return out
