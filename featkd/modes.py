"""Train / eval mode for a block of code, restored afterwards module by module; a model's probe forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from featkd.errors import forward_failed


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


@torch.no_grad()
def probe_output(model: nn.Module, example: Tensor, what: str = "", hint: str = "") -> Any:
    """The raw output of ``model`` on ``example`` in eval mode (train/eval mode restored after).

    With ``what`` (e.g. ``"student 'nets:Student'"``), a forward that raises becomes a one-line
    :class:`~featkd.errors.FeatkdError` naming it and the input shape (a model that expects other inputs, an
    input too small for it), ending with ``hint`` if given (:func:`~featkd.errors.forward_failed`).
    """
    with eval_mode(model):
        try:
            return model(example)
        except Exception as exc:
            if not what:
                raise
            raise forward_failed(what, example.shape, exc, hint) from None
