"""Object detection and instance segmentation: torchvision-style detectors, their own losses, COCO AP.

Batches are ``(x, targets)``: ``x`` float32 (B, C, H, W) in [0, 1] (a detector normalises and resizes
inside, in its ``GeneralizedRCNNTransform``; a list of (C, H_i, W_i) tensors works as well), ``targets`` a
list of B dicts on the device: ``boxes`` float32 (N, 4) ``[x1, y1, x2, y2]`` in pixels, ``labels`` int64
(N,) in 1..K (0 is the background), ``iscrowd`` bool (N,), ``area`` float32 (N,) (COCO's ``area``: the
object's pixel area, which picks AP small/medium/large), ``image_id`` int64 (), and with ``data.masks``
``masks`` uint8 (N, H, W). Streamed data (:mod:`featkd.data.det_stream`) gives ``x`` as a list of images of
their own sizes; its evaluation targets stay at each image's original size and add ``orig_size`` and
``size`` (int64 (2,): the file's (H, W) and the resized image's), and the evaluator maps the predictions
back (:func:`to_original_size`) before scoring, so AP is COCO's at the annotation file's coordinates.

Choices:

* Training (:meth:`DetectionTask.forward_student`): the student is called with the images and the targets
  in train mode and returns its loss dict; the task loss is the sum of its terms, each logged as
  ``train_<term>`` (torchvision's ``loss_`` prefix dropped: ``classifier``, ``box_reg``, ``objectness``,
  ``rpn_box_reg``, ``mask``; RetinaNet / FCOS: ``classification``, ``bbox_regression``, ``bbox_ctrness``)
  and multiplied by ``ce_weight``. Crowd annotations (``iscrowd``) and degenerate boxes (``x2 <= x1`` or
  ``y2 <= y1``) are not trained on (as torchvision's COCO reference recipe does); crowd regions count in
  the evaluation as COCO defines (detections on them are neither true nor false positives).
* The teacher runs in eval mode without grad on the same images (:meth:`forward_teacher`): what the
  methods distil are its captured features. Its detections are not used: there is no logit-level KD for
  detection (``kd_weight > 0`` is a build-time error), and no training metric.
* Teacher and student must resize and normalise alike (:meth:`check_models`: the settings of their
  ``GeneralizedRCNNTransform``), or their feature maps would not line up.
* Evaluation (:class:`CocoEvaluator`): pycocotools' ``COCOeval`` on the split's ground truth as loaded
  (images without annotations included, crowd regions as crowd), box AP / AP50 / AP75 / AP small / medium
  / large in percent, and the same for masks when the model predicts masks and the data has them
  (``mask_ap``, ...). AP small / medium / large that COCO reports as -1 (no ground truth of that size) are
  left out. Each rank
  keeps its shard's predictions; :meth:`CocoEvaluator.reduce` gathers them on rank 0, which scores them and
  broadcasts the numbers.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from featkd.distributed import broadcast_object
from featkd.errors import ConfigError, FeatkdError
from featkd.tasks.base import Evaluator, Task, describe_output

if TYPE_CHECKING:
    from featkd.capture.capture import CapturingModel
    from featkd.data import DataBundle
    from featkd.distributed import DistInfo

#: COCOeval.stats indices of the six AP numbers, in this order
AP_NAMES = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")
MASK_AP_NAMES = tuple(f"mask_{n}" for n in AP_NAMES)
COCO_AREAS = ((0, 32**2), (32**2, 96**2), (96**2, 1e10))  # COCOeval's small / medium / large, bounds included
MASK_THRESHOLD = 0.5  # a predicted mask probability map (N, 1, H, W) is binarised at this value (torchvision)


def pycocotools():
    """``(pycocotools.coco.COCO, pycocotools.cocoeval.COCOeval, pycocotools.mask)``, or a one-line error."""
    try:
        from pycocotools import mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise FeatkdError("COCO evaluation needs pycocotools: pip install pycocotools "
                          "(or pip install 'featkd[coco]')") from None
    return COCO, COCOeval, mask


def training_targets(targets: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The targets a detector trains on: without crowd annotations and degenerate boxes, and with only the
    keys torchvision's detectors read (``boxes``, ``labels``, ``masks``).

    One test over the whole batch: when it drops nothing (the usual batch) the loader's own tensors are
    passed on, without a copy (torchvision's detectors copy what they change); only a batch with something to
    drop is indexed image by image. (Indexing every image cost nine small ops and, on a GPU, two host syncs
    per image: 0.99 ms a step at batch 8 on one CPU core, against 0.19 ms now.)"""
    keys = ("boxes", "labels", "masks")
    if not targets:
        return []
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if any("iscrowd" in t for t in targets):
        keep &= ~torch.cat([t["iscrowd"].bool() if "iscrowd" in t else keep.new_zeros(len(t["boxes"]))
                            for t in targets])
    if bool(keep.all()):
        return [{k: t[k] for k in keys if k in t} for t in targets]
    out = []
    for t, kept in zip(targets, keep.split([len(t["boxes"]) for t in targets]), strict=True):
        out.append({k: t[k][kept] for k in keys if k in t})
    return out


