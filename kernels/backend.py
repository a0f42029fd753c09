"""Which backend runs a kernel call, and the Triton kernels module itself (loaded once, on first use).

A leaf of ``accel.kernels``: the package and :mod:`.ops` both ask it, so neither imports the other for it.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "triton")


def choose(device: torch.device | str, backend: str | None = None) -> str:
    if backend is None:
        return "triton" if torch.device(device).type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


_TRITON = None


def triton_module():
    """The Triton kernels; on a machine without CUDA they run in Triton's interpreter, which must have been
    switched on before triton was first imported (``import accel`` does it when it is first). Checked once: a
    layer call asks for it every time."""
    global _TRITON
    if _TRITON is not None:
        return _TRITON
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

    _TRITON = triton_kernels
    return triton_kernels
