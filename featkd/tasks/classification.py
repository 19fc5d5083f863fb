"""Image classification: targets are class ids (B,), or class probabilities (B, K) (mixup / cutmix batches,
training only); logits (B, K); cross-entropy, Hinton KD, top-1 (against the most probable class of soft
targets)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.tasks.base import Evaluator, Task


def hinton_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch (Hinton et al. 2015).

    Shapes: logits (B, K) -> scalar. Computed in float32 for stability under autocast.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class TopOneEvaluator(Evaluator):
    """State: (correct, summed cross-entropy, count)."""

    def __init__(self, device: torch.device) -> None:
        self.state = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        self.state[0] += (logits.argmax(1) == targets).sum()
        self.state[1] += F.cross_entropy(logits.float(), targets, reduction="sum")
        self.state[2] += targets.numel()

    def result(self) -> dict[str, Any]:
        n = max(1.0, self.state[2].item())
        return {"acc": 100.0 * self.state[0].item() / n, "loss": self.state[1].item() / n,
                "samples": int(self.state[2].item())}


class ClassificationTask(Task):
    name = "classification"
    metric = "acc"
    logged_metrics = ("acc", "loss")
    train_metric = "acc"
    logits_ndim = 2
    model_kind: ClassVar[str] = "classifier"

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy against class ids (B,) or class probabilities (B, K) (torch takes either)."""
        return F.cross_entropy(logits.float(), targets.float() if targets.is_floating_point() else targets)

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        return hinton_kd_loss(student_logits, teacher_logits, temperature)

    def train_counts(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        if targets.ndim == 2:  # soft targets (mixup / cutmix): counted against their most probable class
            targets = targets.argmax(1)
        return (logits.detach().argmax(1) == targets).sum(), targets.numel()

    def evaluator(self, device: torch.device) -> Evaluator:
        return TopOneEvaluator(device)
