"""Architectures of the miniature world, built from stock diffusers / transformers / open_clip classes.

The shapes follow Stable Diffusion 1.x where it matters to the accelerations: an ``AutoencoderKL`` with
8x downsampling, a ``UNet2DConditionModel`` with 3 ``CrossAttnDownBlock2D`` + ``DownBlock2D`` (mirrored
up) and ``layers_per_block=2`` (so the 12 long skips of SD), a ``CLIPTextModel`` conditioning it through
cross-attention, and SD's PNDM scheduler. Only widths are small.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import world

RESOLUTION = world.DEFAULT_SIZE  # pixels
LATENT = RESOLUTION // 8
TEXT_LENGTH = 16  # tokens incl. start/end; the longest caption has 12
CLIP_NAME = "accel-miniature-clip"

# the scheduler Stable Diffusion v1 ships with (scheduler/scheduler_config.json of SD 1.4/1.5)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
    )


def unet_config() -> dict:
    return dict(
        sample_size=LATENT, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,
    )


def text_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, projection_dim=128,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )


def clip_config(tokenizer_dir: str | os.PathLike) -> dict:
    """open_clip model config (registered under :data:`CLIP_NAME`); its text tower uses our grammar
    tokenizer (a local Hugging Face tokenizer folder), so the embedding table stays tiny."""
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": RESOLUTION, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": TEXT_LENGTH, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 3,
                     "hf_tokenizer_name": str(tokenizer_dir)},
    }


def build_tokenizer(out_dir: str | os.PathLike):
    """Build a CLIP BPE tokenizer whose vocabulary is the grammar's words (each one token), plus every
    lowercase letter and digit so that any other text still tokenizes. Saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    words = world.all_words()
    bpe.train_from_iterator([" ".join(words)] * 4, trainer)
    raw = json.loads(bpe.to_str())["model"]
    vocab = dict(raw["vocab"])
    for ch in alphabet:  # CLIP's BPE needs both the inner and the word-final form of every character
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["merges"]]
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
                        model_max_length=TEXT_LENGTH, pad_token="<|endoftext|>")
    os.remove(out_dir / "vocab.json")
    os.remove(out_dir / "merges.txt")
    tok.save_pretrained(out_dir)
    for w in words:  # every grammar word must be a single token
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    return tok
