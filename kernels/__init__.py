"""int8 kernels with two backends: Triton (GPU; on CPU under ``TRITON_INTERPRET=1``) and the pure-torch
reference that computes the same integers (the CPU backend and the test oracle). Imported as
``accel.kernels``.

``backend=None`` picks Triton for CUDA tensors and the reference otherwise; ``backend="triton"`` on CPU
tensors runs the Triton kernels in the interpreter (slow: that is how CI tests them).
"""
from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("reference", "triton")


def choose(device: torch.device | str, backend: str | None = None) -> str:
    if backend is None:
        return "triton" if torch.device(device).type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def triton_module():
    """The Triton kernels; on a machine without CUDA they run in Triton's interpreter, which must have been
    switched on before triton was first imported (``import accel`` does it when it is first)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        if isinstance(tl.zeros, JITFunction) and not hasattr(tl.zeros, "interpreted"):
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(tl.zeros, InterpretedFunction):
                raise RuntimeError("backend='triton' without a GPU needs Triton's interpreter, which must be on "
                                   "before triton is imported: run with TRITON_INTERPRET=1 in the environment "
                                   "(or import accel before torch/diffusers)")
    from . import triton_kernels

    return triton_kernels


def quantize_per_token(x, backend=None):
    """Dynamic symmetric per-row int8 quantization: ``(q, scale)``."""
    if choose(x.device, backend) == "triton":
        return triton_module().quantize_per_token(x)
    q, s = reference.quantize_per_token(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s


def quantize_static(x, scale, zero_point=0, backend=None):
    if choose(x.device, backend) == "triton":
        return triton_module().quantize_static(x, scale, zero_point)
    return reference.quantize_static(x, scale, zero_point)


def w8a8_gemm(a, w, a_scale, w_scale, bias=None, a_zero=0, w_zero=None, out_dtype=torch.float32, backend=None):
    """int8 ``a (M, K)`` x int8 ``w (N, K)`` with the float epilogue (see :mod:`.reference`)."""
    if choose(a.device, backend) == "triton":
        return triton_module().w8a8_gemm(a, w, a_scale, w_scale, bias, a_zero, w_zero, out_dtype)
    return reference.w8a8_gemm(a, w, a_scale, w_scale, bias, a_zero, w_zero, out_dtype)


def w8a8_linear(x, w, w_scale, bias=None, w_zero=None, backend=None):
    """Float ``x (..., K)``, quantized per token (fused in the Triton kernel), times int8 weights."""
    if choose(x.device, backend) == "triton":
        shape = x.shape
        y, _ = triton_module().w8a8_gemm(x.reshape(-1, shape[-1]), w, None, w_scale, bias, 0, w_zero, x.dtype)
        return y.reshape(*shape[:-1], w.shape[0])
    return reference.w8a8_linear(x, w, w_scale, bias, w_zero)


def w8a8_conv2d(x_q, w_q, x_scale, w_scale, bias=None, stride=1, padding=0, w_zero=None, out_dtype=torch.float32,
                backend=None):
    """int8 NCHW ``x_q`` and ``w_q (O, C, KH, KW)`` -> NCHW; on Triton an implicit-GEMM kernel over NHWC."""
    if choose(x_q.device, backend) == "triton":
        y = triton_module().w8a8_conv2d_nhwc(x_q.permute(0, 2, 3, 1).contiguous(), w_q.permute(0, 2, 3, 1).contiguous(),
                                             x_scale, w_scale, bias, stride, padding, w_zero, out_dtype)
        return y.permute(0, 3, 1, 2)
    return reference.w8a8_conv2d(x_q, w_q, x_scale, w_scale, bias, stride, padding, w_zero, out_dtype)
