"""The models: CIFAR-style classifiers, small segmenters and detectors; ``torchvision:``, ``timm:`` and user models.

Every featkd model takes ``num_classes`` and ``in_channels`` (keyword) and its own options, returns logits
only (a tensor), uses no in-place operation and is traceable by :func:`torch.fx.symbolic_trace`.

- Classifiers return (B, K) and end with an ``nn.Linear`` classifier (last in ``named_modules()`` order,
  see :func:`classifier_name`).
- ``vit_tiny_p4`` (:mod:`featkd.models.vit`) is torchvision's ViT with 4x4 patches; unlike the CNNs it takes
  only inputs of its ``image_size`` (default 28), and its blocks output (B, 1 + h*w, C) tokens (capture them as
  ``point:tokens``, :mod:`featkd.capture.layouts`).
- Segmenters (``fcn_<backbone>``, ``deeplab_<backbone>``: :mod:`featkd.models.segmentation`) return
  (B, K, H, W) logits at the input's size and end with a 1x1 convolution.
- ``pspnet_resnet18`` / ``50`` / ``101`` (:mod:`featkd.models.pspnet`): PSPNet on a dilated torchvision ResNet
  (output stride 8); a tensor, or ``{'out': ..., 'aux': ...}`` with its auxiliary head.
- Detectors (``retinanet_<backbone>``, ``fcos_<backbone>``, ``fasterrcnn_<backbone>``, ``maskrcnn_<backbone>``:
  :mod:`featkd.models.detection`) are torchvision's RetinaNet / FCOS / Faster R-CNN / Mask R-CNN on a featkd
  trunk: a list of ``{boxes, labels, scores[, masks]}`` in eval mode, their loss dict in train mode (called
  with targets); like torchvision's, they do not trace as a whole. ``retinanet_`` / ``fasterrcnn_`` /
  ``maskrcnn_resnet{18,34,50,101}_fpn`` (:mod:`featkd.models.tv_detection`) are the same classes on torchvision's
  ResNet FPN trunks, built as torchvision's ``*_resnet50_fpn`` builders do.

Models from the user's code, ``package.module:callable`` (:mod:`featkd.models.user`), are imported and
called with their options; they only have to return an ``nn.Module`` whose output fits the task.

:func:`model_kind` tells the two apart from a built model's output (also for ``torchvision:`` segmenters,
which return ``{'out': (B, K, H, W)[, 'aux': ...]}``; :func:`segmentation_logits` takes the ``'out'``).

This package is a facade: :mod:`featkd.models.registry` holds :data:`MODELS` and the factory (a name's scheme
picks the builder), and finds the model files (each registers its models when imported); the zoo of trained
weights is :mod:`featkd.models.zoo`.

>>> model = create_model("resnet8", num_classes=10, in_channels=1, widths=[8, 16, 32])
>>> seg = create_model("fcn_resnet8", num_classes=5, in_channels=1, widths=[8, 16, 32])
"""

from __future__ import annotations

from featkd.models.detection import DETECTION_MODELS
from featkd.models.pspnet import PSPNET_MODELS
from featkd.models.registry import (
    MODELS,
    classifier_name,
    create_model,
    list_models,
    load_models,
    model_options,
    parse_model_name,
)
from featkd.models.segmentation import SEGMENTATION_MODELS, model_kind, segmentation_logits
from featkd.models.tv_detection import TV_DETECTION_MODELS

load_models()  # every model file, so MODELS is complete once featkd.models is imported

__all__ = [
    "DETECTION_MODELS",
    "MODELS",
    "PSPNET_MODELS",
    "SEGMENTATION_MODELS",
    "TV_DETECTION_MODELS",
    "classifier_name",
    "create_model",
    "list_models",
    "model_kind",
    "model_options",
    "parse_model_name",
    "segmentation_logits",
]
