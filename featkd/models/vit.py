"""A small Vision Transformer for 28 x 28 inputs: torchvision's ``VisionTransformer`` with 4 x 4 patches.

``vit_tiny_p4`` is ``torchvision.models.vision_transformer.VisionTransformer`` itself (module names,
``state_dict`` keys and initialisation are torchvision's), built with ``patch_size=4`` for ``image_size``
inputs (default 28: a 7 x 7 patch grid, 49 patch tokens after the class token) and ``in_channels`` input
channels: torchvision's patch embedding ``conv_proj`` takes 3, so for another count it is replaced by the same
4 x 4 / stride-4 convolution with ``in_channels`` inputs and torchvision's initialisation of it (truncated
normal, std ``sqrt(1 / fan_in)``, zero bias). Defaults: 4 encoder blocks, width 64, 4 heads, MLP width 2 x 64.

Unlike the CNNs, the model takes only inputs of its ``image_size`` (torchvision asserts it). Its blocks
``encoder.layers.encoder_layer_{i}`` (and ``encoder.ln``) output (B, 1 + 49, C) tokens: capture them as
``encoder.layers.encoder_layer_3:tokens`` to get (B, C, 7, 7) maps (:mod:`featkd.capture.layouts`). The classifier is
``heads.head`` (the last ``nn.Linear``), fed with the class token; it is zero-initialised, as torchvision does.
"""

from __future__ import annotations

import math

from torch import nn

from featkd.errors import FeatkdError
from featkd.models.registry import MODELS

PATCH_SIZE = 4


@MODELS.register("vit_tiny_p4")
def vit_tiny_p4(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 28,
    num_layers: int = 4,
    hidden_dim: int = 64,
    num_heads: int = 4,
    mlp_dim: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ViT with 4 x 4 patches (see the module docstring); ``mlp_dim`` defaults to 2 x hidden_dim."""
    try:
        from torchvision.models import vision_transformer
    except ImportError:
        raise FeatkdError("model 'vit_tiny_p4' is torchvision's VisionTransformer: pip install torchvision") from None
    if image_size < PATCH_SIZE or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of the patch size {PATCH_SIZE}, got {image_size}")
    if min(num_layers, hidden_dim, num_heads) < 1 or hidden_dim % num_heads:
        raise ValueError(f"num_layers, hidden_dim and num_heads must be positive and hidden_dim divisible by "
                         f"num_heads, got {num_layers}, {hidden_dim}, {num_heads}")
    model = vision_transformer.VisionTransformer(
        image_size=image_size, patch_size=PATCH_SIZE, num_layers=num_layers, num_heads=num_heads,
        hidden_dim=hidden_dim, mlp_dim=mlp_dim or 2 * hidden_dim, dropout=dropout, num_classes=num_classes)
    if in_channels != 3:
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / (in_channels * PATCH_SIZE * PATCH_SIZE)))
        nn.init.zeros_(conv.bias)
        model.conv_proj = conv
    return model
