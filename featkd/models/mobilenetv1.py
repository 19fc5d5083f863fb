"""MobileNet-V1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", arXiv 1704.04861, table 1), the ImageNet student of MGD (Yue et al. 2020, ResNet-50 ->
MobileNet-V1; official ``KaiyuYue/mgd`` ``cls/models/mobilenetv1.py``) and of CWT (Liu et al. 2023).

The standard ImageNet layout: a 3x3 stride-2 conv-BN-ReLU stem (``conv1/bn1/relu``, 32 channels), 13
depthwise-separable blocks (3x3 depthwise conv-BN-ReLU ``conv_dw/bn_dw/relu_dw``, then 1x1 pointwise
conv-BN-ReLU ``conv_pw/bn_pw/relu_pw``; no conv biases), global average pooling and a linear classifier ``fc``.
The blocks are grouped in four stages at MGD's four split points, so each stage ends where the resolution
next drops (channels times ``width_mult``):

=========  ======  ===================  ====  ==========  ===============  =====================
stage      blocks  block widths         c     stride      224 / 64 input   last pre-ReLU point
=========  ======  ===================  ====  ==========  ===============  =====================
stem       -       32                   32    2           112 / 32         ``bn1``
layer1     3       64, 128 (s2), 128    128   4           56 / 16          ``layer1.2.bn_pw``
layer2     2       256 (s2), 256        256   8           28 / 8           ``layer2.1.bn_pw``
layer3     6       512 (s2), 5 x 512    512   16          14 / 4           ``layer3.5.bn_pw``
layer4     2       1024 (s2), 1024      1024  32          7 / 2            ``layer4.1.bn_pw``
=========  ======  ===================  ====  ==========  ===============  =====================

Which points to distil:

- **MGD** (its margins and partial L2 are defined on pre-ReLU features): the stage ends ``layer1.2.bn_pw``,
  ``layer2.1.bn_pw``, ``layer3.5.bn_pw``, ``layer4.1.bn_pw``, the features the official code's
  ``extract_feature(preReLU=True)`` returns (``get_bn_before_relu``: the BN of the last pointwise conv of
  ``model[3]``, ``[5]``, ``[11]``, ``[13]``). Each is a BN module's own output; its ReLU ``relu_pw`` is a
  separate, not in-place module, so a capture keeps the negative values. For ResNet-50 -> MobileNet-V1 they
  pair with torchvision's ``layer1.2.add``, ``layer2.3.add``, ``layer3.5.add``, ``layer4.2.add`` (same sizes).
- **Other feature methods** (FitNets, AT, CWT, CWD...): the post-ReLU stage outputs, the modules ``layer1`` ..
  ``layer4`` (the ``relu_pw`` of each stage's last block), or any block ``layerK.J`` inside a stage.
- **Vector methods** (RKD, CRD, KDA): ``fc:input``, the pooled ``1024 * width_mult``-d feature.

1000 classes: 4,231,976 parameters (the count of the official code and of timm's ``mobilenetv1_100``).

Alternative: ``timm:mobilenetv1_100`` builds through featkd's timm adapter (random weights here; ``pretrained:
true`` downloads timm's). It has the same parameter count but ReLU6 instead of ReLU, and each BN and its
activation are one ``BatchNormAct2d`` module with an in-place ReLU6, so the pre-activation stage ends are the fx
nodes ``blocks.1.1.bn2.drop``, ``blocks.2.1.bn2.drop``, ``blocks.3.5.bn2.drop``, ``blocks.4.1.bn2.drop`` (the
Identity after the batch norm) or, the same values, ``blocks.S.B.bn2.batch_norm`` (the capture layer clones a
tensor that an in-place op reaches through an Identity or a view: tests/test_paper_models.py).
"""

from __future__ import annotations

import torch
from torch import nn

from featkd.models.init import init_weights
from featkd.models.registry import MODELS

#: stages of (output channels, stride of the block) per block, after the 32-channel stride-2 stem
STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1), (128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)
STEM_WIDTH = 32


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU; the ReLUs are separate, not in place."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False)
        self.bn_dw = nn.BatchNorm2d(inp)
        self.relu_dw = nn.ReLU()
        self.conv_pw = nn.Conv2d(inp, oup, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(oup)
        self.relu_pw = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_dw(self.bn_dw(self.conv_dw(x)))
        return self.relu_pw(self.bn_pw(self.conv_pw(x)))


class MobileNetV1(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")

        def width(c: int) -> int:
            return max(1, int(c * width_mult))

        channels = width(STEM_WIDTH)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        for i, stage in enumerate(STAGES):
            blocks = []
            for c, stride in stage:
                blocks.append(DepthwiseSeparable(channels, width(c), stride))
                channels = width(c)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("mobilenetv1")
def mobilenetv1(*, num_classes: int, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV1:
    """MobileNet-V1 for ImageNet-size inputs (stem stride 2, output stride 32; default width 1.0)."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
