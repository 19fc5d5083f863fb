"""Detection data in memory: COCO instances decoded once, batched as ``(images, list of target dicts)``.

The path of small sets of one size (the scenes protocols): :func:`featkd.data.det_stream.detection_storage`
chooses it under ``data.storage: auto``. Images of different sizes and sets too large for memory (COCO)
stream instead, each image at its own size (:mod:`featkd.data.det_stream`, with the ``data.resize_short`` /
``resize_max`` / ``eval_resize_short`` recipes, which this path refuses); their targets are the same dicts.

:func:`decode_instances` reads the images of a checked :class:`~featkd.data.coco.CocoInstances` (Pillow,
RGB) into one uint8 tensor (N, 3, H, W) of one size: ``data.image_size`` when set (each image resized
bilinearly, its boxes and areas scaled, its masks resized by nearest neighbour), else the first image's
size, which every image must then have. With ``data.masks`` each annotation's segmentation is decoded to a
uint8 mask at the image's size. :class:`DetectionSource` then builds a
:class:`~featkd.data.bundle.DataBundle` with ``task`` "detection":

* ``num_classes`` = K + 1 and ``class_names`` = ``("background", *category names)``: label ``k`` (1..K) is
  the k-th category by ascending COCO id (0 is the background; see :mod:`featkd.models.detection`);
* batches ``(x, targets)``: ``x`` float32 (B, 3, H, W) = uint8 / 255, in [0, 1] (detectors normalise
  inside); ``targets`` a list of B dicts on the device, as :mod:`featkd.tasks.detection` describes
  (``boxes``, ``labels``, ``iscrowd``, ``area``, ``image_id``, and ``masks`` with ``data.masks``). Every
  annotation is in the targets, crowd ones included: the task trains without them and evaluates with them;
* images without annotations stay (empty targets: negatives in training, false positives in evaluation,
  as COCO counts them);
* train augmentation: horizontal flip (``data.hflip``, default on) of the image, its boxes
  (``x1' = W - x2``) and masks, drawn per (seed, epoch, sample index) like the other in-memory sets
  (:mod:`featkd.data.augment`); random crops (``data.crop_padding``) are not offered for detection;
* scale jitter (``data.scale_jitter: [lo, hi]``, default off), after the flip: each training image is resized
  by a factor drawn log-uniformly in ``[lo, hi]`` (bilinear, antialiased when shrinking), then cropped
  (factor > 1) or zero-padded (factor < 1) back to its size at a random position, so batches keep one
  shape and teacher and student see the same pixels (Detectron2's ResizeScale + FixedSizeCrop, the
  "large scale jitter" of Ghiasi et al. 2021 with a small range). Boxes are scaled by the exact per-axis
  factors ``round(H s) / H``, ``round(W s) / W`` (pixel-edge coordinates, as ``align_corners=False``),
  shifted and clipped to the canvas; masks are resized by nearest neighbour at pixel centres
  (``nearest-exact``) and placed the same way; an annotation cut to under 1 pixel wide or high is dropped.
  ``area`` is scaled and multiplied by the box's visible fraction (only the evaluation reads it, on
  unaugmented images). The factors and positions are a second table drawn per (seed, epoch, sample index)
  from its own stream (:func:`draw_jitter`), so turning jitter on leaves the flips as they were;
* ``train_subset`` / ``val_fraction``: seeded, unstratified (:func:`featkd.data.splits.split_dense`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.data.augment import AugmentSpec, draw_params, mix_seed
from featkd.data.bundle import DataBundle, train_augment
from featkd.data.coco import CocoInstances, annotation_mask
from featkd.data.config import DataConfig
from featkd.data.images import open_image
from featkd.data.loaders import Device, canonical_device, eval_shard_indices, per_rank_batch, train_shard_indices
from featkd.data.splits import split_dense
from featkd.errors import ConfigError, DataError

Target = dict[str, Tensor]


@dataclass
class DetectionSplit:
    """One split in memory: uint8 images (N, C, H, W) and per image its annotations (CPU tensors): boxes
    float32 (n, 4) xyxy, labels int64 (n,) in 1..K, iscrowd bool (n,), area float32 (n,), masks uint8
    (n, H, W) or None; ``image_ids`` int64 (N,)."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    iscrowd: list[Tensor]
    area: list[Tensor]
    image_ids: Tensor
    masks: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Tensor) -> DetectionSplit:
        ix = indices.tolist()
        return DetectionSplit(
            self.images[indices], [self.boxes[i] for i in ix], [self.labels[i] for i in ix],
            [self.iscrowd[i] for i in ix], [self.area[i] for i in ix], self.image_ids[indices],
            None if self.masks is None else [self.masks[i] for i in ix],
        )  # fmt: skip

    def targets(self, device: torch.device) -> list[Target]:
        """Every image's target dict on ``device`` (built once per device)."""
        cache = self.__dict__.setdefault("_targets", {})
        if device not in cache:
            out = []
            for i in range(len(self)):
                t = {"boxes": self.boxes[i], "labels": self.labels[i], "iscrowd": self.iscrowd[i],
                     "area": self.area[i], "image_id": self.image_ids[i]}
                if self.masks is not None:
                    t["masks"] = self.masks[i]
                out.append({k: v.to(device) for k, v in t.items()})
            cache[device] = (self.images.to(device), out)
        return cache[device]


