"""Train / eval mode for a block of code, restored afterwards module by module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put ``models`` (None entries are skipped) in eval mode inside the block; afterwards every sub-module
    gets back its own ``training`` flag (a model with frozen, eval-mode BatchNorm layers keeps them so)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
