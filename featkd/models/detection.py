"""Small CPU detectors: torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN on a featkd trunk behind a
stride-4 entry stem.

``retinanet_<backbone>``, ``fcos_<backbone>``, ``fasterrcnn_<backbone>`` and ``maskrcnn_<backbone>`` for the
CIFAR ResNets of :data:`DETECTION_BACKBONES`. The model IS torchvision's
:class:`~torchvision.models.detection.RetinaNet` / ``FCOS`` / ``FasterRCNN`` / ``MaskRCNN`` (its heads, losses,
anchor matching, sampling, box coding, post-processing and ``GeneralizedRCNNTransform``), every kind built on
the same backbone (:func:`fpn_backbone`); what differs per kind is one :class:`DetectorKind` in
:data:`DETECTORS` (torchvision's class and the kind's own options)::

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
on 96-128 px canvases); the R-CNNs' RPN the same anchors (torchvision's FPN R-CNNs: one scale per level, 8x
the stride); FCOS one point per location, with torchvision's level assignment from ``anchor_sizes`` (default
the strides 8-64). ``score_thresh`` defaults to 0.05 for every kind (torchvision's RetinaNet and R-CNN
value; its FCOS uses 0.2, which hides the low-confidence detections AP needs early in training);
``score_thresh`` / ``nms_thresh`` / ``detections_per_img`` are the R-CNNs' ``box_*`` settings.

Two-stage heads (:class:`RCNNHeads`, :class:`MaskHeads`; each field is a model option): the RPN on all four
levels, RoIs pooled from '0' and '1' (:data:`ROI_LEVELS`; torchvision's level rule, canonical 224 px at
level 4, sends every RoI under 112 px to '0', so on the scenes they all come from stride 8) by RoIAlign
with adaptive sampling, 7x7 for the box head, 14x14 for the mask head. Lighter than torchvision's COCO
defaults, for 96-128 px canvases with 1-4 objects: 32 sampled RoIs per image (512), a 256-wide box MLP
(1024), 600 / 300 RPN proposals per level / image in training (2000 / 2000), 300 / 100 in evaluation
(1000 / 1000), 64 RPN anchors sampled per image (256), a mask head of two 32-channel convs and a
32-channel deconvolution (four 256-channel convs, 256). The RoI-level points (``roi_heads.box_head``,
``roi_heads.mask_head``) are per RoI, not per image: distil the backbone and FPN points.

Resizing: ``min_size`` / ``max_size`` null (the default) keeps the input size: the transform only
normalises and pads to a multiple of 32 (:class:`KeepSizeTransform`); set both for torchvision's resize
(shorter side to ``min_size``, longer at most ``max_size``). Normalisation inside: ``image_mean`` /
``image_std`` (default ImageNet's for 3 channels, 0.5 / 0.25 otherwise); detection batches are in [0, 1].

Cost (measured on this 2-core CPU, one thread, batch 16, random weights, two boxes per image, train step =
forward + backward + SGD, median of 4; noisy: other jobs ran beside it, load ~3.5): at 128 px
``retinanet_resnet8`` 16.4 ms / image, ``fcos_resnet8`` 14.4, ``retinanet_resnet20`` 21.1, ``fcos_resnet20``
16.6; at 96 px 9.0, 7.9, 11.3, 9.7 ms. Eval forward (with post-processing) 3-11 ms / image. Below the 54-58
ms of ``shared/specs/dense.md``, whose stem and FPN levels are not recorded; these FPNs have no stride-4
level. The R-CNNs with the default heads, at 96 px on real scenes (CPU time, one thread, batch 16, AdamW,
median of 15 steps of a training run): ``maskrcnn_resnet20`` 26 ms / image, ``maskrcnn_resnet8`` with
``widths=[8, 16, 32]`` 22 (the heads dominate), ``fasterrcnn_resnet20`` 27 with 64 sampled RoIs; Mask
R-CNN's eval 35-90 ms / image, growing with the detections (torchvision pastes each mask in a Python
loop). Heavier heads (64 sampled RoIs, 64-channel mask layers, sampling ratio 2) cost 1.4-2.5x as much
(``docs/models/detection.md``); torchvision's COCO sizes were not measured.

Number of classes: every featkd detection data set has ``num_classes = K + 1`` (index 0 the background,
labels 1..K). torchvision's two-stage and SSD detectors use index 0 as their background class; RetinaNet
and FCOS (sigmoid heads, no background class) leave output 0 unused, as torchvision's own COCO recipe does
with its 91 classes.
"""

