"""Data bundles: what a registered data set's factory returns (the source types) and :func:`build_data`,
which turns it into a :class:`DataBundle` (sizes, shapes, loader factories).

A factory registered in ``DATASETS`` (:mod:`featkd.data.config`) returns one of

* :class:`InMemorySource`: uint8 tensors held in memory, normalised on the device per batch (the
  classification sets of :mod:`featkd.data.classification` but imagefolder);
* :class:`FolderSource`: image lists decoded per sample in DataLoader workers (imagefolder, cub200, cinic10):
  torchvision ``ImageFolder`` objects or :class:`ImageList` (any object with ``samples``, ``(path, class id)``);
* a :class:`BundleSource`: an object with a ``to_bundle(cfg)`` method, which :func:`build_data` calls: the
  semantic-segmentation sets (:mod:`featkd.data.seg_datasets`, built by :mod:`featkd.data.segmentation` or,
  streamed, :mod:`featkd.data.seg_stream`) and
  the detection sets (:mod:`featkd.data.det_datasets`, built by :mod:`featkd.data.detection`).

A bundle's loaders come from its ``backend`` (:class:`LoaderBackend`): :class:`~featkd.data.loaders.InMemoryBackend`,
:class:`FolderBackend` or :class:`~featkd.data.detection.DetectionBackend`. Split rules (``val_fraction``,
``train_subset``, ``subset_seed``): see :mod:`featkd.data.splits`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from featkd.data.augment import AugmentSpec, MixSpec, mix_batch
from featkd.data.config import DATASETS, DataConfig
from featkd.data.images import open_image
from featkd.data.loaders import Device, InMemoryBackend, Loader, Normalizer, TensorSplit
from featkd.data.splits import split_dense, split_train
from featkd.data.streaming import OnImage, StreamDataset, stack_pairs, stream_eval_loader, stream_train_loader
from featkd.errors import ConfigError, DataError, FeatkdError, relative_note

# --------------------------------------------------------------------------------------------------------
# What a registered data set factory returns.


@dataclass
class InMemorySource:
    """A data set held in memory: uint8 images (N, C, H, W) with values in [0, max_value]."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: float = 255.0
    crop_padding: int = 0  # default train augmentation
    hflip: bool = False


@dataclass
class ImageList:
    """Image files and their class ids, read like a torchvision ``ImageFolder`` (``samples``, ``classes``,
    ``targets``) for the layouts that list their files instead of sorting them into one folder per class (CUB's
    ``images.txt``) or join several folders into one split (CINIC-10's train + valid)."""

    samples: list[tuple[str, int]]  # (image file, class id)
    classes: list[str]  # class id -> name

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


@dataclass
class FolderSource:
    """A data set read per sample from image files: ``train`` / ``test`` / ``val`` have ``samples``, a list of
    ``(path, class id)`` (torchvision ``ImageFolder`` or :class:`ImageList`), and ``len()``."""

    train: Any  # torchvision ImageFolder (without transform) or ImageList
    test: Any
    train_labels: Tensor
    num_classes: int
    image_size: int
    train_transform: Callable[[Any], Tensor]  # PIL -> uint8 (3, S, S)
    eval_transform: Callable[[Any], Tensor]
    augmentation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: the data set's own validation split (CINIC-10's valid/), read with the eval transform; None: the validation
    #: split is the ``data.val_fraction`` hold-out of ``train`` (the config refuses both at once)
    val: Any = None


@runtime_checkable
class BundleSource(Protocol):
    """A loaded data set that builds its own bundle (the segmentation sets, :mod:`featkd.data.segmentation`, and
    the detection sets, :mod:`featkd.data.detection`)."""

    def to_bundle(self, cfg: DataConfig) -> DataBundle: ...


# --------------------------------------------------------------------------------------------------------
# The bundle.


class LoaderBackend(Protocol):
    """What a :class:`DataBundle` asks for its loaders (``kw``: ``rank``, ``world_size``, ``device``, and for
    training ``drop_last``); ``eval_loader`` returns None for a split the data set does not have."""

    def train_loader(self, batch_size: int, *, seed: int, **kw: Any) -> Loader: ...

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> Loader | None: ...


