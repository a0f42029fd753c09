"""The searches of ``accel calibrate`` that run the pipeline with the cache on: a cache schedule refined on the
final samples' error (:func:`refine_schedule`), and the adaptive cache's probe threshold per budget
(:func:`calibrate_threshold`)."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .. import schedules
from ..calibration import Calibration
from ..transforms.cache import FeatureCache
from .collect import _run_batches

def calibrate_threshold(pipe, cache: FeatureCache, calib: Calibration, budgets: list[int], prompts: list[str], steps: int,
                        seed: int, guidance: float, progress: bool = True, iterations: int = 10,
                        bounds: tuple[float, float] = (1e-3, 1.0), quant=None) -> dict:
    """The probe threshold of ``FeatureCache(schedule="adaptive")`` that spends each budget.

    For a threshold, the pipeline runs each of ``prompts`` (the refinement's share of the calibration prompts) alone (image i with seed ``seed + i``; alone,
    because a batch runs the full UNet when any of its samples needs it) with the recipe's adaptive cache
    (its branch, forecast, cap and correction), and the full calls are counted (``Handle.stats()``). Fewer full
    calls with a higher threshold: bisection in log space finds, per budget K, the smallest threshold whose mean
    is at most K. Returns the record stored in ``accel.json`` (``cache.adaptive``): the cache's settings, the
    threshold and the mean full calls measured per budget.
    """
    from ..api import apply

    t0 = time.time()
    batches = [[i] for i in range(len(prompts))]
    spent: dict[float, float] = {}

    def mean_full(tau: float) -> float:
        if tau not in spent:
            fc = cache.replace(schedule="adaptive", threshold=tau, budget=None, interval=None)
            handle = apply(pipe, fc if quant is None else [quant, fc], calibration=calib)
            try:
                for _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, range(len(batches)), "", False):
                    pass
                spent[tau] = handle.stats()["full_per_pipeline_call"]
            finally:
                handle.remove()
            bar.update()
        return spent[tau]

    thresholds, full = {}, {}
    bar = tqdm(total=iterations * len(budgets) + 2, desc="calibrate adaptive threshold", disable=not progress)
    try:
        for k in budgets:
            lo, hi = bounds  # mean_full(lo) > k expected, mean_full(hi) <= k expected
            if mean_full(hi) > k:
                lo = hi
            elif mean_full(lo) <= k:
                hi = lo
            for _ in range(iterations if lo < hi else 0):
                mid = (lo * hi) ** 0.5
                if mean_full(mid) > k:
                    lo = mid
                else:
                    hi = mid
            thresholds[str(k)], full[str(k)] = hi, round(mean_full(hi), 3)
    finally:
        bar.close()
    return {"forecast": cache.prediction, "max_cached": cache.max_cached, "correction": cache.correction,
            "quantized": quant is not None,
            "thresholds": thresholds, "full_calls": full, "prompts": len(prompts), "runs": len(spent) * len(prompts),
            "seconds": round(time.time() - t0, 2)}


def refine_schedule(pipe, cache: FeatureCache, calib: Calibration, start: list[int], prompts: list[str], steps: int,
                    seed: int, guidance: float, max_evals: int = 60, progress: bool = True, quant=None,
                    smaller: tuple[list[int], float] | None = None) -> dict:
    """Refine a cache schedule on what it is for: the error of the final sample.

    The DP (CacheQuant's DPS) minimises a proxy, the summed feature distance of each cached call to its group's
    full call, as if a cached call cost the same wherever it falls. On the miniature one cached call among the
    last few moves the final sample an order of magnitude more than one mid-sampling (nothing after it corrects
    the error; ``notebooks/cache_schedules.ipynb`` measures it), and the DP's schedule lost to the uniform one
    at 11 and 8 full calls of 51. This runs the pipeline with
    the recipe's cache (its branch, forecast and correction; with ``quant``, the recipe's static quantizer without
    quantization DEC, its activation scales in ``calib``: the schedule is fit on the model that will run) on ``prompts`` (image i with seed ``seed + i``, the
    calibration seeds) and moves full calls one at a time while the final latents get closer to the
    uncached ones (:func:`accel.schedules.refine`). The objective is the mean over images of
    ``10 log10 MSE(latent, uncached latent)`` (dB, lower is better): a latent-space negative PSNR. ``dp_error_db``
    in the result is the DP schedule's value (the refinement is never worse on these prompts).

    The search starts from the DP's schedule and from the even one. ``smaller`` is the refined schedule of a smaller
    budget and its error on the same prompts: when both searches end worse than it (more full calls, a larger
    error: a poorer local optimum), a third starts from that schedule with the extra full calls added in its
    longest cached runs (:func:`accel.schedules.extend`), so that more budget is not worse on these prompts.
    Every process runs the same search on the same prompts, so the result does not depend on the process count.
    """
    from ..api import apply

    t0 = time.time()

    def latents():  # all refinement prompts in one pipeline call, image i with seed ``seed + i``
        (_, lat), = _run_batches(pipe, prompts, steps, seed, guidance, [list(range(len(prompts)))], [0], "", False)
        return lat.double()

    base = latents()
    measured: dict[tuple, float] = {}  # one pipeline run per schedule, shared by both searches

    def error_db(full):
        key = tuple(full)
        if key not in measured:
            fc = cache.replace(schedule=list(full), interval=None, budget=None, threshold=None, max_cached=None,
                               difference=None)  # the schedule is refined without the difference model (issue #25)
            handle = apply(pipe, fc if quant is None else [quant, fc], calibration=calib)
            try:
                d = latents() - base
            finally:
                handle.remove()
            mse = (d ** 2).flatten(1).mean(1).clamp_min(1e-30)
            measured[key] = (10 * torch.log10(mse)).mean().item()
        return measured[key]

    n = calib.cache(cache.branch).n
    starts = {"dp": list(start), "uniform": schedules.even(n, len(start))}
    bar = tqdm(total=max_evals * len(starts), desc=f"refine schedule ({len(start)} full)", disable=not progress)
    found = {}

    def search(name, s):
        done = bar.n  # the evaluations of the searches before this one
        found[name] = schedules.refine(s, error_db, n, max_evals, tol=0.01,
                                       progress=lambda count: bar.update(done + count - bar.n))

    try:
        for name, s in starts.items():
            if name == "dp" or s != starts["dp"]:
                search(name, s)
        if smaller is not None and min(v[1] for v in found.values()) > smaller[1]:
            bar.total += max_evals
            search("smaller", schedules.extend(smaller[0], len(start), n))
    finally:
        bar.close()
    best = min(found, key=lambda k: found[k][1])
    full, db, _ = found[best]
    return {"schedule": full, "dp": list(start), "dp_error_db": round(error_db(start), 3), "error_db": round(db, 3),
            "from": best, "evals": len(measured), "prompts": len(prompts), "quantized": quant is not None,
            "seconds": round(time.time() - t0, 2)}
