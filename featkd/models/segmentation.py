"""Small CPU segmenters: a featkd backbone's trunk with an FCN or a DeepLabV3 (ASPP) head.

``fcn_<backbone>`` and ``deeplab_<backbone>`` for every backbone in :data:`BACKBONES` (CIFAR ResNets and
MobileNetV2). The model is ``Segmenter(backbone, classifier)``:

- ``backbone``: the classifier's own feature layers, taken by reference from a freshly built classifier
  (so block code and weight init are the classifier's), without its pooling and ``fc``; module names are
  the classifier's under ``backbone.``, e.g. the pre-ReLU residual sum ``backbone.layer2.0.add``.
- ``classifier``: the head, named like torchvision's ``FCNHead`` / ``DeepLabHead`` so that the same capture
  points exist on featkd and torchvision segmenters: ``classifier.4`` (and ``classifier``) is the logits map
  before upsampling, ``classifier.2`` the head's last ReLU, ``classifier.0`` the ASPP of DeepLab heads.
- ``forward(x)``: logits (B, K, h, w) bilinearly upsampled (``align_corners=False``, as torchvision) to the
  input size: (B, C_in, H, W) -> (B, K, H, W), a tensor (torchvision segmenters return ``{'out': ...}``; use
  :func:`segmentation_logits` for both).

Output stride: 4 for the CIFAR ResNets (their stages run at strides 1-2-4: a 96-px input gives 24x24 maps),
8 for MobileNetV2 (12x12 at 96 px). The ResNets keep the stride-1 stem of the CIFAR design. Cost per 96-px
image (measured 2026-12-01, one thread of this 2-core CPU, batch 16, noisy): ``deeplab_resnet20`` 0.47 GMAC
forward, train step 44-73 ms, eval forward 12 ms; ``fcn_resnet8`` with ``widths=[8, 16, 32]`` 0.035 GMAC,
train step 7-9 ms; a distillation step with that pair (teacher forward + student train step + CWD on the
logits) 19-25 ms.

Heads (options in ``options`` next to the backbone's own, e.g. ``widths``):

- FCN (Long et al. 2015, torchvision's ``FCNHead``): conv3x3(C -> ``head_channels``)-BN-ReLU-Dropout
  (``dropout``, default 0.1)-conv1x1(-> K). ``head_channels`` defaults to the trunk's channels C
  (torchvision uses C/4, made for C = 2048).
- DeepLabV3 (Chen et al. 2017, torchvision's ``DeepLabHead``): ASPP (a 1x1 branch, three 3x3 branches
  with dilation ``rates``, an image-pooling branch; concatenated, projected by conv1x1-BN-ReLU-Dropout
  (``dropout``, default 0.5)), then conv3x3-BN-ReLU-conv1x1(-> K). Default ``rates`` (2, 4, 6) cells of
  the trunk's output (torchvision's 12-24-36 are for 64x64 maps and more): on a 24x24 map the widest
  branch spans 13 cells. The pooling branch has a BatchNorm on 1x1 maps, so training needs batches >= 2.

Like every featkd model they take ``num_classes`` / ``in_channels``, use no in-place op and trace with
torch.fx; unlike classifiers they end with a convolution, not an ``nn.Linear``.
"""

from __future__ import annotations

import inspect
import typing
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import featkd.models.mobilenetv2
import featkd.models.resnet_cifar  # noqa: F401  (registers the backbones' classifiers)
from featkd.errors import FeatkdError
from featkd.models.init import init_conv_bn
from featkd.models.registry import MODELS, register_factory
from featkd.modes import eval_mode

DEFAULT_RATES = (2, 4, 6)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, dilation: int = 1) -> list[nn.Module]:
    """``[Conv2d (no bias, 'same' padding), BatchNorm2d, ReLU]``: (B, c_in, h, w) -> (B, c_out, h, w)."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


class FCNHead(nn.Sequential):
    """(B, C, h, w) -> (B, K, h, w): ``0`` conv3x3, ``1`` BN, ``2`` ReLU, ``3`` Dropout, ``4`` conv1x1."""

    def __init__(
        self, in_channels: int, num_classes: int, *, head_channels: int | None = None, dropout: float = 0.1
    ) -> None:
        width = in_channels if head_channels is None else head_channels
        _check_head(width, dropout)
        super().__init__(*conv_bn_relu(in_channels, width), nn.Dropout(dropout), nn.Conv2d(width, num_classes, 1))
        init_conv_bn(self)


class ASPPPooling(nn.Sequential):
    """Image-pooling branch: global average, conv1x1-BN-ReLU, then broadcast back to (B, C_out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels, kernel=1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: (B, C_in, h, w) -> (B, C_out, h, w).

    ``convs.0`` 1x1 branch, ``convs.1..`` one 3x3 branch per dilation rate, ``convs.-1`` image pooling;
    ``project`` = conv1x1 over the concatenation, BN, ReLU, Dropout.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(*conv_bn_relu(in_channels, out_channels, kernel=1))]
        branches += [nn.Sequential(*conv_bn_relu(in_channels, out_channels, dilation=r)) for r in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            *conv_bn_relu(len(branches) * out_channels, out_channels, kernel=1), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """(B, C, h, w) -> (B, K, h, w): ``0`` ASPP, ``1`` conv3x3, ``2`` BN, ``3`` ReLU, ``4`` conv1x1."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        head_channels: int | None = None,
        rates: list[int] | None = None,
        dropout: float = 0.5,
    ) -> None:
        width = in_channels if head_channels is None else head_channels
        _check_head(width, dropout)
        rates = tuple(DEFAULT_RATES if rates is None else rates)
        if not rates or min(rates) < 1:
            raise ValueError(f"rates must be positive dilation rates, got {list(rates)}")
        super().__init__(
            ASPP(in_channels, width, rates, dropout), *conv_bn_relu(width, width), nn.Conv2d(width, num_classes, 1)
        )
        init_conv_bn(self)


def _check_head(width: int, dropout: float) -> None:
    if width < 1:
        raise ValueError(f"head_channels must be positive, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class Segmenter(nn.Module):
    """``backbone`` (B, C_in, H, W) -> (B, C, H/s, W/s), ``classifier`` -> (B, K, H/s, W/s), upsampled."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# backbones and registration
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """How to cut a registered classifier into a trunk: its children to keep, in forward order."""

    trunk: tuple[str, ...]
    out_channels: Callable[[nn.Module], int]  # channels of the trunk's output, read off the classifier
    output_stride: int


_RESNET = Backbone(("conv1", "bn1", "relu", "layer1", "layer2", "layer3"), lambda m: m.fc.in_features, 4)
_MOBILENET = Backbone(("conv1", "bn1", "relu1", "blocks"), lambda m: m.conv2.in_channels, 8)

BACKBONES: dict[str, Backbone] = {
    **{name: _RESNET for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet8x4",
                                  "resnet32x4")},
    "mobilenetv2": _MOBILENET,
}
HEADS: dict[str, type[nn.Module]] = {"fcn": FCNHead, "deeplab": DeepLabHead}

