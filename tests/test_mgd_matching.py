"""MGD matching statistics and assignment (featkd.methods.mgd.matching) against loops and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featkd.methods.mgd.matching import (
    Matching,
    StageStatistics,
    all_reduce_statistics,
    balanced_assignment,
    cost_sums,
    default_matching,
    group_width,
    solve_matching,
)

# ---- statistics -------------------------------------------------------------------------------------------


def naive_cost(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Sum over images of ||s_j/|s_j| - t_k/|t_k|||^2, with plain loops (zero maps stay zero)."""
    b, sc = s.shape[:2]
    tc = t.shape[1]
    out = np.zeros((sc, tc))
    for n in range(b):
        for j in range(sc):
            a = s[n, j].ravel()
            a = a / np.linalg.norm(a) if np.linalg.norm(a) > 0 else a
            for k in range(tc):
                c = t[n, k].ravel()
                c = c / np.linalg.norm(c) if np.linalg.norm(c) > 0 else c
                out[j, k] += 2.0 - 2.0 * float(a @ c)
    return out


def test_cost_sums_equals_the_loop_and_the_squared_distance():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 4, 5, 5))
    t = rng.normal(size=(3, 6, 5, 5))
    s[1, 2] = 0.0  # an all-zero map: cosine 0, cost 2
    got = cost_sums(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.dtype == torch.float64 and got.shape == (4, 6)
    np.testing.assert_allclose(got.numpy(), naive_cost(s, t), rtol=1e-5, atol=1e-5)
    # 2 - 2 cos is the squared distance of the unit maps: check one entry directly
    a = s[0, 1].ravel() / np.linalg.norm(s[0, 1])
    c = t[0, 3].ravel() / np.linalg.norm(t[0, 3])
    one = cost_sums(torch.tensor(s[:1], dtype=torch.float32), torch.tensor(t[:1], dtype=torch.float32))
    assert one[1, 3].item() == pytest.approx(float(((a - c) ** 2).sum()), rel=1e-5)


def test_cost_sums_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="same batch and spatial size"):
        cost_sums(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


def test_statistics_accumulate_over_batches_like_one_big_batch():
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.normal(size=(10, 3, 4, 4)), dtype=torch.float32)
    t = torch.tensor(rng.normal(size=(10, 5, 4, 4)), dtype=torch.float32)
    whole, parts = StageStatistics(3, 5), StageStatistics(3, 5)
    whole.add(s, t)
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        parts.add(s[lo:hi], t[lo:hi])
    assert parts.images.item() == 10
    torch.testing.assert_close(parts.mean_cost(), whole.mean_cost())
    np.testing.assert_allclose(whole.mean_cost().numpy(), naive_cost(s.numpy(), t.numpy()) / 10, rtol=1e-5)
    # empirical margin: mean of the negative responses of each teacher channel
    tn = t.numpy()
    expected = [tn[:, k][tn[:, k] < 0].mean() for k in range(5)]
    np.testing.assert_allclose(whole.negative_mean().numpy(), expected, rtol=1e-6)


def test_all_reduce_statistics_sums_every_stage_with_one_call():
    a, b = StageStatistics(2, 3), StageStatistics(1, 2)
    a.add(torch.ones(1, 2, 2, 2), -torch.ones(1, 3, 2, 2))
    b.add(torch.ones(2, 1, 2, 2), torch.ones(2, 2, 2, 2))
    calls = []

    def doubling_all_reduce(x):  # what a sum over two identical ranks returns
        calls.append(x.numel())
        return x.mul_(2)

    before = (a.cost.clone(), b.cost.clone(), a.neg_count.clone())
    all_reduce_statistics([a, b], doubling_all_reduce)
    assert calls == [2 * 3 + 1 + 3 + 3 + 1 * 2 + 1 + 2 + 2]
    torch.testing.assert_close(a.cost, 2 * before[0])
    torch.testing.assert_close(b.cost, 2 * before[1])
    torch.testing.assert_close(a.neg_count, 2 * before[2])
    assert a.images.item() == 2 and b.images.item() == 4


# ---- assignment ---------------------------------------------------------------------------------------------


def brute_force_balanced(cost: np.ndarray) -> float:
    """Minimum total cost over all maps teacher -> student with every group of size k or k+1."""
    sc, tc = cost.shape
    k = tc // sc
    best = np.inf
    for owner in itertools.product(range(sc), repeat=tc):
        counts = np.bincount(owner, minlength=sc)
        if counts.min() < k or counts.max() > k + 1:
            continue
        best = min(best, float(cost[list(owner), range(tc)].sum()))
    return best


def brute_force_one_to_one(cost: np.ndarray) -> float:
    sc, tc = cost.shape
    if sc <= tc:
        return min(float(cost[range(sc), list(p)].sum()) for p in itertools.permutations(range(tc), sc))
    return min(float(cost[list(p), range(tc)].sum()) for p in itertools.permutations(range(sc), tc))


