"""The :class:`Task` interface: everything the trainer, the evaluation and the distillers need to know
about a task, so that none of them names one.

Per training step the trainer asks the task to run both models: ``task.forward_teacher(capture, x)`` ->
(teacher logits or None, teacher features) in eval mode without grad, and, inside the module DDP wraps,
``task.forward_student(capture, x, y)`` -> (student logits, student features, the model's own loss terms
or None). For classification and segmentation the student's forward is ``capture(x)`` and the logits are
``task.logits(output)`` (a classifier's (B, K) tensor, a torchvision segmenter's ``{'out': ...}``); a
torchvision detector is called with the targets in train mode and returns its loss dict instead
(:mod:`featkd.tasks.detection`). The distiller's forward asks the task for its named task terms
(``task.loss_terms``: ``{"ce": task.loss(logits, y)}`` by default, the detector's loss dict for
detection) and, with ``kd_weight > 0``, for the logit-level KD term that fits it (``task.kd_loss``: Hinton
over classes, per pixel for segmentation; tasks with ``logit_kd = False`` refuse ``kd_weight`` at build
time). The trainer accumulates ``task.train_counts`` for the epoch's training metric (None: the task has
none, e.g. detection).

Evaluation runs an :class:`Evaluator`: ``update`` per batch, then ``reduce(dist)`` once on every rank
(by default one all-reduce of its float64 :attr:`~Evaluator.state`; detection gathers its predictions on
rank 0, scores them there and broadcasts the numbers), then ``result()``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from featkd.errors import FeatkdError

if TYPE_CHECKING:
    from featkd.capture.capture import CapturingModel
    from featkd.data import DataBundle
    from featkd.distributed import DistInfo


class Evaluator:
    """Accumulates one split's predictions; :meth:`reduce` combines the ranks' shares, then :meth:`result`."""

    state: Tensor  # float64; the default :meth:`reduce` sums it across DDP ranks

    def update(self, logits: Any, targets: Any) -> None:
        raise NotImplementedError

    def reduce(self, dist: DistInfo) -> None:
        """Combine what every rank accumulated; called once, on every rank, after the last :meth:`update`.

        The default sums :attr:`state` over the ranks (one all-reduce); an evaluator whose state is not a
        tensor of sums (detection's predictions) overrides it."""
        dist.all_reduce_sum(self.state)

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
    #: what ``train_counts`` measures (logged as ``train_<name>``); None: no training metric
    train_metric: ClassVar[str | None]
    #: the rank of the logits this task expects, e.g. 2 for (B, K), 4 for (B, K, H, W)
    logits_ndim: ClassVar[int]
    #: what a model for this task is called in errors
    model_kind: ClassVar[str]
    #: whether the task has a logit-level KD term (``kd_weight > 0`` is refused at build time otherwise)
    logit_kd: ClassVar[bool] = True

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    @classmethod
    def from_data(cls, data: DataBundle) -> Task:
        return cls(data.num_classes)

    # ---- models ---------------------------------------------------------------------------------------
    def logits(self, output: Any) -> Tensor:
        """A model's raw output -> its logits."""
        return output

    def forward_student(
        self, capture: CapturingModel | nn.Module, x: Any, targets: Any
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor] | None]:
        """One training forward of the student: ``(logits, {point: feature}, task loss terms or None)``.

        ``capture`` returns ``(output, features)`` (a :class:`~featkd.capture.capture.CapturingModel`, possibly
        compiled). The default calls it on ``x`` alone and leaves the task loss to :meth:`loss_terms`; a task
        whose models compute their own loss (a detector in train mode) returns those terms here."""
        output, features = capture(x)
        return self.logits(output), features, None

    def predict(self, model: nn.Module, x: Any) -> Any:
        """A model's raw output on an evaluation batch ``x`` (eval mode, no grad: the caller's); a task that
        infers differently from training (sliding windows over large images) overrides it."""
        return model(x)

    def forward_teacher(self, capture: CapturingModel | nn.Module, x: Any) -> tuple[Any, dict[str, Tensor]]:
        """A frozen model's ``(logits or None, {point: feature})`` on ``x``; the caller holds no_grad and eval
        mode. The teacher in every training step; both models in the methods' statistics passes
        (``RunContext.iter_features``)."""
        output, features = capture(x)
        return self.logits(output), features

    def check_models(self, teacher: nn.Module | None, student: nn.Module, teacher_name: str, student_name: str,
                     data_name: str) -> None:
        """Raise a one-line error when the models do not fit this task and data beyond their output (detection:
        a mask head needs masks in the data; teacher and student must resize and normalise alike). Checked
        at build time, after :meth:`check_output`; ``teacher`` is None when the method needs none."""

    def check_output(self, output: Any, role: str, model_name: str, data_name: str) -> None:
        """Raise a one-line error when a model's output does not fit the task (checked at build time)."""
        try:
            logits = self.logits(output)
        except (KeyError, TypeError, AttributeError, FeatkdError):
            logits = None
        if not isinstance(logits, Tensor) or logits.ndim != self.logits_ndim:
            raise FeatkdError(
                f"{role}.model: {model_name!r} is {describe_output(output)}, but data set {data_name!r} is for "
                f"{self.name}: choose a {self.model_kind} (or a data set of the model's task)"
            )
        if logits.shape[1] != self.num_classes:
            raise FeatkdError(f"{role}.model: {model_name!r} predicts {logits.shape[1]} classes, data set "
                              f"{data_name!r} has {self.num_classes}")

    # ---- losses ---------------------------------------------------------------------------------------
    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The task loss (a scalar), computed in float32."""
        raise NotImplementedError

    def loss_terms(self, logits: Any, targets: Any, model_losses: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """The named, unweighted task terms of one batch (the distiller multiplies each by ``ce_weight``):
        ``{"ce": self.loss(logits, targets)}``, or the model's own terms from :meth:`forward_student`."""
        if model_losses is not None:
            return model_losses
        return {"ce": self.loss(logits, targets)}

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        """The logit-level distillation term of this task (a scalar)."""
        raise NotImplementedError

    def train_counts(self, logits: Any, targets: Any) -> tuple[Tensor, Tensor | int] | None:
        """(correct, counted) for the training metric of one batch; None when the task has none."""
        raise NotImplementedError

    def evaluator(self, device: torch.device) -> Evaluator:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, *, batch_size: int, dist: DistInfo, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]) -> dict[str, Any] | None:
        """A task that scores a model on other data than the run's own split (a label-free run: k-NN and a linear
        probe on a labelled set, :mod:`featkd.tasks.label_free`) returns its metrics here, on every rank (a
        collective); None (the default): the split's batches through :meth:`evaluator`."""
        return None


#: what a model whose logits have this many dimensions is, for the error above
_KIND_BY_NDIM = {2: "a classifier", 4: "a segmenter"}


def describe_output(output: Any) -> str:
    """'a segmenter (output (2, 11, 64, 64))', 'a classifier (output (2, 10))', 'a detector (...)', or what
    the output is."""
    if isinstance(output, dict) and isinstance(output.get("out"), Tensor):
        output = output["out"]
    if isinstance(output, Tensor):
        kind = _KIND_BY_NDIM.get(output.ndim, "a model")
        return f"{kind} (output {tuple(output.shape)})"
    if isinstance(output, dict):
        return f"a model whose output is a dict with keys {list(output)}"
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict) and "boxes" in output[0]:
        return f"a detector (output: a list of dicts with keys {list(output[0])})"
    return f"a model whose output is a {type(output).__name__}"
