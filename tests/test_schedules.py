"""Cache schedules: uniform, DeepCache's quadratic, CacheQuant's DP against brute force."""
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from accel import schedules


def deepcache_quad(total_numbers, n_samples, center=15, pow=1.4):
    """DeepCache's sample_from_quad_center, verbatim (the reference for our port)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while pow > 1:
            x_values = np.linspace((-center) ** (1 / pow), (total_numbers - center) ** (1 / pow), n_samples + 1)
            indices = [0] + [x + center for x in np.unique(np.int32(x_values ** pow))[1:-1]]
            if len(indices) == n_samples:
                break
            pow -= 0.02
    return [int(i) for i in indices]


@pytest.mark.parametrize("n,interval", [(50, 2), (50, 3), (50, 5), (51, 5), (20, 2), (30, 4)])
def test_quadratic_matches_deepcache(n, interval):
    assert schedules.quadratic(n, interval) == deepcache_quad(n, -(-n // interval))


def test_uniform_and_validate():
    assert schedules.uniform(10, 3) == [0, 3, 6, 9]
    assert schedules.validate([5, 0, 5, 2], 10) == [0, 2, 5]
    with pytest.raises(ValueError, match="call 0"):
        schedules.validate([1, 2], 10)
    with pytest.raises(ValueError, match="UNet calls"):
        schedules.validate([0, 12], 10)


def brute_force(C, k, lo, hi):
    n = C.shape[0] - 1
    best = (np.inf, None)
    for starts in itertools.combinations(range(1, n), k - 1):
        s = (0,) + starts
        ends = s[1:] + (n,)
        lens = [e - b for b, e in zip(s, ends)]
        if min(lens) < lo or max(lens) > hi:
            continue
        cost = sum(C[b, e] for b, e in zip(s, ends))
        if cost < best[0] - 1e-12:
            best = (cost, list(s))
    return best


@given(st.integers(3, 11), st.data())
@settings(max_examples=60, deadline=None)
def test_dp_equals_brute_force(n, data):
    k = data.draw(st.integers(1, n))
    lo = data.draw(st.integers(1, max(1, n // k)))
    hi = data.draw(st.integers(-(-n // k), n))
    rng = np.random.default_rng(data.draw(st.integers(0, 10**6)))
    F = np.cumsum(rng.normal(size=(n, 5)), axis=0)  # a drifting feature trajectory
    C = schedules.group_cost(F=F)
    cost, starts = brute_force(C, k, lo, hi)
    got, got_cost = schedules.dp_schedule(C, k, lo, hi)
    assert got_cost == pytest.approx(cost, rel=1e-9, abs=1e-9)
    assert sum(C[b, e] for b, e in zip(got, got[1:] + [n])) == pytest.approx(cost, rel=1e-9, abs=1e-9)


def test_group_cost_definition():
    F = np.array([[0.0], [1.0], [3.0], [6.0]])
    C = schedules.group_cost(F=F)
    assert C[0, 1] == 0 and C[0, 3] == 0 + 1 + 3 and C[1, 4] == 0 + 2 + 5


def test_dp_prefers_dense_full_calls_where_features_move():
    # features change fast at the start and end, slowly in between: the DP spends its budget there
    t = np.concatenate([np.linspace(0, 10, 10), np.linspace(10, 11, 30), np.linspace(11, 21, 10)])
    C = schedules.group_cost(F=t[:, None])
    starts, _ = schedules.dp_schedule(C, 10, 1, 50)
    assert sum(s < 10 or s >= 40 for s in starts) >= 7


def test_paper_bounds_and_infeasible():
    assert schedules.paper_bounds(50, 10) == (3, 10)
    with pytest.raises(ValueError):
        schedules.dp_schedule(schedules.group_cost(F=np.zeros((10, 1))), 2, 1, 3)


def _brute_local_min(s, f, n):
    for p in range(1, len(s)):
        for d in (-1, 1):
            c = list(s)
            c[p] += d
            if c[p] > c[p - 1] and c[p] < (c[p + 1] if p + 1 < len(c) else n):
                assert f(c) >= f(s), (s, c)


@pytest.mark.parametrize("seed", range(5))
def test_refine_reaches_a_local_minimum_never_worse_than_its_start(seed):
    rng = np.random.default_rng(seed)
    n, k = 20, 5
    w = rng.random(n) * 3
    target = sorted([0] + list(rng.choice(np.arange(1, n), k - 1, replace=False)))
    f = lambda s: float(sum(w[i] for i in range(n) if i not in s) + sum(abs(a - b) for a, b in zip(s, target)))
    start = schedules.uniform(n, 4)
    got, val, evals = schedules.refine(start, f, n)
    assert got[0] == 0 and len(got) == k and got == sorted(set(got)) and got[-1] < n
    assert val == f(got) <= f(start)
    _brute_local_min(got, f, n)
    assert evals <= 200


def test_refine_finds_the_optimum_of_a_separable_objective_and_respects_the_budget_of_evaluations():
    n, target = 30, [0, 4, 9, 20, 27]
    f = lambda s: float(sum(abs(a - b) for a, b in zip(s, target)))
    got, val, _ = schedules.refine([0, 6, 12, 18, 24], f, n)
    assert got == target and val == 0.0
    calls = []
    got, val, evals = schedules.refine([0, 6, 12, 18, 24], lambda s: calls.append(1) or f(s), n, max_evals=5)
    assert evals == len(calls) == 5 and val < f([0, 6, 12, 18, 24])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_extend_keeps_the_smaller_schedule_and_splits_its_longest_runs(data):
    n = data.draw(st.integers(2, 60))
    small = sorted({0} | set(data.draw(st.lists(st.integers(1, n - 1), max_size=n - 1))))
    k = data.draw(st.integers(len(small), n))
    got = schedules.extend(small, k, n)
    assert got == sorted(set(got)) and len(got) == k and got[0] == 0 and got[-1] < n
    assert set(small) <= set(got)
    gaps = lambda s: max(b - a for a, b in zip(s, s[1:] + [n]))
    assert gaps(got) <= gaps(small)


def test_extend_examples_and_bad_budgets():
    assert schedules.extend([0, 5, 9, 17, 23], 7, 25) == [0, 5, 9, 13, 17, 20, 23]  # 9..17 first, then 17..23
    assert schedules.extend([0], 4, 10) == [0, 2, 5, 7]
    assert schedules.extend([0, 2], 2, 4) == [0, 2]
    with pytest.raises(ValueError, match="cannot extend"):
        schedules.extend([0, 2, 3], 2, 4)
    with pytest.raises(ValueError, match="cannot extend"):
        schedules.extend([0], 5, 4)
