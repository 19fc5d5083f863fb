"""Hinton knowledge distillation (Hinton, Vinyals, Dean 2015): match the teacher's softened logits.

``loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``. The classic
"alpha" form is ``ce_weight = 1 - alpha, kd_weight = alpha``. Defaults (T = 4, 0.5 / 0.5) are the common
CIFAR recipe's temperature with equal weights; the spec's Fashion-MNIST sanity runs measured gains with
T = 2 and alpha = 0.5, and divergence with T = 4, alpha = 0.9, lr 0.05 on a BatchNorm-free CNN.
"""

from __future__ import annotations

from dataclasses import dataclass

from featkd.methods import register
from featkd.methods.base import Distiller, DistillerConfig


@dataclass
class HintonKDConfig(DistillerConfig):
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    kd_temperature: float = 4.0


@register("kd")
class HintonKD(Distiller):
    """Logit distillation only: the whole method is the shared Hinton term of :class:`Distiller`."""

    Config = HintonKDConfig

    def __init__(self, cfg: HintonKDConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        if cfg.kd_weight <= 0:
            from featkd.errors import ConfigError

            raise ConfigError("method.kd_weight: must be > 0 for method 'kd' (use method 'none' for CE only)")