#: the names this module registers in MODELS, e.g. ``fcn_resnet20``, ``deeplab_mobilenetv2``
SEGMENTATION_MODELS: tuple[str, ...] = tuple(f"{h}_{b}" for b in BACKBONES for h in HEADS)


def trunk(classifier: nn.Module, names: Sequence[str]) -> nn.Sequential:
    """The children ``names`` of ``classifier`` (shared, not copied) run in order; a ModuleList in sequence."""
    layers = OrderedDict()
    for name in names:
        child = classifier.get_submodule(name)
        layers[name] = nn.Sequential(*child) if isinstance(child, nn.ModuleList) else child
    return nn.Sequential(layers)


def keyword_options(fn: Callable[..., Any], skip: tuple[str, ...]) -> tuple[list[inspect.Parameter], dict]:
    """Keyword parameters of ``fn`` (minus ``skip``) and their resolved type hints."""
    target = fn.__init__ if isinstance(fn, type) else fn
    hints = typing.get_type_hints(target)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(name, Any))
              for name, p in inspect.signature(fn).parameters.items()
              if name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params, {p.name: p.annotation for p in params}


def _register(head_name: str, backbone_name: str) -> None:
    """Register ``<head>_<backbone>``; its options are the backbone classifier's plus the head's."""
    name = f"{head_name}_{backbone_name}"
    spec, head_cls, make_classifier = BACKBONES[backbone_name], HEADS[head_name], MODELS.get(backbone_name)
    b_params, _ = keyword_options(make_classifier, ("num_classes", "in_channels"))
    h_params, h_hints = keyword_options(head_cls, ("self", "in_channels", "num_classes"))
    backbone_keys = {p.name for p in b_params}
    assert not backbone_keys & set(h_hints), f"{name}: backbone and head options overlap"

    def factory(*, num_classes: int, in_channels: int = 3, **options: Any) -> Segmenter:
        b_opts = {k: v for k, v in options.items() if k in backbone_keys}
        h_opts = {k: v for k, v in options.items() if k not in backbone_keys}
        classifier = make_classifier(num_classes=1, in_channels=in_channels, **b_opts)  # its fc is dropped
        head = head_cls(spec.out_channels(classifier), num_classes, **h_opts)
        return Segmenter(trunk(classifier, spec.trunk), head)

    doc = (f"{head_name.upper() if head_name == 'fcn' else 'DeepLabV3'} head on the {backbone_name} trunk (output "
           f"stride {spec.output_stride}).")
    register_factory(name, factory, [*b_params, *h_params], Segmenter, doc)


for _backbone in BACKBONES:
    for _head in HEADS:
        _register(_head, _backbone)


# ---------------------------------------------------------------------------------------------------------
# telling segmenters from classifiers
# ---------------------------------------------------------------------------------------------------------


def segmentation_logits(output: Tensor | Mapping[str, Tensor]) -> Tensor:
    """The logits of a segmenter's output: ``output['out']`` for a Mapping (torchvision), else the tensor."""
    if isinstance(output, Mapping):
        if "out" not in output:
            raise FeatkdError(f"segmentation output has keys {list(output)}; expected an 'out' entry")
        return output["out"]
    if not isinstance(output, Tensor):
        raise FeatkdError(f"model output is a {type(output).__name__}, expected a tensor or {{'out': tensor}}")
    return output


@torch.no_grad()
def model_kind(model: nn.Module, example_input: Tensor) -> Literal["classification", "segmentation"]:
    """``"classification"`` if ``model(example_input)`` gives (B, K) logits, ``"segmentation"`` for
    (B, K, H', W') logits (a tensor or torchvision's ``{'out': ...}``).

    One forward in eval mode on ``example_input`` (B, C, H, W), without grad; each module's mode is restored.
    featkd and torchvision segmenters return logits at the input's size (H' = H, W' = W).
    """
    with eval_mode(model):
        logits = segmentation_logits(model(example_input))
    if logits.ndim == 2:
        return "classification"
    if logits.ndim == 4:
        return "segmentation"
    raise FeatkdError(f"{type(model).__name__} returns a tensor of shape {tuple(logits.shape)}; expected "
                      "classification logits (B, K) or segmentation logits (B, K, H, W)")
