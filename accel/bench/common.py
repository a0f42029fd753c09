"""What every section of the benchmarks measures with: the ways of running a pipeline (:class:`Method`: baseline,
accel's cache, any transform list with a calibration, the DeepCache package), exact FLOPs per UNet call and per
pipeline call (``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions) with the FLOP-ideal speedup
of a schedule ``N * F_full / (K * F_full + (N - K) * F_cached)``, interleaved wall-clock (A B C A B C ... on the
same seeds, reported as ratios to the baseline of the same run and as measured / FLOP-ideal), quality against the
baseline on the same seeds, and the machine line of a report.

The bottom of :mod:`accel.bench`: the section modules import it, it imports no section (so the sections share
one FLOP cache, :data:`_CACHED_FLOPS`, and one definition of each number).
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# ----------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A way of running a pipeline: ``setup(pipe)`` applies it and returns the function that undoes it."""

    name: str
    setup: Callable
    full_calls: Callable | None = None  # n -> number of full calls (for the FLOP-ideal speedup); None: as spent
    branch: int = 0                     # cache branch whose cached-call FLOPs apply
    spent: list = field(default_factory=list)  # full calls per timed pipeline call, read from Handle.stats()


def baseline() -> Method:
    return Method("baseline", lambda pipe: (lambda: None), lambda n: n)


def accel_cache(interval: int, branch: int = 0, label: str | None = None, **kw) -> Method:
    import accel

    def setup(pipe):
        return accel.apply(pipe, accel.FeatureCache(interval=interval, branch=branch, **kw)).remove

    return Method(label or f"accel cache i{interval} b{branch}", setup, lambda n: len(range(0, n, interval)), branch)


def with_calibration(name: str, transforms, calib, full_calls=None, branch: int = 0) -> Method:
    """Any transform list applied with a calibration (DP schedules, DEC, static int8)."""
    import accel

    return Method(name, lambda pipe: accel.apply(pipe, transforms, calibration=calib).remove, full_calls, branch)


def deepcache(interval: int, branch: int = 0) -> Method:
    """The DeepCache pip package's helper at the same settings (a baseline, not a dependency)."""

    def setup(pipe):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return helper.disable

    return Method(f"DeepCache i{interval} b{branch}", setup, lambda n: len(range(0, n, interval)), branch)


def have_deepcache() -> bool:
    try:
        import DeepCache  # noqa: F401
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------- FLOPs
class _PerCallFlops:
    def __init__(self, unet):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.calls: list[int] = []
        self._start = 0
        self._h = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._start = self.mode.get_total_flops()

    def _post(self, *_):
        self.calls.append(self.mode.get_total_flops() - self._start)

    def close(self):
        for h in self._h:
            h.remove()


def call_flops(pipe, branch: int | None, latent: int, prompt: str = "a red circle") -> tuple[int, int]:
    """FLOPs of one full and one cached UNet call (CFG batch of 2) for ``branch`` (None: full only)."""
    import accel
    from diffusers import DDIMScheduler

    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(old.config)
    handle = accel.apply(pipe, accel.FeatureCache(schedule=[0], branch=branch)) if branch is not None else None
    counter = _PerCallFlops(pipe.unet)
    try:
        with counter.mode, torch.no_grad():
            pipe(prompt, num_inference_steps=2, output_type="latent",
                 height=latent * 8, width=latent * 8, generator=torch.Generator().manual_seed(0))
    finally:
        counter.close()
        if handle is not None:
            handle.remove()
        pipe.scheduler = old
    return counter.calls[0], counter.calls[1]


def pipeline_flops(pipe, method: Method, steps: int, latent: int, prompt: str = "a red circle") -> int:
    """UNet FLOPs of one whole pipeline call with ``method`` applied (any transform: the calls that skip work
    count less), for FLOP-ideal speedups of schedules that are not one cached call type."""
    counter = _PerCallFlops(pipe.unet)
    undo = method.setup(pipe)
    try:
        with counter.mode, torch.no_grad():
            pipe(prompt, num_inference_steps=steps, output_type="latent", height=latent * 8, width=latent * 8,
                 generator=torch.Generator().manual_seed(0))
    finally:
        undo()
        counter.close()
    return sum(counter.calls)


def ideal_speedup(n: int, k: int, full: float, cached: float) -> float:
    return n * full / (k * full + (n - k) * cached)


# ----------------------------------------------------------------------------------- wall-clock
def time_methods(pipe, methods: list[Method], steps: int, latent: int, repeats: int, prompt="a red circle",
                 progress=True) -> dict[str, list[float]]:
    """Interleaved wall-clock (seconds per pipeline call) of each method on the same seed."""
    from tqdm.auto import tqdm

    times = {m.name: [] for m in methods}
    kw = dict(num_inference_steps=steps, output_type="latent", height=latent * 8, width=latent * 8)
    with torch.no_grad():
        pipe(prompt, **dict(kw, num_inference_steps=2), generator=torch.Generator().manual_seed(0))  # warm-up
        bar = tqdm(total=repeats * len(methods), desc="timing", disable=not progress)
        for _ in range(repeats):
            for m in methods:
                undo = m.setup(pipe)
                try:
                    t0 = time.perf_counter()
                    pipe(prompt, **kw, generator=torch.Generator().manual_seed(0))
                    times[m.name].append(time.perf_counter() - t0)
                    handle = getattr(undo, "__self__", None)  # accel methods undo with Handle.remove
                    calls = handle.stats().get("per_pipeline_call") if hasattr(handle, "stats") else None
                    if calls:  # a cache's handle: the full calls this pipeline call spent (others have no cache)
                        m.spent.append(calls[-1]["full"])
                finally:
                    undo()
                bar.update(1)
        bar.close()
    return times


