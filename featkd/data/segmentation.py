"""Semantic-segmentation data in memory: (image, mask) files decoded once, batched like classification.

Where a set lives is decided per build (:func:`featkd.data.seg_stream.segmentation_storage`): small sets of one
size stay here, in memory; large ones, sets whose images differ in size, and configs that ask for the
per-sample recipes (``data.scale_range``, ``base_size``, ``crop_size``) stream from disk
(:mod:`featkd.data.seg_stream`), reading each pair with the same :func:`read_pair` and :class:`LabelMap` checks.

A segmentation data set (:mod:`featkd.data.seg_datasets` says where each one's files are) lists its
(image, mask) file pairs; :func:`read_pairs` decodes every pair once, at build time, into uint8 tensors of
one fixed size: images (N, 3, H, W) RGB and masks (N, H, W). A sample whose size differs from the target
(``data.image_size``, else the first training image's size) is resized, the image bilinearly (Pillow,
antialiased) and the mask by nearest neighbour. Each mask file's raw values go through a :class:`LabelMap`
(identity for most sets, label id -> train id for Cityscapes), which also rejects values that are neither a
class id nor the ignore index.

:class:`SegmentationSource` then builds a :class:`~featkd.data.bundle.DataBundle` with ``task``
"segmentation" over the same in-memory loaders as classification: ``(x, y)`` with ``x`` float32 normalised
(B, 3, H, W) and ``y`` int64 (B, H, W) in ``[0, num_classes)`` or ``ignore_index`` (255), on the device. The
train augmentation (random crop after padding, horizontal flip) moves each mask with its image; mask
padding is the ignore index. ``train_subset`` and ``val_fraction`` pick seeded, unstratified samples
(:func:`featkd.data.splits.split_dense`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from featkd.data.bundle import DataBundle, in_memory_bundle, train_augment
from featkd.data.config import DataConfig
from featkd.data.images import open_image
from featkd.data.loaders import Normalizer, TensorSplit
from featkd.data.splits import split_dense
from featkd.errors import DataError

IGNORE_INDEX = 255  # masks are uint8: at most 255 classes (0..254), 255 = unlabelled
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel PNGs; a palette PNG's values are its palette indices


@dataclass(frozen=True)
class LabelMap:
    """How raw mask values become labels: ``table[raw]``; -1 marks a raw value that is an error.
    ``valid`` describes the valid raw values for the error message."""

    table: np.ndarray  # int16 (K,), values in 0..254, IGNORE_INDEX or -1
    valid: str

    @classmethod
    def identity(cls, num_classes: int) -> LabelMap:
        """Raw values 0..num_classes-1 are the classes, 255 is ignored, anything else is an error."""
        table = np.full(256, -1, dtype=np.int16)
        table[:num_classes] = np.arange(num_classes)
        table[IGNORE_INDEX] = IGNORE_INDEX
        return cls(table, f"a class id (0..{num_classes - 1}) or the ignore index {IGNORE_INDEX}")

    def apply(self, raw: np.ndarray, where: Path, name: str) -> np.ndarray:
        """uint8 labels (H, W) of the raw mask values (H, W); DataError naming the file and a bad value."""
        bad = (raw < 0) | (raw >= len(self.table))
        labels = self.table[np.where(bad, 0, raw)]
        bad |= labels < 0
        if bad.any():
            raise DataError(f"{name}: {where}: mask value {int(raw[bad].min())} is not {self.valid}")
        return labels.astype(np.uint8)


@dataclass(frozen=True)
class Pair:
    """One sample's files and how to read its mask."""

    image: Path
    mask: Path
    labels: LabelMap


def as_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """A size option (an int for a square, or [H, W]) as (H, W); None stays None."""
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def target_size(cfg: DataConfig) -> tuple[int, int] | None:
    """``data.image_size`` as (H, W), or None (keep the native size)."""
    return as_hw(cfg.image_size)


