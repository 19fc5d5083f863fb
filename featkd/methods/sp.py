"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match the mini-batch's n x n similarity matrix.

For a feature F of shape (b, ...), ``Q = F.reshape(b, -1)``, ``G = Q Q^T`` (b x b) and ``G~ = G / ||G_i||_2``
row-wise; the loss of one layer pair is ``||G~_t - G~_s||_F^2 / b^2`` (paper eq. 2-4), summed over pairs and
multiplied by ``weight`` (the paper's gamma: 3000, also CRD's and mdistiller's CIFAR setting). Channel
counts and spatial sizes need not match: only the b x b matrices are compared.

Layers: the paper and CRD/mdistiller use the output of the last stage (``[[layer3, layer3]]`` for the
CIFAR ResNets; the configs set it). With ``pairs`` empty (ours) the classifier's input of each network is
used, which works for any model and is the embedding KDA matches too.
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
class SPConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point]]; [] = classifier input
    weight: float = 3000.0  # the paper's gamma (CIFAR-10), also CRD / mdistiller


def sp_similarity(feature: Tensor) -> Tensor:
    """(b, ...) -> (b, b): the row-L2-normalised Gram matrix of the flattened features."""
    q = feature.float().flatten(1)
    return F.normalize(q @ q.T, p=2, dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``||G~_t - G~_s||_F^2 / b^2`` for one pair of features with the same batch size b -> scalar."""
    b = f_s.shape[0]
    return (sp_similarity(f_t) - sp_similarity(f_s)).pow(2).sum() / (b * b)


@register("sp")
class SimilarityPreserving(Distiller):
    Config = SPConfig
    tasks = ("classification",)
    task_reason = "it compares the batch's per-example embeddings (the classifier's input by default)"

    def __init__(self, cfg: SPConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs = embedding_pairs(cfg.pairs, ctx)
        self.student_points = tuple(s for s, _ in self.pairs)
        self.teacher_points = tuple(t for _, t in self.pairs)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        with torch.autocast(batch.inputs.device.type, enabled=False):  # b x b products in float32
            total = sum(sp_loss(batch.student_features[s], batch.teacher_features[t]) for s, t in self.pairs)
        return {"sp": self.cfg.weight * total}
