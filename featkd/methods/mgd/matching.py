"""Matching statistics and channel assignment of Matching Guided Distillation (Yue et al., ECCV 2020).

Pure functions (no model, no training state), used by :mod:`featkd.methods.mgd.distiller` and ``featkd match``.

Statistics
    :func:`cost_sums` turns one batch of student features (B, sc, H, W) and teacher features (B, tc, H, W)
    into the (sc, tc) sum over images of ``2 - 2 cos(s_j, t_k)``, the squared distance between the
    spatially L2-normalised maps of student channel j and teacher channel k (the official ``flow`` matrix;
    not a Pearson correlation, no mean subtraction). :class:`StageStatistics` accumulates those sums and
    the image count (O(sc * tc) memory, float64), plus the per-teacher-channel sum and count of negative
    responses used by the ``empirical`` margin. A map that is all zero normalises to the zero vector, so its
    cost against anything is 2 (cosine 0).

Assignment (``scipy.optimize.linear_sum_assignment`` on float costs; the official code used OR-Tools on
costs x 1e5) produces a :class:`Matching`: for each student channel j the group G_j of teacher channels it
distils, stored as ``groups`` (sc, g) padded with 0 and ``sizes`` (sc,). The rules:

``balanced`` (reducers AMP and RD), ``tc >= sc``
    every teacher channel goes to exactly one student channel and every student channel gets
    ``k = tc // sc`` or ``k + 1`` of them; exactly ``r = tc % sc`` student channels get ``k + 1``, and
    *which* ones is part of the optimisation (the minimum total cost over all assignments with these group
    sizes). Official code: the same for ``r = 0`` (the cost matrix stacked k times); for ``r > 0`` it
    silently drops the ``r`` highest-index teacher channels (``shave``). Ours (see
    :func:`balanced_assignment`) drops none.
``one_to_one`` (reducer SM), ``tc >= sc``
    every student channel gets one teacher channel, ``tc - sc`` teacher channels are ignored (official
    Sparse Matching, whose dummy rows of constant cost are what a rectangular solve does).
student wider than teacher, ``sc > tc`` (the official code crashes), option ``wide_student``:
    ``subset`` (default): one-to-one; every teacher channel gets one student channel, the ``sc - tc``
    remaining student channels get no target (they are left free, not pulled towards a duplicate);
    ``share``: the balanced rule transposed; every student channel gets exactly one teacher channel and
    every teacher channel serves ``sc // tc`` or ``sc // tc + 1`` student channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

Rule = Literal["balanced", "one_to_one"]
WideStudent = Literal["subset", "share"]


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------


def cost_sums(student: Tensor, teacher: Tensor) -> Tensor:
    """Sum over the batch of ``2 - 2 <s_hat_j, t_hat_k>`` for every student/teacher channel pair.

    Shapes: ``student`` (B, sc, H, W), ``teacher`` (B, tc, H, W) -> (sc, tc), float64. Each image's channel
    map is flattened over space and L2-normalised; the batch sum is one (sc, B*H*W) @ (B*H*W, tc) product,
    so no (B, sc, tc) tensor is formed.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"cost_sums: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "need the same batch and spatial size")
    b = student.shape[0]
    s = F.normalize(student.detach().float().flatten(2), dim=2)  # (B, sc, HW)
    t = F.normalize(teacher.detach().float().flatten(2), dim=2)  # (B, tc, HW)
    dots = torch.einsum("bsh,bth->st", s, t)
    return 2.0 * b - 2.0 * dots.double()


