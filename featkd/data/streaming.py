"""Streaming: samples read from disk and transformed one at a time in DataLoader workers.

The path for data sets too large to hold in memory (ImageFolder / ImageNet, COCO, Cityscapes): nothing is
decoded before the first step, and resident memory does not grow with the number of images. Its pieces:

* :class:`StreamDataset`: sample ``i`` of a split is ``transform(read(view[i]))``. ``read`` decodes the
  files (and raises a one-line :class:`~featkd.errors.DataError` naming the file when one is bad);
  ``transform`` draws its randomness from torch's global RNG, which is seeded per sample from
  (seed, epoch, i) in a forked RNG state: a sample's augmentation does not depend on the worker that reads
  it, the number of workers, the batch size per rank or the world size, and a resumed epoch repeats it.
* :class:`TrainBatches` / :class:`EvalBatches`: the batch samplers, with the sharding of
  :mod:`featkd.data.loaders` (DistributedSampler's order for training, a fixed unpadded order for
  evaluation); a training batch is a list of ``(i, epoch)`` keys.
* :class:`StreamLoader`: the :class:`~featkd.data.loaders.Loader` over them: a ``torch.utils.data.DataLoader``
  whose collate function (in the worker) turns the samples into one batch with ``assemble``, pinned memory
  and non-blocking copies on CUDA, ``finish`` (in the main process, on the device: normalisation) and, for
  training, an optional ``mix(x, y, epoch, batch index)`` (mixup / cutmix, seeded by its arguments).

Bad files (``data.bad_files``): with ``error`` (the default) the first bad file met stops the run with its
one-line DataError, raised in the main process whether it was met in a worker, in training or in
evaluation; with ``skip`` a bad training sample is replaced by the next readable one of the split (so batches
keep their size and an epoch its number of steps) and a bad evaluation sample is left out; either way the
loader lists it in ``skipped`` ("file: reason" lines), which the trainer writes to the run folder. Another user
error met in a worker (a :class:`~featkd.errors.FeatkdError` of ``transform`` or ``assemble``) is not a bad file:
it is raised in the main process as it was raised, one line, whatever ``data.bad_files`` says (DataLoader would
re-raise it with the worker's traceback in its message).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from featkd.data.augment import mix_seed, seeded_cpu_rng
from featkd.data.loaders import Device, canonical_device, eval_shard_indices, per_rank_batch, train_shard_indices
from featkd.errors import DataError, FeatkdError

BAD_FILE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class BadSample:
    """What a worker returns for a sample it could not read: the one-line reason (naming the file); ``error``:
    a user error of the transform instead, raised in the main process whatever ``data.bad_files`` says."""

    index: int
    message: str
    error: FeatkdError | None = None


class StreamDataset(torch.utils.data.Dataset):
    """Sample ``i`` = ``transform(read(view[i]))``; see the module docstring.

    Args:
        read: split index -> the decoded sample (raises :class:`~featkd.errors.FeatkdError` for a bad file).
        view: the split indices this dataset serves, in order (a training subset, the validation hold-out).
        transform: decoded sample -> what ``assemble`` batches; random draws from torch's global RNG.
        seed: the run's seed; a key ``(i, epoch)`` seeds the transform from (seed, epoch, i).
        skip_bad: replace (training) or leave out (evaluation) bad samples instead of failing.
    """

    def __init__(self, read: Callable[[int], Any], view: Sequence[int], transform: Callable[[Any], Any], *,
                 seed: int = 0, skip_bad: bool = False) -> None:
        self.read, self.view, self.transform = read, list(view), transform
        self.seed, self.skip_bad = seed, skip_bad

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, Any, list[str]] | BadSample:
        """``(i, transformed sample, messages of the bad samples skipped to reach it)``, or a
        :class:`BadSample` (failing, or an evaluation sample left out)."""
        i, epoch = key if isinstance(key, tuple) else (key, None)
        skipped: list[str] = []
        tries = len(self.view) if (self.skip_bad and epoch is not None) else 1
        for step in range(tries):
            try:
                sample = self.read(self.view[(i + step) % len(self.view)])
            except FeatkdError as exc:
                skipped.append(str(exc))
                continue
            try:
                if epoch is None:
                    return i, self.transform(sample), skipped
                with seeded_cpu_rng(mix_seed(self.seed, epoch, i)):
                    return i, self.transform(sample), skipped
            except FeatkdError as exc:
                return BadSample(i, str(exc), error=exc)
        if self.skip_bad and epoch is not None:
            return BadSample(i, f"no readable sample in the split ({skipped[0]})")
        return BadSample(i, skipped[0])


class TrainBatches:
    """Batch sampler with the training order of :func:`~featkd.data.loaders.train_shard_indices`; yields lists
    of ``(sample index, epoch)`` keys so the dataset can seed each sample's transform."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world_size: int, drop_last: bool) -> None:
        self.n, self.batch, self.seed, self.rank, self.world_size = n, batch, seed, rank, world_size
        self.epoch = 0
        per_rank = math.ceil(n / world_size)
        self.num_batches = per_rank // batch if drop_last else math.ceil(per_rank / batch)
        self.num_samples = min(per_rank, self.num_batches * batch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = train_shard_indices(
            self.n, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size
        ).tolist()
        for b in range(self.num_batches):
            yield [(i, self.epoch) for i in idx[b * self.batch : (b + 1) * self.batch]]


class EvalBatches:
    """Batch sampler over this rank's share of ``indices`` (:func:`~featkd.data.loaders.eval_shard_indices`)."""

    def __init__(self, indices: Tensor, batch: int, rank: int, world_size: int) -> None:
        self.indices = eval_shard_indices(indices, rank=rank, world_size=world_size).tolist()
        self.batch = batch
        self.num_samples = len(self.indices)
        self.num_batches = math.ceil(self.num_samples / batch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.num_batches):
            yield self.indices[b * self.batch : (b + 1) * self.batch]


class OnImage:
    """A transform of ``(image, label)`` samples that transforms the image alone (classification)."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: tuple[Any, Any]) -> tuple[Any, Any]:
        image, label = sample
        return self.transform(image), label


def stack_pairs(samples: Sequence[tuple[Tensor, Any]]) -> tuple[Tensor, Tensor]:
    """``assemble`` for fixed-size samples ``(image (C, H, W), label)``: ``(images (B, C, H, W), labels)``;
    labels are class ids (B,) or masks (B, H, W)."""
    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([torch.as_tensor(s[1]) for s in samples])
    return images, labels


class _Collate:
    """Runs in the worker: drops bad samples, assembles the rest into ``(indices, x, y, bad messages, error)``;
    ``error``: the first user error of a transform or of ``assemble`` (then no batch), else None."""

    def __init__(self, assemble: Callable[[list[Any]], tuple[Any, Any]]) -> None:
        self.assemble = assemble

    def __call__(self, items: list[tuple[int, Any, list[str]] | BadSample]
                 ) -> tuple[Tensor, Any, Any, list[str], FeatkdError | None]:
        none = torch.zeros(0, dtype=torch.long)
        error = next((item.error for item in items if isinstance(item, BadSample) and item.error is not None), None)
        if error is not None:
            return none, None, None, [], error
        bad = [m for item in items if not isinstance(item, BadSample) for m in item[2]]
        bad += [item.message for item in items if isinstance(item, BadSample)]
        good = [item for item in items if not isinstance(item, BadSample)]
        if not good:
            return none, None, None, bad, None
        try:
            x, y = self.assemble([item[1] for item in good])
        except FeatkdError as exc:
            return none, None, None, [], exc
        return torch.tensor([item[0] for item in good], dtype=torch.long), x, y, bad, None


class StreamLoader:
    """A :class:`~featkd.data.loaders.Loader` over a :class:`StreamDataset` (see the module docstring).

    ``assemble`` (in the worker): transformed samples -> ``(x, y)`` of CPU tensors (or lists of them);
    ``finish`` (main process): ``(x, y)`` on the device -> the batch the models get (normalised).
    ``batch_indices``: the (B,) split-view indices of the batch yielded last, as the in-memory loaders keep.
    ``mix`` (training): ``(x, y, epoch, batch index) -> (x, y)`` after ``finish``.
    """

    replayable = True  # per-sample transforms seeded by (seed, epoch, index), mixing by (seed, epoch, batch)

    def __init__(self, dataset: StreamDataset, batches: TrainBatches | EvalBatches,
                 assemble: Callable[[list[Any]], tuple[Any, Any]], finish: Callable[[Any, Any], tuple[Any, Any]], *,
                 device: Device, num_workers: int, what: str = "data",
                 mix: Callable[[Any, Any, int, int], tuple[Any, Any]] | None = None) -> None:
        self.device = canonical_device(device)
        self.dataset, self.batches, self.finish, self.mix = dataset, batches, finish, mix
        self.num_samples = batches.num_samples
        self.batch_size = batches.batch
        self.what = what
        self.skipped: list[str] = []  # "reason" lines of the bad files this loader skipped
        self.batch_indices: Tensor | None = None
        self._pin = self.device.type == "cuda"
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_Collate(assemble),
            pin_memory=self._pin, persistent_workers=num_workers > 0 and isinstance(batches, TrainBatches),
            # its own generator: iterating must not consume the global RNG (the per-sample seeds make it moot)
            generator=torch.Generator().manual_seed(0),
        )

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.batches, TrainBatches):
            self.batches.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        epoch = getattr(self.batches, "epoch", 0)
        for b, (indices, x, y, bad, error) in enumerate(self._loader):
            if error is not None:  # raised here, not in the worker: one line, without the worker's traceback
                raise error
            if bad:
                if not self.dataset.skip_bad:
                    raise DataError(bad[0])
                self.skipped.extend(bad)
            if x is None:  # every sample of an evaluation batch was left out
                continue
            self.batch_indices = indices.to(self.device, non_blocking=self._pin)
            x, y = self.finish(to_device(x, self.device, self._pin), to_device(y, self.device, self._pin))
            yield (x, y) if self.mix is None else self.mix(x, y, epoch, b)


def to_device(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    """``obj`` (a tensor, or lists / tuples / dicts of them) on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def stream_train_loader(dataset: StreamDataset, assemble: Callable[[list[Any]], tuple[Any, Any]],
                        finish: Callable[[Any, Any], tuple[Any, Any]], batch_size: int, *, seed: int, rank: int,
                        world_size: int, device: Device, drop_last: bool, num_workers: int,
                        mix: Callable[[Any, Any, int, int], tuple[Any, Any]] | None = None) -> StreamLoader:
    """Training batches of ``dataset`` (GLOBAL ``batch_size``, this rank's share), mixed by ``mix`` if given."""
    batch = per_rank_batch(batch_size, world_size, rank)
    batches = TrainBatches(len(dataset), batch, seed, rank, world_size, drop_last)
    return StreamLoader(dataset, batches, assemble, finish, device=device, num_workers=num_workers, mix=mix)


def stream_eval_loader(dataset: StreamDataset, assemble: Callable[[list[Any]], tuple[Any, Any]],
                       finish: Callable[[Any, Any], tuple[Any, Any]], batch_size: int, *, indices: Tensor | None,
                       rank: int, world_size: int, device: Device, num_workers: int) -> StreamLoader:
    """Evaluation batches of ``dataset`` (all samples, or ``indices``), this rank's share, in a fixed order."""
    batch = per_rank_batch(batch_size, world_size, rank)
    batches = EvalBatches(torch.arange(len(dataset)) if indices is None else indices, batch, rank, world_size)
    return StreamLoader(dataset, batches, assemble, finish, device=device, num_workers=num_workers)
