"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

The variant used by the CRD / mdistiller tables (Tian et al. 2020, Zhao et al. 2022): a 3x3 stem conv, three
stages of ``(depth - 2) / 6`` BasicBlocks with strides 1-2-2, 1x1 conv + BN projection shortcuts when the
shape changes (option B), global average pooling and a linear classifier ``fc``.

- ``resnet8 ... resnet110``: stem 16, stages 16-32-64.
- ``resnet8x4, resnet32x4``: stem 32, stages 64-128-256.

Option ``widths`` gives the three stage widths and ``stem_width`` the stem width (default: the model's own
without ``widths``, ``widths[0]`` with them), e.g.
``create_model("resnet8", num_classes=10, widths=[8, 16, 32])``.

Spatial size of each stage for an ``H x H`` input: stem and ``layer1`` H, ``layer2`` ceil(H/2), ``layer3``
ceil(H/4), i.e. 32/16/8 for CIFAR, 28/14/7 for MNIST, 8/4/2 for 8x8 digits.

Each block computes ``relu2(bn2(conv2(...)) + shortcut(x))`` with the sum as its own op: the pre-ReLU residual
sum is the fx node ``layer{i}.{j}.add`` and ``bn2`` is the last BN of the residual branch.

Four-stage CIFAR ResNets of KDA's official code (``idstcv/KDA`` ``resnet_cifar.py``, itself from
``weiaicunzai/pytorch-cifar100``), the teacher / student of its CIFAR-100 pair:

- ``resnet18_cifar`` (BasicBlocks 2-2-2-2) and ``resnet34_cifar`` (3-4-6-3): a 3x3 stride-1 stem conv with 64
  channels and no max pool, stages ``layer1..layer4`` of widths 64-128-256-512 with strides 1-2-2-2, the same
  blocks and shortcuts as above, global average pooling and ``fc``. Stage sizes H, ceil(H/2), ceil(H/4),
  ceil(H/8) (32/16/8/4 for CIFAR). 11,220,132 and 21,328,292 parameters at 100 classes (torchvision's ResNet-18
  / -34 with a 3x3 stem instead of the 7x7 one). KDA's feature is the pooled 512-d vector, the capture point
  ``fc:input`` (KDA's default point). Module names are featkd's (KDA's are ``conv1.0``, ``conv2_x.0.
  residual_function.0``, ...), so KDA's checkpoints need their keys renamed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import register_factory


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """A 3x3 stride-1 stem conv, then one stage ``layer{i}`` of BasicBlocks per entry of ``blocks`` (the first with
    stride 1, the others 2), global average pooling and ``fc``."""

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if not blocks or min(blocks) < 1:
            raise ValueError(f"blocks must be positive numbers of blocks per stage, got {list(blocks)}")
        if len(widths) != len(blocks) or min(widths) < 1:
            raise ValueError(f"widths must be {len(blocks)} positive stage widths, got {list(widths)}")
        stem_width = widths[0] if stem_width is None else stem_width
        if stem_width < 1:
            raise ValueError(f"stem_width must be positive, got {stem_width}")
        self.num_stages = len(blocks)
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        planes = stem_width
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(planes, width, n, stride=1 if i == 0 else 2))
            planes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def depth_blocks(depth: int) -> tuple[int, int, int]:
    """The blocks per stage of a three-stage CIFAR ResNet of ``depth`` = 6n + 2 layers: (n, n, n)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return n, n, n


SMALL = (16, 32, 64)  # stem 16
WIDE = (64, 128, 256)  # stem 32
KDA_WIDTHS = (64, 128, 256, 512)  # stem 64

#: the registered names: (blocks per stage, the stem's width, the stages' widths, what the docstring says)
CIFAR_RESNETS: dict[str, tuple[tuple[int, ...], int, tuple[int, ...], str]] = {
    **{f"resnet{d}": (depth_blocks(d), 16, SMALL, f"ResNet-{d} (stem 16, stages 16-32-64).")
       for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": (depth_blocks(d), 32, WIDE, f"ResNet-{d}x4 (stem 32, stages 64-128-256).") for d in (8, 32)},
    "resnet18_cifar": ((2, 2, 2, 2), 64, KDA_WIDTHS,
                       "CIFAR ResNet-18 of KDA's code (stem 64, stages 64-128-256-512, blocks 2-2-2-2)."),
    "resnet34_cifar": ((3, 4, 6, 3), 64, KDA_WIDTHS,
                       "CIFAR ResNet-34 of KDA's code (stem 64, stages 64-128-256-512, blocks 3-4-6-3)."),
}


def _register(name: str, blocks: tuple[int, ...], stem: int, stages: tuple[int, ...], doc: str) -> None:
    """Register ``name``; the stem's default width: the model's own without ``widths``, ``widths[0]`` with them."""

    def factory(*, num_classes: int, in_channels: int = 3, widths: list[int] | None = None,
                stem_width: int | None = None) -> CifarResNet:
        if widths is None:
            widths, stem_width = list(stages), stem if stem_width is None else stem_width
        return CifarResNet(blocks, num_classes=num_classes, in_channels=in_channels, widths=widths,
                           stem_width=stem_width)

    kw = inspect.Parameter.KEYWORD_ONLY
    options = [inspect.Parameter("widths", kw, default=None, annotation=list[int] | None),
               inspect.Parameter("stem_width", kw, default=None, annotation=int | None)]
    register_factory(name, factory, options, CifarResNet, doc)


for _name, _spec in CIFAR_RESNETS.items():
    _register(_name, *_spec)
