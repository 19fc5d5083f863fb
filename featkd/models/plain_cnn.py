"""A small plain CNN (the classic MNIST example network, with global average pooling).

``block{i}`` = conv3x3(widths[i]) [-BN] -ReLU- 2x2 max pool (``ceil_mode=True``, so a map never shrinks below
1x1), then ``avgpool`` (adaptive average pooling to ``pool_size`` x ``pool_size``, default 1), ``fc1`` with
``hidden`` units (default 128), ``relu`` and the classifier ``fc``. Defaults: ``widths=[32, 64]``,
``batchnorm=False`` (a model without BatchNorm, whose output for a sample does not depend on the batch).

Spatial size of each block's output for an ``H x H`` input: ``block1`` ceil(H/2), ``block2`` ceil(H/4), i.e.
16/8 for CIFAR, 14/7 for MNIST, 4/2 for 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS


class PlainCNN(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64),
        hidden: int = 128,
        batchnorm: bool = False,
        pool_size: int = 1,
    ) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive widths, got {list(widths)}")
        if hidden < 1 or pool_size < 1:
            raise ValueError(f"hidden and pool_size must be positive, got {hidden} and {pool_size}")
        for i, w in enumerate(widths, 1):
            layers = [nn.Conv2d(in_channels, w, 3, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(w)] if batchnorm else []
            layers += [nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True)]
            setattr(self, f"block{i}", nn.Sequential(*layers))
            in_channels = w
        self.num_blocks = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc1 = nn.Linear(in_channels * pool_size * pool_size, hidden)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.relu(self.fc1(x)))


@MODELS.register("plaincnn")
def plaincnn(
    *,
    num_classes: int,
    in_channels: int = 3,
    widths: list[int] | None = None,
    hidden: int = 128,
    batchnorm: bool = False,
    pool_size: int = 1,
) -> PlainCNN:
    """Plain CNN: conv(32)-ReLU-pool, conv(64)-ReLU-pool, global average pool, fc(128)-ReLU, fc."""
    return PlainCNN(
        num_classes=num_classes,
        in_channels=in_channels,
        widths=(32, 64) if widths is None else widths,
        hidden=hidden,
        batchnorm=batchnorm,
        pool_size=pool_size,
    )
