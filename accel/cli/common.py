"""What the ``accel`` subcommands share: argument types, the checks made before any work, model loading, and the
recipe / calibration / CLIP / report steps that ``generate`` and ``eval`` both take.

It sits below the subcommand modules and imports none of them (nor the entry point), so each subcommand reads top
to bottom with this module as its only CLI dependency. Torch and diffusers are imported inside the functions only:
``accel --help`` builds every parser from this module without loading them.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


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
    made with another scheduler (``calibrated_with``) is a one-line error that names the flag, before any work.

    The subcommands call it as ``common.load_model``, looked up here at call time, so that a test can replace the
    work with ``monkeypatch.setattr(accel.cli.common, "load_model", ...)``."""
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


# ----------------------------------------------------------------------------------- generate and eval
def _recipe_and_calibration(args, guidance: float):
    """The recipe (loaded: an unknown one fails here) and, with ``--calibration``, the calibration, loaded once
    (:func:`_apply_recipe` hands this object on, so it is not read and hashed a second time), with a check that it
    is one, that the recipe uses it, and that it was made at this step count, guidance (on/off: error; another
    scale: a warning, given at the first pipeline call) and ``--scheduler``. Returns the recipe, the
    :class:`~accel.calibration.Calibration` and the scheduler class it was made with (both ``None`` without one)."""
    recipe = calib = None
    if args.recipe:
        from accel.recipe import load

        recipe = load(args.recipe)
    if args.calibration is None:
        return recipe, None, None
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
    return recipe, calib, made_with


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


def prepared_pipeline(args):
    """What generate and eval share: every check that needs no model (device, model, settings, scheduler, recipe and
    calibration, CLIP), then the model loaded with the recipe applied. Returns ``(settings, scorer, pipe, handle)``."""
    check_device(args.device)
    check_model(args.model)
    settings = _settings(args)
    check_scheduler(args.scheduler)
    recipe, calib, made_with = _recipe_and_calibration(args, settings.guidance)
    scorer = _clip_scorer(args.clip)
    pipe = load_model(args.model, args.device, args.scheduler, made_with)
    return settings, scorer, pipe, _apply_recipe(pipe, recipe, calib)


def _apply_recipe(pipe, recipe, calib):
    """``accel.apply`` of the recipe with the calibration object :func:`_recipe_and_calibration` loaded. ``apply``
    checks only a calibration it loads itself, so the checks ``Calibration.load(path, unet, pipe)`` makes (made for
    this model, with this scheduler) are made here, now that the model is loaded."""
    if recipe is None:
        return None
    import accel

    if calib is not None:
        calib.check_model(pipe.unet)
        calib.check_scheduler(pipe.scheduler)
    return accel.apply(pipe, recipe, calibration=calib)


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


# ----------------------------------------------------------------------------------- shared options
def _device_and_threads(p):
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=_int_at_least(1), default=1, help="torch intra-op threads (default 1)")


def _scheduler_arg(p):
    p.add_argument("--scheduler", help="sample with this diffusers scheduler instead of the model's, e.g. "
                   "DPMSolverMultistepScheduler or EulerDiscreteScheduler (made from the model's scheduler config; a "
                   "calibration is made for one scheduler)")


def _generation_args(p, num_images_default=None):
    """The options ``generate`` and ``eval`` share: model, recipe, calibration, prompts, sampling, CLIP, device."""
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
