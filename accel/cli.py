"""The ``accel`` command: ``accel generate | eval | calibrate | bench``.

Every subcommand runs on the embedded miniature pipeline by default (``--model miniature``) and takes
any local diffusers pipeline folder or hub id (when weights are available) with ``--model``.

Bad input ends with one line on stderr and exit code 2, before any work: every argument that can be checked
(numbers, files, the output, the recipe, the calibration, the CLIP model, the device, the model folder) is
checked before the model loads or the first image is made. Outputs are complete or absent: a folder is written
beside its destination and renamed into place at the end; an existing output is replaced only if accel wrote it.
This module imports torch only inside the commands, so ``accel --help`` answers at once.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import warnings
from pathlib import Path

BENCH_SECTIONS = ("cost", "speed", "quality", "quant", "asdm", "compile", "gpu", "curves")
BENCH_DEFAULT = ("cost", "speed", "quality", "quant", "asdm", "compile", "gpu")  # curves: its own report (make bench-cache)


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``accel generate: error: ...``) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------- argument types
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _int_list(text: str) -> list[int]:
    parse = _int_at_least(1)
    return [parse(x) for x in text.split(",")]


def _names(valid: tuple, what: str):
    """A comma-separated list of names out of ``valid`` (argparse type); an unknown one is a one-line error."""
    def parse(text: str) -> str:
        names = [s.strip() for s in text.split(",")]
        unknown = [s for s in names if s not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(map(repr, unknown))}; valid: "
                                             f"{','.join(valid)}")
        return ",".join(names)
    return parse


CURVE_SAMPLERS = ("PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")  # bench_cache.SETTINGS
_sections, _samplers = _names(BENCH_SECTIONS, "section"), _names(CURVE_SAMPLERS, "sampler")


def _refine_prompts(text: str) -> int:
    from accel.calibrate import DEFAULT_PROMPTS  # only when the option is given: the bench imports it anyway

    n = _int_at_least(1)(text)
    if n > DEFAULT_PROMPTS:
        raise argparse.ArgumentTypeError(f"{n}: the curves' calibrations use {DEFAULT_PROMPTS} prompts, refine on at "
                                         f"most {DEFAULT_PROMPTS}")
    return n


# ----------------------------------------------------------------------------------- checks before the work
def _threads(n: int | None):
    import torch

    if n:
        torch.set_num_threads(n)


def check_device(device: str) -> str:
    """``device`` if torch can run on it here, else a one-line error."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device!r}: not a torch device ({str(e).splitlines()[0]})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    return device


def check_model(model: str | None) -> str:
    """``"miniature"``, a diffusers pipeline folder (with ``model_index.json``) or, when downloads are allowed,
    a hub id; a one-line error otherwise."""
    if model in (None, "", "miniature"):
        return "miniature"
    p = Path(model)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise UsageError(f"--model {model}: a folder without model_index.json, not a diffusers pipeline folder "
                             "(save one with pipe.save_pretrained(DIR))")
        return model
    if p.exists():
        raise UsageError(f"--model {model}: a file, not a diffusers pipeline folder")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"--model {model}: no such folder, and HF_HUB_OFFLINE=1 forbids downloading it as a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such folder")
    return model  # a hub id: diffusers downloads it


def check_scheduler(name: str | None) -> str | None:
    """``--scheduler``: a diffusers scheduler class that Stable Diffusion pipelines take, else a one-line error."""
    if name is None:
        return None
    from diffusers.schedulers import KarrasDiffusionSchedulers

    valid = [s.name for s in KarrasDiffusionSchedulers]
    if name not in valid:
        raise UsageError(f"--scheduler {name}: not a diffusers scheduler for Stable Diffusion pipelines; one of "
                         f"{', '.join(sorted(valid))}")
    return name


