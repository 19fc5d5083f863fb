"""Adapter for ``torchvision:<name>`` classification, segmentation and detection models
(``torchvision.models.get_model``).

The model is built by torchvision with ``num_classes`` and the given options and is left unmodified, except
that for ``in_channels != 3`` its first ``nn.Conv2d`` (first in ``named_modules()`` order) is replaced by one
with the same hyper-parameters and ``in_channels`` inputs, so module names and ``state_dict`` keys stay
torchvision's. Note that torchvision models keep their in-place ReLUs and additions.

Segmentation models (``torchvision.models.segmentation``: ``fcn_resnet50``, ``deeplabv3_resnet50``,
``lraspp_mobilenet_v3_large``, ...) are built with ``weights=None, weights_backbone=None`` (torchvision's
own default would download an ImageNet backbone) and without the auxiliary head unless ``aux_loss=True`` is
given. Their forward returns ``{'out': (B, K, H, W)[, 'aux': ...]}`` (see
:func:`featkd.models.segmentation_logits`). Option ``weights_backbone`` (e.g. ``"DEFAULT"``) loads an
ImageNet backbone; ``weights`` (the whole segmenter, trained on 21 VOC classes) needs ``num_classes=21``.

Detection models (``torchvision.models.detection``: ``retinanet_resnet50_fpn``, ``fcos_resnet50_fpn``,
``fasterrcnn_resnet50_fpn`` / ``_v2``, ``fasterrcnn_mobilenet_v3_large_fpn``, ``maskrcnn_resnet50_fpn``,
``ssdlite320_mobilenet_v3_large``, ...; not the keypoint model) are built with ``weights=None,
weights_backbone=None`` unless given and ``num_classes`` = the data set's K + 1 (index 0 the background:
the class torchvision's two-stage and SSD detectors reserve for it; RetinaNet and FCOS leave it unused, as
torchvision's COCO recipe does with 91). Their options go to torchvision's model class: ``min_size``,
``max_size`` (the internal resize: default 800 / 1333, far too large for small canvases on a CPU),
``image_mean``, ``image_std``, ``score_thresh``, ``box_detections_per_img``, ... For ``in_channels != 3`` the
first conv is replaced as below and ``image_mean`` / ``image_std`` default to 0.5 / 0.25 per channel
(torchvision's three ImageNet values would broadcast a grey image to three channels).

Option ``weights`` (e.g. ``"DEFAULT"``, needs internet the first time) loads pretrained weights: the model is
built with its default head, then the final ``nn.Linear`` is replaced by a fresh one with ``num_classes``
outputs (kept when the number of classes already matches). For ``in_channels != 3`` the new first conv gets
the pretrained kernel averaged over the RGB channels, repeated for each input channel and scaled by
``3 / in_channels`` (as timm's ``adapt_input_conv``), so a grey image copied to every channel gives the same
activations as the RGB model on that grey image.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from featkd.errors import FeatkdError, did_you_mean


def _torchvision_models() -> Any:
    try:
        import torchvision.models
    except ImportError:
        message = "torchvision is required for 'torchvision:...' models: pip install torchvision"
        raise FeatkdError(message) from None
    return torchvision.models


def _model_names(tvm: Any) -> tuple[list[str], list[str], list[str]]:
    """torchvision's classification, segmentation and detection models (not the keypoint detector)."""
    classifiers = tvm.list_models(module=tvm)
    segmenters = tvm.list_models(module=tvm.segmentation)
    detectors = [n for n in tvm.list_models(module=tvm.detection) if not n.startswith("keypoint")]
    return classifiers, segmenters, detectors


def is_torchvision_model(name: str) -> bool:
    """Whether ``torchvision:<name>`` is a model this adapter builds (False without torchvision)."""
    try:
        tvm = _torchvision_models()
    except FeatkdError:
        return False
    return any(name in names for names in _model_names(tvm))


