"""What an eager quantized layer call costs the host, beside ``nn.Linear`` / ``nn.Conv2d``: the Triton kernels are
stubbed (they return an output of the right shape at once), so what is timed is the Python around them: the
module call, the per-call table and step, the custom op's dispatcher (or the direct call accel makes in eager
inference, :func:`accel.kernels.direct`) and the launch wrapper. Runs on a CPU (one thread); on a GPU the stub is the
same, so the figure is the host's alone there too (a real Triton launch adds its own ~10-20 µs per kernel).

    OMP_NUM_THREADS=1 python scripts/host_overhead.py [--calls N]

Prints microseconds per call (median of 5 runs of N calls). The float layers run their real (tiny) kernels, so
their figure is an upper bound of their host cost.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the kernel module loads in the interpreter (never launched)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import accel  # noqa: E402
from accel import kernels  # noqa: E402
from accel.transforms.quantize import QConv2d, QLinear, QuantizedLayers  # noqa: E402


def stub_kernels():
    tk = kernels.triton_module()
    tk.gemm = lambda a, w, w_scale, **kw: (torch.empty(a.shape[0], w.shape[0], dtype=a.dtype),)
    tk.conv2d = lambda x, w, w_scale, y, **kw: y


def per_call_us(fn, calls):
    for _ in range(min(200, calls)):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def layers():
    """A static quantized Linear and 3x3 conv on the Triton backend (two UNet calls of tables), and their floats."""
    owner = QuantizedLayers(accel.Quantize(mode="static", backend="triton"))
    lin, conv = nn.Linear(64, 64), nn.Conv2d(16, 16, 3, padding=1)
    ql, qc = QLinear(owner, "lin", lin), QConv2d(owner, "conv", conv, None)
    for q in (ql, qc):
        q.act_scales, q.act_shifts = torch.full((2, 1), 0.02), torch.zeros(2, 1)
    owner._modules = {"lin": ql, "conv": qc}
    owner._tables_ready()
    return lin, conv, ql, qc


def measure(calls: int = 2000) -> dict:
    torch.set_num_threads(1)
    stub_kernels()
    lin, conv, ql, qc = layers()
    x, xc = torch.randn(2, 16, 64), torch.randn(1, 16, 8, 8)
    out = {}
    with torch.no_grad():
        out["nn.Linear"], out["nn.Conv2d"] = per_call_us(lambda: lin(x), calls), per_call_us(lambda: conv(xc), calls)
        out["QLinear"], out["QConv2d"] = per_call_us(lambda: ql(x), calls), per_call_us(lambda: qc(xc), calls)
        direct, kernels.direct = kernels.direct, lambda: False  # through torch.ops.accel.* (as before the direct path)
        try:
            out["QLinear via the op"] = per_call_us(lambda: ql(x), calls)
            out["QConv2d via the op"] = per_call_us(lambda: qc(xc), calls)
        finally:
            kernels.direct = direct
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    for name, us in measure(p.parse_args().calls).items():
        print(f"{name:22s} {us:7.1f} µs per call")
