"""Streaming data throughput: featkd's streaming loader against the same pipeline written by hand.

Pipelines (``PIPELINES``), each generated once into ``--work`` (kept and reused; smaller sets are hard links to
the first files of the largest):

* ``imagefolder``: ImageNet-size JPEGs (500 x 375); featkd's ``imagefolder`` loader vs ``ImageFolder`` +
  RandomResizedCrop / flip / ToTensor / Normalize (torchvision's classification reference);
* ``coco``: COCO-size JPEGs (480-640 x 360-480, 1-5 objects each, category ids 3 / 18 / 44) in COCO's layout;
  featkd's streamed ``coco`` training loader (``resize_short`` 480..800, ``resize_max`` 1333, flip) vs
  torchvision's detection reference written out (``CocoDetection`` + ``wrap_dataset_for_transforms_v2`` +
  ``RandomShortestSize`` / ``RandomHorizontalFlip`` / ``ToDtype``, list collate);
* ``cityscapes``: Cityscapes-layout PNG pairs at 2048 x 1024 (``leftImg8bit`` + ``gtFine`` label ids); featkd's
  streamed ``cityscapes`` loader with mmseg's recipe (``scale_range`` [0.5, 2] of ``base_size`` 1024 x 2048,
  ``crop_size`` 512 x 1024, flip) vs ``Cityscapes`` + ``wrap_dataset_for_transforms_v2`` + v2 ``RandomResize`` /
  ``RandomCrop`` (padding) / flip on ``Image`` + ``Mask``, label ids mapped to train ids.

For each:

* throughput: featkd's training loader (``featkd.data.streaming``: per-sample seeded transforms in DataLoader
  workers, uint8 batches made float (and normalised) in the main process) and the hand-written torchvision
  loader (transforms and float conversion in the workers, ``DataLoader`` shuffled, same batch, workers,
  persistent workers and torch threads), one epoch of ``images`` images each per round, in interleaved rounds
  (the order alternates); images/s, wall and CPU time (this process and its workers, from /proc) per round,
  the median of the rounds, and ``ratio_images_per_s`` = featkd / hand-written round by round (median and
  spread);
* memory: peak resident memory of a fresh child process that builds each loader over ``memory_sizes`` images
  and reads ``memory_batches`` batches: the main process's VmHWM, the largest worker's VmHWM and its private
  resident memory (:func:`worker_memory`);
* first step: ``featkd train`` (a small config: imagefolder resnet8 at 64 px; coco retinanet_resnet8, batch 2;
  cityscapes fcn_resnet8, batch 2, at a 256 x 512 crop; method none, 1 epoch, ``train.checkpoint_every_steps 1``;
  the JSON keeps it as ``first_step_config``) at ``first_step_sizes`` images, in interleaved
  repeats: seconds from the process start to its first output line (the data set's description, printed once
  everything is built) and to the first training step (the checkpoint written after it appears); the run is
  then stopped with SIGTERM.

The settings ``images``, ``rounds``, ``batch``, ``memory_sizes``, ``memory_batches``, ``first_step_sizes`` and
``first_step_repeats`` are per pipeline (``Pipeline.settings``; the heavy ones use fewer and smaller: COCO 96
images a round, batch 4, 5 rounds, memory and first step at 100 / 400 images; Cityscapes 32 images a round,
batch 4, 5 rounds, 20 / 80 images); a command-line value applies to every pipeline run. The JSON keeps each
pipeline's resolved settings. The default run took 8 minutes on 2 cores (plus 40 s for the first generation).

Writes ``--out`` (JSON, with the environment) and prints a markdown summary::

    PYTHONPATH=. python benchmarks/data_throughput.py [--pipelines imagefolder coco cityscapes] [--images N]
        [--workers W] [--threads T] [--rounds R] [--batch B] [--memory-sizes 100 400] [--first-step-sizes 100 400]

Another pipeline is one more :class:`Pipeline` in ``PIPELINES``: a generator of N samples, a subset maker, the
featkd ``data:`` section over them and the hand-written loader.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- pipelines ----------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """One data pipeline measured both ways.

    ``generate(root, n)``: write ``n`` training samples (and a few evaluation ones) under ``root``;
    ``data(root, args)``: featkd's ``data:`` section reading them; ``reference(root, args)``: the hand-written
    loader (an iterable of ``(x, y)`` batches, re-iterable, reshuffled per pass); ``count(x)``: images in a batch;
    ``first_step``: the rest of the ``featkd train`` config for the first-step timing (student, method, data keys).
    """

    name: str
    generate: Callable[[Path, int], None]
    data: Callable[[Path, argparse.Namespace], dict[str, Any]]
    reference: Callable[[Path, argparse.Namespace], Iterable[Any]]
    first_step: dict[str, Any]
    count: Callable[[Any], int] = len
    #: ``subset(full, root, n)``: the first ``n`` training samples of the generated set ``full`` (and all its
    #: evaluation samples) in ``root``, as hard links
    subset: Callable[[Path, Path, int], None] | None = None
    #: this pipeline's values of the settings a command line leaves unset (:data:`SETTINGS`)
    settings: dict[str, Any] = field(default_factory=dict)
    #: what the pipeline is (written to the JSON)
    describe: str = ""


IMAGEFOLDER_CLASSES = 4


def generate_imagefolder(root: Path, n: int) -> None:
    """``n`` 500x375 JPEGs (ImageNet's typical size; quality 75, smooth content plus noise: about 40 KB each) in
    ``root/train/c<k>/``, one per class in ``root/val/``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", IMAGEFOLDER_CLASSES)):
        for i in range(count):
            folder = root / split / f"c{i % IMAGEFOLDER_CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            low = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375),
                                                                                            Image.BICUBIC)
            pixels = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3), dtype=np.int16)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=75)


