"""CIFAR ShuffleNetV2 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
ECCV 2018), following CRD's ``ShuffleNetv2.py`` (Tian et al. 2020; their ``ShuffleV2`` is ``net_size=1``).

A 1x1 stem conv (24 channels, stride 1), three stages ``layer1..layer3`` each made of one two-branch
``DownBlock`` followed by 3-7-3 split/concat ``BasicBlock``s, a 1x1 head conv, global average pooling and a
linear classifier ``fc``. Option ``net_size`` in {0.5, 1, 1.5, 2} picks the widths; ``strides`` (default
``[1, 2, 2]``) the strides of the stages' first blocks. CRD uses ``[2, 2, 2]``; the default here keeps the
first stage at full resolution like a CIFAR ResNet (the number of parameters does not depend on the strides).

Spatial size of each stage for an ``H x H`` input with the default strides: stem and ``layer1`` H, ``layer2``
ceil(H/2), ``layer3`` ceil(H/4), i.e. 32/16/8 for CIFAR, 28/14/7 for MNIST, 8/4/2 for 8x8 digits.
"""

from __future__ import annotations

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS

# net_size -> (stage widths, head width)
CONFIGS: dict[float, tuple[tuple[int, int, int], int]] = {
    0.5: ((48, 96, 192), 1024),
    1: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2: ((224, 488, 976), 2048),
}
NUM_BLOCKS = (3, 7, 3)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (fx-traceable: no size is read)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def _conv_bn(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]


class BasicBlock(nn.Module):
    """Keeps the first half of the channels, transforms the second half, concatenates and shuffles."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        c = channels - self.split
        self.branch = nn.Sequential(
            *_conv_bn(c, c, 1), nn.ReLU(), *_conv_bn(c, c, 3, groups=c), *_conv_bn(c, c, 1), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1))


class DownBlock(nn.Module):
    """Two branches on the whole input (each with a strided depthwise conv), concatenated and shuffled."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        mid = oup // 2
        self.left = nn.Sequential(
            *_conv_bn(inp, inp, 3, stride, groups=inp),
            *_conv_bn(inp, mid, 1),
            nn.ReLU(),
        )
        self.right = nn.Sequential(
            *_conv_bn(inp, mid, 1),
            nn.ReLU(),
            *_conv_bn(mid, mid, 3, stride, groups=mid),
            *_conv_bn(mid, oup - mid, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        net_size: float = 1,
        strides: tuple[int, int, int] = (1, 2, 2),
    ) -> None:
        super().__init__()
        if net_size not in CONFIGS:
            raise ValueError(f"net_size must be one of {', '.join(map(str, CONFIGS))}, got {net_size}")
        if len(strides) != 3 or not all(s in (1, 2) for s in strides):
            raise ValueError(f"strides must be 3 values in {{1, 2}}, got {list(strides)}")
        widths, head = CONFIGS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        channels = 24
        for i, (width, blocks, stride) in enumerate(zip(widths, NUM_BLOCKS, strides, strict=True)):
            layers = [DownBlock(channels, width, stride)] + [BasicBlock(width) for _ in range(blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            channels = width
        self.conv2 = nn.Conv2d(channels, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("shufflenetv2")
def shufflenetv2(
    *, num_classes: int, in_channels: int = 3, net_size: float = 1, strides: list[int] | None = None
) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 (default ``net_size=1``, CRD's ``ShuffleV2``; stage strides default 1-2-2)."""
    return ShuffleNetV2(
        num_classes=num_classes,
        in_channels=in_channels,
        net_size=net_size,
        strides=tuple(strides) if strides is not None else (1, 2, 2),
    )
