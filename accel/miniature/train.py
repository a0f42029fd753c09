"""Training recipes of the miniature world: ``python -m accel.miniature.train {tokenizer,vae,clip,unet,export}``.

Each stage reads its hyper-parameters from a TOML file in ``recipes/miniature/`` (command-line flags
override), logs its seeds and losses to ``OUT/run.json`` and ``OUT/log.jsonl``, checkpoints atomically
every ``save_every`` steps and resumes from the last checkpoint when run again with the same ``OUT``.
The data of step ``s`` is ``world.sample(batch, seed=seed * 1_000_003 + s)``, so a resumed run sees
exactly the data an uninterrupted one would. Run on one CPU thread (``--threads``).

    python -m accel.miniature.train tokenizer --out runs/miniature/tokenizer
    python -m accel.miniature.train vae  --out runs/miniature/vae
    python -m accel.miniature.train vae_decoder   # decoder-only fine-tune (latent space unchanged)
    python -m accel.miniature.train clip --out runs/miniature/clip
    python -m accel.miniature.train unet --out runs/miniature/unet
    python -m accel.miniature.train export   # -> accel/miniature/weights/
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import models, world

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "miniature"
RUNS = REPO / "runs" / "miniature"


# ----------------------------------------------------------------------------------------- plumbing
def _atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_models(folder: Path, **models_):
    """``save_pretrained`` each model into ``folder/NAME``, written beside and renamed into place."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, m in models_.items():
        m.save_pretrained(tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _batch(cfg, step: int):
    images, captions, _ = world.sample(cfg["batch"], seed=cfg["seed"] * 1_000_003 + step)
    return images, captions


def _seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Run:
    """Checkpoint/resume + logging shared by every stage."""

    def __init__(self, out: Path, cfg: dict, stage: str):
        self.out, self.cfg, self.stage = out, cfg, stage
        out.mkdir(parents=True, exist_ok=True)
        self.ckpt = out / "checkpoint.pt"
        (out / "run.json").write_text(json.dumps({"stage": stage, "config": cfg,
                                                  "torch": torch.__version__}, indent=1))

    def resume(self, state: dict) -> int:
        if not self.ckpt.exists():
            _seed_all(self.cfg["seed"])
            return 0
        ck = torch.load(self.ckpt, weights_only=True)
        for k, obj in state.items():
            obj.load_state_dict(ck[k])
        torch.set_rng_state(ck["torch_rng"])
        print(f"[{self.stage}] resumed at step {ck['step']}", file=sys.stderr)
        return ck["step"]

    def save(self, state: dict, step: int):
        ck = {k: obj.state_dict() for k, obj in state.items()}
        ck["step"], ck["torch_rng"] = step, torch.get_rng_state()
        _atomic_save(ck, self.ckpt)

    def loop(self, state: dict, step_fn):
        start = self.resume(state)
        steps, t0 = self.cfg["steps"], time.time()
        with open(self.out / "log.jsonl", "a") as log, tqdm(total=steps, initial=start, desc=self.stage) as bar:
            for step in range(start, steps):
                metrics = step_fn(step)
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise FloatingPointError(f"[{self.stage}] non-finite loss at step {step}: {metrics}")
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                bar.set_postfix({k: f"{v:.4f}" for k, v in list(metrics.items())[:2]})
                bar.update(1)
                if (step + 1) % self.cfg["save_every"] == 0 or step + 1 == steps:
                    self.save(state, step + 1)
                    log.flush()
        (self.out / "done.json").write_text(json.dumps({"steps": steps, "seconds_this_run": time.time() - t0}))


def _lr_lambda(cfg):
    """Linear warm-up, then cosine decay to 10% at ``steps``. With ``first_cycle = N`` the steps before N
    follow a cosine that ends at N and the rest the cosine over ``steps``: exactly what a run trained to N
    and then resumed with a larger ``steps`` did (a warm restart), so such a run reproduces from scratch."""
    warm, steps, first = cfg.get("warmup", 100), cfg["steps"], cfg.get("first_cycle", 0)

    def cosine(s, end):
        return 0.5 * (1 + math.cos(math.pi * min(s, end) / end)) * 0.9 + 0.1

    return lambda s: min(1.0, (s + 1) / warm) * cosine(s, first if s < first else steps)


class EMA:
    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


# ------------------------------------------------------------------------------------------- stages
def train_tokenizer(cfg, out: Path):
    models.build_tokenizer(out)
    print(f"tokenizer -> {out}")


def train_vae(cfg, out: Path):
    from diffusers import AutoencoderKL

    _seed_all(cfg["seed"])
    vae = AutoencoderKL(**models.vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    run = _Run(out, cfg, "vae")

    def step_fn(step):
        x = _batch(cfg, step)[0] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + l1 + cfg["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "mse": mse.item(), "kl": kl.item()}

    run.loop({"vae": vae, "opt": opt, "sched": sched}, step_fn)
    # SD's latent scaling factor: 1 / std of the latents (0.18215 for SD's VAE)
    with torch.no_grad():
        x = world.sample(256, seed=10_000_019)[0] * 2 - 1
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "final")
    print(f"vae -> {out / 'final'} (scaling_factor {1 / std:.4f})")


def train_vae_decoder(cfg, out: Path):
    """Fine-tune only the VAE decoder (as SD's ft-MSE VAE did): the encoder, hence the latent space the
    UNet is trained on, stays fixed, so this can run after or beside the UNet training."""
    from diffusers import AutoencoderKL

    _seed_all(cfg["seed"])
    vae = AutoencoderKL.from_pretrained(cfg["vae"])
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    run = _Run(out, cfg, "vae_decoder")

    def step_fn(step):
        x = _batch(cfg, step)[0] * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "mse": mse.item()}

    run.loop({"vae": vae, "opt": opt, "sched": sched}, step_fn)
    vae.save_pretrained(out / "final")
    print(f"vae (decoder fine-tuned) -> {out / 'final'}")


def _register_clip(tokenizer_dir: Path):
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[models.CLIP_NAME] = models.clip_config(tokenizer_dir.resolve())
    return open_clip


def _clip_inputs(model, images):
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def train_clip(cfg, out: Path):
    tok_dir = Path(cfg["tokenizer"])
    open_clip = _register_clip(tok_dir)
    from open_clip.loss import ClipLoss

    _seed_all(cfg["seed"])
    model = open_clip.create_model(models.CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(models.CLIP_NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    loss_fn = ClipLoss()
    run = _Run(out, cfg, "clip")

    def step_fn(step):
        images, captions = _batch(cfg, step)
        img, txt, scale = model(_clip_inputs(model, images), tokenizer(captions))[:3]
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return {"loss": loss.item()}

    run.loop({"clip": model, "opt": opt, "sched": sched}, step_fn)
    from safetensors.torch import save_file

    (out / "final").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "final" / "open_clip_model.safetensors")
    print(f"clip -> {out / 'final'}")


def train_unet(cfg, out: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _seed_all(cfg["seed"])
    tokenizer = CLIPTokenizer.from_pretrained(cfg["tokenizer"])
    vae = AutoencoderKL.from_pretrained(cfg["vae"]).requires_grad_(False).eval()
    text = CLIPTextModel(CLIPTextConfig(**models.text_config(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)))
    unet = UNet2DConditionModel(**models.unet_config())
    scalelong = None
    if cfg.get("scalelong", "none") != "none" or cfg.get("log_skip_norms"):  # before the optimizer (LS modules)
        from ..api import apply
        from ..transforms.scalelong import ScaleLong

        scalelong = apply(unet, ScaleLong(kind=cfg.get("scalelong", "none"), kappa=cfg.get("kappa", 0.8),
                                          record_norms=True)).applied(ScaleLong)  # its skip norms
    noise_sched = DDPMScheduler(**{k: v for k, v in models.SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")})
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema_unet, ema_text = EMA(unet, cfg["ema"]), EMA(text, cfg["ema"])
    run = _Run(out, cfg, "unet")
    sf = vae.config.scaling_factor

    def step_fn(step):
        images, captions = _batch(cfg, step)
        captions = ["" if random.random() < cfg["uncond_prob"] else c for c in captions]
        with torch.no_grad():
            lat = vae.encode(images * 2 - 1).latent_dist.sample() * sf
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(lat)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (lat.shape[0],))
        noisy = noise_sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text(ids)[0]).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        gamma = cfg.get("min_snr_gamma", 0)
        if gamma:  # Min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction: min(SNR, gamma) / SNR
            ac = noise_sched.alphas_cumprod[t]
            snr = ac / (1 - ac)
            per_sample = per_sample * snr.clamp(max=gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet, step)
        ema_text.update(text, step)
        metrics = {"loss": loss.item(), "grad_norm": float(gnorm)}
        every = cfg.get("snapshot_every")
        if every and (step + 1) % every == 0:  # EMA weights at this step, for quality-per-step curves
            _save_models(out / "snapshots" / str(step + 1), unet=ema_unet.model, text_encoder=ema_text.model)
        if scalelong is not None:  # mean L2 norm of each long skip (before scaling), skip_1 the outermost
            metrics |= {f"skip_{i}": v for i, v in sorted(scalelong.norms.items())}
        return metrics

    run.loop({"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text, "opt": opt,
              "sched": sched}, step_fn)
    _save_models(out / "final", unet=ema_unet.model, text_encoder=ema_text.model)
    print(f"unet -> {out / 'final'}")


def export(cfg, out: Path):
    """Assemble the trained parts into the shipped fp16 package data (``accel/miniature/weights``)."""
    import shutil

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    runs = Path(cfg["runs"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(runs / "vae_decoder" / "final"),
        text_encoder=CLIPTextModel.from_pretrained(runs / "unet" / "final" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(runs / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(runs / "unet" / "final" / "unet"),
        scheduler=PNDMScheduler(**models.SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float16)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    # open_clip's own local format: `open_clip.create_model_and_transforms("local-dir:<folder>")`
    shutil.copytree(runs / "tokenizer", tmp / "clip")
    cfg_clip = models.clip_config(runs / "tokenizer")
    cfg_clip["text_cfg"]["hf_tokenizer_name"] = "."  # local-dir: open_clip reads the tokenizer from the folder
    (tmp / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg_clip}, indent=1))
    from safetensors.torch import load_file, save_file

    sd = load_file(runs / "clip" / "final" / "open_clip_model.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, tmp / "clip" / "open_clip_model.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported -> {out} ({size / 2**20:.1f} MiB)")


STAGES = {"tokenizer": train_tokenizer, "vae": train_vae, "vae_decoder": train_vae_decoder, "clip": train_clip, "unet": train_unet, "export": export}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m accel.miniature.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--recipe", type=Path, help="TOML with the stage's hyper-parameters "
                   "(default recipes/miniature/STAGE.toml)")
    p.add_argument("--out", type=Path, help="output folder (default runs/miniature/STAGE)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scalelong", choices=["none", "cs", "ls", "sqrt2"],
                   help="unet stage: scale the long skips (ScaleLong); 'none' logs nothing extra")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set steps=100")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = a.recipe or RECIPES / f"{a.stage}.toml"
    cfg = tomllib.loads(recipe.read_text()) if recipe.exists() else {}
    if a.scalelong is not None:
        cfg["scalelong"] = a.scalelong
    for kv in a.set:
        k, v = kv.split("=", 1)
        try:
            cfg[k] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            cfg[k] = v  # a bare string
    for k in ("tokenizer", "vae", "runs"):
        if k in cfg and not Path(cfg[k]).is_absolute():
            cfg[k] = str(REPO / cfg[k])
    if a.stage == "export":
        out = a.out or Path(__file__).parent / "weights"
    else:
        out = a.out or RUNS / a.stage
    STAGES[a.stage](cfg, out)


if __name__ == "__main__":
    main()
