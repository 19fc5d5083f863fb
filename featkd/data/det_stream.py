"""Streamed detection data: COCO-layout splits read per sample in DataLoader workers, each image at its own size.

The path of :mod:`featkd.data.det_datasets` for sets too large for memory or whose images differ in size
(:func:`detection_storage`; COCO itself): nothing is decoded at build time. A split's annotations are packed
into flat NumPy arrays (:class:`PackedSplit`: boxes, labels, crowd flags, areas, ids, file names, and with
``data.masks`` each segmentation as JSON bytes, all indexed by offsets), not per-image Python objects, so
resident memory does not grow with the number of images and forked workers share the pages (reading a NumPy
buffer writes no reference counts: no copy-on-write).

A sample (:class:`PackedRead`, in a worker): the image decoded by Pillow (RGB) as a ``tv_tensors.Image``
uint8 (3, H, W), its boxes as ``tv_tensors.BoundingBoxes`` (XYXY, ``canvas_size`` (H, W)) and with
``data.masks`` its instance masks as a ``tv_tensors.Mask`` uint8 (N, H, W), each decoded from its annotation
(polygons, RLE) for this sample only. Transforms are torchvision's v2 ops on those tv_tensors
(:class:`StreamTransform`); their randomness comes from torch's RNG as :class:`~featkd.data.streaming.StreamDataset`
seeds it per (seed, epoch, sample index), nowhere else.

Batches: ``(x, targets)`` with ``x`` a LIST of B float32 images (3, H_i, W_i) in [0, 1], each of its own
size (torchvision's detectors take such a list and pad it in their ``GeneralizedRCNNTransform``), and
``targets`` the in-memory path's dicts (:mod:`featkd.data.detection`: ``boxes``, ``labels`` 1..K by
ascending category id, ``iscrowd``, ``area``, ``image_id``, ``masks``). Evaluation targets keep ``boxes``,
``masks`` and ``area`` at the ORIGINAL image's coordinates and add ``orig_size`` and ``size`` (int64 (2,),
(H, W) of the file and of the image fed to the model): :class:`~featkd.tasks.detection.CocoEvaluator` maps
the predictions back to the original size before scoring, so AP is COCO's on the annotation file as it is.

Options (streamed path only; ``data.storage: memory`` with any of them is a one-line ConfigError):

* ``data.resize_short`` (int or list; default null) with ``data.resize_max`` (default null): aspect-preserving
  resize, scale ``min(short / shorter side, max / longer side)`` (torchvision's ``RandomShortestSize``; a list
  draws one side per image per epoch: multi-scale training, Detectron2's ``ResizeShortestEdge``). Null does no
  resize in the data set: the detector's own transform resizes (``min_size`` / ``max_size``), as torchvision's
  reference recipe does (``hflip`` policy), which keeps the batch smaller through the workers.
* ``data.eval_resize_short`` (default null: the last entry of ``resize_short``, torchvision's ``min_size[-1]``).
* ``data.hflip`` (default on) and ``data.augment`` (off: no flip, and training resizes as evaluation does).
* ``data.image_size`` squashes each image to one size (per axis) here too, the eval targets mapped back alike.
* ``data.scale_jitter`` and ``data.crop_padding`` belong to the in-memory path (fixed-size batches): errors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featkd.data.bundle import DataBundle, choose_storage
from featkd.data.coco import CocoInstances, annotation_mask
from featkd.data.config import DataConfig
from featkd.data.detection import check_inside
from featkd.data.images import open_image
from featkd.data.segmentation import target_size
from featkd.data.splits import split_dense
from featkd.data.streaming import StreamDataset, stream_eval_loader, stream_train_loader
from featkd.errors import ConfigError, DataError
from featkd.files import atomic_file

#: the options only the streamed path applies (they force it under data.storage: auto)
STREAM_ONLY = ("resize_short", "resize_max", "eval_resize_short")


# --------------------------------------------------------------------------------------------------------
# A split's annotations in flat arrays.


def _header_size(path: Path, name: str) -> tuple[int, int]:
    """``(W, H)`` from the file's header (nothing decoded); a one-line DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(f"{name}: image file {path} not found") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{name}: cannot read {path} ({' '.join(str(e).split())})") from None


