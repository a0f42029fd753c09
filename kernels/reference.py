"""Pure-torch reference of every int8 kernel: the same integers, computed exactly.

It is the CPU backend and the oracle the Triton kernels are tested against. Conventions shared with the
Triton kernels (so both give bit-identical integers):

* rounding is half away from zero: ``round(x) = floor(x + 0.5)`` for ``x >= 0``, ``ceil(x - 0.5)`` below;
* values are clamped to the int8 range *before* the cast (no wrap-around);
* symmetric activation quantization: ``q = clamp(round(x / s), -127, 127)``, per token ``s = absmax / 127``;
* static activation quantization: ``q = clamp(round((x - m) / s) + z, -128, 127)`` in float32 (IEEE division)
  with a given scale ``s``, shift ``m`` (the range centre: ``x = m + s q``) and zero point ``z``;
* W8A8 GEMM: ``y[m, n] = s_a[m] * s_w[n] * (sum_k (a[m,k] - z_a) * (w[n,k] - z_w[n])) + bias[n]``, the integer
  sum accumulated exactly (float64 here, int32 in the kernels: both exact for int8 operands and K < 2^17);
* static layers (:func:`w8a8_linear_static`, :func:`w8a8_conv2d_static`) read ``(s, m)`` from row ``step`` of a
  per-call table on the device and add the shift's product ``m W 1`` back through precomputed weight sums
  (for a zero-padded conv only the taps inside the image count: ``m * (wsum - outside taps)``).
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


def quantize_static(x: torch.Tensor, scale: float | torch.Tensor, zero_point: int = 0,
                    shift: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Static quantization with a given per-tensor scale, shift and zero point -> int8 of ``x``'s shape."""
    x = x.float()
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if not (isinstance(shift, float) and shift == 0.0):
        x = x - torch.as_tensor(shift, dtype=torch.float32, device=x.device)
    return (round_half_away(x / s) + zero_point).clamp(QMIN, QMAX).to(torch.int8)


def table_row(qtable: torch.Tensor, step: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` 0-d float32 tensors: row ``step`` of a ``(T, 2)`` table, read on its device."""
    row = qtable[0] if step is None else qtable.index_select(0, step.reshape(1).long())[0]
    return row[0], row[1]


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
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32, device=a.device)
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


def w8a8_linear_static(x: torch.Tensor, w, w_scale, w_zero=None, bias=None, w_sum=None, qtable=None, step=None,
                       out_dtype=None) -> torch.Tensor:
    """Float ``x (M, K)`` quantized with the table's ``(s, m)``: ``s s_w (q (W_q - z_w)) + (m W 1 + bias)``
    (``w_sum``: the dequantized ``W 1``; None for an unshifted quantizer)."""
    s, m = table_row(qtable, step)
    return w8a8_linear_codes(quantize_static(x, s, 0, m), w, w_scale, w_zero, bias, w_sum, qtable, step,
                             out_dtype or x.dtype)


def w8a8_linear_codes(q: torch.Tensor, w, w_scale, w_zero=None, bias=None, w_sum=None, qtable=None, step=None,
                      out_dtype=torch.float32) -> torch.Tensor:
    """The static GEMM on the int8 codes ``q (M, K)`` a static quantizer (table row ``step``) wrote."""
    s, m = table_row(qtable, step)
    b = None if bias is None else bias.float()
    if w_sum is not None:
        b = m * w_sum if b is None else m * w_sum + b
    return w8a8_gemm(q, w, s, w_scale, b, 0, w_zero, out_dtype)


def outside_taps(w_tap: torch.Tensor, h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """``(O, HO, WO)``: for every output pixel, the sum of ``w_tap (O, kh * kw)`` over the taps that read the zero
    padding (what a shift ``m`` of the input must not add there)."""
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    dev = w_tap.device
    rows = torch.arange(ho, device=dev)[:, None] * stride - padding + torch.arange(kh, device=dev)[None, :]
    cols = torch.arange(wo, device=dev)[:, None] * stride - padding + torch.arange(kw, device=dev)[None, :]
    in_h, in_w = ((rows >= 0) & (rows < h)).float(), ((cols >= 0) & (cols < w)).float()
    out = 1.0 - in_h[:, None, :, None] * in_w[None, :, None, :]  # (HO, WO, kh, kw)
    return torch.einsum("hwrs,ors->ohw", out, w_tap.float().view(-1, kh, kw))


def w8a8_conv2d_static(x: torch.Tensor, w, w_scale, w_zero=None, bias=None, w_sum=None, w_tap=None, qtable=None,
                       step=None, residual=None, stride=1, padding=0) -> torch.Tensor:
    """Float NCHW ``x`` quantized with the table's ``(s, m)``, times int8 ``w (O, C, KH, KW)``; ``w_sum (O,)`` and
    ``w_tap (O, KH * KW)``: the dequantized weight summed over input channels (and taps), for the shift;
    ``residual``: added in float32 before the cast to ``x.dtype`` (the other half of a split input)."""
    s, m = table_row(qtable, step)
    return w8a8_conv2d_codes(quantize_static(x, s, 0, m), w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step,
                             residual, stride, padding, x.dtype)


def w8a8_conv2d_codes(q: torch.Tensor, w, w_scale, w_zero=None, bias=None, w_sum=None, w_tap=None, qtable=None,
                      step=None, residual=None, stride=1, padding=0, out_dtype=torch.float32) -> torch.Tensor:
    """The static conv on the int8 NCHW codes ``q`` a static quantizer (table row ``step``) wrote."""
    s, m = table_row(qtable, step)
    b = None if bias is None else bias.float()
    if w_sum is not None:
        b = m * w_sum if b is None else m * w_sum + b
    y = w8a8_conv2d(q, w, s, w_scale, b, stride, padding, w_zero, torch.float32)
    if w_sum is not None and padding > 0:
        y = y - m * outside_taps(w_tap, q.shape[2], q.shape[3], w.shape[2], w.shape[3], stride, padding)
    if residual is not None:
        return (y + residual.float()).to(out_dtype)
    return y.to(out_dtype)


def conv2d_int8(x_q: torch.Tensor, w_q: torch.Tensor, stride=1, padding=0) -> torch.Tensor:
    """Exact integer convolution: ``x_q`` int8 NCHW, ``w_q`` int8 ``(Cout, Cin, kh, kw)`` -> int64 NCHW."""
    return F.conv2d(x_q.double(), w_q.double(), stride=stride, padding=padding).round().long()


def w8a8_conv2d(x_q: torch.Tensor, w_q: torch.Tensor, x_scale, w_scale, bias=None, stride=1, padding=0,
                w_zero=None, out_dtype=torch.float32) -> torch.Tensor:
    """Symmetric int8 activations (zero padding is the real zero), weights per output channel (optionally
    asymmetric): ``y = s_x * s_w[o] * (conv(x_q, w_q) - z_w[o] * conv(x_q, 1)) + bias``. NCHW in and out."""
    acc = conv2d_int8(x_q, w_q, stride, padding)
    if w_zero is not None:
        ones = torch.ones((1, 1) + tuple(w_q.shape[2:]), dtype=torch.float64, device=x_q.device)
        window_sums = F.conv2d(x_q.double().sum(1, keepdim=True), ones, stride=stride, padding=padding).round().long()
        acc = acc - w_zero.long().view(1, -1, 1, 1) * window_sums
    y = acc.float() * torch.as_tensor(x_scale, dtype=torch.float32, device=acc.device) * w_scale.float().view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(out_dtype)