def imagefolder_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "imagefolder", "data_dir": str(root), "image_size": args.image_size,
            "num_workers": args.workers}


def imagefolder_reference(root: Path, args: argparse.Namespace) -> Iterable[Any]:
    """torchvision's reference classification pipeline (ClassificationPresetTrain without auto-augment)."""
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0,
                                       pin_memory=torch.device(args.device).type == "cuda")


def link(path: Path, target: Path) -> None:
    """``target`` as a hard link to ``path`` (kept if present)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.link(path, target)


def subset_imagefolder(full: Path, root: Path, n: int) -> None:
    train = sorted((p for p in (full / "train").rglob("*") if p.is_file()), key=lambda p: p.name)[:n]
    for path in [*train, *(p for p in (full / "val").rglob("*") if p.is_file())]:
        link(path, root / path.relative_to(full))


# -- COCO-size detection ----------------------------------------------------------------------------------

#: three COCO category ids, not contiguous (featkd's labels 1..3 by ascending id; torchvision's reference keeps
#: the ids), with the colour their objects are drawn in
COCO_CATEGORIES = ({"id": 3, "name": "car"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"})
COCO_COLOURS = {3: (200, 40, 40), 18: (40, 180, 60), 44: (50, 70, 210)}
#: torchvision's detection reference, policy ``multiscale``: RandomShortestSize(these, 1333)
COCO_SIDES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
COCO_MAX = 1333
COCO_VAL = 8  # evaluation images generated beside the training ones


def smooth_noise(rng: Any, h: int, w: int, noise: int = 12) -> Any:
    """uint8 (h, w, 3): a random 24 x 32 field upscaled bicubically plus uniform noise in [-noise, noise]."""
    import numpy as np
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(low, dtype=np.int16) + rng.integers(-noise, noise + 1, (h, w, 3), dtype=np.int16)
    return pixels.clip(0, 255).astype(np.uint8)


def write_coco(root: Path, splits: dict[str, int], *, seed: int = 0, rle_every: int = 0, quality: int = 90) -> None:
    """COCO's layout under ``root``: for each ``split: n`` of ``splits``, ``n`` JPEGs of COCO's typical sizes
    (width 480-640, height 360-480; quality ``quality``) in ``root/<split>/`` and their annotations in
    ``root/annotations/instances_<split>.json`` (``width`` / ``height`` given; image ids go on across splits).
    Each image holds 1-5 objects of the :data:`COCO_CATEGORIES`: filled 16-gons (jittered ellipses) in their
    category's colour, later ones drawn over earlier ones, annotated with the polygon's box, area and
    segmentation (the polygon; with ``rle_every`` k, every k-th annotation as an uncompressed RLE of its pixels,
    its area their count)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from featkd.data.coco import rle_encode

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id = ann_id = 0
    for split, n in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for _ in range(n):
            image_id += 1
            w, h = int(rng.integers(480, 641)), int(rng.integers(360, 481))
            pil = Image.fromarray(smooth_noise(rng, h, w))
            draw = ImageDraw.Draw(pil)
            for _k in range(int(rng.integers(1, 6))):
                cat = int(COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]["id"])
                rx, ry = rng.uniform(16, w / 5), rng.uniform(16, h / 5)
                cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False) + rng.uniform(0, np.pi / 8)
                r = rng.uniform(0.8, 1.0, 16)
                xs = np.round(np.clip(cx + rx * r * np.cos(t), 0, w), 2)
                ys = np.round(np.clip(cy + ry * r * np.sin(t), 0, h), 2)
                points = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
                draw.polygon(points, fill=COCO_COLOURS[cat])
                ann_id += 1
                x0, y0 = float(xs.min()), float(ys.min())
                ann = {"id": ann_id, "image_id": image_id, "category_id": cat,
                       "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
                       "area": round(float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))), 2),
                       "iscrowd": 0, "segmentation": [[v for xy in points for v in xy]]}
                if rle_every and ann_id % rle_every == 0:
                    mask = Image.new("L", (w, h))
                    ImageDraw.Draw(mask).polygon(points, fill=1)
                    pixels = np.asarray(mask, dtype=bool)
                    ann["segmentation"], ann["area"] = rle_encode(pixels), float(pixels.sum())
                anns.append(ann)
            file_name = f"{image_id:012d}.jpg"
            pil.save(root / split / file_name, quality=quality)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": list(COCO_CATEGORIES)}))


