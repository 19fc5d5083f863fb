"""The registered semantic-segmentation data sets: where each one's files are and what its mask values mean.

============  ===============================================================  ============================
name          files under ``data.data_dir``                                    classes (ignore index 255)
============  ===============================================================  ============================
scenes        generated (:mod:`featkd.data.scenes`), cached; data_dir = cache  11: background + 10 items
segfolder     ``{train,test}/images/*.png|jpg``, ``{train,test}/masks/*.png``  ``classes.txt``, one a line
              (same stem), ``classes.txt``                                     (line k = mask value k)
voc           ``VOCdevkit/VOC2012/`` (torchvision ``VOCSegmentation``):        21 (background + 20)
              ``JPEGImages/*.jpg``, ``SegmentationClass/*.png``,
              ``ImageSets/Segmentation/{train,val}.txt``; test = val
cityscapes    ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``,            19 train ids
              ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` if
              present, else ``*_gtFine_labelIds.png`` mapped; test = val
============  ===============================================================  ============================

Masks are single-channel PNGs (mode L, P or I); a palette PNG's values are its palette indices (VOC's
255 = void borders, ignored). Cityscapes label ids map to train ids by the official table (cityscapesScripts
``labels.py``, read from ``torchvision.datasets.Cityscapes.classes``); ids without a train id are ignored.
A set small enough and of one size (or resized to ``data.image_size``) is decoded into memory at build
time (:mod:`featkd.data.segmentation`; default train augmentation: random crop after padding by
``min(H, W) // 12`` pixels, mask padded with 255, + horizontal flip); a large one, one of mixed sizes, or one
configured with the per-sample recipes (``data.scale_range``, ``base_size``, ``crop_size``) streams from disk
(:mod:`featkd.data.seg_stream`; default: horizontal flip). ``data.storage`` forces either. Normalisation:
ImageNet mean/std, except ``scenes``: the per-channel mean/std of its training canvases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featkd.data.bundle import choose_storage
from featkd.data.classification import IMAGENET_MEAN, IMAGENET_STD
from featkd.data.config import DATASETS, DataConfig
from featkd.data.scenes import ensure_scenes
from featkd.data.seg_stream import SegmentationStreamSource, segmentation_storage
from featkd.data.segmentation import (
    IGNORE_INDEX,
    LabelMap,
    Pair,
    SegmentationSource,
    channel_stats,
    read_pairs,
    target_size,
)
from featkd.errors import DataError, FeatkdError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _root(cfg: DataConfig, what: str) -> Path:
    if not cfg.data_dir:
        raise DataError(f"{cfg.dataset}: data.data_dir is not set; set it to the folder that holds {what}")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{cfg.dataset}: {root} not found; data.data_dir must be the folder that holds {what}")
    return root


def _source(
    cfg: DataConfig,
    pairs: dict[str, list[Pair]],
    class_names: tuple[str, ...],
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = (IMAGENET_MEAN, IMAGENET_STD),
) -> SegmentationSource | SegmentationStreamSource:
    """The set in memory (train and test pairs decoded in one pass: one size for both) or streamed, as
    :func:`~featkd.data.seg_stream.segmentation_storage` decides; ``stats`` None: the train images' own mean
    and std."""
    n = len(pairs["train"])
    everything = pairs["train"] + pairs["test"]
    in_memory, storage = segmentation_storage(cfg, everything, cfg.dataset)
    if not in_memory:
        return SegmentationStreamSource(pairs["train"], pairs["test"], class_names, stats, storage or "streamed")
    x, y = read_pairs(everything, target_size(cfg), cfg.dataset)
    if storage is None:  # data.storage: memory
        storage = choose_storage(cfg, len(everything), x.numel() + y.numel(), True)[1]
    train_x, train_y, test_x, test_y = x[:n], y[:n], x[n:], y[n:]
    mean, std = channel_stats(train_x) if stats is None else stats
    return SegmentationSource(
        train_x, train_y, test_x, test_y, class_names=class_names, mean=mean, std=std,
        crop_padding=min(train_y.shape[1:]) // 12, hflip=True, storage=storage,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# segfolder (and scenes, which writes one).


def read_classes(path: Path, name: str) -> tuple[str, ...]:
    """The class names of a ``classes.txt``: one per line, line k naming mask value k."""
    if not path.is_file():
        raise DataError(f"{name}: {path} not found; write one class name per line (line k names mask value k)")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    if not names:
        raise DataError(f"{name}: {path} is empty; write one class name per line")
    if "" in names:
        raise DataError(f"{name}: {path} line {names.index('') + 1} is empty; write one class name per line")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{name}: {path} names {len(names)} classes; at most {IGNORE_INDEX} are supported")
    return names


def folder_pairs(split_dir: Path, labels: LabelMap, name: str) -> list[Pair]:
    """``split_dir/images/*`` with their ``split_dir/masks/<stem>.png``, sorted by file name."""
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    if not images_dir.is_dir():
        raise DataError(f"{name}: {images_dir} not found; expected <data_dir>/{split_dir.name}/images/*.png")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    pairs = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"{name}: {image} has no mask {mask}")
        pairs.append(Pair(image, mask, labels))
    return pairs


def _segfolder_pairs(root: Path, labels: LabelMap, name: str) -> dict[str, list[Pair]]:
    test = next((root / d for d in ("test", "val") if (root / d).is_dir()), root / "test")
    return {"train": folder_pairs(root / "train", labels, name), "test": folder_pairs(test, labels, name)}


@DATASETS.register("segfolder")
def segfolder(cfg: DataConfig) -> SegmentationSource | SegmentationStreamSource:
    """Image and mask PNGs in ``data_dir/{train,test}/{images,masks}/`` (``val/`` if there is no ``test/``)
    and ``data_dir/classes.txt``; mask value k = class of line k, 255 = ignored."""
    root = _root(cfg, "train/images, train/masks, test/images, test/masks and classes.txt")
    names = read_classes(root / "classes.txt", cfg.dataset)
    return _source(cfg, _segfolder_pairs(root, LabelMap.identity(len(names)), cfg.dataset), names)


@DATASETS.register("scenes")
def scenes(cfg: DataConfig) -> SegmentationSource | SegmentationStreamSource:
    """The generated scenes of ``data.scenes`` (generated on first use into the cache, ``data_dir`` or
    ``~/.cache/featkd/scenes``), read as the segfolder they are: 11 classes, background + the source's 10."""
    folder = ensure_scenes(cfg.scenes, cfg.data_dir)
    names = read_classes(folder / "classes.txt", cfg.dataset)
    pairs = _segfolder_pairs(folder, LabelMap.identity(len(names)), cfg.dataset)
    return _source(cfg, pairs, names, stats=None)


# --------------------------------------------------------------------------------------------------------
# Pascal VOC 2012.


def _voc_base(root: Path) -> Path:
    for base in (root / "VOCdevkit" / "VOC2012", root):
        if (base / "ImageSets" / "Segmentation").is_dir():
            return base
    raise DataError(
        f"voc: {root / 'VOCdevkit' / 'VOC2012' / 'ImageSets' / 'Segmentation'} not found; data.data_dir is "
        "the folder that holds VOCdevkit/ (torchvision's VOCSegmentation root)"
    )


def _voc_split(base: Path, listing: str, labels: LabelMap) -> list[Pair]:
    path = base / "ImageSets" / "Segmentation" / listing
    if not path.is_file():
        raise DataError(f"voc: {path} not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"voc: {path} lists no images")
    pairs = []
    for i in ids:
        image, mask = base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png"
        if not image.is_file():
            raise DataError(f"voc: {image} not found (listed in {path})")
        if not mask.is_file():
            raise DataError(f"voc: {image} has no mask {mask}")
        pairs.append(Pair(image, mask, labels))
    return pairs


@DATASETS.register("voc")
def voc(cfg: DataConfig) -> SegmentationSource | SegmentationStreamSource:
    """Pascal VOC 2012 segmentation in torchvision's ``VOCSegmentation`` layout under ``data_dir`` (or
    ``data_dir`` = the VOC2012 folder itself); train = ``train.txt``, test = ``val.txt``; 21 classes."""
    base = _voc_base(_root(cfg, "VOCdevkit/VOC2012"))
    labels = LabelMap.identity(len(VOC_CLASSES))
    pairs = {"train": _voc_split(base, "train.txt", labels), "test": _voc_split(base, "val.txt", labels)}
    return _source(cfg, pairs, VOC_CLASSES)


# --------------------------------------------------------------------------------------------------------
# Cityscapes (fine annotations).


def cityscapes_label_map() -> tuple[LabelMap, tuple[str, ...]]:
    """The label id -> train id map (ids without a train id -> 255) and the 19 train-id names, from
    torchvision's copy of the official table."""
    try:
        from torchvision.datasets import Cityscapes
    except ImportError:
        raise FeatkdError("data.dataset cityscapes needs torchvision: pip install torchvision") from None
    ids = [c for c in Cityscapes.classes if c.id >= 0]
    table = np.full(256, -1, dtype=np.int16)  # 255 is not a label id either
    for c in ids:
        table[c.id] = c.train_id if 0 <= c.train_id < IGNORE_INDEX else IGNORE_INDEX
    train = sorted((c.train_id, c.name) for c in ids if 0 <= c.train_id < IGNORE_INDEX)
    names = tuple(name for _, name in train)
    return LabelMap(table, f"a Cityscapes label id (0..{max(c.id for c in ids)})"), names


def _cityscapes_split(root: Path, folder: str, label_ids: LabelMap, train_ids: LabelMap) -> list[Pair]:
    images_dir = root / "leftImg8bit" / folder
    images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"cityscapes: no <city>/*_leftImg8bit.png in {images_dir}")
    pairs = []
    for image in images:
        stem = image.name.removesuffix("_leftImg8bit.png")
        gt = root / "gtFine" / folder / image.parent.name
        by_train_id, by_label_id = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
        if by_train_id.is_file():
            pairs.append(Pair(image, by_train_id, train_ids))
        elif by_label_id.is_file():
            pairs.append(Pair(image, by_label_id, label_ids))
        else:
            raise DataError(f"cityscapes: {image} has no mask {by_label_id}")
    return pairs


@DATASETS.register("cityscapes")
def cityscapes(cfg: DataConfig) -> SegmentationSource | SegmentationStreamSource:
    """Cityscapes fine annotations in torchvision's ``Cityscapes`` layout under ``data_dir``; train = train,
    test = val; 19 train-id classes. Native 2048x1024: streamed (mmseg's recipe: ``scale_range: [0.5, 2.0]``,
    ``base_size: [1024, 2048]``, ``crop_size: [512, 1024]``), or ``data.image_size`` (e.g. [256, 512]) in memory."""
    root = _root(cfg, "leftImg8bit/ and gtFine/")
    label_ids, names = cityscapes_label_map()
    train_ids = LabelMap.identity(len(names))
    pairs = {
        split: _cityscapes_split(root, folder, label_ids, train_ids)
        for split, folder in (("train", "train"), ("test", "val"))
    }
    return _source(cfg, pairs, names)
