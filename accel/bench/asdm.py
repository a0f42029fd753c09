"""``accel bench --sections asdm``: A-SDM feature inheritance on the miniature beside DeepCache and CacheQuant at
similar cost: FLOP-ideal speedup (FLOPs counted over whole pipeline calls), measured speedup (interleaved), CLIP
delta and PSNR against the baseline on the same held-out seeds."""
from __future__ import annotations

import statistics

from .common import (accel_cache, baseline, deepcache, pipeline_flops, quality_rows, time_methods, unet_calls,
                     with_calibration)


def section(mini, args, dc: list) -> str:
    """A-SDM feature inheritance on the miniature beside DeepCache and CacheQuant at similar cost: FLOP-ideal
    speedup (FLOPs counted over whole pipeline calls), measured speedup (interleaved), CLIP delta and PSNR."""
    import accel
    from accel.calibrate import calibrate
    from accel.miniature import GUIDANCE

    n = unet_calls(mini, 50)
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
