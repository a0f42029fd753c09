"""Tiny real diffusers pipelines built offline (random weights), shared by the tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout's root on sys.path, where our kernels/ folder would be found as a top-level
# `kernels` package: transformers' check for the hub's `kernels` package then imports it a second time, and that
# copy's custom-op registrations replace accel.kernels'. accel is installed (editable): the root is not needed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton kernels run in the interpreter

import pytest
import torch

torch.set_num_threads(1)

SCHEDULERS = ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
              "HeunDiscreteScheduler"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from accel.miniature.models import build_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


def _tok(tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def _text(tok, hidden=16, proj=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         projection_dim=proj or hidden, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()


def tiny_unet(in_channels=4, cross=16, **kw):
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, in_channels=in_channels, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               block_out_channels=(8, 16, 16, 16), layers_per_block=2, cross_attention_dim=cross,
               attention_head_dim=2, norm_num_groups=4)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64).eval()


def make_scheduler(name="PNDMScheduler"):
    import diffusers

    from accel.miniature.models import SCHEDULER_CONFIG

    cls = getattr(diffusers, name)
    return cls.from_config(dict(SCHEDULER_CONFIG, _class_name="PNDMScheduler"))


def sd_components(tokenizer_dir, seed=0, in_channels=4, scheduler="PNDMScheduler"):
    torch.manual_seed(seed)
    tok = _tok(tokenizer_dir)
    return dict(vae=tiny_vae(), text_encoder=_text(tok), tokenizer=tok, unet=tiny_unet(in_channels),
                scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def make_pipe(kind, tokenizer_dir, seed=0, scheduler="PNDMScheduler"):
    """A tiny pipeline of ``kind``: sd | img2img | inpaint | controlnet | sdxl."""
    import diffusers

    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline(**sd_components(tokenizer_dir, seed, scheduler=scheduler))
    elif kind == "img2img":
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd_components(tokenizer_dir, seed, scheduler=scheduler))
    elif kind == "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline(**sd_components(tokenizer_dir, seed, in_channels=9,
                                                                         scheduler=scheduler))
    elif kind == "controlnet":
        comps = sd_components(tokenizer_dir, seed, scheduler=scheduler)
        cn = diffusers.ControlNetModel.from_unet(comps["unet"], conditioning_embedding_out_channels=(4, 8, 8, 8)).eval()
        pipe = diffusers.StableDiffusionControlNetPipeline(controlnet=cn, **comps)
    elif kind == "sdxl":
        torch.manual_seed(seed)
        tok = _tok(tokenizer_dir)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40,
            cross_attention_dim=32, norm_num_groups=4).eval()
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=_text(tok), text_encoder_2=_text(tok, 16, proj=16), tokenizer=tok,
            tokenizer_2=tok, unet=unet, scheduler=make_scheduler(scheduler), force_zeros_for_empty_prompt=False)
    else:
        raise ValueError(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_inputs(kind, steps=10, seed=0, batch=1, guidance=7.5):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    kw = dict(prompt=["a red circle"] * batch, num_inference_steps=steps, guidance_scale=guidance,
              generator=torch.Generator().manual_seed(seed), output_type="latent")
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    if kind == "img2img":
        kw.update(image=img, strength=0.6)
    elif kind == "inpaint":
        mask = Image.fromarray((np.arange(64)[None, :].repeat(64, 0) > 32).astype(np.uint8) * 255)
        kw.update(image=img, mask_image=mask, strength=1.0, height=64, width=64)
    elif kind == "controlnet":
        kw.update(image=img, height=64, width=64)
    elif kind == "sdxl":
        kw.update(height=64, width=64)
    else:
        kw.update(height=64, width=64)
    return kw


class CallCounter:
    """Counts forward calls of a module with a plain torch forward-pre hook (test instrumentation only)."""

    def __init__(self, module):
        self.n = 0
        self._h = module.register_forward_pre_hook(self._inc)

    def _inc(self, *_):
        self.n += 1

    def close(self):
        self._h.remove()
