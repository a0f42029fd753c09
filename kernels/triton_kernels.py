"""Triton int8 kernels: the W8A8 GEMM and the implicit-GEMM convolution, each with the activation
quantization fused into its A load, and two stand-alone quantize kernels.

Import through :mod:`accel.kernels` (it turns on ``TRITON_INTERPRET=1`` when there is no GPU, before triton is
imported, which is how these kernels run on CPU in CI). :mod:`accel.kernels.build_report` compiles every one of
them for sm_80 and sm_90a on a CPU machine and reads registers and spills from ``ptxas``.

How they are written (Triton's matmul tutorial and production int8 GEMMs):

* One program per output tile, tiles visited in groups of ``GROUP_M`` rows (L2 reuse); row and column
  indices wrap (``% M``) so the K loop needs no row/column masks; everything outside the loop is computed once
  and the A/W pointer tiles advance by a scalar per K step. Offsets are int32 unless a tensor has 2^31 or more
  elements (``OFFS_64``); ``EVEN_K``/``EVEN_C`` (set per config) drop the K mask when ``BLOCK_K`` divides it.
* A modes (``A_MODE``): 0, int8 A with a given scale; 1, float A (fp32/fp16/bf16) quantized on load with a
  static per-tensor scale and shift read on the device from a per-call table ``qt[step] = (scale, shift)`` (the
  step index is itself a device tensor: no host sync, no Python float); 2, float A quantized per row inside the
  kernel (dynamic: a first pass over K finds each row's absmax); 3, int8 codes of that static quantizer, written
  by :func:`quantize_table` (the same table row read on the device), with mode 1's epilogue. A static layer is
  two kernels, quantize then GEMM/conv on int8 (mode 3): fusing the quantization into the A load (mode 1, kept
  behind the entry points' ``fuse_quant=True``) measured 3-6x slower on an H200 (the figures are where the modes
  are defined). A dynamic GEMM likewise runs the per-token quantize kernel, then mode 0 with per-row scales (mode 2
  with the same argument).
* Integer epilogue first (zero-point corrections in int32, exactly the reference's integers), then one
  conversion to float: ``y = acc * s_a * s_w[n] + (bias[n] + shift * wsum[n])``, written in the output dtype.
* The conv is an implicit GEMM over NCHW tensors of any strides (channels_last reads contiguous channels):
  rows are output pixels, columns output channels, K walks the taps (r, s) in its outer order and contiguous
  channel blocks inside; the tap and channel block of a K step are two scalar divisions, the pixel part of
  the address is computed once. Weights are read as ``(O, KH, KW, C)`` memory (a channels_last int8 weight,
  laid out once at quantize time). A shifted input ``x = m + s q`` on a zero-padded conv adds ``m`` times the
  taps that fall inside the image: ``m * wsum[o]`` minus the out-of-bounds taps' sums, only on border tiles.
* Numerics shared with :mod:`.reference`: round half away from zero by floor/ceil, IEEE division
  (``div_rn``), clamp before every int8 cast, masked loads with ``other=0`` and quantized padding forced to 0.

Autotuning uses several configs on GPU, those of the device's MMA family chosen at import (:func:`tile_configs`:
wgmma tiles on Hopper, mma.sync tiles on sm_80/sm_89), and exactly one under the interpreter (:data:`INTERPRET`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT32_LIMIT = 2 ** 31


def device_arch() -> int | None:
    """The compute capability of the current CUDA device as ``major * 10 + minor`` (80 A100, 89 L4/L40, 90 H100/
    H200), or None under the interpreter or without a CUDA device."""
    if INTERPRET or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def uses_wgmma(arch: int | None) -> bool:
    """Whether ``arch`` runs int8 ``tl.dot`` as Hopper's wgmma (sm_90a): everything else with int8 tensor cores
    (sm_80, sm_86, sm_89, and sm_100, whose tcgen05 MMA has no int8 path in Triton) runs ``mma.sync``."""
    return arch is not None and arch // 10 == 9


# Tile configs (the autotuner's search space) per MMA family, kept when `python -m accel.kernels.build_report`
# shows, for every kernel variant, no spills and the int8 tensor-core instruction the family is for.
# ``warps``/``stages`` default to 4 and 3.
#
# wgmma (sm_90a). Triton (3.8: supportMMA(version 3), AccelerateMatmul) lowers an int8 (s8 x s8 -> s32) tl.dot
# to wgmma only when num_warps % 4 == 0, BLOCK_M % 64 == 0, BLOCK_N % 8 == 0 and BLOCK_K >= 32 (one k32
# instruction); otherwise it falls back to mma.sync with no error (a 32-row tile did). wgmma reads B from shared
# memory, and for 8-bit types only K-major (the instruction transposes 16-bit types only): W is (N, K) with K
# contiguous and both kernels load its (BLOCK_K, BLOCK_N) tile K fastest, so the shared layout is the load's and
# B stays an async, pipelined copy (the report fails a build with Triton's "Forcing a different order" warning).
# 3-4 stages as in Triton's Hopper matmul tutorial; BLOCK_K 128 is one 128-byte swizzle row of int8 (BLOCK_K 64
# kept for K = 320, the most frequent). The 128x64x128 tile needs 8 warps: with 4, the fused-quantization
# variants spill (a 128x128 float A tile in registers).
# mma (sm_80, sm_89 and the rest): the tiles measured before, with a 32-row tile for short GEMMs (text tokens);
# at most 80 KB of shared memory (the fused-quantization variants' float A tiles), under sm_89's 99 KB per block.
# Both families have one 128x128 tile per kernel and the same number of configs (what the report's tests select
# and compare across archs).
_TILES = {
    "gemm": {
        "wgmma": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8, stages=4),
                  dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, warps=8, stages=3),
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, stages=4),
                  dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, warps=8, stages=4),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, stages=4)],
        "mma": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
                dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, stages=4),
                dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, stages=4)]},
    # BLOCK_K 64 for the UNet's channel counts (multiples of 64), 32 for few channels (conv_in's 4): see conv_configs
    "conv": {
        "wgmma": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8, stages=4),
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, stages=4),
                  dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, stages=4),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, stages=4),
                  dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, warps=8), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)],
        "mma": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, warps=8), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
                dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, warps=8), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
                dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, warps=8), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)]},
}


def interpret_configs() -> list[triton.Config]:
    """The interpreter's (CPU tests): one small config, so a test's programs take a few loop steps each."""
    return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2), num_warps=1, num_stages=1)]


def tile_configs(kernel: str, arch: int | None, group_m: int = 8) -> list[triton.Config]:
    """The GPU autotune configs of ``kernel`` (``"gemm"`` or ``"conv"``) for compute capability ``arch``
    (:func:`uses_wgmma` picks the family; None, no device: the wgmma tiles, valid on every arch)."""
    family = "wgmma" if arch is None or uses_wgmma(arch) else "mma"
    out = []
    for c in _TILES[kernel][family]:
        c = dict(c)
        w, s = c.pop("warps", 4), c.pop("stages", 3)
        out.append(triton.Config(dict(c, GROUP_M=group_m), num_warps=w, num_stages=s))
    return out


# chosen once, at import, for the device this process runs on
ARCH = device_arch()
GEMM_CONFIGS = interpret_configs() if INTERPRET else tile_configs("gemm", ARCH)
CONV_CONFIGS = interpret_configs() if INTERPRET else tile_configs("conv", ARCH)
SMALL_C = 32


def conv_configs(configs, c: int):
    """The configs the conv autotunes over for ``c`` input channels: channel blocks of 32 when ``c <= 32`` (a
    64-wide block would be mostly padding), else of 64 or more."""
    small = [cfg for cfg in configs if cfg.kwargs["BLOCK_K"] <= SMALL_C]
    large = [cfg for cfg in configs if cfg.kwargs["BLOCK_K"] > SMALL_C]
    return (small if c <= SMALL_C else large) or list(configs)


def _prune_conv(configs, named_args, **kwargs):
    return conv_configs(configs, named_args["C"])


A_INT8, A_STATIC, A_DYNAMIC, A_CODES = 0, 1, 2, 3
# A static layer quantizes its activation in a separate elementwise kernel and runs the GEMM/conv on the int8 codes
# (A_CODES). Measured on an H200 (fp16, CUDA-graph replay, the SD 1.5 shapes): quantizing inside the A load
# (A_STATIC) made the K loop wait on every A tile (the loads feed arithmetic before the dot, so they are not
# pipelined): 3x3 conv 2x320x64x64 -> 320 154 us fused vs 5 + 33 us split, 2x1280x16x16 -> 1280 403 vs 2 + 64,
# linear 8192x320 -> 2560 112 vs 5 + 35 (torch._int_mm alone 41). Dynamic GEMMs are split the same way (per-token
# quantize kernel, then the int8 GEMM with per-row scales; not yet measured on a GPU). ``fuse_quant=True`` of
# :func:`gemm` / :func:`conv2d` runs the fused kernels (the benchmarks time both): an argument of the call, not a
# module-wide switch, so one measurement cannot change what another caller's layers run.


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))


@triton.jit
def _quantize(x, scale, shift, LO: tl.constexpr, HI: tl.constexpr):
    """``clamp(round((x - shift) / scale), LO, HI)`` in fp32 (still float: the caller casts after masking)."""
    q = _round_half_away(tl.div_rn(x.to(tl.float32) - shift, scale))
    return tl.minimum(tl.maximum(q, LO), HI)


@triton.jit
def _step_qparams(qt_ptr, step_ptr, HAS_STEP: tl.constexpr):
    """``(scale, shift)`` of this call: row ``step`` of the ``(T, 2)`` table (row 0 without a step tensor)."""
    if HAS_STEP:
        row = tl.load(step_ptr).to(tl.int32) * 2
    else:
        row = 0
    return tl.load(qt_ptr + row), tl.load(qt_ptr + row + 1)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (tile row, tile column), in groups of GROUP_M tile rows (the tutorial's L2 order)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


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
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0)
        tl.store(q_ptr + row * stride_qm + offs, _quantize(x, scale, 0.0, -127.0, 127.0).to(tl.int8), mask=offs < K)


@triton.jit
def _quant_static_kernel(x_ptr, q_ptr, qp_ptr, numel, BLOCK: tl.constexpr):
    """``q = clamp(round((x - shift) / scale) + zero)`` with ``qp = (scale, shift, zero)`` on the device."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
    scale, shift, zero = tl.load(qp_ptr), tl.load(qp_ptr + 1), tl.load(qp_ptr + 2)
    q = tl.minimum(tl.maximum(_round_half_away(tl.div_rn(x.to(tl.float32) - shift, scale)) + zero, -128.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=offs < numel)


@triton.jit
def _quant_table_kernel(x_ptr, q_ptr, qt_ptr, step_ptr, numel, D1, D2, D3, S0, S1, S2, S3,
                        HAS_STEP: tl.constexpr, DENSE: tl.constexpr, OFFS_64: tl.constexpr, BLOCK: tl.constexpr):
    """A static layer's codes ``q = clamp(round((x - shift) / scale), -128, 127)``, ``(scale, shift)`` = row
    ``step`` of the per-call table (the GEMM/conv's A_CODES epilogue reads the same row). ``q`` is dense, walked
    in memory order as a ``(D0, D1, D2, D3)`` array; ``x`` is read at the strides ``S0..S3`` of those dims (a
    channel slice of a split shortcut's input is not dense, and is not copied first), or at the same flat offsets
    when it is laid out like ``q`` (``DENSE``: no index arithmetic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if OFFS_64:
        offs = offs.to(tl.int64)
    scale, shift = _step_qparams(qt_ptr, step_ptr, HAS_STEP)
    if DENSE:
        src = offs
    else:
        i3 = offs % D3
        rest = offs // D3
        i2 = rest % D2
        rest = rest // D2
        src = (rest // D1) * S0 + (rest % D1) * S1 + i2 * S2 + i3 * S3
    x = tl.load(x_ptr + src, mask=offs < numel, other=0.0)
    tl.store(q_ptr + offs, _quantize(x, scale, shift, -128.0, 127.0).to(tl.int8), mask=offs < numel)


def quantize_table(x: torch.Tensor, qtable: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    """Static int8 codes of a 2-D ``(M, K)`` or 4-D NCHW ``x`` of any strides, in one elementwise pass. The
    codes are dense: row-major for 2-D; for 4-D channels_last when ``x``'s channels are contiguous (what the
    conv reads best), else contiguous."""
    if x.dim() == 2:
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        dims, strides = (1, 1) + tuple(x.shape), (0, 0) + tuple(x.stride())
    elif x.stride(1) == 1 and x.shape[1] > 1:  # NHWC memory order
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device, memory_format=torch.channels_last)
        order = (0, 2, 3, 1)
        dims, strides = tuple(x.shape[i] for i in order), tuple(x.stride(i) for i in order)
    else:
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        dims, strides = tuple(x.shape), tuple(x.stride())
    n = x.numel()
    block = 256 if INTERPRET else 1024
    _quant_table_kernel[(triton.cdiv(n, block),)](x, q, qtable, step if step is not None else qtable, n,
                                                  dims[1], dims[2], dims[3], *strides,
                                                  HAS_STEP=step is not None, DENSE=x.stride() == q.stride(),
                                                  OFFS_64=x.untyped_storage().nbytes() >= INT32_LIMIT,  # >= any offset
                                                  BLOCK=block)
    return q


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    block = 32 if INTERPRET else min(triton.next_power_of_2(k), 4096)
    _quant_per_token_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), BLOCK_K=block)
    return q.reshape(x.shape), s


def quantize_static(x: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    """``qparams``: float32 ``(scale, shift, zero_point)`` on ``x``'s device."""
    xc = x.contiguous()
    q = torch.empty(xc.shape, dtype=torch.int8, device=x.device)
    n = xc.numel()
    block = 256 if INTERPRET else 1024
    _quant_static_kernel[(triton.cdiv(n, block),)](xc, q, qparams, n, BLOCK=block)
    return q


