"""Small CPU detectors: torchvision's RetinaNet and FCOS on a featkd trunk behind a stride-4 entry stem.

``retinanet_<backbone>`` and ``fcos_<backbone>`` for the CIFAR ResNets of :data:`DETECTION_BACKBONES`. The
model IS torchvision's :class:`~torchvision.models.detection.RetinaNet` / ``FCOS`` (its heads, losses,
anchor matching, box coding, post-processing and ``GeneralizedRCNNTransform``), built on::

    backbone.body   entry (conv3x3 s2-BN-ReLU, conv3x3 s2-BN-ReLU: stride 4), then the classifier's own
                    conv1-bn1-relu-layer1 (stride 4), layer2 (8), layer3 (16); module names as in the classifier
                    (the pre-ReLU residual sum ``backbone.body.layer2.0.add`` is an fx point)
    backbone.fpn    torchvision's FeaturePyramidNetwork on layer2 and layer3 (``fpn_channels``, default 64) with
                    RetinaNet's P6/P7: levels '0' (stride 8), '1' (16), 'p6' (32), 'p7' (64), as in
                    ``torchvision:retinanet_resnet50_fpn`` (which has '0'..'2' at strides 8-32)

so capture points read like torchvision's (``backbone.body.layer3``, ``backbone.fpn[0]``). The trunk is
taken by reference from a freshly built classifier with ``in_channels = entry_width`` (its block code and
weight init), its pooling and ``fc`` dropped.

Anchors: RetinaNet 3 scales x 3 ratios per level with base sizes ``anchor_sizes`` (default 16, 32, 64, 128:
twice the stride, where torchvision's COCO RetinaNet uses four times, because the scenes' items are 22-45 px
on 96-128 px canvases); FCOS one point per location, with torchvision's level assignment from
``anchor_sizes`` (default the strides 8-64). ``score_thresh`` defaults to 0.05 for both (torchvision's
RetinaNet value; its FCOS uses 0.2, which hides the low-confidence detections AP needs early in training).

Resizing: ``min_size`` / ``max_size`` null (the default) keeps the input size: the transform only
normalises and pads to a multiple of 32 (:class:`KeepSizeTransform`); set both for torchvision's resize
(shorter side to ``min_size``, longer at most ``max_size``). Normalisation inside: ``image_mean`` /
``image_std`` (default ImageNet's for 3 channels, 0.5 / 0.25 otherwise); detection batches are in [0, 1].

Cost (measured on this 2-core CPU, one thread, batch 16, random weights, two boxes per image, train step =
forward + backward + SGD, median of 4; noisy: other jobs ran beside it, load ~3.5): at 128 px
``retinanet_resnet8`` 16.4 ms / image, ``fcos_resnet8`` 14.4, ``retinanet_resnet20`` 21.1, ``fcos_resnet20``
16.6; at 96 px 9.0, 7.9, 11.3, 9.7 ms. Eval forward (with post-processing) 3-11 ms / image. Below the 54-58
ms of ``shared/specs/dense.md``, whose stem and FPN levels are not recorded; these FPNs have no stride-4
level.

Number of classes: every featkd detection data set has ``num_classes = K + 1`` (index 0 the background,
labels 1..K). torchvision's two-stage and SSD detectors use index 0 as their background class; RetinaNet
and FCOS (sigmoid heads, no background class) leave output 0 unused, as torchvision's own COCO recipe does
with its 91 classes.
"""

from __future__ import annotations

import inspect
import typing
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import featkd.models.resnet_cifar  # noqa: F401  (registers the backbones' classifiers)
from featkd.errors import FeatkdError
from featkd.models import MODELS
from featkd.models.segmentation import conv_bn_relu, init_conv_bn, keyword_options, trunk

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRUNK = ("conv1", "bn1", "relu", "layer1", "layer2", "layer3")  # the CIFAR ResNets' feature layers
DETECTION_BACKBONES = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4")
STRIDES = (8, 16, 32, 64)  # of the FPN levels '0', '1', 'p6', 'p7'


def _tv_detection() -> Any:
    try:
        import torchvision.models.detection
    except ImportError:
        raise FeatkdError("featkd's detectors are torchvision's RetinaNet / FCOS: pip install torchvision") from None
    return torchvision.models.detection