class FolderRead:
    """Sample ``j`` of a torchvision ``ImageFolder``: ``(RGB PIL image, class id)``; a bad file is a one-line
    DataError naming it (torchvision's own loader would raise PIL's exception from the worker)."""

    def __init__(self, folder: Any, name: str) -> None:
        self.samples, self.name = folder.samples, name

    def __call__(self, j: int) -> tuple[Any, int]:
        path, label = self.samples[j]
        return open_image(Path(path), self.name).convert("RGB"), label


class FolderBackend:
    """The loader factories of a :class:`FolderSource` (streamed, :mod:`featkd.data.streaming`): the training
    samples of ``train_view`` (seeded random transform per sample), the validation split (the source's own ``val``
    if it has one, else the held-out ``val_view`` of ``train``) and the whole test set (eval transform)."""

    def __init__(self, src: FolderSource, train_view: Tensor, val_view: Tensor | None, norm: Normalizer,
                 workers: int, name: str, skip_bad: bool = False, mix: MixSpec | None = None,
                 ignore_labels: bool = False) -> None:
        self.src, self.norm, self.workers, self.skip_bad = src, norm, workers, skip_bad
        self.ignore_labels = ignore_labels  # data.labels: ignore: the training and validation targets are -1
        self.mix = mix if mix is not None and mix.enabled else None
        self.read = {"train": FolderRead(src.train, name), "test": FolderRead(src.test, name)}
        self.views = {"train": train_view.tolist(), "test": list(range(len(src.test)))}
        if src.val is not None:
            self.read["val"], self.views["val"] = FolderRead(src.val, name), list(range(len(src.val)))
        else:
            self.read["val"] = self.read["train"]
            self.views["val"] = None if val_view is None else val_view.tolist()

    def _finish(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.norm(x), y.long()

    def _finish_unlabelled(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.norm(x), torch.full_like(y, -1, dtype=torch.long)

    def train_loader(self, batch_size: int, *, seed: int, **kw: Any) -> Loader:
        ds = StreamDataset(self.read["train"], self.views["train"], OnImage(self.src.train_transform), seed=seed,
                           skip_bad=self.skip_bad)
        spec = self.mix
        mix = None if spec is None else (
            lambda x, y, epoch, batch: mix_batch(x, y, spec, seed=seed, epoch=epoch, batch=batch))
        finish = self._finish_unlabelled if self.ignore_labels else self._finish
        return stream_train_loader(ds, stack_pairs, finish, batch_size, seed=seed, num_workers=self.workers,
                                   mix=mix, **kw)

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> Loader | None:
        view = self.views[split]
        if view is None:
            return None
        ds = StreamDataset(self.read[split], view, OnImage(self.src.eval_transform),
                           skip_bad=self.skip_bad)
        finish = self._finish_unlabelled if self.ignore_labels and split != "test" else self._finish
        return stream_eval_loader(ds, stack_pairs, finish, batch_size, indices=indices,
                                  num_workers=self.workers, **kw)


@dataclass
class DataBundle:
    """A built data set: sizes, shapes and loader factories. ``batch_size`` arguments are GLOBAL batches.

    ``task`` says what the labels are: "classification" (``y`` (B,) class ids), "segmentation" (``y``
    (B, H, W) per-pixel class ids, ``ignore_index`` where unlabelled) or "detection" (``y`` a list of B
    target dicts, :mod:`featkd.data.detection`); ``num_classes`` counts the background class when the data
    set has one (always for detection). ``ignore_index`` only means something for segmentation, ``masks``
    (the targets hold instance masks) only for detection. ``class_names`` has one name per class id (empty
    where the data set has none)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    train_size: int
    val_size: int
    test_size: int
    augmentation: str = "none"  # human-readable train augmentation
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    task: str = "classification"  # "classification" | "segmentation" | "detection"
    ignore_index: int = 255  # label of unlabelled pixels (segmentation only)
    class_names: tuple[str, ...] = ()
    masks: bool = False  # detection targets hold instance masks
    #: the training batches' targets are (B, K) class probabilities (mixup / cutmix), not class ids
    soft_targets: bool = False
    storage: str = "in memory"  # where the samples live, as the run's first line states it
    eval_window: tuple[int, int] | None = None  # segmentation: sliding-window evaluation (H, W), None: whole
    eval_stride: tuple[int, int] | None = None  # the windows' step (H, W) (tasks/segmentation.py predict)
    #: False for a label-free run (data.labels: ignore, dataset: unlabelled): training targets are -1, and the
    #: task (featkd.tasks.label_free) scores the student by k-NN and a linear probe on ``probe``
    labelled: bool = True
    #: the labelled set of a label-free run's evaluation (data.probe, or the data set itself with its labels)
    probe: DataBundle | None = field(default=None, repr=False, compare=False)
    backend: LoaderBackend = field(kw_only=True, repr=False, compare=False)  # makes the loaders

    def train_loader(
        self,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: Device = "cpu",
        drop_last: bool = True,
    ) -> Loader:
        """Augmented training batches, reshuffled by ``set_epoch`` (DistributedSampler semantics)."""
        return self.backend.train_loader(
            batch_size, seed=seed, rank=rank, world_size=world_size, device=device, drop_last=drop_last
        )

    def train_eval_loader(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: Device = "cpu",
        limit: int | None = None,
        seed: int = 0,
        indices: Tensor | None = None,
    ) -> Loader:
        """The training samples with the eval transform, in a fixed order. With ``limit``, only the first
        ``limit`` samples of ``torch.randperm(train_size, Generator().manual_seed(seed))``, sorted; with
        ``indices`` (N,), exactly those samples in that order (DFA's search batches its own permutations)."""
        if indices is not None and limit is not None:
            raise FeatkdError("train_eval_loader: give limit or indices, not both")
        if limit is not None:
            if limit < 1:
                raise FeatkdError(f"train_eval_loader: limit must be positive, got {limit}")
            if limit < self.train_size:
                g = torch.Generator().manual_seed(seed)
                indices = torch.randperm(self.train_size, generator=g)[:limit].sort().values
        return self.backend.eval_loader(
            "train", batch_size, indices, rank=rank, world_size=world_size, device=device
        )

    def val_loader(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1, device: Device = "cpu"
    ) -> Loader | None:
        """The held-out validation split (``data.val_fraction``), or None when there is none."""
        return self.backend.eval_loader(
            "val", batch_size, None, rank=rank, world_size=world_size, device=device
        )

    def test_loader(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1, device: Device = "cpu"
    ) -> Loader:
        return self.backend.eval_loader(
            "test", batch_size, None, rank=rank, world_size=world_size, device=device
        )

    def describe(self) -> str:
        c, h, w = self.input_shape
        classes = f"{self.num_classes} classes"
        if self.task == "segmentation":
            classes += f" ({self.task}, ignore index {self.ignore_index})"
            if self.eval_window is not None and self.eval_stride is not None:
                (wh, ww), (sh, sw) = self.eval_window, self.eval_stride
                classes += f"; evaluated in {wh}x{ww} windows, stride {sh}x{sw}"
        elif self.task != "classification":
            classes += f" ({self.task}{', with masks' if self.masks else ''})"
        return (
            f"{self.name}: train {self.train_size}, val {self.val_size}, test {self.test_size}; "
            f"input {c}x{h}x{w}, {classes}; train augmentation: {self.augmentation}; {self.storage}"
        )


def choose_storage(cfg: DataConfig, images: int, decoded_bytes: float, one_size: bool) -> tuple[bool, str]:
    """``(in memory?, why)`` for a data set of ``images`` images (all splits) whose decoded uint8 pixels take
    about ``decoded_bytes``: ``data.storage`` memory / stream as asked; auto keeps a set in memory when it fits
    in ``data.memory_limit_gb`` and its images share one size (or ``data.image_size`` resizes them), else
    streams it. ``why`` is the phrase the run's first line shows."""
    gib = decoded_bytes / 2**30
    if cfg.storage == "memory":
        return True, f"in memory ({gib:.2f} GiB, data.storage: memory)"
    if cfg.storage == "stream":
        return False, f"streamed from disk ({cfg.num_workers} workers, data.storage: stream)"
    if gib > cfg.memory_limit_gb:
        return False, (f"streamed from disk ({cfg.num_workers} workers): {images} images, about {gib:.1f} GiB "
                       f"decoded, over data.memory_limit_gb {cfg.memory_limit_gb:g}")
    if not one_size:
        return False, f"streamed from disk ({cfg.num_workers} workers): the images differ in size"
    return True, f"in memory ({gib:.2f} GiB decoded, under data.memory_limit_gb {cfg.memory_limit_gb:g})"


def train_augment(cfg: DataConfig, crop_padding: int, hflip: bool) -> AugmentSpec:
    """The in-memory train augmentation: the data set's defaults, overridden by ``cfg`` (no crop or flip without
    ``cfg.augment``), and ``cfg.augment_policy`` (explicit, so kept either way)."""
    if not cfg.augment:
        return AugmentSpec(policy=cfg.augment_policy)
    pad = crop_padding if cfg.crop_padding is None else cfg.crop_padding
    return AugmentSpec(pad, hflip if cfg.hflip is None else cfg.hflip, cfg.augment_policy)


def train_mix(cfg: DataConfig, num_classes: int) -> MixSpec:
    """Mixup / CutMix of ``cfg`` (``data.mixup_alpha`` / ``cutmix_alpha``) over ``num_classes``."""
    return MixSpec(cfg.mixup_alpha, cfg.cutmix_alpha, num_classes)


def _with_mix(described: str, mix: MixSpec) -> str:
    if not mix.enabled:
        return described
    return mix.describe() if described == "none" else f"{described} + {mix.describe()}"


def build_data(cfg: DataConfig) -> DataBundle:
    """Load ``cfg.dataset`` and return its :class:`DataBundle`; bad input raises a one-line FeatkdError."""
    cfg.validate()
    try:
        src = DATASETS.get(cfg.dataset)(cfg)
    except DataError as exc:  # a relative data_dir that is not there: say where it was looked for
        where = relative_note(cfg.data_dir) if cfg.data_dir else ""
        if where and not Path(cfg.data_dir).expanduser().exists():
            raise DataError(f"data.data_dir: {cfg.data_dir!r} not found{where}; {exc}") from None
        raise
    if cfg.label_free and not isinstance(src, (InMemorySource, FolderSource)):
        raise ConfigError(f"data.labels: ignore is for classification sets; {cfg.dataset!r} is not one")
    if isinstance(src, BundleSource):
        bundle = src.to_bundle(cfg)
    elif isinstance(src, FolderSource):
        bundle = _build_folder(cfg, src)
    else:
        bundle = _build_in_memory(cfg, src)
    if cfg.scale_jitter is not None and bundle.task != "detection":
        raise ConfigError(f"data.scale_jitter: only detection sets (coco, scenes-det) jitter the scale; "
                          f"{cfg.dataset!r} is a {bundle.task} set")
    for key in ("scale_range", "base_size", "crop_size", "eval_window"):
        if getattr(cfg, key) is not None and bundle.task != "segmentation":
            raise ConfigError(f"data.{key}: a semantic-segmentation recipe (voc, cityscapes, segfolder, scenes); "
                              f"{cfg.dataset!r} is a {bundle.task} set")
    for key in ("resize_short", "resize_max", "eval_resize_short"):
        if getattr(cfg, key) is not None and bundle.task != "detection":
            raise ConfigError(f"data.{key}: a detection recipe (coco, scenes-det, streamed); "
                              f"{cfg.dataset!r} is a {bundle.task} set")
    for key, off in (("augment_policy", None), ("mixup_alpha", 0.0), ("cutmix_alpha", 0.0)):
        if getattr(cfg, key) != off and bundle.task != "classification":
            raise ConfigError(f"data.{key}: a classification recipe (its images and class targets); "
                              f"{cfg.dataset!r} is a {bundle.task} set")
    if cfg.label_free:
        probe_cfg = cfg.probe
        if probe_cfg is None and cfg.dataset != "unlabelled":  # the same set, its labels read for scoring only
            probe_cfg = replace(cfg, labels="read", probe=None, augment=False, mixup_alpha=0.0, cutmix_alpha=0.0)
        probe = None if probe_cfg is None else build_data(probe_cfg)
        if probe is not None and probe.task != "classification":
            raise ConfigError(f"data.probe: {probe_cfg.dataset!r} is a {probe.task} set; the k-NN / linear probe "
                              "needs class labels")
        bundle = replace(bundle, labelled=False, probe=probe)
    return bundle


def _train_split(cfg: DataConfig, labels: Tensor) -> tuple[Tensor, Tensor | None]:
    """The (train, val) indices of a classification training split: class-stratified, or without reading the
    labels (seeded permutations, :func:`~featkd.data.splits.split_dense`) when the run is label-free."""
    if cfg.label_free:
        return split_dense(len(labels), cfg, cfg.dataset)
    return split_train(labels, cfg, cfg.dataset)


def _build_in_memory(cfg: DataConfig, src: InMemorySource) -> DataBundle:
    train_idx, val_idx = _train_split(cfg, src.train_labels)
    if cfg.label_free:  # never read in training: -1 (the test split keeps its labels, for nobody but the curious)
        src = replace(src, train_labels=torch.full_like(src.train_labels, -1))
    full = TensorSplit(src.train_images, src.train_labels)
    if len(train_idx) == len(full):
        train = full
    else:
        train = TensorSplit(src.train_images[train_idx], src.train_labels[train_idx])
    val = None if val_idx is None else TensorSplit(src.train_images[val_idx], src.train_labels[val_idx])
    test = TensorSplit(src.test_images, src.test_labels)
    aug = train_augment(cfg, src.crop_padding, src.hflip)
    norm = Normalizer(src.mean, src.std, src.max_value)
    return in_memory_bundle(cfg, src.num_classes, train, val, test, norm, aug)


def in_memory_bundle(cfg: DataConfig, num_classes: int, train: TensorSplit, val: TensorSplit | None,
                     test: TensorSplit, norm: Normalizer, aug: AugmentSpec, **task: Any) -> DataBundle:
    """The :class:`DataBundle` of splits held in memory (classification, and with ``task`` fields such as
    ``task="segmentation"``, ``ignore_index``, ``class_names`` the dense sets)."""
    c, h, w = train.images.shape[1:]
    mix = train_mix(cfg, num_classes)
    return DataBundle(
        name=cfg.dataset,
        num_classes=num_classes,
        input_shape=(c, h, w),
        train_size=len(train),
        val_size=0 if val is None else len(val),
        test_size=len(test),
        augmentation=_with_mix(aug.describe(), mix),
        mean=norm.mean,
        std=norm.std,
        soft_targets=mix.enabled,
        backend=InMemoryBackend(train, val, test, norm, aug, mix),
        **task,
    )


def _build_folder(cfg: DataConfig, src: FolderSource) -> DataBundle:
    train_idx, val_idx = _train_split(cfg, src.train_labels)
    norm = Normalizer(src.mean, src.std, 255.0)
    mix = train_mix(cfg, src.num_classes)
    return DataBundle(
        name=cfg.dataset,
        num_classes=src.num_classes,
        input_shape=(3, src.image_size, src.image_size),
        train_size=len(train_idx),
        val_size=len(src.val) if src.val is not None else 0 if val_idx is None else len(val_idx),
        test_size=len(src.test),
        augmentation=_with_mix(src.augmentation, mix),
        mean=norm.mean,
        std=norm.std,
        soft_targets=mix.enabled,
        storage=f"streamed from disk ({cfg.num_workers} workers)",
        backend=FolderBackend(src, train_idx, val_idx, norm, cfg.num_workers, cfg.dataset,
                              cfg.bad_files == "skip", mix, ignore_labels=cfg.label_free),
    )