def hflip_target(target: Target, width: int) -> Target:
    """The target of the horizontally flipped image of ``width`` pixels: boxes ``x1' = W - x2``, masks flipped."""
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return out


_JITTER_STREAM = 0x6A697474  # "jitt": the scale-jitter draws, a stream apart from the flips'
MIN_BOX_SIDE = 1.0  # pixels: a jittered annotation cut narrower or lower than this is dropped
INSTANCE_KEYS = ("boxes", "labels", "iscrowd", "area", "masks")  # the target keys with one row per annotation


@dataclass(frozen=True)
class JitterParams:
    """One epoch's scale jitter: ``scales`` (N,) float64 in [lo, hi]; ``offsets`` (N, 2) float64 in [0, 1):
    where the crop window (factor > 1) or the shrunk image (factor < 1) sits, as a fraction (y, x) of the
    free range."""

    scales: Tensor
    offsets: Tensor


def draw_jitter(n: int, scale_range: Sequence[float], *, seed: int, epoch: int) -> JitterParams:
    """Draw the scale factors (log-uniform in ``scale_range``) and positions of all ``n`` training samples for
    ``epoch`` (on the CPU), from a generator seeded by (seed, epoch) only, like
    :func:`featkd.data.augment.draw_params`."""
    lo, hi = (float(v) for v in scale_range)
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, _JITTER_STREAM))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    scales = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return JitterParams(scales, torch.rand(n, 2, generator=g, dtype=torch.float64))


def _placement(size: int, new: int, frac: float) -> tuple[int, int, int, int]:
    """``(source start, destination start, length, shift)`` along one axis of a ``new``-pixel resized image
    put back on ``size`` pixels: a crop window when it is larger, else a zero-padded placement."""
    if new >= size:
        off = round(frac * (new - size))
        return off, 0, size, -off
    off = round(frac * (size - new))
    return 0, off, new, off


def _resize_place(x: Tensor, new: tuple[int, int], place: tuple[tuple[int, int, int, int], ...], mode: str) -> Tensor:
    """(..., H, W) -> resized to ``new`` by ``mode``, then cropped / zero-padded back to (H, W) by ``place``."""
    (sy, dy, ly, _), (sx, dx, lx, _) = place
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    kw = {"align_corners": False, "antialias": new[0] < x.shape[-2]} if mode == "bilinear" else {}
    resized = F.interpolate(flat, size=new, mode=mode, **kw).reshape(*x.shape[:-2], *new)
    out = x.new_zeros(x.shape)
    window = resized[..., sy : sy + ly, sx : sx + lx]
    if not x.is_floating_point():  # uint8 images and masks
        window = window.round().clamp(0, 255).to(x.dtype)
    out[..., dy : dy + ly, dx : dx + lx] = window
    return out


