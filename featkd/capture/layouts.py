"""Token and channels-last capture points as (B, C, H, W) maps: the one adapter behind a point's layout suffix.

Feature methods (MGD, CWT, FitNets, AT, CWD, PKD...) work on (B, C, H, W) maps. A transformer block's output
is a token sequence instead, and some CNN blocks keep their maps channels-last. A capture point names its
layout with a suffix, so :class:`~featkd.capture.capture.CapturingModel` hands every method (B, C, H, W) and no
method knows about tokens:

``"encoder.layers.encoder_layer_3:tokens"``
    (B, N, C) tokens (torchvision's and timm's ViT, DeiT, a flattened Swin stage): the leading class /
    distillation tokens are dropped and the remaining ``h * w`` patch tokens (row-major, as a patch
    embedding flattens them) are reshaped to (B, C, h, w). The number of leading tokens is inferred: the one
    P of 0, 1 or 2 for which ``N - P`` tokens form an h x w grid with the input's aspect ratio (``h : w = H :
    W``, so ``N - P`` a perfect square for a square input) and h, w >= 2. At most one P can fit (grids of one
    aspect differ by at least 5 tokens), so the rule never guesses between two readings; anything else is an
    error asking for the count. A grid that keeps the input's aspect only roughly (a 30 x 40 input in 4 x 4
    patches is 7 x 10) is not read: such inputs need sides the patch size divides.
``"blocks.3:tokens=1"``
    the same with exactly P leading tokens (0 for a ViT without class token, 5 for 1 class + 4 register
    tokens); the grid may be 1 x 1.
``"features.1:nhwc"``
    a (B, H, W, C) map (torchvision's Swin stages, the LayerNorm / MLP inside a ConvNeXt block) permuted to
    (B, C, H, W).

The suffix ends the point, after ``:input`` or ``[key]`` (``"norm:input:tokens"``). A point without one is
captured as it is (a CNN's (B, C, H, W) map stays untouched, a (B, C) embedding stays (B, C)): (B, N, C) and a
1-D convolution's (B, C, L) look alike, so tokens are never assumed. The adapted tensor is contiguous, and
gradients flow through it to the model. ``CapturingModel.shapes`` holds the adapted shape (C, h, w).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor

from featkd.errors import FeatkdError

AUTO_PREFIXES = (0, 1, 2)  # leading tokens ':tokens' tries: none, a class token, class + distillation token
_SUFFIX = re.compile(r"^(?P<base>.+):(?P<layout>tokens(?:=(?P<prefix>\d+))?|nhwc)$")
_LOOKS_LIKE = re.compile(r"^.+:(tokens|nhwc)\b.*$")  # a malformed suffix such as ':tokens=x' or ':nhwc2'
SUFFIXES = "':tokens', ':tokens=P' (P >= 0 leading tokens) or ':nhwc'"


@dataclass(frozen=True)
class Layout:
    """How a captured tensor becomes (B, C, H, W): ``kind`` 'tokens' (``prefix`` leading tokens dropped,
    None = inferred from the shape) or 'nhwc'."""

    kind: str
    prefix: int | None = None

    @property
    def suffix(self) -> str:
        if self.kind == "nhwc":
            return ":nhwc"
        return ":tokens" if self.prefix is None else f":tokens={self.prefix}"


def split_point(point: str) -> tuple[str, Layout | None]:
    """``'blocks.3:tokens=1'`` -> ``('blocks.3', Layout('tokens', 1))``; a point without a layout suffix ->
    ``(point, None)``. A malformed suffix (``':tokens=x'``) is a one-line error naming the point."""
    match = _SUFFIX.match(point)
    if match is None:
        if _LOOKS_LIKE.match(point):
            raise FeatkdError(f"capture point {point!r}: a layout suffix ends the point and is {SUFFIXES}")
        return point, None
    if match["layout"] == "nhwc":
        return match["base"], Layout("nhwc")
    prefix = match["prefix"]
    return match["base"], Layout("tokens", None if prefix is None else int(prefix))


@lru_cache(maxsize=256)
def token_grid(n: int, input_hw: tuple[int, int] | None, prefix: int | None) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` reading ``n`` tokens as ``prefix`` leading tokens + an h x w patch grid with the
    aspect ratio of an H x W input (``input_hw``; None: square), or None when no reading fits. ``prefix``
    None: inferred from :data:`AUTO_PREFIXES` with h, w >= 2 (see the module docstring)."""
    a, b = (1, 1) if input_hw is None else input_hw
    g = math.gcd(a, b)
    a, b = a // g, b // g
    fits = []
    for p in AUTO_PREFIXES if prefix is None else (prefix,):
        cells = n - p
        if cells < 1 or cells % (a * b):
            continue
        k = math.isqrt(cells // (a * b))
        h, w = k * a, k * b
        if h * w == cells and (prefix is not None or min(h, w) >= 2):
            fits.append((p, h, w))
    return fits[0] if len(fits) == 1 else None


def fitting_prefixes(n: int, input_hw: tuple[int, int] | None, limit: int = 2) -> list[tuple[int, int, int]]:
    """Up to ``limit`` readings ``(P, h, w)`` of ``n`` tokens as P >= 0 leading tokens + an h x w patch grid with
    the aspect ratio of an H x W input (None: square), fewest leading tokens first; grids with h, w >= 2 only,
    unless none fits (then the one-patch-wide reading, if any). Empty: no number of leading tokens fits."""
    a, b = (1, 1) if input_hw is None else input_hw
    g = math.gcd(a, b)
    a, b = a // g, b // g
    readings = [(n - k * k * a * b, k * a, k * b) for k in range(math.isqrt(n // (a * b)), 0, -1)]
    wide = [r for r in readings if min(r[1], r[2]) >= 2]
    return (wide or readings)[:limit]


def _prefix_hint(n: int, base: str, input_hw: tuple[int, int] | None) -> str:
    """``"'blk:tokens=3' (3 + 7x7)"`` for the numbers of leading tokens that fit, or a sentence saying none does."""
    fits = fitting_prefixes(n, input_hw)
    if not fits:
        return f"no number of leading tokens leaves such a grid of {n} tokens"
    return " or ".join(f"'{base}:tokens={p}' ({p} + {h}x{w})" for p, h, w in fits) + " fits"


def to_map(tensor: Tensor, layout: Layout, point: str, input_hw: tuple[int, int] | None) -> Tensor:
    """``tensor`` captured at ``point`` (the full name, for errors) as a contiguous (B, C, H, W) map.

    ``input_hw``: the spatial size of the model's input, whose aspect ratio the patch grid has (None:
    square). Shapes that cannot be adapted raise a one-line :class:`FeatkdError` naming the point.
    """
    shape = tuple(tensor.shape)
    if layout.kind == "nhwc":
        if tensor.ndim != 4:
            raise FeatkdError(f"capture point {point!r}: ':nhwc' expects a (B, H, W, C) map, got shape {shape}")
        return tensor.permute(0, 3, 1, 2).contiguous()
    if tensor.ndim != 3:
        raise FeatkdError(f"capture point {point!r}: ':tokens' expects (B, N, C) tokens, got shape {shape}")
    batch, n, channels = shape
    grid = token_grid(n, input_hw, layout.prefix)
    if grid is None:
        aspect = "a square" if input_hw is None else f"the input's {input_hw[0]}:{input_hw[1]}"
        hint = _prefix_hint(n, point.rsplit(":", 1)[0], input_hw)
        if layout.prefix is None:
            raise FeatkdError(
                f"capture point {point!r}: {n} tokens (shape {shape}) are not 0, 1 or 2 leading tokens + an h x w "
                f"patch grid (h, w >= 2) of {aspect} aspect; give the number of leading tokens: {hint}"
            )
        raise FeatkdError(
            f"capture point {point!r}: {n} tokens (shape {shape}) less {layout.prefix} leading tokens do not form "
            f"an h x w patch grid of {aspect} aspect; {hint}"
        )
    prefix, h, w = grid
    return tensor[:, prefix:].transpose(1, 2).reshape(batch, channels, h, w).contiguous()


def token_hint(shape: tuple[int, ...] | None, input_hw: tuple[int, int]) -> str:
    """For ``featkd layers``: ``'1+7x7'`` when a per-example shape (N, C) reads as tokens under ``:tokens``
    (leading tokens + patch grid of an ``input_hw`` input), else ``''``."""
    if shape is None or len(shape) != 2:
        return ""
    grid = token_grid(shape[0], tuple(input_hw), None)
    return "" if grid is None else f"{grid[0]}+{grid[1]}x{grid[2]}"
