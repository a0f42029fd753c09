"""The miniature's two quality figures, measured: ``python -m accel.experiments.miniature_quality``.

1. The miniature CLIP, zero-shot among the grammar's options, picks the right shape and the right colour of
   held-out dataset images (target >= 95%).
2. Images the pipeline generates at its default steps (50 PNDM) and the miniature's recommended guidance
   (``miniature.GUIDANCE`` = 3.0) are judged by that CLIP to show the prompted shape and colour (target >= 80%);
   the same at diffusers' default guidance 7.5, which over-saturates this small model's colours, for reference.
"""
from __future__ import annotations

import argparse
import json

import torch


def clip_zero_shot(n: int = 500, seed: int = 0) -> dict:
    from torchvision.transforms.functional import to_pil_image

    from accel import miniature
    from accel.eval import CLIPScorer
    from accel.eval.judge import judge

    images, _, attrs = miniature.sample(n, seed=seed, split="heldout")
    v = judge(CLIPScorer("miniature"), [to_pil_image(x) for x in images], attrs)
    return {k: v[k] for k in ("shape_accuracy", "colour_accuracy", "all_accuracy")} | {"images": n}


def generation(n: int = 100, seed: int = 0, guidance: float | None = None, steps: int = 50) -> dict:
    from accel import miniature

    from accel.eval.runner import GenerationSettings, evaluate

    guidance = miniature.GUIDANCE if guidance is None else guidance

    prompts = miniature.prompts(n, seed=seed + 1)
    rep = evaluate(miniature.load_pipeline(), prompts, GenerationSettings(steps=steps, guidance=guidance, seed=seed,
                                                                          batch_size=8), progress=False)
    return {"judged_correct": rep["judged_correct"], "clip_score": rep["clip_score"], "prompts": n,
            "guidance": guidance, "steps": steps}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m accel.experiments.miniature_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="held-out dataset images for the CLIP figure")
    p.add_argument("--prompts", type=int, default=100, help="generated images for the pipeline figure")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5],
                   help="guidance scales to measure the generation figure at (default: 3.0, the miniature's "
                        "recommended scale, and diffusers' default 7.5)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    z = clip_zero_shot(a.images)
    print(f"miniature CLIP zero-shot on {z['images']} held-out images: shape {100 * z['shape_accuracy']:.1f}%, "
          f"colour {100 * z['colour_accuracy']:.1f}%, both {100 * z['all_accuracy']:.1f}% (target >= 95%)")
    gens = []
    for guidance in a.guidance:
        g = generation(a.prompts, guidance=guidance)
        gens.append(g)
        print(f"generated images (50 steps, guidance {g['guidance']}) showing the prompted shape and colour: "
              f"{100 * g['judged_correct']:.1f}% of {g['prompts']} (target >= 80%); CLIP score {g['clip_score']:.2f}")
    print(json.dumps({"clip_zero_shot": z, "generation": gens}))


if __name__ == "__main__":
    main()
