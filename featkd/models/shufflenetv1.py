"""CIFAR ShuffleNetV1 (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018), following CRD's ``models/ShuffleNetv1.py`` (Tian et al. 2020; their ``ShuffleV1`` is
``groups=3``, the student of the CIFAR-100 pairs resnet32x4 -> ShuffleV1 and wrn-40-2 -> ShuffleV1).

A 1x1 stem conv to 24 channels (stride 1, no max pool: CRD's; the ImageNet paper has a 3x3 stride-2 conv and a
max pool), three stages ``layer1..layer3`` of 4-8-4 bottlenecks with outputs 240-480-960 channels (for
``groups=3``), global average pooling and a linear classifier ``fc`` (no head conv). Each bottleneck:

    conv1 1x1 group conv (g groups; 1 group in the first block, whose input has only 24 channels)
    -> bn1 -> relu1 -> channel shuffle (g groups) -> conv2 3x3 depthwise (stride s) -> bn2 -> relu2
    -> conv3 1x1 group conv (g groups) -> bn3,
    then ``relu3(cat([bn3, avgpool3x3/2(x)]))`` in a stage's first block (s = 2: the branch makes out - in
    channels, the pooled input the other in) and ``relu3(bn3 + x)`` in the others (s = 1),

with ``mid = branch channels / 4`` (CRD's rule; with it ``groups`` 4 and 8 give bottleneck widths that the
groups do not divide, so only 1, 2 and 3 are offered, with the paper's widths 144 / 200 / 240 for stage 1).
The concatenation and the sum are their own ops, before the block's last ReLU: the pre-ReLU stage outputs
(CRD's ``preact`` features) are the fx nodes ``layer1.3.add``, ``layer2.7.add`` and ``layer3.3.add``, the
post-ReLU ones the modules ``layer1..layer3``, and ``fc:input`` is the pooled 960-d feature.

Every stage starts with stride 2, as in CRD: stage sizes ceil(H/2), ceil(H/4), ceil(H/8), i.e. 16/8/4 for CIFAR
(a CIFAR ResNet's stages are 32/16/8). Weights are initialised like every featkd model (CRD keeps PyTorch's
defaults).

Parameters at 100 classes (``groups=3``): 949,258, CRD's "0.95M" (the count of CRD's ``ShuffleV1(num_classes=
100)``, computed from its definition): stem 72 + BN 48; stage 1: first block 24 -> 216 (mid 54) 6,318, three
240 -> 240 blocks (mid 60) 10,860 each; stage 2: 240 -> 240 + 240 pooled 10,860, seven 480 -> 480 blocks (mid
120) 40,920 each; stage 3: 480 -> 480 + 480 pooled 40,920, three 960 -> 960 blocks (mid 240) 158,640 each;
``fc`` 960 x 100 + 100 = 96,100. (A block with input i, branch output o, mid m = o / 4 and conv1 groups g1 has
i m / g1 + 9 m + m o / g weights and 2 (2 m + o) BN parameters.)
"""

from __future__ import annotations

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS
from featkd.models.shufflenetv2 import channel_shuffle

#: groups -> the three stages' output channels (the paper's table 1; CRD's ShuffleV1 is groups=3)
WIDTHS: dict[int, tuple[int, int, int]] = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960)}
NUM_BLOCKS = (4, 8, 4)
STEM_WIDTH = 24


class Bottleneck(nn.Module):
    """One ShuffleNet unit (see the module docstring); ``out`` is the width of the block's output."""

    def __init__(self, inp: int, out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.concat = stride == 2
        branch = out - inp if self.concat else out
        mid = branch // 4
        self.shuffle_groups = 1 if inp == STEM_WIDTH else groups
        self.conv1 = nn.Conv2d(inp, mid, 1, groups=self.shuffle_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.shortcut: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if self.concat else nn.Identity()
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        if self.shuffle_groups > 1:
            out = channel_shuffle(out, self.shuffle_groups)
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.concat:
            out = torch.cat([out, self.shortcut(x)], 1)
        else:
            out = out + self.shortcut(x)  # the residual branch first (MGD walks back to its bn3)
        return self.relu3(out)


class ShuffleNetV1(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int = 3, groups: int = 3) -> None:
        super().__init__()
        if groups not in WIDTHS:
            raise ValueError(f"groups must be one of {', '.join(map(str, WIDTHS))}, got {groups}")
        self.conv1 = nn.Conv2d(in_channels, STEM_WIDTH, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU()
        channels = STEM_WIDTH
        for i, (width, blocks) in enumerate(zip(WIDTHS[groups], NUM_BLOCKS, strict=True)):
            layers = [Bottleneck(channels, width, 2, groups)]
            layers += [Bottleneck(width, width, 1, groups) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("shufflenetv1")
def shufflenetv1(*, num_classes: int, in_channels: int = 3, groups: int = 3) -> ShuffleNetV1:
    """CIFAR ShuffleNetV1 (default ``groups=3``, CRD's ``ShuffleV1``; stages 240-480-960, blocks 4-8-4)."""
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels, groups=groups)
