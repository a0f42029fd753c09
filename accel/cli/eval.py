"""``accel eval``: a CLIP-score report of a (possibly accelerated) model; runs under ``accelerate launch`` unchanged,
each process generating and scoring its share."""
from __future__ import annotations

import contextlib
from pathlib import Path

from . import common


def cmd_eval(args):
    from accel.eval import runner
    from accel.fileio import check_destination, new_folder

    out = check_destination(args.out, runner.is_report, "an accel eval report", folder=False, flag="--out")
    images = None
    if args.save_images:
        images = check_destination(args.save_images, runner.is_image_folder, "a folder written by accel",
                                   folder=True, flag="--save-images")
    prompts = runner.load_prompts(args.prompts, args.num_images, seed=args.seed)
    settings, scorer, pipe, handle = common.prepared_pipeline(args)
    from accel.dist import state

    main = state().is_main_process
    folder = new_folder(images, runner.is_image_folder, "a folder written by accel", common._shared_token(),
                        commit=main) if images else contextlib.nullcontext()
    with folder as tmp:
        report = runner.evaluate(pipe, prompts, settings, clip=scorer, out_dir=tmp, progress=not args.quiet)
        report["prompts_file"] = str(args.prompts) if args.prompts else "miniature grammar (held-out stream)"
        common._describe(args, report, pipe, handle)
        if tmp is not None:
            for im in report["images"]:
                im["path"] = str(Path(args.save_images) / Path(im["path"]).name)
            if main:
                runner.write_report(report, tmp / runner.REPORT)
    if main:
        runner.write_report(report, out)
        print(runner.table(report))
        print(f"report: {out}")


def add_parser(sub):
    e = sub.add_parser("eval", help="CLIP-score evaluation; runs under `accelerate launch` unchanged")
    common._generation_args(e, num_images_default=None)
    e.add_argument("--out", default="eval_report.json", help="JSON report path (default eval_report.json; an "
                   "existing file is replaced only if it is an accel report)")
    e.add_argument("--save-images", help="also save the images (and the report) into this folder")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
