"""Semantic segmentation: targets are per-pixel class ids (B, H, W) with an ignore index, logits
(B, K, H, W); pixel cross-entropy, per-pixel Hinton KD, mIoU from a confusion matrix.

Choices (documented in README's segmentation section):

* Logits smaller than the mask (a model that predicts at a lower resolution) are bilinearly upsampled
  (``align_corners=False``) to the mask's size before the loss and the metric, as mmseg does.
* Per-pixel KD is ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the class axis at every pixel, averaged
  over all B*H*W pixels, ignored ones included: the teacher's prediction exists there too (the common
  choice of pixel-wise distillation, e.g. Liu et al. 2019's pixel term).
* mIoU is the mean over classes whose union (prediction or ground truth) is not empty of
  ``TP / (TP + FP + FN)``, accumulated over the whole split (not averaged per image), ignored pixels
  excluded, as in mmseg / torchvision's reference scripts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.models import segmentation_logits
from featkd.tasks.base import Evaluator, Task


def pixel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-pixel Hinton term: (B, K, H, W) x 2 -> scalar, mean over pixels, float32."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean() * (t * t)


def to_mask_size(logits: Tensor, targets: Tensor) -> Tensor:
    """Bilinearly upsample logits (B, K, h, w) to the masks' (B, H, W) size; no-op when they agree."""
    if logits.shape[-2:] == targets.shape[-2:]:
        return logits
    return F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, over pixels whose target is valid."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: Tensor) -> tuple[Tensor, float, float]:
    """Per-class IoU (nan where the class is absent from prediction and ground truth), mIoU (%), pixel
    accuracy (%) of a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = 100.0 * iou[present].mean().item() if present.any() else 0.0
    acc = 100.0 * tp.sum().item() / max(1.0, cm.sum().item())
    return iou, miou, acc


class ConfusionEvaluator(Evaluator):
    """State: the flattened (K, K) confusion matrix, then (summed pixel cross-entropy, valid pixels)."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device,
                 class_names: tuple[str, ...] = ()) -> None:
        self.k, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.state = torch.zeros(num_classes * num_classes + 2, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        logits = to_mask_size(logits, targets)
        cm = confusion_matrix(logits.argmax(1), targets, self.k, self.ignore_index)
        self.state[: self.k * self.k] += cm.flatten()
        self.state[-2] += F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index,
                                          reduction="sum")
        self.state[-1] += cm.sum()

    def result(self) -> dict[str, Any]:
        iou, miou, acc = iou_from_confusion(self.state[: self.k * self.k].reshape(self.k, self.k))
        per_class = [None if torch.isnan(v) else 100.0 * v.item() for v in iou]
        return {"miou": miou, "pixel_acc": acc, "loss": self.state[-2].item() / max(1.0, self.state[-1].item()),
                "pixels": int(self.state[-1].item()), "iou_per_class": per_class,
                "class_names": list(self.class_names)}


class SegmentationTask(Task):
    name = "segmentation"
    metric = "miou"
    logged_metrics = ("miou", "pixel_acc", "loss")
    train_metric = "pixel_acc"
    logits_ndim = 4
    model_kind: ClassVar[str] = "segmenter"

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: tuple[str, ...] = ()) -> None:
        super().__init__(num_classes)
        self.ignore_index, self.class_names = ignore_index, class_names

    @classmethod
    def from_data(cls, data) -> SegmentationTask:
        return cls(data.num_classes, getattr(data, "ignore_index", 255), tuple(getattr(data, "class_names", ())))

    def logits(self, output: Any) -> Tensor:
        """torchvision segmenters return ``{'out': logits, 'aux': ...}``; featkd's return the tensor."""
        return segmentation_logits(output)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = to_mask_size(logits, targets)
        return F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index)

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        if student_logits.shape[-2:] != teacher_logits.shape[-2:]:
            student_logits = F.interpolate(student_logits, size=teacher_logits.shape[-2:], mode="bilinear",
                                           align_corners=False)
        return pixel_kd_loss(student_logits, teacher_logits, temperature)

    def train_counts(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        pred = to_mask_size(logits.detach(), targets).argmax(1)
        valid = targets != self.ignore_index
        return (pred.eq(targets) & valid).sum(), valid.sum()

    def evaluator(self, device: torch.device) -> Evaluator:
        return ConfusionEvaluator(self.num_classes, self.ignore_index, device, self.class_names)
