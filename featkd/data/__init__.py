"""Data sets and loaders: ``build_data(DataConfig(...))`` -> :class:`DataBundle` -> :class:`Loader` objects.

Modules, lowest first: :mod:`featkd.data.config` (the ``data:`` section, ``DATASETS``), :mod:`featkd.data.bundle`
(the source types, :class:`DataBundle`, :func:`build_data`), the registered sets of
:mod:`featkd.data.classification`, :mod:`featkd.data.seg_datasets` (built by :mod:`featkd.data.segmentation` in
memory or :mod:`featkd.data.seg_stream` streamed;
:mod:`featkd.data.scenes` generates the scenes) and :mod:`featkd.data.det_datasets` (built by
:mod:`featkd.data.detection` in memory, :mod:`featkd.data.det_stream` streamed); :mod:`featkd.data.splits`
holds the split rules, :mod:`featkd.data.loaders` the sharding semantics and :mod:`featkd.data.augment` the
augmentation. Importing this package registers every set.
"""

from featkd.data import classification, det_datasets, seg_datasets  # noqa: F401  (register the data sets)
from featkd.data.augment import AugmentSpec
from featkd.data.bundle import DataBundle, build_data
from featkd.data.config import DATASETS, DataConfig, ScenesConfig
from featkd.data.idx import read_idx, write_idx
from featkd.data.loaders import Loader
from featkd.data.scenes import ensure_scenes, generate_scenes
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
