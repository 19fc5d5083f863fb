"""torchvision's RetinaNet, Faster R-CNN and Mask R-CNN on any torchvision ResNet FPN trunk, built as torchvision's
``*_resnet50_fpn`` builders build theirs: ``retinanet_resnet{18,34,50,101}_fpn``,
``fasterrcnn_resnet{18,34,50,101}_fpn``, ``maskrcnn_resnet{18,34,50,101}_fpn``.

torchvision ships these detectors on ResNet-50 only (``torchvision:retinanet_resnet50_fpn``, ...); a distillation
pair such as MGD's COCO RetinaNet R50 -> R18 (``shared/specs/real-scale.md`` 5.4) needs the same detector on a
smaller ResNet. Each name here builds, for its depth, what torchvision's v1 builder builds for ResNet-50:

* backbone: ``resnet_fpn_backbone`` (torchvision's public builder): ``backbone.body`` = the ResNet's stem and
  stages (module names as torchvision's: ``backbone.body.layer1`` .. ``layer4``), ``backbone.fpn`` =
  FeaturePyramidNetwork with 256 channels. RetinaNet: C3-C5 (``layer2``-``layer4``) and P6 / P7 computed from
  P5 (torchvision v1's ``LastLevelP6P7(256, 256)``), levels '0', '1', '2', 'p6', 'p7' at strides 8-128. Faster
  / Mask R-CNN: C2-C5 with a max-pooled extra level, '0', '1', '2', '3', 'pool' at strides 4-64.
* heads, anchors, losses, post-processing and the ``GeneralizedRCNNTransform``: the class's defaults
  (torchvision's COCO settings: ``min_size`` 800, ``max_size`` 1333, ImageNet mean / std, 512 sampled RoIs,
  ...). Every keyword of torchvision's class that is a number or a list (``min_size``, ``max_size``,
  ``image_mean``, ``image_std``, ``score_thresh``, ``box_detections_per_img``, ``rpn_batch_size_per_image``,
  ...: :data:`RETINANET_OPTIONS`, :data:`RCNN_OPTIONS`) is an option of the same name, null by default
  (torchvision's default); the module-valued ones (``anchor_generator``, ``rpn_head``, ``box_predictor``, ...)
  are not.
* ``weights_backbone``: torchvision's ImageNet weights of ``resnet<depth>`` by name (``"DEFAULT"``,
  ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` for 50 / 101), downloaded on first use. As torchvision does, with
  weights the trunk's BatchNorms are ``FrozenBatchNorm2d`` and ``trainable_layers`` defaults to 3 (``layer2``-
  ``layer4`` train, the stem and ``layer1`` are frozen); without, BatchNorm2d and every layer trains (5).
  ``trainable_layers`` (0-5) given explicitly is honoured either way (torchvision ignores it without weights,
  with a warning). Offline, a failed download is one :class:`~featkd.errors.FeatkdError` line naming the model
  and the weights.
* ``num_classes``: as every featkd detector, the data set's K + 1 (index 0 the background, labels 1..K; the
  R-CNNs' background class; RetinaNet leaves output 0 unused, as torchvision's COCO recipe does with 91).
* ``in_channels != 3``: the first conv is replaced as the ``torchvision:`` adapter does (RGB kernel averaged
  with weights; :func:`~featkd.models.torchvision_models.replace_first_conv`), frozen if it was, and
  ``image_mean`` / ``image_std`` default to 0.5 / 0.25 per channel.

So ``retinanet_resnet50_fpn`` is ``torchvision:retinanet_resnet50_fpn`` (same modules, names and options), which
also takes ``weights_backbone``; the other depths differ from it in the trunk alone.

Capture points: ``backbone.body.layer1`` .. ``layer4`` (post-ReLU stage outputs), the pre-ReLU residual sum of
each stage's last block as an fx node ``backbone.body.layer<i>.<last>.add`` (ResNet-18: ``layer1.1.add``,
``layer2.1.add``, ``layer3.1.add``, ``layer4.1.add``; ResNet-50: ``layer1.2.add``, ``layer2.3.add``,
``layer3.5.add``, ``layer4.2.add``): torchvision's blocks write ``out += identity`` and fx records it as ``add``;
the capture layer clones it before the in-place ReLU, so it stays pre-ReLU (what MGD distils). The detector
does not trace as a whole; these nodes are resolved inside the traceable block. FPN levels:
``backbone.fpn[0]`` ... or ``backbone.fpn[*]`` (paired by stride).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from featkd.errors import FeatkdError
from featkd.models.registry import register_factory
from featkd.models.torchvision_models import backbone_weights, downloading, replace_first_conv

#: the ResNet depths of the registered names
TV_DETECTION_DEPTHS = (18, 34, 50, 101)


#: torchvision's transform options, shared by the three classes (a ``min_size`` list: one drawn per training
#: batch, torchvision's multi-scale training)
TRANSFORM_OPTIONS: dict[str, Any] = {"min_size": int | list[int], "max_size": int, "image_mean": list[float],
                                     "image_std": list[float]}
#: RetinaNet's own keyword options (its constructor's, but the module-valued ``anchor_generator``, ``head``,
#: ``proposal_matcher``)
RETINANET_OPTIONS: dict[str, Any] = {
    **TRANSFORM_OPTIONS, "score_thresh": float, "nms_thresh": float, "detections_per_img": int,
    "fg_iou_thresh": float, "bg_iou_thresh": float, "topk_candidates": int,
}
#: FasterRCNN's and MaskRCNN's (their constructors', but ``rpn_anchor_generator``, ``rpn_head``, ``box_roi_pool``,
#: ``box_head``, ``box_predictor``, ``mask_roi_pool``, ``mask_head``, ``mask_predictor``)
RCNN_OPTIONS: dict[str, Any] = {
    **TRANSFORM_OPTIONS,
    **{f"rpn_{k}_nms_top_n_{mode}": int for k in ("pre", "post") for mode in ("train", "test")},
    "rpn_nms_thresh": float, "rpn_fg_iou_thresh": float, "rpn_bg_iou_thresh": float, "rpn_batch_size_per_image": int,
    "rpn_positive_fraction": float, "rpn_score_thresh": float, "box_score_thresh": float, "box_nms_thresh": float,
    "box_detections_per_img": int, "box_fg_iou_thresh": float, "box_bg_iou_thresh": float,
    "box_batch_size_per_image": int, "box_positive_fraction": float, "bbox_reg_weights": list[float],
}


@dataclass(frozen=True)
class TrunkDetector:
    """One detector family: torchvision's class, its options (name -> type; null: torchvision's default) and how
    its v1 ``*_resnet50_fpn`` builder cuts the ResNet."""

    title: str
    cls: str  # the class in torchvision.models.detection (imported when a model is built)
    options: dict[str, Any]
    returned_layers: tuple[int, ...]  # the ResNet stages the FPN reads
    p6p7: bool  # RetinaNet's P6 / P7 (from P5) instead of the R-CNNs' max-pooled level


#: the families, by name prefix
TRUNK_DETECTORS: dict[str, TrunkDetector] = {
    "retinanet": TrunkDetector("RetinaNet", "RetinaNet", RETINANET_OPTIONS, (2, 3, 4), True),
    "fasterrcnn": TrunkDetector("Faster R-CNN", "FasterRCNN", RCNN_OPTIONS, (1, 2, 3, 4), False),
    "maskrcnn": TrunkDetector("Mask R-CNN", "MaskRCNN", RCNN_OPTIONS, (1, 2, 3, 4), False),
}

#: the names this module registers in MODELS, e.g. ``retinanet_resnet18_fpn``
TV_DETECTION_MODELS: tuple[str, ...] = tuple(
    f"{kind}_resnet{depth}_fpn" for kind in TRUNK_DETECTORS for depth in TV_DETECTION_DEPTHS
)


def detector_class(kind: TrunkDetector) -> type[nn.Module]:
    try:
        import torchvision.models.detection as tvd
    except ImportError:
        raise FeatkdError(f"{kind.title} is torchvision's: pip install torchvision") from None
    return getattr(tvd, kind.cls)


def resnet_fpn(name: str, depth: int, kind: TrunkDetector, weights_backbone: str | None,
               trainable_layers: int | None, in_channels: int) -> nn.Module:
    """torchvision's ``BackboneWithFPN`` on ``resnet<depth>`` as its v1 builder makes it (see the module
    docstring), with the ImageNet ``weights_backbone`` downloaded when given."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    weights = backbone_weights(name, f"resnet{depth}", weights_backbone)
    pretrained = weights is not None
    layers = (3 if pretrained else 5) if trainable_layers is None else trainable_layers
    if not 0 <= layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5 (5: every layer trains), got {layers}")
    with downloading(name, "weights_backbone", weights_backbone):
        backbone = resnet_fpn_backbone(
            backbone_name=f"resnet{depth}", weights=weights,
            norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d, trainable_layers=layers,
            returned_layers=list(kind.returned_layers), extra_blocks=LastLevelP6P7(256, 256) if kind.p6p7 else None,
        )
    if in_channels != 3:
        trains = backbone.body.conv1.weight.requires_grad
        replace_first_conv(backbone.body, in_channels, pretrained=pretrained, full=name)
        backbone.body.conv1.requires_grad_(trains)
    return backbone