def _encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO compressed RLEs of binary masks (N, H, W)."""
    _, _, mask_utils = pycocotools()
    if len(masks) == 0:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' NumPy 2 __array__ warning
        return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) ``[x1, y1, x2, y2]`` -> COCO's ``[x, y, w, h]``."""
    out = boxes.astype(np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


def to_original_size(output: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A detector's output on an image resized for evaluation, mapped back to the image's original size when
    the target says both (``size``: the (H, W) fed to the model, ``orig_size``: the file's; streamed data,
    :mod:`featkd.data.det_stream`): boxes (M, 4) scaled per axis, mask probabilities (M, 1, h, w) resized
    bilinearly to the original size (torchvision's ``GeneralizedRCNNTransform.postprocess`` does the same
    for its own resize). Without those keys, or at the same size, ``output`` as it is."""
    if "orig_size" not in target or "size" not in target:
        return output
    (h, w), (oh, ow) = (tuple(int(v) for v in target[k].tolist()) for k in ("size", "orig_size"))
    out = dict(output)
    if (h, w) != (oh, ow):
        boxes = output["boxes"].float()
        out["boxes"] = boxes * boxes.new_tensor([ow / w, oh / h, ow / w, oh / h])
    masks = output.get("masks")
    if masks is not None and tuple(masks.shape[-2:]) != (oh, ow):
        if len(masks):
            out["masks"] = torch.nn.functional.interpolate(masks.float(), size=(oh, ow), mode="bilinear",
                                                           align_corners=False)
        else:
            out["masks"] = masks.new_zeros(0, masks.shape[1], oh, ow)
    return out


class CocoEvaluator(Evaluator):
    """COCO box (and mask) AP of one split's detections, scored by pycocotools (see the module docstring).

    :meth:`update` keeps, per image, the ground truth and the detections as NumPy arrays (masks as RLEs);
    nothing is scored until :meth:`reduce` or :meth:`result`.
    """

    def __init__(self, num_classes: int, device: torch.device, class_names: tuple[str, ...] = ()) -> None:
        pycocotools()  # fail before the evaluation loop, not after it
        self.num_classes, self.device, self.class_names = num_classes, device, class_names
        self.records: list[dict[str, Any]] = []
        self.state = torch.zeros(0, dtype=torch.float64)  # unused: predictions are gathered, not summed
        self._result: dict[str, Any] | None = None

    def update(self, outputs: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]) -> None:
        """``outputs``: the detector's eval output, one dict per image (``boxes`` (M, 4) xyxy, ``scores``
        (M,), ``labels`` (M,)[, ``masks`` (M, 1, H, W) probabilities]); ``targets`` as the module docstring."""
        if len(outputs) != len(targets):
            raise FeatkdError(f"the detector returned {len(outputs)} results for {len(targets)} images")
        for out, tgt in zip(outputs, targets, strict=True):
            out = to_original_size(out, tgt)
            boxes = tgt["boxes"].detach().float().cpu().numpy()
            n = len(boxes)
            rec: dict[str, Any] = {
                "image_id": int(tgt["image_id"]),
                "gt_boxes": boxes,
                "gt_labels": tgt["labels"].cpu().numpy().astype(np.int64),
                "gt_iscrowd": (tgt["iscrowd"].cpu().numpy().astype(bool) if "iscrowd" in tgt
                               else np.zeros(n, dtype=bool)),
                "gt_area": (tgt["area"].float().cpu().numpy() if "area" in tgt
                            else (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])),
                "boxes": out["boxes"].detach().float().cpu().numpy(),
                "scores": out["scores"].detach().float().cpu().numpy(),
                "labels": out["labels"].cpu().numpy().astype(np.int64),
            }
            if "orig_size" in tgt:
                rec["size"] = tuple(int(v) for v in tgt["orig_size"].tolist())
            if "masks" in tgt:
                rec["gt_masks"] = _encode_masks(tgt["masks"].cpu().numpy())
                rec["size"] = tuple(int(v) for v in tgt["masks"].shape[-2:])
            if "masks" in out:
                rec["masks"] = _encode_masks((out["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy())
            self.records.append(rec)
        self._result = None

    def reduce(self, dist: DistInfo) -> None:
        """Gather every rank's records on rank 0, score them there, broadcast the numbers to all ranks."""
        if not dist.enabled:
            self._result = self._score(self.records)
            return
        import torch.distributed as tdist

        gathered: list[Any] | None = [None] * dist.world_size if dist.is_main else None
        tdist.gather_object(self.records, gathered, dst=0)
        scored = self._score([r for part in gathered for r in part]) if dist.is_main else None
        self._result = broadcast_object(scored, dist)

    def result(self) -> dict[str, Any]:
        if self._result is None:
            self._result = self._score(self.records)
        return self._result

    def _score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        records = sorted(records, key=lambda r: r["image_id"])
        ids = [r["image_id"] for r in records]
        if len(set(ids)) != len(ids):
            raise FeatkdError("detection evaluation: the same image id was evaluated twice")
        with_masks = bool(records) and all("gt_masks" in r and "masks" in r for r in records)
        out: dict[str, Any] = {"class_names": list(self.class_names[1:]), "images": len(records),
                               "instances": int(sum((~r["gt_iscrowd"]).sum() for r in records)),
                               "detections": int(sum(len(r["scores"]) for r in records))}
        out.update(coco_ap(records, self.num_classes, "bbox"))
        if with_masks:
            out.update({f"mask_{k}": v for k, v in coco_ap(records, self.num_classes, "segm").items()})
        return out


def coco_ap(records: list[dict[str, Any]], num_classes: int, iou_type: str) -> dict[str, Any]:
    """pycocotools' AP of ``records`` (see :class:`CocoEvaluator`) as ``{ap, ap50, ap75, ap_s, ap_m, ap_l}``
    in percent, plus ``per_class_ap`` (list). Where COCO reports -1 (no ground truth of that kind) the size
    metrics are left out and ap / ap50 / ap75 are 0."""
    COCO, COCOeval, _ = pycocotools()
    images, gt_anns, dt_anns = [], [], []
    for r in records:
        images.append({"id": r["image_id"], **({"height": r["size"][0], "width": r["size"][1]} if "size" in r else {})})
        xywh = _xywh(r["gt_boxes"])
        for i in range(len(xywh)):
            ann = {"id": len(gt_anns) + 1, "image_id": r["image_id"], "category_id": int(r["gt_labels"][i]),
                   "bbox": xywh[i].tolist(), "area": float(r["gt_area"][i]), "iscrowd": int(r["gt_iscrowd"][i])}
            if iou_type == "segm":
                ann["segmentation"] = r["gt_masks"][i]
            gt_anns.append(ann)
        dt_xywh = _xywh(r["boxes"])
        for i in range(len(dt_xywh)):
            det = {"image_id": r["image_id"], "category_id": int(r["labels"][i]), "bbox": dt_xywh[i].tolist(),
                   "score": float(r["scores"][i])}
            if iou_type == "segm":
                det["segmentation"] = r["masks"][i]
            dt_anns.append(det)
    categories = [{"id": c} for c in range(1, num_classes)]  # label 0 is the background
    if not dt_anns:  # pycocotools cannot load an empty result list: AP 0 wherever there is ground truth
        areas = [a["area"] for a in gt_anns if not a["iscrowd"]]
        present = [True] * 3 + [any(lo <= a <= hi for a in areas) for lo, hi in COCO_AREAS]
        return {name: 0.0 for name, p in zip(AP_NAMES, present, strict=True) if p}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # it prints its progress, table
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' NumPy 2 __array__ warning
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        gt.createIndex()
        dt = gt.loadRes(dt_anns)
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {name: 100.0 * max(float(v), 0.0) for i, (name, v) in enumerate(zip(AP_NAMES, ev.stats[:6]))
                           if v >= 0 or i < 3}  # AP, AP50, AP75 always (0 without ground truth)
    # per-class AP at IoU 0.50:0.95, all areas, 100 detections (COCO's precision[T, R, K, A, M])
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k]
        per_class.append(100.0 * float(p[p > -1].mean()) if (p > -1).any() else None)
    out["per_class_ap"] = per_class
    return out


