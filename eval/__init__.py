"""Evaluation: CLIP score (open_clip), fidelity against a baseline (PSNR, SSIM, latent MSE), the
miniature's attribute judge, and the process-parallel evaluation runner. Imported as ``accel.eval``."""
from .clip_score import CLIPScorer, resolve_clip
from .fidelity import latent_mse, psnr, ssim, to_tensor

__all__ = ["CLIPScorer", "resolve_clip", "psnr", "ssim", "latent_mse", "to_tensor"]
