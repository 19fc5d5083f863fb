"""Tasks: what a batch's targets are, how a model's output becomes logits, the task loss, the logit-level
KD term that fits the task, and the evaluator. One module per task behind :class:`~featkd.tasks.base.Task`.

The task of a run follows from its data set (``DataBundle.task``): ``classification`` (class ids, top-1),
``segmentation`` (per-pixel class ids, mIoU); a label-free classification set
(``data.labels: ignore``, ``dataset: unlabelled``) gets :class:`LabelFreeTask` (no task loss, k-NN and linear
probe), ``detection`` (a list of target dicts per batch, the
detector's own losses, COCO box / mask AP by pycocotools).
"""

from __future__ import annotations

from featkd.registry import Registry
from featkd.tasks.base import Evaluator, Task
from featkd.tasks.classification import ClassificationTask
from featkd.tasks.detection import DetectionTask
from featkd.tasks.label_free import LabelFreeTask
from featkd.tasks.segmentation import SegmentationTask

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("classification")(ClassificationTask)
TASKS.register("segmentation")(SegmentationTask)
TASKS.register("detection")(DetectionTask)

__all__ = ["TASKS", "ClassificationTask", "DetectionTask", "Evaluator", "LabelFreeTask", "SegmentationTask", "Task",
           "task_for"]


def task_for(data) -> Task:
    """The task of a built :class:`~featkd.data.DataBundle` (its ``task`` field, default classification); a
    label-free classification set (``labelled`` False) gets :class:`LabelFreeTask`."""
    if getattr(data, "task", "classification") == "classification" and not getattr(data, "labelled", True):
        return LabelFreeTask.from_data(data)
    return TASKS.get(getattr(data, "task", "classification")).from_data(data)