def generate_coco(root: Path, n: int) -> None:
    write_coco(root, {"train2017": n, "val2017": COCO_VAL})


def subset_coco(full: Path, root: Path, n: int) -> None:
    """The first ``n`` training images (and every evaluation image) with their annotations."""
    for split, keep in (("train2017", n), ("val2017", None)):
        data = json.loads((full / "annotations" / f"instances_{split}.json").read_text())
        images = data["images"][:keep]
        ids = {image["id"] for image in images}
        for image in images:
            link(full / split / image["file_name"], root / split / image["file_name"])
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))


def coco_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "coco", "data_dir": str(root), "resize_short": COCO_SIDES, "resize_max": COCO_MAX,
            "num_workers": args.workers}  # hflip: on by default


def list_collate(batch: list[Any]) -> tuple[Any, ...]:
    """torchvision's detection reference ``utils.collate_fn``: a batch of (image, target) -> (images, targets)."""
    return tuple(zip(*batch, strict=True))


def coco_reference(root: Path, args: argparse.Namespace) -> Iterable[Any]:
    """torchvision's detection reference (``presets.DetectionPresetTrain``, policy ``multiscale``, transforms v2,
    PIL backend): ``CocoDetection`` + ``wrap_dataset_for_transforms_v2``, ``RandomShortestSize`` +
    ``RandomHorizontalFlip`` on the PIL image and its boxes, ``ToImage`` + ``ToDtype(float32, scale)``,
    ``ConvertBoundingBoxFormat(XYXY)`` + ``SanitizeBoundingBoxes`` + ``ToPureTensor``, list collate; no
    aspect-ratio grouping (featkd has none either)."""
    import torchvision
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomShortestSize(COCO_SIDES, COCO_MAX), v2.RandomHorizontalFlip(0.5), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.ConvertBoundingBoxFormat("XYXY"),
                     v2.SanitizeBoundingBoxes(), v2.ToPureTensor()])
    dataset = torchvision.datasets.CocoDetection(str(root / "train2017"),
                                                 str(root / "annotations" / "instances_train2017.json"), transforms=tf)
    dataset = torchvision.datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=["boxes", "labels", "image_id"])
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0,
                                       collate_fn=list_collate, pin_memory=torch.device(args.device).type == "cuda")


# -- Cityscapes-size segmentation -------------------------------------------------------------------------

CITYSCAPES_H, CITYSCAPES_W = 1024, 2048
CITYSCAPES_VAL = 2
#: mmseg's Cityscapes recipe (configs/_base_/datasets/cityscapes.py), hflip on by default
MMSEG_CITYSCAPES = {"scale_range": [0.5, 2.0], "base_size": [1024, 2048], "crop_size": [512, 1024]}


