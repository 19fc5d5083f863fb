"""Split rules: the validation hold-out and the training subset, carved from a data set's training split.

Both are deterministic, seeded by ``data.subset_seed`` (separate streams for the two):

* ``val_fraction``: ``round(val_fraction * n_train)`` training samples (round half up) are held out as the
  validation split; it is carved out BEFORE ``train_subset``, so the validation split does not depend on
  ``train_subset``. It uses the eval transform.
* ``train_subset: N``: N samples of the remaining training pool. The train and train_eval views use the same
  subset.

How the samples are picked depends on the labels (:func:`split_train` vs :func:`split_dense`):

* Classification (one class per sample): class-stratified. Per-class counts are the largest-remainder
  apportionment of N (:func:`stratified_counts`): class ``c`` with ``n_c`` of the ``n`` pool samples gets
  ``floor(N * n_c / n)``, and the ``N - sum(floors)`` left over go one each to the classes with the largest
  remainders ``N * n_c mod n`` (ties: lower class id first). So every class gets ``N * n_c / n`` rounded down
  or up and the total is exactly N. The chosen samples of each class are the head of a seeded permutation of
  that class.
* Dense labels (segmentation masks, where a sample holds many classes): no stratification; the chosen
  samples are the head of one seeded permutation of the pool (:func:`random_pick`).

Chosen indices are always returned sorted (the data set's own order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from featkd.data.augment import mix_seed
from featkd.errors import ConfigError

if TYPE_CHECKING:
    from featkd.data.config import DataConfig

Pick = Callable[[Tensor, int, torch.Generator], Tensor]  # (pool indices, how many, generator) -> sorted pick

_VAL_STREAM, _SUBSET_STREAM = 0x76616C, 0x737562


def stratified_counts(class_counts: Sequence[int], total: int) -> list[int]:
    """Largest-remainder apportionment of ``total`` over classes with ``class_counts`` samples (see the
    module docstring). Exact integer arithmetic; never exceeds a class's count when ``total <= sum``."""
    n = sum(class_counts)
    if not 0 <= total <= n:
        raise ValueError(f"cannot pick {total} of {n} samples")
    if n == 0:
        return [0] * len(class_counts)
    counts = [total * c // n for c in class_counts]
    remainders = [total * c % n for c in class_counts]
    order = sorted(range(len(class_counts)), key=lambda k: (-remainders[k], k))
    for k in order[: total - sum(counts)]:
        counts[k] += 1
    return counts


def stratified_pick(labels: Tensor, pool: Tensor, total: int, generator: torch.Generator) -> Tensor:
    """``total`` indices of ``pool`` (indices into ``labels``), class-stratified; returned sorted."""
    pool_labels = labels[pool]
    classes, class_counts = torch.unique(pool_labels, sorted=True, return_counts=True)
    counts = stratified_counts(class_counts.tolist(), total)
    chosen = []
    for c, k in zip(classes.tolist(), counts, strict=True):
        members = pool[pool_labels == c]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    if not chosen:
        return pool[:0]
    return torch.cat(chosen).sort().values


def random_pick(pool: Tensor, total: int, generator: torch.Generator) -> Tensor:
    """The first ``total`` indices of a seeded permutation of ``pool``; returned sorted."""
    return pool[torch.randperm(len(pool), generator=generator)[:total]].sort().values


def split_pool(n: int, cfg: DataConfig, name: str, pick: Pick) -> tuple[Tensor, Tensor | None]:
    """(train indices, val indices or None) into a training split of ``n`` samples, following ``cfg``,
    each part chosen by ``pick``."""
    pool = torch.arange(n)
    val = None
    if cfg.val_fraction > 0:
        n_val = math.floor(cfg.val_fraction * n + 0.5)
        if n_val == 0 or n_val >= n:
            raise ConfigError(
                f"data.val_fraction: {cfg.val_fraction} of the {n} {name} training samples is {n_val} samples"
            )
        g = torch.Generator().manual_seed(mix_seed(cfg.subset_seed, _VAL_STREAM))
        val = pick(pool, n_val, g)
        keep = torch.ones(n, dtype=torch.bool)
        keep[val] = False
        pool = pool[keep]
    if cfg.train_subset is not None:
        if cfg.train_subset > len(pool):
            left = " left after data.val_fraction" if val is not None else ""
            raise ConfigError(
                f"data.train_subset: {cfg.train_subset} is more than the "
                f"{len(pool)} {name} training samples{left}"
            )
        g = torch.Generator().manual_seed(mix_seed(cfg.subset_seed, _SUBSET_STREAM))
        pool = pick(pool, cfg.train_subset, g)
    return pool, val


def split_train(labels: Tensor, cfg: DataConfig, name: str) -> tuple[Tensor, Tensor | None]:
    """Class-stratified :func:`split_pool` of a classification training split with ``labels`` (N,)."""

    def pick(pool: Tensor, total: int, generator: torch.Generator) -> Tensor:
        return stratified_pick(labels, pool, total, generator)

    return split_pool(len(labels), cfg, name, pick)


def split_dense(n: int, cfg: DataConfig, name: str) -> tuple[Tensor, Tensor | None]:
    """Unstratified :func:`split_pool` (seeded permutations) of a dense-label training split of ``n``."""
    return split_pool(n, cfg, name, random_pick)
