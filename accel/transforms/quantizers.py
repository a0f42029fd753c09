"""The quantizers of W8A8 (CacheQuant / Q-Diffusion): int8 weights per output channel with an L_p-searched
clipping range, and the scale of a per-tensor activation quantizer from its range or an MSE clip search.
Pure functions on tensors; the quantized layers (:mod:`.qlayers`) and the transform (:mod:`.quantize`) use them."""
from __future__ import annotations

import torch

from .. import kernels

P_NORM = 2.4
CLIP_GRID = torch.linspace(0.5, 1.0, 21)


# ----------------------------------------------------------------------------------- weight quantization
def quantize_weight(w: torch.Tensor, symmetric: bool = True, search: bool = True):
    """Per-output-channel int8 of a ``(O, ...)`` weight: ``(q int8, scale (O,), zero (O,) int or None)``."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    best_err = torch.full((flat.shape[0],), float("inf"), device=flat.device)
    best = None
    for alpha in (CLIP_GRID if search else torch.tensor([1.0])):
        if symmetric:
            s = (flat.abs().amax(1) * alpha / 127).clamp_min(1e-12)
            q = kernels.reference.round_half_away(flat / s[:, None]).clamp(-127, 127)
            deq, z = q * s[:, None], None
        else:
            lo, hi = flat.amin(1).clamp(max=0) * alpha, flat.amax(1).clamp(min=0) * alpha
            s = ((hi - lo) / 255).clamp_min(1e-12)
            z = (-128 - kernels.reference.round_half_away(lo / s)).clamp(-128, 127)
            q = (kernels.reference.round_half_away(flat / s[:, None]) + z[:, None]).clamp(-128, 127)
            deq = (q - z[:, None]) * s[:, None]
        err = (deq - flat).abs().pow(P_NORM).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        if best is None:
            best = [q.clone(), s.clone(), None if z is None else z.clone()]
        else:
            best[0][better], best[1][better] = q[better], s[better]
            if z is not None:
                best[2][better] = z[better]
    q, s, z = best
    return q.to(torch.int8).reshape(w.shape), s.float(), (None if z is None else z.to(torch.int8))


def range_scale(absmax: float) -> float:
    """The scale that maps ``[-absmax, absmax]`` onto int8 without clipping."""
    return absmax / 127 if absmax > 0 else 1.0


def mse_scale(samples: torch.Tensor, absmax: float) -> float:
    """Symmetric per-tensor activation scale minimising the MSE on ``samples`` (CacheQuant's MSE search)."""
    if absmax <= 0:
        return 1.0
    best, best_s = float("inf"), absmax / 127
    for alpha in CLIP_GRID:
        s = absmax * float(alpha) / 127
        q = kernels.reference.round_half_away(samples / s).clamp(-127, 127)
        err = ((q * s - samples) ** 2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s
