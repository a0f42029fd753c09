"""The miniature world: the embedded default text-to-image model, its dataset and its "CLIP".

>>> from accel import miniature
>>> pipe = miniature.load_pipeline()                 # a trained diffusers StableDiffusionPipeline
>>> image = pipe("a large red circle on the left, black background").images[0]
>>> model, preprocess, tokenizer = miniature.load_clip()   # open_clip, trained on the same world
>>> images, captions, attributes = miniature.sample(8, seed=0, split="heldout")

Weights ship as fp16 safetensors inside the package (``accel/miniature/weights``), written by
``python -m accel.miniature.train export`` and loaded with the stock ``from_pretrained`` /
``open_clip.create_model_and_transforms("local-dir:...")`` code paths that load real models.
"""
from __future__ import annotations

from pathlib import Path

from .world import (ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Attributes, caption,
                    parse_caption, prompts, render, sample, stream)

WEIGHTS = Path(__file__).parent / "weights"
PIPELINE_DIR = WEIGHTS / "pipeline"
CLIP_DIR = WEIGHTS / "clip"
CLIP_NAME = f"local-dir:{CLIP_DIR}"
# The miniature's recommended classifier-free guidance scale (as model cards recommend one). Its small UNet
# over-saturates colours at diffusers' default 7.5 (red drifts to orange): `python -m accel.experiments.miniature_quality`
# reports both. accel's CLI, benchmarks and notebooks use this value for the miniature.
GUIDANCE = 3.0

__all__ = ["load_pipeline", "load_clip", "caption", "parse_caption", "sample", "stream", "render", "prompts",
           "Attributes", "ATTRIBUTES", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "BACKGROUNDS",
           "PIPELINE_DIR", "CLIP_DIR", "CLIP_NAME", "GUIDANCE"]


def _check(path: Path):
    if not path.exists():
        raise FileNotFoundError(
            f"the miniature weights are missing at {path}; reinstall accel-diffusion or rebuild them with "
            "the recipes (python -m accel.miniature.train ...; see README)")


def load_pipeline(torch_dtype=None, device: str | None = None, **kwargs):
    """The trained miniature ``StableDiffusionPipeline`` (64x64 images, 8x8x4 latents, PNDM, 50 steps).

    Weights are stored in fp16 and loaded as float32 by default (CPU). Extra keyword arguments go to
    ``StableDiffusionPipeline.from_pretrained``.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    _check(PIPELINE_DIR)
    pipe = StableDiffusionPipeline.from_pretrained(
        PIPELINE_DIR, dtype=torch_dtype or torch.float32, safety_checker=None,
        requires_safety_checker=False, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


def load_clip(device: str = "cpu"):
    """The miniature's open_clip model: ``(model, preprocess, tokenizer)`` as open_clip returns them
    (``preprocess`` is the evaluation transform)."""
    import open_clip

    _check(CLIP_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_NAME, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(CLIP_NAME)