def scale_jitter(image: Tensor, target: Target, scale: float, offset: Sequence[float]) -> tuple[Tensor, Target]:
    """``image`` (C, H, W) uint8 resized by ``scale`` and cropped / zero-padded back to (H, W) at ``offset``
    (fractions (y, x), see :class:`JitterParams`), and its target transformed alike (module docstring)."""
    h, w = image.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return image, target
    place = (_placement(h, nh, float(offset[0])), _placement(w, nw, float(offset[1])))
    out_image = _resize_place(image, (nh, nw), place, "bilinear")
    fx, fy, shift_x, shift_y = nw / w, nh / h, place[1][3], place[0][3]
    boxes = target["boxes"]
    scaled = boxes * boxes.new_tensor([fx, fy, fx, fy]) + boxes.new_tensor([shift_x, shift_y, shift_x, shift_y])
    limit = boxes.new_tensor([w, h, w, h])
    clipped = torch.minimum(scaled.clamp_min(0), limit)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (cw >= MIN_BOX_SIDE) & (ch >= MIN_BOX_SIDE)
    out = dict(target)
    out["boxes"] = clipped
    if "area" in target:
        full = ((scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])).clamp_min(1e-12)
        out["area"] = target["area"] * (fx * fy) * (cw * ch / full).clamp(0, 1)
    if "masks" in target:
        out["masks"] = _resize_place(target["masks"], (nh, nw), place, "nearest-exact")
    for key in INSTANCE_KEYS:
        if key in out:
            out[key] = out[key][keep]
    return out_image, out


def _num_batches(n: int, batch: int, drop_last: bool) -> int:
    return n // batch if drop_last else math.ceil(n / batch)


def _to_unit(x: Tensor) -> Tensor:
    return x.float().mul_(1.0 / 255.0)


class DetectionTrainLoader:
    """Shuffled, sharded batches with per-sample flips and scale jitter (``scale_jitter`` (lo, hi) or None);
    ``(x (B, C, H, W) in [0, 1], [target, ...])``."""

    replayable = True  # flips and jitter drawn from (seed, epoch) per sample

    def __init__(self, split: DetectionSplit, augment: AugmentSpec, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, device: Device = "cpu", drop_last: bool = True,
                 scale_jitter: tuple[float, float] | None = None) -> None:
        self.batch_size = per_rank_batch(batch_size, world_size, rank)
        self.split, self.augment, self.scale_jitter = split, augment, scale_jitter
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = canonical_device(device)
        self.epoch = 0
        per_rank = math.ceil(len(split) / world_size)
        self._num_batches = _num_batches(per_rank, self.batch_size, drop_last)
        self.num_samples = min(per_rank, self._num_batches * self.batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, list[Target]]]:
        images, targets = self.split.targets(self.device)
        flips = (draw_params(len(self.split), self.augment, seed=self.seed, epoch=self.epoch).flips
                 if self.augment.hflip else None)
        jitter = (draw_jitter(len(self.split), self.scale_jitter, seed=self.seed, epoch=self.epoch)
                  if self.scale_jitter is not None else None)
        idx = train_shard_indices(len(self.split), seed=self.seed, epoch=self.epoch, rank=self.rank,
                                  world_size=self.world_size)
        bs, width = self.batch_size, images.shape[-1]
        for b in range(self._num_batches):
            ix = idx[b * bs : (b + 1) * bs]
            x = images[ix.to(self.device)]
            ys = [targets[i] for i in ix.tolist()]
            if flips is not None:
                f = flips[ix]
                x = torch.where(f.to(self.device)[:, None, None, None], x.flip(3), x)
                ys = [hflip_target(y, width) if fl else y for y, fl in zip(ys, f.tolist(), strict=True)]
            if jitter is not None:
                done = [scale_jitter(xi, y, s, o) for xi, y, s, o in
                        zip(x, ys, jitter.scales[ix].tolist(), jitter.offsets[ix].tolist(), strict=True)]
                x, ys = torch.stack([d[0] for d in done]), [d[1] for d in done]
            yield _to_unit(x), ys


