"""Generate images for a prompt list and score them, spread over processes with ``accelerate``.

Work is cut into fixed batches of the *global* prompt list (image ``i`` always uses seed ``seed + i`` and
always sits in batch ``i // batch_size``), and process ``p`` of ``n`` takes batches ``p, p+n, ...``; results
are gathered on every process. So one process and ``accelerate launch --num_processes N`` produce the
same images and the same scores for the same seeds.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from accel.errors import InputError


@dataclass
class GenerationSettings:
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    extra: dict = field(default_factory=dict)


def load_prompts(path: str | os.PathLike | None, num_images: int | None, seed: int = 0) -> list[str]:
    """Prompts from a text file (one per line, blanks and ``#`` comments skipped), or the miniature
    grammar's held-out captions when ``path`` is None; cycled/truncated to ``num_images``."""
    if num_images is not None and num_images < 1:
        raise InputError("--num-images must be >= 1")
    if path is None:
        from accel import miniature

        return miniature.prompts(16 if num_images is None else num_images, seed=seed)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    prompts = [l.strip() for l in p.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"no prompts in {p}")
    if num_images is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(num_images)]


def generate(pipe, prompts: list[str], settings: GenerationSettings, out_dir: str | os.PathLike | None = None,
             progress: bool = True) -> list[dict]:
    """Generate one image per prompt (image ``i`` with seed ``settings.seed + i``) on this process's share.

    Returns one record per image of this process: ``index, prompt, seed, image (PIL), latents``.
    """
    from accel.dist import state as dist_state

    state = dist_state()
    bs = settings.batch_size
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    mine = list(range(len(batches)))[state.process_index::state.num_processes]
    records = []
    for b in tqdm(mine, desc=f"generate[{state.process_index}]", disable=not progress):
        idx = batches[b]
        gens = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in idx]
        kw = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, generator=gens,
                  output_type="latent", **settings.extra)
        if settings.height:
            kw.update(height=settings.height, width=settings.width or settings.height)
        latents = pipe([prompts[i] for i in idx], **kw).images
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"non-finite latents for prompts {idx}: the pipeline produced NaN/inf")
        images = decode(pipe, latents)
        for j, i in enumerate(idx):
            rec = {"index": i, "batch": b, "prompt": prompts[i], "seed": settings.seed + i, "image": images[j],
                   "latents": latents[j].detach().float().cpu()}
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                path = Path(out_dir) / f"{i:05d}.png"
                images[j].save(path)
                rec["path"] = str(path)
            records.append(rec)
    return records


@torch.no_grad()
def decode(pipe, latents: torch.Tensor):
    """Latents -> PIL images with the pipeline's own VAE and image processor."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(x, output_type="pil")


def gather(records: list[dict]) -> list[dict]:
    """All processes' records, sorted by index (every process gets the full list)."""
    from accel.dist import gather as gather_all

    return sorted(gather_all(records), key=lambda r: r["index"])


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    m = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, sem


def evaluate(pipe, prompts: list[str], settings: GenerationSettings, clip="miniature",
             out_dir=None, judge_attributes: bool | None = None, progress: bool = True) -> dict:
    """Generate, score with CLIP (each process scores its own images), gather; the report as a dict.
    ``clip``: a :class:`CLIPScorer` or its spec (loaded before the first image, so a bad one fails first)."""
    from accel.eval.clip_score import CLIPScorer, resolve_clip

    scorer = clip if isinstance(clip, CLIPScorer) else CLIPScorer(clip)
    if judge_attributes is None:
        judge_attributes = scorer.spec.label == resolve_clip("miniature").label
    records = generate(pipe, prompts, settings, out_dir, progress)
    from accel.miniature import parse_caption

    try:  # miniature-world prompts: judged by its CLIP (judge_attributes) and by the pixel checker
        attrs = {r["index"]: parse_caption(r["prompt"]) for r in records}
    except ValueError:
        attrs = None
    # score in the generation batches: their composition does not depend on the number of processes,
    # so neither do the (batched, floating-point) CLIP embeddings
    for b in sorted({r["batch"] for r in records}):
        group = [r for r in records if r["batch"] == b]
        images = [r["image"] for r in group]
        for r, s in zip(group, scorer.score(images, [r["prompt"] for r in group]).tolist()):
            r["clip_score"] = s
        if attrs is not None and judge_attributes:
            from accel.eval.judge import judge

            verdict = judge(scorer, images, [attrs[r["index"]] for r in group])
            for r, ok in zip(group, verdict["per_image"]):
                r["judged_correct"] = ok
    if attrs is not None:  # the deterministic pixel checker (no CLIP): every attribute of the prompt
        from accel.miniature import check

        for r in records:
            v = check.verdict(r["image"], attrs[r["index"]])
            r["checker_right"], r["checker"] = v["all"], check.describe(v)
    records = gather([{k: v for k, v in r.items() if k != "image"} for r in records])
    mean, sem = mean_and_sem([r["clip_score"] for r in records])
    report = {
        "clip_model": scorer.spec.label, "num_images": len(records), "num_unique_prompts": len(set(prompts)),
        "seed": settings.seed, "steps": settings.steps, "guidance": settings.guidance,
        "clip_score": mean, "clip_score_sem": sem,
        "images": [{k: v for k, v in r.items() if k != "latents"} for r in records],
    }
    if records and "judged_correct" in records[0]:
        report["judged_correct"] = sum(r["judged_correct"] for r in records) / len(records)
    if records and "checker_right" in records[0]:
        report["checker_right"] = sum(r["checker_right"] for r in records) / len(records)
    report["_latents"] = torch.stack([r["latents"] for r in records]) if records else None
    return report


REPORT = "report.json"
_IMAGE_NAME = re.compile(r"\d{5}\.png")


def is_report(path: str | os.PathLike) -> bool:
    """A JSON report this runner wrote (what ``accel eval --out`` may replace)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"clip_model", "images", "clip_score"} <= data.keys()


def is_image_folder(path: str | os.PathLike) -> bool:
    """A folder of images and ``report.json`` as ``accel generate`` writes it, and nothing else (what a new
    run may replace)."""
    p = Path(path)
    try:
        names = [q.name for q in p.iterdir()]
    except OSError:
        return False
    return REPORT in names and all(n == REPORT or _IMAGE_NAME.fullmatch(n) for n in names) and is_report(p / REPORT)


def write_report(report: dict, path: str | os.PathLike):
    """Write the JSON report atomically (latents are not part of it)."""
    from accel.fileio import write_text_atomic

    write_text_atomic(path, json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=1))


def table(report: dict) -> str:
    rows = [("CLIP model", report["clip_model"]), ("images", report["num_images"]),
            ("seed / steps / cfg", f"{report['seed']} / {report['steps']} / {report['guidance']}"),
            ("CLIP score", f"{report['clip_score']:.3f} ± {report['clip_score_sem']:.3f} (sem)")]
    if "judged_correct" in report:
        rows.append(("shape+colour right", f"{100 * report['judged_correct']:.1f}%"))
    if "checker_right" in report:
        rows.append(("pixel checker right", f"{100 * report['checker_right']:.1f}% (shape, colour, size, position, "
                                            "background)"))
    if report.get("unet_calls"):
        c = report["unet_calls"]
        rows.append(("UNet calls", f"{c['full']} full + {c['cached']} cached in {c['pipeline_calls']} pipeline calls "
                                   f"({c['full_per_pipeline_call']:.2f} full per pipeline call)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
