"""Channel-wise Transformation feature distillation, CWT (Liu, Wang, Chu et al., ICCV 2023 Workshops,
arXiv 2303.13212): regress the teacher's feature from the student's through a small nonlinear MLP of 1x1
convolutions, i.e. align the two maps along the channel dimension only.

For every pair ``[student_point, teacher_point]``::

    T(F_s) = W2( ReLU( W1(F_s) ) )          F_s (B, C_s, H, W) -> hidden (B, C_h, H, W) -> (B, C_t, H, W)
    L_feat = sum over pairs of  l2( T(F_s), detach(F_t) )
    L      = ce_weight * CE + [kd_weight * Hinton KD] + alpha * L_feat

What is the paper's (from its abstract and a secondary summary; no code was published):

* the transformation lives on the **student** side only, is a one-hidden-layer MLP ``W2(ReLU(W1(.)))`` made of
  1x1 convolutions (so it mixes channels, never positions) and maps C_s to C_t channels;
* the teacher's feature is used as it is (here: detached, so no gradient ever reaches the teacher);
* the loss is an L2 distance between ``T(F_s)`` and ``F_t``, added to the task loss with a **single**
  weight ``alpha``.

What is ours (the paper is silent or could not be read; each is an option of :class:`CWTConfig`):

* ``hidden_channels`` (default ``None`` = C_t, the teacher's channel count): the hidden width of the MLP.
* ``bias`` (default true: PyTorch's ``Conv2d`` default) and ``batchnorm`` (default ``"none"``, as in the
  paper's formula; ``"hidden"`` puts BatchNorm after W1 before the ReLU, ``"output"`` after W2 as in CRD's
  FitNets regressor, ``"both"`` both). A convolution followed by BatchNorm gets no bias (it would be
  cancelled by the normalisation). Weights use PyTorch's default ``Conv2d`` initialisation.
* ``reduction`` (default ``"mean"``): how the squared error of a pair is normalised. ``"mean"`` averages over
  every element (B * C_t * H * W), like FitNets here, so ``alpha`` does not depend on the map size, batch size
  or number of DDP ranks. ``"per_example_sum"`` sums over (C_t, H, W) and averages over the batch, the
  ``sum_i (MLP(F_s) - F_t)^2`` of the summary normalised per image (the convention of detection feature
  distillation, e.g. FKD / MGD); it is ``C_t * H * W`` times larger, so it needs a correspondingly smaller
  ``alpha``. A raw sum over the batch too is ``per_example_sum`` with ``alpha`` times the batch size.
* several pairs are **summed**, each with the same ``alpha`` (the paper has one weight; for detection it
  sums over FPN levels). Which levels: the paper likely uses the last backbone stage for classification;
  the shipped configs do (``[layer3, layer3]`` for the CIFAR-style ResNets). ``pairs`` must be given.
* ``alpha`` default 1.0: the same weight as FitNets' here, with ``reduction: mean``; chosen by us and
  checked by the alpha ablation on the Fashion-MNIST data-limited protocol (``docs/methods/cwt.md``).
* spatial sizes must match (the shared :func:`check_spatial` error) unless ``resize_teacher`` is set: the
  teacher map is then adaptive-average-pooled to the student's size (as FitNets here does).
* pooled vector features (``fc:input``, shape (C,)) are accepted for a pair where both sides are vectors:
  they are treated as 1x1 maps (the 1x1 convolutions then act as linear layers).

The MLPs are parameters of the distiller: they join the optimiser and every checkpoint and are never part
of the exported student. The loss is computed in float32 (the MLP itself runs under the trainer's autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from featkd.errors import ConfigError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig
from featkd.methods.common import check_spatial, resize_like, use_pairs

Reduction = Literal["mean", "per_example_sum"]
BatchNormPlace = Literal["none", "hidden", "output", "both"]


@dataclass
class CWTConfig(DistillerConfig):
    """Options of ``method: cwt``; see the module docstring for which are the paper's and which are ours."""

    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...] (required)
    alpha: float = 1.0  # paper: the single weight of L_feat; value ours (see docs/methods/cwt.md ablation)
    hidden_channels: int | None = None  # ours: hidden width of the MLP; None = the teacher's channels C_t
    bias: bool = True  # ours: biases of the 1x1 convs not followed by BatchNorm (PyTorch default)
    batchnorm: BatchNormPlace = "none"  # ours: BatchNorm after W1 ("hidden"), after W2 ("output"), both, none
    reduction: Reduction = "mean"  # ours: "mean" over all elements, or "per_example_sum" (sum C,H,W; mean B)
    resize_teacher: bool = False  # ours: adaptive-average-pool teacher maps to the student's spatial size

    def validate(self, path: str = "method") -> None:
        if self.alpha < 0:
            raise ConfigError(f"{path}.alpha: must be >= 0, got {self.alpha}")
        if self.hidden_channels is not None and self.hidden_channels < 1:
            raise ConfigError(f"{path}.hidden_channels: must be a positive integer or null (= teacher channels), "
                              f"got {self.hidden_channels}")