def speed_table(pipe, methods, steps, latent, repeats, progress=True) -> tuple[str, dict]:
    """The speed table of ``methods`` (the first named "baseline"): median seconds per pipeline call, speedup over
    the baseline of the same run, FLOP-ideal speedup at the full calls each method spends, and measured / ideal."""
    n_calls = unet_calls(pipe, steps)
    full, _ = call_flops(pipe, None, latent)
    times = time_methods(pipe, methods, steps, latent, repeats, progress=progress)
    base = statistics.median(times["baseline"])
    rows, data = [], {}
    for m in methods:
        med = statistics.median(times[m.name])
        k = m.full_calls(n_calls) if m.full_calls is not None else statistics.median(m.spent)
        ideal = 1.0
        if k < n_calls:
            cached = cached_call_flops(pipe, latent, m.branch)
            ideal = ideal_speedup(n_calls, k, full, cached)
        speed = base / med
        data[m.name] = dict(median_s=med, speedup=speed, ideal=ideal, runs=times[m.name])
        rows.append(f"| {m.name} | {k:g}/{n_calls} | {med:.3f} | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} |")
    head = ("| method | full UNet calls | median s per pipeline call | measured speedup | FLOP-ideal | measured/ideal |\n"
            "|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), data


_CACHED_FLOPS: dict = {}  # (unet, latent, branch) -> FLOPs of a cached call: the cost and speed tables share it


def cached_call_flops(pipe, latent, branch):
    """:func:`call_flops` of a cached call, counted once per UNet, latent size and branch in a run."""
    key = (id(pipe.unet), latent, branch)
    if key not in _CACHED_FLOPS:
        _CACHED_FLOPS[key] = call_flops(pipe, branch, latent)[1]
    return _CACHED_FLOPS[key]


def unet_calls(pipe, steps) -> int:
    """UNet calls of one pipeline call of ``steps`` steps with the pipeline's scheduler (PNDM makes more calls than
    steps): the N of the FLOP-ideal speedup."""
    s = type(pipe.scheduler).from_config(pipe.scheduler.config)
    s.set_timesteps(steps)
    return len(s.timesteps)


# ----------------------------------------------------------------------------------- quality
def quality_rows(pipe, methods: list[Method], prompts: list[str], steps: int, clip="miniature", seed=0,
                 progress=True, guidance: float | None = None) -> tuple[str, dict]:
    """CLIP score, judge, PSNR / SSIM / latent MSE of each method against the first (the baseline); guidance
    defaults to the miniature's recommended scale."""
    from accel.eval import CLIPScorer, latent_mse, psnr, ssim
    from accel.eval.judge import judge
    from accel.eval.runner import GenerationSettings, generate, mean_and_sem
    from accel.miniature import parse_caption

    scorer = CLIPScorer(clip)
    from accel.miniature import GUIDANCE

    settings = GenerationSettings(steps=steps, seed=seed, batch_size=8, guidance=GUIDANCE if guidance is None else guidance)
    attrs = [parse_caption(p) for p in prompts]
    results, base = {}, None
    for m in methods:
        undo = m.setup(pipe)
        try:
            recs = generate(pipe, prompts, settings, progress=progress)
        finally:
            undo()
        images = [r["image"] for r in recs]
        lat = torch.stack([r["latents"] for r in recs])
        scores = scorer.score(images, prompts).tolist()
        res = dict(clip=mean_and_sem(scores), scores=scores, judged=judge(scorer, images, attrs)["all_accuracy"],
                   images=images, latents=lat)
        if base is None:
            base = res
        res["psnr"] = psnr(images, base["images"]).clamp(max=99).mean().item()
        res["ssim"] = ssim(images, base["images"]).mean().item()
        res["latent_mse"] = latent_mse(lat, base["latents"]).mean().item()
        diffs = [a - b for a, b in zip(scores, base["scores"])]
        res["delta"] = mean_and_sem(diffs)
        results[m.name] = res
    rows = []
    for name, r in results.items():
        same = r is base
        psnr_s = "—" if same else f"{r['psnr']:.2f}"
        rows.append(f"| {name} | {r['clip'][0]:.2f} ± {r['clip'][1]:.2f} | {r['delta'][0]:+.2f} ± {r['delta'][1]:.2f} | "
                    f"{100 * r['judged']:.0f}% | {psnr_s} | {r['ssim']:.3f} | {r['latent_mse']:.4f} |")
    head = ("| method | CLIP score | Δ CLIP vs baseline (paired) | shape+colour right | PSNR dB | SSIM | latent MSE |\n"
            "|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), results


# ----------------------------------------------------------------------------------- report
def machine_line() -> str:
    import diffusers

    return (f"{platform.machine()} {platform.processor() or ''} · torch {torch.__version__} "
            f"({torch.get_num_threads()} thread) · diffusers {diffusers.__version__} · Python {platform.python_version()}"
            " · no GPU")
