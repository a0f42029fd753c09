"""float8 (e4m3) W8A8 GEMMs: ``Quantize(dtype="fp8")``'s Linear layers and 1x1 convs, as one custom op per call.

Numerics (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, largest finite value 448, no infinities):

* weights: per output channel, ``s_w = amax / 448`` (no clip search: a float format keeps relative precision
  over its whole range, so clipping the largest weights buys nothing), ``W ~ s_w * q_w`` with ``q_w`` float8;
* activations, static (a calibration): per tensor and per UNet call, from the *same* artifact the int8 path
  reads. The calibration stores the int8 scale of each call's range, ``s8 = r / 127`` (``r``: the half-width
  of the range around its centre ``m``); the float8 scale of that range is ``s = s8 * 127 / 448`` (the range's
  edge on 448, the largest code). ``x = m + s q``, ``q = fp8((x - m) / s)``, and the shift's product ``m W 1`` is
  added back per output channel (``w_sum``: the dequantized weight summed over inputs, computed once), exactly
  as the int8 path does. Values beyond the calibrated range saturate at +-448 (the cast itself would make NaN
  on some devices: the clamp comes first);
* activations, dynamic (no calibration): symmetric per token (a GEMM row: a Linear's token, a 1x1 conv's
  pixel), ``s = amax / 448`` computed on the device;
* the GEMM: ``y = (q_a @ q_w.T) * s_a * s_w + (bias + m w_sum)`` (+ ``residual``, the other half of a split
  input), accumulated in float32, out in ``x.dtype``.

Backends of :func:`fp8_linear` (``accel::fp8_linear``):

* ``"scaled_mm"``: ``torch._scaled_mm`` (cuBLASLt float8 tensor cores; compute capability 8.9+: Ada, Hopper,
  Blackwell). ``a`` row-major ``(M, K)`` float8, ``b = w.t()`` column-major ``(K, N)`` (the weight is stored
  ``(N, K)`` row-major, so the transpose is free), ``K`` and ``N`` multiples of 16 (layers that are not, e.g.
  4-channel latents, take the reference on the device), tensorwise scales (float32 one-element tensors:
  ``scale_a`` the static activation scale or 1, ``scale_b`` 1), ``out_dtype=float32``, ``use_fast_accum=False``
  (Hopper's fast accumulation drops precision); the per-channel weight scale, per-token activation scale, bias,
  shift term and residual are one fused elementwise epilogue. Tensorwise scaling is what every fp8-capable
  device supports with a float32 output (rowwise scaling needs sm_90 and a bfloat16 output).
* ``"reference"``: the exact emulation, the CPU backend and the oracle: the same float8 codes
  (``x.to(torch.float8_e4m3fn)``), converted to float32 (exact), a float32 matmul, the same epilogue.

k x k convs are *not* here: ``Quantize(dtype="fp8")`` keeps them int8 (the Triton implicit-GEMM kernel and its
reference, :mod:`.ops`). cuBLASLt has no convolution and torch exposes no float8 conv; an im2col in front of
``_scaled_mm`` writes the activation ``kh * kw`` times to memory (9x for a 3x3), which loses to the int8
implicit GEMM that reads it in place; an fp16 conv of float8-valued operands is fp8's accuracy at fp16's speed
and weight memory (or a weight cast per call). A float8 implicit GEMM is a new Triton kernel: not this module.

The quantization of the activation runs inside the op (as the int8 ops do), so the op is differentiable in
``x`` with the straight-through estimator (``dL/dx = dL/dy @ W_deq``, frozen weights).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from . import reference

DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # torch.finfo(torch.float8_e4m3fn).max
INT8_TO_FP8 = 127.0 / FP8_MAX  # a calibrated int8 scale (range / 127) -> the float8 scale of the same range
BACKENDS = ("reference", "scaled_mm")
MIN_CAPABILITY = (8, 9)


# ----------------------------------------------------------------------------------- device, backend
def check_device(device: torch.device | str) -> None:
    """Raise a one-line ``ValueError`` on a CUDA device without float8 tensor cores (before sm_89)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise InputError(f"Quantize(dtype='fp8') needs float8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                         f"Blackwell); {torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}: use "
                         "Quantize(dtype='int8') (the default)")


