"""``accel calibrate``: run the unaccelerated pipeline on calibration prompts once and store what the recipe's
transforms need (accel.calibrate does the work; this module checks the arguments first and reports what it found)."""
from __future__ import annotations

from pathlib import Path

from . import common
from .common import _finite_float, _int_at_least


def cmd_calibrate(args):
    from accel.calibrate import (calibrate, check_difference_prompts, check_recipe, check_refine_prompts,
                                 default_prompt_count, fits_difference, refines_cache)
    from accel.calibration import check_destination
    from accel.dist import state
    from accel.eval.runner import load_prompts
    from accel.transforms import FeatureCache

    out = check_destination(args.out, flag="--out")
    recipe = check_recipe(args.recipe)
    if args.prompts is None:
        from accel import miniature

        count = default_prompt_count(recipe, args.difference_prompts) if args.num_prompts is None else args.num_prompts
        prompts = miniature.prompts(count, seed=args.seed, split="train")
        source = "miniature grammar (train stream)"
    else:
        prompts = load_prompts(args.prompts, args.num_prompts, seed=args.seed)
        source = str(args.prompts)
    if refines_cache(recipe, args.refine):  # before the model loads; calibrate() checks it again (the API's check)
        check_refine_prompts(args.refine_prompts, len(prompts))
    if fits_difference(recipe):
        check_difference_prompts(args.difference_prompts, len(prompts))
    common.check_device(args.device)
    common.check_model(args.model)
    common.check_scheduler(args.scheduler)
    pipe = common.load_model(args.model, args.device, args.scheduler)
    calib = calibrate(pipe, recipe, prompts, args.steps, args.budget, args.seed, common.default_guidance(args),
                      args.batch_size, not args.unconstrained, source, refine=args.refine,
                      refine_prompts=args.refine_prompts, refine_evals=args.refine_evals,
                      difference_prompts=args.difference_prompts)
    if state().is_main_process:
        calib.save(out)
        print(f"calibration -> {out} ({calib.meta['seconds']} s, {len(prompts)} prompts, "
              f"{calib.meta['scheduler']['unet_calls']} UNet calls)")
        if any(isinstance(t, FeatureCache) for t in recipe.transforms):  # the recipe calibrate() was given
            c = calib.meta["cache"]
            print(f"DP schedule (branch {c['branch']}, {c['budget']} full calls): {c['dp_schedule']}")
            for name, r in c.get("refined", {}).items():
                forecast, _, k = name.rpartition(".")
                how = [f"forecast {forecast}"] * bool(forecast) + ["W8A8 running"] * bool(r.get("quantized"))
                print(f"refined schedule, {k} full calls{' (' + ', '.join(how) + ')' if how else ''}: "
                      f"{calib.cache(c['branch']).full_calls(None, int(k), forecast or None)} "
                      f"(final-latent error {r['dp_error_db']:+.2f} dB -> {r['error_db']:+.2f} dB, {r['evals']} runs, "
                      f"{r['seconds']:.0f} s)")
            if "difference" in c:
                d = c["difference"]
                print(f"guidance-difference model fit for budgets {d['budgets']} on {d['prompts']} prompts "
                      f"({d['seconds']:.0f} s)")
            for a in c.get("adaptive", []):
                for k, tau in a["thresholds"].items():
                    print(f"adaptive threshold, {k} full calls (forecast {a['forecast']}): {tau:.4g} "
                          f"(measured {a['full_calls'][k]:.2f} full calls per prompt)")
        if "inherit" in calib.meta:
            c = calib.meta["inherit"]
            print(f"inheritance schedule ({len(c['targets'])} targets run at {c['budget']} calls): {c['schedule']}")


def add_parser(sub):
    p = sub.add_parser("calibrate", help="calibrate a model for a recipe once (writes accel.json + safetensors)",
                       description="Run the unaccelerated pipeline on calibration prompts and store what the recipe's "
                       "transforms need (cache feature statistics and schedules, activation scales, inheritance "
                       "distances) in a calibration folder. Takes minutes on the miniature on one CPU thread.")
    p.add_argument("model", nargs="?", default="miniature", help="'miniature' (default) or a pipeline folder/id")
    p.add_argument("--recipe", default="cachequant-dp",
                   help="the recipe to calibrate for (default cachequant-dp): a name in recipes/ or a .toml file; it "
                        "must use a calibration (cachequant-dp, cachequant-w8a8, w8a8, asdm-calibrated, ...)")
    p.add_argument("--steps", type=_int_at_least(2), default=50,
                   help="inference steps of the pipeline calls the calibration is for (default 50); use it at the same "
                        "step count")
    common._scheduler_arg(p)
    p.add_argument("--budget", type=_int_at_least(1), nargs="+",
                   help="full UNet calls per pipeline call (default 10); several values refine a schedule for each, "
                        "the first is the artifact's default; only for recipes with a cache or calibrated inheritance")
    p.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: 8 miniature captions; "
                   "--difference-prompts of them for a recipe with FeatureCache(difference='calibrated'))")
    p.add_argument("--num-prompts", type=_int_at_least(1), help="use this many prompts (cycled)")
    p.add_argument("--unconstrained", action="store_true", help="no group-length bounds in the DP")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="keep the DP schedule as it is (default: refine it on the final samples' error)")
    p.add_argument("--refine-prompts", type=_int_at_least(1), default=None,
                   help="of the calibration prompts, how many the cache's refinement runs (default 8, or all when "
                        "fewer; at most --num-prompts)")
    p.add_argument("--refine-evals", type=_int_at_least(1), default=60,
                   help="at most this many pipeline runs per start of the refinement, per budget (default 60)")
    p.add_argument("--difference-prompts", type=_int_at_least(1), default=None,
                   help="of the calibration prompts, how many the guidance-difference model of a "
                        "FeatureCache(difference='calibrated') is fit on (default 64, or all when fewer; without "
                        "--prompts/--num-prompts that many are drawn)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="calibration prompt i uses seed SEED+i (default 0)")
    p.add_argument("--guidance", type=_finite_float, help="classifier-free guidance scale (default: 3.0 for the "
                   "miniature, 7.5 otherwise; calibrate at the scale you generate with)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="prompts per pipeline call (default 4)")
    p.add_argument("--out", required=True, help="calibration folder to write: a new folder, an empty one, or a "
                   "calibration to replace (anything else is refused)")
    common._device_and_threads(p)
    p.set_defaults(func=cmd_calibrate)
