"""Fidelity metrics against known answers."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from accel.eval import latent_mse, psnr, ssim, to_tensor


def test_psnr_known_values():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    b = a + 0.1
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.01)
    assert math.isinf(psnr(a, a).item())


def test_ssim_identity_and_ordering():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    small = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    big = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(x, small) > ssim(x, big)).all()
    assert (ssim(x, big) < 0.9).all()


def test_ssim_matches_the_closed_form_on_constant_images():
    # constant images: variances are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((1, 1, 16, 16), 0.3), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01 ** 2
    expected = (2 * 0.3 * 0.6 + c1) / (0.09 + 0.36 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-6)


def test_pil_input_and_latents():
    arr = (np.arange(16 * 16 * 3) % 255).astype(np.uint8).reshape(16, 16, 3)
    im = Image.fromarray(arr)
    t = to_tensor([im])
    assert t.shape == (1, 3, 16, 16) and t.max() <= 1
    assert psnr([im], [im]).isinf().all()
    assert latent_mse(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8))
