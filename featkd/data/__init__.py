"""Data sets and loaders: ``build_data(DataConfig(...))`` -> :class:`DataBundle` -> :class:`Loader` objects.

See :mod:`featkd.data.bundle` for the classification data sets, :mod:`featkd.data.seg_datasets` for the
segmentation ones (and :mod:`featkd.data.scenes` for the generated scenes), :mod:`featkd.data.splits` for
the split rules, :mod:`featkd.data.loaders` for the sharding semantics and :mod:`featkd.data.augment` for
the augmentation.
"""

from featkd.data import det_datasets, seg_datasets  # noqa: F401  (register coco, scenes-det; scenes, voc, ...)
from featkd.data.augment import AugmentSpec
from featkd.data.bundle import DATASETS, DataBundle, DataConfig, build_data
from featkd.data.idx import read_idx, write_idx
from featkd.data.loaders import Loader
from featkd.data.scenes import ScenesConfig, ensure_scenes, generate_scenes
from featkd.data.splits import stratified_counts

__all__ = [
    "DATASETS",
    "AugmentSpec",
    "DataBundle",
    "DataConfig",
    "Loader",
    "ScenesConfig",
    "build_data",
    "ensure_scenes",
    "generate_scenes",
    "read_idx",
    "stratified_counts",
    "write_idx",
]
