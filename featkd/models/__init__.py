"""Model zoo: CIFAR-style classifiers and small segmenters, plus an adapter for ``torchvision:<name>`` models.

Every featkd model takes ``num_classes`` and ``in_channels`` (keyword) and its own options, returns logits
only (a tensor), uses no in-place operation and is traceable by :func:`torch.fx.symbolic_trace`.

- Classifiers return (B, K) and end with an ``nn.Linear`` classifier (last in ``named_modules()`` order,
  see :func:`classifier_name`).
- ``vit_tiny_p4`` (:mod:`featkd.models.vit`) is torchvision's ViT with 4x4 patches; unlike the CNNs it takes
  only inputs of its ``image_size`` (default 28), and its blocks output (B, 1 + h*w, C) tokens (capture them as
  ``point:tokens``, :mod:`featkd.capture.layouts`).
- Segmenters (``fcn_<backbone>``, ``deeplab_<backbone>``: :mod:`featkd.models.segmentation`) return
  (B, K, H, W) logits at the input's size and end with a 1x1 convolution.
- Detectors (``retinanet_<backbone>``, ``fcos_<backbone>``, ``fasterrcnn_<backbone>``, ``maskrcnn_<backbone>``:
  :mod:`featkd.models.detection`) are torchvision's RetinaNet / FCOS / Faster R-CNN / Mask R-CNN on a featkd
  trunk: a list of ``{boxes, labels, scores[, masks]}`` in eval mode, their loss dict in train mode (called
  with targets); like torchvision's, they do not trace as a whole.

Models from the user's code, ``package.module:callable`` (:mod:`featkd.models.user`), are imported and
called with their options; they only have to return an ``nn.Module`` whose output fits the task.

:func:`model_kind` tells the two apart from a built model's output (also for ``torchvision:`` segmenters,
which return ``{'out': (B, K, H, W)[, 'aux': ...]}``; :func:`segmentation_logits` takes the ``'out'``).

>>> model = create_model("resnet8", num_classes=10, in_channels=1, widths=[8, 16, 32])
>>> seg = create_model("fcn_resnet8", num_classes=5, in_channels=1, widths=[8, 16, 32])
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from featkd.errors import FeatkdError
from featkd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"  # the optional timm package (featkd.models.timm_models)

# Each model file registers its models in MODELS when imported.
for _module in ("mobilenetv2", "plain_cnn", "resnet_cifar", "shufflenetv2", "vgg", "wrn", "vit", "segmentation",
                "detection"):
    importlib.import_module(f"featkd.models.{_module}")

from featkd.models.detection import DETECTION_MODELS  # noqa: E402
from featkd.models.segmentation import SEGMENTATION_MODELS, model_kind, segmentation_logits  # noqa: E402
from featkd.models.user import create_user_model, is_import_spec  # noqa: E402

__all__ = [
    "DETECTION_MODELS",
    "MODELS",
    "SEGMENTATION_MODELS",
    "classifier_name",
    "create_model",
    "list_models",
    "model_kind",
    "model_options",
    "segmentation_logits",
]


def list_models() -> list[str]:
    """Names of the featkd models (``torchvision:<name>`` models are accepted too but not listed)."""
    return MODELS.names()


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The options (keyword arguments besides ``num_classes`` and ``in_channels``) of a featkd model."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {k: p for k, p in params.items() if k not in ("num_classes", "in_channels")}


def create_model(name: str, *, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with freshly initialised weights: a registered name, ``torchvision:<name>``,
    ``timm:<name>`` (:mod:`featkd.models.timm_models`), or ``package.module:callable`` from the user's code
    (:mod:`featkd.models.user`).

    Unknown names, unknown or ill-typed options and invalid option values raise :class:`FeatkdError`.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not _matches(value, int) or value < 1:
            raise FeatkdError(f"model {name!r}: {arg} must be a positive integer, got {value!r}")
    if name.startswith(TORCHVISION_PREFIX):
        from featkd.models.torchvision_models import create_torchvision_model

        return create_torchvision_model(
            name[len(TORCHVISION_PREFIX) :], num_classes=num_classes, in_channels=in_channels, **kwargs
        )
    if name.startswith(TIMM_PREFIX):
        from featkd.models.timm_models import create_timm_model

        return create_timm_model(name[len(TIMM_PREFIX) :], num_classes=num_classes, in_channels=in_channels,
                                 **kwargs)
    if is_import_spec(name):
        return create_user_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    try:
        factory = MODELS.get(name)
    except FeatkdError as exc:
        raise FeatkdError(f"{exc}; or a model from your code: package.module:callable") from None
    options = model_options(name)
    hints = typing.get_type_hints(factory)
    for key, value in kwargs.items():
        if key not in options:
            allowed = ", ".join(options) or "none"
            raise FeatkdError(f"model {name!r}: unknown option {key!r} (allowed: {allowed})")
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            raise FeatkdError(f"model {name!r}: option {key!r} must be {_type_name(hint)}, got {value!r}")
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except ValueError as exc:  # the constructors raise ValueError for inconsistent option values
        raise FeatkdError(f"model {name!r}: {exc}") from None


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the final classifier: the last ``nn.Linear`` in ``named_modules()`` order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise FeatkdError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint (the simple hints model options use)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
