"""Semantic segmentation: targets are per-pixel class ids (B, H, W) with an ignore index, logits
(B, K, H, W); pixel cross-entropy, per-pixel Hinton KD, mIoU from a confusion matrix.

Choices (documented in README's segmentation section):

* Logits smaller than the mask (a model that predicts at a lower resolution) are bilinearly upsampled
  (``align_corners=False``) to the mask's size before the loss and the metric, as mmseg does.
* Per-pixel KD is ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the class axis at every pixel, averaged
  over all B*H*W pixels, ignored ones included: the teacher's prediction exists there too (the common
  choice of pixel-wise distillation, e.g. Liu et al. 2019's pixel term).
* Evaluation predicts the whole image (``Task.predict``), or, with ``data.eval_window`` (the bundle's
  ``eval_window`` / ``eval_stride``), slides windows over an image larger than one (mmseg's mode 'slide',
  :func:`slide_logits`): each window's logits are upsampled to the window and the overlapping windows'
  logits averaged per pixel; windows at the far edges are shifted back inside the image, so every pixel is
  covered, and a side shorter than the window is taken whole.
* A model whose output has an auxiliary head's logits (``{'out': ..., 'aux': ...}``: ``pspnet_*`` with
  ``aux_loss: true``, torchvision's segmenters with ``aux_loss=True``) trains it as well: the task terms are
  ``ce`` (the ``out`` logits) and ``aux`` = :data:`AUX_WEIGHT` x the same pixel cross-entropy of the ``aux``
  logits, both then multiplied by ``method.ce_weight``. The weight is mmseg's for PSPNet / FCN's auxiliary
  FCNHead (0.4; torchvision's reference script uses 0.5) and no config key: the task is built from the data
  alone. Evaluation and the KD term read ``out`` only.
* mIoU is the mean over classes whose union (prediction or ground truth) is not empty of
  ``TP / (TP + FP + FN)``, accumulated over the whole split (not averaged per image), ignored pixels
  excluded, as in mmseg / torchvision's reference scripts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.models import segmentation_logits
from featkd.tasks.base import Evaluator, Task

if TYPE_CHECKING:
    from featkd.capture.capture import CapturingModel

#: weight of the auxiliary head's pixel cross-entropy (an output ``{'out': ..., 'aux': ...}``), mmseg's
AUX_WEIGHT = 0.4


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


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side (mmseg's grid): ``ceil((length - window) / stride) + 1``
    windows ``stride`` apart, the last shifted back to end at ``length``; ``[0]`` when the side fits one."""
    if length <= window:
        return [0]
    count = (length - window + stride - 1) // stride + 1
    return [min(k * stride, length - window) for k in range(count)]


def slide_logits(forward: Callable[[Tensor], Tensor], x: Tensor, window: tuple[int, int],
                 stride: tuple[int, int]) -> Tensor:
    """float32 logits (B, K, H, W) of images ``x`` (B, C, H, W): ``forward`` (a batch of crops -> logits at any
    resolution) on every window, upsampled to the window, summed and divided by how many windows cover
    each pixel."""
    (h, w), (wh, ww) = x.shape[-2:], window
    total: Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=x.device)
    for y0 in window_starts(h, wh, stride[0]):
        for x0 in window_starts(w, ww, stride[1]):
            y1, x1 = min(y0 + wh, h), min(x0 + ww, w)
            logits = forward(x[..., y0:y1, x0:x1])
            if logits.shape[-2:] != (y1 - y0, x1 - x0):
                logits = F.interpolate(logits, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
            if total is None:
                total = torch.zeros(x.shape[0], logits.shape[1], h, w, device=x.device)
            total[..., y0:y1, x0:x1] += logits.float()
            count[..., y0:y1, x0:x1] += 1
    assert total is not None
    return total / count


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

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: tuple[str, ...] = (),
                 eval_window: tuple[int, int] | None = None, eval_stride: tuple[int, int] | None = None) -> None:
        super().__init__(num_classes)
        self.ignore_index, self.class_names = ignore_index, class_names
        self.eval_window = eval_window
        self.eval_stride = eval_stride or eval_window  # a window without a step: side by side

    @classmethod
    def from_data(cls, data) -> SegmentationTask:
        return cls(data.num_classes, getattr(data, "ignore_index", 255), tuple(getattr(data, "class_names", ())),
                   getattr(data, "eval_window", None), getattr(data, "eval_stride", None))

    def predict(self, model: nn.Module, x: Any) -> Any:
        """The whole image's output, or with an evaluation window and an image larger than it, the averaged
        logits (B, K, H, W) of the sliding windows (:func:`slide_logits`)."""
        window = self.eval_window
        if window is None or not isinstance(x, Tensor) or (x.shape[-2] <= window[0] and x.shape[-1] <= window[1]):
            return model(x)
        return slide_logits(lambda crop: self.logits(model(crop)), x, window, self.eval_stride or window)

    def forward_student(
        self, capture: CapturingModel | nn.Module, x: Any, targets: Any
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor] | None]:
        """The default forward; with an ``'aux'`` output the terms ``ce`` and ``aux`` (weighted by
        :data:`AUX_WEIGHT`, see the module docstring) instead of ``ce`` alone."""
        output, features = capture(x)
        logits = self.logits(output)
        aux = output.get("aux") if isinstance(output, Mapping) else None
        if aux is None:
            return logits, features, None
        return logits, features, {"ce": self.loss(logits, targets), "aux": AUX_WEIGHT * self.loss(aux, targets)}

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
