"""Adapter for ``timm:<name>`` models (the optional ``timm`` package: ``pip install timm``).

The model is built by ``timm.create_model(name, num_classes=..., in_chans=..., **options)``: timm itself sizes
the classifier to the data set's classes and the stem to its input channels and changes nothing else, so
module names and ``state_dict`` keys stay timm's. Options are the model's own keyword arguments (a small ViT
for 28 px images: ``{img_size: 28, patch_size: 4, embed_dim: 192, depth: 6, num_heads: 3}`` on
``vit_tiny_patch16_224``); ``pretrained: true`` loads timm's weights (needs internet the first time; timm
adapts a pretrained stem to ``in_channels`` by summing / repeating its RGB kernel). Unknown names get a
"did you mean" from timm's list; options a model does not take are one-line errors.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from featkd.errors import FeatkdError, did_you_mean


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise FeatkdError("timm is required for 'timm:...' models: pip install timm") from None
    return timm


def is_timm_model(name: str) -> bool:
    """Whether ``timm:<name>`` names one of timm's models (False without timm)."""
    try:
        timm = _timm()
    except FeatkdError:
        return False
    return bool(timm.is_model(name))


def create_timm_model(
    name: str, *, num_classes: int, in_channels: int = 3, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build timm model ``name`` (see the module docstring)."""
    timm = _timm()
    full = f"timm:{name}"
    known = timm.list_models(pretrained=False)
    if name not in known:
        raise FeatkdError(f"unknown model {full!r}{did_you_mean(name, known)}; `python -c \"import timm; "
                          f"print(timm.list_models('*{name[:6]}*'))\"` lists timm's names")
    if not isinstance(pretrained, bool):
        raise FeatkdError(f"model {full!r}: option 'pretrained' must be true or false, got {pretrained!r}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels,
                                 **kwargs)
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:
            raise FeatkdError(f"model {full!r}: unknown option {unknown.group(1)!r} (see timm's {name} "
                              "for its options)") from None
        raise FeatkdError(f"model {full!r}: invalid options {kwargs}: {_first_line(exc)}") from None
    except (ValueError, AssertionError, RuntimeError) as exc:  # timm asserts on inconsistent sizes
        raise FeatkdError(f"model {full!r}: invalid options {kwargs}: {_first_line(exc)}") from None
    except OSError as exc:  # downloading pretrained weights
        raise FeatkdError(f"model {full!r}: could not load pretrained weights: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