class DetectionTask(Task):
    name = "detection"
    metric = "ap"
    logged_metrics = (*AP_NAMES, *MASK_AP_NAMES)
    train_metric = None
    logits_ndim = 0  # unused: a detector's output is a list of dicts
    model_kind: ClassVar[str] = "detector"
    logit_kd = False

    def __init__(self, num_classes: int, class_names: tuple[str, ...] = (), masks: bool = False) -> None:
        super().__init__(num_classes)
        self.class_names, self.masks = class_names, masks

    @classmethod
    def from_data(cls, data: DataBundle) -> DetectionTask:
        return cls(data.num_classes, tuple(getattr(data, "class_names", ())), bool(getattr(data, "masks", False)))

    def logits(self, output: Any) -> Any:
        """A detector has no logits: its eval output (a list of dicts) is what the evaluator reads."""
        return output

    def forward_student(
        self, capture: CapturingModel | nn.Module, x: Any, targets: Any
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor] | None]:
        output, features = capture(x, training_targets(targets))
        if not isinstance(output, Mapping) or not all(isinstance(v, Tensor) for v in output.values()):
            raise FeatkdError(f"a detector in train mode must return its dict of losses, got {describe_output(output)}")
        terms = {str(k).removeprefix("loss_"): v.float() for k, v in output.items()}
        return None, features, terms

    def forward_teacher(self, capture: CapturingModel | nn.Module, x: Any) -> tuple[Any, dict[str, Tensor]]:
        """The teacher's features; when every point lies in its ``backbone``, only ``transform`` and
        ``backbone`` run (the calls its own eval forward starts with), not the heads and post-processing."""
        model, points = getattr(capture, "model", None), getattr(capture, "points", ())
        if (points and hasattr(model, "transform") and hasattr(model, "backbone")
                and not getattr(capture, "traced_whole", True)
                and all(p.startswith(("backbone.", "backbone[")) for p in points)):
            _, features = capture.run(lambda: model.backbone(model.transform(list(x))[0].tensors))
            return None, features
        _, features = capture(x)  # the whole eval forward: its detections are computed and dropped
        return None, features

    def check_output(self, output: Any, role: str, model_name: str, data_name: str) -> None:
        ok = (isinstance(output, (list, tuple)) and len(output) > 0
              and all(isinstance(o, Mapping) and {"boxes", "labels", "scores"} <= set(o) for o in output))
        if not ok:
            raise FeatkdError(
                f"{role}.model: {model_name!r} is {describe_output(output)}, but data set {data_name!r} is for "
                "detection: "
                "choose a detector (a list of {boxes, labels, scores} per image in eval mode), e.g. "
                "retinanet_resnet8 or torchvision:retinanet_resnet50_fpn"
            )

    def check_models(self, teacher: nn.Module | None, student: nn.Module, teacher_name: str, student_name: str,
                     data_name: str) -> None:
        from featkd.models.detection import predicts_masks, transform_settings

        for role, model, name in (("teacher", teacher, teacher_name), ("student", student, student_name)):
            if model is not None and predicts_masks(model) and not self.masks:
                raise ConfigError(f"{role}.model: {name!r} predicts instance masks; set data.masks: true so that "
                                  f"{data_name!r} decodes the masks it trains on")
        t, s = (transform_settings(teacher) if teacher is not None else None), transform_settings(student)
        if t is None or s is None:
            return
        if t != s:
            diff = ", ".join(k for k in t if t[k] != s.get(k))
            raise ConfigError(
                f"teacher {teacher_name!r} resizes and normalises with {_fmt(t)} but student {student_name!r} with "
                f"{_fmt(s)} (differ: {diff}); give both the same options so that their feature maps line up"
            )
        if len(s.get("min_size", ())) > 1:
            raise ConfigError(
                f"student {student_name!r}: min_size {list(s['min_size'])} resizes each training batch to a random "
                "size while the teacher (eval mode) uses the last; distil with one min_size"
            )

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        raise FeatkdError("detection has no task loss outside the detector's own loss dict")

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        raise FeatkdError("detection has no logit-level KD term; set method.kd_weight to 0")

    def train_counts(self, logits: Any, targets: Any) -> None:
        return None

    def evaluator(self, device: torch.device) -> Evaluator:
        return CocoEvaluator(self.num_classes, device, self.class_names)


def _fmt(settings: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"
