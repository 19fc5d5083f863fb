"""Semantic segmentation streamed from disk: each (image, mask) pair decoded in a DataLoader worker, per sample.

The path for segmentation sets too large for memory (Cityscapes: 2,975 training images of 2048 x 1024, about
25 GB decoded), sets whose images differ in size (VOC), and configs that ask for the standard per-sample
recipes. :func:`segmentation_storage` decides, from the image files' headers (nothing is decoded), with
:func:`~featkd.data.bundle.choose_storage`; a config naming ``data.scale_range``, ``base_size`` or
``crop_size`` streams under ``data.storage: auto`` and is refused under ``memory``.

Per sample, in the worker (:mod:`featkd.data.streaming`: the random draws are seeded from (seed, epoch, index),
so ranks, worker counts and resumes agree): :class:`PairRead` decodes the pair with the same checks as the
in-memory path (:func:`~featkd.data.segmentation.read_pair`: a mask value outside the label map or a mask of
another size than its image is a one-line DataError naming the file), then the training transform
(:class:`TrainTransform`, torchvision transforms v2 on ``tv_tensors.Image`` / ``tv_tensors.Mask``, so a mask
takes exactly its image's geometry and is resized by nearest neighbour) applies :class:`Recipe`:

1. random rescale (``data.scale_range`` of ``data.base_size``): an int base is the short side, drawn as an
   integer in ``[lo * base, hi * base]`` (torchvision's reference ``RandomResize``); an [H, W] base is scaled
   by a ratio drawn uniformly in ``[lo, hi]`` and the image fitted into it keeping its aspect ratio (mmseg
   ``RandomResize(scale, ratio_range, keep_ratio=True)``: factor ``min(max(scale) / long side, min(scale) /
   short side)``); no base: the ratio scales the image's own size;
2. random crop to ``data.crop_size`` after padding a smaller sample right and bottom with 0 (image) and the
   ignore index 255 (mask) (the reference's ``PadIfSmaller`` + ``RandomCrop``);
3. horizontal flip with probability 0.5 (``data.hflip``, default on).

``data.augment: false`` keeps the base rescale (ratio 1) and takes the centre crop, without flips. mmseg's
Cityscapes recipe is ``scale_range: [0.5, 2.0]``, ``base_size: [1024, 2048]``, ``crop_size: [512, 1024]``
(hflip on by default); its ``cat_max_ratio`` crop re-draws and ``PhotoMetricDistortion`` are not offered.

Evaluation reads every image and mask at its own size (``data.image_size`` resizes both, as in memory): mIoU at
the original resolution, as mmseg computes it. Batches of samples of different sizes (training without a crop,
evaluation) are padded right and bottom to the batch's largest, images with 0 and masks with 255 (the
reference's collate); the models see the padding, so ``data.eval_batch_size: 1`` gives exact full-resolution
results. Images are normalised on the device (``finish``), so padding is black, not the mean colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featkd.data.bundle import DataBundle, choose_storage
from featkd.data.config import DataConfig
from featkd.data.loaders import Loader, Normalizer
from featkd.data.segmentation import IGNORE_INDEX, Pair, as_hw, eval_windows, read_pair, target_size
from featkd.data.splits import split_dense
from featkd.data.streaming import StreamDataset, stream_eval_loader, stream_train_loader
from featkd.errors import ConfigError, DataError, FeatkdError

#: the per-sample recipes only the streamed path offers
RECIPE_KEYS = ("scale_range", "base_size", "crop_size")


# --------------------------------------------------------------------------------------------------------
# Memory or stream.


def header_size(path: Path, name: str) -> tuple[int, int]:
    """(H, W) of an image file from its header alone (nothing decoded); one-line DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            w, h = image.size
    except FileNotFoundError:
        raise DataError(f"{name}: image file {path} not found") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{name}: cannot read {path} ({' '.join(str(e).split())})") from None
    return h, w