from __future__ import annotations

import inspect
import typing
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

import featkd.models.resnet_cifar  # noqa: F401  (registers the backbones' classifiers)
from featkd.errors import FeatkdError
from featkd.models.registry import MODELS
from featkd.models.segmentation import conv_bn_relu, init_conv_bn, keyword_options, trunk
from featkd.modes import eval_mode

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRUNK = ("conv1", "bn1", "relu", "layer1", "layer2", "layer3")  # the CIFAR ResNets' feature layers
DETECTION_BACKBONES = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4")
STRIDES = (8, 16, 32, 64)  # of the FPN levels '0', '1', 'p6', 'p7'
ROI_LEVELS = ("0", "1")  # the levels the R-CNNs pool RoIs from (strides 8 and 16)


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


def keep_input_size(model: nn.Module) -> bool:
    """Replace a torchvision-style detector's resizing transform by :func:`keep_size_transform` (same mean and
    std); True when it was replaced. For data that is already resized (``data.resize_short``): the detector's own
    ``min_size`` resize would scale every image again (the multi-scale draw lost, small images enlarged)."""
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:
        return False
    t = getattr(model, "transform", None)
    if not isinstance(t, GeneralizedRCNNTransform) or getattr(t, "keeps_size", False):
        return False
    model.transform = keep_size_transform(t.image_mean, t.image_std)
    return True


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
    with torch.no_grad(), eval_mode(features):  # a probe for the channels: no BatchNorm statistics update
        x = torch.zeros(1, in_channels, 64, 64)
        channels = []
        for name, module in features.named_children():
            x = module(x)
            if name in ("layer2", "layer3"):
                channels.append(x.shape[1])
    return BackboneWithFPN(features, {"layer2": "0", "layer3": "1"}, channels, fpn_channels,
                           extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))


def image_transform(in_channels: int, min_size: int | None, max_size: int | None, image_mean: list[float] | None,
                    image_std: list[float] | None) -> dict[str, Any]:
    """The keyword arguments that set up a torchvision detector's ``GeneralizedRCNNTransform`` (see the
    module docstring: null sizes keep the input size, replaced by :func:`keep_size_transform` after)."""
    if (min_size is None) != (max_size is None):
        raise ValueError("set both min_size and max_size (torchvision's resize), or neither (keep the input size)")
    mean = image_mean or (IMAGENET_MEAN if in_channels == 3 else [0.5] * in_channels)
    std = image_std or (IMAGENET_STD if in_channels == 3 else [0.25] * in_channels)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"image_mean and image_std need {in_channels} values (one per input channel)")
    return {"min_size": min_size or 800, "max_size": max_size or 1333, "image_mean": mean, "image_std": std}


def _per_level(values: Sequence[int] | None, default: Sequence[int]) -> list[int]:
    out = list(values or default)
    if len(out) != len(STRIDES):
        raise ValueError(f"anchor_sizes needs {len(STRIDES)} values, one per FPN level (strides {list(STRIDES)})")
    return out


def box_anchors(anchor_sizes: Sequence[int] | None) -> Any:
    """RetinaNet's anchors, also the R-CNNs' RPN's: per FPN level 3 scales (``b``, ``b 2^(1/3)``,
    ``b 2^(2/3)``) x 3 aspect ratios (0.5, 1, 2), base sizes ``anchor_sizes`` (default twice the strides)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    base = _per_level(anchor_sizes, [2 * s for s in STRIDES])
    sizes = tuple((b, round(b * 2 ** (1 / 3)), round(b * 2 ** (2 / 3))) for b in base)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def point_anchors(anchor_sizes: Sequence[int] | None) -> Any:
    """FCOS's: one point per location; ``anchor_sizes`` (default the strides) set torchvision's level
    assignment."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    base = _per_level(anchor_sizes, STRIDES)
    return AnchorGenerator(tuple((b,) for b in base), ((1.0,),) * len(base))


