"""Small pure helpers shared by the feature methods: layer pairs and spatial alignment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from featkd.errors import ConfigError, FeatkdError

if TYPE_CHECKING:
    from featkd.methods.base import BuildContext


def parse_pairs(pairs: Sequence[Sequence[str]], key: str = "method.pairs") -> list[tuple[str, str]]:
    """``[[student_point, teacher_point], ...]`` -> list of tuples, with a clear error for bad entries."""
    if not pairs:
        raise ConfigError(f"{key}: give at least one [student_point, teacher_point] pair "
                          "(`featkd layers MODEL` lists the points)")
    out = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise ConfigError(f"{key}[{i}]: expected [student_point, teacher_point], got {pair!r}")
        out.append((pair[0], pair[1]))
    return out


def embedding_pairs(pairs: Sequence[Sequence[str]], ctx: BuildContext) -> list[tuple[str, str]]:
    """The configured pairs, or by default the classifiers' inputs ``[["fc:input", "fc:input"]]``.

    Checks every point against both models at build time, so a typo fails before training with its name.
    """
    from featkd.models import classifier_name

    if pairs:
        out = parse_pairs(pairs)
    else:
        out = [(f"{classifier_name(ctx.student)}:input", f"{classifier_name(ctx.teacher)}:input")]
    ctx.feature_shapes("student", [s for s, _ in out])
    ctx.feature_shapes("teacher", [t for _, t in out])
    return out


def check_spatial(
    s_point: str, s_shape: Sequence[int], t_point: str, t_shape: Sequence[int], resize: bool,
    option: str = "method.resize_teacher",
) -> None:
    """Raise a clear error if two (C, H, W) feature shapes differ spatially and resizing is off."""
    if len(s_shape) != 3 or len(t_shape) != 3:
        raise FeatkdError(
            f"student {s_point!r} {tuple(s_shape)} and teacher {t_point!r} {tuple(t_shape)}: "
            "expected feature maps of shape (C, H, W)"
        )
    if tuple(s_shape[1:]) != tuple(t_shape[1:]) and not resize:
        raise FeatkdError(
            f"spatial sizes differ: student {s_point!r} is {tuple(s_shape)}, teacher {t_point!r} is "
            f"{tuple(t_shape)}; pick points of equal size or set {option}: true"
        )


def resize_like(t: Tensor, size: Sequence[int]) -> Tensor:
    """Adaptive-average-pool a teacher map (B, C, H, W) to spatial ``size`` (no-op if already there)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.adaptive_avg_pool2d(t, tuple(size))
