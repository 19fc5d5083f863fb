"""CIFAR MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

CRD's variant (Tian et al. 2020, ``mobilenetv2.py``; ``mobilenetv2_x0_5`` is their ``MobileNetV2`` student
with width 0.5): every inverted residual has a 1x1 expansion conv (also with expansion 1), the head conv has
1280 channels for ``width_mult <= 1`` and the classifier is one ``nn.Linear``. Unlike CRD the 3x3 stem has
stride 1 so that small inputs keep their resolution.

Modules: stem ``conv1/bn1/relu1``, stages ``blocks.0 .. blocks.6`` (the ``[t, c, n, s]`` rows of
``SETTING``), head ``conv2/bn2/relu2``, ``avgpool``, ``classifier``. Spatial size of each stage for an
``H x H`` input:

=========  ====  =========  ===========================
stage      c     size       32 / 28 / 8 input
=========  ====  =========  ===========================
stem       32    H          32 / 28 / 8
blocks.0   16    H          32 / 28 / 8
blocks.1   24    H          32 / 28 / 8
blocks.2   32    ceil(H/2)  16 / 14 / 4
blocks.3   64    ceil(H/4)  8 / 7 / 2
blocks.4   96    ceil(H/4)  8 / 7 / 2
blocks.5   160   ceil(H/8)  4 / 4 / 1
blocks.6   320   ceil(H/8)  4 / 4 / 1
=========  ====  =========  ===========================

so ``blocks.1``, ``blocks.2`` and ``blocks.4`` match the ``layer1..layer3`` outputs of a CIFAR ResNet.
(Channels ``c`` are multiplied by ``width_mult``.) Residual blocks compute ``conv(x) + x`` as their own op;
the last BN of the branch is ``conv.7``.

``mobilenetv2_cifar`` is CRD's / RepDistiller's student exactly (``models/mobilenetv2.py``, ``mobile_half``:
the CIFAR-100 tables' "MobileNetV2", student of vgg13 and ResNet-50): width 0.5 with CRD's stride-2 stem, so
every stage size above is halved (``blocks.1`` 16, ``blocks.2`` 8, ``blocks.4`` 4, ``blocks.6`` 2 on 32x32, the
maps CRD distils). 812,836 parameters at 100 classes, as ``mobilenetv2_x0_5`` (a stride changes no parameter).
Module names differ from CRD's in the stem / head (CRD: ``conv1.0``, ``conv2.0``, ``classifier.0``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS

# t (expansion), c (channels), n (blocks), s (stride of the first block)
SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return self.conv(x) + x  # residual branch first, then the shortcut
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self, *, num_classes: int, in_channels: int = 3, width_mult: float = 1.0, stem_stride: int = 1
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        channels = max(1, int(32 * width_mult))
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            out = max(1, int(c * width_mult))
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        last = 8 * math.ceil(1280 * width_mult / 8) if width_mult > 1.0 else 1280
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        for block in self.blocks:
            x = block(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@MODELS.register("mobilenetv2")
def mobilenetv2(*, num_classes: int, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNetV2 (default width 1.0)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)


@MODELS.register("mobilenetv2_x0_5")
def mobilenetv2_x0_5(*, num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """CIFAR MobileNetV2 with width 0.5 (CRD's ``MobileNetV2`` student)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=0.5)


@MODELS.register("mobilenetv2_cifar")
def mobilenetv2_cifar(*, num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """CRD's / RepDistiller's CIFAR ``MobileNetV2`` (``mobile_half``): width 0.5, stride-2 stem."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=0.5, stem_stride=2)
