"""PKD: distillation by the Pearson correlation of feature maps (Cao, Zhang, Wen, Zhang, Wang, Xiao,
"PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS
2022, arXiv 2207.02039): standardise every channel of both maps, then regress one onto the other.

For every pair ``[student_point, teacher_point]`` with maps S, T of shape (N, C, H, W)::

    S <- bilinear resize of S to T's (H_t, W_t)                 when the sizes differ (``resize_student``)
    z(F)[n, c, h, w] = (F[n, c, h, w] - mean_c) / (std_c + 1e-6)     mean_c, std_c over (N, H, W) of channel c
    L_pair = mean over (n, c, h, w) of (z(S) - z(T))^2 / 2           = 1 - Pearson r, averaged over channels
    L_pkd  = weight * (sum of L_pair over the pairs)

What is the reference's (MMRazor ``mmrazor/models/losses/pkd_loss.py``, class ``PKDLoss``, read in its
repository; the paper's authors wrote it):

* the per-channel standardisation over (N, H, W) of BOTH maps, with the unbiased standard deviation
  (``Tensor.std``'s default) and ``1e-6`` added to it, then ``F.mse_loss(z_s, z_t) / 2``;
* the student map bilinearly resized (``F.interpolate``, ``align_corners=False``) to the teacher's size
  when they differ (``resize_stu=True``, the default); with ``resize_student: false`` the teacher map is
  resized to the student's instead;
* equal channel counts: the two FPNs it is made for both have 256 channels (MMRazor asserts equal shapes);
* one loss per FPN level, each with the same weight: 6 for Faster R-CNN
  (``configs/distill/mmdet/pkd/pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py``: FPN levels 0-3 of the neck), 10 for
  RetinaNet (``pkd_fpn_retina_x101_retina_r50_2x_coco.py``). Here: one pair per level and ``weight``
  (default 6) times their sum.

What is ours:

* the resize happens when the (H, W) sizes differ (MMRazor compares the heights only);
* a pair whose channel counts differ is an error naming ``method.connector``; with ``conv1x1`` a fresh 1x1
  convolution maps the student's channels to the teacher's first (as CWD and FitNets here);
* the teacher's maps are detached; the loss is computed in float32 (under autocast too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from featkd.errors import ConfigError, FeatkdError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig
from featkd.methods.common import channel_connectors, connected, conv1x1_connector, use_pairs

MMRAZOR_FRCNN_WEIGHT = 6.0  # configs/distill/mmdet/pkd/pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py
STD_EPS = 1e-6  # added to the standard deviation (MMRazor PKDLoss.norm)


@dataclass
class PKDConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...]
    weight: float = MMRAZOR_FRCNN_WEIGHT  # multiplies the sum of the pairs' losses
    resize_student: bool = True  # bilinear-resize the student map to the teacher's size (else the reverse)
    connector: Literal["none", "conv1x1"] = "none"  # for pairs whose channel counts differ

    def validate(self, path: str = "method") -> None:
        if not self.weight >= 0:
            raise ConfigError(f"{path}.weight: must be >= 0, got {self.weight!r}")


def channel_standardise(feat: Tensor) -> Tensor:
    """(N, C, H, W) -> the same shape, each channel minus its mean over (N, H, W), divided by its unbiased
    standard deviation over (N, H, W) plus 1e-6."""
    per_channel = feat.transpose(0, 1).flatten(1)  # (C, N * H * W)
    mean = per_channel.mean(dim=1)
    std = per_channel.std(dim=1)
    return (feat - mean[None, :, None, None]) / (std[None, :, None, None] + STD_EPS)


def pkd_loss(student: Tensor, teacher: Tensor, resize_student: bool = True) -> Tensor:
    """``mean((z(s) - z(t))^2) / 2`` of two maps (N, C, H, W) after resizing one to the other's size (see the
    module docstring); a scalar in float32, no gradient to ``teacher``."""
    s, t = student.float(), teacher.detach().float()
    if s.shape[-2:] != t.shape[-2:]:
        if resize_student:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        else:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(channel_standardise(s), channel_standardise(t)) / 2


@register("pkd")
class PKD(Distiller):
    Config = PKDConfig

    def __init__(self, cfg: PKDConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        for s, t in self.pairs:
            if len(s_shapes[s]) != 3 or len(t_shapes[t]) != 3:
                raise FeatkdError(f"student {s!r} {s_shapes[s]} and teacher {t!r} {t_shapes[t]}: PKD needs "
                                  "feature maps of shape (C, H, W)")
        make = None if cfg.connector == "none" else partial(conv1x1_connector, batchnorm=False)
        self.connectors = channel_connectors(self.pairs, s_shapes, t_shapes, make, "PKD", "conv1x1")

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        total = 0.0
        for i, (s, t) in enumerate(self.pairs):
            fs = connected(self.connectors, i, batch.student_features[s])
            total = total + pkd_loss(fs, batch.teacher_features[t], self.cfg.resize_student)
        return {"pkd": self.cfg.weight * total}
