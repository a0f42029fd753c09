"""The quantized layers' calls as ``torch.library`` custom ops: ``accel::linear`` and ``accel::conv2d``.

One op per quantized layer call (both backends: the Triton kernels and the torch reference), each with a fake
implementation, so ``torch.compile`` traces a quantized UNet as ordinary graph nodes: no graph break, no Python
float to specialise on (the per-call scales come from a device table indexed by a device step tensor).
Backward is the straight-through estimator of the activation rounding with frozen weights:
``dL/dx = dL/dy`` through the dequantized weight (what adapters such as LoRA trained on top need).

:data:`IMPLS` maps each op to its plain Python implementation (a dispatch-mode test can step inside the op).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backend import triton_module as _triton


def conv_out_format(x: Tensor, backend: str) -> torch.memory_format:
    """The memory format a conv op returns: channels_last from the Triton kernel (its tiles are NHWC rows:
    coalesced stores, and the next layer reads contiguous channels), else the input's."""
    if backend == "triton":
        return torch.channels_last
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_out_shape(x: Tensor, w: Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    return n, o, (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1


# ----------------------------------------------------------------------------------- linear
def linear_impl(x: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
                w_sum: Optional[Tensor], qtable: Optional[Tensor], step: Optional[Tensor], backend: str) -> Tensor:
    if backend == "triton":
        return _triton().gemm(x, w, w_scale, qtable=qtable, step=step, w_zero=w_zero, bias=bias, w_sum=w_sum)[0]
    if qtable is None:
        return reference.w8a8_linear(x, w, w_scale, bias, w_zero)
    return reference.w8a8_linear_static(x, w, w_scale, w_zero, bias, w_sum, qtable, step)


@torch.library.custom_op("accel::linear", mutates_args=())
def linear(x: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
           w_sum: Optional[Tensor], qtable: Optional[Tensor], step: Optional[Tensor], backend: str) -> Tensor:
    """W8A8 ``x (M, K) -> (M, N)`` in ``x.dtype``: static (``qtable (T, 2)`` of (scale, shift) per call, row
    ``step``; ``w_sum`` adds the shift back) or, without a table, dynamic per-token quantization."""
    return linear_impl(x, w, w_scale, w_zero, bias, w_sum, qtable, step, backend)


@linear.register_fake
def _(x, w, w_scale, w_zero, bias, w_sum, qtable, step, backend):
    return x.new_empty((x.shape[0], w.shape[0]))


def _dequantized(w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor]) -> Tensor:
    shape = (-1,) + (1,) * (w.dim() - 1)
    wf = w.float()
    if w_zero is not None:
        wf = wf - w_zero.float().view(shape)
    return wf * w_scale.float().view(shape)


def _save_weights(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


def _linear_backward(ctx, grad):
    w, w_scale, w_zero = ctx.saved_tensors
    gx = grad @ _dequantized(w, w_scale, w_zero).to(grad.dtype) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_save_weights)


# ----------------------------------------------------------------------------------- conv2d
def _conv(x: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
          w_sum: Optional[Tensor], w_tap: Optional[Tensor], qtable: Tensor, step: Optional[Tensor],
          residual: Optional[Tensor], stride: int, padding: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    """Both conv ops: ``x`` float (quantized with the table row) or int8 codes; Triton writes into the output it is
    given, the reference's result is laid out as Triton's would be."""
    if backend == "triton":
        y = torch.empty_like(residual) if residual is not None else \
            torch.empty(conv_out_shape(x, w, stride, padding), dtype=out_dtype, device=x.device,
                        memory_format=conv_out_format(x, backend))
        return _triton().conv2d(x, w, w_scale, y, qtable=qtable, step=step, w_zero=w_zero, bias=bias, w_sum=w_sum,
                                w_tap=w_tap, residual=residual, stride=stride, padding=padding)
    if x.is_floating_point():  # (out_dtype is x.dtype)
        y = reference.w8a8_conv2d_static(x, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride,
                                         padding)
    else:
        y = reference.w8a8_conv2d_codes(x, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride,
                                        padding, out_dtype)
    if residual is not None:
        return torch.empty_like(residual).copy_(y)
    return y.contiguous(memory_format=conv_out_format(x, backend))


def conv2d_impl(x: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
                w_sum: Optional[Tensor], w_tap: Optional[Tensor], qtable: Tensor, step: Optional[Tensor],
                residual: Optional[Tensor], stride: int, padding: int, backend: str) -> Tensor:
    return _conv(x, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding, x.dtype, backend)


@torch.library.custom_op("accel::conv2d", mutates_args=())
def conv2d(x: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
           w_sum: Optional[Tensor], w_tap: Optional[Tensor], qtable: Tensor, step: Optional[Tensor],
           residual: Optional[Tensor], stride: int, padding: int, backend: str) -> Tensor:
    """W8A8 zero-padded conv of a float NCHW ``x`` (quantized with row ``step`` of ``qtable``) by int8 ``w``
    (channels_last ``(O, C, KH, KW)``), plus ``residual`` if given; ``x.dtype`` out, see :func:`conv_out_format`."""
    return conv2d_impl(x, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding, backend)


@conv2d.register_fake
def _(x, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding, backend):
    if residual is not None:
        return torch.empty_like(residual)
    return torch.empty(conv_out_shape(x, w, stride, padding), dtype=x.dtype, device=x.device,
                       memory_format=conv_out_format(x, backend))


def _save_conv(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])
    ctx.x_shape, ctx.stride, ctx.padding = inputs[0].shape, inputs[10], inputs[11]


def _conv_backward(ctx, grad):
    w, w_scale, w_zero = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.nn.grad.conv2d_input(ctx.x_shape, _dequantized(w, w_scale, w_zero).to(grad.dtype), grad,
                                        stride=ctx.stride, padding=ctx.padding)
    gr = grad if ctx.needs_input_grad[9] else None
    return gx, None, None, None, None, None, None, None, None, gr, None, None, None


conv2d.register_autograd(_conv_backward, setup_context=_save_conv)

# ----------------------------------------------------------------------------------- on int8 codes
# What a compiled static layer calls: the activation's quantization is written as torch ops before it
# (:func:`quantize_codes`), which inductor fuses into the kernel that produces the activation (GroupNorm + SiLU,
# LayerNorm, the residual add), so the quantization costs no pass over memory of its own; the op gets the codes.
def quantize_codes(x: Tensor, qtable: Tensor, step: Optional[Tensor]) -> Tensor:
    """The static quantizer's int8 codes of ``x`` in torch ops (row ``step`` of ``qtable``): the integers of the
    ops' own quantization (:func:`reference.quantize_static`), the layout of ``x``."""
    s, m = reference.table_row(qtable, step)
    return reference.quantize_static(x, s, 0, m)


def linear_codes_impl(q: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
                      w_sum: Optional[Tensor], qtable: Tensor, step: Optional[Tensor], out_dtype: torch.dtype,
                      backend: str) -> Tensor:
    if backend == "triton":
        return _triton().gemm(q, w, w_scale, qtable=qtable, step=step, w_zero=w_zero, bias=bias, w_sum=w_sum,
                              out_dtype=out_dtype)[0]
    return reference.w8a8_linear_codes(q, w, w_scale, w_zero, bias, w_sum, qtable, step, out_dtype)


@torch.library.custom_op("accel::linear_codes", mutates_args=())
def linear_codes(q: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
                 w_sum: Optional[Tensor], qtable: Tensor, step: Optional[Tensor], out_dtype: torch.dtype,
                 backend: str) -> Tensor:
    """:func:`linear` on the int8 codes ``q (M, K)`` of row ``step`` of ``qtable`` (inference: no gradient)."""
    return linear_codes_impl(q, w, w_scale, w_zero, bias, w_sum, qtable, step, out_dtype, backend)


@linear_codes.register_fake
def _(q, w, w_scale, w_zero, bias, w_sum, qtable, step, out_dtype, backend):
    return q.new_empty((q.shape[0], w.shape[0]), dtype=out_dtype)


def conv2d_codes_impl(q: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
                      w_sum: Optional[Tensor], w_tap: Optional[Tensor], qtable: Tensor, step: Optional[Tensor],
                      residual: Optional[Tensor], stride: int, padding: int, out_dtype: torch.dtype,
                      backend: str) -> Tensor:
    return _conv(q, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding, out_dtype, backend)


@torch.library.custom_op("accel::conv2d_codes", mutates_args=())
def conv2d_codes(q: Tensor, w: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], bias: Optional[Tensor],
                 w_sum: Optional[Tensor], w_tap: Optional[Tensor], qtable: Tensor, step: Optional[Tensor],
                 residual: Optional[Tensor], stride: int, padding: int, out_dtype: torch.dtype,
                 backend: str) -> Tensor:
    """:func:`conv2d` on the int8 NCHW codes ``q`` of row ``step`` of ``qtable`` (inference: no gradient)."""
    return conv2d_codes_impl(q, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding,
                             out_dtype, backend)


@conv2d_codes.register_fake
def _(q, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding, out_dtype, backend):
    if residual is not None:
        return torch.empty_like(residual)
    return torch.empty(conv_out_shape(q, w, stride, padding), dtype=out_dtype, device=q.device,
                       memory_format=conv_out_format(q, backend))


IMPLS = {torch.ops.accel.linear.default: linear_impl, torch.ops.accel.conv2d.default: conv2d_impl,
         torch.ops.accel.linear_codes.default: linear_codes_impl, torch.ops.accel.conv2d_codes.default: conv2d_codes_impl}


# ----------------------------------------------------------------------------------- FLOP counting
def _register_flop_formulas():
    """``torch.utils.flop_counter.FlopCounterMode`` counts a quantized layer's multiply-adds as it counts the float
    layer's (2 per MAC): FLOP-ideal speedups of compositions with W8A8 (``accel bench``) stay comparable."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.accel.linear)
    def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]

    @register_flop_formula(torch.ops.accel.conv2d)
    def _conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * math.prod(w_shape[1:])

    register_flop_formula(torch.ops.accel.linear_codes)(_linear_flops)
    register_flop_formula(torch.ops.accel.conv2d_codes)(_conv_flops)


_register_flop_formulas()
