"""The :class:`Task` interface: everything the trainer, the evaluation and the distillers need to know
about a task, so that none of them names one.

Per training step the trainer calls ``task.logits(output)`` on each model's raw output (a classifier's
(B, K) tensor, a torchvision segmenter's ``{'out': ...}`` dict), the distiller's forward asks the task for
its loss (``task.loss``) and, with ``kd_weight > 0``, for the logit-level KD term that fits it
(``task.kd_loss``: Hinton over classes, per pixel for segmentation), and the trainer accumulates
``task.train_counts`` for the epoch's training metric. Evaluation runs an :class:`Evaluator` whose state is
one float64 tensor, so a sum over DDP ranks is one all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from featkd.errors import FeatkdError

if TYPE_CHECKING:
    from featkd.data import DataBundle


class Evaluator:
    """Accumulates one split's predictions; :attr:`state` is summed over ranks, then :meth:`result`."""

    state: Tensor  # float64, summed across DDP ranks by the caller

    def update(self, logits: Tensor, targets: Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        """Named metrics of the (reduced) state; scalar values are logged per epoch, lists only reported."""
        raise NotImplementedError


class Task:
    """One kind of prediction problem; subclasses in ``featkd/tasks/<task>.py``."""

    name: ClassVar[str]
    #: the headline metric (higher is better): best.pt, bench tables and summaries use it
    metric: ClassVar[str]
    #: the evaluator's scalar results logged per epoch as ``val_<name>`` / ``test_<name>``
    logged_metrics: ClassVar[tuple[str, ...]]
    #: what ``train_counts`` measures (logged as ``train_<name>``)
    train_metric: ClassVar[str]
    #: the rank of the logits this task expects, e.g. 2 for (B, K), 4 for (B, K, H, W)
    logits_ndim: ClassVar[int]
    #: what a model for this task is called in errors
    model_kind: ClassVar[str]

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    @classmethod
    def from_data(cls, data: DataBundle) -> Task:
        return cls(data.num_classes)

    # ---- models ---------------------------------------------------------------------------------------
    def logits(self, output: Any) -> Tensor:
        """A model's raw output -> its logits."""
        return output

    def check_output(self, output: Any, role: str, model_name: str, data_name: str) -> None:
        """Raise a one-line error when a model's output does not fit the task (checked at build time)."""
        try:
            logits = self.logits(output)
        except (KeyError, TypeError, AttributeError, FeatkdError):
            logits = None
        if not isinstance(logits, Tensor) or logits.ndim != self.logits_ndim:
            raise FeatkdError(
                f"{role}.model: {model_name!r} is {_describe(output)}, but data set {data_name!r} is for "
                f"{self.name}: choose a {self.model_kind} (or a data set of the model's task)"
            )
        if logits.shape[1] != self.num_classes:
            raise FeatkdError(f"{role}.model: {model_name!r} predicts {logits.shape[1]} classes, data set "
                              f"{data_name!r} has {self.num_classes}")

    # ---- losses ---------------------------------------------------------------------------------------
    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The task loss (a scalar), computed in float32."""
        raise NotImplementedError

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        """The logit-level distillation term of this task (a scalar)."""
        raise NotImplementedError

    def train_counts(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        """(correct, counted) for the training metric of one batch."""
        raise NotImplementedError

    def evaluator(self, device: torch.device) -> Evaluator:
        raise NotImplementedError


#: what a model whose logits have this many dimensions is, for the error above
_KIND_BY_NDIM = {2: "a classifier", 4: "a segmenter"}


def _describe(output: Any) -> str:
    """'a segmenter (output (2, 11, 64, 64))', 'a classifier (output (2, 10))', or what the output is."""
    if isinstance(output, dict) and isinstance(output.get("out"), Tensor):
        output = output["out"]
    if isinstance(output, Tensor):
        kind = _KIND_BY_NDIM.get(output.ndim, "a model")
        return f"{kind} (output {tuple(output.shape)})"
    if isinstance(output, dict):
        return f"a model whose output is a dict with keys {list(output)}"
    return f"a model whose output is a {type(output).__name__}"
