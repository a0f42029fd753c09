"""Issue #25: the guidance-difference norm model against DeepCache I=3 at its fidelity, on held-out prompts.

    python scripts/difference_curves.py --scheduler DPMSolverMultistepScheduler --steps 25 --out diff25.json

One calibration on the miniature's train prompts (``accel calibrate --recipe cache-forecast-cfg-d``'s defaults as the
curves bench sets them: DP statistics and the difference model on ``--difference-prompts`` prompts, the schedule
refined on the first 8 with taylor1-cfg, 40 runs per start) for every budget in ``--budgets``; then, on held-out
prompts and seeds (``--num-prompts`` from ``--seed``), DeepCache's uniform schedule at intervals 2, 3, 4, 5, 7 (the
reference curve), ``refined + taylor1-cfg`` and ``refined + taylor1-cfg + difference`` at each budget, against the
uncached images of the same seeds. Prints per mode and budget the full calls spent, mean / median PSNR, SSIM and
flip rate, and per mode the full calls it needs for uniform I=3's mean PSNR (interpolated) and I=3's calls over
that: the cost ratio at I=3's fidelity (:func:`accel.bench.curves.summary`). ``--also-seed S --also-prompts M``
measures the same calibration again on M further held-out prompts from seed S. ``--out``: the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 5, 6, 7, 8, 9])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--also-seed", type=int, default=None)
    p.add_argument("--also-prompts", type=int, default=64)
    p.add_argument("--difference-prompts", type=int, default=64)
    p.add_argument("--refine-evals", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import accel
    from accel import miniature
    from accel.bench import curves
    from accel.calibrate import calibrate, unet_calls
    from accel.eval import CLIPScorer
    from accel.miniature import GUIDANCE

    FC = accel.FeatureCache
    pipe = curves.pipeline(args.scheduler)
    n = unet_calls(pipe, args.steps)
    t0 = time.time()
    calib = calibrate(pipe, accel.Recipe("cfg-d", [FC(schedule="calibrated", forecast="taylor1-cfg",
                                                      difference="calibrated")]),
                      steps=args.steps, budget=args.budgets, guidance=GUIDANCE, refine_prompts=8,
                      refine_evals=args.refine_evals, difference_prompts=args.difference_prompts)
    calibration_s = time.time() - t0
    scorer = CLIPScorer("miniature")
    report = {"scheduler": args.scheduler, "steps": args.steps, "unet_calls": n, "budgets": args.budgets,
              "calibration_s": round(calibration_s, 1), "difference_prompts": args.difference_prompts,
              "schedules": {k: calib.cache(0).full_calls(n, k, "taylor1-cfg") for k in args.budgets}, "sets": []}
    sets = [(args.seed, args.num_prompts)] + ([(args.also_seed, args.also_prompts)] if args.also_seed is not None else [])
    for seed, count in sets:
        held = miniature.prompts(count, seed=seed)
        base = curves._generate(pipe, held, args.steps, GUIDANCE, seed)
        c = curves.Curves(args.scheduler, args.steps, n, count, calibration_s=calibration_s, budgets=args.budgets)
        jobs = [("uniform (DeepCache)", i, FC(interval=i)) for i in (2, 3, 4, 5, 7)]
        for k in args.budgets:
            jobs.append(("refined + taylor1-cfg", k, FC(schedule="calibrated", budget=k, forecast="taylor1-cfg")))
            jobs.append(("refined + taylor1-cfg + difference", k,
                         FC(schedule="calibrated", budget=k, forecast="taylor1-cfg", difference="calibrated")))
        for name, i, t in jobs:
            c.points.append(curves.point(pipe, name, i, t, calib, held, base, args.steps, seed, scorer))
        s = curves.summary(c)
        rows = [{"mode": q.mode, "full": q.full, "mean": round(q.mean, 2), "median": round(q.median, 2),
                 "ssim": round(q.ssim, 4), "flips": round(q.flips, 3)} for q in c.points]
        ratios = {m: {"calls_for_i3": r["calls_for_i3"], "ratio_vs_i3": r["ratio_vs_i3"]} for m, r in s.items()}
        report["sets"].append({"seed": seed, "prompts": count, "points": rows, "summary": ratios})
        print(f"\n{args.scheduler} {args.steps} steps, {count} held-out prompts from seed {seed} "
              f"(calibration {calibration_s:.0f} s)")
        print("| mode | full calls | PSNR mean | median | SSIM | flipped |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['full']:.2f} | {r['mean']:.2f} | {r['median']:.2f} | {r['ssim']:.4f} | "
                  f"{100 * r['flips']:.1f}% |")
        print("\n| mode | full calls for uniform I=3's mean PSNR | I=3's calls / that |\n|---|---|---|")
        for m, r in ratios.items():
            need, ratio = r["calls_for_i3"], r["ratio_vs_i3"]
            print(f"| {m} | {'not reached' if need is None else f'{need:.2f}'} | "
                  f"{'—' if ratio is None else f'{ratio:.2f}x'} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
