"""No distillation: the student trained with cross-entropy alone (the baseline every table starts from)."""

from __future__ import annotations

from dataclasses import dataclass

from featkd.methods import register
from featkd.methods.base import Distiller, DistillerConfig


@dataclass
class NoDistillationConfig(DistillerConfig):
    """Only ``ce_weight`` matters; a Hinton term here would need a teacher, so it stays off."""


@register("none")
class NoDistillation(Distiller):
    """Cross-entropy only. Also what ``featkd train`` uses to train a teacher."""

    Config = NoDistillationConfig
    needs_teacher = False
