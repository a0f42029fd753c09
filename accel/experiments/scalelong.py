"""The ScaleLong training experiment on the miniature: ``python -m accel.experiments.scalelong``.

Trains the miniature UNet (+ its text encoder) from the same seed once per ScaleLong kind (``none``, ``cs``,
``ls``, ``sqrt2``), for several seeds, with equal steps and the shipped recipe otherwise
(``recipes/miniature/unet.toml``; tokenizer and VAE are the shipped ones, so a fresh checkout can rerun it).
Each run logs its loss, gradient norm and the mean L2 norm of every long skip per step, and saves EMA
snapshots; every snapshot generates images for held-out prompts, scored by the miniature CLIP (CLIP score
and the judged share of right shape + colour). The summary (``summary.json``: downsampled curves, loss spread,
quality per snapshot) is what ``notebooks/scalelong_stability.ipynb`` plots; ``docs/scalelong/summary.json``
is the committed copy of the run the README quotes.

Runs are resumable (each is a training run folder); a finished run is not repeated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from ..fileio import write_text_atomic
from ..miniature import train

KINDS = ("none", "cs", "ls", "sqrt2")
SKIPS = 12


def run_dir(out: Path, kind: str, seed: int) -> Path:
    return out / f"{kind}-seed{seed}"


def train_one(out: Path, kind: str, seed: int, steps: int, batch: int, snapshot_every: int, kappa: float):
    weights = train.REPO / "accel" / "miniature" / "weights" / "pipeline"
    d = run_dir(out, kind, seed)
    if (d / "done.json").exists():
        return d
    train.main(["unet", "--scalelong", kind, "--out", str(d), "--set", f"seed={seed}", "--set", f"steps={steps}",
                "--set", f"batch={batch}", "--set", f"snapshot_every={snapshot_every}", "--set", f"kappa={kappa}",
                "--set", "log_skip_norms=true", "--set", f"save_every={snapshot_every}",
                "--set", f"tokenizer='{weights / 'tokenizer'}'", "--set", f"vae='{weights / 'vae'}'"])
    return d


def quality(snapshot: Path, prompts: list[str], steps: int, guidance: float) -> dict:
    from transformers import CLIPTextModel

    from accel.eval.runner import GenerationSettings, evaluate
    from accel.miniature import load_pipeline
    from accel.transforms.scalelong import ScaleLong

    pipe = load_pipeline()
    unet, handle = ScaleLong.from_pretrained(snapshot / "unet")
    pipe.unet, pipe.text_encoder = unet, CLIPTextModel.from_pretrained(snapshot / "text_encoder")
    rep = evaluate(pipe, prompts, GenerationSettings(steps=steps, guidance=guidance, seed=0, batch_size=8), progress=False)
    handle.remove()
    return {"clip_score": rep["clip_score"], "clip_score_sem": rep["clip_score_sem"],
            "judged_correct": rep["judged_correct"]}


def _downsample(values: list[float], every: int) -> list[float]:
    return [statistics.fmean(values[i:i + every]) for i in range(0, len(values), every)]


def summarise_run(d: Path, prompts: list[str], sample_steps: int, guidance: float, window: int) -> dict:
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in log]
    grad = [r["grad_norm"] for r in log]
    skips = {i: [r[f"skip_{i}"] for r in log] for i in range(1, SKIPS + 1)}
    snaps = sorted((d / "snapshots").iterdir(), key=lambda p: int(p.name))
    qual_file = d / "quality.json"
    qual = json.loads(qual_file.read_text()) if qual_file.exists() else {}
    for s in snaps:
        if s.name not in qual:
            qual[s.name] = quality(s, prompts, sample_steps, guidance)
            qual_file.write_text(json.dumps(qual, indent=1))
    # the loss's spread around its own moving average: the instability the paper speaks of
    smooth = _downsample(loss, window)
    resid = [loss[i] - smooth[i // window] for i in range(len(loss))]
    half = len(loss) // 2
    return {
        "steps": len(log), "window": window,
        "loss": smooth, "grad_norm": _downsample(grad, window),
        "grad_norm_max": max(grad), "grad_norm_mean_2nd_half": statistics.fmean(grad[half:]),
        "loss_mean_last_window": statistics.fmean(loss[-window:]),
        "loss_spread_2nd_half": statistics.pstdev(resid[half:]),
        "skip_norms": {str(i): _downsample(v, window) for i, v in skips.items()},
        "skip_norm_final": {str(i): statistics.fmean(v[-window:]) for i, v in skips.items()},
        "quality": {k: qual[k] for k in sorted(qual, key=int)},
    }


def aggregate(runs: dict) -> dict:
    """Per kind: mean and spread over seeds of the headline figures."""
    out = {}
    for kind in sorted({r["kind"] for r in runs.values()}):
        rs = [r for r in runs.values() if r["kind"] == kind]
        last = str(max(int(k) for k in rs[0]["quality"]))

        def ms(vals):
            return {"mean": statistics.fmean(vals), "sd": statistics.pstdev(vals) if len(vals) > 1 else 0.0}
        out[kind] = {
            "seeds": len(rs),
            "loss_last_window": ms([r["loss_mean_last_window"] for r in rs]),
            "loss_spread_2nd_half": ms([r["loss_spread_2nd_half"] for r in rs]),
            "grad_norm_max": ms([r["grad_norm_max"] for r in rs]),
            "grad_norm_mean_2nd_half": ms([r["grad_norm_mean_2nd_half"] for r in rs]),
            f"clip_score_at_{last}": ms([r["quality"][last]["clip_score"] for r in rs]),
            f"judged_correct_at_{last}": ms([r["quality"][last]["judged_correct"] for r in rs]),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m accel.experiments.scalelong", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--kappa", type=float, default=0.8)
    p.add_argument("--snapshot-every", type=int, default=200)
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts generated per snapshot")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="guidance of the snapshot samples (default 7.5)")
    p.add_argument("--window", type=int, default=20, help="steps per point of the downsampled curves")
    p.add_argument("--out", type=Path, default=train.RUNS.parent / "scalelong")
    p.add_argument("--summary", type=Path, help="where to write summary.json (default OUT/summary.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from accel import miniature

    prompts = miniature.prompts(a.prompts, seed=7)
    runs = {}
    for seed in a.seeds:
        for kind in a.kinds:
            d = train_one(a.out, kind, seed, a.steps, a.batch, a.snapshot_every, a.kappa)
            runs[d.name] = {"kind": kind, "seed": seed} | summarise_run(d, prompts, a.sample_steps, a.guidance, a.window)
    summary = {"command": "python -m accel.experiments.scalelong " + " ".join(argv),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "aggregate": aggregate(runs), "runs": runs}
    path = write_text_atomic(a.summary or a.out / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    for kind, agg in summary["aggregate"].items():
        print(kind, json.dumps({k: (round(v["mean"], 4), round(v["sd"], 4)) if isinstance(v, dict) else v
                                for k, v in agg.items()}))
    print(f"summary -> {path}")


if __name__ == "__main__":
    main()
