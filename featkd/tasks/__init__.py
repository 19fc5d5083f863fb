"""Tasks: what a batch's targets are, how a model's output becomes logits, the task loss, the logit-level
KD term that fits the task, and the evaluator. One module per task behind :class:`~featkd.tasks.base.Task`.

The task of a run follows from its data set (``DataBundle.task``): ``classification`` (class ids, top-1),
``segmentation`` (per-pixel class ids, mIoU), ``detection`` (a list of target dicts per batch, the
detector's own losses, COCO box / mask AP by pycocotools).
"""

from __future__ import annotations

from featkd.registry import Registry
from featkd.tasks.base import Evaluator, Task
from featkd.tasks.classification import ClassificationTask
from featkd.tasks.detection import DetectionTask
from featkd.tasks.segmentation import SegmentationTask

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("classification")(ClassificationTask)
TASKS.register("segmentation")(SegmentationTask)
TASKS.register("detection")(DetectionTask)

__all__ = ["TASKS", "ClassificationTask", "DetectionTask", "Evaluator", "SegmentationTask", "Task", "task_for"]


def task_for(data) -> Task:
    """The task of a built :class:`~featkd.data.DataBundle` (its ``task`` field, default classification)."""
    return TASKS.get(getattr(data, "task", "classification")).from_data(data)
