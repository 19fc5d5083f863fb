"""Loaders: batches of ``(x, y)`` already on the target device, with DistributedSampler sharding semantics.

Every loader follows the :class:`Loader` protocol. ``batch_size`` is always the GLOBAL batch: each of the
``world_size`` ranks yields batches of ``batch_size // world_size`` samples.

* Training order (:func:`train_shard_indices`) is exactly that of ``DistributedSampler(shuffle=True)``:
  epoch ``e`` uses ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``, padded by
  repeating its head to a multiple of ``world_size``; rank ``r`` takes ``perm[r::world_size]``. So the
  union of the ranks' batch ``b`` is the single-process batch ``b`` (as a set) for every full batch.
* Evaluation order (:func:`eval_shard_indices`) is fixed, unpadded: rank ``r`` takes
  ``indices[r::world_size]`` and keeps its last partial batch, so summing per-rank counts covers every sample
  exactly once. Ranks may then yield different numbers of batches: only all-reduce after the loop.

Labels are class ids (B,) for classification or masks (B, H, W) for segmentation, both int64 on the device;
a classification set with mixup / cutmix (``data.mixup_alpha`` / ``cutmix_alpha``) yields soft training targets
(B, K) float32 instead (:func:`featkd.data.augment.mix_batch`).

A training loader whose batches are a function of (seed, epoch, batch index) alone, whatever the run's RNG,
says so with ``replayable = True`` (every featkd loader): the teacher cache (``train.teacher_cache``) replays
only those.

Every loader also records, in ``batch_indices``, the (B,) int64 indices into its split of the batch it
yielded last (set before each yield, on the device); iteration stays ``(x, y)`` (methods with a per-sample
memory read them: ``Distiller.needs_indices``). The loaders of data read from disk per sample are in
:mod:`featkd.data.streaming`.
In-memory masks are stored as uint8 (values ``0..num_classes-1`` or the ignore index, so at most 255
classes) and widened per batch; train augmentation crops and flips a mask exactly like its image and pads it
with the ignore index (:func:`featkd.data.augment.crop_flip_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from featkd.data.augment import (
    AugmentParams,
    AugmentSpec,
    MixSpec,
    apply_policy,
    crop_flip,
    crop_flip_masks,
    draw_params,
    mix_batch,
    policy_transform,
)
from featkd.errors import FeatkdError

Device = str | torch.device


@runtime_checkable
class Loader(Protocol):
    """What every loader returns: ``x`` float32 normalised (B, C, H, W), ``y`` int64 (B,) class ids or
    (B, H, W) masks, on the device (detection: ``x`` in [0, 1] and ``y`` a list of target dicts,
    :mod:`featkd.data.detection`)."""

    num_samples: int  # samples this rank yields per epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...  # batches per epoch on this rank

    def set_epoch(self, epoch: int) -> None: ...


def canonical_device(device: Device) -> torch.device:
    """``torch.device`` with the current CUDA index filled in, so "cuda" and "cuda:0" share cached tensors."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def per_rank_batch(batch_size: int, world_size: int, rank: int) -> int:
    """The per-rank batch size; a one-line FeatkdError for impossible combinations."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise FeatkdError(f"invalid rank {rank} for world_size {world_size}")
    if batch_size < 1:
        raise FeatkdError(f"batch size must be positive, got {batch_size}")
    if batch_size % world_size:
        raise FeatkdError(
            f"batch size {batch_size} is not divisible by the world size {world_size} "
            f"(the batch size is global: each rank gets batch_size / world_size)"
        )
    return batch_size // world_size


def train_shard_indices(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's sample indices for one training epoch, identical to ``DistributedSampler(shuffle=True,
    seed=seed, drop_last=False)`` after ``set_epoch(epoch)``."""
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    total = math.ceil(n / world_size) * world_size
    if total > n:
        perm = torch.cat([perm] * math.ceil(total / n))[:total]
    return perm[rank::world_size]


