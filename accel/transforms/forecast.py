"""Forecasting the skipped deep feature instead of reusing it (TaylorSeer, Liu et al. 2025, for UNets).

On a full call ``j`` the cache keeps the deep feature ``F_j``; DeepCache hands ``F_j`` itself to the shallow
path on every cached call ``t > j``. TaylorSeer expands the feature in the step index instead: with finite
differences of the features kept at the last full calls, ``F_t ~ sum_i Delta^i F (t - j)^i / i!``
(PAPERS.md, "Run-time caches and forecasting"). With uneven spacing between full calls (DP or adaptive
schedules) the finite differences are Newton's divided differences, and the expansion is the polynomial
through the last ``order + 1`` kept features, evaluated at ``t``. Written in Lagrange form it is a weighted
sum of the kept features:

    F_t ~ sum_m w_m(t) F_{x_m},   w_m(t) = prod_{l != m} (t - x_l) / (x_m - x_l)

so a cached call costs ``order + 1`` multiply-adds of the feature, and the weights depend only on call
indices (host integers: no device work, no sync). ``order = 0`` is plain reuse (``w = [1]``). Until
``order + 1`` full calls exist, the highest order they allow is used.

The same weights serve the run-time probe (:mod:`accel.transforms.adaptive`: how far the shallow feature is
from *its* forecast) and the error correction on top of a forecast (:func:`accel.transforms.dec.coefficients`
with the forecast's sources and weights: the moments of a linear combination are linear in the calibrated
cross moments).

Under classifier-free guidance the batch is two halves, unconditional and conditional, and the deep feature is
their mean plus or minus half their difference. The two move differently between full calls: on the miniature at
25 DPM-Solver++ steps the mean changes 3-12% per call, smoothly (a straight line through the last two full calls
cuts its error 2-3x against reuse), while the difference changes 8-30% per call and not along a line (extrapolating
it is *worse* than reuse from 4 calls on, and no 2-point combination does much better). The ``-cfg`` forecasts
(``"taylor1-cfg"``, ``"taylor2-cfg"``) extrapolate the mean only and keep the difference of the last full call:
both halves take the mean of the two halves' forecast steps (:func:`cfg_mean_step`). The guided output weighs the
difference by ``guidance - 1/2``, so its errors count most. Issue #25's probes (32 held-out prompts, DPM-Solver++ 25):
the schedule refined with ``"taylor1-cfg"`` reaches uniform I=3's 43.5 dB with 7 full calls of 25 (refined
``taylor1`` + skill: 7.7), and at 50 PNDM steps (short gaps, where the difference does move along a line) plain
``"taylor1"`` stays better.
"""
from __future__ import annotations

import torch

ORDERS = {None: 0, "taylor1": 1, "taylor2": 2, "taylor1-cfg": 1, "taylor2-cfg": 2}


def order_of(forecast: str | None) -> int:
    if forecast not in ORDERS:
        raise ValueError(f"forecast {forecast!r}: use None (reuse the last feature), 'taylor1' or 'taylor2' (or "
                         "'taylor1-cfg' / 'taylor2-cfg': the guidance mean forecast, the difference reused)")
    return ORDERS[forecast]


def on_cfg_mean(forecast: str | None) -> bool:
    """Whether ``forecast`` extrapolates only the mean of the guidance halves (the ``-cfg`` forecasts)."""
    return forecast is not None and forecast.endswith("-cfg")


