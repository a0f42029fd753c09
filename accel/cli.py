"""The ``accel`` command: ``accel generate | eval | calibrate | bench``.

Every subcommand runs on the embedded miniature pipeline by default (``--model miniature``) and takes
any local diffusers pipeline folder or hub id (when weights are available) with ``--model``.
Bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _threads(n: int | None):
    import torch

    if n:
        torch.set_num_threads(n)


def load_model(model: str | None, device: str = "cpu"):
    """``"miniature"`` (default) or a diffusers pipeline folder / hub id -> a pipeline on ``device``."""
    if model in (None, "", "miniature"):
        from accel import miniature

        return miniature.load_pipeline(device=device)
    from diffusers import DiffusionPipeline

    if not Path(model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"model {model!r} is not a local folder and HF_HUB_OFFLINE=1 forbids downloading it")
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _apply_recipe(pipe, args):
    recipe = getattr(args, "recipe", None)
    if not recipe:
        return None
    import accel

    return accel.apply(pipe, recipe, calibration=getattr(args, "calibration", None))


def _settings(args):
    from accel.eval.runner import GenerationSettings

    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    return GenerationSettings(steps=args.steps, guidance=default_guidance(args), seed=args.seed, batch_size=args.batch_size)


def default_guidance(args) -> float:
    """``--guidance``, else the model's recommended scale: the miniature's (3.0), diffusers' 7.5 otherwise."""
    if args.guidance is not None:
        return args.guidance
    from accel import miniature

    return miniature.GUIDANCE if args.model in (None, "miniature") else 7.5


def cmd_generate(args):
    from accel.eval import runner

    if args.prompt:
        prompts = [args.prompt[i % len(args.prompt)] for i in range(args.num_images or len(args.prompt))]
    else:
        prompts = runner.load_prompts(args.prompts, args.num_images or 8, seed=args.seed)
    pipe = load_model(args.model, args.device)
    _apply_recipe(pipe, args)
    report = runner.evaluate(pipe, prompts, _settings(args), clip=args.clip, out_dir=args.out)
    from accel.dist import state

    if state().is_main_process:
        runner.write_report(report, Path(args.out) / "report.json")
        for im in report["images"]:
            line = f"{im['path']}  clip={im['clip_score']:.2f}"
            if "judged_correct" in im:
                line += "  shape+colour " + ("right" if im["judged_correct"] else "wrong")
            print(f"{line}  {im['prompt']!r}")
        print(runner.table(report))
        print(f"images and report.json in {Path(args.out).resolve()}")


def cmd_eval(args):
    from accel.eval import runner

    prompts = runner.load_prompts(args.prompts, args.num_images, seed=args.seed)
    pipe = load_model(args.model, args.device)
    _apply_recipe(pipe, args)
    report = runner.evaluate(pipe, prompts, _settings(args), clip=args.clip,
                             out_dir=args.save_images, progress=not args.quiet)
    from accel.dist import state

    if state().is_main_process:
        report["prompts_file"] = str(args.prompts) if args.prompts else "miniature grammar (held-out stream)"
        report["model"] = args.model or "miniature"
        report["recipe"] = getattr(args, "recipe", None)
        runner.write_report(report, args.out)
        print(runner.table(report))
        print(f"report: {Path(args.out).resolve()}")


def _common(p, num_images_default=None):
    p.add_argument("--model", default="miniature", help="'miniature' (default) or a diffusers pipeline folder/id")
    p.add_argument("--recipe", help="acceleration recipe: a name in recipes/ (e.g. deepcache-i3) or a .toml file")
    p.add_argument("--calibration", help="calibration folder written by `accel calibrate`")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: miniature captions)")
    p.add_argument("--num-images", type=int, default=num_images_default, help="number of images")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 3.0 for the miniature, "
                   "its recommended scale; 7.5 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clip", default="miniature",
                   help="open_clip model for CLIP score: 'miniature', MODEL:PRETRAINED or local-dir:PATH")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Accelerate stock diffusers UNet pipelines: "
                                     "feature caching, int8, feature inheritance, long-skip scaling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images (and score them with CLIP)")
    _common(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); overrides --prompts")
    g.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="CLIP-score evaluation; runs under `accelerate launch` unchanged")
    _common(e, num_images_default=None)
    e.add_argument("--out", default="eval_report.json", help="JSON report path (default eval_report.json)")
    e.add_argument("--save-images", help="also save the images into this folder")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    from accel import bench, calibrate

    calibrate.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads(getattr(args, "threads", 1))
    try:
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:  # AccelError is a ValueError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"accel {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