def eval_shard_indices(indices: Tensor, *, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's share of a fixed evaluation order: ``indices[rank::world_size]``, no padding."""
    return indices[rank::world_size]


def _split_batches(n: int, batch: int, drop_last: bool) -> int:
    return n // batch if drop_last else math.ceil(n / batch)


class Normalizer:
    """``(x.float() / max_value - mean) / std`` per channel, as one multiply-add on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], max_value: float) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.max_value = float(max_value)
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        scale, shift = self._consts(x.device)
        return torch.addcmul(shift, x.float(), scale)

    def _consts(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._cache:
            mean = torch.tensor(self.mean, dtype=torch.float64)
            std = torch.tensor(self.std, dtype=torch.float64)
            scale = (1.0 / (self.max_value * std)).float().view(1, -1, 1, 1).to(device)
            shift = (-mean / std).float().view(1, -1, 1, 1).to(device)
            self._cache[device] = (scale, shift)
        return self._cache[device]


class TensorSplit:
    """A split held in memory, copied to each device once: uint8 images (N, C, H, W) and either int64 class
    labels (N,) or uint8 masks (N, H, W) whose value ``ignore_index`` marks unlabelled pixels (it is also
    the padding value of a random crop)."""

    def __init__(self, images: Tensor, labels: Tensor, *, ignore_index: int = 255) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        n, _, h, w = images.shape
        self.dense = labels.ndim == 3
        if self.dense:
            if labels.shape != (n, h, w) or labels.dtype != torch.uint8:
                raise ValueError(f"masks must be uint8 {(n, h, w)}, got {labels.dtype} {tuple(labels.shape)}")
            self.labels = labels.contiguous()
        else:
            if labels.shape != (n,):
                raise ValueError(f"labels {tuple(labels.shape)} do not match {n} images")
            self.labels = labels.long().contiguous()
        self.images = images.contiguous()
        self.ignore_index = ignore_index
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return self.labels.shape[0]

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device.type == "cpu":
            return self.images, self.labels
        if device not in self._on_device:
            self._on_device[device] = (self.images.to(device), self.labels.to(device))
        return self._on_device[device]


class InMemoryTrainLoader:
    """Shuffled, sharded, augmented (and mixed: ``mix``) batches from a :class:`TensorSplit`; no DataLoader, no
    workers."""

    replayable = True  # batches depend on (seed, epoch, batch index) alone

    def __init__(
        self,
        split: TensorSplit,
        normalize: Normalizer,
        augment: AugmentSpec,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: Device = "cpu",
        drop_last: bool = True,
        mix: MixSpec | None = None,
    ) -> None:
        self.batch_size = per_rank_batch(batch_size, world_size, rank)
        self.split, self.normalize, self.augment = split, normalize, augment
        self.mix = mix if mix is not None and mix.enabled else None
        self._policy = policy_transform(augment.policy) if augment.policy is not None else None
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.device = canonical_device(device)
        self.epoch = 0
        self._params: tuple[int, AugmentParams] | None = None
        per_rank = math.ceil(len(split) / world_size)
        self._num_batches = _split_batches(per_rank, self.batch_size, drop_last)
        self.num_samples = min(per_rank, self._num_batches * self.batch_size)
        self.batch_indices: Tensor | None = None  # split indices of the batch yielded last

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._augment_params()

    def _augment_params(self) -> AugmentParams | None:
        if not self.augment.enabled:
            return None
        if self._params is None or self._params[0] != self.epoch:
            params = draw_params(len(self.split), self.augment, seed=self.seed, epoch=self.epoch)
            self._params = (self.epoch, params.to(self.device))
        return self._params[1]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.split.on(self.device)
        params = self._augment_params()
        idx = train_shard_indices(
            len(self.split), seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size
        ).to(self.device)
        bs = self.batch_size
        for b in range(self._num_batches):
            ix = idx[b * bs : (b + 1) * bs]
            x, y = images[ix], labels[ix]
            if params is not None:
                pad = self.augment.crop_padding
                offsets = params.offsets[ix] if pad > 0 else None
                flips = params.flips[ix] if self.augment.hflip else None
                x = crop_flip(x, offsets, flips, pad)
                if self.split.dense:
                    y = crop_flip_masks(y, offsets, flips, pad, self.split.ignore_index)
            if self._policy is not None:
                x = apply_policy(x, ix, self._policy, seed=self.seed, epoch=self.epoch,
                                 max_value=self.normalize.max_value)
            self.batch_indices = ix
            if self.mix is None:
                yield self.normalize(x), y.long()
            else:
                yield mix_batch(self.normalize(x), y, self.mix, seed=self.seed, epoch=self.epoch, batch=b)


class InMemoryEvalLoader:
    """Fixed-order, unpadded, sharded batches (eval transform) over ``indices`` of a :class:`TensorSplit`."""

    def __init__(
        self,
        split: TensorSplit,
        normalize: Normalizer,
        batch_size: int,
        *,
        indices: Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: Device = "cpu",
    ) -> None:
        self.batch_size = per_rank_batch(batch_size, world_size, rank)
        self.split, self.normalize = split, normalize
        self.device = canonical_device(device)
        if indices is None:
            indices = torch.arange(len(split))
        self.indices = eval_shard_indices(indices, rank=rank, world_size=world_size)
        self.num_samples = len(self.indices)
        self._num_batches = _split_batches(self.num_samples, self.batch_size, drop_last=False)
        self.batch_indices: Tensor | None = None  # split indices of the batch yielded last

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not depend on the epoch."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.split.on(self.device)
        idx = self.indices.to(self.device)
        bs = self.batch_size
        for b in range(self._num_batches):
            ix = idx[b * bs : (b + 1) * bs]
            self.batch_indices = ix
            yield self.normalize(images[ix]), labels[ix].long()


class InMemoryBackend:
    """The loader factories of a :class:`~featkd.data.bundle.DataBundle` whose splits are in memory."""

    def __init__(
        self,
        train: TensorSplit,
        val: TensorSplit | None,
        test: TensorSplit,
        norm: Normalizer,
        aug: AugmentSpec,
        mix: MixSpec | None = None,
    ) -> None:
        self.train, self.val, self.test, self.norm, self.aug, self.mix = train, val, test, norm, aug, mix

    def train_loader(self, batch_size: int, **kw: Any) -> Loader:
        return InMemoryTrainLoader(self.train, self.norm, self.aug, batch_size, mix=self.mix, **kw)

    def eval_loader(self, split: str, batch_size: int, indices: Tensor | None, **kw: Any) -> Loader | None:
        data = getattr(self, split)
        if data is None:
            return None
        return InMemoryEvalLoader(data, self.norm, batch_size, indices=indices, **kw)
