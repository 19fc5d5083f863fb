"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015), as in CRD's ``vgg.py`` (Tian et al. 2020).

Five stages ``block0..block4`` of 3x3 conv-BN-ReLU layers whose last ReLU is split off as ``relu{i}`` (so a
stage's output is pre-ReLU), each followed by ``pool{i}``: 2x2 max pools after ``block0..block2`` (and after
``block3`` when ``input_size >= 64``, like CRD's 64x64 variant), global average pooling after ``block4``, then
one linear classifier. The max pools use ``ceil_mode=True``, so they never shrink a map below 1x1 (and equal
CRD's pools on even sizes).

Spatial size of each stage for an ``H x H`` input (``input_size < 64``): ``block0`` H, ``block1`` ceil(H/2),
``block2`` ceil(H/4), ``block3`` and ``block4`` ceil(H/8): 32/16/8/4/4 for CIFAR, 28/14/7/4/4 for MNIST,
8/4/2/1/1 for 8x8 digits.

Every conv has a bias, also before a BN, as in CRD's ``vgg.py`` (``nn.Conv2d``'s default): the parameter counts
are CRD's (vgg13 9,462,180 and vgg8 3,965,028 at 100 classes; 2,944 and 1,472 of them conv biases) and the module
names and ``state_dict`` keys (``block{i}.{j}.weight`` / ``.bias``, ``classifier``) are those of CRD's
``vgg13_bn`` / ``vgg8_bn`` checkpoints. Option ``batchnorm`` (default True) drops the BN layers when False.
"""

from __future__ import annotations

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    def __init__(
        self,
        cfg: list[list[int]],
        *,
        num_classes: int,
        in_channels: int = 3,
        batchnorm: bool = True,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        for i, widths in enumerate(cfg):
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(in_channels, w, 3, padding=1)]
                layers += [nn.BatchNorm2d(w)] if batchnorm else []
                layers += [nn.ReLU()]
                in_channels = w
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))
            setattr(self, f"relu{i}", nn.ReLU())
            if i < 4:
                pool = i < 3 or input_size >= 64
                setattr(self, f"pool{i}", nn.MaxPool2d(2, 2, ceil_mode=True) if pool else nn.Identity())
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(5):
            x = getattr(self, f"block{i}")(x)
            x = getattr(self, f"pool{i}")(getattr(self, f"relu{i}")(x))
        return self.classifier(torch.flatten(x, 1))


def _register(name: str) -> None:
    def factory(
        *,
        num_classes: int,
        in_channels: int = 3,
        batchnorm: bool = True,
        input_size: int = 32,
    ) -> VGG:
        return VGG(
            CONFIGS[name],
            num_classes=num_classes,
            in_channels=in_channels,
            batchnorm=batchnorm,
            input_size=input_size,
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR {name.upper()} with BatchNorm (CRD)."
    MODELS.register(name)(factory)


for _name in CONFIGS:
    _register(_name)
