"""``accel bench --sections curves``: fidelity against full UNet calls for every cache mode, side by side.

For each sampler setting (50-step PNDM, 25-step DPM-Solver++ multistep, 30-step Euler) on the miniature:

1. Calibrations on the *train* prompts (``accel calibrate``'s defaults: 8 prompts, the refinement and the
   adaptive threshold on the first ``refine_prompts`` of them): CacheQuant's DP, the DP refined with plain
   reuse, with the ``taylor1`` forecast and with ``taylor1-cfg`` (recipe cache-forecast-cfg; with the guidance-difference
   model fit for it, recipe cache-forecast-cfg-d), and the adaptive schedule's threshold with and without the
   forecast, for the budgets of DeepCache's uniform schedule at the intervals asked for.
2. Every mode run on *held-out* prompts and seeds (never calibrated on), compared with the uncached images of
   the same seeds: full calls actually spent (``Handle.stats()``: adaptive modes decide per call and per batch),
   mean and median PSNR, SSIM, and the share of images whose judged shape or colour differs from the uncached
   image's (a flipped attribute drops an image to ~12 dB: the mean alone hides whether that happened once or
   often). The calibrated modes are also measured on the prompts they were fit on ("fit" column), side by side.
3. Per mode: the iso-fidelity ratio (the full calls the uniform schedule needs for the mode's fidelity, by
   interpolating the uniform curve, over the calls the mode spent), the calls it needs to reach uniform
   I=3's fidelity, its PSNR at uniform I=5's calls against I=5's, and how far its held-out curve ever drops
   when the budget grows (monotone within noise: <= 0.3 dB).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from .common import Method, accel_cache, baseline, speed_table
from .models import sd15_architecture_pipeline

SETTINGS = (("PNDMScheduler", 50), ("DPMSolverMultistepScheduler", 25), ("EulerDiscreteScheduler", 30))
INTERVALS = (3, 4, 5, 7)
REFERENCE_ONLY = (2,)  # uniform only: extends the reference curve above the modes' fidelity


@dataclass
class Point:
    mode: str
    interval: int          # the uniform interval whose budget this point was asked for
    full: float            # full UNet calls spent per pipeline call (mean)
    psnr: list[float]      # per held-out image
    ssim: float
    flips: float           # share of held-out images whose judged shape or colour changed
    fit_psnr: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.psnr)

    @property
    def median(self) -> float:
        return statistics.median(self.psnr)


@dataclass
class Curves:
    scheduler: str
    steps: int
    calls: int
    prompts: int
    points: list[Point] = field(default_factory=list)
    calibration_s: float = 0.0
    budgets: list[int] = field(default_factory=list)

    def curve(self, mode: str) -> list[Point]:
        return sorted((p for p in self.points if p.mode == mode), key=lambda p: p.full)

    def modes(self) -> list[str]:
        return list(dict.fromkeys(p.mode for p in self.points))


def pipeline(scheduler: str):
    """The miniature with ``scheduler`` (built from its own PNDM config, as a user swaps schedulers)."""
    import diffusers

    from accel import miniature

    pipe = miniature.load_pipeline()
    if scheduler != type(pipe.scheduler).__name__:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def _merge(calibs):
    """One calibration holding the refined schedules and adaptive thresholds of several (same statistics)."""
    from accel.calibration import Calibration

    meta = dict(calibs[0].meta, cache=dict(calibs[0].meta["cache"]))
    tensors = dict(calibs[0].tensors)
    for c in calibs[1:]:
        tensors.update({k: v for k, v in c.tensors.items() if ".refined." in k or ".dscale." in k})
        meta["cache"]["refined"] = {**meta["cache"].get("refined", {}), **c.meta["cache"].get("refined", {})}
        meta["cache"]["adaptive"] = meta["cache"].get("adaptive", []) + c.meta["cache"].get("adaptive", [])
    return Calibration(meta, tensors)


def modes(k: int, interval: int):
    """``(name, transform)`` of every mode at budget ``k`` (the uniform interval's number of full calls)."""
    from accel import FeatureCache as FC

    if interval in REFERENCE_ONLY:
        return [("uniform (DeepCache)", FC(interval=interval))]
    skill = dict(forecast="taylor1", trust="skill")
    return [("uniform (DeepCache)", FC(interval=interval)),
            ("uniform + taylor1", FC(interval=interval, forecast="taylor1")),
            ("uniform + taylor1 + skill", FC(interval=interval, **skill)),
            ("DP (CacheQuant)", FC(schedule="dp", budget=k)),
            ("refined DP", FC(schedule="calibrated", budget=k)),
            ("refined + taylor1", FC(schedule="calibrated", budget=k, forecast="taylor1")),
            ("refined + taylor1 + DEC-mean", FC(schedule="calibrated", budget=k, forecast="taylor1", correction="dec-mean")),
            ("refined + taylor1 + skill", FC(schedule="calibrated", budget=k, **skill)),
            ("refined + taylor1-cfg", FC(schedule="calibrated", budget=k, forecast="taylor1-cfg")),
            ("refined + taylor1-cfg + difference", FC(schedule="calibrated", budget=k, forecast="taylor1-cfg",
                                                      difference="calibrated")),
            ("adaptive", FC(schedule="adaptive", budget=k)),
            ("adaptive + taylor1", FC(schedule="adaptive", budget=k, forecast="taylor1")),
            ("adaptive + taylor1 + skill", FC(schedule="adaptive", budget=k, **skill))]


def calibrations():
    """The caches ``measure`` calibrates (one ``accel calibrate`` each, merged): a refined schedule and an adaptive
    threshold for reuse, taylor1 and taylor1 + skill, and a refined schedule for taylor1-cfg with its guidance-difference
    model (recipe cache-forecast-cfg-d: the schedule is refined without the model, so 'refined + taylor1-cfg' reads the
    same one). Every calibrated mode of :func:`modes` reads what one of them found."""
    from accel import FeatureCache as FC

    out = [FC(schedule=s, **f) for s in ("calibrated", "adaptive")
           for f in ({}, dict(forecast="taylor1"), dict(forecast="taylor1", trust="skill"))]
    return out + [FC(schedule="calibrated", forecast="taylor1-cfg", difference="calibrated")]


CALIBRATED = ("DP (CacheQuant)", "refined DP", "refined + taylor1", "refined + taylor1 + DEC-mean",
              "refined + taylor1 + skill", "refined + taylor1-cfg", "refined + taylor1-cfg + difference", "adaptive",
              "adaptive + taylor1", "adaptive + taylor1 + skill")


def _generate(pipe, prompts, steps, guidance, seed, batch_size=8):
    from accel.eval.runner import decode

    lats = []
    for i in range(0, len(prompts), batch_size):
        idx = range(i, min(i + batch_size, len(prompts)))
        with torch.no_grad():
            lats.append(pipe([prompts[j] for j in idx], num_inference_steps=steps, guidance_scale=guidance,
                             generator=[torch.Generator().manual_seed(seed + j) for j in idx], output_type="latent").images)
    lat = torch.cat(lats)
    if not torch.isfinite(lat).all():
        raise FloatingPointError("the pipeline produced NaN/inf")
    return decode(pipe, lat)


def measure(scheduler: str, steps: int, num_prompts: int = 32, seed: int = 0, intervals=INTERVALS,
            refine_evals: int = 40, refine_prompts: int = 8, progress: bool = True, scorer=None) -> Curves:
    """Calibrate on train prompts, run every mode at every interval's budget on held-out prompts."""
    import time

    from tqdm.auto import tqdm

    import accel
    from accel import miniature
    from accel.calibrate import DEFAULT_PROMPTS, calibrate, unet_calls
    from accel.eval import CLIPScorer
    from accel.miniature import GUIDANCE

    scorer = scorer or CLIPScorer("miniature")
    pipe = pipeline(scheduler)
    n = unet_calls(pipe, steps)
    budgets = [len(range(0, n, i)) for i in intervals]
    ref_budgets = [len(range(0, n, i)) for i in REFERENCE_ONLY]
    t0 = time.time()
    recipes = calibrations()
    calibs = [calibrate(pipe, accel.Recipe("curves", [r]), steps=steps, budget=budgets, guidance=GUIDANCE,
                        progress=progress, refine_prompts=refine_prompts, refine_evals=refine_evals)
              for r in tqdm(recipes, desc=f"calibrate {scheduler}", disable=not progress)]
    calib = _merge(calibs)
    out = Curves(scheduler, steps, n, num_prompts, calibration_s=time.time() - t0, budgets=budgets)
    held = miniature.prompts(num_prompts, seed=seed)
    fit = miniature.prompts(DEFAULT_PROMPTS, seed=0, split="train")[:refine_prompts]  # what calibrate refined on
    base, fit_base = _generate(pipe, held, steps, GUIDANCE, seed), _generate(pipe, fit, steps, GUIDANCE, 0)
    jobs = [(i, k, name, t) for i, k in zip(list(REFERENCE_ONLY) + list(intervals), ref_budgets + budgets)
            for name, t in modes(k, i)]
    for i, k, name, t in tqdm(jobs, desc=f"modes {scheduler}", disable=not progress):
        out.points.append(point(pipe, name, i, t, calib, held, base, steps, seed, scorer,
                                fit=(fit, fit_base) if name in CALIBRATED else None))
    return out


def point(pipe, name: str, interval: int, transform, calib, held: list[str], base: torch.Tensor, steps: int, seed: int,
          scorer, fit: tuple[list[str], torch.Tensor] | None = None) -> Point:
    """One mode run on the held-out prompts ``held`` (image i with seed ``seed + i``) against the uncached images
    ``base``: full calls spent, PSNR per image, SSIM, flip rate; with ``fit`` (prompts, their uncached images, seeds
    0..), the PSNR on those too."""
    import accel
    from accel.eval import psnr, ssim
    from accel.eval.judge import flips
    from accel.miniature import GUIDANCE, parse_caption

    handle = accel.apply(pipe, transform, calibration=calib)
    try:
        images = _generate(pipe, held, steps, GUIDANCE, seed)
        spent = handle.stats()["full_per_pipeline_call"]
        fit_psnr = None
        if fit is not None:
            fit_psnr = psnr(_generate(pipe, fit[0], steps, GUIDANCE, 0), fit[1]).clamp(max=99).mean().item()
    finally:
        handle.remove()
    attrs = [parse_caption(p) for p in held]
    return Point(name, interval, spent, psnr(images, base).clamp(max=99).tolist(), ssim(images, base).mean().item(),
                 statistics.fmean(flips(scorer, images, base, attrs)), fit_psnr)


# ----------------------------------------------------------------------------------- analysis
def calls_for(curve: list[Point], target: float) -> float | None:
    """Full calls at which ``curve`` first reaches mean PSNR ``target`` (linear interpolation between points;
    None if it never does)."""
    prev = None
    for p in curve:
        if p.mean >= target:
            if prev is None:
                return p.full
            return prev.full + (target - prev.mean) / (p.mean - prev.mean) * (p.full - prev.full)
        prev = p
    return None


def psnr_at(curve: list[Point], full: float) -> float | None:
    """The curve's mean PSNR at ``full`` calls (linear interpolation; None outside its range)."""
    xs, ys = [p.full for p in curve], [p.mean for p in curve]
    if not xs or full < xs[0] - 1e-9 or full > xs[-1] + 1e-9:
        return None
    return float(np.interp(full, xs, ys))


def summary(c: Curves, uniform: str = "uniform (DeepCache)") -> dict:
    """Per mode: iso-fidelity against uniform I=3, gain at uniform I=5's calls, largest drop with more budget."""
    u = {p.interval: p for p in c.curve(uniform)}
    out = {}
    for mode in c.modes():
        cur = c.curve(mode)
        need = calls_for(cur, u[3].mean) if 3 in u else None
        at5 = psnr_at(cur, u[5].full) if 5 in u else None
        drops = [a.mean - b.mean for a, b in zip(cur, cur[1:])]
        iso = []
        for p in cur:
            k = calls_for(c.curve(uniform), p.mean)
            iso.append(None if k is None else k / p.full)
        out[mode] = {"calls_for_i3": need, "ratio_vs_i3": (u[3].full / need) if need else None,
                     "gain_at_i5": (at5 - u[5].mean) if at5 is not None else None,
                     "max_drop": max(drops + [0.0]), "iso": iso}
    return out


def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None else fmt.format(x)


def markdown(c: Curves) -> str:
    s = summary(c)
    lines = [f"### {c.scheduler}, {c.steps} steps ({c.calls} UNet calls), {c.prompts} held-out prompts\n",
             f"Calibrations (DP statistics; schedules refined and adaptive thresholds found for reuse, taylor1 and "
             f"taylor1 + skill, schedules refined for taylor1-cfg and its guidance-difference model fit; {len(c.budgets)} budgets: {c.budgets}): {c.calibration_s:.0f} s.\n",
             "| asked (uniform interval) | mode | full calls spent | PSNR mean | PSNR median | SSIM | flipped | fit PSNR "
             "| iso-fidelity ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for i in sorted({p.interval for p in c.points}):
        for p in c.points:
            if p.interval != i:
                continue
            cur = c.curve(p.mode)
            iso = s[p.mode]["iso"][cur.index(p)]
            lines.append(f"| I={i} | {p.mode} | {p.full:.2f} | {p.mean:.2f} | {p.median:.2f} | {p.ssim:.4f} | "
                         f"{100 * p.flips:.0f}% | {_f(p.fit_psnr)} | {_f(iso, '{:.2f}x', '> range')} |")
    lines += ["", "| mode | full calls to reach uniform I=3's mean PSNR | I=3's calls / that | PSNR at I=5's calls − "
              "I=5's | largest drop when the budget grows |", "|---|---|---|---|---|"]
    for mode, r in s.items():
        lines.append(f"| {mode} | {_f(r['calls_for_i3'], '{:.1f}', 'not reached')} | {_f(r['ratio_vs_i3'], '{:.2f}x')} | "
                     f"{_f(r['gain_at_i5'], '{:+.2f} dB')} | {r['max_drop']:.2f} dB |")
    return "\n".join(lines) + "\n"


def speed(args) -> str:
    """Wall-clock on the SD 1.5 architecture: what the forecast and the probe cost, as measured / FLOP-ideal at the
    full calls actually spent (random weights: the adaptive decisions say nothing about quality here)."""
    import accel

    FC = accel.FeatureCache
    sd = sd15_architecture_pipeline()
    methods = [baseline(), accel_cache(5, 0)]
    for label, kw in (("i5 + taylor1", dict(forecast="taylor1")), ("i5 + taylor1 + skill", dict(forecast="taylor1", trust="skill")),
                      ("i5 + taylor2", dict(forecast="taylor2"))):
        methods.append(accel_cache(5, 0, label=f"accel cache {label}", **kw))
    for label, kw in (("adaptive (threshold 0.1, at most 4 cached)", {}),
                      ("adaptive + taylor1 + skill (threshold 0.1, at most 4 cached)", dict(forecast="taylor1", trust="skill"))):
        t = FC(schedule="adaptive", threshold=0.1, max_cached=4, **kw)
        methods.append(Method(f"accel {label}", lambda pipe, t=t: accel.apply(pipe, t).remove, None, 0))
    table, _ = speed_table(sd, methods, args.sd_steps, args.sd_latent, args.sd_repeats, progress=not args.quiet)
    return (f"### What the forecast and the probe cost: SD 1.5 architecture, {args.sd_steps} PNDM steps, "
            f"{args.sd_latent}x{args.sd_latent} latent, median of {args.sd_repeats} interleaved runs\n\n"
            "The FLOP-ideal counts full and cached calls only (not the forecast's multiply-adds nor the probe's "
            "reduction): measured/ideal near 1 means they cost next to nothing. Adaptive rows: full calls as spent.\n\n"
            + table + "\n")


def section(args, scorer=None) -> str:
    parts = ["## Cache modes: fidelity against full UNet calls (miniature, held-out prompts)\n",
             "Each mode is asked for the budget of DeepCache's uniform schedule at intervals "
             f"{', '.join(map(str, INTERVALS))}; adaptive modes decide per call (per batch of 8: a batch runs the full "
             "UNet when any of its samples needs it), so the calls they actually spent are the x-axis. PSNR of the "
             f"final images against the uncached ones of the same seeds (held-out prompts, seeds {args.seed}..), "
             "\"flipped\": the judged shape or colour differs from the uncached image's; \"fit PSNR\": the calibrated "
             f"modes on the {args.curve_refine_prompts} prompts their schedule/threshold was fit on. Iso-fidelity "
             "ratio: the full calls the uniform schedule needs for the same mean PSNR (interpolated) over the calls "
             "the mode spent.\n"]
    samplers = args.curve_samplers.split(",")
    for sched, steps in SETTINGS:
        if sched not in samplers:
            continue
        c = measure(sched, steps, args.num_prompts, args.seed, refine_evals=args.curve_refine_evals,
                    refine_prompts=args.curve_refine_prompts, progress=not args.quiet, scorer=scorer)
        parts.append(markdown(c))
    if not args.quick:
        parts.append(speed(args))
    return "\n".join(parts)
