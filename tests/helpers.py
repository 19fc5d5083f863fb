"""Small shared builders for the tests (real modules, no mocks)."""

from __future__ import annotations

import torch
from torch import nn

from featkd.methods.base import BuildContext


class TinyNet(nn.Module):
    """conv(in -> width) -> ReLU -> global pool -> fc; capture points 'conv', 'act', 'fc:input'."""

    def __init__(self, width: int, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


def tiny_context(s_width: int = 2, t_width: int = 3, size: int = 4) -> BuildContext:
    torch.manual_seed(0)
    return BuildContext(teacher=TinyNet(t_width), student=TinyNet(s_width), input_shape=(1, size, size),
                        num_classes=3, device=torch.device("cpu"))
