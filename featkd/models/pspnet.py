"""PSPNet (Zhao et al. 2017) on a dilated torchvision ResNet: ``pspnet_resnet18``, ``pspnet_resnet50``,
``pspnet_resnet101``, built as MMSegmentation's ``pspnet_r{18,50,101}-d8`` configs (the Cityscapes setup of the
CWD and CWT papers, ``shared/specs/real-scale.md`` section 4.2).

The model is ``PSPNet(backbone, classifier[, aux_classifier])``::

    backbone         torchvision's resnet<depth> without avgpool / fc, module names as torchvision's
                     (conv1, bn1, relu, maxpool, layer1..layer4), stages 3 and 4 dilated: output stride 8.
                     Returns {'out': layer4} (and 'aux': layer3 with the auxiliary head)
    classifier       PSPHead on layer4:
      .ppm             pyramid pooling: per bin b in pool_scales (1, 2, 3, 6) AdaptiveAvgPool2d(b), conv1x1
                       (C4 -> channels)-BN-ReLU, bilinear upsampling back; concatenated with the input
                       (C4 + 4 * channels channels): the PPM output
      .bottleneck      conv3x3 (-> channels)-BN-ReLU
      .dropout         Dropout2d(dropout) (mmseg's decode heads drop whole channels)
      .conv_seg        conv1x1 (-> K): the logits at stride 8 (MMRazor's CWD distils ``decode_head.conv_seg``)
    aux_classifier   (aux_loss: true) featkd's FCNHead on layer3: conv3x3 (C3 -> aux_channels)-BN-ReLU-Dropout-
                     conv1x1 (-> K), ``aux_classifier.4`` its logits (mmseg: FCNHead, one conv)

``forward(x)``: the logits bilinearly upsampled (``align_corners=False``, as mmseg) to the input's size,
(B, C_in, H, W) -> (B, K, H, W): a tensor, or with ``aux_loss`` ``{'out': ..., 'aux': ...}`` like torchvision's
segmenters (both upsampled, in train and eval mode). The segmentation task trains ``aux`` with weight
:data:`featkd.tasks.segmentation.AUX_WEIGHT` (0.4, mmseg's).

Capture points: stage outputs ``backbone.layer1`` .. ``backbone.layer4`` (post-ReLU), the pre-ReLU residual sum
of each stage's last block as an fx node ``backbone.layer<i>.<last>.add`` (``backbone.layer4.1.add`` for
ResNet-18, ``backbone.layer4.2.add`` for ResNet-50 / 101: torchvision's blocks write ``out += identity``, which
fx records as ``add``), ``backbone[out]``, ``classifier.ppm``, ``classifier.bottleneck``, ``classifier.conv_seg``
(= ``classifier``). ``featkd layers pspnet_resnet18 --input-shape 3,64,64`` lists them.

Dilation (mmseg's ResNetV1c with ``strides=(1, 2, 1, 1)``, ``dilations=(1, 1, 2, 4)``,
``contract_dilation=True``): in stage 3 and 4 the strided convolutions get stride 1 (the block's 3x3 conv that
carried stride 2 and the 1x1 shortcut), and the 3x3 convs are dilated by 2 (stage 3) and 4 (stage 4), except
each stage's first block, which takes half (1 and 2). :func:`dilate_stage` sets these on the built modules (no
weight changes shape, so ImageNet weights load first). For Bottleneck ResNets this is what torchvision's
``replace_stride_with_dilation=[False, True, True]`` builds (the test checks it conv by conv); torchvision
refuses dilation in its BasicBlock, so for ResNet-18 it is ours: as mmseg's BasicBlock, only the block's first
3x3 conv (``conv1``, which carries the stride) is dilated, ``conv2`` stays at dilation 1.

Choices:

* ``deep_stem`` (default False): mmseg's ResNetV1c stem, three conv3x3 (32, 32, 64 channels, the first stride 2)
  in place of the 7x7 ``conv1`` (``backbone.conv1`` becomes a Sequential; ``bn1`` / ``relu`` / ``maxpool`` follow
  as before). mmseg's published numbers (CWD: PSPNet-R18 74.87 mIoU, R101 79.76) use V1c with its own
  ImageNet weights (``resnet18_v1c``); torchvision publishes ImageNet weights for the plain 7x7 stem only, so
  the default is the plain stem, and ``deep_stem`` with ``weights_backbone`` is refused.
* ``channels`` (default C4 / 4: 512 for ResNet-50 / 101 and 128 for ResNet-18, as mmseg) and ``aux_channels``
  (default C3 / 4: 256 and 64, as mmseg).
* ``weights_backbone``: torchvision's ImageNet weights of ``resnet<depth>`` by name (``"DEFAULT"``,
  ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``), downloaded on first use; the heads keep their initialisation. With
  ``in_channels != 3`` the first conv takes the RGB kernel averaged (:func:`replace_first_conv`). Offline, the
  failed download is one :class:`~featkd.errors.FeatkdError` line naming the model and the weights.
* The trunk is torchvision's, so it keeps torchvision's in-place ReLUs and ``out += identity`` (featkd's own
  models have no in-place op); the capture layer clones a point that a later in-place op would modify, so the
  pre-ReLU sums are really pre-ReLU. The heads use no in-place op. The model traces with torch.fx as a whole.
* Training needs batches of at least 2: the bin-1 branch has a BatchNorm over 1x1 maps.

Weights are initialised as featkd's other heads (Kaiming-normal convs, BN 1 / 0: :func:`init_conv_bn`) and the
trunk as torchvision initialises its ResNets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.errors import FeatkdError
from featkd.models.init import init_conv_bn
from featkd.models.registry import MODELS
from featkd.models.segmentation import FCNHead, conv_bn_relu
from featkd.models.torchvision_models import backbone_weights, downloading, replace_first_conv

#: the depths this module registers as ``pspnet_resnet<depth>``
PSPNET_DEPTHS = (18, 50, 101)
#: the names this module registers in MODELS
PSPNET_MODELS: tuple[str, ...] = tuple(f"pspnet_resnet{d}" for d in PSPNET_DEPTHS)
POOL_SCALES = (1, 2, 3, 6)
#: (stage, dilation) of the dilated stages: output stride 8 (mmseg's dilations (1, 1, 2, 4))
DILATED_STAGES = (("layer3", 2), ("layer4", 4))


class PyramidPooling(nn.Module):
    """(B, C, h, w) -> (B, C + len(pool_scales) * channels, h, w): the input and, per bin, its average pooled to
    b x b cells, conv1x1-BN-ReLU, upsampled back (bilinear), concatenated. ``branches.<i>``: bin i."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_channels, channels, kernel=1)) for b in pool_scales
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Module):
    """(B, C, h, w) -> (B, K, h, w): ``ppm``, ``bottleneck`` (conv3x3-BN-ReLU), ``dropout``, ``conv_seg``."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: int, pool_scales: Sequence[int],
                 dropout: float) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels, channels, pool_scales)
        self.bottleneck = nn.Sequential(*conv_bn_relu(in_channels + len(pool_scales) * channels, channels))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.bottleneck(self.ppm(x))))


class ResNetTrunk(nn.Module):
    """A torchvision ResNet's stem and four stages (shared with it, names kept): (B, C_in, H, W) ->
    ``{'out': layer4 (B, C4, H/8, W/8)}`` (+ ``'aux': layer3 (B, C3, H/8, W/8)`` when ``aux``)."""

    def __init__(self, resnet: nn.Module, aux: bool) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        self.aux = aux

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        out = {"out": self.layer4(c3)}
        if self.aux:
            out["aux"] = c3
        return out


class PSPNet(nn.Module):
    """``backbone`` -> ``classifier`` (and ``aux_classifier``) -> logits upsampled to the input (see the module
    docstring)."""

    def __init__(self, backbone: ResNetTrunk, classifier: nn.Module, aux_classifier: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear", align_corners=False)
        if self.aux_classifier is None:
            return out
        aux = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear", align_corners=False)
        return {"out": out, "aux": aux}


def dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Make a torchvision ResNet stage keep its input's resolution: stride 1 where it had 2 (the strided 3x3
    conv and the shortcut's 1x1), and its 3x3 convs dilated by ``dilation`` (the first block's by half, mmseg's
    ``contract_dilation``), padding = dilation. The strided 3x3 conv of a block is ``conv2`` in a Bottleneck
    (torchvision's V1.5) and ``conv1`` in a BasicBlock; a BasicBlock's ``conv2`` is left undilated (mmseg)."""
    for i, block in enumerate(stage):
        d = dilation // 2 if i == 0 else dilation
        conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck: conv1 1x1, conv2 3x3, conv3 1x1
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        if hasattr(block, "stride"):
            block.stride = 1


