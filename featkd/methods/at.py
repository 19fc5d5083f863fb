"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based attention maps.

For each pair, the attention map of a (B, C, H, W) feature is ``Q = normalize(mean_c |F_c|^p)`` flattened
to (B, H*W) and L2-normalised per example; the loss is ``weight * sum_pairs mean((Q_s - Q_t)^2)``. Channel
counts need not match. Defaults p = 2, weight = 1000 (the paper's beta and the CRD/mdistiller setting).
When spatial sizes differ, the student's map is resized bilinearly if ``resize`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig
from featkd.methods.common import check_spatial, use_pairs


@dataclass
class AttentionTransferConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...]
    weight: float = 1000.0
    p: float = 2.0
    resize: bool = False  # bilinearly resize the student's attention map to the teacher's size


def attention_map(feature: Tensor, p: float, size: tuple[int, int] | None = None) -> Tensor:
    """(B, C, H, W) -> (B, H*W): mean over channels of |F|^p, optionally resized bilinearly to ``size``
    (H', W'), then L2-normalised per example."""
    a = feature.float().abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(a.flatten(1), dim=1)


@register("at")
class AttentionTransfer(Distiller):
    Config = AttentionTransferConfig

    def __init__(self, cfg: AttentionTransferConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        for s, t in self.pairs:
            check_spatial(s, s_shapes[s], t, t_shapes[t], cfg.resize, option="method.resize")

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        total = 0.0
        for s, t in self.pairs:
            ft = batch.teacher_features[t]
            qs = attention_map(batch.student_features[s], self.cfg.p, size=tuple(ft.shape[-2:]))
            total = total + (qs - attention_map(ft, self.cfg.p)).pow(2).mean()
        return {"at": self.cfg.weight * total}
