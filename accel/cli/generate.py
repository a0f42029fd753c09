"""``accel generate``: images (and their CLIP scores) from prompts, into a folder written whole or not at all."""
from __future__ import annotations

from pathlib import Path

from . import common


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
    settings, scorer, pipe, handle = common.prepared_pipeline(args)
    from accel.dist import state

    main = state().is_main_process
    with new_folder(out, runner.is_image_folder, "a folder written by accel generate", common._shared_token(),
                    commit=main) as tmp:
        report = runner.evaluate(pipe, prompts, settings, clip=scorer, out_dir=tmp)
        for im in report["images"]:
            im["path"] = str(Path(args.out) / Path(im["path"]).name)
        common._describe(args, report, pipe, handle)
        if main:
            runner.write_report(report, tmp / runner.REPORT)
    if main:
        for im in report["images"]:
            line = f"{im['path']}  clip={im['clip_score']:.2f}"
            if "judged_correct" in im:
                line += "  shape+colour " + ("right" if im["judged_correct"] else "wrong")
            if "checker" in im:
                line += f"  checker: {im['checker']}"
            print(f"{line}  {im['prompt']!r}")
        print(runner.table(report))
        print(f"images and report.json in {out}")


def add_parser(sub):
    g = sub.add_parser("generate", help="generate images (and score them with CLIP)")
    common._generation_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); overrides --prompts")
    g.add_argument("--out", default="outputs", help="output folder (default outputs/): a new folder, an empty one, "
                   "or one accel generate wrote (replaced; anything else is refused)")
    g.set_defaults(func=cmd_generate)
