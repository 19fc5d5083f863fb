"""The registered detection data sets: COCO's layout, and the generated scenes read the same way.

============  ====================================================================  ==========================
name          files under ``data.data_dir``                                         splits
============  ====================================================================  ==========================
coco          ``annotations/instances_<split>.json`` and the images of ``<split>``   train: train2017,
              in ``<split>/`` (COCO's own layout: ``train2017/000000000009.jpg``)   train2014 or train; test:
              or ``<split>/images/``; ``file_name`` is relative to that folder      val2017, val2014, val or
                                                                                    test (the first present)
scenes-det    generated (:mod:`featkd.data.scenes`), cached; data_dir = the cache   train, test
              root; the folder's ``annotations/instances_{train,test}.json`` and
              ``{train,test}/images/*.png``: exactly the ``coco`` layout
============  ====================================================================  ==========================

``scenes-det`` is a separate name from ``scenes`` (the same canvases read as semantic-segmentation masks),
so a config's data set says its task. Both read through :func:`featkd.data.coco.read_instances` (checks),
then :func:`featkd.data.det_stream.detection_storage` picks where the images live (``data.storage``): in
memory, :func:`featkd.data.detection.decode_instances` decodes them once at one size; streamed (images that
differ in size, too many for ``data.memory_limit_gb``, or ``data.resize_short`` set: COCO itself),
:func:`featkd.data.det_stream.pack_split` packs the annotations into flat arrays and each image is decoded
per sample in the DataLoader workers at its own size, with the resize / flip recipes and AP scored at the
original coordinates. See those modules for the checks, the label order (categories by ascending id ->
1..K, 0 the background) and the batches. Categories come from the training file; the test file must list
the same ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from featkd.data.coco import CocoInstances, read_instances
from featkd.data.config import DATASETS, DataConfig
from featkd.data.det_stream import (
    StreamDetectionSource,
    annotation_counts,
    detection_storage,
    image_sizes,
    load_packed,
    pack_split,
    packed_cache_dir,
    packed_cache_key,
    save_packed,
)
from featkd.data.detection import DetectionSource, category_labels, decode_instances
from featkd.data.scenes import ensure_scenes
from featkd.data.segmentation import target_size
from featkd.errors import DataError

TRAIN_SPLITS = ("train2017", "train2014", "train")
TEST_SPLITS = ("val2017", "val2014", "val", "test")


def _images_dir(root: Path, split: str, coco: CocoInstances, name: str) -> Path:
    """``root/split`` or ``root/split/images``: the one holding the split's first image file."""
    candidates = (root / split, root / split / "images")
    if coco.images:
        first = coco.images[0].file_name
        for folder in candidates:
            if (folder / first).is_file():
                return folder
        raise DataError(f"{name}: image file {candidates[0] / first} not found (nor in {candidates[1]})")
    return candidates[0]


def _pick(root: Path, splits: tuple[str, ...], what: str, name: str) -> str:
    for split in splits:
        if (root / "annotations" / f"instances_{split}.json").is_file():
            return split
    tried = ", ".join(f"annotations/instances_{s}.json" for s in splits)
    raise DataError(f"{name}: no {what} annotations in {root} (looked for {tried})")


