"""Which UNet calls of a pipeline call are *full* (the whole UNet runs) and which reuse the cache.

Pure functions of the number of calls ``N``. A schedule is a sorted list of full-call indices that always
contains 0.

* :func:`uniform`: every ``interval``-th call (DeepCache's ``cache_interval``).
* :func:`quadratic`: DeepCache's non-uniform schedule, denser around a centre step.
* :func:`dp_schedule`: CacheQuant's dynamic-programming schedule (DPS) on a feature-distance matrix.
* :func:`refine`: local search from a schedule on a measured objective (what ``accel calibrate`` uses to
  correct the DP schedule with the real effect of each choice on the final sample).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError


def validate(schedule, n: int | None) -> list[int]:
    s = sorted({int(i) for i in schedule})
    if not s or s[0] != 0:
        raise InputError(f"a cache schedule must include call 0 (the first call has nothing cached): {s}")
    if s[0] < 0 or (n is not None and s[-1] >= n):
        raise InputError(f"cache schedule {s} refers to call {s[-1]} but this pipeline call makes {n} UNet calls")
    return s


def uniform(n: int, interval: int) -> list[int]:
    if interval < 1:
        raise InputError("interval must be >= 1")
    return list(range(0, n, interval))


def check_budget(k, n: int, what: str = "budget of", unit: str = " full calls", error: type = InputError,
                 hint: str = "") -> int:
    """The one range check of a budget: ``k`` full UNet calls out of the ``n`` calls of a pipeline call must be in
    ``1..n``. ``error`` / ``what`` / ``hint`` say it in the caller's terms (a calibration's error type, a CLI flag)."""
    if k is None or not 1 <= k <= n:
        raise error(f"{what} {k}{unit} must be in 1..{n}{hint}")
    return k


def even(n: int, k: int) -> list[int]:
    """``k`` full calls spread evenly over ``n``: DeepCache's uniform schedule when an interval gives exactly
    ``k`` calls (``uniform(n, ceil(n / k))``), else the rounded evenly spaced positions."""
    check_budget(k, n)
    s = uniform(n, math.ceil(n / k))
    if len(s) == k:
        return s
    return validate([round(i * n / k) for i in range(k)], n)


def extend(schedule, k: int, n: int) -> list[int]:
    """``schedule`` with full calls added until it has ``k``: each one in the middle of the longest run of cached
    calls (the latest of equal ones, as the last calls move the final sample most; the run after the last full call
    counts too). A schedule for a larger budget that keeps every full call of a smaller one."""
    s = validate(schedule, n)
    if not len(s) <= k <= n:
        raise InputError(f"cannot extend {len(s)} full calls to {k} of {n}")
    while len(s) < k:
        ends = s[1:] + [n]
        i = max(range(len(s)), key=lambda j: (ends[j] - s[j], j))
        s = sorted(s + [s[i] + (ends[i] - s[i]) // 2])
    return s


def quadratic(n: int, interval: int, center: int = 15, power: float = 1.4) -> list[int]:
    """DeepCache's non-uniform schedule: ``ceil(n / interval)`` full calls, spaced by a power law around
    ``center`` (DeepCache's ``sample_from_quad_center`` with its defaults, reproduced literally: its
    negative base to a fractional power is complex, and the cast keeps the real part)."""
    import warnings

    k = math.ceil(n / interval)
    while power > 1:
        x = np.linspace(complex(-center) ** (1 / power), (n - center) ** (1 / power), k + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = [0] + [int(v) + center for v in np.unique(np.real(x ** power).astype(np.int32))[1:-1]]
        if len(idx) == k:
            return validate(idx, n)
        power -= 0.02
    raise InputError(f"no quadratic schedule with {k} full calls out of {n}: use an interval schedule")


def group_cost(F: np.ndarray | None = None, D: np.ndarray | None = None):
    """``cost(j, n) = sum_{i=j}^{n-1} ||F_i - F_j||_1`` (CacheQuant eq. for D(j, n)) from a pairwise
    distance matrix ``D[i, j] = ||F_i - F_j||_1`` (computed from features ``F`` if not given).
    Returns an ``(N+1, N+1)`` array ``C`` with ``C[j, n]`` for ``j < n``."""
    if D is None:
        flat = F.reshape(F.shape[0], -1).astype(np.float64)
        D = np.abs(flat[:, None, :] - flat[None, :, :]).sum(-1)
    N = D.shape[0]
    C = np.full((N + 1, N + 1), np.inf)
    for j in range(N):
        C[j, j + 1:] = np.cumsum(D[j:, j])
    return C


def dp_schedule(C: np.ndarray, k: int, min_len: int = 1, max_len: int | None = None) -> tuple[list[int], float]:
    """Optimal ``k`` group starts minimising the total group cost (CacheQuant's DPS).

    ``L[n, 1] = C[0, n]``; ``L[n, k] = min_j L[j, k-1] + C[j, n]``, groups of length in
    ``[min_len, max_len]``. Returns ``(starts, total_cost)``; ``starts[0] == 0``.
    """
    N = C.shape[0] - 1
    max_len = max_len or N
    check_budget(k, N)
    if k * min_len > N or k * max_len < N:
        raise InputError(f"{k} groups of length {min_len}..{max_len} cannot cover {N} calls")
    L = np.full((k + 1, N + 1), np.inf)
    arg = np.zeros((k + 1, N + 1), dtype=np.int64)
    L[0, 0] = 0.0
    for g in range(1, k + 1):
        for n in range(1, N + 1):
            lo, hi = max(0, n - max_len), n - min_len
            if hi < lo:
                continue
            cand = L[g - 1, lo:hi + 1] + C[lo:hi + 1, n]
            i = int(np.argmin(cand))
            L[g, n], arg[g, n] = cand[i], lo + i
    if not np.isfinite(L[k, N]):
        raise InputError("no feasible schedule")
    starts, n = [], N
    for g in range(k, 0, -1):
        j = int(arg[g, n])
        starts.append(j)
        n = j
    return sorted(starts), float(L[k, N])


def paper_bounds(n: int, k: int) -> tuple[int, int]:
    """CacheQuant's group-length bounds for ``k`` full calls out of ``n``: with the nominal interval
    ``I = n / k``, lengths in ``[ceil(I/2), floor(2I)]`` (widened just enough that a schedule exists)."""
    interval = n / k
    lo, hi = math.ceil(interval / 2), math.floor(2 * interval)
    return min(lo, n // k), max(hi, math.ceil(n / k))


def refine(schedule, objective, n: int, max_evals: int = 200, tol: float = 0.0, progress=None) -> tuple[list[int], float, int]:
    """Coordinate descent over the full calls' positions: move one full call (never call 0) one call earlier
    or later, keep the move if ``objective(schedule)`` (lower is better) drops by more than ``tol``, until no single move helps
    or ``max_evals`` objective evaluations were spent. Keeps the number of full calls.

    The DP's group cost is a proxy (feature distances, summed as if independent); ``objective`` is meant
    to be the measured thing itself (the final sample's error on calibration prompts), so the result is a
    local optimum of the real criterion near the DP's answer, never worse than the start on the objective.
    Returns ``(schedule, objective value, evaluations)``.
    """
    s = validate(schedule, n)
    seen: dict[tuple, float] = {}

    def f(c):
        key = tuple(c)
        if key not in seen:
            seen[key] = float(objective(list(c)))
            if progress is not None:
                progress(len(seen))
        return seen[key]

    best = f(s)
    improved = True
    while improved and len(seen) < max_evals:
        improved = False
        for p in range(1, len(s)):
            for d in (-1, 1):
                c = list(s)
                c[p] += d
                if c[p] <= c[p - 1] or c[p] >= (c[p + 1] if p + 1 < len(c) else n):
                    continue
                if tuple(c) not in seen and len(seen) >= max_evals:
                    continue
                v = f(c)
                if v < best - tol:
                    s, best, improved = c, v, True
    return s, best, len(seen)