def choose(device: torch.device | str, backend: str | None = None) -> str:
    """``"scaled_mm"`` on CUDA, ``"reference"`` elsewhere or when asked for (``backend="reference"``)."""
    if backend == "reference" or torch.device(device).type != "cuda":
        return "reference"
    return "scaled_mm"


# ----------------------------------------------------------------------------------- quantization
def to_fp8(x: Tensor) -> Tensor:
    """Saturating round-to-nearest-even float8 e4m3 codes of a float tensor."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(DTYPE)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel float8 of an ``(O, ...)`` weight: ``(q float8 (O, K) row-major, scale float32 (O,))``
    with ``K`` the product of the other dims (a 1x1 conv's ``(O, C, 1, 1)`` is ``(O, C)``)."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    amax = flat.abs().amax(1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return to_fp8(flat / s[:, None]).contiguous(), s


def weight_sum(q: Tensor, s: Tensor) -> Tensor:
    """``(O,)``: the dequantized weight summed over its inputs (``W 1``, what a shift ``m`` of the input adds)."""
    return (q.double().sum(1) * s.double()).float()


def quantize_part(w: Tensor):
    """``(q, scale, zero, tap, total)`` of one input part, as ``_QBase`` stores them (``zero``, ``tap``: None)."""
    q, s = quantize_weight(w)
    return q, s, None, None, weight_sum(q, s)


def fp8_table(int8_table: Tensor) -> Tensor:
    """A per-call ``(T, 2)`` table of ``(int8 scale, shift)`` rows -> ``(float8 scale, shift)`` of the same ranges."""
    return int8_table * torch.tensor([INT8_TO_FP8, 1.0], dtype=int8_table.dtype, device=int8_table.device)


def quantize_activation(x: Tensor, qtable: Optional[Tensor], step: Optional[Tensor]):
    """``(q float8 (M, K), scale, shift)`` of a float ``(M, K)``: static with row ``step`` of ``qtable`` (0-d scale
    and shift), else dynamic per token (``scale (M, 1)``, shift None)."""
    x = x.float()
    if qtable is None:
        amax = x.abs().amax(1, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return to_fp8(x / s), s, None
    s, m = reference.table_row(qtable, step)
    return to_fp8((x - m) / s), s, m


# ----------------------------------------------------------------------------------- the GEMM
def _epilogue_bias(bias: Optional[Tensor], w_sum: Optional[Tensor], m: Optional[Tensor]) -> Optional[Tensor]:
    b = None if bias is None else bias.float()
    if w_sum is not None and m is not None:
        b = m * w_sum if b is None else m * w_sum + b
    return b


def _scaled_mm_ok(q: Tensor, w: Tensor) -> bool:
    return q.is_cuda and q.shape[1] % 16 == 0 and w.shape[0] % 16 == 0 and q.shape[0] > 0


def fp8_linear_impl(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor], w_sum: Optional[Tensor],
                    qtable: Optional[Tensor], step: Optional[Tensor], residual: Optional[Tensor],
                    backend: str) -> Tensor:
    k, n = x.shape[-1], w.shape[0]
    lead = x.shape[:-1]
    q, s, m = quantize_activation(x.reshape(-1, k), qtable, step)
    static = qtable is not None
    if backend == "scaled_mm" and (_scaled_mm_ok(q, w) or not q.is_cuda):
        one = w_scale.new_ones(1)
        acc = torch._scaled_mm(q.contiguous(), w.t(), scale_a=s.reshape(1) if static else one, scale_b=one,
                               out_dtype=torch.float32, use_fast_accum=False)
        y = acc * w_scale[None, :] if static else acc * (s * w_scale[None, :])
    else:  # the reference: the float8 values are exact in float32
        acc = q.float() @ w.float().t()
        y = acc * (s * w_scale[None, :])
    b = _epilogue_bias(bias, w_sum, m)
    if b is not None:
        y = y + b
    if residual is not None:
        y = y + residual.reshape(-1, n).float()
    return y.to(x.dtype).reshape(*lead, n)


@torch.library.custom_op("accel::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor], w_sum: Optional[Tensor],
               qtable: Optional[Tensor], step: Optional[Tensor], residual: Optional[Tensor], backend: str) -> Tensor:
    """float8 W8A8 ``x (..., K) -> (..., N)`` in ``x.dtype`` (contiguous) by float8 ``w (N, K)``: static with the
    ``(T, 2)`` table of (float8 scale, shift) per call at row ``step`` (``w_sum`` adds the shift back), else
    dynamic per token; ``residual (..., N)`` added in float32 before the cast."""
    return fp8_linear_impl(x, w, w_scale, bias, w_sum, qtable, step, residual, backend)


@fp8_linear.register_fake
def _(x, w, w_scale, bias, w_sum, qtable, step, residual, backend):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _save(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, grad):
    w, w_scale = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = grad @ (w.float() * w_scale.float()[:, None]).to(grad.dtype)
    gr = grad if ctx.needs_input_grad[7] else None
    return gx, None, None, None, None, None, None, gr, None


fp8_linear.register_autograd(_backward, setup_context=_save)


def _register_flop_formula():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.accel.fp8_linear)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


_register_flop_formula()


# ----------------------------------------------------------------------------------- what a layer calls
def linear(x, w, w_scale, bias=None, w_sum=None, qtable=None, step=None, residual=None, backend=None):
    """A float8 Linear on float ``x (..., K)``: one ``accel::fp8_linear`` op."""
    return torch.ops.accel.fp8_linear(x, w, w_scale, bias, w_sum, qtable, step, residual, choose(x.device, backend))


def pixels(x: Tensor) -> Tensor:
    """NCHW -> ``(N, H, W, C)``: a view for a channels_last ``x`` (what a 1x1 conv's GEMM reads, no copy)."""
    return x.permute(0, 2, 3, 1)


def unpixels(y: Tensor) -> Tensor:
    """``(N, H, W, O)`` -> NCHW channels_last (a view)."""
    return y.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------- independent oracle
def emulate_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, scale: float | None = None,
                   shift: float = 0.0) -> Tensor:
    """Straight from the definition, in float64, for tests: float8 round trips of the per-channel scaled float
    weight and of the (shifted, scaled) activation, then the float product. ``scale`` None: per token."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double().reshape(w.shape[0], -1)
    sw = w64.abs().amax(1, keepdim=True) / FP8_MAX
    wq = (w64 / sw).clamp(-FP8_MAX, FP8_MAX).to(DTYPE).double() * sw
    if scale is None:
        sa = x64.abs().amax(1, keepdim=True) / FP8_MAX
        xq = (x64 / sa).clamp(-FP8_MAX, FP8_MAX).to(DTYPE).double() * sa
    else:
        xq = ((x64 - shift) / scale).clamp(-FP8_MAX, FP8_MAX).to(DTYPE).double() * scale + shift
    y = xq @ wq.T
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def gemm_layer(m: torch.nn.Module) -> bool:
    """Whether ``dtype="fp8"`` makes ``m`` a float8 GEMM: a Linear, or a plain 1x1 conv (stride 1, no padding, one
    group: a GEMM over the pixels). Other convs stay int8 (see the module docstring)."""
    if isinstance(m, torch.nn.Linear):
        return True
    return (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and not isinstance(m.padding, str) and tuple(m.padding) == (0, 0) and m.groups == 1
            and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros")