def deep_stem(in_channels: int) -> nn.Sequential:
    """mmseg's ResNetV1c stem without its last BN-ReLU (the ResNet's own ``bn1`` / ``relu`` follow):
    conv3x3 s2 (-> 32)-BN-ReLU, conv3x3 (-> 32)-BN-ReLU, conv3x3 (-> 64): (B, C_in, H, W) -> (B, 64, H/2, W/2)."""
    first = conv_bn_relu(in_channels, 32)
    first[0].stride = (2, 2)
    stem = nn.Sequential(*first, *conv_bn_relu(32, 32), nn.Conv2d(32, 64, 3, padding=1, bias=False))
    init_conv_bn(stem)
    return stem


def dilated_resnet(depth: int, *, in_channels: int, weights: str | None, use_deep_stem: bool, name: str) -> nn.Module:
    """torchvision's ``resnet<depth>`` (ImageNet ``weights`` by name, or random), stages 3-4 dilated (output
    stride 8), optionally with the deep stem, first conv for ``in_channels``."""
    try:
        import torchvision.models as tvm
    except ImportError:
        raise FeatkdError(f"model {name!r} is built on torchvision's ResNet: pip install torchvision") from None
    builder = f"resnet{depth}"
    resolved = backbone_weights(name, builder, weights)
    with downloading(name, "weights_backbone", weights):
        resnet = tvm.get_model(builder, weights=resolved)
    for stage, dilation in DILATED_STAGES:
        dilate_stage(resnet.get_submodule(stage), dilation)
    if use_deep_stem:
        resnet.conv1 = deep_stem(in_channels)
    elif in_channels != 3:
        replace_first_conv(resnet, in_channels, pretrained=resolved is not None, full=name)
    return resnet