# ------------------------------------------------------------------------------------------ GEMM
@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K", "A_MODE", "HAS_WZ"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemm_kernel(a_ptr, w_ptr, c_ptr, sa_ptr, qt_ptr, step_ptr, ws_ptr, wz_ptr, wsum_ptr, b_ptr,
                 M, N, K, a_zero, stride_am, stride_wn, stride_cm,
                 A_MODE: tl.constexpr, PER_ROW_A: tl.constexpr, HAS_STEP: tl.constexpr, HAS_WZ: tl.constexpr,
                 HAS_AZ: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 OFFS_64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``C = epilogue(A @ W^T)``: A ``(M, K)`` (int8 or float, see ``A_MODE``), W int8 ``(N, K)`` with K
    contiguous (the layout both int8 tensor-core instructions want for B), C ``(M, N)``.
    With ``A_MODE == 2`` the per-row scales are written to ``sa_ptr`` (by the tiles of column 0)."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    if OFFS_64:
        rm, rn = rm.to(tl.int64), rn.to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]
    if A_MODE == 1 or A_MODE == 3:
        scale, shift = _step_qparams(qt_ptr, step_ptr, HAS_STEP)
    if A_MODE == 2:  # dynamic per-row scales: one pass over the row block first
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        p = a_ptrs
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = tl.load(p, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            p += BLOCK_K
        row_scale = tl.where(amax > 0, amax / 127.0, 1.0)
        if pid_n == 0:
            offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(sa_ptr + offs, row_scale, mask=offs < M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
        if A_MODE == 1:
            q = _quantize(a, scale, shift, -128.0, 127.0)
            if not EVEN_K:
                q = tl.where(k_ok[None, :], q, 0.0)
            a = q.to(tl.int8)
        if A_MODE == 2:
            a = _quantize(a, row_scale[:, None], 0.0, -127.0, 127.0).to(tl.int8)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        if HAS_WZ:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    # epilogue: integer corrections, one conversion, float scales
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_AZ:  # int8 A with zero point z_a: - z_a * sum_k w[n, k]
        acc -= a_zero * tl.load(wsum_ptr + rn).to(tl.int32)[None, :]
        rowsum -= K * a_zero
    if HAS_WZ:  # asymmetric weights: - z_w[n] * sum_k (a[m, k] - z_a)
        acc -= rowsum[:, None] * tl.load(wz_ptr + rn).to(tl.int32)[None, :]
    y = acc.to(tl.float32)
    if A_MODE == 1 or A_MODE == 3:
        y = y * scale
    elif A_MODE == 2:
        y = y * row_scale[:, None]
    elif PER_ROW_A:
        y = y * tl.load(sa_ptr + rm)[:, None]
    else:
        y = y * tl.load(sa_ptr)
    y = y * tl.load(ws_ptr + rn)[None, :]
    if HAS_SHIFT:  # x = m + s q: W x = s W q + m W 1
        if HAS_BIAS:
            y = y + (shift * tl.load(wsum_ptr + rn) + tl.load(b_ptr + rn).to(tl.float32))[None, :]
        else:
            y = y + (shift * tl.load(wsum_ptr + rn))[None, :]
    elif HAS_BIAS:
        y = y + tl.load(b_ptr + rn).to(tl.float32)[None, :]
    if OFFS_64:
        offs_m = offs_m.to(tl.int64)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _needs_64(*tensors) -> bool:
    return any(t is not None and t.numel() >= INT32_LIMIT for t in tensors)


def gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, a_scale: torch.Tensor | None = None,
         qtable: torch.Tensor | None = None, step: torch.Tensor | None = None, w_zero: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, w_sum: torch.Tensor | None = None, a_zero: int = 0,
         out_dtype: torch.dtype | None = None, fuse_quant: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch of :func:`_gemm_kernel`. ``a (M, K)``: int8 with ``a_scale`` (scalar or ``(M,)``) and
    optionally ``a_zero`` (``w_sum`` is then the int32 ``sum_k w``); or float with ``qtable (T, 2)`` (static,
    ``w_sum`` float: the shift's ``W 1``); or float alone (dynamic per row). ``w (N, K)`` int8 with K
    contiguous; ``w_scale (N,)`` float32; ``w_zero (N,)`` int8/int32. A float ``a`` is quantized by a kernel of its
    own first (static: :func:`quantize_table`, dynamic: :func:`quantize_per_token`), or, with ``fuse_quant``, inside
    the GEMM's A load (the slower kernel, kept to be measured). Returns ``(y, per-row scales or None)``."""
    m, k = a.shape
    n = w.shape[0]
    if a.stride(1) != 1:
        a = a.contiguous()
    dev = a.device
    row_scales = None  # dynamic mode's per-row scales, returned
    if a.is_floating_point():
        mode = A_STATIC if qtable is not None else A_DYNAMIC
        out_dtype = out_dtype or a.dtype
        if mode == A_STATIC and not fuse_quant:
            a, mode = quantize_table(a, qtable, step), A_CODES
        elif mode == A_DYNAMIC and not fuse_quant:  # the same integers and per-row scales as the fused pass
            a, a_scale = quantize_per_token(a)
            mode, row_scales = A_INT8, a_scale
    elif qtable is not None:  # int8 codes a static quantizer wrote (table row ``step``: the epilogue's scale, shift)
        mode = A_CODES
        out_dtype = out_dtype or torch.float32
    else:
        mode = A_INT8
        out_dtype = out_dtype or torch.float32
    c = torch.empty((m, n), dtype=out_dtype, device=dev)
    per_row = mode == A_DYNAMIC or (a_scale is not None and a_scale.numel() > 1)
    if mode == A_DYNAMIC:
        a_scale = row_scales = torch.empty((m,), dtype=torch.float32, device=dev)
    dummy = w_scale  # never read: its flag is off
    has_shift = mode in (A_STATIC, A_CODES) and w_sum is not None

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _gemm_kernel[grid](a, w, c, a_scale if a_scale is not None else dummy, qtable if qtable is not None else dummy,
                       step if step is not None else dummy, w_scale, w_zero if w_zero is not None else dummy,
                       w_sum if w_sum is not None else dummy, bias if bias is not None else dummy,
                       m, n, k, int(a_zero), a.stride(0), w.stride(0), c.stride(0),
                       A_MODE=mode, PER_ROW_A=per_row, HAS_STEP=step is not None, HAS_WZ=w_zero is not None,
                       HAS_AZ=bool(a_zero), HAS_SHIFT=has_shift, HAS_BIAS=bias is not None,
                       OFFS_64=_needs_64(a, w, c))
    return c, row_scales


# ------------------------------------------------------------------------------------------ conv
@triton.autotune(configs=CONV_CONFIGS, key=["Nb", "H", "W", "C", "O", "A_MODE", "HAS_WZ"],
                 prune_configs_by={"early_config_prune": _prune_conv})
@triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_K"] == 0})
@triton.jit
def _conv_kernel(x_ptr, w_ptr, y_ptr, r_ptr, xs_ptr, qt_ptr, step_ptr, ws_ptr, wz_ptr, wsum_ptr, wtap_ptr, b_ptr,
                 Nb, H, W, C, O, HO, WO,
                 sxn, sxc, sxh, sxw, swo, swh, sww, syn, syo, syh, syw,
                 KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                 A_MODE: tl.constexpr, HAS_STEP: tl.constexpr, HAS_WZ: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EVEN_C: tl.constexpr, OFFS_64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Implicit GEMM: rows are output pixels (n, ho, wo), columns output channels, K = (r, s, c).
    x and y are NCHW of any strides (channels_last makes the channel loads contiguous); w is read at
    ``o * swo + r * swh + s * sww + c`` (channels_last int8 weights: K contiguous)."""
    M = Nb * HO * WO
    pid_m, pid_n = _tile(M, O, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % O
    rk = tl.arange(0, BLOCK_K)
    # the pixel part of every address, computed once
    nb = rm // (HO * WO)
    pix = rm % (HO * WO)
    ho = pix // WO
    wo = pix % WO
    hi0 = ho * STRIDE - PAD
    wi0 = wo * STRIDE - PAD
    if OFFS_64:
        x_row = nb.to(tl.int64) * sxn + hi0.to(tl.int64) * sxh + wi0.to(tl.int64) * sxw
        w_col = rn.to(tl.int64) * swo
    else:
        x_row = nb * sxn + hi0 * sxh + wi0 * sxw
        w_col = rn * swo
    x_ptrs = x_ptr + x_row[:, None] + rk[None, :] * sxc
    w_ptrs = w_ptr + w_col[None, :] + rk[:, None]
    if A_MODE == 1 or A_MODE == 3:
        scale, shift = _step_qparams(qt_ptr, step_ptr, HAS_STEP)
    BORDER: tl.constexpr = PAD > 0
    HAS_MASK: tl.constexpr = BORDER or not EVEN_C
    n_cb = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for kk in range(0, KH * KW * n_cb):
        tap = kk // n_cb  # taps outside, channel blocks inside: two scalar divisions per step
        c0 = (kk - tap * n_cb) * BLOCK_K
        r = tap // KW
        s = tap - r * KW
        w_ptrs_k = w_ptrs + (r * swh + s * sww + c0)
        if not EVEN_C:
            c_ok = rk < C - c0
        if BORDER:
            hi = hi0 + r
            wi = wi0 + s
            inb = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            if EVEN_C:
                mask = inb[:, None]
            else:
                mask = inb[:, None] & c_ok[None, :]
        elif not EVEN_C:
            mask = c_ok[None, :]
        if HAS_MASK:
            a = tl.load(x_ptrs + (r * sxh + s * sxw + c0 * sxc), mask=mask, other=0)
        else:
            a = tl.load(x_ptrs + (r * sxh + s * sxw + c0 * sxc))
        if EVEN_C:
            w = tl.load(w_ptrs_k)
        else:
            w = tl.load(w_ptrs_k, mask=c_ok[:, None], other=0)
        if A_MODE == 1:  # padding and channels past C are the real zero: q = 0, not round(-shift / scale)
            q = _quantize(a, scale, shift, -128.0, 127.0)
            if HAS_MASK:
                q = tl.where(mask, q, 0.0)
            a = q.to(tl.int8)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        if HAS_WZ:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
    if HAS_WZ:
        acc -= rowsum[:, None] * tl.load(wz_ptr + rn).to(tl.int32)[None, :]
    y = acc.to(tl.float32)
    if A_MODE == 1 or A_MODE == 3:
        y = y * scale
    else:
        y = y * tl.load(xs_ptr)
    y = y * tl.load(ws_ptr + rn)[None, :]
    if HAS_SHIFT:  # + shift * (sum of the taps inside the image): all taps, minus the outside ones on borders
        if HAS_BIAS:
            y = y + (shift * tl.load(wsum_ptr + rn) + tl.load(b_ptr + rn).to(tl.float32))[None, :]
        else:
            y = y + (shift * tl.load(wsum_ptr + rn))[None, :]
        if BORDER:
            on_border = (tl.min(hi0, axis=0) < 0) | (tl.max(hi0, axis=0) + KH > H) | \
                        (tl.min(wi0, axis=0) < 0) | (tl.max(wi0, axis=0) + KW > W)
            if on_border:
                for t in range(KH * KW):  # a loop, not unrolled: one tap's sums live at a time
                    hi = hi0 + t // KW
                    wi = wi0 + t % KW
                    out = (hi < 0) | (hi >= H) | (wi < 0) | (wi >= W)
                    wt = shift * tl.load(wtap_ptr + rn * (KH * KW) + t)
                    y = y - tl.where(out[:, None], wt[None, :], 0.0)
    elif HAS_BIAS:
        y = y + tl.load(b_ptr + rn).to(tl.float32)[None, :]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OFFS_64:
        y_off = (nb.to(tl.int64) * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw)[:, None] + \
            offs_n.to(tl.int64)[None, :] * syo
    else:
        y_off = (nb * syn + ho * syh + wo * syw)[:, None] + offs_n[None, :] * syo
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < O)
    if HAS_RES:  # the other half of a split input (same strides as y)
        y = y + tl.load(r_ptr + y_off, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=out_mask)


def conv2d(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, y: torch.Tensor, *,
           x_scale: torch.Tensor | None = None, qtable: torch.Tensor | None = None, step: torch.Tensor | None = None,
           w_zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, w_sum: torch.Tensor | None = None,
           w_tap: torch.Tensor | None = None, residual: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0, fuse_quant: bool = False) -> torch.Tensor:
    """One launch of :func:`_conv_kernel` into the preallocated NCHW ``y`` (any strides; ``residual`` must
    have ``y``'s). ``x`` NCHW: int8 with ``x_scale`` (a one-element float32 tensor), or float with ``qtable``
    (static, shifted when ``w_sum``/``w_tap`` are given; quantized by :func:`quantize_table` first, or inside the
    conv's A load with ``fuse_quant``, as :func:`gemm`). ``w`` int8 ``(O, C, KH, KW)`` with channel stride 1."""
    nb, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    _, _, ho, wo = y.shape
    if w.stride(1) != 1:
        raise ValueError("conv weights must be laid out with contiguous input channels (channels_last)")
    mode = A_STATIC if x.is_floating_point() else A_CODES if qtable is not None else A_INT8
    if mode == A_STATIC and qtable is None:
        raise ValueError("a float input needs the quantizer table qtable")
    if mode == A_STATIC and not fuse_quant:
        x, mode = quantize_table(x, qtable, step), A_CODES
    dummy = w_scale
    has_shift = mode in (A_STATIC, A_CODES) and w_sum is not None
    if has_shift and padding > 0 and w_tap is None:
        raise ValueError("a shifted quantizer on a padded conv needs the per-tap weight sums w_tap")

    def grid(meta):
        return (triton.cdiv(nb * ho * wo, meta["BLOCK_M"]) * triton.cdiv(o, meta["BLOCK_N"]),)

    opt = lambda t: t if t is not None else dummy  # noqa: E731
    _conv_kernel[grid](x, w, y, opt(residual), opt(x_scale), opt(qtable), opt(step), w_scale, opt(w_zero),
                       opt(w_sum), opt(w_tap), opt(bias), nb, h, wd, c, o, ho, wo,
                       x.stride(0), x.stride(1), x.stride(2), x.stride(3), w.stride(0), w.stride(2), w.stride(3),
                       y.stride(0), y.stride(1), y.stride(2), y.stride(3),
                       KH=kh, KW=kw, STRIDE=stride, PAD=padding, A_MODE=mode, HAS_STEP=step is not None,
                       HAS_WZ=w_zero is not None, HAS_SHIFT=has_shift, HAS_BIAS=bias is not None,
                       HAS_RES=residual is not None, OFFS_64=_needs_64(x, w, y))
    return y
