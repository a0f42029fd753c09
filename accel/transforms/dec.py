"""Decoupled error correction (DEC, CacheQuant, Liu et al. CVPR 2025), closed form, per call and channel.

Cache error. On cached call ``t`` the shallow path consumes ``X = F_j`` (the deep feature kept at the last
full call ``j``) instead of the true ``F_t``. Per channel ``c``, over batch x H x W (PAPERS.md, 4):

    a_t[c] = Cov(X_c, F_t,c) / Var(X_c)
    b_t[c] = mean(F_t,c) - a_t[c] * mean(X_c)
    h      = a_t * h_cached + b_t              (full calls: a = 1, b = 0)

Mean-only variant (ours, ``correction="dec-mean"``): ``a_t = 1``, ``b_t = mean(F_t) - mean(X)``. The least-squares
gain ``a_t < 1`` pulls every sample's cached feature towards the calibration mean: optimal for the feature's MSE on
the uncached calibration trajectories, not necessarily for the final image. The mean shift alone never does that.
On earlier miniature weights it gave higher PSNR at long cache groups; on the shipped ones the two are within
0.25 dB (docs/BENCHMARKS.md compares both).

Everything needed for *any* schedule is in a few moments per call and channel, collected once on
uncached trajectories: ``E[F_i]``, ``E[F_i^2]`` and the cross moments ``E[F_j F_t]`` (see
:class:`Moments`), so one calibration serves every budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass
class Moments:
    """Per-call, per-channel moments of the deep feature over batch x H x W (float64).

    ``mean[i, c] = E[F_i,c]``, ``sq[i, c] = E[F_i,c^2]``, ``cross[j, t, c] = E[F_j,c F_t,c]``.
    """

    mean: torch.Tensor   # (N, C)
    sq: torch.Tensor     # (N, C)
    cross: torch.Tensor  # (N, N, C)


def coefficients(m: Moments, full_calls: list[int], gain: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``, each ``(N, C)``: the DEC coefficients of every call for a schedule (a=1, b=0 on full calls).

    ``gain=False`` is the mean-only variant (``correction="dec-mean"``): ``a = 1``, ``b_t = E[F_t] - E[X]``.
    """
    n, c = m.mean.shape
    a = torch.ones(n, c, dtype=torch.float64)
    b = torch.zeros(n, c, dtype=torch.float64)
    full = sorted(full_calls)
    j = 0
    for t in range(n):
        if t in full:
            j = t
            continue
        if gain:
            var_x = (m.sq[j] - m.mean[j] ** 2).clamp_min(EPS)
            cov = m.cross[j, t] - m.mean[j] * m.mean[t]
            a[t] = cov / var_x
        b[t] = m.mean[t] - a[t] * m.mean[j]
    return a, b


class CacheDEC:
    """Run-time side: the affine correction of the reused feature on each cached call."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a.float(), b.float()
        self._fns: dict[int, object] = {}

    def for_call(self, t: int):
        fn = self._fns.get(t)
        if fn is None:
            a_t, b_t = self.a[t].view(1, -1, 1, 1), self.b[t].view(1, -1, 1, 1)

            def fn(h, a_t=a_t, b_t=b_t):
                return torch.addcmul(b_t.to(h), a_t.to(h), h)

            self._fns[t] = fn
        return fn
