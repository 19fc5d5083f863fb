"""Vectorised train augmentation of in-memory images: random crop after zero padding + horizontal flip.

The random parameters are drawn once per epoch for the WHOLE training split, from a generator seeded by
``(seed, epoch)`` only (:func:`draw_params`); each batch then looks them up by sample index
(:func:`crop_flip`). Augmentation is therefore a function of (seed, epoch, sample index): it does not depend
on the rank, the world size, the batch size or the order of the batches, and a resumed run repeats an epoch
exactly. Both steps work on uint8 images (before normalisation), on any device, with no Python loop over
samples; zero padding means black pixels, as with ``torchvision.transforms.RandomCrop(padding=p)``.

Segmentation masks (B, H, W) take the SAME offsets and flips as their images (:func:`crop_flip_masks`);
their padding is the ignore index, so padded pixels carry no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_AUG_STREAM = 0x61756720  # separates the augmentation stream from the shuffling stream (seed + epoch)


def mix_seed(*values: int) -> int:
    """A 63-bit seed derived from integers (any sign) with NumPy's SeedSequence; stable across versions."""
    entropy = [v % (1 << 64) for v in values]
    lo, hi = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


@dataclass(frozen=True)
class AugmentSpec:
    """Random crop of the original size after zero padding by ``crop_padding`` pixels, and horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def describe(self) -> str:
        parts = []
        if self.crop_padding > 0:
            parts.append(f"random crop (pad {self.crop_padding})")
        if self.hflip:
            parts.append("hflip")
        return " + ".join(parts) if parts else "none"


@dataclass(frozen=True)
class AugmentParams:
    """One epoch's parameters: ``offsets`` (N, 2) int64 (dy, dx) in [0, 2*pad]; ``flips`` (N,)."""

    offsets: Tensor
    flips: Tensor

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(self.offsets.to(device), self.flips.to(device))


def draw_params(n: int, spec: AugmentSpec, *, seed: int, epoch: int) -> AugmentParams:
    """Draw the crop offsets and flip flags of all ``n`` training samples for ``epoch`` (on the CPU)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, _AUG_STREAM))
    pad = spec.crop_padding
    offsets = (
        torch.randint(0, 2 * pad + 1, (n, 2), generator=g) if pad > 0 else torch.zeros(n, 2, dtype=torch.long)
    )
    flips = torch.rand(n, generator=g) < 0.5 if spec.hflip else torch.zeros(n, dtype=torch.bool)
    return AugmentParams(offsets, flips)


def crop_flip(x: Tensor, offsets: Tensor | None, flips: Tensor | None, pad: int, fill: int = 0) -> Tensor:
    """Crop each image of ``x`` (B, C, H, W) at ``offsets`` (B, 2) = (dy, dx) from its copy padded with
    ``fill``, then flip it horizontally where ``flips`` (B,) is true (None: no crop / no flip). The output has
    the shape and dtype of ``x``; offset ``(pad, pad)`` without flip is the identity. Vectorised: the padded
    batch is viewed as all its (2*pad+1)^2 windows (``unfold``, no copy) and one advanced index picks each
    sample's window."""
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0 and offsets is not None:
        offsets = offsets.to(dev)
        padded = F.pad(x, (pad, pad, pad, pad), value=fill)
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W)
        x = windows[torch.arange(b, device=dev), :, offsets[:, 0], offsets[:, 1]]
    if flips is None:
        return x
    return torch.where(flips.to(dev)[:, None, None, None], x.flip(3), x)


def crop_flip_masks(masks: Tensor, offsets: Tensor | None, flips: Tensor | None, pad: int, fill: int) -> Tensor:
    """:func:`crop_flip` for label masks (B, H, W): the same crop and flip as their images, padded with
    ``fill`` (the ignore index)."""
    return crop_flip(masks[:, None], offsets, flips, pad, fill)[:, 0]
