"""Pure-torch reference of every int8 kernel: the same integers, computed exactly.

It is the CPU backend and the oracle the Triton kernels are tested against. Conventions shared with the
Triton kernels (so both give bit-identical integers):

* rounding is half away from zero: ``round(x) = floor(x + 0.5)`` for ``x >= 0``, ``ceil(x - 0.5)`` below;
* values are clamped to the int8 range *before* the cast (no wrap-around);
* symmetric activation quantization: ``q = clamp(round(x / s), -127, 127)``, per token ``s = absmax / 127``;
* static activation quantization: ``q = clamp(round(x / s) + z, -128, 127)`` with a given scale and zero point;
* W8A8 GEMM: ``y[m, n] = s_a[m] * s_w[n] * (sum_k (a[m,k] - z_a) * (w[n,k] - z_w[n])) + bias[n]``, the integer
  sum accumulated exactly (float64 here, int32 in the kernels: both exact for int8 operands and K < 2^17).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QMIN, QMAX = -128, 127


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row quantization of a float ``(M, K)`` -> ``(q int8, scale float32 (M,))``."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = round_half_away(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: float | torch.Tensor, zero_point: int = 0) -> torch.Tensor:
    """Static quantization with a given per-tensor scale and zero point -> int8 of ``x``'s shape."""
    x = x.float()
    s = torch.as_tensor(scale, dtype=torch.float32)
    return (round_half_away(x / s) + zero_point).clamp(QMIN, QMAX).to(torch.int8)


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` of int8 ``(M, K)`` and ``(N, K)`` as int64 (float64 products are exact here)."""
    return (a.double() @ w.double().T).round().long()


def w8a8_gemm(a: torch.Tensor, w: torch.Tensor, a_scale, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
              a_zero: int = 0, w_zero: torch.Tensor | None = None, out_dtype=torch.float32) -> torch.Tensor:
    """``a`` int8 ``(M, K)``, ``w`` int8 ``(N, K)``; ``a_scale`` scalar or ``(M,)``; ``w_scale`` ``(N,)``;
    optional per-column weight zero points ``w_zero`` ``(N,)`` and activation zero point ``a_zero``."""
    acc = int_matmul(a, w)
    k = a.shape[1]
    if a_zero:
        acc = acc - a_zero * w.long().sum(1)[None, :]
    if w_zero is not None:
        acc = acc - w_zero.long()[None, :] * a.long().sum(1)[:, None]
        if a_zero:
            acc = acc + k * a_zero * w_zero.long()[None, :]
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32)
    sa = a_scale[:, None] if a_scale.dim() == 1 else a_scale
    y = acc.float() * sa * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale, bias=None, w_zero=None, out_dtype=None):
    """Float ``x (..., K)`` quantized per token, times int8 weights: the fused kernel's reference."""
    shape = x.shape
    q, s = quantize_per_token(x.reshape(-1, shape[-1]))
    y = w8a8_gemm(q, w, s, w_scale, bias, 0, w_zero, out_dtype or x.dtype)
    return y.reshape(*shape[:-1], w.shape[0])


def conv2d_int8(x_q: torch.Tensor, w_q: torch.Tensor, stride=1, padding=0) -> torch.Tensor:
    """Exact integer convolution: ``x_q`` int8 NCHW, ``w_q`` int8 ``(Cout, Cin, kh, kw)`` -> int64 NCHW."""
    return F.conv2d(x_q.double(), w_q.double(), stride=stride, padding=padding).round().long()


def w8a8_conv2d(x_q: torch.Tensor, w_q: torch.Tensor, x_scale, w_scale, bias=None, stride=1, padding=0,
                w_zero=None, out_dtype=torch.float32) -> torch.Tensor:
    """Symmetric int8 activations (zero padding is the real zero), weights per output channel (optionally
    asymmetric): ``y = s_x * s_w[o] * (conv(x_q, w_q) - z_w[o] * conv(x_q, 1)) + bias``. NCHW in and out."""
    acc = conv2d_int8(x_q, w_q, stride, padding)
    if w_zero is not None:
        ones = torch.ones((1,) + tuple(w_q.shape[1:]), dtype=torch.int8)
        acc = acc - w_zero.long().view(1, -1, 1, 1) * conv2d_int8(x_q, ones, stride, padding)
    y = acc.float() * torch.as_tensor(x_scale, dtype=torch.float32) * w_scale.float().view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(out_dtype)