def load_model(model: str | None, device: str = "cpu", scheduler: str | None = None, calibrated_with: str | None = None):
    """``"miniature"`` (default) or a diffusers pipeline folder / hub id -> a pipeline on ``device``; with
    ``scheduler`` (a diffusers class name) its scheduler replaced by that one, from the model's scheduler config
    (as ``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` does). A calibration
    made with another scheduler (``calibrated_with``) is a one-line error that names the flag, before any work."""
    model = check_model(model)
    if model == "miniature":
        from accel import miniature

        pipe = miniature.load_pipeline(device=device)
    else:
        from accel.api import load_pipeline

        try:
            pipe = load_pipeline(model)
        except (OSError, ValueError) as e:  # missing weights, no network, a broken folder
            raise UsageError(f"--model {model}: cannot load it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
    if scheduler is not None and type(pipe.scheduler).__name__ != scheduler:
        import diffusers

        if scheduler not in {c.__name__ for c in pipe.scheduler.compatibles}:
            raise UsageError(f"--scheduler {scheduler}: this model's {type(pipe.scheduler).__name__} config does not "
                             f"carry over to it")
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    if calibrated_with is not None and type(pipe.scheduler).__name__ != calibrated_with:
        raise UsageError(f"this calibration was made with {calibrated_with}, the model's scheduler is "
                         f"{type(pipe.scheduler).__name__}: add --scheduler {calibrated_with} or recalibrate")
    return pipe


def default_guidance(args) -> float:
    """``--guidance``, else the model's recommended scale: the miniature's (3.0), diffusers' 7.5 otherwise."""
    if args.guidance is not None:
        return args.guidance
    from accel import miniature

    return miniature.GUIDANCE if args.model in (None, "miniature") else 7.5


def _recipe_and_calibration(args, guidance: float):
    """The recipe (loaded: an unknown one fails here) and, with ``--calibration``, a check that it is one, that
    the recipe uses it, and that it was made at this step count, guidance (on/off: error; another scale: a
    warning, given at the first pipeline call) and ``--scheduler``; returns the recipe and the scheduler class
    the calibration was made with (``None`` without one)."""
    recipe = calib = None
    if args.recipe:
        from accel.recipe import load

        recipe = load(args.recipe)
    if args.calibration is None:
        return recipe, None
    from accel.calibration import Calibration, uses_calibration

    calib = Calibration.load(args.calibration)
    made_for = calib.meta.get("recipe", {}).get("name")
    if recipe is None:
        raise UsageError(f"--calibration needs --recipe (this calibration was made for --recipe {made_for})")
    if not any(uses_calibration(t) for t in recipe.transforms):
        raise UsageError(f"recipe {recipe.name!r} uses no calibration, so --calibration would be ignored "
                         f"(this one was made for {made_for!r}): drop it or use that recipe")
    sched = calib.meta.get("scheduler", {})
    if sched.get("steps") is not None and sched["steps"] != args.steps:
        raise UsageError(f"this calibration was made for {sched['steps']} steps ({sched.get('unet_calls')} UNet calls per "
                         f"pipeline call), this run has --steps {args.steps}: use --steps {sched['steps']} or recalibrate "
                         f"with --steps {args.steps}")
    made_with = sched.get("class")
    if args.scheduler is not None and made_with is not None and made_with != args.scheduler:
        raise UsageError(f"this calibration was made with {made_with}, this run has --scheduler {args.scheduler}: use "
                         f"--scheduler {made_with} or recalibrate with --scheduler {args.scheduler}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning comes once, at the first pipeline call
        calib.check_guidance(guidance)
    return recipe, made_with


def _clip_scorer(spec: str):
    import logging

    from accel.eval import CLIPScorer

    logging.disable(logging.ERROR)  # open_clip logs the error it then raises: say it once
    try:
        return CLIPScorer(spec)
    except ValueError:
        raise
    except (RuntimeError, OSError) as e:  # open_clip: unknown model or tag, weights not available offline
        raise UsageError(f"--clip {spec}: cannot load it ({str(e).splitlines()[0]})") from None
    finally:
        logging.disable(logging.NOTSET)


def _settings(args):
    from accel.eval.runner import GenerationSettings

    return GenerationSettings(steps=args.steps, guidance=default_guidance(args), seed=args.seed, batch_size=args.batch_size)


def _apply_recipe(pipe, args, recipe):
    if recipe is None:
        return None
    import accel

    return accel.apply(pipe, recipe, calibration=args.calibration)


def _shared_token() -> str:
    """A random name every process of an ``accelerate launch`` agrees on (process 0's)."""
    import uuid

    from accel.dist import gather

    return gather([uuid.uuid4().hex[:12]])[0]


def _describe(args, report: dict, pipe, handle=None):
    report["model"] = args.model or "miniature"
    report["scheduler"] = type(pipe.scheduler).__name__
    report["recipe"] = args.recipe
    report["calibration"] = str(Path(args.calibration).resolve()) if args.calibration else None
    if handle is not None:  # what the recipe spent, summed over the processes
        from accel.dist import gather

        per = gather([handle.stats()])
        calls = {k: sum(st[k] for st in per) for k in ("pipeline_calls", "unet_calls", "full", "cached")}
        calls["full_per_pipeline_call"] = calls["full"] / calls["pipeline_calls"] if calls["pipeline_calls"] else 0.0
        report["unet_calls"] = calls


# ----------------------------------------------------------------------------------- commands
def cmd_generate(args):
    from accel.eval import runner
    from accel.fileio import check_destination, new_folder

    out = check_destination(args.out, runner.is_image_folder, "a folder written by accel generate", folder=True,
                            flag="--out")
    if args.prompt:
        n = len(args.prompt) if args.num_images is None else args.num_images
        prompts = [args.prompt[i % len(args.prompt)] for i in range(n)]
    else:
        prompts = runner.load_prompts(args.prompts, 8 if args.num_images is None else args.num_images, seed=args.seed)
    check_device(args.device)
    check_model(args.model)
    settings = _settings(args)
    check_scheduler(args.scheduler)
    recipe, made_with = _recipe_and_calibration(args, settings.guidance)
    scorer = _clip_scorer(args.clip)
    pipe = load_model(args.model, args.device, args.scheduler, made_with)
    handle = _apply_recipe(pipe, args, recipe)
    from accel.dist import state

    main = state().is_main_process
    with new_folder(out, runner.is_image_folder, "a folder written by accel generate", _shared_token(),
                    commit=main) as tmp:
        report = runner.evaluate(pipe, prompts, settings, clip=scorer, out_dir=tmp)
        for im in report["images"]:
            im["path"] = str(Path(args.out) / Path(im["path"]).name)
        _describe(args, report, pipe, handle)
        if main:
            runner.write_report(report, tmp / runner.REPORT)
    if main:
        for im in report["images"]:
            line = f"{im['path']}  clip={im['clip_score']:.2f}"
            if "judged_correct" in im:
                line += "  shape+colour " + ("right" if im["judged_correct"] else "wrong")
            print(f"{line}  {im['prompt']!r}")
        print(runner.table(report))
        print(f"images and report.json in {out}")


def cmd_eval(args):
    import contextlib

    from accel.eval import runner
    from accel.fileio import check_destination, new_folder

    out = check_destination(args.out, runner.is_report, "an accel eval report", folder=False, flag="--out")
    images = None
    if args.save_images:
        images = check_destination(args.save_images, runner.is_image_folder, "a folder written by accel",
                                   folder=True, flag="--save-images")
    prompts = runner.load_prompts(args.prompts, args.num_images, seed=args.seed)
    check_device(args.device)
    check_model(args.model)
    settings = _settings(args)
    check_scheduler(args.scheduler)
    recipe, made_with = _recipe_and_calibration(args, settings.guidance)
    scorer = _clip_scorer(args.clip)
    pipe = load_model(args.model, args.device, args.scheduler, made_with)
    handle = _apply_recipe(pipe, args, recipe)
    from accel.dist import state

    main = state().is_main_process
    folder = new_folder(images, runner.is_image_folder, "a folder written by accel", _shared_token(),
                        commit=main) if images else contextlib.nullcontext()
    with folder as tmp:
        report = runner.evaluate(pipe, prompts, settings, clip=scorer, out_dir=tmp, progress=not args.quiet)
        report["prompts_file"] = str(args.prompts) if args.prompts else "miniature grammar (held-out stream)"
        _describe(args, report, pipe, handle)
        if tmp is not None:
            for im in report["images"]:
                im["path"] = str(Path(args.save_images) / Path(im["path"]).name)
            if main:
                runner.write_report(report, tmp / runner.REPORT)
    if main:
        runner.write_report(report, out)
        print(runner.table(report))
        print(f"report: {out}")


def cmd_calibrate(args):
    from accel.calibrate import DEFAULT_PROMPTS, calibrate, check_recipe, check_refine_prompts, refines_cache
    from accel.calibration import check_destination
    from accel.dist import state
    from accel.eval.runner import load_prompts

    out = check_destination(args.out, flag="--out")
    recipe = check_recipe(args.recipe)
    if args.prompts is None:
        from accel import miniature

        prompts = miniature.prompts(DEFAULT_PROMPTS if args.num_prompts is None else args.num_prompts, seed=args.seed,
                                    split="train")
        source = "miniature grammar (train stream)"
    else:
        prompts = load_prompts(args.prompts, args.num_prompts, seed=args.seed)
        source = str(args.prompts)
    if refines_cache(recipe, args.refine):  # before the model loads; calibrate() checks it again (the API's check)
        check_refine_prompts(args.refine_prompts, len(prompts))
    check_device(args.device)
    check_model(args.model)
    check_scheduler(args.scheduler)
    pipe = load_model(args.model, args.device, args.scheduler)
    calib = calibrate(pipe, recipe, prompts, args.steps, args.budget, args.seed, default_guidance(args),
                      args.batch_size, not args.unconstrained, source, refine=args.refine,
                      refine_prompts=args.refine_prompts, refine_evals=args.refine_evals)
    if state().is_main_process:
        calib.save(out)
        print(f"calibration -> {out} ({calib.meta['seconds']} s, {len(prompts)} prompts, "
              f"{calib.meta['scheduler']['unet_calls']} UNet calls)")
        if any(t["type"] == "FeatureCache" for t in calib.meta["recipe"]["transforms"]):
            c = calib.meta["cache"]
            print(f"DP schedule (branch {c['branch']}, {c['budget']} full calls): {c['dp_schedule']}")
            for name, r in c.get("refined", {}).items():
                forecast, _, k = name.rpartition(".")
                how = [f"forecast {forecast}"] * bool(forecast) + ["W8A8 running"] * bool(r.get("quantized"))
                print(f"refined schedule, {k} full calls{' (' + ', '.join(how) + ')' if how else ''}: "
                      f"{calib.cache(c['branch']).full_calls(None, int(k), forecast or None)} "
                      f"(final-latent error {r['dp_error_db']:+.2f} dB -> {r['error_db']:+.2f} dB, {r['evals']} runs, "
                      f"{r['seconds']:.0f} s)")
            for a in c.get("adaptive", []):
                for k, tau in a["thresholds"].items():
                    print(f"adaptive threshold, {k} full calls (forecast {a['forecast']}): {tau:.4g} "
                          f"(measured {a['full_calls'][k]:.2f} full calls per prompt)")
        if "inherit" in calib.meta:
            c = calib.meta["inherit"]
            print(f"inheritance schedule ({len(c['targets'])} targets run at {c['budget']} calls): {c['schedule']}")


def is_bench_report(path) -> bool:
    try:
        with open(path) as f:
            head = f.read(64)
        return head.startswith("# Benchmarks\n\nGenerated by `accel bench") or head.startswith("# GPU benchmark")
    except (OSError, UnicodeDecodeError):
        return False


def cmd_bench(args):
    from accel.fileio import check_destination, write_text_atomic

    out = check_destination(args.out, is_bench_report, "a report written by accel bench", folder=False, flag="--out")
    from accel import bench

    args.command_line = "accel " + " ".join(shlex.quote(a) for a in args.argv)
    if args.gpu:
        from accel import bench_gpu

        # the report so far after every section, so that a run stopped from outside leaves what it measured
        text = bench_gpu.main(args, emit=lambda part: write_text_atomic(out, part + bench_gpu.PARTIAL))
    else:
        text = bench.run(args)
    write_text_atomic(out, text)
    print(text)
    print(f"\nwritten: {out}")


# ----------------------------------------------------------------------------------- the parser
def _device_and_threads(p):
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=_int_at_least(1), default=1, help="torch intra-op threads (default 1)")


def _scheduler_arg(p):
    p.add_argument("--scheduler", help="sample with this diffusers scheduler instead of the model's, e.g. "
                   "DPMSolverMultistepScheduler or EulerDiscreteScheduler (made from the model's scheduler config; a "
                   "calibration is made for one scheduler)")


def _common(p, num_images_default=None):
    p.add_argument("--model", default="miniature", help="'miniature' (default) or a diffusers pipeline folder/id")
    p.add_argument("--recipe", help="acceleration recipe: a name in recipes/ (e.g. deepcache-i3) or a .toml file")
    p.add_argument("--calibration", help="calibration folder written by `accel calibrate` (needs --recipe)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: miniature captions)")
    p.add_argument("--num-images", type=_int_at_least(1), default=num_images_default, help="number of images")
    p.add_argument("--steps", type=_int_at_least(1), default=50, help="inference steps (default 50)")
    _scheduler_arg(p)
    p.add_argument("--guidance", type=_finite_float, help="classifier-free guidance scale (default: 3.0 for the "
                   "miniature, its recommended scale; 7.5 otherwise)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="prompts per pipeline call (default 4)")
    p.add_argument("--clip", default="miniature",
                   help="open_clip model for CLIP score: 'miniature', MODEL:PRETRAINED or local-dir:PATH")
    _device_and_threads(p)


def _calibrate_parser(sub):
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
    _scheduler_arg(p)
    p.add_argument("--budget", type=_int_at_least(1), nargs="+",
                   help="full UNet calls per pipeline call (default 10); several values refine a schedule for each, "
                        "the first is the artifact's default; only for recipes with a cache or calibrated inheritance")
    p.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: 8 miniature captions)")
    p.add_argument("--num-prompts", type=_int_at_least(1), help="use this many prompts (cycled)")
    p.add_argument("--unconstrained", action="store_true", help="no group-length bounds in the DP")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="keep the DP schedule as it is (default: refine it on the final samples' error)")
    p.add_argument("--refine-prompts", type=_int_at_least(1), default=None,
                   help="of the calibration prompts, how many the cache's refinement runs (default 8, or all when "
                        "fewer; at most --num-prompts)")
    p.add_argument("--refine-evals", type=_int_at_least(1), default=60,
                   help="at most this many pipeline runs per start of the refinement, per budget (default 60)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="calibration prompt i uses seed SEED+i (default 0)")
    p.add_argument("--guidance", type=_finite_float, help="classifier-free guidance scale (default: 3.0 for the "
                   "miniature, 7.5 otherwise; calibrate at the scale you generate with)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="prompts per pipeline call (default 4)")
    p.add_argument("--out", required=True, help="calibration folder to write: a new folder, an empty one, or a "
                   "calibration to replace (anything else is refused)")
    _device_and_threads(p)
    p.set_defaults(func=cmd_calibrate)


def _bench_parser(sub):
    p = sub.add_parser("bench", help="cost model, speed and quality side by side, written to a Markdown report",
                       description="Measure the FLOP cost model, wall-clock speed against the baseline and the "
                       "DeepCache package, and quality (CLIP, PSNR, SSIM) side by side in one run, and write the report "
                       "(`make bench` regenerates docs/BENCHMARKS.md). A full run takes about an hour on one CPU "
                       "thread; `--quick --sections cost,gpu` takes seconds.")
    p.add_argument("--out", required=True, help="the Markdown report to write, e.g. docs/BENCHMARKS.md (an existing "
                   "file is replaced only if accel bench wrote it)")
    p.add_argument("--sections", type=_sections, default=",".join(BENCH_DEFAULT),
                   help=f"comma-separated sections to run (default {','.join(BENCH_DEFAULT)}; also: curves, every cache "
                   "mode's fidelity against full calls for three samplers, about 70 minutes: `make bench-cache`)")
    p.add_argument("--curve-refine-evals", type=_int_at_least(1), default=40,
                   help="curves section: refinement runs per start and budget in its calibrations (default 40)")
    p.add_argument("--curve-refine-prompts", type=_refine_prompts, default=8,
                   help="curves section: calibration prompts the schedules and thresholds are refined on (default 8, "
                   "as `accel calibrate`; at most 8)")
    p.add_argument("--curve-samplers", type=_samplers, default=",".join(CURVE_SAMPLERS),
                   help=f"curves section: the sampler settings to measure (default all: {','.join(CURVE_SAMPLERS)}: "
                   "50-step PNDM, 25-step DPM-Solver++, 30-step Euler)")
    p.add_argument("--intervals", type=_int_list, default=[3, 5],
                   help="cache intervals of the speed and cost tables (default 3,5)")
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="interleaved timed runs per method on the miniature (default 3)")
    p.add_argument("--num-prompts", type=_int_at_least(1), default=32,
                   help="held-out prompts of the quality sections (default 32)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="prompt i uses seed SEED+i (default 0)")
    p.add_argument("--sd-steps", type=_int_at_least(2), default=20,
                   help="inference steps on the SD 1.5 architecture (default 20)")
    p.add_argument("--sd-repeats", type=_int_at_least(1), default=2,
                   help="interleaved runs per method on SD 1.5 (default 2)")
    p.add_argument("--sd-latent", type=_int_at_least(8), default=32,
                   help="latent side on the SD 1.5 architecture (default 32: 256x256 images)")
    p.add_argument("--quick", action="store_true", help="miniature only (no SD 1.5 architecture); with --gpu: the "
                   "quick GPU run (about 8 minutes for SD 1.5 and SDXL: 10 steps, the CUDA-graph rows first, the ten "
                   "heaviest layer shapes; make bench-gpu-quick)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=_int_at_least(1), default=1, help="torch intra-op threads (default 1)")
    g = p.add_argument_group("GPU benchmark (accel/bench_gpu.py; make bench-gpu)")
    g.add_argument("--gpu", action="store_true", help="the GPU benchmark instead (one CUDA GPU, < 10 min): kernels vs "
                   "reference, int8 layer throughput on SD 1.5 / SDXL shapes, end to end; without CUDA the report says "
                   "'not run'")
    g.add_argument("--dry-run", action="store_true", help="with --gpu: run its code on CPU with tiny models (no GPU figures)")
    g.add_argument("--gpu-models", default="sd15,sdxl", help="with --gpu: sd15, sdxl or both (default)")
    g.add_argument("--gpu-steps", type=_int_at_least(1), default=None,
                   help="with --gpu: denoising steps end to end (default 50; 10 with --quick)")
    g.add_argument("--gpu-budget-s", type=_int_at_least(60), default=None,
                   help="with --gpu: seconds the run may take; a part that would overrun is reported 'not run' (default "
                   "540; 450 with --quick)")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="accel", description="Accelerate stock diffusers UNet pipelines: "
                     "feature caching, int8, feature inheritance, long-skip scaling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images (and score them with CLIP)")
    _common(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); overrides --prompts")
    g.add_argument("--out", default="outputs", help="output folder (default outputs/): a new folder, an empty one, "
                   "or one accel generate wrote (replaced; anything else is refused)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="CLIP-score evaluation; runs under `accelerate launch` unchanged")
    _common(e, num_images_default=None)
    e.add_argument("--out", default="eval_report.json", help="JSON report path (default eval_report.json; an "
                   "existing file is replaced only if it is an accel report)")
    e.add_argument("--save-images", help="also save the images (and the report) into this folder")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    _calibrate_parser(sub)
    _bench_parser(sub)
    return parser


def _show_warning(command):
    def show(message, category, filename, lineno, file=None, line=None):
        from accel.errors import AccelWarning

        if issubclass(category, AccelWarning):
            from tqdm.auto import tqdm

            tqdm.write(f"accel {command}: warning: {message}", file=sys.stderr)  # on its own line, beside progress bars
        else:
            print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)

    return show


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a one-line argparse error
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    from accel.errors import AccelError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(args.command)
            _threads(getattr(args, "threads", 1))
            args.func(args)
    except (UsageError, AccelError, ValueError, FileNotFoundError, FloatingPointError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            msg = f"{e.strerror or e}: {e.filename}" if e.filename else e
        print(f"accel {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