def read_coco_folder(root: Path, cfg: DataConfig, train_split: str, test_split: str
                     ) -> DetectionSource | StreamDetectionSource:
    """``root``'s train and test splits (COCO layout): decoded into a :class:`DetectionSource`, or packed into
    a :class:`StreamDetectionSource` when :func:`~featkd.data.det_stream.detection_storage` streams them."""
    name = cfg.dataset
    files = [root / "annotations" / f"instances_{split}.json" for split in (train_split, test_split)]
    cache = packed_cache_dir() / f"{packed_cache_key(files, cfg)}.npz"
    packed = load_packed(cache) if cfg.storage != "memory" else None
    if packed is not None:  # parsed and checked before: decide from its sizes, stream without reading the JSON
        splits, names = packed
        in_memory, storage = detection_storage(cfg, [splits[s].sizes for s in ("train", "test")],
                                               [np.diff(splits[s].offsets) for s in ("train", "test")])
        if not in_memory:
            return StreamDetectionSource(splits["train"], splits["test"], names, cfg.masks, storage)
    train = read_instances(files[0], name)
    test = read_instances(files[1], name)
    if test.category_ids != train.category_ids:
        raise DataError(f"{name}: {test.path} lists categories {test.category_ids} but {train.path} "
                        f"{train.category_ids}; both splits need the same categories")
    labels = category_labels(train.category_ids)
    dirs = (_images_dir(root, train_split, train, name), _images_dir(root, test_split, test, name))
    skip = cfg.bad_files == "skip"
    sizes = (image_sizes(train, dirs[0], name, skip), image_sizes(test, dirs[1], name, skip))
    in_memory, storage = detection_storage(cfg, sizes, (annotation_counts(train), annotation_counts(test)))
    if not in_memory:
        splits = {"train": pack_split(train, dirs[0], labels, sizes[0], cfg.masks, name),
                  "test": pack_split(test, dirs[1], labels, sizes[1], cfg.masks, name)}
        # the next run streams without parsing the JSON again (COCO train2017: ~20 s, ~2 GB of Python objects);
        # a read-only cache only costs the next run the parse
        with contextlib.suppress(OSError):
            save_packed(cache, splits, train.category_names)
        return StreamDetectionSource(splits["train"], splits["test"], tuple(train.category_names), cfg.masks,
                                     storage)
    size = target_size(cfg)
    train_split_data = decode_instances(train, _images_dir(root, train_split, train, name), labels, size,
                                        cfg.masks, name)
    if size is None:  # the test images must have the training images' size
        size = tuple(train_split_data.images.shape[-2:])  # type: ignore[assignment]
        test_split_data = decode_instances(test, _images_dir(root, test_split, test, name), labels, None,
                                           cfg.masks, name)
        if tuple(test_split_data.images.shape[-2:]) != size:
            h, w = test_split_data.images.shape[-2:]
            raise DataError(f"{name}: the {test_split} images are {w}x{h} but the {train_split} images "
                            f"{size[1]}x{size[0]}; set data.image_size to resize every image to one size")
    else:
        test_split_data = decode_instances(test, _images_dir(root, test_split, test, name), labels, size,
                                           cfg.masks, name)
    return DetectionSource(train_split_data, test_split_data, tuple(train.category_names), masks=cfg.masks,
                           storage=storage)


@DATASETS.register("coco")
def coco(cfg: DataConfig) -> DetectionSource | StreamDetectionSource:
    """COCO instances in COCO's layout under ``data_dir`` (see the module docstring); boxes, labels, crowd
    regions, and with ``data.masks`` polygon / RLE masks. Small sets of one size are decoded into memory at
    build time; images of different sizes and large sets stream (:mod:`featkd.data.det_stream`)."""
    if not cfg.data_dir:
        raise DataError("coco: data.data_dir is not set; set it to the folder that holds annotations/ and the "
                        "image folders (train2017/, val2017/)")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"coco: {root} not found; data.data_dir must be the folder that holds annotations/")
    return read_coco_folder(root, cfg, _pick(root, TRAIN_SPLITS, "training", cfg.dataset),
                            _pick(root, TEST_SPLITS, "test", cfg.dataset))


@DATASETS.register("scenes-det")
def scenes_det(cfg: DataConfig) -> DetectionSource | StreamDetectionSource:
    """The generated scenes of ``data.scenes`` as a detection set: 10 item categories (ids 1..10 = labels
    1..10), boxes of the visible pixels, instance masks with ``data.masks``."""
    return read_coco_folder(ensure_scenes(cfg.scenes, cfg.data_dir), cfg, "train", "test")