@dataclass
class StageStatistics:
    """Running sums for one distilled pair: costs (sc, tc), image count, negative teacher responses (tc,)."""

    student_channels: int
    teacher_channels: int
    device: torch.device | str = "cpu"
    cost: Tensor = field(init=False)
    images: Tensor = field(init=False)
    neg_sum: Tensor = field(init=False)
    neg_count: Tensor = field(init=False)

    def __post_init__(self) -> None:
        kw = {"dtype": torch.float64, "device": self.device}
        self.cost = torch.zeros(self.student_channels, self.teacher_channels, **kw)
        self.images = torch.zeros((), **kw)
        self.neg_sum = torch.zeros(self.teacher_channels, **kw)
        self.neg_count = torch.zeros(self.teacher_channels, **kw)

    def add(self, student: Tensor, teacher: Tensor) -> None:
        """Accumulate one batch: ``student`` (B, sc, H, W), ``teacher`` (B, tc, H, W)."""
        self.cost += cost_sums(student, teacher)
        self.images += student.shape[0]
        t = teacher.detach().float().transpose(0, 1).flatten(1)  # (tc, B*H*W)
        neg = t.clamp(max=0.0)
        self.neg_sum += neg.sum(1).double()
        self.neg_count += (t < 0).sum(1).double()

    def flat(self) -> Tensor:
        """All sums as one float64 vector (one all-reduce for all of them)."""
        return torch.cat([self.cost.flatten(), self.images.reshape(1), self.neg_sum, self.neg_count])

    def load_flat(self, flat: Tensor) -> None:
        n, tc = self.cost.numel(), self.teacher_channels
        self.cost.copy_(flat[:n].view_as(self.cost))
        self.images.copy_(flat[n])
        self.neg_sum.copy_(flat[n + 1: n + 1 + tc])
        self.neg_count.copy_(flat[n + 1 + tc: n + 1 + 2 * tc])

    def mean_cost(self) -> Tensor:
        """(sc, tc) mean per-image distance (what the assignment is solved on)."""
        return self.cost / self.images.clamp(min=1.0)

    def negative_mean(self, fallback: Tensor | None = None) -> Tensor:
        """(tc,) mean of the negative teacher responses: E[t | t < 0], the quantity the BN margin estimates
        under a Gaussian assumption. Channels that were never negative get ``fallback`` (default 0)."""
        mean = self.neg_sum / self.neg_count.clamp(min=1.0)
        if fallback is None:
            fallback = torch.zeros_like(mean)
        return torch.where(self.neg_count > 0, mean, fallback.to(mean))


def all_reduce_statistics(stats: list[StageStatistics], all_reduce_sum) -> None:
    """Sum every stage's statistics over all ranks in one collective (``all_reduce_sum`` works in place)."""
    if not stats:
        return
    flats = [s.flat() for s in stats]
    sizes = [f.numel() for f in flats]
    joined = all_reduce_sum(torch.cat(flats))
    for s, part in zip(stats, torch.split(joined, sizes), strict=True):
        s.load_flat(part)


# ---------------------------------------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------------------------------------


