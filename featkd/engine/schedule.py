"""Learning-rate schedules as pure functions of the global iteration (stepped every iteration)."""

from __future__ import annotations

import math
from collections.abc import Callable

from featkd.config import OptimConfig
from featkd.errors import ConfigError

WARMUP_START = 0.01  # warm-up starts at lr / 100


def lr_factor(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at iteration ``it`` (0-based).

    Linear warm-up over ``warmup_epochs``, then ``constant``, ``step`` (x ``gamma`` at each milestone;
    milestones < 1 are fractions of the run, >= 1 are epochs) or ``cosine`` (to ``min_lr`` at the end).
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= total and warmup > 0:
        raise ConfigError(f"optim.warmup_epochs: {cfg.warmup_epochs:g} is not shorter than the run ({epochs} epochs); "
                          "lower optim.warmup_epochs or raise train.epochs")
    milestones = sorted(
        round((m * epochs if m < 1 else m) * steps_per_epoch) for m in cfg.milestones
    )
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(it: int) -> float:
        if it < warmup:
            return WARMUP_START + (1 - WARMUP_START) * it / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** sum(it >= m for m in milestones)
        progress = (it - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
