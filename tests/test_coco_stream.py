"""Streamed COCO-layout detection (featkd.data.det_stream): images of their own sizes read per sample, the
resize / flip recipes on tv_tensors, COCO AP at the original coordinates equal to pycocotools' own on the
annotation file, the storage choice, and real `featkd train` runs (detection, instance segmentation)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featkd.data import DataConfig, build_data
from featkd.data.coco import rle_encode
from featkd.data.det_stream import PackedSplit, StreamDetectionBackend
from featkd.data.detection import DetectionBackend
from featkd.errors import ConfigError, DataError
from featkd.tasks.detection import DetectionTask

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: (id, file, H, W); eval at shorter side 100: a /2, b x2, c /2, d as it is, e /2 (no annotations)
IMAGES = [(101, "a.jpg", 200, 300), (102, "b.png", 50, 80), (103, "c.jpg", 400, 200), (104, "d.png", 100, 140),
          (105, "e.jpg", 200, 200)]
EVAL_SIZES = {101: (100, 150), 102: (100, 160), 103: (200, 100), 104: (100, 140), 105: (100, 100)}
CATEGORIES = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]  # labels 3, 1, 2
LABEL = {2: 1, 5: 2, 9: 3}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def rect(h: int, w: int, x: int, y: int, bw: int, bh: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y : y + bh, x : x + bw] = True
    return m


def polygon(x: int, y: int, w: int, h: int) -> list[list[int]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def instances() -> dict:
    """Non-contiguous category ids, listed out of order; polygons, uncompressed and compressed RLE, a crowd
    region, small / medium / large objects, an image without annotations; even coordinates where the
    evaluation halves the image (so the fixed predictions map back exactly)."""
    size = {i: (h, w) for i, _, h, w in IMAGES}
    crowd = mask_utils.encode(np.asfortranarray(rect(*size[101], 0, 160, 300, 40).astype(np.uint8)))
    anns = [
        (1, 101, 5, [20, 40, 100, 60], 0, polygon(20, 40, 100, 60)),
        (2, 101, 9, [160, 20, 120, 140], 0, rle_encode(rect(*size[101], 160, 20, 120, 140))),
        (3, 101, 2, [0, 160, 300, 40], 1, {"size": crowd["size"], "counts": crowd["counts"].decode()}),
        (4, 102, 2, [10, 10, 30, 20], 0, polygon(10, 10, 30, 20)),
        (5, 102, 9, [50, 20, 24, 24], 0, polygon(50, 20, 24, 24)),
        (6, 103, 5, [40, 100, 120, 200], 0, rle_encode(rect(*size[103], 40, 100, 120, 200))),
        (7, 103, 2, [20, 320, 40, 40], 0, polygon(20, 320, 40, 40)),
        (8, 104, 9, [10, 10, 60, 60], 0, polygon(10, 10, 60, 60)),
        (9, 104, 5, [80, 50, 50, 40], 0, polygon(80, 50, 50, 40)),
    ]
    return {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in IMAGES],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "area": float(b[2] * b[3]),
                         "iscrowd": crowd_flag, "segmentation": seg} for a, i, c, b, crowd_flag, seg in anns],
        "categories": CATEGORIES,
    }


def write_coco(root: Path, data: dict | None = None, splits: tuple[str, ...] = ("train2017", "val2017")) -> Path:
    """``root`` in COCO's layout (annotations/instances_<split>.json, <split>/<file>), JPEGs and PNGs."""
    data = instances() if data is None else data
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in splits:
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).mkdir(exist_ok=True)
        for image in data["images"]:
            pixels = rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / image["file_name"])
    return root


# --------------------------------------------------------------------------------------------------------
# COCO AP at the original coordinates.