def image_sizes(coco: CocoInstances, images_dir: Path, name: str, skip_bad: bool) -> np.ndarray:
    """int64 (N, 2) ``(H, W)`` of ``coco``'s images: from the file's ``width`` / ``height``, else from the
    image's header (its boxes then checked and clipped, as the in-memory decoder does); 0 where the header is
    unreadable and ``skip_bad`` (the sample's read then fails and is skipped)."""
    if not coco.images:
        raise DataError(f"{name}: {coco.path} lists no images")
    sizes = np.zeros((len(coco.images), 2), dtype=np.int64)
    for i, image in enumerate(coco.images):
        if image.width is not None and image.height is not None:
            sizes[i] = (image.height, image.width)
            continue
        try:
            w, h = _header_size(images_dir / image.file_name, name)
        except DataError:
            if skip_bad:
                continue
            raise
        check_inside(image, w, h, coco.path, name)
        sizes[i] = (h, w)
    return sizes


def _packed_bytes(items: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(buffer uint8, offsets int64 (n + 1,))`` of byte strings laid back to back."""
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in items], out=offsets[1:])
    return np.frombuffer(b"".join(items), dtype=np.uint8), offsets


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


@dataclass
class PackedSplit:
    """One split's checked annotations in flat arrays (see the module docstring): image ``i``'s annotations
    are rows ``offsets[i]:offsets[i + 1]`` of ``boxes`` / ``labels`` / ``iscrowd`` / ``area`` / ``ann_ids``."""

    path: Path  # the instances file (named in errors)
    images_dir: Path
    image_ids: np.ndarray  # int64 (N,)
    sizes: np.ndarray  # int64 (N, 2) (H, W); 0 where unknown
    names: np.ndarray  # uint8: the file names (UTF-8) back to back
    name_offsets: np.ndarray  # int64 (N + 1,)
    offsets: np.ndarray  # int64 (N + 1,)
    boxes: np.ndarray  # float32 (A, 4) [x1, y1, x2, y2], clipped to the image
    labels: np.ndarray  # int64 (A,) in 1..K
    iscrowd: np.ndarray  # bool (A,)
    area: np.ndarray  # float32 (A,) COCO's area
    ann_ids: np.ndarray  # int64 (A,) (-1 where the file gives none)
    segs: np.ndarray | None = None  # uint8: each segmentation as JSON, back to back (data.masks)
    seg_offsets: np.ndarray | None = None  # int64 (A + 1,)

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, i: int) -> str:
        return bytes(self.names[self.name_offsets[i] : self.name_offsets[i + 1]]).decode()

    def segmentation(self, k: int) -> Any:
        """Annotation row ``k``'s segmentation as the file has it (polygons or an RLE dict)."""
        assert self.segs is not None and self.seg_offsets is not None
        return json.loads(bytes(self.segs[self.seg_offsets[k] : self.seg_offsets[k + 1]]))


def annotation_counts(coco: CocoInstances) -> np.ndarray:
    """int64 (N,): the number of annotations of each image of ``coco``."""
    return np.array([len(im.boxes) for im in coco.images], dtype=np.int64)


_ARRAYS = ("image_ids", "sizes", "names", "name_offsets", "offsets", "boxes", "labels", "iscrowd", "area",
           "ann_ids", "segs", "seg_offsets")
PACKED_VERSION = 1  # bump when PackedSplit's arrays or pack_split's checks change


def packed_cache_key(files: Sequence[Path], cfg: DataConfig) -> str:
    """The packed-annotation cache's key: each instances file's resolved path, size and modification time,
    and what packing depends on (``data.masks``, ``data.bad_files``, the pack version)."""
    parts: list[Any] = [PACKED_VERSION, cfg.masks, cfg.bad_files]
    for path in files:
        stat = path.stat()
        parts += [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def packed_cache_dir() -> Path:
    """``$FEATKD_CACHE/coco-packed`` (default ``$XDG_CACHE_HOME/featkd`` or ``~/.cache/featkd``)."""
    root = os.environ.get("FEATKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featkd"
    return Path(root) / "coco-packed"


def save_packed(path: Path, splits: dict[str, PackedSplit], category_names: Sequence[str]) -> None:
    """Write packed splits (``{"train": ..., "test": ...}``) and the category names to one ``.npz``
    atomically (no pickle: plain arrays and one JSON string)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"version": PACKED_VERSION, "category_names": list(category_names), "splits": {}}
    for split, packed in splits.items():
        meta["splits"][split] = {"path": str(packed.path), "images_dir": str(packed.images_dir)}
        for field_name in _ARRAYS:
            value = getattr(packed, field_name)
            if value is not None:
                arrays[f"{split}.{field_name}"] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


def load_packed(path: Path) -> tuple[dict[str, PackedSplit], tuple[str, ...]] | None:
    """What :func:`save_packed` wrote, or None when the file is missing, unreadable or of another version."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]))
            if meta.get("version") != PACKED_VERSION:
                return None
            splits = {}
            for split, where in meta["splits"].items():
                fields = {f: data[f"{split}.{f}"] for f in _ARRAYS if f"{split}.{f}" in data.files}
                splits[split] = PackedSplit(path=Path(where["path"]), images_dir=Path(where["images_dir"]), **fields)
            return splits, tuple(meta["category_names"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pack_split(coco: CocoInstances, images_dir: Path, labels: dict[int, int], sizes: np.ndarray, masks: bool,
               name: str) -> PackedSplit:
    """The :class:`PackedSplit` of a checked ``coco`` file (``sizes`` from :func:`image_sizes`); with ``masks``
    every annotation needs a segmentation (else a one-line DataError naming it)."""
    images = coco.images
    counts = np.array([len(im.boxes) for im in images], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    names, name_offsets = _packed_bytes([im.file_name.encode() for im in images])
    boxes = np.asarray([b for im in images for b in im.boxes], dtype=np.float32).reshape(-1, 4)
    split = PackedSplit(
        path=coco.path, images_dir=images_dir, image_ids=np.array([im.id for im in images], dtype=np.int64),
        sizes=sizes, names=names, name_offsets=name_offsets, offsets=offsets, boxes=boxes,
        labels=np.array([labels[c] for im in images for c in im.categories], dtype=np.int64),
        iscrowd=np.array([c for im in images for c in im.iscrowd], dtype=bool),
        area=np.array([a for im in images for a in im.area], dtype=np.float32),
        ann_ids=np.array([_int_or(a, -1) for im in images for a in im.annotation_ids], dtype=np.int64),
    )  # fmt: skip
    if masks:
        encoded = []
        for im in images:
            for seg, ann_id in zip(im.segmentations, im.annotation_ids, strict=True):
                if seg is None:
                    raise DataError(f"{name}: {coco.path}: annotation {ann_id} has no segmentation; data.masks: true "
                                    "needs one for every annotation")
                encoded.append(json.dumps(seg, separators=(",", ":")).encode())
        split.segs, split.seg_offsets = _packed_bytes(encoded)
    return split


# --------------------------------------------------------------------------------------------------------
# Samples and their transforms.


class PackedRead:
    """Sample ``i`` of a :class:`PackedSplit`: ``(tv_tensors.Image uint8 (3, H, W), target)``, the target's
    ``boxes`` a ``BoundingBoxes`` and ``masks`` (with ``masks``) a ``Mask`` uint8 (N, H, W). A missing or
    unreadable file, or one whose size is not the annotation file's, is a one-line DataError naming it."""

    def __init__(self, split: PackedSplit, masks: bool, name: str) -> None:
        self.split, self.masks, self.name = split, masks, name

    def __call__(self, i: int) -> tuple[Any, dict[str, Any]]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        s = self.split
        path = s.images_dir / s.file_name(i)
        pil = open_image(path, self.name).convert("RGB")
        w, h = pil.size
        eh, ew = (int(v) for v in s.sizes[i])
        if eh and (eh, ew) != (h, w):
            raise DataError(f"{self.name}: {path} is {w}x{h} but {s.path} says {ew}x{eh}")
        a, b = int(s.offsets[i]), int(s.offsets[i + 1])
        boxes = torch.from_numpy(s.boxes[a:b].copy())
        if not eh:  # size unknown at build time: clip here
            boxes = torch.minimum(boxes.clamp_min(0), boxes.new_tensor([w, h, w, h]))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(s.labels[a:b].copy()),
            "iscrowd": torch.from_numpy(s.iscrowd[a:b].copy()),
            "area": torch.from_numpy(s.area[a:b].copy()),
            "image_id": torch.tensor(int(s.image_ids[i]), dtype=torch.int64),
        }
        if self.masks:
            out = np.zeros((b - a, h, w), dtype=np.uint8)
            for k in range(a, b):
                where = f"{self.name}: {s.path}: annotation {int(s.ann_ids[k])}"
                out[k - a] = annotation_mask(s.segmentation(k), h, w, where)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(out))
        return tv_tensors.Image(TF.pil_to_tensor(pil)), target


@dataclass(frozen=True)
class ResizeRule:
    """How a split resizes: to one of ``sides`` (shorter side; training draws one, evaluation takes the only
    one) with the longer side at most ``max_size``, or to the fixed ``size`` (H, W), or not at all."""

    sides: tuple[int, ...] = ()
    max_size: int | None = None
    size: tuple[int, int] | None = None

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) a deterministic rule (one side) gives an (h, w) image: RandomShortestSize's arithmetic."""
        if self.size is not None:
            return self.size
        if not self.sides:
            return h, w
        r = self.sides[-1] / min(h, w)
        if self.max_size is not None:
            r = min(r, self.max_size / max(h, w))
        return max(1, int(h * r)), max(1, int(w * r))

    def describe(self) -> str:
        if self.size is not None:
            return f"resize to {self.size[1]}x{self.size[0]}"
        if not self.sides:
            return "no resize"
        sides = str(self.sides[0]) if len(self.sides) == 1 else f"one of {list(self.sides)}"
        return f"shorter side {sides}" + (f" (longer <= {self.max_size})" if self.max_size else "")


class StreamTransform:
    """A sample's transform (picklable, for workers). Training: the resize (``RandomShortestSize`` /
    ``Resize``) and ``RandomHorizontalFlip`` on the tv_tensors (boxes and masks follow the image), ``area``
    scaled by the per-axis factors. Evaluation: the image alone resized (deterministic: no RNG drawn, so an
    evaluation between epochs leaves training's RNG as it was); the target stays at the original size, plus
    ``orig_size`` and ``size`` (module docstring)."""

    def __init__(self, rule: ResizeRule, *, train: bool, hflip: bool) -> None:
        from torchvision.transforms import v2

        self.rule, self.train = rule, train
        ops: list[Any] = []
        if train and rule.size is not None:
            ops.append(v2.Resize(list(rule.size)))
        elif train and rule.sides:
            ops.append(v2.RandomShortestSize(list(rule.sides), rule.max_size))
        if train and hflip:
            ops.append(v2.RandomHorizontalFlip(0.5))
        self.ops = v2.Compose(ops) if ops else None

    def __call__(self, sample: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        from torchvision.transforms.v2 import functional as TF

        image, target = sample
        h, w = image.shape[-2:]
        if self.train:
            if self.ops is not None:
                image, target = self.ops(image, target)
            nh, nw = image.shape[-2:]
            if (nh, nw) != (h, w):
                target["area"] = target["area"] * ((nh / h) * (nw / w))
            return image, target
        nh, nw = self.rule.output_size(h, w)
        if (nh, nw) != (h, w):
            image = TF.resize(image, [nh, nw], antialias=True)
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        target["size"] = torch.tensor([nh, nw], dtype=torch.int64)
        return image, target


def assemble_detection(samples: list[tuple[Any, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``assemble`` (worker): transformed samples -> (B images uint8 (3, H_i, W_i), B targets) as plain tensors."""
    images = [image.as_subclass(Tensor) for image, _ in samples]
    targets = [{k: v.as_subclass(Tensor) for k, v in t.items()} for _, t in samples]
    return images, targets


def finish_detection(x: list[Tensor], y: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``finish`` (main process, on the device): uint8 images -> float32 in [0, 1] (detectors normalise inside)."""
    return [image.float().mul_(1.0 / 255.0) for image in x], y


# --------------------------------------------------------------------------------------------------------
# Storage choice, backend, source.


def detection_storage(cfg: DataConfig, sizes: Sequence[np.ndarray], counts: Sequence[np.ndarray]
                      ) -> tuple[bool, str]:
    """``(in memory?, why)`` for splits of images of ``sizes`` (N_i, 2) with ``counts`` (N_i,) annotations
    each: the streamed-only options
    stream under ``auto`` (and are a ConfigError under ``memory``); else
    :func:`~featkd.data.bundle.choose_storage` on the decoded size (images, and masks with ``data.masks``) and
    whether the images share one size (or ``data.image_size`` makes them)."""
    given = [k for k in STREAM_ONLY if getattr(cfg, k) is not None]
    if given and cfg.storage == "memory":
        raise ConfigError(f"data.{given[0]}: only streamed detection data resizes per image (data.storage: stream "
                          "or auto); data.storage: memory decodes every image once at one size: use data.image_size")
    if given and cfg.storage == "auto":
        return False, f"streamed from disk ({cfg.num_workers} workers): data.{given[0]} is set"
    all_sizes = np.concatenate(list(sizes))
    fixed = target_size(cfg)
    per_image = np.concatenate(list(counts)).astype(np.float64)
    if fixed is not None:
        pixels = np.full(len(all_sizes), float(fixed[0] * fixed[1]))
    else:
        pixels = all_sizes[:, 0].astype(np.float64) * all_sizes[:, 1]
    decoded = float((pixels * (3 + (per_image if cfg.masks else 0))).sum())
    known = all_sizes[all_sizes.min(axis=1) > 0]
    one_size = fixed is not None or len(np.unique(known, axis=0)) <= 1
    return choose_storage(cfg, len(all_sizes), decoded, one_size)


class StreamDetectionBackend:
    """The loader factories of a streamed detection bundle (:mod:`featkd.data.streaming`)."""

    def __init__(self, reads: dict[str, PackedRead], views: dict[str, list[int] | None], train_tf: StreamTransform,
                 eval_tf: StreamTransform, workers: int, skip_bad: bool) -> None:
        self.reads, self.views, self.train_tf, self.eval_tf = reads, views, train_tf, eval_tf
        self.workers, self.skip_bad = workers, skip_bad

    def train_loader(self, batch_size: int, *, seed: int, **kw: Any) -> Any:
        ds = StreamDataset(self.reads["train"], self.views["train"], self.train_tf, seed=seed, skip_bad=self.skip_bad)
        return stream_train_loader(ds, assemble_detection, finish_detection, batch_size, seed=seed,
                                   num_workers=self.workers, **kw)

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> Any:
        view = self.views[split]
        if view is None:
            return None
        ds = StreamDataset(self.reads[split], view, self.eval_tf, skip_bad=self.skip_bad)
        return stream_eval_loader(ds, assemble_detection, finish_detection, batch_size, indices=indices,
                                  num_workers=self.workers, **kw)


def resize_rules(cfg: DataConfig) -> tuple[ResizeRule, ResizeRule]:
    """``(training rule, evaluation rule)`` of ``cfg`` (module docstring)."""
    fixed = target_size(cfg)
    if fixed is not None:
        rule = ResizeRule(size=fixed)
        return rule, rule
    if cfg.resize_short is None:
        return ResizeRule(), ResizeRule()
    sides = tuple(cfg.resize_short) if isinstance(cfg.resize_short, list) else (cfg.resize_short,)
    eval_side = sides[-1] if cfg.eval_resize_short is None else cfg.eval_resize_short
    return ResizeRule(sides, cfg.resize_max), ResizeRule((eval_side,), cfg.resize_max)


@dataclass
class StreamDetectionSource:
    """A streamed detection set: packed train and test splits, the category names (labels 1..K), and the
    phrase saying why it streams."""

    train: PackedSplit
    test: PackedSplit
    category_names: tuple[str, ...]
    masks: bool
    storage: str

    def to_bundle(self, cfg: DataConfig) -> DataBundle:
        """The bundle of ``cfg.dataset``: unstratified seeded splits, streamed loaders, task detection."""
        if cfg.crop_padding:
            raise ConfigError("data.crop_padding: random crops are not offered for detection (boxes); "
                              "use data.hflip")
        if cfg.scale_jitter is not None:
            raise ConfigError("data.scale_jitter: only in-memory detection data jitters (fixed-size batches); "
                              f"{cfg.dataset} is {self.storage}: use a list data.resize_short (multi-scale training)")
        name = cfg.dataset
        train_rule, eval_rule = resize_rules(cfg)
        hflip = cfg.augment and (True if cfg.hflip is None else cfg.hflip)
        if not cfg.augment:  # no random draw in training: it resizes as evaluation does
            train_rule = eval_rule
        train_tf = StreamTransform(train_rule, train=True, hflip=hflip)
        eval_tf = StreamTransform(eval_rule, train=False, hflip=False)
        n = len(self.train)
        train_idx, val_idx = split_dense(n, cfg, name)
        reads = {"train": PackedRead(self.train, self.masks, name), "test": PackedRead(self.test, self.masks, name)}
        reads["val"] = reads["train"]
        views = {"train": train_idx.tolist(), "val": None if val_idx is None else val_idx.tolist(),
                 "test": list(range(len(self.test)))}
        parts = ([train_rule.describe()] if train_rule.size or train_rule.sides else []) + (["hflip"] if hflip else [])
        described = " + ".join(parts) if parts else "none"
        if eval_rule.size or eval_rule.sides:
            described += f"; evaluation: {eval_rule.describe()}"
        known = self.train.sizes[self.train.sizes.min(axis=1) > 0]
        h, w = eval_rule.output_size(*(int(v) for v in known[0])) if len(known) else (224, 224)
        return DataBundle(
            name=name,
            num_classes=len(self.category_names) + 1,
            input_shape=(3, h, w),  # the first training image's, as evaluation resizes it (sizes vary)
            train_size=len(train_idx),
            val_size=0 if val_idx is None else len(val_idx),
            test_size=len(self.test),
            augmentation=described,
            mean=(0.0,) * 3,
            std=(1.0,) * 3,
            task="detection",
            class_names=("background", *self.category_names),
            masks=self.masks,
            storage=self.storage,
            backend=StreamDetectionBackend(reads, views, train_tf, eval_tf, cfg.num_workers, cfg.bad_files == "skip"),
        )
