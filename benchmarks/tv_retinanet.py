"""torchvision's RetinaNet on a ResNet-18 / 34 FPN trunk: the student of the GPU check's detection pair.

torchvision ships RetinaNet on ResNet-50 only (``torchvision:retinanet_resnet50_fpn``). This builds the same
model as that builder does without pretrained weights (BatchNorm, every trunk layer trainable, FPN on C3-C5
with 256 channels and P6 / P7 from P5, torchvision's default anchors, heads and losses) on another ResNet,
so the pair ``torchvision:retinanet_resnet50_fpn -> tv_retinanet:retinanet_resnet18_fpn`` differs in the
trunk alone. A featkd user model (``module:callable``): ``benchmarks/`` is on ``sys.path`` when
``benchmarks/gpu_check.py`` runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def retinanet_resnet_fpn(*, num_classes: int, depth: int = 18, **options: Any) -> nn.Module:
    """``RetinaNet(resnet_fpn_backbone(resnet<depth>), num_classes, **options)`` as torchvision's
    ``retinanet_resnet50_fpn(weights=None, weights_backbone=None)`` builds it (``options``: ``min_size``,
    ``max_size``, ... of :class:`torchvision.models.detection.RetinaNet`)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"depth: one of 18, 34, 50, 101, 152, got {depth}")
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes, **options)


def retinanet_resnet18_fpn(*, num_classes: int, **options: Any) -> nn.Module:
    """RetinaNet R18-FPN (see :func:`retinanet_resnet_fpn`)."""
    return retinanet_resnet_fpn(num_classes=num_classes, depth=18, **options)