def cfg_mean_step(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The forecast ``h`` of a guidance batch ``[uncond; cond]`` (``(2B, ...)``) with the difference of its halves
    put back to that of ``last``, the last full call's feature: with ``step = h - last``, both halves get
    ``last + (step_uncond + step_cond) / 2``, so the halves' mean is forecast as ``h``'s and their difference is
    ``last``'s (symmetric in the halves: their order does not matter)."""
    u, c = (h - last).chunk(2)
    mean = (u + c) / 2
    return last + torch.cat([mean, mean])


def weights(xs: list[int], t: int) -> list[float]:
    """Lagrange weights of the polynomial through the points ``xs`` (distinct call indices), evaluated at
    ``t``: ``p(t) = sum_m w[m] F(xs[m])``. One point gives ``[1.0]`` (reuse)."""
    out = []
    for m, xm in enumerate(xs):
        w = 1.0
        for l, xl in enumerate(xs):
            if l != m:
                w *= (t - xl) / (xm - xl)
        out.append(w)
    return out


def sources(full_calls: list[int], t: int, order: int) -> list[int]:
    """The full calls a forecast at call ``t`` uses: the last ``order + 1`` full calls before ``t``
    (fewer at the start), newest first."""
    before = [j for j in full_calls if j < t]
    return before[::-1][: order + 1]


def skill(f: torch.Tensor, kept: list[torch.Tensor], idx: list[int], order: int, cfg: bool = False) -> torch.Tensor:
    """How far to trust the forecast after the full call that produced ``f`` (call ``idx[0]``), per sample.

    ``kept`` holds the features of the full calls before it (newest first, calls ``idx[1:]``). The forecast the
    cache would have handed on at this call, ``X`` (from the ``order + 1`` full calls before it), is compared
    with the truth ``f`` and with reuse of the previous feature; the skill score against persistence, as
    weather forecasts are scored,

        s = 1 - ||f - X||^2 / ||f - F_prev||^2,   clamped to [0, 1]

    is 1 where the forecast was exact and 0 where it did no better than reuse (with one earlier full call the
    forecast *is* reuse: 0). ``cfg``: the forecast is a ``-cfg`` one (:func:`cfg_mean_step`). Computed on the
    device, no sync. Returns ``(B, 1, ...)`` (or a 0-dim zero)."""
    n = min(len(kept), order + 1)
    if n < 2:
        return torch.zeros((), device=f.device, dtype=f.dtype)
    w = weights(idx[1:1 + n], idx[0])
    x = kept[0] * w[0]
    for m in range(1, n):
        x = x + kept[m] * w[m]
    if cfg:
        x = cfg_mean_step(x, kept[0])
    err = (f - x).flatten(1).pow(2).sum(1)
    ref = (f - kept[0]).flatten(1).pow(2).sum(1).clamp_min(1e-30)
    return (1 - err / ref).clamp(0, 1).view(-1, *[1] * (f.dim() - 1)).to(f.dtype)


# ----------------------------------------------------------------------------------- the guidance difference
# Issue #25's norm model of the difference a ``-cfg`` forecast keeps. On a cached call ``t`` with last full call ``j``
# and the full call ``p`` before it, the kept difference ``D_j`` (conditional half minus unconditional half of the
# deep feature, per sample) is rescaled per sample and channel:
#
#     D_hat_t = D_j * exp(y),   y = W[t, c, :] . [1, log(|D_j| / |D_p|), log |D_j|]
#
# where ``|.|`` is the norm over spatial positions of one sample's channel. ``W`` (C x 3 per cached call) is fit by
# ridge regression on closed-loop records (``accel calibrate``: the cache running on training prompts, the true deep
# feature computed at each cached call), target ``log(|D_true_t| / |D_j|)``: the difference's *direction* is kept from
# the last full call (least-squares channel mixing of it lost 2-3 dB closed loop), only its size per channel moves.
# Before a second full call ``p`` there is no ratio: its regressor is 0 (so too in the fit).
DIFFERENCE_REGRESSORS = 3  # [1, log(|D_j| / |D_p|), log |D_j|]
NORM_FLOOR = 1e-12


def guidance_difference(f: torch.Tensor) -> torch.Tensor:
    """``cond - uncond`` of a guidance batch ``[uncond; cond]`` (``(2B, C, ...)`` -> ``(B, C, ...)``)."""
    u, c = f.chunk(2)
    return c - u


def log_norms(d: torch.Tensor) -> torch.Tensor:
    """``log |d|`` per sample and channel, the norm over the remaining (spatial) dims, in float32: ``(B, C)``."""
    return d.float().flatten(2).norm(dim=-1).clamp_min(NORM_FLOOR).log()


def difference_regressors(last: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept difference ``D_j`` of ``last`` (the last full call's feature, ``(2B, C, ...)``) and the regressors
    ``x = [1, log(|D_j| / |D_p|), log |D_j|]`` of the norm model, ``(B, C, 3)`` float32 (``prev`` None: ratio 0)."""
    d_j = guidance_difference(last)
    n_j = log_norms(d_j)
    ratio = n_j - log_norms(guidance_difference(prev)) if prev is not None else torch.zeros_like(n_j)
    return d_j, torch.stack([torch.ones_like(n_j), ratio, n_j], dim=-1)


def rescale_difference(h: torch.Tensor, d_j: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h`` (a ``-cfg`` forecast: its halves' difference is ``d_j``) with the difference rescaled to
    ``D_hat = d_j * exp(x . w)`` (``w``: ``(C, 3)``, this call's row of ``W``) and the halves' mean unchanged:
    ``uncond - (D_hat - d_j) / 2``, ``cond + (D_hat - d_j) / 2``. ``w = 0`` gives ``h`` itself."""
    y = (x * w).sum(-1)  # (B, C)
    step = d_j * torch.expm1(y).to(d_j.dtype).view(*y.shape, *[1] * (d_j.dim() - 2)) / 2
    return h + torch.cat([-step, step])
