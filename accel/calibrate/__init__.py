"""``accel calibrate``: run the full-precision, uncached pipeline on calibration prompts and store what
the recipe's transforms need (CacheQuant: feature distances for the DP schedule, moments for DEC).

:func:`calibrate` is the whole job: it checks its inputs before any work, collects the statistics
(:mod:`.collect`), fits the DP schedule, refines it or the adaptive threshold (:mod:`.search`) and returns the
:class:`~accel.calibration.Calibration` artifact (its format and tensor keys are :mod:`accel.calibration`'s).

Statistics stream: each batch of prompts contributes partial sums (float64) and its features are freed;
memory is bounded by one batch's ``N`` deep features, not by the number of prompts. Under
``accelerate launch --num_processes N`` the batches are shared out exactly as in ``accel eval`` and the
partial sums are gathered and added in global batch order, so the artifact equals the one-process one.
"""
from __future__ import annotations

import time

import torch

from .. import __version__, adapters, schedules
from ..errors import InputError
from ..calibration import Calibration, cache_key, dscale_key, inherit_key, quant_layers, refined_key, refined_name
from ..recipe import load as load_recipe
from ..transforms.cache import FeatureCache
from ..transforms.dec import Moments, coefficients
from ..transforms.inherit import Inherit
from ..unet import cached_units, resolve
from .collect import (INHERIT_ELEMENTS, REC_HOOK, _batch_stats, _dist_stats, _static, collect_difference,  # noqa: F401
                      collect_features, collect_quant_dec, collect_scales)
from .search import calibrate_threshold, refine_schedule

DEFAULT_BUDGET = 10  # full UNet calls per pipeline call when no budget is given
DEFAULT_PROMPTS = 8  # calibration prompts (the miniature's train stream) when none are given
REFINE_PROMPTS = 8  # of them, the ones a cache's schedule (or adaptive threshold) is refined on, by default: on 4 the
# refinement overfits (held-out fidelity 1-4 dB below the fit prompts'; docs/CACHE_BENCHMARKS.md's fit column)
DIFFERENCE_PROMPTS = 64  # of them, the ones a guidance-difference model (FeatureCache(difference='calibrated')) is fit
# on, by default; the default prompt list grows to this many for such a recipe (issue #25: 3 coefficients per channel
# and cached call, fit on 128 prompts in the lab probe)


def unet_calls(pipe, steps: int) -> int:
    """UNet calls one text-to-image pipeline call of ``steps`` steps makes with the pipeline's scheduler
    (PNDM: steps + 1), known before running it."""
    s = type(pipe.scheduler).from_config(pipe.scheduler.config)
    s.set_timesteps(steps)
    return len(s.timesteps)


def check_recipe(recipe):
    """The :class:`Recipe` for ``recipe`` if it has something to calibrate, else a one-line ``ValueError``."""
    from ..calibration import uses_calibration
    from ..recipe import available

    r = load_recipe(recipe) if not hasattr(recipe, "transforms") else recipe
    if not any(uses_calibration(t) for t in r.transforms):
        users = [n for n in available() if any(uses_calibration(t) for t in load_recipe(n).transforms)]
        raise InputError(f"recipe {r.name!r} uses no calibration (none of its transforms reads one): nothing to "
                         f"calibrate; recipes that use one: {', '.join(users)}")
    return r


def refines_cache(recipe, refine: bool = True) -> bool:
    """Whether calibrating ``recipe`` fits a cache's schedule (unless ``refine`` is off) or its adaptive threshold on
    the refinement prompts, the ones ``refine_prompts`` counts."""
    r = recipe if hasattr(recipe, "transforms") else load_recipe(recipe)  # checked by the caller (check_recipe)
    caches = [t for t in r.transforms if isinstance(t, FeatureCache)]
    return bool(caches) and (refine or caches[0].schedule == "adaptive")


def fits_difference(recipe) -> bool:
    """Whether calibrating ``recipe`` fits a guidance-difference model (a ``FeatureCache(difference='calibrated')``)."""
    r = recipe if hasattr(recipe, "transforms") else load_recipe(recipe)
    return any(isinstance(t, FeatureCache) and t.difference is not None for t in r.transforms)


