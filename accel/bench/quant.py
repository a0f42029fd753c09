"""``accel bench --sections quant``: W8A8 on the miniature (the reference int8 backend on CPU): static and dynamic
quantizers, CacheQuant as published and the cache + W8A8 recipes, each calibrated here, against the baseline on the
same prompts and seeds (:func:`.common.quality_rows`); and the UNet's weight bytes fp32 against W8A8."""
from __future__ import annotations

from .common import baseline, quality_rows, with_calibration
from .models import sd15_architecture_pipeline


def section(mini, args, n: int, k10: int) -> list[str]:
    """The report's parts; ``n``: UNet calls of a 50-step call, ``k10``: the cache's budget (the calibration
    section's first, DeepCache interval 5's full calls)."""
    import accel
    from accel import miniature
    from accel.calibrate import calibrate, collect_quant_dec
    from accel.calibration import Calibration, refined_key
    from accel.miniature import GUIDANCE
    from accel.transforms.quantize import weight_bytes

    parts = []
    prompts = miniature.prompts(args.num_prompts, seed=args.seed)
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
    parts.append("## W8A8 on the miniature (same prompts and seeds; reference int8 backend on CPU)\n")
    parts.append(f"Calibrations: `cachequant-w8a8` at {k10} full calls (activation scales of {cq.meta['quant']['layers']} "
                 f"layers, then the schedule refined from the DP's {cq_ref['dp']} and the even one with the quantized "
                 f"model running: {cq.tensors[refined_key(0, k10, 'taylor1+skill')].tolist()}, {cq_ref['evals']} "
                 f"runs on {cq_ref['prompts']} prompts): {cq.meta['seconds']:.1f} s; refined without the quantizer "
                 f"(`cache-forecast`): {cf.tensors[refined_key(0, k10, 'taylor1+skill')].tolist()}; the paper's "
                 f"variant (DP schedule, cache and quantization DEC, no refinement): {paper.meta['seconds']:.1f} s.\n")
    table, _ = quality_rows(mini, methods, prompts, 50, seed=args.seed, progress=not args.quiet)
    parts.append(table + "\n")
    rows = []
    models = [("miniature", mini)] + ([] if args.quick else [("SD 1.5 architecture", sd15_architecture_pipeline())])
    for name, p in models:
        before = weight_bytes(p.unet)
        h = accel.apply(p.unet, accel.Quantize(mode="dynamic"))
        after = weight_bytes(p.unet)
        h.remove()
        rows.append(f"| {name} | {before / 2**20:.1f} | {after / 2**20:.1f} | {before / after:.2f}x |")
    parts.append("### UNet weight bytes (fp32 parameters vs the quantized module's stored tensors: int8 weights, "
                 "fp32 scales / zero points / biases, float norms)\n\n| model | fp32 MiB | W8A8 MiB | smaller |\n"
                 "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return parts
