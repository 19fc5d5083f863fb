"""Decoupled KD (Zhao, Cui, Song, Qiu, Liang, CVPR 2022): Hinton's KL split into a target and a non-target part.

With ``p = softmax(z / T)`` over K classes and ``y`` the label, the binary distribution ``b = (p_y, 1 - p_y)``
and the distribution over the K - 1 other classes ``p^ = softmax(z_{k != y} / T)``:

* TCKD = ``T^2 * KL(b^t || b^s)`` (target class vs the rest), NCKD = ``T^2 * KL(p^t || p^s)`` (among the
  non-target classes), both summed over classes and averaged over the batch;
* ``loss = ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``, ``epoch`` 1-based.

This is mdistiller's ``mdistiller/distillers/DKD.py`` (the code users compare against): the same terms, the
same masking of the target logit (``- 1000`` on the scaled logits before NCKD's softmaxes) and the same
per-epoch linear warm-up of the whole DKD term. Ours: the binary log-probabilities are computed with
log-sum-exp (mdistiller takes ``log`` of summed softmax probabilities, which is -inf once ``1 - p_y`` underflows
in float32; the values are otherwise equal), everything runs in float32 under autocast, and TCKD and NCKD are
logged as two terms (``tckd``, ``nckd``, each with the warm-up factor; their sum is mdistiller's ``loss_kd``).

Defaults are mdistiller's ``CFG.DKD`` (``mdistiller/engine/cfg.py``): ``CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0,
T 4.0, WARMUP 20``; BETA 8 is its CIFAR-100 ResNet32x4 -> ResNet8x4 setting (its res56 -> res20 and
res110 -> res32 configs use 2.0, the WRN and VGG pairs 6.0; ImageNet 0.5 with T 1 and WARMUP 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.errors import ConfigError
from featkd.methods import register
from featkd.methods.base import EPOCH_COUNT, Batch, BuildContext, Distiller, DistillerConfig

#: subtracted from the target's scaled logit before NCKD's softmaxes (mdistiller: ``- 1000.0 * gt_mask``);
#: exp(-1000) is 0 in float32, so the target class carries no probability and no gradient
TARGET_MASK = 1000.0


@dataclass
class DKDConfig(DistillerConfig):
    ce_weight: float = 1.0  # mdistiller CFG.DKD.CE_WEIGHT
    alpha: float = 1.0  # TCKD weight, CFG.DKD.ALPHA
    beta: float = 8.0  # NCKD weight, CFG.DKD.BETA (CIFAR-100 res32x4 -> res8x4; res56 -> res20: 2.0)
    temperature: float = 4.0  # CFG.DKD.T
    # epochs of the linear warm-up of the DKD term, CFG.DKD.WARMUP (0: none); scaled by a shortened protocol
    warmup: int = field(default=20, metadata=EPOCH_COUNT)


def warmup_factor(epoch: int, warmup: int) -> float:
    """``min(epoch / warmup, 1)`` with mdistiller's 1-based ``epoch``, for featkd's 0-based ``epoch``."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)


def binary_log_probs(z: Tensor, gt: Tensor) -> Tensor:
    """(B, K) scaled logits, (B, K) bool label mask -> (B, 2) ``log (p_y, 1 - p_y)`` by log-sum-exp."""
    rest = (z - TARGET_MASK * gt).logsumexp(1, keepdim=True)  # log of the non-target classes' sum
    return torch.cat([z[gt].unsqueeze(1), rest], 1) - z.logsumexp(1, keepdim=True)


def dkd_terms(s_logits: Tensor, t_logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) of (B, K) logits and (B,) class ids, each ``T^2 * KL`` summed over classes, batch mean."""
    t2, b = temperature**2, s_logits.shape[0]
    zs, zt = s_logits.float() / temperature, t_logits.float().detach() / temperature
    gt = F.one_hot(target, zs.shape[1]).bool()
    log_bs, log_bt = binary_log_probs(zs, gt), binary_log_probs(zt, gt)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum() * t2 / b
    log_ps, log_pt = F.log_softmax(zs - TARGET_MASK * gt, dim=1), F.log_softmax(zt - TARGET_MASK * gt, dim=1)
    nckd = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True) * t2 / b
    return tckd, nckd


@register("dkd")
class DKD(Distiller):
    """Decoupled KD: logits only; the student's CE plus warmed-up ``alpha * TCKD + beta * NCKD``."""

    Config = DKDConfig
    tasks = ("classification",)
    task_reason = "its two terms split each example's class distribution at the label"
    class_targets = True  # the label splits the distribution: class ids, not mixup's soft targets

    def __init__(self, cfg: DKDConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.temperature <= 0:
            raise ConfigError(f"method.temperature: must be > 0, got {cfg.temperature}")
        for key in ("alpha", "beta"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"method.{key}: must be >= 0, got {getattr(cfg, key)}")
        if cfg.warmup < 0:
            raise ConfigError(f"method.warmup: must be >= 0 epochs, got {cfg.warmup}")

    def warmup_note(self, epochs: int) -> str | None:
        factor = warmup_factor(epochs - 1, self.cfg.warmup)
        if factor >= 1.0:
            return None
        return (f"method.warmup: {self.cfg.warmup} epochs is longer than the run ({epochs} epochs): the DKD term "
                f"reaches only {factor:.0%} of its weight at the last epoch; lower method.warmup")

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        with torch.autocast(batch.inputs.device.type, enabled=False):
            tckd, nckd = dkd_terms(batch.student_logits, batch.teacher_logits, batch.targets, cfg.temperature)
        factor = warmup_factor(batch.epoch, cfg.warmup)
        return {"tckd": factor * cfg.alpha * tckd, "nckd": factor * cfg.beta * nckd}