def balanced_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost many-to-one assignment of columns to rows with balanced group sizes.

    Args:
        cost: (n_rows, n_cols) with ``n_cols >= n_rows`` (rows: student channels, columns: teacher
            channels for the balanced rule).

    Returns:
        ``owner`` (n_cols,) int64: the row each column is assigned to. Every column is assigned once;
        with ``k, r = divmod(n_cols, n_rows)`` every row receives k or k + 1 columns, exactly r rows k + 1.

    Method: the columns choose among ``k`` mandatory copies of every row plus, if ``r > 0``, one optional
    copy per row. Mandatory copies carry a bonus ``-M`` with ``M`` larger than any possible total cost
    difference, so an optimum fills all ``n_rows * k`` mandatory slots (always feasible) and, among those
    solutions, minimises the true cost; the ``r`` remaining columns take the optional slots where they fit
    best. One rectangular (n_cols x slots) ``linear_sum_assignment``; exact (not a heuristic).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n_rows, n_cols = cost.shape
    if n_rows < 1 or n_cols < n_rows:
        raise ValueError(f"balanced_assignment needs 1 <= rows <= columns, got {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("balanced_assignment: the cost matrix holds nan or inf")
    k, r = divmod(n_cols, n_rows)
    span = float(cost.max() - cost.min()) if cost.size else 0.0
    bonus = (span + 1.0) * (n_cols + 1)  # > any difference in total cost between two assignments
    slots = [cost - bonus] * k + ([cost] if r else [])
    stacked = np.concatenate(slots, axis=0)  # (n_rows * (k + [r>0]), n_cols); slot q -> row q % n_rows
    # columns as rows (contiguous: ~25 % faster in scipy), so that every column gets exactly one slot
    cols, slot = linear_sum_assignment(np.ascontiguousarray(stacked.T))
    owner = np.empty(n_cols, dtype=np.int64)
    owner[cols] = slot % n_rows
    return owner


def one_to_one_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching of rows and columns (rectangular allowed).

    Shapes: ``cost`` (n_rows, n_cols) -> ``(rows, cols)``, each of length ``min(n_rows, n_cols)``.
    """
    rows, cols = linear_sum_assignment(np.asarray(cost, dtype=np.float64))
    return rows.astype(np.int64), cols.astype(np.int64)


@dataclass
class Matching:
    """Which teacher channels each student channel distils.

    ``groups`` (sc, g) int64: teacher channel indices, the first ``sizes[j]`` entries of row j are valid
    (ascending), the rest is padding (0). ``sizes`` (sc,) int64, 0 for a student channel without target.
    """

    groups: np.ndarray
    sizes: np.ndarray
    teacher_channels: int

    @property
    def student_channels(self) -> int:
        return int(self.groups.shape[0])

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(student, teacher) index arrays of every assigned pair."""
        valid = np.arange(self.groups.shape[1])[None, :] < self.sizes[:, None]
        students = np.broadcast_to(np.arange(self.student_channels)[:, None], self.groups.shape)
        return students[valid], self.groups[valid]

    def teacher_assignment(self) -> list[int | list[int] | None]:
        """For each teacher channel: its student channel, None if ignored, or a list (``share`` rule)."""
        owners: list[list[int]] = [[] for _ in range(self.teacher_channels)]
        for s, t in zip(*self.pairs(), strict=True):
            owners[int(t)].append(int(s))
        return [None if not o else (o[0] if len(o) == 1 else o) for o in owners]

    def total_cost(self, cost: np.ndarray) -> float:
        s, t = self.pairs()
        return float(np.asarray(cost, dtype=np.float64)[s, t].sum())

    def mean_cost(self, cost: np.ndarray) -> float:
        """Mean cost of the assigned (student, teacher) pairs."""
        s, _ = self.pairs()
        return self.total_cost(cost) / max(1, len(s))


def group_width(student_channels: int, teacher_channels: int, rule: Rule) -> int:
    """Padded group size g of a stage: ceil(tc / sc) for ``balanced`` with tc >= sc, else 1."""
    if rule == "balanced" and teacher_channels >= student_channels:
        return -(-teacher_channels // student_channels)
    return 1


def _from_owner(owner: np.ndarray, sc: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """owner (tc,) student index or -1 -> groups (sc, width), sizes (sc,)."""
    groups = np.zeros((sc, width), dtype=np.int64)
    sizes = np.zeros(sc, dtype=np.int64)
    for t in range(len(owner)):  # ascending teacher order inside each group
        s = int(owner[t])
        if s >= 0:
            groups[s, sizes[s]] = t
            sizes[s] += 1
    return groups, sizes


def solve_matching(cost: np.ndarray, rule: Rule = "balanced", wide_student: WideStudent = "subset") -> Matching:
    """The :class:`Matching` of one stage from its (sc, tc) mean cost matrix (rules: module docstring)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or min(cost.shape) < 1:
        raise ValueError(f"solve_matching: expected a non-empty (sc, tc) matrix, got shape {cost.shape}")
    sc, tc = cost.shape
    width = group_width(sc, tc, rule)
    if sc > tc and wide_student == "share":
        teacher_of = balanced_assignment(cost.T)  # (sc,): every student channel gets one teacher channel
        return Matching(teacher_of.reshape(sc, 1).copy(), np.ones(sc, dtype=np.int64), tc)
    owner = np.full(tc, -1, dtype=np.int64)
    if rule == "balanced" and tc >= sc:
        owner = balanced_assignment(cost)
    else:  # SM, or the subset rule for a wider student: one-to-one
        rows, cols = one_to_one_assignment(cost)
        owner[cols] = rows
    groups, sizes = _from_owner(owner, sc, width)
    return Matching(groups, sizes, tc)


def default_matching(student_channels: int, teacher_channels: int, rule: Rule,
                     wide_student: WideStudent = "subset") -> Matching:
    """A placeholder of the right shapes (teacher channel t -> student t % sc), before the first solve."""
    sc, tc = student_channels, teacher_channels
    if sc > tc and wide_student == "share":
        return Matching((np.arange(sc) % tc).reshape(sc, 1), np.ones(sc, dtype=np.int64), tc)
    owner = np.arange(tc) % sc
    if not (rule == "balanced" and tc >= sc):
        owner = np.where(np.arange(tc) < sc, owner, -1)
    groups, sizes = _from_owner(owner, sc, group_width(sc, tc, rule))
    return Matching(groups, sizes, tc)