def _register(depth: int) -> None:
    name = f"pspnet_resnet{depth}"

    def factory(*, num_classes: int, in_channels: int = 3, weights_backbone: str | None = None,
                deep_stem: bool = False, channels: int | None = None, pool_scales: list[int] | None = None,
                dropout: float = 0.1, aux_loss: bool = False, aux_channels: int | None = None) -> PSPNet:
        scales = tuple(POOL_SCALES if pool_scales is None else pool_scales)
        if not scales or min(scales) < 1:
            raise ValueError(f"pool_scales must be positive bin counts, got {list(scales)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for key, value in (("channels", channels), ("aux_channels", aux_channels)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be positive, got {value}")
        if deep_stem and weights_backbone is not None:
            raise ValueError("deep_stem has no torchvision ImageNet weights (they exist for the plain 7x7 stem only; "
                             "mmseg's resnet*_v1c weights are not torchvision's): drop one of the two")
        resnet = dilated_resnet(depth, in_channels=in_channels, weights=weights_backbone, use_deep_stem=deep_stem,
                                name=name)
        c4 = resnet.fc.in_features  # 512 x the block's expansion; stage 3 has half as many
        c3 = c4 // 2
        head = PSPHead(c4, num_classes, channels=channels or c4 // 4, pool_scales=scales, dropout=dropout)
        aux = FCNHead(c3, num_classes, head_channels=aux_channels or c3 // 4, dropout=dropout) if aux_loss else None
        return PSPNet(ResNetTrunk(resnet, aux=aux_loss), head, aux)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"PSPNet on a dilated torchvision ResNet-{depth} (output stride 8, pyramid pooling over "
                       f"bins {POOL_SCALES}); see featkd.models.pspnet.")
    MODELS.register(name)(factory)


for _depth in PSPNET_DEPTHS:
    _register(_depth)
