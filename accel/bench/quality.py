"""``accel bench --sections quality`` (and the calibration both it and ``quant`` read): on the miniature (trained
weights), CacheQuant's DP schedules and their refinement per budget, then every cache mode's CLIP score (mean ±
s.e.m. over prompts) and its paired delta to the baseline, the attribute judge, PSNR / SSIM of the final images and
MSE of the final latents against the baseline on the same held-out seeds (:func:`.common.quality_rows`)."""
from __future__ import annotations

from .common import accel_cache, baseline, deepcache, quality_rows, unet_calls, with_calibration


def calibration(mini, args) -> tuple[str, object, int, list[int]]:
    """``accel calibrate``'s cachequant-dp on the miniature at the budgets of DeepCache intervals 5, 2, 3, 7:
    ``(report part, calibration, UNet calls of a 50-step call, budgets)``; the first budget (interval 5) is the
    artifact's default and the ``quant`` section's."""
    from accel.calibrate import calibrate
    from accel.miniature import GUIDANCE

    n = unet_calls(mini, 50)
    budgets = [len(range(0, n, i)) for i in (5, 2, 3, 7)]  # the first (interval 5) is the artifact's default
    one = calibrate(mini, "cachequant-dp", steps=50, budget=budgets[0], guidance=GUIDANCE, progress=not args.quiet)
    calib = calibrate(mini, "cachequant-dp", steps=50, budget=budgets, guidance=GUIDANCE, progress=not args.quiet)
    ref = calib.meta["cache"]["refined"]
    rows = [f"| {k} | {ref[str(k)]['dp']} | {ref[str(k)]['dp_error_db']:+.2f} | {calib.cache(0).full_calls(n, k)} | "
            f"{ref[str(k)]['from']} | {ref[str(k)]['error_db']:+.2f} | {ref[str(k)]['evals']} | {ref[str(k)]['seconds']:.0f} |"
            for k in sorted(budgets, reverse=True)]
    text = (f"## Calibration\n\n`calibrate(miniature, 'cachequant-dp', steps=50, budget={budgets[0]}, guidance={GUIDANCE})` "
            f"(the defaults of `accel calibrate`: cache statistics on {one.meta['prompts']['count']} prompts, the DP "
            f"schedule refined on {ref[str(budgets[0])]['prompts']} of them): **{one.meta['seconds']:.1f} s** on one CPU "
            f"thread; with refined schedules for {len(budgets)} budgets, `calibrate(miniature, "
            f"'cachequant-dp', steps=50, budget={budgets})`: {calib.meta['seconds']:.1f} s.\n\n"
            "Schedules per budget: CacheQuant's DP on the feature distances, and the refined one (local search on "
            "the final latents' error on the calibration prompts, from the DP's and the even schedule; "
            "error = mean 10 log10 MSE vs the uncached latents, lower is better; dec-mean correction active):\n\n"
            "| full calls | DP schedule | DP error dB | refined schedule | refined from | refined error dB | runs | s |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return text, calib, n, budgets


def section(mini, args, dc: list, calib, n: int) -> list[str]:
    """The report's parts: every cache mode at four budgets against the baseline (``calib`` from
    :func:`calibration`, ``n`` its UNet calls; ``dc`` non-empty: the DeepCache package's rows too)."""
    import accel
    from accel import miniature
    from accel.miniature import GUIDANCE

    parts = []
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
    parts.append(f"## Caching quality on the miniature ({len(prompts)} held-out prompts, 50 steps = {n} UNet calls "
                 f"(PNDM), cfg {GUIDANCE} (the miniature's recommended scale), seeds {args.seed}..{args.seed + len(prompts) - 1}, CLIP: miniature-clip)\n")
    parts.append("Δ CLIP is the mean paired difference to the baseline image of the same seed ± its s.e.m.; "
                 "the baseline's own ± is the seed-to-seed standard error of its CLIP score. Budgets are the "
                 "uniform schedule's numbers of full calls at DeepCache intervals 2, 3, 5, 7. The held-out prompts and "
                 "seeds are not the calibration ones.\n")
    table, _ = quality_rows(mini, methods, prompts, 50, seed=args.seed, progress=not args.quiet)
    parts.append(table + "\n")
    return parts
