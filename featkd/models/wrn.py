"""Wide ResNets WRN-d-w (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Pre-activation blocks as in the original code and in CRD (Tian et al. 2020): a 3x3 stem conv with 16 channels,
three stages ``layer1..layer3`` of ``(d - 4) / 6`` blocks with widths 16w-32w-64w and strides 1-2-2, a final
BN-ReLU, global average pooling and a linear classifier ``fc``. A block whose shape changes pre-activates its
input once and feeds it to both the 3x3 convs and the 1x1 projection shortcut. ``dropout`` (default 0) sits
between the two convs of each block.

Spatial size of each stage for an ``H x H`` input: stem and ``layer1`` H, ``layer2`` ceil(H/2), ``layer3``
ceil(H/4), i.e. 32/16/8 for CIFAR, 28/14/7 for MNIST, 8/4/2 for 8x8 digits. Stage outputs are pre-activation
(the ReLU of the next block or of the head comes after); each block's residual sum is the fx node
``layer{i}.{j}.add``.
"""

from __future__ import annotations

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.relu2(self.bn2(self.conv1(o)))
        out = self.conv2(self.dropout(out))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen_factor: int,
        *,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be positive, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._make_layer(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._make_layer(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, zero_linear_bias=True)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [WideBasicBlock(in_planes, planes, stride, dropout)]
        layers += [WideBasicBlock(planes, planes, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@MODELS.register("wrn")
def wrn(
    *, num_classes: int, in_channels: int = 3, depth: int = 40, widen_factor: int = 2, dropout: float = 0.0
) -> WideResNet:
    """WRN-``depth``-``widen_factor`` (default WRN-40-2)."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def _register(depth: int, widen_factor: int) -> None:
    name = f"wrn_{depth}_{widen_factor}"

    def factory(*, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
        return WideResNet(
            depth,
            widen_factor,
            num_classes=num_classes,
            in_channels=in_channels,
            dropout=dropout,
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"WRN-{depth}-{widen_factor}."
    MODELS.register(name)(factory)


for _depth, _widen in ((16, 1), (16, 2), (16, 4), (28, 4), (28, 10), (40, 1), (40, 2), (40, 4)):
    _register(_depth, _widen)
