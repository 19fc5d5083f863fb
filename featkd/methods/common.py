"""Small helpers shared by the feature methods: layer pairs, connectors and spatial alignment (``module[*]``
pairs, every level paired by stride, expand in :mod:`featkd.capture.points`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from featkd.errors import ConfigError, FeatkdError

if TYPE_CHECKING:
    from featkd.methods.base import BuildContext, Distiller


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


def use_pairs(distiller: Distiller, pairs: Sequence[Sequence[str]], ctx: BuildContext,
              key: str = "method.pairs") -> tuple[list[tuple[str, str]], dict[str, tuple[int, ...]],
                                                  dict[str, tuple[int, ...]]]:
    """Parse ``[[student_point, teacher_point], ...]``, set the distiller's capture points (each point once,
    in order), and return ``(pairs, student shapes, teacher shapes)``: per-example shapes probed on the real
    models, so a typo in a point fails at build time with its name."""
    parsed = parse_pairs(pairs, key)
    distiller.student_points = tuple(dict.fromkeys(s for s, _ in parsed))
    distiller.teacher_points = tuple(dict.fromkeys(t for _, t in parsed))
    return (parsed, ctx.feature_shapes("student", distiller.student_points),
            ctx.feature_shapes("teacher", distiller.teacher_points))


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


def conv1x1_connector(c_in: int, c_out: int, batchnorm: bool) -> nn.Module:
    """A freshly initialised 1x1 conv (C_in -> C_out), optionally followed by BatchNorm2d."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=not batchnorm)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out)) if batchnorm else conv


def channel_connectors(pairs: Sequence[tuple[str, str]], s_shapes: dict[str, tuple[int, ...]],
                       t_shapes: dict[str, tuple[int, ...]], make: Callable[[int, int], nn.Module] | None,
                       method: str, choices: str) -> nn.ModuleDict:
    """A fresh connector ``make(c_student, c_teacher)`` for each pair whose channel counts differ, keyed by the
    pair's index. ``make`` None (``connector: none``) makes such a pair an error naming ``method.connector``:
    the per-channel methods (CWD, PKD) compare channel c with channel c."""
    connectors = nn.ModuleDict()
    for i, (s, t) in enumerate(pairs):
        c_s, c_t = s_shapes[s][0], t_shapes[t][0]
        if c_s == c_t:
            continue
        if make is None:
            raise FeatkdError(f"student {s!r} has {c_s} channels and teacher {t!r} {c_t}: {method} compares channel "
                              f"by channel; set method.connector: {choices} to map the student's channels")
        connectors[str(i)] = make(c_s, c_t)
    return connectors


def connected(connectors: nn.ModuleDict, i: int, feature: Tensor) -> Tensor:
    """Pair ``i``'s student feature through its connector, if :func:`channel_connectors` gave it one."""
    return connectors[str(i)](feature) if str(i) in connectors else feature


def check_spatial(
    s_point: str, s_shape: Sequence[int], t_point: str, t_shape: Sequence[int], resize: bool,
    option: str = "method.resize_teacher",
) -> None:
    """Raise a clear error if two (C, H, W) feature shapes differ spatially and resizing is off (a point of
    (N, C) tokens gets the hint to capture it as ``POINT:tokens``, :mod:`featkd.capture.layouts`)."""
    if len(s_shape) != 3 or len(t_shape) != 3:
        tokens = [p for p, shape in ((s_point, s_shape), (t_point, t_shape)) if len(shape) == 2]
        hint = f"; for (N, C) tokens capture '{tokens[0]}:tokens' (or ':tokens=P', ':nhwc')" if tokens else ""
        raise FeatkdError(
            f"student {s_point!r} {tuple(s_shape)} and teacher {t_point!r} {tuple(t_shape)}: "
            f"expected feature maps of shape (C, H, W){hint}"
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

