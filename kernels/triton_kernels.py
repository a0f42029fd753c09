"""Triton int8 kernels: W8A8 GEMM (optionally with fused per-token activation quantization), implicit-GEMM
int8 convolution (NHWC, any kernel size, stride, padding: no im2col buffer), and quantize kernels.

Import through :mod:`accel.kernels` (it turns on ``TRITON_INTERPRET=1`` when there is no GPU, before triton
is imported, which is how these kernels run on CPU in CI). Written for the interpreter's known traps:
no ``tl.make_block_ptr``; no libdevice rounding (half-away-from-zero by floor/ceil); float->int8 wraps,
so every cast is preceded by a clamp; every load is masked with ``other=0``; offsets are int64.
Autotuning uses several configs on GPU and exactly one under the interpreter (:data:`INTERPRET`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(gpu: list[dict], interp: dict, warps=4, stages=3):
    if INTERPRET:
        return [triton.Config(interp, num_warps=1, num_stages=1)]
    return [triton.Config(c, num_warps=c.pop("warps", warps), num_stages=c.pop("stages", stages)) for c in gpu]


GEMM_CONFIGS = _configs(
    [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
     dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
     dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, stages=4), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, stages=4)],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32))


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))


# ------------------------------------------------------------------------------------------ quantize
@triton.jit
def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        offs = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    m = tl.max(amax, axis=0)
    scale = tl.where(m > 0, m / 127.0, 1.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        offs = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_away(x / scale), -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _quant_static_kernel(x_ptr, q_ptr, scale, zero, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(_round_half_away(x / scale) + zero, -128.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=offs < numel)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    block = 32 if INTERPRET else min(triton.next_power_of_2(k), 4096)
    _quant_per_token_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), BLOCK_K=block)
    return q.reshape(x.shape), s


def quantize_static(x: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    xc = x.contiguous()
    q = torch.empty(xc.shape, dtype=torch.int8, device=x.device)
    n = xc.numel()
    block = 256 if INTERPRET else 1024
    _quant_static_kernel[(triton.cdiv(n, block),)](xc, q, float(scale), float(zero_point), n, BLOCK=block)
    return q


# ------------------------------------------------------------------------------------------ GEMM
@triton.jit
def _epilogue(acc, a_rowsum, offs_m, offs_n, M, N, K, as_ptr, ws_ptr, wz_ptr, b_ptr, a_zero,
              PER_ROW_A: tl.constexpr, HAS_WZ: tl.constexpr, HAS_BIAS: tl.constexpr):
    acc = acc.to(tl.float32)
    mask_n = offs_n < N
    if HAS_WZ:  # asymmetric weights: subtract z_w[n] * sum_k (a[m,k] - z_a)
        wz = tl.load(wz_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
        acc = acc - (a_rowsum.to(tl.float32) - K * a_zero)[:, None] * wz[None, :]
    if PER_ROW_A:
        sa = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
        y = acc * sa[:, None]
    else:
        y = acc * tl.load(as_ptr)
    y = y * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return y


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _w8a8_gemm_kernel(a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr, wz_ptr, wsum_ptr, b_ptr, M, N, K, a_zero,
                      stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
                      PER_ROW_A: tl.constexpr, HAS_WZ: tl.constexpr, HAS_AZ: tl.constexpr, HAS_BIAS: tl.constexpr,
                      QUANT_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = epilogue(A_int8 @ W_int8^T). With QUANT_A, A is float and quantized per row inside the kernel
    (a first pass over K finds each row's absmax; the scale is written to as_ptr by the first N-program)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, rn = offs_m.to(tl.int64), offs_n.to(tl.int64)
    mask_m, mask_n = offs_m < M, offs_n < N
    if QUANT_A:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(a_ptr + rm[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        if pid_n == 0:
            tl.store(as_ptr + offs_m, scale, mask=mask_m)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        rk = offs_k.to(tl.int64)
        mask_k = offs_k < K
        if QUANT_A:
            x = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_away(x / scale[:, None]), -127.0), 127.0)
            a = q.to(tl.int8)
        else:
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
        if HAS_WZ:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
    if HAS_AZ:  # asymmetric activations: subtract z_a * sum_k w[n,k]
        wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0)
        acc = acc - a_zero * wsum[None, :]
    y = _epilogue(acc, rowsum, offs_m, offs_n, M, N, K, as_ptr, ws_ptr, wz_ptr, b_ptr, a_zero,
                  PER_ROW_A or QUANT_A, HAS_WZ, HAS_BIAS)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, y.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w8a8_gemm(a, w, a_scale, w_scale, bias=None, a_zero: int = 0, w_zero=None, out_dtype=torch.float32,
              w_sum=None):
    """int8 ``a (M, K)`` x int8 ``w (N, K)`` -> ``out_dtype (M, N)``; see :mod:`accel.kernels.reference`.
    If ``a`` is a float tensor it is quantized per row inside the kernel (the fused path); the per-row
    scales are then returned too: ``(y, a_scale)``."""
    quant_a = a.is_floating_point()
    m, k = a.shape
    n = w.shape[0]
    dev = a.device
    c = torch.empty((m, n), dtype=out_dtype, device=dev)
    if quant_a:
        a_scale_t = torch.empty((m,), dtype=torch.float32, device=dev)
        per_row = True
    else:
        a_scale_t = torch.as_tensor(a_scale, dtype=torch.float32, device=dev).reshape(-1).contiguous()
        per_row = a_scale_t.numel() > 1
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    wz = w_zero.to(torch.int32).contiguous() if w_zero is not None else dummy
    if a_zero and w_sum is None:
        w_sum = w.to(torch.int32).sum(1)
    ws = w_sum.to(torch.int32).contiguous() if a_zero else dummy
    b = bias.contiguous() if bias is not None else dummy

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _w8a8_gemm_kernel[grid](a, w, c, a_scale_t, w_scale.float().contiguous(), wz, ws, b, m, n, k, int(a_zero),
                            a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
                            PER_ROW_A=per_row, HAS_WZ=w_zero is not None, HAS_AZ=bool(a_zero),
                            HAS_BIAS=bias is not None, QUANT_A=quant_a)
    return (c, a_scale_t) if quant_a else c


# ------------------------------------------------------------------------------------------ conv
CONV_CONFIGS = _configs(
    [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, warps=8), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
     dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))


@triton.autotune(configs=CONV_CONFIGS, key=["Nb", "H", "W", "C", "O", "KH", "KW"])
@triton.jit
def _conv_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, wz_ptr, b_ptr, Nb, H, W, C, O, HO, WO, KH, KW,
                 stride, pad, HAS_WZ: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Implicit GEMM: rows are output pixels (n, ho, wo), columns output channels, K = (r, s, c).
    x is NHWC int8, w is (O, KH, KW, C) int8, y is NHWC."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    M = Nb * HO * WO
    K = KH * KW * C
    mask_m, mask_n = offs_m < M, offs_n < O
    nb = offs_m // (HO * WO)
    ho = (offs_m // WO) % HO
    wo = offs_m % WO
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        r = offs_k // (KW * C)
        s = (offs_k // C) % KW
        c = offs_k % C
        hi = ho[:, None] * stride - pad + r[None, :]
        wi = wo[:, None] * stride - pad + s[None, :]
        inb = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_off = ((nb[:, None].to(tl.int64) * H + hi) * W + wi) * C + c[None, :]
        a = tl.load(x_ptr + x_off, mask=mask_m[:, None] & mask_k[None, :] & inb, other=0)
        wv = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None],
                     mask=mask_n[None, :] & mask_k[:, None], other=0)
        acc += tl.dot(a, wv, out_dtype=tl.int32)
        if HAS_WZ:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
    y = _epilogue(acc, rowsum, offs_m, offs_n, M, O, K, xs_ptr, ws_ptr, wz_ptr, b_ptr, 0,
                  False, HAS_WZ, HAS_BIAS)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * O + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w8a8_conv2d_nhwc(x_q, w_q, x_scale, w_scale, bias=None, stride: int = 1, padding: int = 0, w_zero=None,
                     out_dtype=torch.float32):
    """``x_q`` int8 NHWC, ``w_q`` int8 ``(O, KH, KW, C)`` -> NHWC ``out_dtype``."""
    nb, h, w, c = x_q.shape
    o, kh, kw, _ = w_q.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    dev = x_q.device
    y = torch.empty((nb, ho, wo, o), dtype=out_dtype, device=dev)
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    xs = torch.as_tensor(x_scale, dtype=torch.float32, device=dev).reshape(1)
    wz = w_zero.to(torch.int32).contiguous() if w_zero is not None else dummy
    b = bias.contiguous() if bias is not None else dummy

    def grid(meta):
        return (triton.cdiv(nb * ho * wo, meta["BLOCK_M"]), triton.cdiv(o, meta["BLOCK_N"]))

    _conv_kernel[grid](x_q.contiguous(), w_q.contiguous(), y, xs, w_scale.float().contiguous(), wz, b,
                       nb, h, w, c, o, ho, wo, kh, kw, stride, padding, HAS_WZ=w_zero is not None,
                       HAS_BIAS=bias is not None)
    return y
