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


def coefficients(m: Moments, full_calls: list[int], gain: bool = True, order: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``, each ``(N, C)``: the DEC coefficients of every call for a schedule (a=1, b=0 on full calls).

    ``gain=False`` is the mean-only variant (``correction="dec-mean"``): ``a = 1``, ``b_t = E[F_t] - E[X]``.
    ``order``: what the cached call hands on before the correction, ``X``: the last full call's feature (0,
    DeepCache's reuse) or its forecast of that order (:mod:`accel.transforms.forecast`).
    """
    from .forecast import sources

    n, c = m.mean.shape
    a = torch.ones(n, c, dtype=torch.float64)
    b = torch.zeros(n, c, dtype=torch.float64)
    full = set(full_calls)
    for t in range(n):
        if t not in full:
            a[t], b[t] = coefficient(m, sources(sorted(full), t, order), t, gain)
    return a, b


def coefficient(m: Moments, srcs: list[int], t: int, gain: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, b_t)`` (each ``(C,)``) for cached call ``t`` whose input is the forecast from the full calls
    ``srcs`` (newest first; one source = reuse). The forecast ``X = sum_m w_m F_{s_m}`` is linear in the
    features, so its moments come from the calibrated ones: ``E[X] = sum w_m E[F_{s_m}]``,
    ``E[X^2] = sum_mn w_m w_n E[F_{s_m} F_{s_n}]``, ``E[X F_t] = sum_m w_m E[F_{s_m} F_t]``."""
    from .forecast import weights

    w = torch.tensor(weights(srcs, t), dtype=torch.float64)
    idx = torch.tensor(srcs)
    mean_x = (w[:, None] * m.mean[idx]).sum(0)
    if gain:
        cross = m.cross[idx][:, idx]  # (S, S, C)
        sq_x = (w[:, None, None] * w[None, :, None] * cross).sum((0, 1))
        var_x = (sq_x - mean_x ** 2).clamp_min(EPS)
        cov = (w[:, None] * m.cross[idx, t]).sum(0) - mean_x * m.mean[t]
        a_t = cov / var_x
    else:
        a_t = torch.ones_like(mean_x)
    return a_t, m.mean[t] - a_t * mean_x


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
