"""Detection: the COCO loader on tiny files in COCO's layout, our evaluation against pycocotools' own, capture
on torchvision detectors, PKD by hand, the build-time errors, and short training runs on real scenes.
Real files and models, no mocks."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featkd.capture.capture import CapturingModel
from featkd.capture.points import expand_entry_pairs, pair_by_stride
from featkd.config import build_config
from featkd.data import DataConfig, build_data
from featkd.engine.build import build_run
from featkd.errors import ConfigError, DataError, FeatkdError
from featkd.methods.pkd import pkd_loss
from featkd.models import create_model
from featkd.tasks.detection import DetectionTask, training_targets

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 40, 48  # every tiny image here is 48 wide, 40 high


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    from featkd.data.coco import rle_encode

    return rle_encode(mask)


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def instances() -> dict:
    """Three images: two objects + a crowd region; one object; none. Categories 3 and 7 (labels 1 and 2)."""
    images = [{"id": 10, "file_name": "a.png", "width": W, "height": H},
              {"id": 11, "file_name": "b.png", "width": W, "height": H},
              {"id": 12, "file_name": "c.png", "width": W, "height": H}]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 16, 12], "area": 192.0, "iscrowd": 0,
         "segmentation": [[4, 4, 20, 4, 20, 16, 4, 16]]},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [24, 10, 20, 20], "area": 400.0, "iscrowd": 0,
         "segmentation": uncompressed_rle(rect(10, 30, 24, 44))},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 30, 48, 10], "area": 480.0, "iscrowd": 1,
         "segmentation": compressed_rle(rect(30, 40, 0, 48))},
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [10, 8, 30, 25], "area": 1100.0, "iscrowd": 0,
         "segmentation": [[10, 8, 40, 8, 40, 33, 10, 33]]},
    ]
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    return {"images": images, "annotations": anns, "categories": cats}


def write_coco(root: Path, data: dict | None = None, splits: tuple[str, ...] = ("train", "val"),
               skip_image: str | None = None) -> Path:
    data = instances() if data is None else data
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in splits:
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).mkdir(exist_ok=True)
        for image in data["images"]:
            if image["file_name"] != skip_image:
                pixels = rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / image["file_name"])
    return root


def test_coco_loader_reads_polygons_rle_crowd_and_empty_images(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True, batch_size=3))
    assert data.task == "detection" and data.num_classes == 3 and data.masks
    assert data.class_names == ("background", "three", "seven")  # categories by id: 3 -> 1, 7 -> 2
    assert data.input_shape == (3, H, W) and data.train_size == data.test_size == 3
    x, ys = next(iter(data.test_loader(3)))
    assert x.shape == (3, 3, H, W) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    a, _, c = ys
    assert a["image_id"].item() == 10 and c["image_id"].item() == 12
    assert a["labels"].tolist() == [1, 2, 1] and a["iscrowd"].tolist() == [False, False, True]
    assert a["boxes"].tolist() == [[4, 4, 20, 16], [24, 10, 44, 30], [0, 30, 48, 40]]
    assert a["area"].tolist() == [192, 400, 480]
    assert a["masks"].shape == (3, H, W) and a["masks"].dtype == torch.uint8
    assert torch.equal(a["masks"][1].bool(), torch.from_numpy(rect(10, 30, 24, 44)))  # uncompressed RLE
    assert torch.equal(a["masks"][2].bool(), torch.from_numpy(rect(30, 40, 0, 48)))  # compressed RLE (crowd)
    poly = a["masks"][0].bool()  # polygon, rasterised by pycocotools
    assert poly[5:15, 5:19].all() and not poly[20:].any() and not poly[:, 22:].any()
    assert c["boxes"].shape == (0, 4) and c["labels"].shape == (0,) and c["masks"].shape == (0, H, W)
    trained = training_targets(ys)  # crowd regions are not trained on
    assert trained[0]["labels"].tolist() == [1, 2] and set(trained[0]) == {"boxes", "labels", "masks"}
    # data.image_size resizes images, boxes, areas and masks once
    half = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True, image_size=[20, 24]))
    _, ys2 = next(iter(half.test_loader(3)))
    assert ys2[0]["boxes"].tolist() == [[2, 2, 10, 8], [12, 5, 22, 15], [0, 15, 24, 20]]
    assert ys2[0]["area"].tolist() == [48, 100, 120] and ys2[0]["masks"].shape == (3, 20, 24)
    # the training flip moves boxes and masks with the image
    train = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True, batch_size=3))
    reference = next(iter(train.train_eval_loader(3)))[0][0]  # training image 10 without augmentation
    flipped = False
    for epoch in range(8):
        loader = train.train_loader(3, seed=0)
        loader.set_epoch(epoch)
        for x, ys in loader:
            for img, y in zip(x, ys, strict=True):
                if y["image_id"].item() != 10 or y["boxes"][0, 0].item() == 4:
                    continue
                flipped = True
                assert torch.equal(img, reference.flip(-1))
                assert y["boxes"].tolist()[1] == [W - 44, 10, W - 24, 30]
                assert torch.equal(y["masks"][1].bool(), torch.from_numpy(rect(10, 30, 24, 44)[:, ::-1].copy()))
    assert flipped


def detections() -> list[dict]:
    """(image, category, [x, y, w, h], score): true positives, one on the crowd region, false positives (one
    of the wrong class, one on the empty image)."""
    dets = [(10, 3, [5, 4, 15, 12], 0.9), (10, 7, [25, 11, 19, 19], 0.8), (10, 3, [2, 31, 20, 9], 0.7),
            (10, 7, [0, 0, 10, 10], 0.3), (11, 7, [12, 8, 28, 26], 0.6), (11, 3, [10, 8, 30, 25], 0.5),
            (12, 3, [5, 5, 10, 10], 0.4), (11, 7, [30, 20, 10, 10], 0.2)]
    out = []
    for image_id, cat, (x, y, w, h), score in dets:
        m = rect(y, y + h, x, x + w)
        out.append({"image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "score": score,
                    "segmentation": compressed_rle(m), "_mask": m})
    return out


def pycocotools_stats(gt_file: Path, dets: list[dict], iou_type: str) -> list[float]:
    gt = COCO(str(gt_file))
    dt = gt.loadRes([{k: v for k, v in d.items() if k != "_mask"} for d in dets])
    ev = COCOeval(gt, dt, iouType=iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [100.0 * float(v) for v in ev.stats[:6]]


def test_training_targets_drop_crowd_and_degenerate_boxes_and_pass_clean_batches_as_they_are():
    def target(boxes, crowd=None, masks=False):
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.arange(1, len(boxes) + 1), "area": torch.ones(len(boxes)), "image_id": torch.tensor(0)}
        if crowd is not None:
            t["iscrowd"] = torch.tensor(crowd, dtype=torch.bool)
        if masks:
            t["masks"] = torch.arange(len(boxes), dtype=torch.uint8)[:, None, None].expand(-1, 2, 2).contiguous()
        return t

    clean = [target([[0, 0, 4, 4]], [False]), target([]), target([[1, 1, 2, 3], [0, 0, 5, 5]])]  # one without iscrowd
    out = training_targets(clean)
    assert [set(t) for t in out] == [{"boxes", "labels"}] * 3
    assert all(o[k] is t[k] for o, t in zip(out, clean) for k in o)  # nothing to drop: the loader's tensors
    mixed = [target([[0, 0, 4, 4], [3, 3, 3, 5], [0, 0, 2, 2]], [False, False, True], masks=True),  # zero width, crowd
             target([[2, 2, 6, 1]]), target([[0, 0, 1, 1]], [False], masks=True)]  # y2 < y1; kept
    out = training_targets(mixed)
    assert [t["labels"].tolist() for t in out] == [[1], [], [1]]
    assert out[0]["boxes"].tolist() == [[0, 0, 4, 4]] and out[1]["boxes"].shape == (0, 4)
    assert out[0]["masks"][:, 0, 0].tolist() == [0] and set(out[1]) == {"boxes", "labels"}
    assert training_targets([]) == []


def test_our_evaluation_equals_pycocotools_on_a_hand_made_case(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True))
    task = DetectionTask.from_data(data)
    label = {3: 1, 7: 2}
    dets = detections()
    evaluator = task.evaluator(torch.device("cpu"))
    for _, ys in data.test_loader(2):  # two batches: the evaluator accumulates across them
        outputs = []
        for y in ys:
            mine = [d for d in dets if d["image_id"] == y["image_id"].item()]
            xywh = torch.tensor([d["bbox"] for d in mine], dtype=torch.float32).reshape(-1, 4)
            outputs.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                            "scores": torch.tensor([d["score"] for d in mine]),
                            "labels": torch.tensor([label[d["category_id"]] for d in mine]),
                            "masks": torch.stack([torch.from_numpy(d["_mask"]).float()[None] for d in mine])
                            if mine else torch.zeros(0, 1, H, W)})
        evaluator.update(outputs, ys)
    result = evaluator.result()
    gt_file = root / "annotations" / "instances_val.json"
    box, segm = pycocotools_stats(gt_file, dets, "bbox"), pycocotools_stats(gt_file, dets, "segm")
    print("ours  box", [round(result[k], 4) for k in ("ap", "ap50", "ap75", "ap_s", "ap_m")],
          "mask", [round(result[k], 4) for k in ("mask_ap", "mask_ap50", "mask_ap75", "mask_ap_s", "mask_ap_m")])
    print("pycocotools box", [round(v, 4) for v in box], "mask", [round(v, 4) for v in segm])
    for i, name in enumerate(("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")):
        for prefix, stats in (("", box), ("mask_", segm)):
            if stats[i] < 0:  # COCO's "no ground truth of this size" (no large objects here)
                assert f"{prefix}{name}" not in result
            else:
                assert result[f"{prefix}{name}"] == pytest.approx(stats[i], abs=1e-9), prefix + name
    assert 0 < result["ap"] < 100 and result["images"] == 3 and result["instances"] == 3
    assert result["class_names"] == ["three", "seven"] and len(result["per_class_ap"]) == 2


def test_evaluation_without_detections_is_zero_where_there_is_ground_truth(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root)))
    evaluator = DetectionTask.from_data(data).evaluator(torch.device("cpu"))
    for _, ys in data.test_loader(3):
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        evaluator.update([empty] * len(ys), ys)
    result = evaluator.result()
    assert result["ap"] == result["ap50"] == result["ap_s"] == result["ap_m"] == 0.0 and "ap_l" not in result


def _bad(data: dict, what: str) -> dict:
    data = copy.deepcopy(data)
    ann = data["annotations"][0]
    if what == "x2 < x1":
        ann["bbox"] = [10, 4, -6, 12]
    elif what == "nan":
        ann["bbox"] = [4, 4, math.nan, 12]
    elif what == "outside":
        ann["bbox"] = [40, 30, 20, 20]
    elif what == "category":
        ann["category_id"] = 99
    return data


@pytest.mark.parametrize(("what", "expected"), [
    ("x2 < x1", "negative width or height"), ("nan", "not finite"), ("outside", "lies outside its image a.png"),
    ("category", "category_id 99 is not in the categories list (3, 7)"),
])
def test_bad_annotations_name_the_file_and_the_annotation(tmp_path, what, expected):
    root = write_coco(tmp_path / "coco", _bad(instances(), what))
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="coco", data_dir=str(root)))
    message = one_line(exc)
    assert "instances_train.json: annotation 1:" in message and expected in message, message


def test_missing_image_file_is_named(tmp_path):
    root = write_coco(tmp_path / "coco", skip_image="b.png")
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="coco", data_dir=str(root)))
    assert f"image file {root / 'train' / 'b.png'} not found" in one_line(exc)


def test_images_of_different_sizes_need_image_size(tmp_path):
    data = instances()
    data["images"][1].update(width=40, height=30)
    data["annotations"][3]["bbox"] = [1, 1, 20, 20]
    root = write_coco(tmp_path / "coco", data)
    with pytest.raises(DataError) as exc:  # data.storage auto streams them instead (tests/test_coco_stream.py)
        build_data(DataConfig(dataset="coco", data_dir=str(root), storage="memory"))
    assert "set data.image_size" in one_line(exc)
    assert build_data(DataConfig(dataset="coco", data_dir=str(root), image_size=32)).input_shape == (3, 32, 32)


#: torchvision detectors kept cheap on a CPU: small resize, few proposals and detections
LIGHT_RCNN = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20,
              "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 16,
              "box_detections_per_img": 5}


def det_config(data: dict, student: str = "retinanet_resnet8", method: dict | None = None, teacher: str | None = None,
               **student_options) -> dict:
    raw = {"data": data, "student": {"model": student, "options": student_options},
           "method": method or {"name": "none"}, "train": {"epochs": 1, "progress": "off", "tensorboard": False}}
    if teacher:
        raw["teacher"] = {"model": teacher}
    return raw


def test_build_errors_are_one_line(tmp_path):
    root = str(write_coco(tmp_path / "coco"))
    coco = {"dataset": "coco", "data_dir": root}
    cases = [
        (det_config({"dataset": "digits"}), "student.model: 'retinanet_resnet8' is a detector (output: a list of "
         "dicts with keys ['boxes', 'scores', 'labels']), but data set 'digits' is for classification"),
        (det_config(coco, student="resnet8"), "is a classifier (output (2, 3)), but data set 'coco' is for detection"),
        (det_config(coco, method={"name": "fitnets", "kd_weight": 1.0,
                                  "pairs": [["backbone.fpn[0]", "backbone.fpn[0]"]]}, teacher="retinanet_resnet8"),
         "method.kd_weight: detection has no logit-level KD term"),
        (det_config(coco, method={"name": "fitnets", "pairs": [["backbone.fpn[0]", "backbone.fpn[0]"]]},
                    teacher="retinanet_resnet8", min_size=48, max_size=48),
         "teacher 'retinanet_resnet8' resizes and normalises with (resize none, "),
        (det_config(coco, method={"name": "kda"}, teacher="retinanet_resnet8"), "'kda' is defined for classification"),
        (det_config(coco, student="torchvision:maskrcnn_resnet50_fpn", **LIGHT_RCNN),
         "predicts instance masks; set data.masks: true"),
    ]
    for raw, expected in cases:
        with pytest.raises(FeatkdError) as exc:
            build_run(build_config(raw), log=lambda _m: None)
        assert expected in one_line(exc), one_line(exc)


@pytest.mark.parametrize(("name", "options"), [
    ("retinanet_resnet50_fpn", {"min_size": 64, "max_size": 64}),
    ("fasterrcnn_resnet50_fpn", LIGHT_RCNN),
    ("maskrcnn_resnet50_fpn", LIGHT_RCNN),
])
def test_capture_on_torchvision_detectors(name, options, one_thread):
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=3, **options)
    points = ["backbone.body.layer2.0.add", "backbone.body.layer2.0", "backbone.body.layer3", "backbone.fpn[0]"]
    capture = CapturingModel(model, points, torch.zeros(2, 3, 64, 64))
    assert capture.shapes["backbone.body.layer2.0.add"] == (512, 8, 8)  # stride 8 of the resized 64-px input
    assert capture.shapes["backbone.fpn[0]"][0] == 256
    model.train()
    x = torch.rand(2, 3, 64, 64)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([2]),
              "masks": torch.from_numpy(np.pad(np.ones((28, 32), np.uint8), ((8, 28), (8, 24))))[None]}
    losses, feats = capture(x, [target, target])
    assert isinstance(losses, dict) and all(v.ndim == 0 for v in losses.values())
    pre, post = feats["backbone.body.layer2.0.add"], feats["backbone.body.layer2.0"]
    assert (pre < 0).any() and (post >= 0).all() and torch.equal(post, pre.clamp_min(0))  # pre-ReLU, despite in place
    (sum(losses.values()) + feats["backbone.fpn[0]"].square().mean()).backward()
    assert model.backbone.body.layer1[0].conv1.weight.grad is not None
    if name.startswith("maskrcnn"):
        assert "loss_mask" in losses


def test_levels_pair_by_stride_not_by_index(one_thread):
    teacher = create_model("torchvision:fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, min_size=128,
                           max_size=128)
    student = create_model("retinanet_resnet8", num_classes=3)
    pairs = expand_entry_pairs([["backbone.fpn[*]", "backbone.fpn[*]"], ["backbone.body.layer3", "x"]], teacher,
                               student, torch.zeros(2, 3, 128, 128))
    # mobilenet's FPN: '0' and '1' both stride 32, 'pool' 64; the student's: '0' 8, '1' 16, 'p6' 32, 'p7' 64
    assert pairs == [["backbone.fpn[p6]", "backbone.fpn[0]"], ["backbone.fpn[p7]", "backbone.fpn[pool]"],
                     ["backbone.body.layer3", "x"]]
    assert pair_by_stride({"a": 8, "b": 32, "c": 32}, {"x": 32, "y": 32, "z": 16}) == [("b", "x"), ("c", "y")]
    with pytest.raises(ConfigError):
        expand_entry_pairs([["backbone.fpn[*]", "backbone.fpn[0]"]], teacher, student, torch.zeros(2, 3, 64, 64))


def test_teacher_runs_only_its_backbone_when_every_point_is_there(one_thread):
    task = DetectionTask(3)
    model = create_model("fcos_resnet8", num_classes=3).eval()
    calls = []
    model.head.register_forward_hook(lambda *_: calls.append(1))
    for points, head_runs in ((["backbone.fpn[0]", "backbone.body.layer2.0.add"], False), (["head[cls_logits]"], True)):
        capture = CapturingModel(model, points, torch.zeros(2, 3, 64, 64))
        x = torch.rand(3, 3, 64, 64)
        with torch.no_grad():
            _, full = capture(x)
            calls.clear()
            _, fast = task.forward_teacher(capture, x)
        assert fast.keys() == full.keys() and all(torch.equal(fast[k], full[k]) for k in full)
        assert bool(calls) == head_runs


def test_pkd_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g) * 3 + 1
    want = 0.0
    for c in range(3):
        a, b = s[:, c].flatten().double(), t[:, c].flatten().double()
        za = (a - a.mean()) / (a.std() + 1e-6)  # unbiased std, as MMRazor's Tensor.std
        zb = (b - b.mean()) / (b.std() + 1e-6)
        want += float(((za - zb) ** 2).sum())
    want = want / s.numel() / 2
    assert float(pkd_loss(s, t)) == pytest.approx(want, rel=1e-5)
    # = 1 - Pearson r per channel (up to the unbiased std's n / (n - 1)), averaged over channels
    r = [float(torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1]) for c in range(3)]
    n = s[:, 0].numel()
    assert float(pkd_loss(s, t)) == pytest.approx(sum(1 - v for v in r) / 3 * (n - 1) / n, rel=1e-4)
    # the student is bilinearly resized to the teacher's size (MMRazor's resize_stu)
    small = torch.randn(2, 3, 2, 3, generator=g)
    up = torch.nn.functional.interpolate(small, size=(4, 5), mode="bilinear", align_corners=False)
    assert float(pkd_loss(small, t)) == pytest.approx(float(pkd_loss(up, t)), rel=1e-6)
    assert float(pkd_loss(t, t)) == pytest.approx(0.0, abs=1e-10)


# ---- short runs on real scenes ------------------------------------------------------------------------

SCENES = {"canvas_size": 64, "train_size": 320, "test_size": 96, "max_scale": 1.4}


def test_statistics_passes_run_only_the_backbones_of_both_detectors(one_thread):
    """MGD's matching pass (RunContext.iter_features) takes the task's frozen-model forward: trunk features
    equal to the full forward's, and neither detector's head (nor post-processing) runs."""
    from featkd.distributed import DistInfo
    from featkd.methods.base import RunContext

    task = DetectionTask(3)
    teacher = create_model("fcos_resnet20", num_classes=3).eval()
    student = create_model("fcos_resnet8", num_classes=3).train()
    calls = []
    for model in (teacher, student):
        model.head.register_forward_hook(lambda *_: calls.append(1))
    example = torch.zeros(2, 3, 64, 64)
    points = ["backbone.body.layer2.0.add"]
    t_cap, s_cap = CapturingModel(teacher, points, example), CapturingModel(student, points, example)
    ctx = RunContext(teacher=teacher, student=student, teacher_capture=t_cap, student_capture=s_cap, data=None,
                     device=torch.device("cpu"), dist=DistInfo(), epochs=1, steps_per_epoch=1, task=task)
    x = torch.rand(2, 3, 64, 64)
    calls.clear()
    ((_, _, (t_logits, t_feats), (_, s_feats)),) = list(ctx.iter_features([(x, None)]))
    assert not calls and t_logits is None and student.training  # mode restored
    student.eval()
    with torch.no_grad():
        assert torch.equal(t_feats[points[0]], t_cap(x)[1][points[0]])
        assert torch.equal(s_feats[points[0]], s_cap(x)[1][points[0]])


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory, fashion_mnist_dir) -> Path:
    return tmp_path_factory.mktemp("scenes-det-cache")


def scenes_config(scenes_dir: Path, epochs: int, method: dict | None = None, **train) -> dict:
    raw = det_config({"dataset": "scenes-det", "data_dir": str(scenes_dir), "scenes": SCENES, "batch_size": 8,
                      "eval_batch_size": 48}, student="fcos_resnet8", method=method,
                     teacher="fcos_resnet8" if method and method["name"] != "none" else None)
    raw["optim"] = {"optimizer": "adamw", "lr": 5e-3, "weight_decay": 1e-4, "warmup_epochs": 0.5}
    raw["train"].update(epochs=epochs, num_threads=1, seed=0, **train)
    return raw


@pytest.mark.slow
def test_short_training_raises_ap_above_the_untrained_model(tmp_path, scenes_dir, one_thread):
    from featkd.engine.trainer import Trainer

    trainer = Trainer(build_config(scenes_config(scenes_dir, epochs=8, eval_every=8)), out_dir=tmp_path / "run",
                      log=lambda _m: None)
    untrained = trainer.evaluate(trainer.student)
    result = trainer.fit()
    last = result.history[-1]
    print(f"untrained AP {untrained['ap']:.2f} ({untrained['detections']} detections); after 8 epochs "
          f"AP {last['test_ap']:.2f}, AP50 {last['test_ap50']:.2f}")
    # measured 7.02 (AP50 17.2) against 0.00: FCOS learns the items in a few hundred steps, RetinaNet slower
    assert result.metric == "ap" and result.test_metric > untrained["ap"] + 3.0
    assert {"train_classification", "train_bbox_regression", "train_bbox_ctrness"} <= set(last)
    assert "train_acc" not in last and (tmp_path / "run" / "student.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    {"name": "pkd", "pairs": [["backbone.fpn[*]", "backbone.fpn[*]"]]},
    {"name": "mgd", "pairs": [["backbone.body.layer2.0.add", "backbone.body.layer2.0.add"]]},
])
def test_distillation_runs_on_a_detector(scenes_dir, method, one_thread):
    from featkd.engine.trainer import Trainer

    raw = scenes_config(scenes_dir, epochs=1, method=method)
    raw["data"]["train_subset"] = 64
    trainer = Trainer(build_config(raw), out_dir=None, log=lambda _m: None)
    record = trainer.fit().history[-1]
    assert math.isfinite(record[f"train_{method['name']}"]) and "test_ap" in record


@pytest.mark.slow
def test_two_process_detection_run_equals_one_process_evaluation(tmp_path, scenes_dir):
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    raw = scenes_config(scenes_dir, epochs=1)
    raw["data"]["train_subset"] = 32
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*torchrun, "-m", "featkd", "train", str(cfg), "--out", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: test_ap") == 1  # rank 0 alone writes and logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["metric"] == "ap"

    def featkd(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "featkd", *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    single = json.loads(featkd("eval", str(out), "--json"))
    # predictions gathered from both ranks' shards and scored once: the one-process numbers
    assert single["ap"] == pytest.approx(summary["test_metric"], abs=1e-6)
    printed = featkd("eval", str(out))
    assert printed.startswith("test_ap ") and "test_ap50" in printed and "box AP" in printed and "Trouser" in printed