def default_prompt_count(recipe, difference_prompts: int | None = None) -> int:
    """How many calibration prompts to draw when none are given: :data:`DEFAULT_PROMPTS`, or as many as the
    guidance-difference fit runs."""
    if not fits_difference(recipe):
        return DEFAULT_PROMPTS
    return max(DEFAULT_PROMPTS, difference_prompts if difference_prompts is not None else DIFFERENCE_PROMPTS)


def check_difference_prompts(difference_prompts: int | None, n_prompts: int) -> None:
    """More guidance-difference prompts than calibration prompts would silently fit on fewer than asked for."""
    if difference_prompts is not None and difference_prompts > n_prompts:
        raise InputError(f"--difference-prompts {difference_prompts} is more than the {n_prompts} calibration prompts: "
                         f"give at least {difference_prompts} prompts (--num-prompts) or --difference-prompts {n_prompts}")


def check_refine_prompts(refine_prompts: int | None, n_prompts: int) -> None:
    """More refinement prompts than calibration prompts would silently fit on fewer than asked for."""
    if refine_prompts is not None and refine_prompts > n_prompts:
        raise InputError(f"--refine-prompts {refine_prompts} is more than the {n_prompts} calibration prompts: give "
                         f"at least {refine_prompts} prompts (--num-prompts) or --refine-prompts {n_prompts}")


def _check_inputs(pipe, prompts, steps, budget, guidance, batch_size, refine_prompts, refine_evals,
                  uses_budget: bool, refines: bool = False, refine_prompts_given: bool = False) -> list[int]:
    """Every argument of :func:`calibrate` that can be checked before the pipeline runs; returns the budgets.
    ``refines``: the cache's schedule or threshold will be fit on the first ``refine_prompts`` prompts (a number
    given for a calibration that refines nothing is ignored, with a warning)."""
    import math
    import warnings

    from ..errors import AccelWarning

    if not prompts:
        raise InputError("no calibration prompts")
    if steps < 2:
        raise InputError("--steps must be >= 2")
    for name, v in (("--batch-size", batch_size), ("--refine-prompts", refine_prompts), ("--refine-evals", refine_evals)):
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if not math.isfinite(guidance):
        raise InputError(f"--guidance must be a finite number, got {guidance}")
    if refines:
        check_refine_prompts(refine_prompts, len(prompts))
    elif refine_prompts_given:
        warnings.warn("--refine-prompts is ignored: nothing is refined (no FeatureCache in the recipe, or --no-refine "
                      "with a fixed schedule)", AccelWarning, stacklevel=3)
    n = unet_calls(pipe, steps)
    given = budget is not None
    budgets = [int(b) for b in (budget if isinstance(budget, (list, tuple)) else [budget if given else DEFAULT_BUDGET])]
    if not budgets or min(budgets) < 1:
        raise InputError("--budget must be >= 1")
    if not uses_budget:  # W8A8 alone: the budget only sets the default of the stored cache statistics
        if given:
            warnings.warn("--budget is ignored: the recipe has no FeatureCache and no Inherit(schedule='calibrated')",
                          AccelWarning, stacklevel=3)
        return [min(DEFAULT_BUDGET, n)]
    if max(budgets) > n:
        what = f"--budget {' '.join(map(str, budgets))}" if given else f"the default --budget {DEFAULT_BUDGET}"
        raise InputError(f"{what}: full calls must be in 1..{n}, the UNet calls of one pipeline call at {steps} steps "
                         f"({type(pipe.scheduler).__name__}); give --budget K with K <= {n}")
    return budgets


