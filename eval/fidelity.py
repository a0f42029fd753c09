"""Fidelity of an accelerated run against the baseline on the same seeds.

``psnr`` and ``ssim`` compare final images (float tensors in [0, 1], ``(N, C, H, W)`` or PIL images);
``latent_mse`` compares final latents. SSIM is the standard Gaussian-window SSIM (Wang et al. 2004:
window 11, sigma 1.5, K1 0.01, K2 0.03), computed per channel and averaged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(images) -> torch.Tensor:
    """PIL image(s), numpy ``(N, H, W, C)`` in [0, 1] or a tensor -> float64 tensor ``(N, C, H, W)``."""
    if isinstance(images, torch.Tensor):
        x = images
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
    else:
        if not isinstance(images, (list, tuple)):
            images = [images]
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)
                         for im in images])
    x = x.double()
    return x[None] if x.dim() == 3 else x


def psnr(a, b, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``(N,)``; identical images give ``inf``."""
    a, b = to_tensor(a), to_tensor(b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a, b, data_range: float = 1.0) -> torch.Tensor:
    """Per-image mean SSIM, ``(N,)`` (valid-region Gaussian filtering, as scikit-image with gaussian_weights)."""
    a, b = to_tensor(a), to_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    c = a.shape[1]
    w = _gaussian().to(a)[None, None].repeat(c, 1, 1, 1)
    f = lambda x: F.conv2d(x, w, groups=c)
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of final latents, ``(N,)``."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)