class DetectionEvalLoader:
    """Fixed-order, unpadded, sharded batches over ``indices`` of a split, no augmentation."""

    def __init__(self, split: DetectionSplit, batch_size: int, *, indices: Tensor | None = None, rank: int = 0,
                 world_size: int = 1, device: Device = "cpu") -> None:
        self.batch_size = per_rank_batch(batch_size, world_size, rank)
        self.split = split
        self.device = canonical_device(device)
        self.indices = eval_shard_indices(torch.arange(len(split)) if indices is None else indices, rank=rank,
                                          world_size=world_size)
        self.num_samples = len(self.indices)
        self._num_batches = _num_batches(self.num_samples, self.batch_size, drop_last=False)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not depend on the epoch."""

    def __iter__(self) -> Iterator[tuple[Tensor, list[Target]]]:
        images, targets = self.split.targets(self.device)
        bs = self.batch_size
        for b in range(self._num_batches):
            ix = self.indices[b * bs : (b + 1) * bs]
            yield _to_unit(images[ix.to(self.device)]), [targets[i] for i in ix.tolist()]


class DetectionBackend:
    """The loader factories of a detection :class:`~featkd.data.bundle.DataBundle`."""

    def __init__(self, train: DetectionSplit, val: DetectionSplit | None, test: DetectionSplit,
                 aug: AugmentSpec, scale_jitter: tuple[float, float] | None = None) -> None:
        self.train, self.val, self.test, self.aug = train, val, test, aug
        self.scale_jitter = scale_jitter

    def train_loader(self, batch_size: int, **kw: Any) -> DetectionTrainLoader:
        return DetectionTrainLoader(self.train, self.aug, batch_size, scale_jitter=self.scale_jitter, **kw)

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> DetectionEvalLoader | None:
        data = getattr(self, split)
        if data is None:
            return None
        return DetectionEvalLoader(data, batch_size, indices=indices, **kw)


# --------------------------------------------------------------------------------------------------------
# Decoding COCO files into a split.


def decode_instances(coco: CocoInstances, images_dir: Path, labels: dict[int, int], size: tuple[int, int] | None,
                     masks: bool, name: str) -> DetectionSplit:
    """The :class:`DetectionSplit` of ``coco``'s images in ``images_dir`` (see the module docstring);
    ``labels`` maps COCO category ids to 1..K; ``size`` (H, W) or None (every image the first's size)."""
    from PIL import Image

    if not coco.images:
        raise DataError(f"{name}: {coco.path} lists no images")
    arrays, boxes, cats, crowd, areas, mask_list = [], [], [], [], [], []
    target = size
    first = None
    for image in coco.images:
        path = images_dir / image.file_name
        pil = open_image(path, name).convert("RGB")
        w, h = pil.size
        if (image.width, image.height) not in ((w, h), (None, None)) and None not in (image.width, image.height):
            raise DataError(f"{name}: {path} is {w}x{h} but {coco.path} says {image.width}x{image.height}")
        if image.width is None or image.height is None:  # boxes were not checked against the size yet
            check_inside(image, w, h, coco.path, name)
        if target is None:
            target, first = (h, w), path
        elif size is None and (h, w) != target:
            raise DataError(f"{name}: {path} is {w}x{h} but {first} is {target[1]}x{target[0]}; "
                            "set data.image_size to resize every image to one size, or data.storage: stream "
                            "(each image at its own size)")
        sy, sx = target[0] / h, target[1] / w
        if (h, w) != target:
            pil = pil.resize((target[1], target[0]), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(pil))
        b = np.asarray(image.boxes, dtype=np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], dtype=np.float32)
        boxes.append(torch.from_numpy(b))
        cats.append(torch.tensor([labels[c] for c in image.categories], dtype=torch.int64))
        crowd.append(torch.tensor(image.iscrowd, dtype=torch.bool))
        areas.append(torch.tensor(image.area, dtype=torch.float32) * (sx * sy))
        if masks:
            mask_list.append(_decode_masks(image, h, w, target, coco.path, name))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    ids = torch.tensor([image.id for image in coco.images], dtype=torch.int64)
    return DetectionSplit(x, boxes, cats, crowd, areas, ids, mask_list if masks else None)


