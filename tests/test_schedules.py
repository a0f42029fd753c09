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
