"""The training step's forward, written once: the teacher half and the student + distiller half.

The :class:`~featkd.engine.trainer.Trainer` and :class:`featkd.api.Distillation` (the user's own loop) both
call :func:`teacher_outputs` and :class:`TrainStep`, so a task's teacher forward (a detector's backbone-only
pass) and the :class:`~featkd.methods.base.Batch` the distiller sees are the same in either loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from featkd.capture.capture import CapturingModel
from featkd.methods.base import Batch, Distiller
from featkd.tasks import Task


def teacher_outputs(task: Task, teacher_capture: CapturingModel | nn.Module | None, x: Any
                    ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The frozen teacher's ``(logits or None, {point: (B, ...) feature})`` on ``x``, without grad;
    ``(None, {})`` when the method needs no teacher (``teacher_capture`` is None)."""
    if teacher_capture is None:
        return None, {}
    with torch.no_grad():
        return task.forward_teacher(teacher_capture, x)


class TrainStep(nn.Module):
    """Student capture + distiller as one module, so DDP synchronises both (the module DDP wraps)."""

    def __init__(self, student: CapturingModel, distiller: Distiller) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(
        self, x: Tensor, y: Any, t_logits: Tensor | None, t_feats: dict[str, Tensor], epoch: int, step: int,
        indices: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], Any]:
        """``({term: weighted loss}, student logits)`` for batch ``(x, y)`` given the teacher's outputs."""
        s_logits, s_feats, task_losses = self.distiller.task.forward_student(self.student, x, y)
        batch = Batch(inputs=x, targets=y, student_logits=s_logits, student_features=s_feats,
                      teacher_logits=t_logits, teacher_features=t_feats, epoch=epoch, step=step,
                      task_losses=task_losses, indices=indices)
        return self.distiller(batch), s_logits