@dataclass(frozen=True)
class RCNNHeads:
    """The two-stage detectors' own options (``fasterrcnn_`` / ``maskrcnn_``): lighter than torchvision's
    COCO defaults (in the comments), sized for 96-128 px canvases with 1-4 objects, where the four FPN
    levels hold 1,737 anchors (96 px) instead of COCO's ~200,000."""

    rpn_pre_nms_top_n_train: int = 600  # (2000) best-scoring anchors kept per FPN level before the RPN's NMS
    rpn_post_nms_top_n_train: int = 300  # (2000) proposals per image after it
    rpn_pre_nms_top_n_test: int = 300  # (1000)
    rpn_post_nms_top_n_test: int = 100  # (1000)
    rpn_batch_size_per_image: int = 64  # (256) anchors sampled per image for the RPN's losses
    box_batch_size_per_image: int = 32  # (512) proposals sampled per image for the box head's losses, a
    # quarter of them positive (at most 8 per image for 1-4 objects); the mask head trains on those positives
    representation_size: int = 256  # (1024) width of the box head's two-layer MLP (TwoMLPHead)
    sampling_ratio: int = 0  # (2) RoIAlign's points per bin and axis; 0: adaptive, ceil(RoI size / bins)
    # (Detectron2's default): 1 for the scenes' 3-6 cell RoIs at stride 8, where 2 costs 4x for nothing

    def validate(self) -> None:
        """ValueError (create_model's one-line error) for a value out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            values = list(value) if isinstance(value, Sequence) else [value]
            if not values:
                raise ValueError(f"{f.name} needs at least one value")
            if f.name == "sampling_ratio" and value < 0:
                raise ValueError(f"sampling_ratio must be >= 0 (0: adaptive), got {value}")
            if f.name != "sampling_ratio" and min(values) < 1:
                raise ValueError(f"{f.name} must be positive, got {value!r}")


@dataclass(frozen=True)
class MaskHeads(RCNNHeads):
    """Mask R-CNN's options: the R-CNN's, and a lighter mask head (torchvision: four 256-channel convs and a
    256-channel deconvolution on 14x14 RoIs, masks 28x28)."""

    mask_layers: tuple[int, ...] = (32, 32)  # ((256, 256, 256, 256)) conv3x3-ReLU widths on the 14x14 RoI maps
    mask_dim_reduced: int = 32  # (256) channels of the 2x deconvolution before the per-class 1x1 mask logits


def _rcnn_parts(backbone: nn.Module, num_classes: int, anchor_sizes: Sequence[int] | None,
                heads: RCNNHeads, post: dict[str, Any]) -> dict[str, Any]:
    """FasterRCNN's (and MaskRCNN's) keyword arguments for ``heads``: RPN on every level, RoIs from '0', '1'."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    pool = MultiScaleRoIAlign(list(ROI_LEVELS), output_size=7, sampling_ratio=heads.sampling_ratio)
    return {
        "rpn_anchor_generator": box_anchors(anchor_sizes),
        **{f.name: getattr(heads, f.name) for f in fields(RCNNHeads) if f.name.startswith(("rpn_", "box_"))},
        "box_roi_pool": pool,
        "box_head": TwoMLPHead(backbone.out_channels * 7 * 7, heads.representation_size),
        "box_predictor": FastRCNNPredictor(heads.representation_size, num_classes),
        **{f"box_{k}": v for k, v in post.items()},
    }


def _retinanet(backbone: nn.Module, num_classes: int, transform: dict[str, Any], post: dict[str, Any],
               anchor_sizes: Sequence[int] | None, heads: None) -> nn.Module:
    return _tv_detection().RetinaNet(backbone, num_classes, anchor_generator=box_anchors(anchor_sizes), **transform,
                                     **post)


def _fcos(backbone: nn.Module, num_classes: int, transform: dict[str, Any], post: dict[str, Any],
          anchor_sizes: Sequence[int] | None, heads: None) -> nn.Module:
    return _tv_detection().FCOS(backbone, num_classes, anchor_generator=point_anchors(anchor_sizes), **transform,
                                **post)


def _fasterrcnn(backbone: nn.Module, num_classes: int, transform: dict[str, Any], post: dict[str, Any],
                anchor_sizes: Sequence[int] | None, heads: RCNNHeads) -> nn.Module:
    return _tv_detection().FasterRCNN(backbone, None, **transform,
                                      **_rcnn_parts(backbone, num_classes, anchor_sizes, heads, post))


