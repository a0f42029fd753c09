"""The miniature's quality figures, measured: ``python -m accel.experiments.miniature_quality``.

1. The deterministic pixel checker (:mod:`accel.miniature.check`, no CLIP) on held-out dataset images, on their
   VAE round trips (a VAE that shifts red towards orange fails here before any UNet is involved) and on images
   the pipeline generates.
2. The miniature CLIP, zero-shot among the grammar's options, picks the right shape and the right colour of
   held-out dataset images (target >= 95%) and of an independently rendered set (free positions and sizes,
   :func:`world.free_sample`; target >= 90%).
3. Images the pipeline generates at its default steps (50 PNDM) and the miniature's recommended guidance
   (``miniature.GUIDANCE``) and at diffusers' default 7.5, judged by the pixel checker and by that CLIP.

``--weights DIR`` measures a freshly trained miniature (``python -m accel.miniature.train export``) instead of
the shipped one. These functions live here, not beside the checker, because they measure with ``accel.eval``
(above the miniature in the layers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from accel.miniature import world
from accel.miniature.check import check, describe


def _pipe(weights=None):
    from accel import miniature

    if weights is None:
        return miniature.load_pipeline()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(Path(weights) / "pipeline", dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_spec(weights=None) -> str:
    return "miniature" if weights is None else f"local-dir:{Path(weights).resolve() / 'clip'}"


def clip_zero_shot(n: int = 500, seed: int = 0, weights=None, free: bool = False) -> dict:
    """The miniature CLIP (or the one in ``weights``), zero-shot, on ``n`` held-out dataset images, or with
    ``free`` on the independently rendered ``"free"`` split (:func:`world.free_sample`: free positions and
    sizes, colour shades +- 20)."""
    from torchvision.transforms.functional import to_pil_image

    from accel.eval import CLIPScorer
    from accel.eval.judge import judge

    images, _, attrs = (world.free_sample(n, seed=seed) if free else world.sample(n, seed=seed, split="heldout"))
    v = judge(CLIPScorer(_clip_spec(weights)), [to_pil_image(x) for x in images], attrs)
    return {k: v[k] for k in ("shape_accuracy", "colour_accuracy", "all_accuracy")} | {
        "images": n, "set": "free" if free else "heldout"}


def generation(n: int = 100, seed: int = 0, guidance: float | None = None, steps: int = 50, weights=None) -> dict:
    from accel import miniature

    from accel.eval.runner import GenerationSettings, evaluate

    guidance = miniature.GUIDANCE if guidance is None else guidance

    prompts = miniature.prompts(n, seed=seed + 1)
    rep = evaluate(_pipe(weights), prompts, GenerationSettings(steps=steps, guidance=guidance, seed=seed,
                                                               batch_size=8),
                   clip=_clip_spec(weights), judge_attributes=True, progress=False)
    return {"judged_correct": rep["judged_correct"], "clip_score": rep["clip_score"], "prompts": n,
            "guidance": guidance, "steps": steps}


def _summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k.endswith("_accuracy")}


def pixel_generation(n: int = 64, seed: int = 0, guidance: float | None = None, steps: int = 50, pipe=None,
                     progress: bool = True, weights=None) -> dict:
    """The pixel checker's accuracy on ``n`` images the pipeline generates for held-out prompts
    (``miniature.prompts(n, seed)``, image ``i`` with seed ``seed + i`` as ``accel generate`` does; with
    ``seed=0`` the first 8 are ``make demo``'s)."""
    from accel import miniature
    from accel.eval.runner import GenerationSettings, generate

    guidance = miniature.GUIDANCE if guidance is None else guidance
    prompts = miniature.prompts(n, seed=seed)
    recs = generate(pipe or _pipe(weights), prompts,
                    GenerationSettings(steps=steps, guidance=guidance, seed=seed, batch_size=8), progress=progress)

    r = check([x["image"] for x in recs], [miniature.parse_caption(p) for p in prompts])
    return _summary(r) | {"prompts": n, "guidance": guidance, "steps": steps,
                          "wrong": {p: describe(v) for p, v in zip(prompts, r["per_image"]) if not v["all"]}}


@torch.no_grad()
def vae_roundtrip(n: int = 200, seed: int = 0, pipe=None, weights=None) -> dict:
    """The pixel checker's accuracy on held-out dataset images encoded and decoded by the pipeline's VAE
    (latent means), and the mean RGB shift of the shape's colour it reads (0..255 units)."""
    from accel import miniature
    from accel.eval.runner import decode

    pipe = pipe or _pipe(weights)
    images, _, attrs = miniature.sample(n, seed=seed, split="heldout")
    vae = pipe.vae
    recs = []
    for i in range(0, n, 32):
        lat = vae.encode(images[i:i + 32] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        recs += decode(pipe, lat)
    r = check(recs, attrs)
    shift = [np.linalg.norm(np.array(v["reading"]["rgb"]) - np.array(world.COLOURS[a.colour]))
             for v, a in zip(r["per_image"], attrs) if v["reading"]["rgb"] is not None]
    return _summary(r) | {"images": n, "mean_colour_shift": float(np.mean(shift))}


def _pct(r: dict) -> str:
    return ", ".join(f"{k[:-9]} {100 * v:.1f}%" for k, v in r.items() if k.endswith("_accuracy"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m accel.experiments.miniature_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="held-out dataset images for the CLIP figure")
    p.add_argument("--prompts", type=int, default=100, help="generated images for the CLIP-judged figure")
    p.add_argument("--pixel-prompts", type=int, default=64, help="generated images for the pixel-checker figure")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5],
                   help="guidance scales to measure the generation figures at (default: 3.0 and diffusers' "
                        "default 7.5)")
    p.add_argument("--weights", type=Path, help="a folder as `python -m accel.miniature.train export` writes "
                   "(pipeline/ and clip/) to measure instead of the shipped weights")
    p.add_argument("--free-images", type=int, default=500,
                   help="independently rendered images (free positions and sizes) for the CLIP's second figure")
    p.add_argument("--pixel-only", action="store_true",
                   help="only the pixel checker's figures (dataset, VAE round trip, generations); no CLIP")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {}
    images, _, attrs = world.sample(a.images, seed=0, split="heldout")
    d = _summary(check(images, attrs))
    result["pixel_dataset"] = d | {"images": a.images}
    print(f"pixel checker on {a.images} held-out dataset images: {_pct(d)}")
    v = vae_roundtrip(min(a.images, 200), weights=a.weights)
    result["pixel_vae_roundtrip"] = v
    print(f"pixel checker on {v['images']} VAE round trips: {_pct(v)}; colour shift {v['mean_colour_shift']:.1f}")
    result["pixel_generation"] = []
    for guidance in a.guidance:
        g = pixel_generation(a.pixel_prompts, guidance=guidance, weights=a.weights, progress=False)
        result["pixel_generation"].append(g)
        print(f"pixel checker on {g['prompts']} generated images (50 steps, guidance {guidance}): {_pct(g)}")
    if not a.pixel_only:
        z = clip_zero_shot(a.images, weights=a.weights)
        f = clip_zero_shot(a.free_images, weights=a.weights, free=True)
        result["clip_zero_shot"], result["clip_zero_shot_free"] = z, f
        for r, what, target in ((z, "held-out dataset", 95), (f, "independently rendered (free positions, sizes)", 90)):
            print(f"miniature CLIP zero-shot on {r['images']} {what} images: shape {100 * r['shape_accuracy']:.1f}%, "
                  f"colour {100 * r['colour_accuracy']:.1f}%, both {100 * r['all_accuracy']:.1f}% (target >= {target}%)")
        result["generation"] = []
        for guidance in a.guidance:
            g = generation(a.prompts, guidance=guidance, weights=a.weights)
            result["generation"].append(g)
            print(f"generated images (50 steps, guidance {g['guidance']}) CLIP-judged to show the prompted shape "
                  f"and colour: {100 * g['judged_correct']:.1f}% of {g['prompts']}; CLIP score {g['clip_score']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
