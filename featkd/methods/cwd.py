"""Channel-wise distillation, CWD (Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021, arXiv 2011.13256): each channel of a map becomes a distribution over its H*W
positions, and the student's distributions are pulled to the teacher's with a KL divergence.

For every pair ``[student_point, teacher_point]`` with maps S, T of shape (N, C, H, W)::

    p_T[n, c] = softmax over the H*W positions of T[n, c] / tau      (one distribution per example, channel)
    p_S[n, c] = softmax over the H*W positions of S[n, c] / tau
    L_pair    = tau^2 / (N * C) * sum over (n, c) of KL(p_T[n, c] || p_S[n, c])
    L_cwd     = weight * (sum of L_pair over the pairs)

What is the paper's / the reference implementations' (MMRazor ``mmrazor/models/losses/cwd.py``, class
``ChannelWiseDivergence``, and the authors' ``SemSeg-distill/utils/criterion.py``, ``CriterionCWD`` with
``norm_type='channel', divergence='kl'``, both read in their repositories):

* the spatial softmax per channel with temperature tau on both sides, KL(teacher || student), the factor
  tau^2 and the normalisation by N * C (a sum over positions, not a mean): exactly MMRazor's;
* in segmentation, on the logits before upsampling: MMRazor's config records ``decode_head.conv_seg`` of
  both networks. The same point on featkd's and torchvision's segmenters is ``classifier`` (the head's
  output, (N, K, H/s, W/s)): ``pairs: [[classifier, classifier]]``;
* defaults ``weight`` 5 and ``tau`` 1: MMRazor's segmentation config
  ``configs/distill/mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py``
  (``ChannelWiseDivergence, tau=1, loss_weight=5``). Its detection configs
  (``configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py``) use ``tau=1, loss_weight=10`` on
  every FPN level, each level its own loss with that weight: here, one pair per level and ``weight: 10``;
* a 1x1 convolution on the student side when channel counts differ: the authors' code maps a student
  feature (128 ch) to the teacher's (512) with conv1x1-BN-ReLU (``connector: conv1x1-bn-relu`` here).

What is ours:

* ``connector`` (default ``"none"``): a pair whose channel counts differ is an error naming the option,
  since CWD compares channel c with channel c; with ``"conv1x1"``, ``"conv1x1-bn"`` (FitNets' connector) or
  ``"conv1x1-bn-relu"`` (the authors') a fresh connector maps the student's channels to the teacher's, for
  those pairs only: pairs with equal channel counts (logits: class c with class c) are compared directly.
* spatial sizes must match (MMRazor asserts it) unless ``resize_teacher``: the teacher map is then
  adaptive-average-pooled to the student's size, as FitNets does here.
* the teacher's maps are detached; the loss is computed in float32 (under autocast too); several pairs are
  summed with the one ``weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from featkd.errors import ConfigError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig
from featkd.methods.common import (
    channel_connectors,
    check_spatial,
    connected,
    conv1x1_connector,
    resize_like,
    use_pairs,
)

# MMRazor configs/distill/mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py
MMRAZOR_SEG_WEIGHT = 5.0
MMRAZOR_SEG_TAU = 1.0

Connector = Literal["none", "conv1x1", "conv1x1-bn", "conv1x1-bn-relu"]


@dataclass
class CWDConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...]
    weight: float = MMRAZOR_SEG_WEIGHT  # multiplies the sum of the pairs' divergences
    tau: float = MMRAZOR_SEG_TAU  # temperature of the spatial softmax
    connector: Connector = "none"  # for pairs whose channel counts differ
    resize_teacher: bool = False  # adaptive-average-pool teacher maps to the student's spatial size

    def validate(self, path: str = "method") -> None:
        if not self.tau > 0:
            raise ConfigError(f"{path}.tau: must be > 0, got {self.tau!r}")
        if not self.weight >= 0:
            raise ConfigError(f"{path}.weight: must be >= 0, got {self.weight!r}")


def channel_wise_divergence(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """``tau^2 / (N*C) * sum_{n,c} KL(softmax_hw(t[n,c]/tau) || softmax_hw(s[n,c]/tau))``, in float32.

    Shapes: ``student``, ``teacher`` (N, C, H, W) -> scalar. Gradients flow to ``student`` only.
    """
    n, c = student.shape[:2]
    log_p_s = F.log_softmax(student.float().flatten(2) / tau, dim=2)
    log_p_t = F.log_softmax(teacher.detach().float().flatten(2) / tau, dim=2)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * (tau * tau) / (n * c)


def _connector(kind: Connector) -> Callable[[int, int], nn.Module] | None:
    """How CWD's ``connector`` option maps c_in student channels to c_out teacher ones (None: it does not)."""
    if kind == "none":
        return None
    if kind == "conv1x1-bn-relu":
        return lambda c_in, c_out: nn.Sequential(conv1x1_connector(c_in, c_out, batchnorm=True), nn.ReLU())
    return lambda c_in, c_out: conv1x1_connector(c_in, c_out, batchnorm=kind == "conv1x1-bn")


@register("cwd")
class CWD(Distiller):
    Config = CWDConfig

    def __init__(self, cfg: CWDConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        for s, t in self.pairs:
            check_spatial(s, s_shapes[s], t, t_shapes[t], cfg.resize_teacher)
        self.connectors = channel_connectors(self.pairs, s_shapes, t_shapes, _connector(cfg.connector), "CWD",
                                             "conv1x1 (or conv1x1-bn, conv1x1-bn-relu)")

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        total = 0.0
        for i, (s, t) in enumerate(self.pairs):
            fs = connected(self.connectors, i, batch.student_features[s])
            ft = resize_like(batch.teacher_features[t], fs.shape[-2:])
            total = total + channel_wise_divergence(fs, ft, self.cfg.tau)
        return {"cwd": self.cfg.weight * total}