def _maskrcnn(backbone: nn.Module, num_classes: int, transform: dict[str, Any], post: dict[str, Any],
              anchor_sizes: Sequence[int] | None, heads: MaskHeads) -> nn.Module:
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    parts = _rcnn_parts(backbone, num_classes, anchor_sizes, heads, post)
    return _tv_detection().MaskRCNN(
        backbone, None, **transform, **parts,
        mask_roi_pool=MultiScaleRoIAlign(list(ROI_LEVELS), output_size=14, sampling_ratio=heads.sampling_ratio),
        mask_head=MaskRCNNHeads(backbone.out_channels, list(heads.mask_layers), 1),
        mask_predictor=MaskRCNNPredictor(heads.mask_layers[-1], heads.mask_dim_reduced, num_classes),
    )


@dataclass(frozen=True)
class DetectorKind:
    """What differs between ``retinanet_``, ``fcos_``, ``fasterrcnn_`` and ``maskrcnn_``: torchvision's class
    built on the shared backbone (``build``) and the kind's own options (a frozen dataclass, or None)."""

    title: str
    build: Callable[..., nn.Module]  # (backbone, num_classes, transform kwargs, post kwargs, anchor_sizes, heads)
    options: type[RCNNHeads] | None = None


#: the detector kinds, by name prefix
DETECTORS: dict[str, DetectorKind] = {
    "retinanet": DetectorKind("RetinaNet", _retinanet),
    "fcos": DetectorKind("FCOS", _fcos),
    "fasterrcnn": DetectorKind("Faster R-CNN", _fasterrcnn, RCNNHeads),
    "maskrcnn": DetectorKind("Mask R-CNN", _maskrcnn, MaskHeads),
}


def _register(kind_name: str, backbone_name: str) -> None:
    """Register ``<kind>_<backbone>``: the shared options, the classifier's, then the kind's own."""
    name, kind = f"{kind_name}_{backbone_name}", DETECTORS[kind_name]
    make_classifier = MODELS.get(backbone_name)
    b_params, b_hints = keyword_options(make_classifier, ("num_classes", "in_channels"))
    h_params, h_hints = keyword_options(kind.options, ()) if kind.options else ([], {})
    backbone_keys, head_keys = {p.name for p in b_params}, set(h_hints)

    def factory(*, num_classes: int, in_channels: int = 3, entry_width: int = 16, fpn_channels: int = 64,
                min_size: int | None = None, max_size: int | None = None, anchor_sizes: list[int] | None = None,
                image_mean: list[float] | None = None, image_std: list[float] | None = None,
                score_thresh: float = 0.05, nms_thresh: float | None = None, detections_per_img: int | None = None,
                **options: Any) -> nn.Module:
        if entry_width < 1 or fpn_channels < 1:
            raise ValueError("entry_width and fpn_channels must be positive")
        heads = None
        if kind.options is not None:
            heads = kind.options(**{k: v for k, v in options.items() if k in head_keys})
            heads.validate()
        classifier = make_classifier(num_classes=1, in_channels=entry_width,
                                     **{k: v for k, v in options.items() if k in backbone_keys})
        backbone = fpn_backbone(classifier, in_channels, entry_width, fpn_channels)
        transform = image_transform(in_channels, min_size, max_size, image_mean, image_std)
        post: dict[str, Any] = {"score_thresh": score_thresh}
        if nms_thresh is not None:
            post["nms_thresh"] = nms_thresh
        if detections_per_img is not None:
            post["detections_per_img"] = detections_per_img
        model = kind.build(backbone, num_classes, transform, post, anchor_sizes, heads)
        if min_size is None:
            model.transform = keep_size_transform(transform["image_mean"], transform["image_std"])
        return model

    hints = typing.get_type_hints(factory)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(factory).parameters.values()
           if p.kind is p.KEYWORD_ONLY]
    factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [own[0], own[1], *b_params, *own[2:], *h_params], return_annotation=nn.Module)
    factory.__annotations__ = {**{p.name: p.annotation for p in own}, **b_hints, **h_hints, "return": nn.Module}
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"torchvision's {kind.title} on the {backbone_name} trunk behind a stride-4 entry stem, "
                       "FPN levels at strides 8-64.")
    MODELS.register(name)(factory)


HEADS: tuple[str, ...] = tuple(DETECTORS)
#: the names this module registers in MODELS, e.g. ``retinanet_resnet8``, ``maskrcnn_resnet20``
DETECTION_MODELS: tuple[str, ...] = tuple(f"{h}_{b}" for b in DETECTION_BACKBONES for h in HEADS)

for _backbone in DETECTION_BACKBONES:
    for _head in HEADS:
        _register(_head, _backbone)