shapes = st.tuples(st.integers(1, 4), st.integers(1, 7)).filter(lambda x: x[0] <= x[1])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_balanced_rule_uses_every_teacher_channel_once_with_groups_k_or_k_plus_1(shape, seed):
    sc, tc = shape
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0.0, 4.0, size=(sc, tc)).round(3)  # ties included
    m = solve_matching(cost, "balanced")
    k, r = divmod(tc, sc)
    s_idx, t_idx = m.pairs()
    assert sorted(t_idx.tolist()) == list(range(tc))  # every teacher channel exactly once
    sizes = np.bincount(s_idx, minlength=sc)
    np.testing.assert_array_equal(sizes, m.sizes)
    assert set(sizes.tolist()) <= {k, k + 1} and int((sizes == k + 1).sum()) == r
    assert m.groups.shape == (sc, group_width(sc, tc, "balanced"))
    assert all(a is not None and not isinstance(a, list) for a in m.teacher_assignment())
    assert m.total_cost(cost) == pytest.approx(brute_force_balanced(cost), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 5)), seed=st.integers(0, 2**16))
def test_one_to_one_rules_are_optimal_and_ignore_the_surplus(shape, seed):
    sc, tc = shape
    cost = np.random.default_rng(seed).uniform(0.0, 4.0, size=(sc, tc))
    for m in (solve_matching(cost, "one_to_one"), solve_matching(cost, "balanced", "subset") if sc > tc else None):
        if m is None:
            continue
        s_idx, t_idx = m.pairs()
        assert len(s_idx) == min(sc, tc)
        assert len(set(s_idx.tolist())) == len(s_idx) and len(set(t_idx.tolist())) == len(t_idx)
        assert set(m.sizes.tolist()) <= {0, 1}
        assignment = m.teacher_assignment()
        assert sum(a is None for a in assignment) == max(0, tc - sc)
        assert m.total_cost(cost) == pytest.approx(brute_force_one_to_one(cost), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(2, 6), st.integers(1, 3)).filter(lambda x: x[0] > x[1]), seed=st.integers(0, 999))
def test_share_rule_for_a_wider_student_gives_every_student_channel_one_teacher_channel(shape, seed):
    sc, tc = shape
    cost = np.random.default_rng(seed).uniform(0.0, 4.0, size=(sc, tc))
    m = solve_matching(cost, "balanced", "share")
    assert m.groups.shape == (sc, 1) and (m.sizes == 1).all()
    served = np.bincount(m.groups[:, 0], minlength=tc)  # students per teacher channel
    k = sc // tc
    assert set(served.tolist()) <= {k, k + 1} and int((served == k + 1).sum()) == sc % tc
    assert m.total_cost(cost) == pytest.approx(brute_force_balanced(cost.T), abs=1e-9)
    assignment = m.teacher_assignment()
    assert all(a is not None for a in assignment)
    flat = sorted(x for a in assignment for x in (a if isinstance(a, list) else [a]))
    assert flat == list(range(sc))


def test_balanced_assignment_hand_example_where_the_extra_channel_goes_where_it_fits():
    # 2 students, 3 teachers: k = 1, r = 1. Student 1 fits teacher channels 1 and 2 best.
    cost = np.array([[0.0, 1.0, 1.0],
                     [1.0, 0.1, 0.2]])
    owner = balanced_assignment(cost)
    assert owner.tolist() == [0, 1, 1]
    # the official code would drop teacher channel 2 (``shave``); we keep it, in the cheaper group
    assert solve_matching(cost).teacher_assignment() == [0, 1, 1]


def test_balanced_assignment_divisible_case_equals_the_stacked_official_matrix():
    rng = np.random.default_rng(3)
    cost = rng.uniform(size=(3, 6))
    owner = balanced_assignment(cost)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.concatenate([cost, cost], 0))  # official: stack k times
    official = np.empty(6, dtype=np.int64)
    official[cols] = rows % 3
    assert cost[owner, range(6)].sum() == pytest.approx(cost[official, range(6)].sum())


def test_balanced_assignment_rejects_bad_input():
    with pytest.raises(ValueError, match="rows <= columns"):
        balanced_assignment(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="nan or inf"):
        balanced_assignment(np.array([[0.0, np.nan]]))


def test_default_matching_and_group_width():
    assert group_width(3, 7, "balanced") == 3 and group_width(3, 6, "balanced") == 2
    assert group_width(3, 7, "one_to_one") == 1 and group_width(5, 3, "balanced") == 1
    m = default_matching(3, 7, "balanced")
    assert m.teacher_assignment() == [0, 1, 2, 0, 1, 2, 0]
    assert default_matching(2, 3, "one_to_one").teacher_assignment() == [0, 1, None]
    assert default_matching(4, 2, "balanced", "share").teacher_assignment() == [[0, 2], [1, 3]]
    assert default_matching(4, 2, "balanced", "subset").sizes.tolist() == [1, 1, 0, 0]


def test_matching_mean_cost_is_over_assigned_pairs():
    m = Matching(np.array([[0, 2], [1, 0]]), np.array([2, 1]), 3)
    cost = np.array([[1.0, 5.0, 3.0], [7.0, 2.0, 9.0]])
    assert m.teacher_assignment() == [0, 1, 0]
    assert m.mean_cost(cost) == pytest.approx((1.0 + 3.0 + 2.0) / 3)