def segmentation_storage(cfg: DataConfig, pairs: Sequence[Pair], name: str) -> tuple[bool, str | None]:
    """``(in memory?, the run's storage phrase)`` for a set of ``pairs`` (all splits); the phrase is None for
    ``data.storage: memory``, whose size is known once decoded. Auto reads only the images' headers."""
    asked = [key for key in RECIPE_KEYS if getattr(cfg, key) is not None]
    if cfg.storage == "memory":
        if asked:
            raise ConfigError(f"data.{asked[0]}: the per-sample recipes (scale_range, base_size, crop_size) are "
                              f"the streamed path's; set data.storage: stream (or auto), or remove data.{asked[0]}")
        return True, None
    if cfg.storage == "stream":
        return choose_storage(cfg, len(pairs), 0.0, True)
    if asked:
        return False, f"streamed from disk ({cfg.num_workers} workers): data.{asked[0]} is a per-sample recipe"
    size = target_size(cfg)
    if size is not None:
        return choose_storage(cfg, len(pairs), 4.0 * size[0] * size[1] * len(pairs), True)
    sizes = []
    for pair in pairs:
        try:
            sizes.append(header_size(pair.image, name))
        except FeatkdError:
            if cfg.bad_files != "skip":
                raise
    decoded = sum(4.0 * h * w for h, w in sizes)  # RGB + a one-byte mask per pixel
    return choose_storage(cfg, len(pairs), decoded, len(set(sizes)) <= 1)


# --------------------------------------------------------------------------------------------------------
# The recipe and the per-sample transforms (run in the workers).


@dataclass(frozen=True)
class Recipe:
    """The training geometry of a streamed segmentation set (see the module docstring)."""

    scale_range: tuple[float, float] | None = None
    base_size: int | tuple[int, int] | None = None  # int: the short side; (H, W): keep-ratio box
    crop_size: tuple[int, int] | None = None
    hflip: bool = True
    random: bool = True  # data.augment: random draws; off: ratio 1, centre crop, no flip

    @classmethod
    def from_config(cls, cfg: DataConfig, hflip: bool = True) -> Recipe:
        """The recipe of ``cfg`` (``hflip``: the data set's default when ``data.hflip`` is null)."""
        base = cfg.base_size if cfg.base_size is None or isinstance(cfg.base_size, int) else as_hw(cfg.base_size)
        scale = None if cfg.scale_range is None else (float(cfg.scale_range[0]), float(cfg.scale_range[1]))
        return cls(scale, base, as_hw(cfg.crop_size), hflip if cfg.hflip is None else cfg.hflip, cfg.augment)

    def resized(self, h: int, w: int, ratio: float | None = None) -> tuple[int, int]:
        """(H, W) of an h x w sample rescaled by ``ratio`` (None: drawn from torch's RNG as the recipe says;
        1 without scale_range or random draws) of the base size."""
        lo, hi = self.scale_range if (self.scale_range is not None and self.random) else (1.0, 1.0)
        if isinstance(self.base_size, int):  # torchvision: a random integer short side
            if ratio is None:
                short = int(torch.randint(int(lo * self.base_size), int(hi * self.base_size) + 1, ()).item())
            else:
                short = int(ratio * self.base_size)
            if h <= w:
                return short, int(short * w / h)
            return int(short * h / w), short
        if ratio is None:
            ratio = lo + (hi - lo) * float(torch.rand((), dtype=torch.float64))
        if self.base_size is None:
            return max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
        box = (int(self.base_size[0] * ratio), int(self.base_size[1] * ratio))  # mmseg: int(scale * ratio)
        factor = min(max(box) / max(h, w), min(box) / min(h, w))  # mmcv rescale_size, keep_ratio
        return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))

    @property
    def rescales(self) -> bool:
        return self.base_size is not None or (self.scale_range is not None and self.random)

    def describe(self) -> str:
        parts = []
        if self.rescales:
            if isinstance(self.base_size, int):
                base = f"short side {self.base_size}"
            elif self.base_size is not None:
                base = f"{self.base_size[0]}x{self.base_size[1]} (keep ratio)"
            else:
                base = "the image's size"
            if self.scale_range is not None and self.random:
                parts.append(f"random rescale [{self.scale_range[0]:g}, {self.scale_range[1]:g}] of {base}")
            else:
                parts.append(f"rescale to {base}")
        if self.crop_size is not None:
            kind = "random crop" if self.random else "centre crop"
            parts.append(f"{kind} {self.crop_size[0]}x{self.crop_size[1]} (padded 0, mask {IGNORE_INDEX})")
        if self.hflip and self.random:
            parts.append("hflip")
        return " + ".join(parts) if parts else "none"


