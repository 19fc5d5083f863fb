"""The ``data:`` config section (:class:`DataConfig`, with its ``data.scenes:`` part :class:`ScenesConfig`)
and the registry of data sets (``DATASETS``).

The lowest module of :mod:`featkd.data`: the data set modules register their factories here, and the
scenes generator (:mod:`featkd.data.scenes`) reads its source set through the registry, so none of them
needs another's module to know the config. The scenes parameters live here beside the rest of the config
(the generator's drawing rules are in :mod:`featkd.data.scenes`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from featkd.errors import ConfigError, FeatkdError
from featkd.registry import Registry

if TYPE_CHECKING:
    from featkd.data.bundle import BundleSource, FolderSource, InMemorySource

# --------------------------------------------------------------------------------------------------------
# The scenes generator's parameters (data.scenes).

SCENES_GENERATOR_VERSION = 1  # bump when the same parameters would draw different canvases
SCENES_ITEM_SIZE = 28  # source images are 28 x 28

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(d) for d in range(10))
_SCENES_SOURCES = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}


@dataclass
class ScenesConfig:
    """Every parameter of the scenes generator (the ``data.scenes:`` section); see :mod:`featkd.data.scenes`."""

    source: Literal["fashion-mnist", "mnist"] = "fashion-mnist"
    source_dir: str | None = None  # the source's data_dir (fashion-mnist: the Debian package by default)
    canvas_size: int = 96  # square canvases, 64-128 px
    train_size: int = 1000  # canvases generated per split (data.train_subset then picks from train)
    test_size: int = 500
    min_items: int = 1  # items per canvas, uniform in [min_items, max_items]
    max_items: int = 4
    min_scale: float = 0.8  # item side = round(28 * scale), scale uniform in [min_scale, max_scale]
    max_scale: float = 1.6
    max_box_iou: float = 0.3  # a new item's box may overlap an earlier one's by at most this IoU
    min_visible: float = 0.5  # and must leave each earlier item at least this fraction of its pixels
    mask_threshold: int = 32  # an item's pixels: resized intensity >= this (0-255), holes filled
    background_max: int = 72  # smooth background noise is uniform in [0, background_max] per channel
    fragments: int = 4  # faint fragments of other source images per canvas: uniform in [0, fragments]
    fragment_opacity: float = 0.35  # a fragment's largest opacity
    seed: int = 0

    def validate(self, path: str = "data.scenes") -> None:
        """Check the values; one-line ConfigError naming the key."""
        largest = round(SCENES_ITEM_SIZE * self.max_scale)
        checks = [
            (self.source in _SCENES_SOURCES, "source", f"one of {', '.join(_SCENES_SOURCES)}"),
            (64 <= self.canvas_size <= 128, "canvas_size", "in [64, 128]"),
            (self.train_size >= 1, "train_size", "a positive integer"),
            (self.test_size >= 1, "test_size", "a positive integer"),
            (1 <= self.min_items <= self.max_items, "min_items", "in [1, max_items]"),
            (0 < self.min_scale <= self.max_scale, "min_scale", "in (0, max_scale]"),
            (largest <= self.canvas_size, "max_scale", f"at most {self.canvas_size / SCENES_ITEM_SIZE:.3g}"),
            (0.0 <= self.max_box_iou <= 1.0, "max_box_iou", "in [0, 1]"),
            (0.0 <= self.min_visible <= 1.0, "min_visible", "in [0, 1]"),
            (1 <= self.mask_threshold <= 255, "mask_threshold", "in [1, 255]"),
            (0 <= self.background_max <= 255, "background_max", "in [0, 255]"),
            (self.fragments >= 0, "fragments", ">= 0"),
            (0.0 <= self.fragment_opacity <= 1.0, "fragment_opacity", "in [0, 1]"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"{path}.{key}: must be {want}, got {getattr(self, key)!r}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The source's 10 class names (item class c has category id c + 1 and mask value c + 1)."""
        return _SCENES_SOURCES[self.source]

    def digest(self) -> str:
        """A short hash of every parameter and the generator version: the cache folder's name."""
        blob = json.dumps({"version": SCENES_GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------
# The data: section.

_DOWNLOADABLE = {"cifar10", "cifar100"}


@dataclass
class DataConfig:
    """The ``data:`` section of an experiment."""

    dataset: str = "digits"  # digits | fashion-mnist | mnist | cifar10 | cifar100 | imagefolder | cub200 |
    # cinic10, unlabelled (featkd.data.classification), the segmentation sets scenes | voc | cityscapes | segfolder
    # (featkd.data.seg_datasets), and the detection sets coco | scenes-det (featkd.data.det_datasets)
    data_dir: str | None = None  # fashion-mnist: default /usr/share/datasets/fashion-mnist; mnist: tarball or
    # folder (required); cifar10/cifar100/imagefolder/cinic10/voc/cityscapes/segfolder: root (required); cub200: the
    # folder holding CUB_200_2011/ or that folder itself (required);
    # scenes: the cache root (default ~/.cache/featkd/scenes; the set goes in <root>/<parameter hash>/)
    download: bool = False  # cifar10/cifar100 only (needs internet)
    train_subset: int | None = None  # seeded, class-stratified subset of the training split
    subset_seed: int = 0
    val_fraction: float = 0.0  # stratified hold-out carved from the training split BEFORE the subset
    batch_size: int = 128  # GLOBAL batch (split over DDP ranks)
    eval_batch_size: int = 512  # GLOBAL batch of the eval loaders
    augment: bool = True  # the dataset's default train augmentation
    crop_padding: int | None = None  # override the dataset default (random crop after zero padding;
    # segmentation masks are padded with the ignore index)
    hflip: bool | None = None  # override the dataset default
    # classification sets: a torchvision transforms v2 policy on every training image after the crop and flip
    # (8-bit images; digits' 0..16 values are scaled to [0, 1] for it), seeded per (seed, epoch, sample): the in-memory
    # sets draw it on the CPU, imagefolder in its workers; null: off (featkd.data.augment)
    augment_policy: Literal["randaugment", "trivialaugment", "autoaugment"] | None = None
    # classification sets: mix each training batch with itself rolled by one (the pairs of torchvision's MixUp /
    # CutMix), lambda ~ Beta(alpha, alpha) seeded per (seed, epoch, batch); the targets become soft (B, K), the
    # teacher sees the mixed images; both > 0: one of the two per batch, half and half; 0: off
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    image_size: int | list[int] | None = None  # imagefolder, cub200: the crop size (null: 224); cinic10: the
    # side every image is resized to (null: 32, its own); voc, cityscapes,
    # segfolder, scenes: every image (bilinear) and mask (nearest) is resized to it when read (in memory: once,
    # at build time): an int for a square, [H, W] otherwise; null keeps the native size (in memory: the same for all)
    num_workers: int = 0  # DataLoader workers of the streamed sets (imagefolder, cub200, cinic10, streamed
    # segmentation and detection sets)
    # cinic10: what CINIC-10's valid/ folder is for: unused; val: the validation split (instead of val_fraction);
    # train: added to the training split (the CINIC-10 authors' "train + valid" setting, 180,000 images)
    cinic_valid: Literal["unused", "val", "train"] = "unused"
    masks: bool = False  # detection sets (coco, scenes-det): decode instance masks (Mask R-CNN, mask AP)
    scale_jitter: list[float] | None = None  # detection sets: [lo, hi] resizes each training image by a factor
    # drawn log-uniformly in [lo, hi], then crops / zero-pads it back, boxes and masks alike (featkd.data.detection)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)  # the scenes generator (dataset: scenes)
    # ---- streamed detection (coco, scenes-det read per sample: featkd.data.det_stream); null = off ----
    resize_short: int | list[int] | None = None  # resize each image keeping its aspect: shorter side to this; a
    # list = multi-scale training, one drawn per image per epoch (torchvision's RandomShortestSize, Detectron2's
    # ResizeShortestEdge). null: no resize in the data set; the detector's own transform resizes (min_size /
    # max_size), as torchvision's reference recipe does
    resize_max: int | None = None  # with resize_short: the longer side at most this (COCO recipes: 1333)
    eval_resize_short: int | None = None  # evaluation's shorter side (null: the last of resize_short); AP is
    # scored at each image's original size either way (predictions mapped back)
    # ---- where the samples live (featkd.data.streaming) ----
    storage: Literal["auto", "memory", "stream"] = "auto"  # memory: decoded once at build; stream: read per
    # sample in DataLoader workers; auto: memory when the decoded images fit in memory_limit_gb and share one
    # size (or data.image_size is set), else stream (imagefolder, cub200 and cinic10 always stream)
    memory_limit_gb: float = 2.0  # auto's threshold: decoded uint8 images of all splits, in GiB
    bad_files: Literal["error", "skip"] = "error"  # a bad image or mask met while streaming: stop with one
    # line naming it, or skip it (training: the next readable sample instead; evaluation: left out) and list
    # it in the run folder's skipped_files.txt
    # ---- segmentation recipes (featkd.data.seg_stream; the first three need the streamed path) ----
    scale_range: list[float] | None = None  # [lo, hi]: each training sample is rescaled by a factor drawn
    # uniformly in [lo, hi] of base_size (mmseg RandomResize ratio_range; torchvision's reference: [0.5, 2.0])
    base_size: int | list[int] | None = None  # what scale_range scales: an int = the short side (torchvision
    # RandomResize), [H, W] = fit in it keeping the aspect ratio (mmseg scale (2048, 1024), keep_ratio; the
    # order does not matter); null = the image's own size. Training only: evaluation reads images at their own size
    crop_size: int | list[int] | None = None  # random crop of every training sample to this (int: square,
    # [H, W]), after padding smaller samples right/bottom with 0 (image) and 255 (mask); null: no crop, each
    # training batch padded to its largest sample
    eval_window: int | list[int] | None = None  # segmentation evaluation: slide windows of this (H, W) over
    # images larger than it and average the overlapping logits (mmseg mode 'slide'); null: the whole image
    eval_stride: int | list[int] | None = None  # the windows' step; null: 2/3 of eval_window, rounded up
    # ---- label-free training (docs/methods/multiteacher.md) ----
    # ignore: the training split's labels are never read (targets -1, subsets and val_fraction drawn unstratified,
    # no task loss); the run is scored by k-NN and a linear probe on `probe`. dataset: unlabelled has none anyway
    labels: Literal["read", "ignore"] = "read"
    # the labelled classification set of a label-free run's k-NN / linear-probe evaluation (its train split with
    # eval transforms is the bank, its test split the queries); null: the same data section with its labels read
    # (for data.labels: ignore), nothing for dataset: unlabelled (then only the method's own numbers are logged)
    probe: DataConfig | None = None

    @property
    def label_free(self) -> bool:
        """Whether training reads no labels (``labels: ignore`` or the ``unlabelled`` data set)."""
        return self.labels == "ignore" or self.dataset == "unlabelled"

    def validate(self, path: str = "data") -> None:
        """Check the values (called by the config loader and by :func:`~featkd.data.bundle.build_data`);
        one-line ConfigError."""
        checks = [
            (self.batch_size >= 1, "batch_size", "a positive integer"),
            (self.eval_batch_size >= 1, "eval_batch_size", "a positive integer"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)"),
            (
                self.train_subset is None or self.train_subset >= 1,
                "train_subset",
                "null or a positive integer",
            ),
            (self.crop_padding is None or self.crop_padding >= 0, "crop_padding", "null or >= 0"),
            (self.mixup_alpha >= 0, "mixup_alpha", ">= 0 (0: off)"),
            (self.cutmix_alpha >= 0, "cutmix_alpha", ">= 0 (0: off)"),
            (_valid_size(self.image_size), "image_size", "null, a positive integer or [H, W]"),
            (self.num_workers >= 0, "num_workers", ">= 0"),
            (_valid_range(self.scale_jitter), "scale_jitter", "null or [lo, hi] with 0 < lo <= hi"),
            (self.storage in ("auto", "memory", "stream"), "storage", "auto, memory or stream"),
            (self.memory_limit_gb >= 0, "memory_limit_gb", ">= 0"),
            (self.bad_files in ("error", "skip"), "bad_files", "error or skip"),
            (self.cinic_valid in ("unused", "val", "train"), "cinic_valid", "unused, val or train"),
            (_valid_sides(self.resize_short), "resize_short", "null, a positive integer or a list of them"),
            (self.resize_max is None or _positive_int(self.resize_max), "resize_max", "null or a positive integer"),
            (self.eval_resize_short is None or _positive_int(self.eval_resize_short), "eval_resize_short",
             "null or a positive integer"),
            (_valid_range(self.scale_range), "scale_range", "null or [lo, hi] with 0 < lo <= hi"),
            (_valid_size(self.base_size), "base_size", "null, a positive integer or [H, W]"),
            (_valid_size(self.crop_size), "crop_size", "null, a positive integer or [H, W]"),
            (_valid_size(self.eval_window), "eval_window", "null, a positive integer or [H, W]"),
            (_valid_size(self.eval_stride) and (self.eval_stride is None or self.eval_window is not None),
             "eval_stride", "null, or with eval_window a positive integer or [H, W]"),
            (_stride_fits(self.eval_window, self.eval_stride), "eval_stride",
             f"at most eval_window {self.eval_window!r} (larger steps would leave pixels unpredicted)"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"{path}.{key}: must be {want}, got {getattr(self, key)!r}")
        for key in ("resize_max", "eval_resize_short"):
            if getattr(self, key) is not None and self.resize_short is None:
                raise ConfigError(f"{path}.{key}: needs {path}.resize_short (the shorter side training resizes to)")
        if self.resize_short is not None and self.image_size is not None:
            raise ConfigError(f"{path}.resize_short: give it or {path}.image_size, not both (image_size squashes "
                              "every image to one size; resize_short keeps each image's aspect)")
        try:
            DATASETS.get(self.dataset)
        except FeatkdError as e:
            raise ConfigError(f"{path}.dataset: {e}") from None
        if self.cinic_valid != "unused" and self.dataset != "cinic10":
            raise ConfigError(f"{path}.cinic_valid: only cinic10 has a valid/ folder; {self.dataset!r} is read "
                              f"without it (leave it unused)")
        if self.cinic_valid == "val" and self.val_fraction > 0:
            raise ConfigError(f"{path}.val_fraction: with {path}.cinic_valid: val, CINIC-10's valid/ is the "
                              "validation split; set one of the two")
        if self.probe is not None:
            if not self.label_free:
                raise ConfigError(f"{path}.probe: only for a label-free run (data.labels: ignore or dataset: "
                                  "unlabelled); a labelled run is scored on its own test split")
            if self.probe.label_free or self.probe.probe is not None:
                raise ConfigError(f"{path}.probe: must be a labelled set (labels: read, dataset not unlabelled, "
                                  "no probe of its own)")
        if self.labels == "ignore" and (self.mixup_alpha or self.cutmix_alpha):
            raise ConfigError(f"{path}.labels: ignore has no targets to mix; set mixup_alpha and cutmix_alpha to 0")
        if self.download and self.dataset not in _DOWNLOADABLE:
            raise ConfigError(
                f"{path}.download: {self.dataset} cannot be downloaded "
                f"(only {', '.join(sorted(_DOWNLOADABLE))} can)"
            )


def _valid_range(values: list[float] | None) -> bool:
    return values is None or (len(values) == 2 and 0 < values[0] <= values[1])


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _valid_sides(sides: int | list[int] | None) -> bool:
    if sides is None or not isinstance(sides, list):
        return sides is None or _positive_int(sides)
    return len(sides) >= 1 and all(_positive_int(v) for v in sides)


def _valid_size(size: int | list[int] | None) -> bool:
    if size is None or isinstance(size, int):
        return size is None or size >= 1
    return len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)


def _stride_fits(window: int | list[int] | None, stride: int | list[int] | None) -> bool:
    """A sliding-window step no larger than the window (per axis), so the windows cover every pixel."""
    if window is None or stride is None or not (_valid_size(window) and _valid_size(stride)):
        return True
    windows = [window] * 2 if isinstance(window, int) else window
    strides = [stride] * 2 if isinstance(stride, int) else stride
    return all(s <= w for s, w in zip(strides, windows, strict=True))


# A registered factory reads ``cfg``'s files and returns what build_data turns into a DataBundle: the source
# types are defined in featkd.data.bundle; the sets register in featkd.data.classification, seg_datasets and
# det_datasets (all imported by featkd/data/__init__.py).
DATASETS: Registry[Callable[[DataConfig], InMemorySource | FolderSource | BundleSource]] = Registry("dataset")