def eval_windows(cfg: DataConfig) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(data.eval_window, data.eval_stride)`` as (H, W) pairs; the stride defaults to 2/3 of the window,
    rounded up (mmseg's 769 x 769 windows step 513), so neighbouring windows overlap by a third."""
    window = as_hw(cfg.eval_window)
    if window is None:
        return None, None
    stride = as_hw(cfg.eval_stride) or (math.ceil(2 * window[0] / 3), math.ceil(2 * window[1] / 3))
    return window, stride


def read_pair(pair: Pair, size: tuple[int, int] | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair: uint8 image (H, W, 3) and labels (H, W), resized to ``size`` (H, W) unless None."""
    from PIL import Image

    image = open_image(pair.image, name).convert("RGB")
    mask = open_image(pair.mask, name)
    if mask.mode not in MASK_MODES:
        raise DataError(
            f"{name}: {pair.mask}: a mask must be a single-channel PNG (mode {', '.join(MASK_MODES)}), "
            f"got mode {mask.mode}"
        )
    if mask.size != image.size:
        (mw, mh), (w, h) = mask.size, image.size
        raise DataError(f"{name}: {pair.mask} is {mw}x{mh} but its image {pair.image} is {w}x{h}")
    labels = pair.labels.apply(np.asarray(mask), pair.mask, name)
    if size is not None and (image.size[1], image.size[0]) != size:
        wh = (size[1], size[0])
        image = image.resize(wh, Image.Resampling.BILINEAR)
        labels = np.asarray(Image.fromarray(labels).resize(wh, Image.Resampling.NEAREST))
    return np.asarray(image), labels


def read_pairs(pairs: Sequence[Pair], size: tuple[int, int] | None, name: str) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 3, H, W) and masks (N, H, W) of ``pairs``, all of ``size`` (H, W); None: every
    sample must have the first one's size (else a DataError naming the file)."""
    images, masks = [], []
    first, resize = pairs[0].image, size
    for pair in pairs:
        image, labels = read_pair(pair, resize, name)
        if size is None:
            size = labels.shape
        elif labels.shape != size:  # only without resizing
            (h, w), (h0, w0) = labels.shape, size
            raise DataError(
                f"{name}: {pair.image} is {w}x{h} but {first} is {w0}x{h0}; set data.image_size to resize "
                "every sample to one size, or data.storage: auto or stream to keep each at its own"
            )
        images.append(image)
        masks.append(labels)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(masks))


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``images / 255`` for uint8 images (N, C, H, W), rounded to
    4 decimals."""
    x = images.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


@dataclass
class SegmentationSource:
    """A decoded segmentation set: uint8 images (N, 3, H, W) and masks (N, H, W) per split."""

    train_images: Tensor
    train_masks: Tensor
    test_images: Tensor
    test_masks: Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # default train augmentation
    hflip: bool = True
    ignore_index: int = IGNORE_INDEX
    storage: str = "in memory"  # the phrase of the run's first line

    def to_bundle(self, cfg: DataConfig) -> DataBundle:
        """The bundle of ``cfg.dataset``: unstratified seeded splits, in-memory loaders, task segmentation."""
        n = len(self.train_images)
        train_idx, val_idx = split_dense(n, cfg, cfg.dataset)

        def split(images: Tensor, masks: Tensor) -> TensorSplit:
            return TensorSplit(images, masks, ignore_index=self.ignore_index)

        train = (
            split(self.train_images, self.train_masks)
            if len(train_idx) == n
            else split(self.train_images[train_idx], self.train_masks[train_idx])
        )
        val = None if val_idx is None else split(self.train_images[val_idx], self.train_masks[val_idx])
        test = split(self.test_images, self.test_masks)
        aug = train_augment(cfg, self.crop_padding, self.hflip)
        norm = Normalizer(self.mean, self.std, 255.0)
        window, stride = eval_windows(cfg)
        return in_memory_bundle(cfg, len(self.class_names), train, val, test, norm, aug, task="segmentation",
                                ignore_index=self.ignore_index, class_names=self.class_names, storage=self.storage,
                                eval_window=window, eval_stride=stride)
