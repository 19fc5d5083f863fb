"""Learning-rate schedules as pure functions of the global iteration (stepped every iteration)."""

from __future__ import annotations

import math
from collections.abc import Callable

from featkd.config import OptimConfig

WARMUP_START = 0.01  # warm-up starts at lr / 100
#: a warm-up not shorter than the run (a one-epoch trial of a recipe with warmup_epochs: 1) is cut to this
#: fraction of the run, so the run still trains at its full rate for most of it
WARMUP_FIT = 0.25


def fitted_warmup(cfg: OptimConfig, epochs: int) -> float:
    """The warm-up the schedule uses, in epochs: ``optim.warmup_epochs``, or :data:`WARMUP_FIT` of the run
    when it is not shorter than the run (the trainer warns once)."""
    if cfg.warmup_epochs > 0 and cfg.warmup_epochs >= epochs:
        return WARMUP_FIT * epochs
    return cfg.warmup_epochs


def lr_factor(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at iteration ``it`` (0-based).

    Linear warm-up over ``warmup_epochs`` (:func:`fitted_warmup`: shortened when not shorter than the run), then
    ``constant``, ``step`` (x ``gamma`` at each milestone; milestones < 1 are fractions of the run, >= 1 are
    epochs), ``cosine`` (to ``min_lr`` at the end) or ``poly`` (``(1 - progress)^power`` to ``min_lr``, as
    mmseg's PolyLR with ``eta_min``).
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = min(round(fitted_warmup(cfg, epochs) * steps_per_epoch), total - 1)  # one full-rate step at least
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
        if cfg.schedule == "poly":
            return floor + (1 - floor) * (1 - min(1.0, progress)) ** cfg.power
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
