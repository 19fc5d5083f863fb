"""The weight initialisation every featkd model uses (one copy; each model file calls it last in __init__)."""

from __future__ import annotations

from torch import nn


def init_weights(module: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """In ``module.modules()`` order: Kaiming-normal (fan_out, ReLU) convolutions with zero bias, BatchNorm
    weight 1 and bias 0; ``nn.Linear`` layers keep PyTorch's default unless ``linear_std`` (normal(0, std)
    weights, zero bias) or ``zero_linear_bias`` is given. One loop, so the random draws come in module order."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and (linear_std is not None or zero_linear_bias):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_conv_bn(module: nn.Module) -> None:
    """Convolutions and BatchNorms as :func:`init_weights`, linear layers untouched."""
    init_weights(module)
