"""featkd: feature knowledge distillation for any pair of PyTorch models.

Importing ``featkd`` is light; the main entry points load on first use::

    from featkd import load_config, train
    result = train(load_config("configs/digits-kd-resnet20-resnet8.yaml"), out_dir="runs/kd")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "train": "featkd.engine.trainer",
    "Trainer": "featkd.engine.trainer",
    "load_config": "featkd.config",
    "build_config": "featkd.config",
    "ExperimentConfig": "featkd.config",
    "CapturingModel": "featkd.capture.capture",
    "list_capture_points": "featkd.capture.listing",
    "create_model": "featkd.models",
    "build_data": "featkd.data",
    "METHODS": "featkd.methods",
    "Distiller": "featkd.methods.base",
    "FeatkdError": "featkd.errors",
    "Distillation": "featkd.api",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featkd' has no attribute {name!r}")
