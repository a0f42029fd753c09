"""The pipelines the benchmarks measure: real diffusers pipelines of the SD 1.5 and SDXL UNet architectures with
random weights (no download: per-step costs, FLOPs and layer shapes depend on the architecture, not on the values),
and tiny UNets of the same block structure for the GPU bench's dry run on CPU.

One module for both benches, below them: the CPU report (``accel bench``) builds the SD 1.5 architecture on CPU in
float32, the GPU bench (:mod:`accel.bench.gpu`) builds the same code on the GPU in fp16, so the two measure the same
model.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# the same block structure, a few channels: what --dry-run builds
TINY_SD = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
TINY_SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=40, norm_num_groups=4)


@dataclass
class Model:
    name: str
    kind: str  # "sd" | "sdxl"
    unet: dict
    text_dims: tuple  # hidden sizes of the text encoder(s)
    pixels: int  # image side


def build_pipeline(model: Model, device: str, dtype: torch.dtype, seed: int = 0, channels_last: bool = True):
    """A real diffusers pipeline of ``model``'s UNet architecture with random weights, one-layer text encoders
    of the real widths, a tiny VAE (unused: latents out) and the model's usual scheduler; the UNet in
    channels-last memory format unless ``channels_last=False``."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..miniature.models import SCHEDULER_CONFIG, build_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(d)
    torch.manual_seed(seed)

    def text(hidden, proj=False):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                             num_attention_heads=max(1, hidden // 64), max_position_embeddings=tok.model_max_length,
                             projection_dim=hidden, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()

    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet = diffusers.UNet2DConditionModel(**model.unet).eval()
    if model.kind == "sd":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text(model.text_dims[0]), tokenizer=tok, unet=unet,
            scheduler=diffusers.PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    else:
        sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text(model.text_dims[0]), text_encoder_2=text(model.text_dims[1], proj=True),
            tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    if (torch.device(device), dtype) != (torch.device("cpu"), torch.float32):  # as built (and no cast warning)
        pipe.to(device, dtype)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    return pipe


def sd15_architecture_pipeline(seed: int = 0):
    """A real ``StableDiffusionPipeline`` with SD 1.5's UNet (random weights, 860M parameters), a one-layer
    768-wide CLIP text encoder, a tiny VAE (unused with ``output_type="latent"``) and SD's PNDM scheduler, on the
    CPU in float32 (the GPU bench builds the same pipeline on the GPU with :func:`build_pipeline`)."""
    model = Model("SD 1.5 architecture", "sd", SD15_UNET, (768,), 512)
    return build_pipeline(model, "cpu", torch.float32, seed, channels_last=False)


def unet_inputs(model: Model, pipe, batch: int = 2):
    """One UNet call's arguments at the model's resolution (batch 2: CFG's two halves)."""
    unet = pipe.unet
    dev, dt = unet.device, unet.dtype
    lat = model.pixels // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 4, lat, lat, generator=g).to(dev, dt)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(dev, dt)
    kw = dict(encoder_hidden_states=ctx)
    if model.kind == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, model.text_dims[1], generator=g).to(dev, dt),
                                   "time_ids": torch.tensor([[model.pixels, model.pixels, 0, 0, model.pixels,
                                                              model.pixels]] * batch, dtype=dt, device=dev)}
    return (x, torch.tensor(500, device=dev)), kw