def cityscapes_label_ids(rng: Any, h: int, w: int) -> Any:
    """uint8 (h, w): a street scene in real Cityscapes label ids: sky (23) over buildings (11) and trees (21) of
    random heights, sidewalk (8) and road (7) below, cars (26), persons (24) and poles (17) on the ground line,
    the ego vehicle (1, ignored) along the bottom."""
    import numpy as np

    ids = np.full((h, w), 23, np.uint8)
    ground = int(h * rng.uniform(0.5, 0.6))
    block = w // 16
    for b in range(16):
        top = int(h * rng.uniform(0.05, 0.4))
        ids[top:ground, b * block : (b + 1) * block] = 21 if rng.random() < 0.3 else 11
    ids[ground:] = 7
    ids[ground : ground + h // 12, : int(w * rng.uniform(0.2, 0.4))] = 8
    for label, count, (hw_lo, hw_hi), (hh_lo, hh_hi) in ((26, 5, (0.06, 0.12), (0.08, 0.15)),
                                                         (24, 4, (0.01, 0.02), (0.1, 0.2)),
                                                         (17, 3, (0.004, 0.008), (0.3, 0.45))):
        for _ in range(int(rng.integers(1, count + 1))):
            bw, bh = int(w * rng.uniform(hw_lo, hw_hi)), int(h * rng.uniform(hh_lo, hh_hi))
            x, bottom = int(rng.integers(0, w - bw)), ground + int(rng.integers(0, h // 10))
            ids[max(0, bottom - bh) : bottom, x : x + bw] = label
    ids[int(h * 0.94) :] = 1
    return ids


def write_cityscapes(root: Path, splits: dict[str, int], *, seed: int = 0, noise: int = 8) -> None:
    """torchvision's ``Cityscapes`` layout under ``root``: for each ``split: n``, ``n`` pairs of
    ``leftImg8bit/<split>/<city>/<city>_<k>_000019_leftImg8bit.png`` (RGB 2048 x 1024: each label's official
    colour blended with :func:`smooth_noise`) and ``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (mode L,
    label ids; no ``labelTrainIds`` file: the loaders map the ids). PNGs at compression level 1 (fast to
    write; decoding costs about the same as at the default level)."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import Cityscapes

    palette = np.zeros((256, 3), np.float32)
    for c in Cityscapes.classes:
        if c.id >= 0:
            palette[c.id] = c.color
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        city = {"train": "aachen", "val": "frankfurt"}.get(split, split)
        for k in range(n):
            stem = f"{city}_{k:06d}_000019"
            ids = cityscapes_label_ids(rng, CITYSCAPES_H, CITYSCAPES_W)
            rgb = 0.6 * palette[ids] + 0.4 * smooth_noise(rng, CITYSCAPES_H, CITYSCAPES_W, noise)
            for folder, name, array in (("leftImg8bit", "leftImg8bit", rgb.astype(np.uint8)),
                                        ("gtFine", "gtFine_labelIds", ids)):
                path = root / folder / split / city / f"{stem}_{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, compress_level=1)


def generate_cityscapes(root: Path, n: int) -> None:
    write_cityscapes(root, {"train": n, "val": CITYSCAPES_VAL})


def subset_cityscapes(full: Path, root: Path, n: int) -> None:
    """The first ``n`` training pairs (by name) and every evaluation pair."""
    images = sorted((full / "leftImg8bit" / "train").rglob("*.png"), key=lambda p: p.name)[:n]
    keep = [*images, *(full / "leftImg8bit" / "val").rglob("*.png")]
    for image in keep:
        mask = full / "gtFine" / image.relative_to(full / "leftImg8bit").with_name(
            image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        for path in (image, mask):
            link(path, root / path.relative_to(full))


def cityscapes_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "cityscapes", "data_dir": str(root), **MMSEG_CITYSCAPES, "num_workers": args.workers}


class CityscapesTrainIds:
    """The hand-written pipeline's first transform: ``(PIL image, Mask of label ids (1, H, W))`` (what the wrapped
    ``torchvision.datasets.Cityscapes`` gives) -> ``(Image uint8, Mask of train ids (H, W))`` by the official
    table (``Cityscapes.classes``; ids without a train id -> 255)."""

    def __init__(self) -> None:
        from torchvision.datasets import Cityscapes

        self.table = torch.full((256,), 255, dtype=torch.uint8)
        for c in Cityscapes.classes:
            if c.id >= 0 and 0 <= c.train_id < 255:
                self.table[c.id] = c.train_id

    def __call__(self, image: Any, mask: Any) -> tuple[Any, Any]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        return F.to_image(image), tv_tensors.Mask(self.table[mask.as_subclass(torch.Tensor)[0].long()])


def cityscapes_reference(root: Path, args: argparse.Namespace) -> Iterable[Any]:
    """The same recipe written with torchvision alone (its segmentation reference's v2 path, tensor backend):
    ``Cityscapes`` (fine, semantic) + ``wrap_dataset_for_transforms_v2``; label ids -> train ids;
    ``RandomResize(512, 2048)`` (short side uniform in [0.5, 2] x 1024: mmseg's ratio range of 2048 x 1024),
    ``RandomCrop(512 x 1024, pad_if_needed, fill 0 / mask 255)``, ``RandomHorizontalFlip``,
    ``ToDtype`` (image float32 scaled, mask int64) + ``Normalize`` (ImageNet) in the workers; default collate."""
    import torchvision
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    base = MMSEG_CITYSCAPES["base_size"][0]
    lo, hi = MMSEG_CITYSCAPES["scale_range"]
    tf = v2.Compose([
        CityscapesTrainIds(),
        v2.RandomResize(int(lo * base), int(hi * base)),
        v2.RandomCrop(MMSEG_CITYSCAPES["crop_size"], pad_if_needed=True,
                      fill={tv_tensors.Image: 0, tv_tensors.Mask: 255, "others": 0}),
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ])  # fmt: skip
    dataset = torchvision.datasets.Cityscapes(str(root), split="train", mode="fine", target_type="semantic",
                                              transforms=tf)
    dataset = torchvision.datasets.wrap_dataset_for_transforms_v2(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0,
                                       pin_memory=torch.device(args.device).type == "cuda")


#: the per-pipeline settings: the command line's value when given, else the pipeline's, else these
SETTINGS: dict[str, Any] = {"images": 512, "rounds": 7, "batch": 32, "memory_sizes": [200, 1000, 2000],
                            "memory_batches": 8, "first_step_sizes": [200, 2000], "first_step_repeats": 3}


PIPELINES: dict[str, Pipeline] = {
    "imagefolder": Pipeline(
        "imagefolder", generate_imagefolder, imagefolder_data, imagefolder_reference,
        first_step={"data": {"image_size": 64, "batch_size": 16, "eval_batch_size": 64},
                    "student": {"model": "resnet8"}, "method": {"name": "none"}},
        subset=subset_imagefolder,
        describe="ImageNet-size JPEGs (500x375), RandomResizedCrop to --image-size + flip; "
                 "vs ImageFolder + torchvision transforms",
    ),
    "coco": Pipeline(
        "coco", generate_coco, coco_data, coco_reference,
        first_step={"data": {"batch_size": 2, "eval_batch_size": 1},
                    "student": {"model": "retinanet_resnet8"}, "method": {"name": "none"}},
        subset=subset_coco,
        settings={"images": 96, "rounds": 5, "batch": 4, "memory_sizes": [100, 400], "memory_batches": 8,
                  "first_step_sizes": [100, 400], "first_step_repeats": 2},
        describe=f"COCO-size JPEGs (480-640 x 360-480, 1-5 boxes, category ids 3/18/44), shorter side one of "
                 f"{COCO_SIDES[0]}..{COCO_SIDES[-1]} (longer <= {COCO_MAX}) + flip, images in [0, 1] of their own "
                 "sizes; vs CocoDetection + wrap_dataset_for_transforms_v2 + v2 (torchvision's reference)",
    ),
    "cityscapes": Pipeline(
        "cityscapes", generate_cityscapes, cityscapes_data, cityscapes_reference,
        # the first step at a 256 x 512 crop: at 512 x 1024, fcn_resnet8's forwards (the capture probe's and the
        # step's) take most of the time to the first step on a CPU
        first_step={"data": {"batch_size": 2, "eval_batch_size": 1, "crop_size": [256, 512]},
                    "student": {"model": "fcn_resnet8"}, "method": {"name": "none"}},
        subset=subset_cityscapes,
        settings={"images": 32, "rounds": 5, "batch": 4, "memory_sizes": [20, 80], "memory_batches": 4,
                  "first_step_sizes": [20, 80], "first_step_repeats": 2},
        describe="Cityscapes-size PNG pairs (2048x1024, labelIds), mmseg's recipe: rescale [0.5, 2] of 1024x2048, "
                 "crop 512x1024 (padded 0 / 255), flip, label ids -> train ids, normalised; vs Cityscapes + "
                 "wrap_dataset_for_transforms_v2 + v2 RandomResize / RandomCrop / flip",
    ),
}


# ---- data on disk, made once ----------------------------------------------------------------------------------


def dataset_root(pipe: Pipeline, work: Path, n: int, largest: int) -> Path:
    """The folder of ``n`` samples: the ``largest`` set is generated once (kept in ``work`` for later runs; the
    seconds it took are in its ``DONE``), the smaller ones are hard links to its first files
    (``pipe.subset``)."""
    full = work / pipe.name / f"n{largest}"
    if not (full / "DONE").is_file():
        t0 = time.perf_counter()
        pipe.generate(full, largest)
        seconds = time.perf_counter() - t0
        (full / "DONE").write_text(json.dumps({"samples": largest, "generate_s": seconds}) + "\n")
        print(f"{pipe.name}: generated {largest} samples in {seconds:.1f} s", flush=True)
    if n == largest:
        return full
    root = work / pipe.name / f"n{n}"
    if not (root / "DONE").is_file():
        (pipe.subset or subset_imagefolder)(full, root, n)
        (root / "DONE").write_text(f"{n}\n")
    return root


def files_on_disk(root: Path) -> dict[str, Any]:
    """The image files (JPEG, PNG) under ``root``, masks (``gtFine``) apart: count and mean size; the generation
    time of the set (None: generated by an earlier run that did not record it)."""
    sizes: dict[str, list[int]] = {"images": [], "masks": []}
    for p in root.rglob("*"):
        if p.suffix in (".jpg", ".png") and p.is_file():
            sizes["masks" if "gtFine" in p.parts else "images"].append(p.stat().st_size)
    done = json.loads((root / "DONE").read_text())
    out: dict[str, Any] = {"generate_s": done.get("generate_s") if isinstance(done, dict) else None}
    for kind, values in sizes.items():
        if values:
            out[kind] = {"files": len(values), "mean_kb": sum(values) / len(values) / 1024}
    return out


# ---- measurements -------------------------------------------------------------------------------------------


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live child processes (the DataLoader workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if fields[1] == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def featkd_loader(pipe: Pipeline, root: Path, args: argparse.Namespace) -> Any:
    from featkd.config import from_dict
    from featkd.data import DataConfig, build_data

    cfg = from_dict(DataConfig, pipe.data(root, args), "data")
    return build_data(cfg).train_loader(args.batch, seed=0, device=args.device)


def touch(x: Any) -> None:
    """Read one value per 4 KiB page of a batch's tensors, as a model would read them all: a hand-written loader's
    batches arrive in shared memory that costs page faults (and counts as resident) only once read."""
    for t in x if isinstance(x, (list, tuple)) else [x]:
        if isinstance(t, torch.Tensor) and t.numel():
            t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum().item()


def one_epoch(loader: Iterable[Any], pipe: Pipeline, device: str) -> int:
    """Images of one pass over ``loader`` (every batch on ``device``, read by :func:`touch`)."""
    images = 0
    for x, _y in loader:
        if isinstance(x, torch.Tensor):
            x = x.to(device, non_blocking=True)
        else:  # detection: a list of images of their own sizes (featkd's are on the device already)
            x = [t.to(device, non_blocking=True) for t in x]
        touch(x)
        images += pipe.count(x)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return images


def throughput(pipe: Pipeline, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """featkd vs hand-written, one epoch each per round, interleaved."""
    loaders = {"featkd": featkd_loader(pipe, root, args), "hand_written": pipe.reference(root, args)}
    epoch = {"featkd": 0}

    def run(name: str) -> tuple[int, float, float]:
        if name == "featkd":
            loaders[name].set_epoch(epoch["featkd"])
            epoch["featkd"] += 1
        cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
        images = one_epoch(loaders[name], pipe, args.device)
        return images, time.perf_counter() - t0, tree_cpu_seconds() - cpu0

    for name in loaders:  # warm-up: workers started, files in the page cache
        run(name)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for r in range(args.rounds):
        for name in (list(loaders) if r % 2 == 0 else list(loaders)[::-1]):
            images, wall, cpu = run(name)
            rows[name].append({"images": images, "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
                               "cpu_ms_per_image": 1000 * cpu / images})
            print(f"  round {r + 1}/{args.rounds} {name:12s} {images / wall:7.1f} images/s  "
                  f"cpu {1000 * cpu / images:5.2f} ms/image", flush=True)
    per_round = sorted(a["images_per_s"] / b["images_per_s"]
                       for a, b in zip(rows["featkd"], rows["hand_written"], strict=True))
    out: dict[str, Any] = {"images": len(rows["featkd"]) and rows["featkd"][0]["images"], "rounds": args.rounds,
                           "batch": args.batch}
    for name, rs in rows.items():
        out[name] = {"images_per_s_median": statistics.median(r["images_per_s"] for r in rs),
                     "cpu_ms_per_image_median": statistics.median(r["cpu_ms_per_image"] for r in rs),
                     "per_round": rs}
    # the paired estimate (each round's two epochs ran side by side, so drift of the machine cancels) and the
    # ratio of the two medians
    out["ratio_images_per_s"] = {"median": statistics.median(per_round), "min": per_round[0],
                                 "max": per_round[-1], "per_round_sorted": per_round,
                                 "of_medians": out["featkd"]["images_per_s_median"]
                                 / out["hand_written"]["images_per_s_median"]}
    out["ratio_cpu_per_image"] = statistics.median(
        a["cpu_ms_per_image"] / b["cpu_ms_per_image"] for a, b in zip(rows["featkd"], rows["hand_written"],
                                                                      strict=True))
    return out


def vm(key: str) -> float:
    """``/proc/self/status`` field ``key`` (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker_memory() -> tuple[float, float]:
    """``(largest VmHWM, largest private resident memory)`` in MiB over this process's live child processes (the
    DataLoader workers), from /proc. A forked worker's resident set starts with the pages it shares with the main
    process (its VmHWM is at least the main process's size at the fork); its private memory (``smaps_rollup``:
    Private_Clean + Private_Dirty) is what it added: decoded images, transform buffers, batches."""
    me, peak, private = str(os.getpid()), 0.0, 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] != me:
                continue
            status = (stat.parent / "status").read_text().splitlines()
            rollup = (stat.parent / "smaps_rollup").read_text().splitlines()
        except (OSError, IndexError):  # exited meanwhile
            continue
        hwm = sum(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
        own = sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:")))
        peak, private = max(peak, hwm), max(private, own / 1024)
    return peak, private


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: build one loader over ``args.root``, read ``args.memory_batches`` batches, print the
    peak resident memory (JSON): the main process's, and its workers' (:func:`worker_memory`, read while they
    live: both loaders keep persistent workers; not ``RUSAGE_CHILDREN``, which also counts a child process that
    runs while torch and torchvision are imported, at about the size of the main process then)."""
    pipe = PIPELINES[args.pipeline]
    args = settings(pipe, args)
    root = Path(args.root)
    loader = featkd_loader(pipe, root, args) if args.loader == "featkd" else pipe.reference(root, args)
    built = vm("VmRSS")
    images = 0
    for b, (x, _y) in enumerate(loader):
        touch(x)
        images += pipe.count(x)
        if b + 1 == args.memory_batches:
            break
    main_peak = vm("VmHWM")
    workers, private = worker_memory()
    print(json.dumps({"images_read": images, "rss_after_build_mib": built, "peak_main_mib": main_peak,
                      "peak_worker_mib": workers, "worker_private_mib": private}))


def memory(pipe: Pipeline, roots: dict[int, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n, root in roots.items():
        for loader in ("featkd", "hand_written"):
            cmd = [sys.executable, __file__, "--child-memory", "--pipeline", pipe.name, "--root", str(root),
                   "--loader", loader, "--workers", str(args.workers), "--batch", str(args.batch),
                   "--image-size", str(args.image_size), "--memory-batches", str(args.memory_batches)]
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(args), capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            row = {"images": n, "loader": loader, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"  {n:6d} images {loader:12s} peak main {row['peak_main_mib']:7.1f} MiB  largest worker "
                  f"{row['peak_worker_mib']:7.1f} MiB (private {row['worker_private_mib']:6.1f})", flush=True)
    return rows


def child_env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}


def first_step_once(pipe: Pipeline, root: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``featkd train`` process: seconds to its first output line and to its first training step."""
    cfg = {"name": "first-step", **pipe.first_step,
           "data": {**pipe.data(root, args), **pipe.first_step.get("data", {})},
           "train": {"epochs": 1, "num_threads": args.threads, "progress": "off", "tensorboard": False,
                     "checkpoint_every_steps": 1, "device": args.device}}
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "first-step.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "featkd", "train", str(config), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first_line: dict[str, Any] = {}
    err: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:
            if "t" not in first_line:
                first_line["t"], first_line["text"] = time.perf_counter() - t0, line.strip()

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    step = None
    while proc.poll() is None:
        if (out / "last.pt").exists():
            step = time.perf_counter() - t0
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # stops after the step in progress (exit 143)
    proc.wait(timeout=300)
    for reader in readers:
        reader.join(timeout=10)
    if step is None or "t" not in first_line:
        raise SystemExit(f"{' '.join(cmd)} ended ({proc.returncode}) before its first step:\n{''.join(err)[-3000:]}")
    return {"first_line_s": first_line["t"], "first_step_s": step, "first_line": first_line["text"]}


def first_step(pipe: Pipeline, roots: dict[int, Path], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in roots}
    for r in range(args.first_step_repeats):
        for n in (list(roots) if r % 2 == 0 else list(roots)[::-1]):
            t = first_step_once(pipe, roots[n], work / f"first-step-{pipe.name}", args)
            runs[n].append(t)
            print(f"  {n:6d} images  first line {t['first_line_s']:5.2f} s  first step {t['first_step_s']:5.2f} s",
                  flush=True)
    return {str(n): {"first_line_s_median": statistics.median(t["first_line_s"] for t in ts),
                     "first_step_s_median": statistics.median(t["first_step_s"] for t in ts),
                     "first_line": ts[0]["first_line"], "runs": ts}
            for n, ts in runs.items()}


# ---- report -------------------------------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results["pipelines"].items():
        t, st = res["throughput"], res["settings"]
        ratio = t["ratio_images_per_s"]
        size = f", {results['args']['image_size']} px" if name == "imagefolder" else ""
        lines += [f"### {name}: throughput ({t['images']} images per round, {t['rounds']} rounds, "
                  f"{results['args']['workers']} workers, batch {st['batch']}{size})", "",
                  "| loader | images/s (median) | CPU ms/image (median) |", "|---|---|---|"]
        for loader in ("featkd", "hand_written"):
            lines.append(f"| {loader} | {t[loader]['images_per_s_median']:.1f} | "
                         f"{t[loader]['cpu_ms_per_image_median']:.2f} |")
        lines += ["", f"ratio_images_per_s (featkd / hand-written): per round, median {ratio['median']:.3f} "
                      f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}); of the medians {ratio['of_medians']:.3f}; "
                      f"CPU per image, per round median {t['ratio_cpu_per_image']:.3f}", "",
                  f"### {name}: peak resident memory (MiB) after {st['memory_batches']} batches", "",
                  "| images | loader | main after build (VmRSS) | main peak (VmHWM) | largest worker (VmHWM) | "
                  "largest worker, private |", "|---|---|---|---|---|---|"]
        for row in res["memory"]:
            lines.append(f"| {row['images']} | {row['loader']} | {row['rss_after_build_mib']:.1f} | "
                         f"{row['peak_main_mib']:.1f} | {row['peak_worker_mib']:.1f} | "
                         f"{row['worker_private_mib']:.1f} |")
        lines += ["", f"### {name}: `featkd train` start to first output line / first training step (median of "
                      f"{st['first_step_repeats']})", "",
                  "| images | first line (s) | first step (s) |", "|---|---|---|"]
        for n, row in res["first_step"].items():
            lines.append(f"| {n} | {row['first_line_s_median']:.2f} | {row['first_step_s_median']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def settings(pipe: Pipeline, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with :data:`SETTINGS` resolved for ``pipe``: the command line's value, else the pipeline's own,
    else the default."""
    values = {key: getattr(args, key) if getattr(args, key) is not None else pipe.settings.get(key, default)
              for key, default in SETTINGS.items()}
    return argparse.Namespace(**{**vars(args), **values})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    each = "(default: the pipeline's own; imagefolder: %s)"
    parser.add_argument("--images", type=int, help="images per throughput round (one epoch) " + each % 512)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (both loaders)")
    parser.add_argument("--batch", type=int, help=each % 32)
    parser.add_argument("--image-size", type=int, default=224, help="imagefolder: the crop")
    parser.add_argument("--rounds", type=int, help=each % 7)
    parser.add_argument("--device", default="cpu", help="where the batches go (cpu, cuda)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", help=each % "200 1000 2000")
    parser.add_argument("--memory-batches", type=int, help=each % 8)
    parser.add_argument("--first-step-sizes", type=int, nargs="+", help=each % "200 2000")
    parser.add_argument("--first-step-repeats", type=int, help=each % 3)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "data_throughput",
                        help="generated data and scratch runs (kept: the data is reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_throughput.json")
    # a memory measurement's child process
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--loader", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        memory_child(args)
        return

    from featkd.bench.timing import environment

    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "data_throughput", "environment": environment(),
                               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                        if k not in ("child_memory", "pipeline", "root", "loader")},
                               "command": " ".join(["python", "benchmarks/data_throughput.py", *sys.argv[1:]]),
                               "pipelines": {}}
    for name in args.pipelines:
        pipe = PIPELINES[name]
        pargs = settings(pipe, args)
        t0 = time.perf_counter()
        largest = max(pargs.images, *pargs.memory_sizes, *pargs.first_step_sizes)
        roots = {n: dataset_root(pipe, args.work, n, largest)
                 for n in sorted({pargs.images, *pargs.memory_sizes, *pargs.first_step_sizes})}
        res: dict[str, Any] = {"describe": pipe.describe,
                               "settings": {key: getattr(pargs, key) for key in SETTINGS},
                               "first_step_config": pipe.first_step,
                               "data_on_disk": files_on_disk(roots[largest])}
        print(f"{name}: throughput, {pargs.images} images per round, batch {pargs.batch}", flush=True)
        res["throughput"] = throughput(pipe, roots[pargs.images], pargs)
        print(f"{name}: peak resident memory", flush=True)
        res["memory"] = memory(pipe, {n: roots[n] for n in pargs.memory_sizes}, pargs)
        print(f"{name}: time to the first step", flush=True)
        res["first_step"] = first_step(pipe, {n: roots[n] for n in pargs.first_step_sizes}, args.work, pargs)
        res["wall_s"] = time.perf_counter() - t0
        results["pipelines"][name] = res
    results["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(summary(results))
    print(f"written to {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