class PairRead:
    """Sample ``j`` of a list of pairs: ``(tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask uint8 (H, W))``,
    resized to ``size`` (H, W) unless None; a bad file is a one-line DataError naming it."""

    def __init__(self, pairs: Sequence[Pair], size: tuple[int, int] | None, name: str) -> None:
        self.pairs, self.size, self.name = list(pairs), size, name

    def __call__(self, j: int) -> tuple[Any, Any]:
        from torchvision import tv_tensors

        image, labels = read_pair(self.pairs[j], self.size, self.name)
        image, labels = (a if a.flags.writeable else a.copy() for a in (image, labels))  # PIL's arrays are read-only
        return (tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
                tv_tensors.Mask(torch.from_numpy(labels)))


class TrainTransform:
    """:class:`Recipe` on one ``(Image, Mask)`` sample -> plain uint8 tensors (3, H, W), (H, W)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def __call__(self, sample: tuple[Any, Any]) -> tuple[Tensor, Tensor]:
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        image, mask = sample
        r = self.recipe
        if r.rescales:
            size = list(r.resized(*image.shape[-2:]))
            image, mask = F.resize(image, size, antialias=True), F.resize(mask, size)  # Mask: nearest
        if r.crop_size is not None:
            (ch, cw), (h, w) = r.crop_size, image.shape[-2:]
            if h < ch or w < cw:  # PadIfSmaller: right / bottom
                padding = [0, 0, max(cw - w, 0), max(ch - h, 0)]
                image, mask = F.pad(image, padding, fill=0), F.pad(mask, padding, fill=IGNORE_INDEX)
            crop = v2.RandomCrop(list(r.crop_size)) if r.random else v2.CenterCrop(list(r.crop_size))
            image, mask = crop(image, mask)
        if r.hflip and r.random:
            image, mask = v2.RandomHorizontalFlip(0.5)(image, mask)
        return image.as_subclass(Tensor), mask.as_subclass(Tensor)


def plain(sample: tuple[Any, Any]) -> tuple[Tensor, Tensor]:
    """The evaluation transform: the sample as it was read, as plain tensors."""
    image, mask = sample
    return image.as_subclass(Tensor), mask.as_subclass(Tensor)


def pad_collate(samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``assemble``: uint8 images (B, 3, H, W) padded with 0 and masks (B, H, W) padded with the ignore index,
    right and bottom, to the batch's largest height and width (the torchvision reference's collate)."""
    h = max(s[0].shape[-2] for s in samples)
    w = max(s[0].shape[-1] for s in samples)
    images = torch.zeros(len(samples), samples[0][0].shape[0], h, w, dtype=torch.uint8)
    masks = torch.full((len(samples), h, w), IGNORE_INDEX, dtype=torch.uint8)
    for k, (image, mask) in enumerate(samples):
        images[k, :, : image.shape[-2], : image.shape[-1]] = image
        masks[k, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks


# --------------------------------------------------------------------------------------------------------
# The bundle.


class SegStreamBackend:
    """The loader factories of a streamed segmentation set: the training samples of ``train_view`` (the recipe,
    seeded per sample), the held-out ``val_view`` and the whole test set (as read)."""

    def __init__(self, reads: dict[str, PairRead], views: dict[str, list[int] | None], norm: Normalizer,
                 recipe: Recipe, workers: int, skip_bad: bool) -> None:
        self.reads, self.views, self.norm, self.recipe = reads, views, norm, recipe
        self.workers, self.skip_bad = workers, skip_bad

    def _finish(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.norm(x), y.long()

    def train_loader(self, batch_size: int, *, seed: int, **kw: Any) -> Loader:
        ds = StreamDataset(self.reads["train"], self.views["train"], TrainTransform(self.recipe), seed=seed,
                           skip_bad=self.skip_bad)
        return stream_train_loader(ds, pad_collate, self._finish, batch_size, seed=seed, num_workers=self.workers,
                                   **kw)

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> Loader | None:
        view = self.views[split]
        if view is None:
            return None
        ds = StreamDataset(self.reads["test" if split == "test" else "train"], view, plain, skip_bad=self.skip_bad)
        return stream_eval_loader(ds, pad_collate, self._finish, batch_size, indices=indices,
                                  num_workers=self.workers, **kw)


def stream_channel_stats(pairs: Sequence[Pair], size: tuple[int, int] | None, name: str,
                         skip_bad: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``image / 255`` over ``pairs``, one image at a time (what
    :func:`~featkd.data.segmentation.channel_stats` gives in memory), rounded to 4 decimals."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for pair in pairs:
        try:
            image, _ = read_pair(pair, size, name)
        except FeatkdError:
            if not skip_bad:
                raise
            continue
        x = image.reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += len(x)
    if not count:
        raise DataError(f"{name}: no readable training image to take the mean and std of")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@dataclass
class SegmentationStreamSource:
    """A segmentation set read per sample: its pairs, class names and normalisation (None: the training
    images' own mean and std, taken in one pass at build time)."""

    train_pairs: list[Pair]
    test_pairs: list[Pair]
    class_names: tuple[str, ...]
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None
    storage: str
    hflip: bool = True  # default train augmentation
    ignore_index: int = IGNORE_INDEX

    def to_bundle(self, cfg: DataConfig) -> DataBundle:
        """The bundle of ``cfg.dataset``: unstratified seeded splits, streamed loaders, task segmentation."""
        if cfg.crop_padding is not None:
            raise ConfigError("data.crop_padding: the streamed segmentation path crops with data.crop_size "
                              "(padding smaller samples with 0 / mask 255); remove data.crop_padding")
        if cfg.base_size is not None and cfg.image_size is not None:
            raise ConfigError("data.base_size: data.image_size already resizes every sample; set one of them")
        name, size, skip = cfg.dataset, target_size(cfg), cfg.bad_files == "skip"
        train_idx, val_idx = split_dense(len(self.train_pairs), cfg, name)
        mean, std = self.stats or stream_channel_stats(self.train_pairs, size, name, skip)
        recipe = Recipe.from_config(cfg, self.hflip)
        window, stride = eval_windows(cfg)
        views = {"train": train_idx.tolist(), "test": list(range(len(self.test_pairs))),
                 "val": None if val_idx is None else val_idx.tolist()}
        reads = {"train": PairRead(self.train_pairs, size, name), "test": PairRead(self.test_pairs, size, name)}
        return DataBundle(
            name=name,
            num_classes=len(self.class_names),
            input_shape=(3, *self._train_shape(recipe, size, name, skip)),
            train_size=len(train_idx),
            val_size=0 if val_idx is None else len(val_idx),
            test_size=len(self.test_pairs),
            augmentation=recipe.describe(),
            mean=mean,
            std=std,
            task="segmentation",
            ignore_index=self.ignore_index,
            class_names=self.class_names,
            storage=self.storage,
            eval_window=window,
            eval_stride=stride,
            backend=SegStreamBackend(reads, views, Normalizer(mean, std, 255.0), recipe, cfg.num_workers, skip),
        )

    def _train_shape(self, recipe: Recipe, size: tuple[int, int] | None, name: str, skip: bool) -> tuple[int, int]:
        """(H, W) of a training sample: the crop; without one the first readable training image's, at the base
        size (ratio 1): the shape the models are probed and built with."""
        if recipe.crop_size is not None:
            return recipe.crop_size
        if size is not None:
            h, w = size
        else:
            h = w = 0
            for pair in self.train_pairs:
                try:
                    h, w = header_size(pair.image, name)
                    break
                except FeatkdError:
                    if not skip:
                        raise
            if not h:
                raise DataError(f"{name}: no readable training image")
        return recipe.resized(h, w, 1.0) if recipe.base_size is not None else (h, w)