def check_inside(image: Any, w: int, h: int, path: Path, name: str) -> None:
    """Check the boxes of an image entry that gave no size against its decoded size ``w`` x ``h`` (a one-line
    DataError past :data:`~featkd.data.coco.BOX_TOLERANCE`), and clip them to it."""
    from featkd.data.coco import BOX_TOLERANCE

    for ann_id, (x1, y1, x2, y2) in zip(image.annotation_ids, image.boxes, strict=True):
        if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE or x2 > w + BOX_TOLERANCE or y2 > h + BOX_TOLERANCE:
            raise DataError(f"{name}: {path}: annotation {ann_id}: bbox lies outside its image "
                            f"{image.file_name} ({w}x{h})")
    image.boxes = [[min(max(a, 0.0), lim) for a, lim in zip(box, (w, h, w, h), strict=True)] for box in image.boxes]


def _decode_masks(image: Any, h: int, w: int, target: tuple[int, int], path: Path, name: str) -> Tensor:
    """uint8 (n, H', W') masks of ``image``'s annotations at the target size (nearest-neighbour resize)."""
    from PIL import Image

    out = np.zeros((len(image.segmentations), *target), dtype=np.uint8)
    for k, (seg, ann_id) in enumerate(zip(image.segmentations, image.annotation_ids, strict=True)):
        where = f"{name}: {path}: annotation {ann_id}"
        if seg is None:
            raise DataError(f"{where} has no segmentation; data.masks: true needs one for every annotation")
        mask = annotation_mask(seg, h, w, where).astype(np.uint8)
        if (h, w) != target:
            mask = np.asarray(Image.fromarray(mask).resize((target[1], target[0]), Image.Resampling.NEAREST))
        out[k] = mask
    return torch.from_numpy(out)


@dataclass
class DetectionSource:
    """A decoded detection set: train and test splits, the category names (labels 1..K)."""

    train: DetectionSplit
    test: DetectionSplit
    category_names: tuple[str, ...]
    masks: bool = False
    storage: str = "in memory"  # the phrase of the run's first line

    def to_bundle(self, cfg: DataConfig) -> DataBundle:
        """The bundle of ``cfg.dataset``: unstratified seeded splits, in-memory loaders, task detection."""
        if cfg.crop_padding:
            raise ConfigError("data.crop_padding: random crops are not offered for detection (boxes); "
                              "use data.hflip")
        n = len(self.train)
        train_idx, val_idx = split_dense(n, cfg, cfg.dataset)
        train = self.train if len(train_idx) == n else self.train.subset(train_idx)
        val = None if val_idx is None else self.train.subset(val_idx)
        aug = train_augment(cfg, 0, True)
        jitter = None
        if cfg.augment and cfg.scale_jitter is not None:
            jitter = (float(cfg.scale_jitter[0]), float(cfg.scale_jitter[1]))
        described = aug.describe()
        if jitter is not None:
            scale = f"scale jitter [{jitter[0]:g}, {jitter[1]:g}]"
            described = scale if described == "none" else f"{described} + {scale}"
        c, h, w = self.train.images.shape[1:]
        return DataBundle(
            name=cfg.dataset,
            num_classes=len(self.category_names) + 1,
            input_shape=(c, h, w),
            train_size=len(train),
            val_size=0 if val is None else len(val),
            test_size=len(self.test),
            augmentation=described,
            mean=(0.0,) * c,
            std=(1.0,) * c,
            task="detection",
            class_names=("background", *self.category_names),
            masks=self.masks,
            storage=self.storage,
            backend=DetectionBackend(train, val, self.test, aug, jitter),
        )


def category_labels(ids: Sequence[int]) -> dict[int, int]:
    """COCO category id -> label 1..K, by ascending id."""
    return {cat: k + 1 for k, cat in enumerate(sorted(ids))}
