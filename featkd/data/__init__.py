"""Data sets and loaders: ``build_data(DataConfig(...))`` -> :class:`DataBundle` -> :class:`Loader` objects.

See :mod:`featkd.data.sources` for the data sets and split rules, :mod:`featkd.data.loaders` for the
sharding semantics and :mod:`featkd.data.augment` for the augmentation.
"""

from featkd.data.augment import AugmentSpec
from featkd.data.idx import read_idx, write_idx
from featkd.data.loaders import Loader
from featkd.data.sources import DATASETS, DataBundle, DataConfig, build_data, stratified_counts

__all__ = [
    "DATASETS",
    "AugmentSpec",
    "DataBundle",
    "DataConfig",
    "Loader",
    "build_data",
    "read_idx",
    "stratified_counts",
    "write_idx",
]