#: fixed predictions at ORIGINAL coordinates: (image, category, [x, y, w, h], score); each mask is its box
PREDICTIONS = [
    (101, 5, [20, 40, 100, 60], 0.9), (101, 9, [170, 30, 110, 130], 0.8), (101, 2, [0, 160, 100, 40], 0.7),
    (101, 9, [20, 40, 100, 60], 0.35), (102, 2, [12, 10, 28, 20], 0.6), (102, 9, [52, 22, 24, 24], 0.5),
    (102, 5, [0, 0, 20, 20], 0.3), (103, 5, [40, 120, 120, 160], 0.75), (103, 2, [20, 320, 40, 40], 0.2),
    (103, 2, [100, 20, 60, 60], 0.65), (104, 9, [10, 10, 60, 60], 0.95), (104, 5, [90, 60, 40, 30], 0.45),
    (105, 9, [20, 20, 40, 40], 0.55),
]


class FixedDetector(nn.Module):
    """A stand-in detector: for each (resized) image, the fixed :data:`PREDICTIONS` of the image of that size,
    in the resized image's coordinates (boxes scaled per axis, masks drawn at the resized size), as a real
    detector fed the resized image returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_size = {size: image_id for image_id, size in EVAL_SIZES.items()}
        self.orig = {i: (h, w) for i, _, h, w in IMAGES}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            image_id = self.by_size[(h, w)]
            oh, ow = self.orig[image_id]
            sy, sx = h / oh, w / ow
            mine = [p for p in PREDICTIONS if p[0] == image_id]
            boxes, masks = [], torch.zeros(len(mine), 1, h, w)
            for k, (_, _, (x, y, bw, bh), _) in enumerate(mine):
                x1, y1, x2, y2 = round(x * sx), round(y * sy), round((x + bw) * sx), round((y + bh) * sy)
                boxes.append([x1, y1, x2, y2])
                masks[k, 0, y1:y2, x1:x2] = 1.0
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor([p[3] for p in mine]),
                            "labels": torch.tensor([LABEL[p[1]] for p in mine], dtype=torch.int64),
                            "masks": masks})
        return outputs


def pycocotools_stats(gt_file: Path, iou_type: str) -> list[float]:
    """COCOeval run directly on the annotation file and a results list in COCO's format (torchvision's
    reference: boxes for bbox, RLE masks for segm)."""
    gt = COCO(str(gt_file))
    results = []
    for image_id, cat, (x, y, w, h), score in PREDICTIONS:
        res = {"image_id": image_id, "category_id": cat, "score": score}
        if iou_type == "bbox":
            res["bbox"] = [x, y, w, h]
        else:
            _, _, ih, iw = next(im for im in IMAGES if im[0] == image_id)
            rle = mask_utils.encode(np.asfortranarray(rect(ih, iw, x, y, w, h).astype(np.uint8)))
            res["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        results.append(res)
    results_file = gt_file.parent / f"results_{iou_type}.json"
    results_file.write_text(json.dumps(results))
    ev = COCOeval(gt, gt.loadRes(str(results_file)), iouType=iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [100.0 * float(v) for v in ev.stats[:6]]


def test_streamed_ap_at_original_coordinates_equals_pycocotools_on_the_annotation_file(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True, resize_short=[80, 100]))
    assert isinstance(data.backend, StreamDetectionBackend) and data.class_names == ("background", "two", "five",
                                                                                     "nine")
    task = DetectionTask.from_data(data)
    model = FixedDetector().eval()
    evaluator = task.evaluator(torch.device("cpu"))
    seen = 0
    for x, ys in data.test_loader(2):  # the trainer's evaluation path: loader -> predict -> evaluator.update
        assert isinstance(x, list)
        for image, y in zip(x, ys, strict=True):
            image_id = int(y["image_id"])
            oh, ow = next((h, w) for i, _, h, w in IMAGES if i == image_id)
            assert tuple(image.shape) == (3, *EVAL_SIZES[image_id]) and image.dtype == torch.float32
            assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
            assert y["size"].tolist() == list(EVAL_SIZES[image_id]) and y["orig_size"].tolist() == [oh, ow]
            assert y["masks"].shape[-2:] == (oh, ow)  # ground truth stays at the original size
        evaluator.update(task.predict(model, x), ys)
        seen += len(ys)
    assert seen == len(IMAGES)
    result = evaluator.result()
    gt_file = root / "annotations" / "instances_val2017.json"
    box, segm = pycocotools_stats(gt_file, "bbox"), pycocotools_stats(gt_file, "segm")
    print("featkd box", [round(result.get(k, -100), 4) for k in ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")])
    print("pycocotools box", [round(v, 4) for v in box], "segm", [round(v, 4) for v in segm])
    for i, name in enumerate(("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")):
        for prefix, stats in (("", box), ("mask_", segm)):
            assert stats[i] >= 0 and result[f"{prefix}{name}"] == pytest.approx(stats[i], abs=1e-9), prefix + name
    assert 0 < result["ap"] < 100 and 0 < result["mask_ap"] < 100
    assert result["images"] == 5 and result["instances"] == 8 and result["detections"] == len(PREDICTIONS)
    # the same predictions left at the resized coordinates (no mapping back) score differently: the test bites
    unmapped = task.evaluator(torch.device("cpu"))
    for x, ys in data.test_loader(2):
        unmapped.update(model(x), [{k: v for k, v in y.items() if k not in ("size", "orig_size")} for y in ys])
    assert unmapped.result()["ap"] < result["ap"] - 10


def test_eval_resize_short_overrides_the_last_training_side(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), resize_short=[64, 80], resize_max=120,
                                 eval_resize_short=50))
    sizes = {int(y["image_id"]): tuple(img.shape[-2:]) for x, ys in data.test_loader(5) for img, y in zip(x, ys)}
    # shorter side 50, longer side at most 120 (b: 50x80 stays, c: 400x200 -> 100x50; a: 200x300 -> 50x75)
    assert sizes == {101: (50, 75), 102: (50, 80), 103: (100, 50), 104: (50, 70), 105: (50, 50)}
    assert "evaluation: shorter side 50 (longer <= 120)" in data.augmentation


# --------------------------------------------------------------------------------------------------------
# Training samples: the recipes, determinism.


def _batches(data, epoch: int, seed: int = 0) -> list:
    loader = data.train_loader(2, seed=seed, drop_last=False)
    loader.set_epoch(epoch)
    return [(x, ys) for x, ys in loader]


def _same(a: list, b: list) -> bool:
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        if len(xa) != len(xb) or not all(torch.equal(i, j) for i, j in zip(xa, xb, strict=True)):
            return False
        for ta, tb in zip(ya, yb, strict=True):
            if set(ta) != set(tb) or not all(torch.equal(ta[k], tb[k]) for k in ta):
                return False
    return True


def test_training_resizes_flips_boxes_and_masks_with_the_image_and_repeats_per_seed(tmp_path):
    root = write_coco(tmp_path / "coco")
    cfg = DataConfig(dataset="coco", data_dir=str(root), masks=True, resize_short=[40, 60, 80], resize_max=150)
    data = build_data(cfg)
    orig = {i: (h, w) for i, _, h, w in IMAGES}
    boxes = {a["image_id"]: [] for a in instances()["annotations"]}
    for a in instances()["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append([x, y, x + w, y + h])
    state = torch.get_rng_state()
    sides, flips = set(), set()
    for epoch in range(3):
        for x, ys in _batches(data, epoch):
            for image, y in zip(x, ys, strict=True):
                image_id = int(y["image_id"])
                (oh, ow), (h, w) = orig[image_id], tuple(image.shape[-2:])
                short = min(h, w)
                assert short in (40, 60, 80) or max(h, w) == 150, (image_id, h, w)
                sides.add(short)
                assert "size" not in y and y["masks"].shape == (len(y["boxes"]), h, w)
                if image_id not in boxes:
                    continue
                sx, sy = w / ow, h / oh
                ref = torch.tensor(boxes[image_id], dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
                flipped = torch.stack([w - ref[:, 2], ref[:, 1], w - ref[:, 0], ref[:, 3]], 1)
                is_flipped = not torch.allclose(y["boxes"], ref, atol=1e-3)
                flips.add(is_flipped)
                assert torch.allclose(y["boxes"], flipped if is_flipped else ref, atol=1e-3)
                assert torch.allclose(y["area"], torch.tensor([b[2] * b[3] for b in (a["bbox"] for a in
                                      instances()["annotations"] if a["image_id"] == image_id)]) * sx * sy, rtol=1e-5)
                for box, mask, crowd in zip(y["boxes"], y["masks"], y["iscrowd"], strict=True):
                    if crowd or not mask.any():
                        continue
                    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
                    drawn = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
                    assert all(abs(d - float(b)) <= 1.5 for d, b in zip(drawn, box, strict=True)), (drawn, box)
    assert torch.equal(state, torch.get_rng_state())  # randomness only from the per-sample seeding
    assert flips == {True, False} and len(sides) >= 2
    again = build_data(cfg)
    assert _same(_batches(data, 1), _batches(again, 1))  # same seed and epoch: same batches
    assert not _same(_batches(data, 1), _batches(data, 2))
    workers = build_data(dataclasses.replace(cfg, num_workers=2))
    assert _same(_batches(data, 2), _batches(workers, 2))  # ...whatever the number of workers


def test_no_augmentation_trains_at_the_evaluation_size_without_flips(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), resize_short=[40, 100], augment=False))
    assert data.augmentation.startswith("shorter side 100;")
    for x, ys in _batches(data, 0):
        for image, y in zip(x, ys, strict=True):
            assert tuple(image.shape[-2:]) == EVAL_SIZES[int(y["image_id"])]


def test_without_resize_each_image_keeps_its_own_size(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), hflip=False))
    assert isinstance(data.backend, StreamDetectionBackend)
    assert data.storage.endswith("the images differ in size") and data.augmentation == "none"
    orig = {i: (h, w) for i, _, h, w in IMAGES}
    for x, ys in _batches(data, 0):
        for image, y in zip(x, ys, strict=True):
            assert tuple(image.shape[-2:]) == orig[int(y["image_id"])]
            assert y["boxes"].dtype == torch.float32 and y["labels"].dtype == torch.int64
            assert y["iscrowd"].dtype == torch.bool and y["image_id"].shape == ()
    x, ys = next(iter(data.test_loader(5)))
    a = next(y for y in ys if int(y["image_id"]) == 101)
    assert a["labels"].tolist() == [2, 3, 1] and a["iscrowd"].tolist() == [False, False, True]
    assert a["boxes"].tolist() == [[20, 40, 120, 100], [160, 20, 280, 160], [0, 160, 300, 200]]
    assert a["size"].tolist() == a["orig_size"].tolist() == [200, 300]


def test_annotations_are_packed_in_flat_arrays(tmp_path):
    root = write_coco(tmp_path / "coco")
    data = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True, storage="stream"))
    split = data.backend.reads["train"].split
    assert isinstance(split, PackedSplit)
    for f in dataclasses.fields(split):
        value = getattr(split, f.name)
        assert isinstance(value, (np.ndarray, Path)), f.name  # no per-image Python objects
    assert split.offsets.tolist() == [0, 3, 5, 7, 9, 9] and split.file_name(1) == "b.png"
    assert split.segmentation(0) == polygon(20, 40, 100, 60)


def test_a_second_build_streams_from_the_packed_cache_without_parsing_the_json(tmp_path, monkeypatch):
    """COCO train2017's JSON takes ~20 s and ~2 GB to parse: it is packed once, and later runs read the arrays;
    an edited annotation file is parsed again."""
    import featkd.data.det_datasets as det_datasets

    monkeypatch.setenv("FEATKD_CACHE", str(tmp_path / "cache"))
    root = write_coco(tmp_path / "coco")
    cfg = DataConfig(dataset="coco", data_dir=str(root), masks=True, resize_short=[40, 60], resize_max=150)
    first = build_data(cfg)
    assert len(list((tmp_path / "cache" / "coco-packed").glob("*.npz"))) == 1

    def no_parse(*_a, **_k):
        raise AssertionError("the annotation file was parsed again")

    monkeypatch.setattr(det_datasets, "read_instances", no_parse)
    second = build_data(cfg)
    assert second.describe() == first.describe()
    assert _same(_batches(first, epoch=1), _batches(second, epoch=1))
    assert [y[0]["image_id"] for _, y in second.test_loader(1)] == [y[0]["image_id"] for _, y in first.test_loader(1)]
    train_json = root / "annotations" / "instances_train2017.json"
    train_json.write_text(train_json.read_text() + " ")  # edited: a new size and time, so a new key
    with pytest.raises(AssertionError, match="parsed again"):
        build_data(cfg)


def test_a_large_split_packs_into_a_few_hundred_bytes_per_image(tmp_path):
    n = 20_000  # two annotations each (polygons): what a streamed run holds per image, all arrays counted
    data = {"images": [{"id": i, "file_name": f"{i:06d}.jpg", "height": 480 + i % 3, "width": 640} for i in range(n)],
            "annotations": [{"id": k, "image_id": k // 2, "category_id": 1, "bbox": [1, 2, 30, 40], "area": 1200.0,
                             "iscrowd": 0, "segmentation": polygon(1, 2, 30, 40)} for k in range(2 * n)],
            "categories": [{"id": 1, "name": "x"}]}
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).mkdir()
        Image.new("RGB", (640, 480)).save(root / split / "000000.jpg")  # build time opens no other image
    bundle = build_data(DataConfig(dataset="coco", data_dir=str(root), masks=True))
    assert bundle.train_size == n and "over data.memory_limit_gb" in bundle.storage
    split = bundle.backend.reads["train"].split
    held = sum(v.nbytes for v in vars(split).values() if isinstance(v, np.ndarray))
    print(f"{held / n:.1f} bytes per image")
    assert held / n < 250, held / n  # measured 186: 50 an image, 68 an annotation


# --------------------------------------------------------------------------------------------------------
# Where the set lives; errors.


def test_storage_choice_and_one_line_errors(tmp_path):
    root = write_coco(tmp_path / "coco")
    uniform = instances()
    uniform["images"] = [{**im, "height": 40, "width": 48} for im in uniform["images"]]
    uniform["annotations"] = [{**a, "bbox": [2, 2, 20, 20], "segmentation": polygon(2, 2, 20, 20)}
                              for a in uniform["annotations"]]
    small = write_coco(tmp_path / "uniform", uniform)
    in_memory = build_data(DataConfig(dataset="coco", data_dir=str(small)))
    assert isinstance(in_memory.backend, DetectionBackend) and in_memory.storage.startswith("in memory")
    over = build_data(DataConfig(dataset="coco", data_dir=str(small), memory_limit_gb=0.0))
    assert isinstance(over.backend, StreamDetectionBackend) and "over data.memory_limit_gb" in over.storage
    forced = build_data(DataConfig(dataset="coco", data_dir=str(small), resize_short=64))
    assert isinstance(forced.backend, StreamDetectionBackend) and "data.resize_short is set" in forced.storage
    cases = [
        (DataConfig(dataset="coco", data_dir=str(small), resize_short=64, storage="memory"), ConfigError,
         "data.resize_short: only streamed detection data resizes per image"),
        (DataConfig(dataset="coco", data_dir=str(root), storage="memory"), DataError,
         "set data.image_size to resize every image to one size, or data.storage: stream"),
        (DataConfig(dataset="coco", data_dir=str(root), scale_jitter=[0.8, 1.2]), ConfigError,
         "data.scale_jitter: only in-memory detection data jitters"),
        (DataConfig(dataset="coco", data_dir=str(root), resize_max=1333), ConfigError,
         "data.resize_max: needs data.resize_short"),
        (DataConfig(dataset="coco", data_dir=str(root), resize_short=[800, 0]), ConfigError,
         "data.resize_short: must be null, a positive integer or a list of them"),
        (DataConfig(dataset="coco", data_dir=str(root), resize_short=64, image_size=64), ConfigError,
         "give it or data.image_size, not both"),
        (DataConfig(dataset="digits", resize_short=64), ConfigError, "data.resize_short: a detection recipe"),
    ]
    for cfg, error, expected in cases:
        with pytest.raises(error) as exc:
            build_data(cfg)
        assert expected in one_line(exc), one_line(exc)


def test_a_bad_image_is_one_line_or_skipped(tmp_path):
    root = write_coco(tmp_path / "coco")
    (root / "val2017" / "b.png").write_bytes(b"not an image")
    (root / "val2017" / "a.jpg").write_bytes((root / "train2017" / "d.png").read_bytes())  # wrong size
    data = build_data(DataConfig(dataset="coco", data_dir=str(root)))
    with pytest.raises(DataError) as exc:
        list(data.test_loader(5))
    assert "a.jpg is 140x100 but" in one_line(exc) and "instances_val2017.json says 300x200" in one_line(exc)
    skipping = build_data(DataConfig(dataset="coco", data_dir=str(root), bad_files="skip"))
    loader = skipping.test_loader(2)
    ids = [int(y["image_id"]) for _, ys in loader for y in ys]
    assert ids == [103, 104, 105] and len(loader.skipped) == 2 and "b.png" in " ".join(loader.skipped)


def test_the_teacher_cache_key_holds_the_new_options():
    from featkd.engine.teacher_cache import NOT_IN_BATCHES

    data = dataclasses.asdict(DataConfig())
    for key in ("resize_short", "resize_max", "eval_resize_short", "hflip", "storage"):
        assert key in data and key not in NOT_IN_BATCHES  # stream_ingredients keys on the whole data config
    # (eval_resize_short too: with data.augment off, training resizes as evaluation does)


# --------------------------------------------------------------------------------------------------------
# Real training runs through the command line.


def write_training_set(root: Path) -> Path:
    """6 training and 3 validation images of 200-400 px a side, each with 1-2 coloured rectangles (categories
    3 and 8), polygons; sizes only in the headers of two of them (no width / height in the file)."""
    rng = np.random.default_rng(1)
    for split, n in (("train2017", 6), ("val2017", 3)):
        images, anns = [], []
        (root / split).mkdir(parents=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(200, 401, 2))
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            entry = {"id": i + 1, "file_name": f"{i:03d}.jpg"}
            if i >= 2:
                entry.update(height=h, width=w)
            images.append(entry)
            for k in range(1 + i % 2):
                bw, bh = (int(v) for v in rng.integers(40, 120, 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                cat = (3, 8)[k]
                pixels[y : y + bh, x : x + bw, k] = 220
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0, "segmentation": polygon(x, y, bw, bh)})
            Image.fromarray(pixels).save(root / split / entry["file_name"], quality=90)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 8, "name": "b"}, {"id": 3, "name": "a"}]}))
    return root


@pytest.mark.parametrize(("student", "masks", "teacher"), [
    ("retinanet_resnet8", False, "retinanet_resnet8"),
    ("maskrcnn_resnet8", True, None),
])
def test_featkd_train_on_streamed_coco(tmp_path, student, masks, teacher):
    import os

    import yaml

    root = write_training_set(tmp_path / "coco")
    raw = {
        "data": {"dataset": "coco", "data_dir": str(root), "masks": masks, "batch_size": 2, "eval_batch_size": 2,
                 "resize_short": [160, 192], "resize_max": 256, "num_workers": 1},
        "student": {"model": student},
        "method": {"name": "pkd", "pairs": [["backbone.fpn[*]", "backbone.fpn[*]"]]} if teacher else {"name": "none"},
        "optim": {"optimizer": "adamw", "lr": 1e-3},
        "train": {"epochs": 1, "progress": "off", "tensorboard": False, "num_threads": 1, "device": "cpu"},
    }
    if teacher:
        raw["teacher"] = {"model": teacher}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "featkd", "train", str(cfg), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from disk (1 workers): data.resize_short is set" in proc.stdout
    assert "done: test_ap" in proc.stdout
    print(proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "ap" and 0.0 <= summary["test_metric"] <= 100.0
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert ("test_mask_ap" in record) == masks
    if teacher:
        assert np.isfinite(record["train_pkd"])