def create_torchvision_model(
    name: str, *, num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build torchvision classification or segmentation model ``name`` (see the module docstring)."""
    tvm = _torchvision_models()
    full = f"torchvision:{name}"
    classifiers, segmenters, detectors = _model_names(tvm)
    if name not in classifiers and name not in segmenters and name not in detectors:
        raise FeatkdError(
            f"unknown model {full!r}{did_you_mean(name, classifiers + segmenters + detectors)}; torchvision "
            f"classification models: {', '.join(classifiers)}; segmentation models: {', '.join(segmenters)}; "
            f"detection models: {', '.join(detectors)}"
        )
    for legacy, option in (("pretrained", "weights"), ("pretrained_backbone", "weights_backbone")):
        if legacy in kwargs:  # torchvision's old keyword (timm's too): say what replaced it
            raise FeatkdError(f"model {full!r}: unknown option {legacy!r}: torchvision models take {option}=DEFAULT "
                              f"(or a weights enum name, e.g. IMAGENET1K_V1) instead of {legacy}")
    for option, value in (("weights", weights), ("weights_backbone", kwargs.get("weights_backbone"))):
        if value is not None and not isinstance(value, str):
            raise FeatkdError(f"model {full!r}: option {option!r} must be a string, got {value!r}")
    segmenter = name in segmenters or name in detectors  # both: num_classes given to the builder, no download
    if name in segmenters:
        _check_segmenter_options(tvm, name, kwargs)
    if segmenter:
        kwargs.setdefault("weights_backbone", None)
    if name in detectors and in_channels != 3:
        kwargs.setdefault("image_mean", [0.5] * in_channels)
        kwargs.setdefault("image_std", [0.25] * in_channels)
    try:
        if weights is None or segmenter:  # torchvision checks num_classes against pretrained segmenters
            model = tvm.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
        else:
            model = tvm.get_model(name, weights=weights, **kwargs)
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:
            raise FeatkdError(
                f"model {full!r}: unknown option {unknown.group(1)!r} (see the torchvision.models.{name} "
                f"documentation for its options)"
            ) from None
        raise FeatkdError(f"model {full!r}: invalid options {kwargs}: {exc}") from None
    except (ValueError, KeyError) as exc:
        what = f"weights {weights!r}" if weights is not None else f"options {kwargs}"
        raise FeatkdError(f"model {full!r}: invalid {what}: {exc}") from None
    except OSError as exc:  # urllib errors while downloading weights
        raise download_failed(full, "weights", weights, exc) from None
    if weights is not None and not segmenter:
        _replace_classifier(model, num_classes, full)
    if in_channels != 3:
        pretrained = weights is not None or kwargs.get("weights_backbone") is not None
        replace_first_conv(model, in_channels, pretrained=pretrained, full=full)
    return model


def _check_segmenter_options(tvm: Any, name: str, kwargs: dict[str, Any]) -> None:
    """torchvision's segmentation builders silently ignore unknown keyword arguments: reject them here."""
    params = inspect.signature(tvm.get_model_builder(name)).parameters
    allowed = [k for k, p in params.items() if p.kind is not p.VAR_KEYWORD and k not in ("weights", "num_classes")]
    for key in kwargs:
        if key not in allowed:
            raise FeatkdError(f"model 'torchvision:{name}': unknown option {key!r} (allowed: {', '.join(allowed)})")


def _set_module(model: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def _replace_classifier(model: nn.Module, num_classes: int, full: str) -> None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FeatkdError(f"model {full!r} has no nn.Linear classifier to replace")
    qualname, old = linears[-1]
    if old.out_features != num_classes:
        _set_module(model, qualname, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def download_failed(full: str, option: str, value: Any, exc: OSError) -> FeatkdError:
    """The one-line error for weights that could not be downloaded (offline, a proxy, a full disk)."""
    return FeatkdError(f"model {full!r}: could not download {option} {value!r}: {exc}")


@contextlib.contextmanager
def downloading(full: str, option: str, value: Any) -> Iterator[None]:
    """Inside the block, an OSError (urllib's, while torchvision downloads weights ``value`` of ``option``)
    becomes :func:`download_failed`'s one line naming model ``full``; a build that downloads nothing is
    unaffected."""
    try:
        yield
    except OSError as exc:
        raise download_failed(full, option, value, exc) from None


def backbone_weights(full: str, builder: str, value: Any) -> Any:
    """torchvision's weights enum member named ``value`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...) for its
    classification builder ``builder`` (``"resnet50"``), None for None; a wrong name or type is one
    FeatkdError line naming model ``full`` and the names that exist. Nothing is downloaded here."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FeatkdError(f"model {full!r}: option 'weights_backbone' must be a string, got {value!r}")
    enum = _torchvision_models().get_model_weights(builder)
    try:
        return enum.verify(value)
    except (KeyError, ValueError):
        names = ", ".join(enum.__members__)
        raise FeatkdError(f"model {full!r}: weights_backbone {value!r} is not one of torchvision's {builder} weights "
                          f"({names})") from None


def replace_first_conv(model: nn.Module, in_channels: int, *, pretrained: bool, full: str) -> None:
    """Replace ``model``'s first ``nn.Conv2d`` (in ``named_modules()`` order) by one taking ``in_channels``
    inputs, same hyper-parameters: with ``pretrained``, the RGB kernel averaged over its input channels, repeated
    and scaled by ``3 / in_channels`` (see the module docstring); else a fresh kernel of the old one's spread."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise FeatkdError(f"model {full!r} has no nn.Conv2d whose input channels could be changed")
    qualname, old = convs[0]
    if old.groups != 1:
        raise FeatkdError(f"model {full!r}: cannot change the input channels of a grouped first conv")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,  # type: ignore[arg-type]
        old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        if pretrained:
            mean = old.weight.mean(dim=1, keepdim=True)
            new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (old.in_channels / in_channels))
        else:  # a fresh kernel with the spread of torchvision's own initialisation of this conv
            nn.init.normal_(new.weight, 0.0, float(old.weight.std()))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_module(model, qualname, new)
