"""``accel bench``: cost model, side-by-side wall-clock and quality, written to ``docs/BENCHMARKS.md``.

Every number in the report is measured by this module in one run:
- **cost**: exact FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions) of a full
  and of a cached UNet call per cache branch, and the FLOP-ideal speedup of a schedule
  ``N * F_full / (K * F_full + (N - K) * F_cached)``; for the miniature and for the SD 1.5 *architecture*
  (its standard UNet config with random weights: no download).
- **speed**: wall-clock of pipeline calls (``output_type="latent"``: the UNet work) for the baseline, accel
  and the DeepCache package at the same interval and branch, interleaved (A B C A B C ...) on the same
  seeds; reported as ratios to the baseline of the same run and as measured / FLOP-ideal.
- **quality** (miniature, trained weights): CLIP score (mean ± s.e.m. over prompts) and its delta to the
  baseline, the attribute judge, PSNR / SSIM of the final images and MSE of the final latents against the
  baseline on the same seeds.
GPU figures are never produced here: there is no GPU on the machines this runs on.
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


# ----------------------------------------------------------------------------------- models
SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1,
)


def sd15_architecture_pipeline(seed: int = 0):
    """A real ``StableDiffusionPipeline`` with SD 1.5's UNet (random weights, 860M parameters), a one-layer
    768-wide CLIP text encoder, a tiny VAE (unused with ``output_type="latent"``) and SD's PNDM scheduler, on the
    CPU in float32 (the GPU bench builds the same pipeline: :func:`accel.bench_gpu.build_pipeline`)."""
    from .bench_gpu import Model, build_pipeline

    model = Model("SD 1.5 architecture", "sd", SD15_UNET, (768,), 512)
    return build_pipeline(model, "cpu", torch.float32, seed, channels_last=False)


# ----------------------------------------------------------------------------------- cost
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


# ----------------------------------------------------------------------------------- speed
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
    n_calls = _calls(pipe, steps)
    full, _ = call_flops(pipe, None, latent)
    times = time_methods(pipe, methods, steps, latent, repeats, progress=progress)
    base = statistics.median(times["baseline"])
    rows, data = [], {}
    for m in methods:
        med = statistics.median(times[m.name])
        k = m.full_calls(n_calls) if m.full_calls is not None else statistics.median(m.spent)
        ideal = 1.0
        if k < n_calls:
            cached = _cached_flops(pipe, latent, m.branch)
            ideal = ideal_speedup(n_calls, k, full, cached)
        speed = base / med
        data[m.name] = dict(median_s=med, speedup=speed, ideal=ideal, runs=times[m.name])
        rows.append(f"| {m.name} | {k:g}/{n_calls} | {med:.3f} | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} |")
    head = ("| method | full UNet calls | median s per pipeline call | measured speedup | FLOP-ideal | measured/ideal |\n"
            "|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), data


_CACHED_FLOPS: dict = {}


def _cached_flops(pipe, latent, branch):
    key = (id(pipe.unet), latent, branch)
    if key not in _CACHED_FLOPS:
        _CACHED_FLOPS[key] = call_flops(pipe, branch, latent)[1]
    return _CACHED_FLOPS[key]


def _calls(pipe, steps) -> int:
    s = type(pipe.scheduler).from_config(pipe.scheduler.config)
    s.set_timesteps(steps)
    return len(s.timesteps)


def cost_table(pipe, latent, n_calls, intervals=(3, 5)) -> str:
    full, _ = call_flops(pipe, None, latent)
    from accel.unet import num_branches

    rows = []
    for b in range(num_branches(pipe.unet)):
        cached = _cached_flops(pipe, latent, b)
        ideals = " | ".join(f"{ideal_speedup(n_calls, len(range(0, n_calls, i)), full, cached):.2f}x" for i in intervals)
        rows.append(f"| {b} | {cached / 1e9:.3f} | {100 * cached / full:.1f}% | {ideals} |")
    head = (f"Full call: **{full / 1e9:.3f} GFLOP** (CFG batch 2, {latent}x{latent} latent). "
            f"Ideal speedups for {n_calls} UNet calls.\n\n"
            "| branch | cached call GFLOP | of full | " + " | ".join(f"ideal i{i}" for i in intervals) + " |\n"
            "|---|---|---|" + "---|" * len(intervals))
    return head + "\n" + "\n".join(rows)


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


# ----------------------------------------------------------------------------------- compile
def compile_graph_breaks(pipe, method: Method, steps=6) -> str:
    """Run ``torch.compile(pipe.unet)`` with the method applied; count graph breaks and compare outputs."""
    from torch._dynamo.utils import counters

    import torch._dynamo

    undo = method.setup(pipe)
    try:
        kw = dict(prompt="a red circle", num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eager = pipe(**kw).images
        unet = pipe.unet
        torch._dynamo.reset()
        counters.clear()
        pipe.unet = torch.compile(unet)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                comp = pipe(**dict(kw, generator=torch.Generator().manual_seed(0))).images
            secs = time.perf_counter() - t0
        finally:
            pipe.unet = unet
        breaks = sum(counters["graph_break"].values())
        reasons = sorted(counters["graph_break"])[:3]
        same = torch.allclose(comp, eager, rtol=1e-4, atol=1e-4)
        err = (comp - eager).abs().max().item()
    finally:
        undo()
    return (f"{method.name}: graph breaks **{breaks}**, unique graphs compiled "
            f"{counters['stats'].get('unique_graphs', 'n/a')}, outputs equal to eager: **{same}** "
            f"(max abs diff {err:.2e}); first call incl. compilation {secs:.1f} s."
            + (f" Break reasons (first {len(reasons)}): " + "; ".join(r.replace("\n", " ")[:160] for r in reasons)
               if reasons else ""))


# ----------------------------------------------------------------------------------- GPU
def gpu_section() -> str:  # pragma: no cover - needs CUDA
    """Kernel TFLOP/s of the W8A8 GEMM against fp16 ``torch.mm`` at SD-like shapes (CUDA only)."""
    from accel import kernels

    rows = []
    for m, n, k in [(4096, 320, 320), (4096, 1280, 320), (1024, 640, 2560), (256, 1280, 5120)]:
        a = torch.randint(-127, 127, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda")
        sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
        af, wf = a.half(), w.half()

        def bench(fn, reps=50):
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps / 1e3

        t8 = bench(lambda: kernels.w8a8_gemm(a, w, sa, sw, out_dtype=torch.float16))
        t16 = bench(lambda: af @ wf.T)
        fl = 2 * m * n * k
        rows.append(f"| {m}x{n}x{k} | {fl / t8 / 1e12:.1f} | {fl / t16 / 1e12:.1f} | {t16 / t8:.2f}x |")
    return ("| M x N x K | W8A8 Triton TFLOP/s | fp16 torch.mm TFLOP/s | ratio |\n|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\nDevice: {torch.cuda.get_device_name()}.\n")


# ----------------------------------------------------------------------------------- report
def asdm_section(mini, args, dc: list) -> str:
    """A-SDM feature inheritance on the miniature beside DeepCache and CacheQuant at similar cost: FLOP-ideal
    speedup (FLOPs counted over whole pipeline calls), measured speedup (interleaved), CLIP delta and PSNR."""
    import accel
    from accel.calibrate import calibrate
    from accel.miniature import GUIDANCE

    n = _calls(mini, 50)
    budget = len(range(0, n, 2))
    inherit_cal = calibrate(mini, "asdm-calibrated", steps=50, budget=budget, guidance=GUIDANCE,
                            progress=not args.quiet)
    cache_cal = calibrate(mini, "cachequant-dp", steps=50, budget=budget, guidance=GUIDANCE,
                          progress=not args.quiet)

    def inherit(label, **kw):
        return with_calibration(label, accel.Inherit(**kw), inherit_cal)

    up12, attn = ["up_blocks.1", "up_blocks.2"], "*.attentions.*"
    methods = [baseline(),
               inherit("A-SDM block: mid_block + up_blocks.0, every 2 (asdm-block-mid)",
                       targets=["mid_block", "up_blocks.0"], every=2),
               inherit("A-SDM block: up_blocks.1 + 2, every 2", targets=up12, every=2),
               inherit(f"A-SDM block: up_blocks.1 + 2, calibrated ({budget} runs; asdm-calibrated)", targets=up12,
                       schedule="calibrated"),
               inherit("A-SDM layer: every transformer, every 2", targets=attn, granularity="layer", every=2),
               inherit("A-SDM layer: every transformer, every 2, residual", targets=attn, granularity="layer",
                       every=2, residual=True),
               inherit("A-SDM unit: every ff, every 2", targets="*.ff", granularity="unit", every=2),
               inherit("A-SDM unit: every attn2, every 2 (asdm-unit-attn2)", targets="*.attn2", granularity="unit",
                       every=2),
               with_calibration("A-SDM transformers every 2 + uniform cache i3 + W8A8 (dynamic)",
                                [accel.FeatureCache(interval=3), accel.Quantize(mode="dynamic"),
                                 accel.Inherit(targets=attn, granularity="layer", every=2)], inherit_cal)]
    methods += [deepcache(i, 0) for i in (2, 3)] if dc else [accel_cache(i, 0) for i in (2, 3)]
    methods += [with_calibration(f"CacheQuant DP + DEC-mean ({budget} full)",
                                 accel.FeatureCache(schedule="calibrated", budget=budget, correction="dec-mean"),
                                 cache_cal)]
    base_flops = pipeline_flops(mini, baseline(), 50, 8)
    ideal = {m.name: base_flops / pipeline_flops(mini, m, 50, 8) for m in methods}
    times = time_methods(mini, methods, 50, 8, args.repeats, progress=not args.quiet)
    base_t = statistics.median(times["baseline"])
    from accel import miniature

    prompts = miniature.prompts(args.num_prompts, seed=args.seed)
    _, q = quality_rows(mini, methods, prompts, 50, seed=args.seed, progress=not args.quiet)
    rows = []
    for m in methods:
        r, speed = q[m.name], base_t / statistics.median(times[m.name])
        psnr_s = "—" if m.name == "baseline" else f"{r['psnr']:.2f}"
        rows.append(f"| {m.name} | {ideal[m.name]:.2f}x | {speed:.2f}x | {r['clip'][0]:.2f} | "
                    f"{r['delta'][0]:+.2f} ± {r['delta'][1]:.2f} | {100 * r['judged']:.0f}% | {psnr_s} |")
    return (f"## Feature inheritance (A-SDM) on the miniature ({len(prompts)} held-out prompts, 50 steps = {n} UNet "
            f"calls, same seeds)\n\nFLOP-ideal: baseline UNet FLOPs of a pipeline call / the method's (counted over "
            f"the whole call). Measured: interleaved wall-clock, median of {args.repeats}. The calibrated rows use "
            f"`accel calibrate` with `asdm-calibrated` / `cachequant-dp` at budget {budget} "
            f"(inheritance schedule: {inherit_cal.meta['inherit']['schedule']}).\n\n"
            "| method | FLOP-ideal | measured speedup | CLIP score | Δ CLIP vs baseline (paired) | shape+colour right "
            "| PSNR dB |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def machine_line() -> str:
    import diffusers

    return (f"{platform.machine()} {platform.processor() or ''} · torch {torch.__version__} "
            f"({torch.get_num_threads()} thread) · diffusers {diffusers.__version__} · Python {platform.python_version()}"
            " · no GPU")


def run(args) -> str:
    import accel
    from accel import miniature
    from accel.miniature import GUIDANCE

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = [f"# Benchmarks\n\nGenerated by `{args.command_line}` — do not edit by hand.\n",
           f"Machine: {machine_line()}.\n",
           "Speed figures are ratios measured in this one run (interleaved, same seeds, median of "
           f"{args.repeats} runs each); GPU speed is not measured here (no GPU).\n"]
    sections = set(args.sections.split(","))
    dc = [deepcache(i, 0) for i in args.intervals] if have_deepcache() else []
    ours = [accel_cache(i, 0) for i in args.intervals]
    interleaved = [baseline()] + [m for pair in zip(ours, dc or [None] * len(ours)) for m in pair if m is not None]

    mini = miniature.load_pipeline()
    if "cost" in sections:
        out.append("## Cost model (FLOPs)\n")
        out.append(f"### Miniature (50 steps, PNDM: {_calls(mini, 50)} UNet calls)\n")
        out.append(cost_table(mini, 8, _calls(mini, 50), args.intervals) + "\n")
        if not args.quick:
            sd = sd15_architecture_pipeline()
            out.append(f"### SD 1.5 architecture ({args.sd_steps} steps, PNDM: {_calls(sd, args.sd_steps)} UNet calls, "
                       f"{args.sd_latent}x{args.sd_latent} latent, random weights)\n")
            out.append(cost_table(sd, args.sd_latent, _calls(sd, args.sd_steps), args.intervals) + "\n")
    if "speed" in sections:
        out.append("## Speed (wall-clock, one CPU thread)\n")
        if not dc:
            out.append("DeepCache is not installed (`pip install DeepCache`): its rows are missing.\n")
        out.append("### Miniature, 50 steps\n")
        table, _ = speed_table(mini, interleaved, 50, 8, args.repeats, progress=not args.quiet)
        out.append(table + "\n")
        if not args.quick:
            sd = sd15_architecture_pipeline()
            out.append(f"### SD 1.5 architecture, {args.sd_steps} steps, {args.sd_latent}x{args.sd_latent} latent "
                       f"(median of {args.sd_repeats} interleaved runs)\n")
            table, _ = speed_table(sd, interleaved, args.sd_steps, args.sd_latent, args.sd_repeats,
                                   progress=not args.quiet)
            out.append(table + "\n")
            del sd
    calib = None
    if sections & {"quality", "quant"}:
        from accel.calibrate import calibrate

        n = _calls(mini, 50)
        budgets = [len(range(0, n, i)) for i in (5, 2, 3, 7)]  # the first (interval 5) is the artifact's default
        one = calibrate(mini, "cachequant-dp", steps=50, budget=budgets[0], guidance=GUIDANCE, progress=not args.quiet)
        calib = calibrate(mini, "cachequant-dp", steps=50, budget=budgets, guidance=GUIDANCE, progress=not args.quiet)
        ref = calib.meta["cache"]["refined"]
        rows = [f"| {k} | {ref[str(k)]['dp']} | {ref[str(k)]['dp_error_db']:+.2f} | {calib.cache(0).full_calls(n, k)} | "
                f"{ref[str(k)]['from']} | {ref[str(k)]['error_db']:+.2f} | {ref[str(k)]['evals']} | {ref[str(k)]['seconds']:.0f} |"
                for k in sorted(budgets, reverse=True)]
        out.append(f"## Calibration\n\n`calibrate(miniature, 'cachequant-dp', steps=50, budget={budgets[0]}, guidance={GUIDANCE})` "
                   f"(the defaults of `accel calibrate`: cache statistics on {one.meta['prompts']['count']} prompts, the DP "
                   f"schedule refined on {ref[str(budgets[0])]['prompts']} of them): **{one.meta['seconds']:.1f} s** on one CPU "
                   f"thread; with refined schedules for {len(budgets)} budgets, `calibrate(miniature, "
                   f"'cachequant-dp', steps=50, budget={budgets})`: {calib.meta['seconds']:.1f} s.\n\n"
                   "Schedules per budget: CacheQuant's DP on the feature distances, and the refined one (local search on "
                   "the final latents' error on the calibration prompts, from the DP's and the even schedule; "
                   "error = mean 10 log10 MSE vs the uncached latents, lower is better; dec-mean correction active):\n\n"
                   "| full calls | DP schedule | DP error dB | refined schedule | refined from | refined error dB | runs | s |\n"
                   "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if "quality" in sections:
        prompts = miniature.prompts(args.num_prompts, seed=args.seed)
        methods = [baseline()]
        for i in (2, 3, 5, 7):
            k = len(range(0, n, i))
            methods += [accel_cache(i, 0, label=f"uniform i{i} ({k} full)")]
            if dc:
                methods += [deepcache(i, 0)]
            dp = lambda **kw: accel.FeatureCache(schedule="dp", budget=k, **kw)
            refined = lambda **kw: accel.FeatureCache(schedule="calibrated", budget=k, **kw)
            methods += [with_calibration(f"DP ({k} full)", dp(), calib),
                        with_calibration(f"DP + DEC ({k} full; the paper's)", dp(correction="dec"), calib),
                        with_calibration(f"DP + DEC-mean ({k} full)", dp(correction="dec-mean"), calib),
                        with_calibration(f"refined DP ({k} full)", refined(), calib),
                        with_calibration(f"refined DP + DEC ({k} full)", refined(correction="dec"), calib),
                        with_calibration(f"refined DP + DEC-mean ({k} full; cachequant-dp)", refined(correction="dec-mean"),
                                         calib)]
        out.append(f"## Caching quality on the miniature ({len(prompts)} held-out prompts, 50 steps = {n} UNet calls "
                   f"(PNDM), cfg {GUIDANCE} (the miniature's recommended scale), seeds {args.seed}..{args.seed + len(prompts) - 1}, CLIP: miniature-clip)\n")
        out.append("Δ CLIP is the mean paired difference to the baseline image of the same seed ± its s.e.m.; "
                   "the baseline's own ± is the seed-to-seed standard error of its CLIP score. Budgets are the "
                   "uniform schedule's numbers of full calls at DeepCache intervals 2, 3, 5, 7. The held-out prompts and "
                   "seeds are not the calibration ones.\n")
        table, _ = quality_rows(mini, methods, prompts, 50, seed=args.seed, progress=not args.quiet)
        out.append(table + "\n")
    if "quant" in sections:
        from accel.calibrate import collect_quant_dec
        from accel.calibration import Calibration, refined_key
        from accel.transforms.quantize import weight_bytes

        prompts = miniature.prompts(args.num_prompts, seed=args.seed)
        k10 = budgets[0]
        float_ends = ["conv_in", "conv_out"]
        w8a8 = lambda **kw: accel.Quantize(mode="static", exclude=float_ends, **kw)
        forecast = lambda **kw: accel.FeatureCache(forecast="taylor1", trust="skill", **kw)
        every = calibrate(mini, accel.Recipe("w8a8-every-layer", [accel.Quantize(mode="static")]), steps=50,
                          guidance=GUIDANCE, progress=not args.quiet)
        cq = calibrate(mini, "cachequant-w8a8", steps=50, budget=k10, guidance=GUIDANCE, progress=not args.quiet)
        paper = calibrate(mini, accel.Recipe("cachequant-paper", [w8a8(correction="dec"), accel.FeatureCache(
            schedule="dp", correction="dec")]), steps=50, budget=k10, guidance=GUIDANCE, refine=False,
            progress=not args.quiet)
        # the same forecast on the schedule refined without the quantizer (the scales do not depend on the schedule)
        cf = calibrate(mini, "cache-forecast", steps=50, budget=k10, guidance=GUIDANCE, progress=not args.quiet)
        scales = {k: v for k, v in cq.tensors.items() if k.startswith("quant.")}
        cf = Calibration(cf.meta, {**cf.tensors, **scales})
        # cachequant-w8a8 + the paper's quantization DEC, measured with its own cache
        fc = forecast(schedule="calibrated")
        qdec = collect_quant_dec(mini, w8a8(), fc, cq, miniature.prompts(8, seed=0, split="train"), 50, n,
                                 guidance=GUIDANCE, progress=not args.quiet)
        cq_dec = Calibration(cq.meta, {**cq.tensors, **qdec})
        cq_ref = cq.meta["cache"]["refined"][f"taylor1+skill.{k10}"]
        methods = [baseline(),
                   with_calibration("W8A8 static, every layer quantized (conv_in, conv_out too)",
                                    accel.Quantize(mode="static"), every),
                   with_calibration("W8A8 static: range-centred, full range, conv_in/conv_out in float (w8a8)", "w8a8", cq),
                   with_calibration("W8A8 static: symmetric, full range", w8a8(act_scheme="symmetric"), cq),
                   with_calibration("W8A8 static: symmetric, MSE clip search (the paper's)",
                                    w8a8(act_scheme="symmetric", act_clip="mse"), cq),
                   with_calibration("W8A8 (dynamic)", accel.Quantize(mode="dynamic", exclude=float_ends), cq),
                   with_calibration(f"naive: uniform i5 ({k10} full) + W8A8", [accel.FeatureCache(interval=5), w8a8()], cq),
                   with_calibration(f"CacheQuant as published: DP ({k10} full) + DEC + W8A8 + quantization DEC",
                                    [w8a8(correction="dec"), accel.FeatureCache(schedule="dp", correction="dec")], paper),
                   with_calibration("uniform i5 + taylor1 + skill (forecast-i5) + W8A8", [w8a8(), forecast(interval=5)], cq),
                   with_calibration("W8A8 + taylor1 + skill on the schedule refined without the quantizer "
                                    "(cache-forecast's)", [w8a8(), forecast(schedule="calibrated")], cf),
                   with_calibration(f"cachequant-w8a8 ({k10} full; schedule refined with W8A8 running)", "cachequant-w8a8", cq),
                   with_calibration("cachequant-w8a8 + quantization DEC (measured with its cache)",
                                    [w8a8(correction="dec"), forecast(schedule="calibrated")], cq_dec)]
        out.append("## W8A8 on the miniature (same prompts and seeds; reference int8 backend on CPU)\n")
        out.append(f"Calibrations: `cachequant-w8a8` at {k10} full calls (activation scales of {cq.meta['quant']['layers']} "
                   f"layers, then the schedule refined from the DP's {cq_ref['dp']} and the even one with the quantized "
                   f"model running: {cq.tensors[refined_key(0, k10, 'taylor1+skill')].tolist()}, {cq_ref['evals']} "
                   f"runs on {cq_ref['prompts']} prompts): {cq.meta['seconds']:.1f} s; refined without the quantizer "
                   f"(`cache-forecast`): {cf.tensors[refined_key(0, k10, 'taylor1+skill')].tolist()}; the paper's "
                   f"variant (DP schedule, cache and quantization DEC, no refinement): {paper.meta['seconds']:.1f} s.\n")
        table, _ = quality_rows(mini, methods, prompts, 50, seed=args.seed, progress=not args.quiet)
        out.append(table + "\n")
        rows = []
        models = [("miniature", mini)] + ([] if args.quick else [("SD 1.5 architecture", sd15_architecture_pipeline())])
        for name, p in models:
            before = weight_bytes(p.unet)
            h = accel.apply(p.unet, accel.Quantize(mode="dynamic"))
            after = weight_bytes(p.unet)
            h.remove()
            rows.append(f"| {name} | {before / 2**20:.1f} | {after / 2**20:.1f} | {before / after:.2f}x |")
        out.append("### UNet weight bytes (fp32 parameters vs the quantized module's stored tensors: int8 weights, "
                   "fp32 scales / zero points / biases, float norms)\n\n| model | fp32 MiB | W8A8 MiB | smaller |\n"
                   "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if "asdm" in sections:
        out.append(asdm_section(mini, args, dc))
    if "gpu" in sections:
        out.append("## GPU\n")
        if torch.cuda.is_available():
            out.append(gpu_section())
        else:
            out.append("Not run: this machine has no CUDA device. The Triton kernels were checked for exactness "
                       "against the torch reference under `TRITON_INTERPRET=1` (tests/test_kernels.py); their speed "
                       "(kernel vs fp16 `torch.mm` TFLOP/s, end-to-end) is measured only where a GPU exists. "
                       "No GPU figure is reported here.\n")
    if "curves" in sections:
        from .bench_cache import section

        out.append(section(args))
    if "compile" in sections:
        out.append("## torch.compile\n")
        out.append(compile_graph_breaks(mini, accel_cache(3, 0)) + "\n")
    return "\n".join(out)