class ChannelTransform(nn.Sequential):
    """``W2(ReLU(W1(x)))`` with 1x1 convolutions: (B, C_in, H, W) -> (B, C_hidden, H, W) -> (B, C_out, H, W).

    ``batchnorm`` (``"none" | "hidden" | "output" | "both"``) inserts BatchNorm2d after W1 (before the ReLU)
    and/or after W2; a convolution followed by BatchNorm has no bias, the others have one if ``bias``.
    """

    def __init__(self, c_in: int, c_hidden: int, c_out: int, bias: bool = True,
                 batchnorm: BatchNormPlace = "none") -> None:
        bn_hidden = batchnorm in ("hidden", "both")
        bn_output = batchnorm in ("output", "both")
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_hidden, kernel_size=1, bias=bias and not bn_hidden)]
        if bn_hidden:
            layers.append(nn.BatchNorm2d(c_hidden))
        layers += [nn.ReLU(inplace=True), nn.Conv2d(c_hidden, c_out, kernel_size=1, bias=bias and not bn_output)]
        if bn_output:
            layers.append(nn.BatchNorm2d(c_out))
        super().__init__(*layers)


def cwt_l2(transformed: Tensor, teacher: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Squared L2 distance between (B, C, H, W) maps, in float32 -> scalar.

    ``"mean"``: ``mean((s - t)^2)`` over all B*C*H*W elements; ``"per_example_sum"``: sum over (C, H, W),
    mean over B.
    """
    sq = (transformed.float() - teacher.float()).pow(2)
    if reduction == "mean":
        return sq.mean()
    return sq.sum() / sq.shape[0]


def _as_map_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Per-example shape (C,) of a pooled vector -> (C, 1, 1); maps are returned unchanged."""
    return (shape[0], 1, 1) if len(shape) == 1 else tuple(shape)


def _as_map(x: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1); (B, C, H, W) unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


@register("cwt")
class CWT(Distiller):
    """One :class:`ChannelTransform` per pair (student -> teacher channels) and an L2 loss weighted by ``alpha``.

    Loss term ``"cwt"`` = ``alpha * sum_pairs cwt_l2(T_i(F_s_i), detach(F_t_i), reduction)``.
    """

    Config = CWTConfig

    def __init__(self, cfg: CWTConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        self.transforms = nn.ModuleList()
        for s, t in self.pairs:
            s_shape, t_shape = s_shapes[s], t_shapes[t]
            if len(s_shape) == 1 and len(t_shape) == 1:  # two pooled vectors: 1x1 "maps"
                s_shape, t_shape = _as_map_shape(s_shape), _as_map_shape(t_shape)
            check_spatial(s, s_shape, t, t_shape, cfg.resize_teacher)
            c_s, c_t = s_shape[0], t_shape[0]
            hidden = cfg.hidden_channels if cfg.hidden_channels is not None else c_t
            self.transforms.append(ChannelTransform(c_s, hidden, c_t, cfg.bias, cfg.batchnorm))

    def pair_losses(self, batch: Batch) -> list[Tensor]:
        """Unweighted L2 of each pair (float32 scalars), in the order of ``pairs``."""
        out = []
        for (s, t), transform in zip(self.pairs, self.transforms, strict=True):
            fs = transform(_as_map(batch.student_features[s]))
            # the teacher is a fixed target: detach even if the caller ran it with gradients on
            ft = resize_like(_as_map(batch.teacher_features[t]).detach(), fs.shape[-2:])
            out.append(cwt_l2(fs, ft, self.cfg.reduction))
        return out

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        total = torch.stack(self.pair_losses(batch)).sum()
        return {"cwt": self.cfg.alpha * total}