def calibrate(pipe, recipe="cachequant-dp", prompts: list[str] | None = None, steps: int = 50,
              budget: int | list[int] | None = None, seed: int = 0, guidance: float = 7.5, batch_size: int = 4,
              constrained: bool = True, prompt_source: str = "miniature grammar (train stream)", progress: bool = True,
              refine: bool = True, refine_prompts: int | None = None, refine_evals: int = 60,
              difference_prompts: int | None = None) -> Calibration:
    """Calibrate ``pipe`` for ``recipe`` and return the :class:`Calibration` (``.save(DIR)`` writes it).

    ``budget``: full UNet calls per pipeline call, or a list of them (the first is the default budget of the
    artifact; default :data:`DEFAULT_BUDGET`); a recipe without a cache or a calibrated ``Inherit`` needs none
    (a given one is ignored, with a warning). With a cache and ``refine``, each budget's DP schedule is refined by :func:`refine_schedule` on
    the first ``refine_prompts`` prompts (default :data:`REFINE_PROMPTS`, or all when fewer are given; more than
    were given is an error) (at most ``refine_evals`` pipeline runs per start); other budgets
    asked for later get the DP schedule alone. With a ``Quantize`` too, its activation scales are measured first and
    the schedule (or the adaptive threshold) is fit with the quantized model running: on the miniature a forecast
    schedule refined without it lost 1.8 dB once quantized (docs/BENCHMARKS.md).

    With ``FeatureCache(difference="calibrated")`` (a ``-cfg`` forecast), the guidance-difference norm model is fit for
    each budget's final schedule on the first ``difference_prompts`` prompts (default :data:`DIFFERENCE_PROMPTS`, or
    all when fewer are given; when ``prompts`` is None, that many train prompts are drawn): closed-loop records of the
    cache running (:func:`accel.calibrate.collect.collect_difference`); it needs guidance (``guidance > 1``)."""
    import diffusers

    from accel import miniature

    from ..transforms.quantize import Quantize

    t0 = time.time()
    r = check_recipe(recipe)
    caches = [t for t in r.transforms if isinstance(t, FeatureCache)]
    quants = [t for t in r.transforms if isinstance(t, Quantize)]
    inherits = [t for t in r.transforms if isinstance(t, Inherit) and t.schedule == "calibrated"]
    difference = fits_difference(r)
    if difference_prompts is not None and difference_prompts < 1:
        raise InputError(f"--difference-prompts must be >= 1, got {difference_prompts}")
    if difference and not guidance > 1:
        raise InputError(f"FeatureCache(difference='calibrated') models the classifier-free guidance difference: "
                         f"calibrate with guidance > 1 (got {guidance})")
    prompts = prompts if prompts is not None else \
        miniature.prompts(default_prompt_count(r, difference_prompts), seed=seed, split="train")
    if difference:
        check_difference_prompts(difference_prompts, len(prompts))
        difference_prompts = min(DIFFERENCE_PROMPTS, len(prompts)) if difference_prompts is None else difference_prompts
    unet, pipe = resolve(pipe)
    if pipe is None:
        raise InputError("calibration needs the pipeline (it runs it), not a bare UNet")
    given = refine_prompts is not None
    if refine_prompts is None:
        refine_prompts = min(REFINE_PROMPTS, len(prompts))
    budgets = _check_inputs(pipe, prompts, steps, budget, guidance, batch_size, refine_prompts, refine_evals,
                            uses_budget=bool(caches or inherits), refines=refines_cache(r, refine),
                            refine_prompts_given=given)
    budget = budgets[0]
    meta = {
        "recipe": {"name": r.name, "transforms": [t.to_dict() for t in r.transforms]},
        "versions": {"accel": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "model": {"class": type(unet).__name__, "fingerprint": adapters.fingerprint(unet), "adapters": adapters.record(unet)},
        "prompts": {"source": prompt_source, "count": len(prompts)},
        "generation": {"seed": seed, "guidance": guidance, "batch_size": batch_size},
    }
    tensors: dict[str, torch.Tensor] = {}
    cache = caches[0] if caches else None
    branch = cache.branch if cache else 0
    modules = {}
    if caches or quants:
        modules["cache"] = (cached_units(unet, branch)[1].module, False, None, _batch_stats)
    targets = inherits[0].matched(unet) if inherits else {}
    for path, m in targets.items():
        modules[f"inherit.{path}"] = (m, inherits[0].residual, INHERIT_ELEMENTS, _dist_stats)
    totals, n = collect_features(pipe, modules, prompts, steps, seed, guidance, batch_size, progress)
    meta["scheduler"] = {"class": type(pipe.scheduler).__name__, "steps": steps, "unet_calls": n}
    for b in budgets:  # n is now measured (UNet calls per pipeline call), not predicted from the scheduler
        schedules.check_budget(b, n, "--budget", "", hint=" (UNet calls per pipeline call)")
    if inherits:
        for path in targets:
            tensors[inherit_key(path)] = totals[f"inherit.{path}"]["dist"]
        meta["inherit"] = {"targets": list(targets), "residual": inherits[0].residual, "budget": budget}
        meta["inherit"]["schedule"] = Calibration(meta, tensors).inherit_schedule(list(targets), n, inherits[0].residual)
    if not (caches or quants):
        meta["seconds"] = round(time.time() - t0, 2)
        return Calibration(meta, tensors)
    stats = totals["cache"]
    count = stats["count"] * 1.0
    m = Moments(stats["sum"] / count, stats["sumsq"] / count, stats["cross"] / count)
    C = schedules.group_cost(D=stats["dist"].numpy())
    lo, hi = schedules.paper_bounds(n, budget) if constrained else (1, n)
    full, cost = schedules.dp_schedule(C, budget, lo, hi)
    tensors.update({cache_key(branch, "distance"): stats["dist"], cache_key(branch, "mean"): m.mean,
                    cache_key(branch, "sq"): m.sq, cache_key(branch, "cross"): m.cross})
    meta["cache"] = {"branch": branch, "budget": budget, "dp_schedule": full, "constrained": constrained,
                     "group_len": [lo, hi], "dp_cost": cost}
    quant = _static(quants[0]) if quants else None
    if quant is not None:  # the scales do not depend on the schedule: measured first, so that it is fit with them
        qt = collect_scales(pipe, quant, prompts, steps, n, seed, guidance, batch_size, progress)
        tensors.update(qt)
        meta["quant"] = {"layers": len(quant_layers(qt, "shift"))}
    if cache is not None and cache.schedule == "adaptive":
        meta["cache"]["adaptive"] = [calibrate_threshold(pipe, cache, Calibration(meta, tensors), budgets,
                                                         prompts[:refine_prompts], steps, seed, guidance, progress,
                                                         quant=quant)]
    elif refine and cache is not None:
        meta["cache"]["refined"] = {}
        ref_prompts = prompts[:refine_prompts]
        smaller = None  # the refined schedule of the next smaller budget: more budget must not be worse
        for k in sorted(set(budgets)):
            calib = Calibration(meta, tensors)
            dp = calib.cache(branch, k).dp_calls(k)
            r = refine_schedule(pipe, cache, calib, dp, ref_prompts, steps, seed, guidance, refine_evals, progress,
                                quant=quant, smaller=smaller)
            smaller = (r["schedule"], r["error_db"])
            tensors[refined_key(branch, k, cache.prediction)] = torch.tensor(r.pop("schedule"), dtype=torch.int64)
            meta["cache"]["refined"][refined_name(k, cache.prediction)] = r
    if difference:  # the guidance-difference model of each schedule this calibration serves, before the DEC needs it
        meta["cache"]["difference"] = {"prompts": difference_prompts, "budgets": sorted(set(budgets))}
        t1 = time.time()
        for k in sorted(set(budgets)):
            calib = Calibration(meta, tensors)
            tensors[dscale_key(branch, k, cache.prediction)] = collect_difference(
                pipe, cache, calib, calib.cache(branch, k).full_calls(n, k, cache.prediction), prompts[:difference_prompts],
                steps, seed, guidance, batch_size, progress, quant=quant)
        meta["cache"]["difference"]["seconds"] = round(time.time() - t1, 2)
    full = Calibration(meta, tensors).cache(branch, budget).full_calls(n, budget, cache.prediction if cache else None)
    a, b = coefficients(m, full)
    tensors.update({cache_key(branch, "schedule"): torch.tensor(full, dtype=torch.int64), cache_key(branch, "dec_a"): a,
                    cache_key(branch, "dec_b"): b})
    meta["cache"]["schedule"] = full
    if quant is not None:
        dec = {}
        if quants[0].correction == "dec" and cache is not None:
            dec = collect_quant_dec(pipe, quant, cache, Calibration(meta, tensors), prompts, steps, n, seed, guidance,
                                    batch_size, progress)
            tensors.update(dec)
        meta["quant"]["dec_layers"] = quant_layers(dec, "dec_alpha")
    meta["seconds"] = round(time.time() - t0, 2)
    return Calibration(meta, tensors)
