"""int8 kernels with two backends: Triton (GPU; on CPU under ``TRITON_INTERPRET=1``) and the pure-torch
reference that computes the same integers (the CPU backend and the test oracle). Imported as
``accel.kernels``.

``backend=None`` picks Triton for CUDA tensors and the reference otherwise; ``backend="triton"`` on CPU
tensors runs the Triton kernels in the interpreter (slow: that is how CI tests them).

:func:`linear` and :func:`conv2d` are what a quantized layer calls: one ``accel::linear`` / ``accel::conv2d``
custom op (:mod:`.ops`) each, static (a per-call ``(scale, shift)`` table and a device step index) or dynamic.
The other functions are the kernels' int8-level entry points (tests, benchmarks).
"""
from __future__ import annotations

import torch

from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode

from . import ops, reference
from .backend import BACKENDS, choose, triton_module

def quantize_per_token(x, backend=None):
    """Dynamic symmetric per-row int8 quantization: ``(q, scale)``."""
    if choose(x.device, backend) == "triton":
        return triton_module().quantize_per_token(x)
    q, s = reference.quantize_per_token(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s


def quantize_static(x, scale, zero_point=0, shift=0.0, backend=None):
    """``clamp(round((x - shift) / scale) + zero_point)`` as int8 (scale and shift: floats or 0-d tensors)."""
    if choose(x.device, backend) == "triton":
        qp = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(())
                          for v in (scale, shift, zero_point)])
        return triton_module().quantize_static(x, qp)
    return reference.quantize_static(x, scale, zero_point, shift)


def w8a8_gemm(a, w, a_scale, w_scale, bias=None, a_zero=0, w_zero=None, out_dtype=torch.float32, backend=None):
    """int8 ``a (M, K)`` x int8 ``w (N, K)`` with the float epilogue (see :mod:`.reference`)."""
    if choose(a.device, backend) == "triton":
        a_scale = torch.as_tensor(a_scale, dtype=torch.float32, device=a.device).reshape(-1)
        w_sum = w.sum(1, dtype=torch.int32) if a_zero else None
        return triton_module().gemm(a, w.contiguous(), w_scale.float(), a_scale=a_scale, w_zero=w_zero, bias=bias,
                                    w_sum=w_sum, a_zero=a_zero, out_dtype=out_dtype)[0]
    return reference.w8a8_gemm(a, w, a_scale, w_scale, bias, a_zero, w_zero, out_dtype)


def w8a8_linear(x, w, w_scale, bias=None, w_zero=None, backend=None):
    """Float ``x (..., K)``, quantized per token (fused in the Triton kernel), times int8 weights."""
    return linear(x, w, w_scale, w_zero, bias, backend=backend)


def w8a8_conv2d(x_q, w_q, x_scale, w_scale, bias=None, stride=1, padding=0, w_zero=None, out_dtype=torch.float32,
                backend=None):
    """int8 NCHW ``x_q`` and ``w_q (O, C, KH, KW)`` -> NCHW (channels_last from Triton: the implicit GEMM
    reads and writes NHWC rows through strides, no permute)."""
    if choose(x_q.device, backend) == "triton":
        w_cl = w_q.contiguous(memory_format=torch.channels_last)
        y = torch.empty(ops.conv_out_shape(x_q, w_q, stride, padding), dtype=out_dtype, device=x_q.device,
                        memory_format=torch.channels_last)
        xs = torch.as_tensor(x_scale, dtype=torch.float32, device=x_q.device).reshape(1)
        return triton_module().conv2d(x_q, w_cl, w_scale.float(), y, x_scale=xs, w_zero=w_zero, bias=bias,
                                      stride=stride, padding=padding)
    return reference.w8a8_conv2d(x_q, w_q, x_scale, w_scale, bias, stride, padding, w_zero, out_dtype)


# ----------------------------------------------------------------------------------- one op per layer
def direct() -> bool:
    """Whether a layer call may skip the custom-op dispatcher and call the op's implementation: eager inference
    (no gradient), not being traced by ``torch.compile``, no dispatch mode active (fake tensors, FLOP counting, op
    counts). The dispatcher costs the host about as much as the rest of the layer's Python (measured with the
    kernels stubbed: ``scripts/host_overhead.py``); everything that needs the op still sees it."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and _current_mode() is None


def in_graph() -> bool:
    """Whether a static layer call is being traced by ``torch.compile`` for inference: then its activation's
    quantization is written as torch ops before the op (:func:`.ops.quantize_codes`), which inductor fuses into
    the kernel that produces the activation, and the op gets the int8 codes (``accel::linear_codes`` /
    ``accel::conv2d_codes``). With gradients on, the op keeps its straight-through backward."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def linear(x, w, w_scale, w_zero=None, bias=None, w_sum=None, qtable=None, step=None, backend=None):
    """A quantized Linear on float ``x (..., K)``: the ``accel::linear`` op (static with ``qtable``, else
    dynamic per token); output in ``x.dtype``."""
    shape = x.shape
    x2, backend = x.reshape(-1, shape[-1]), choose(x.device, backend)
    if qtable is not None and in_graph():
        y = torch.ops.accel.linear_codes(ops.quantize_codes(x2, qtable, step), w, w_scale, w_zero, bias, w_sum,
                                         qtable, step, x.dtype, backend)
    else:
        y = (ops.linear_impl if direct() else torch.ops.accel.linear)(x2, w, w_scale, w_zero, bias, w_sum, qtable,
                                                                      step, backend)
    return y.reshape(*shape[:-1], w.shape[0])


def conv2d(x, w, w_scale, qtable, w_zero=None, bias=None, w_sum=None, w_tap=None, step=None, residual=None,
           stride=1, padding=0, backend=None):
    """A quantized zero-padded Conv2d on float NCHW ``x``: the ``accel::conv2d`` op (see :mod:`.ops`)."""
    backend = choose(x.device, backend)
    if in_graph():
        return torch.ops.accel.conv2d_codes(ops.quantize_codes(x, qtable, step), w, w_scale, w_zero, bias, w_sum,
                                            w_tap, qtable, step, residual, stride, padding, x.dtype, backend)
    op = ops.conv2d_impl if direct() else torch.ops.accel.conv2d
    return op(x, w, w_scale, w_zero, bias, w_sum, w_tap, qtable, step, residual, stride, padding, backend)