def keep_size_transform(image_mean: Sequence[float], image_std: Sequence[float]) -> nn.Module:
    """A :class:`KeepSizeTransform` (torchvision's transform without its resize)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class KeepSizeTransform(GeneralizedRCNNTransform):
        """``GeneralizedRCNNTransform`` that normalises and pads to a multiple of 32 but never resizes."""

        keeps_size = True

        def resize(self, image, target=None):  # type: ignore[no-untyped-def]
            return image, target

        def __repr__(self) -> str:
            return f"KeepSizeTransform(image_mean={self.image_mean}, image_std={self.image_std})"

    return KeepSizeTransform(0, 0, list(image_mean), list(image_std))


def transform_settings(model: nn.Module) -> dict[str, Any] | None:
    """How a torchvision-style detector resizes and normalises its inputs (its ``transform``), or None for
    a model without a ``GeneralizedRCNNTransform``."""
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:
        return None
    t = getattr(model, "transform", None)
    if not isinstance(t, GeneralizedRCNNTransform):
        return None
    if getattr(t, "keeps_size", False):
        resize: dict[str, Any] = {"resize": "none"}
    else:
        resize = {"min_size": tuple(int(v) for v in t.min_size), "max_size": int(t.max_size),
                  "fixed_size": None if t.fixed_size is None else tuple(t.fixed_size)}
    return {**resize, "image_mean": [float(v) for v in t.image_mean], "image_std": [float(v) for v in t.image_std],
            "size_divisible": int(t.size_divisible)}


def predicts_masks(model: nn.Module) -> bool:
    """Whether a torchvision-style detector has a mask head (Mask R-CNN)."""
    roi_heads = getattr(model, "roi_heads", None)
    has_mask = getattr(roi_heads, "has_mask", None)
    return bool(callable(has_mask) and has_mask())


def entry_stem(in_channels: int, width: int) -> nn.Sequential:
    """Stride 4: (B, C_in, H, W) -> (B, width, H/4, W/4), two conv3x3 stride 2 - BN - ReLU."""
    first = conv_bn_relu(in_channels, width)
    second = conv_bn_relu(width, width)
    first[0].stride = second[0].stride = (2, 2)
    stem = nn.Sequential(*first, *second)
    init_conv_bn(stem)
    return stem


def fpn_backbone(classifier: nn.Module, in_channels: int, entry_width: int, fpn_channels: int) -> nn.Module:
    """torchvision's ``BackboneWithFPN`` over ``entry`` + the classifier's trunk (see the module docstring)."""
    _tv_detection()
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = trunk(classifier, TRUNK)
    layers = OrderedDict([("entry", entry_stem(in_channels, entry_width)), *body.named_children()])
    features = nn.Sequential(layers)
    with torch.no_grad():
        features.eval()
        x = torch.zeros(1, in_channels, 64, 64)
        channels = []
        for name, module in features.named_children():
            x = module(x)
            if name in ("layer2", "layer3"):
                channels.append(x.shape[1])
        features.train()
    return BackboneWithFPN(features, {"layer2": "0", "layer3": "1"}, channels, fpn_channels,
                           extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))


def _detector(head: str, backbone: nn.Module, num_classes: int, in_channels: int, *, min_size: int | None,
              max_size: int | None, anchor_sizes: list[int] | None, image_mean: list[float] | None,
              image_std: list[float] | None, score_thresh: float, nms_thresh: float | None,
              detections_per_img: int | None) -> nn.Module:
    det = _tv_detection()
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if (min_size is None) != (max_size is None):
        raise ValueError("set both min_size and max_size (torchvision's resize), or neither (keep the input size)")
    mean = image_mean or (IMAGENET_MEAN if in_channels == 3 else [0.5] * in_channels)
    std = image_std or (IMAGENET_STD if in_channels == 3 else [0.25] * in_channels)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"image_mean and image_std need {in_channels} values (one per input channel)")
    extra: dict[str, Any] = {"score_thresh": score_thresh}
    if nms_thresh is not None:
        extra["nms_thresh"] = nms_thresh
    if detections_per_img is not None:
        extra["detections_per_img"] = detections_per_img
    if head == "retinanet":
        base = anchor_sizes or [2 * s for s in STRIDES]
        sizes = tuple((b, round(b * 2 ** (1 / 3)), round(b * 2 ** (2 / 3))) for b in base)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        cls = det.RetinaNet
    else:
        base = anchor_sizes or list(STRIDES)
        anchors = AnchorGenerator(tuple((b,) for b in base), ((1.0,),) * len(base))
        cls = det.FCOS
    if len(base) != len(STRIDES):
        raise ValueError(f"anchor_sizes needs {len(STRIDES)} values, one per FPN level (strides {list(STRIDES)})")
    model = cls(backbone, num_classes, min_size=min_size or 800, max_size=max_size or 1333, image_mean=mean,
                image_std=std, anchor_generator=anchors, **extra)
    if min_size is None:
        model.transform = keep_size_transform(mean, std)
    return model


def _register(head: str, backbone_name: str) -> None:
    """Register ``<head>_<backbone>``: the classifier's options, then the detector's."""
    name = f"{head}_{backbone_name}"
    make_classifier = MODELS.get(backbone_name)
    b_params, b_hints = keyword_options(make_classifier, ("num_classes", "in_channels"))
    backbone_keys = {p.name for p in b_params}

    def factory(*, num_classes: int, in_channels: int = 3, entry_width: int = 16, fpn_channels: int = 64,
                min_size: int | None = None, max_size: int | None = None, anchor_sizes: list[int] | None = None,
                image_mean: list[float] | None = None, image_std: list[float] | None = None,
                score_thresh: float = 0.05, nms_thresh: float | None = None, detections_per_img: int | None = None,
                **options: Any) -> nn.Module:
        if entry_width < 1 or fpn_channels < 1:
            raise ValueError("entry_width and fpn_channels must be positive")
        classifier = make_classifier(num_classes=1, in_channels=entry_width,
                                     **{k: v for k, v in options.items() if k in backbone_keys})
        backbone = fpn_backbone(classifier, in_channels, entry_width, fpn_channels)
        return _detector(head, backbone, num_classes, in_channels, min_size=min_size, max_size=max_size,
                         anchor_sizes=anchor_sizes, image_mean=image_mean, image_std=image_std,
                         score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img)

    hints = typing.get_type_hints(factory)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(factory).parameters.values()
           if p.kind is p.KEYWORD_ONLY]
    factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [own[0], own[1], *b_params, *own[2:]], return_annotation=nn.Module)
    factory.__annotations__ = {**{p.name: p.annotation for p in own}, **b_hints, "return": nn.Module}
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"torchvision's {'RetinaNet' if head == 'retinanet' else 'FCOS'} on the {backbone_name} "
                       "trunk behind a stride-4 entry stem, FPN levels at strides 8-64.")
    MODELS.register(name)(factory)


HEADS: tuple[str, ...] = ("retinanet", "fcos")
#: the names this module registers in MODELS, e.g. ``retinanet_resnet8``, ``fcos_resnet20``
DETECTION_MODELS: tuple[str, ...] = tuple(f"{h}_{b}" for b in DETECTION_BACKBONES for h in HEADS)

for _backbone in DETECTION_BACKBONES:
    for _head in HEADS:
        _register(_head, _backbone)


def pair_by_stride(student: dict[str, int], teacher: dict[str, int]) -> list[tuple[str, str]]:
    """Pair feature maps of equal stride: ``{point: stride}`` of each side -> ``[(student, teacher), ...]``.

    Within one stride the points pair in the given order (torchvision's mobilenet FPN has two stride-32
    levels '0' and '1'); maps with no partner of their stride are left out. In the student's order."""
    by_stride: dict[int, list[str]] = {}
    for point, stride in teacher.items():
        by_stride.setdefault(stride, []).append(point)
    pairs, used = [], {s: 0 for s in by_stride}
    for point, stride in student.items():
        candidates = by_stride.get(stride, [])
        if used.get(stride, 0) < len(candidates):
            pairs.append((point, candidates[used[stride]]))
            used[stride] += 1
    return pairs