def _register(kind_name: str, depth: int) -> None:
    """Register ``<kind>_resnet<depth>_fpn``: featkd's options, then torchvision's class options (all null by
    default: torchvision's own defaults; only the options given reach the class). torchvision is imported when
    a model is built, not here (it is an optional dependency)."""
    name, kind = f"{kind_name}_resnet{depth}_fpn", TRUNK_DETECTORS[kind_name]

    def factory(*, num_classes: int, in_channels: int = 3, weights_backbone: str | None = None,
                trainable_layers: int | None = None, **options: Any) -> nn.Module:
        cls = detector_class(kind)  # first: a missing torchvision is the error, not a weights name
        backbone = resnet_fpn(name, depth, kind, weights_backbone, trainable_layers, in_channels)
        given = {k: v for k, v in options.items() if v is not None}
        if in_channels != 3:
            given.setdefault("image_mean", [0.5] * in_channels)
            given.setdefault("image_std", [0.25] * in_channels)
        return cls(backbone, num_classes=num_classes, **given)

    hints: dict[str, Any] = {"weights_backbone": str | None, "trainable_layers": int | None,
                             **{k: t | None for k, t in kind.options.items()}}
    kw = inspect.Parameter.KEYWORD_ONLY
    doc = (f"torchvision's {kind.title} on a ResNet-{depth} FPN trunk, as torchvision's {kind_name}_resnet50_fpn "
           "builds it (see featkd.models.tv_detection).")
    register_factory(name, factory, [inspect.Parameter(k, kw, default=None, annotation=t) for k, t in hints.items()],
                     nn.Module, doc)


for _kind in TRUNK_DETECTORS:
    for _depth in TV_DETECTION_DEPTHS:
        _register(_kind, _depth)
