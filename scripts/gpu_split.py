"""Fused static W8A8 layer (float A quantized inside the GEMM/conv: the Triton entry points' ``fuse_quant=True``) vs
split (one elementwise quantize kernel, then the int8-A kernel), CUDA-graph replay times (GPU time, no host overhead),
on the SD 1.5 shapes the README quotes. ``python scripts/gpu_split.py`` on a CUDA machine (see accel/bench/gpu.py for
the set-up); on a CPU it runs tiny shapes in Triton's interpreter and prints no times (a test does, so the script
keeps working).
It ran on an H200 on 2026-11-26 (the README's "W8A8 on a GPU")."""
import time, traceback
import torch, torch.nn.functional as F
import accel  # noqa: F401 -- before triton: Triton's interpreter on a machine without CUDA
import triton
from accel import kernels
from accel.bench import gpu as bg
tk = kernels.triton_module()
cuda = torch.cuda.is_available()
dev, dt = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
T0 = time.time()
SHAPES = [("conv", (2, 320, 64, 64), 320, 3, 1), ("conv", (2, 1280, 16, 16), 1280, 3, 1),
          ("conv", (2, 640, 32, 32), 640, 3, 1), ("conv", (2, 320, 64, 64), 320, 1, 0),
          ("linear", (8192, 320), 2560, 1, 0), ("linear", (8192, 320), 320, 1, 0)]
if not cuda:
    SHAPES = [("conv", (2, 24, 6, 6), 32, 3, 1), ("linear", (40, 24), 32, 1, 0)]

plan = bg.gpu_plan(()) if cuda else bg.dry_plan()  # graph timings: median of plan.repeats (5 on CUDA)


def gt(fn):
    """Microseconds per call of ``fn`` replayed from a CUDA graph (accel.bench.gpu.graph_time); on a CPU ``fn`` runs once
    (the kernels in the interpreter) and the time is NaN."""
    if not cuda:
        fn(); return float("nan")
    t = bg.graph_time(fn, plan)
    return float("nan") if t is None else t * 1e6

g = torch.Generator().manual_seed(0)
print("| layer | fp16 us | fused W8A8 us | quantize us | int8-A kernel us | split total us | int_mm us | split == fused |", flush=True)
for kind, xs, o, k, pad in SHAPES:
    try:
        x = bg._skewed(xs, dt, dev, g)
        qt = bg._table(x)
        qp = torch.stack([qt[0, 0], qt[0, 1], torch.zeros((), device=dev)]).float().contiguous()
        step = torch.zeros(1, dtype=torch.int32, device=dev)
        if kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
            w, ws, wz, tap, wsum = bg.int8_layer(o, xs[1], k, dev)
            wf = (torch.randn(o, xs[1], k, k, generator=g) / 30).to(dev, dt).contiguous(memory_format=torch.channels_last)
            b = torch.zeros(o, device=dev, dtype=dt)
            y = torch.empty(kernels.ops.conv_out_shape(x, w, 1, pad), dtype=dt, device=dev, memory_format=torch.channels_last)
            xnhwc = x.permute(0, 2, 3, 1)
            q = torch.empty(xnhwc.shape, dtype=torch.int8, device=dev)
            qv = q.permute(0, 3, 1, 2)
            xs1 = qt[0, 0].reshape(1).float().contiguous()
            # the op's launch (kernels.conv2d: a fresh channels_last output), asked for the fused kernel
            fused = lambda: tk.conv2d(x, w, ws, torch.empty_like(y), qtable=qt, step=step, w_zero=wz, bias=b, stride=1,
                                      padding=pad, fuse_quant=True)
            quant = lambda: tk._quant_static_kernel[(triton.cdiv(q.numel(), 1024 if cuda else 256),)](xnhwc, q, qp, q.numel(), BLOCK=1024 if cuda else 256)
            int8k = lambda: tk.conv2d(qv, w, ws, y, x_scale=xs1, w_zero=wz, bias=b, stride=1, padding=pad)
            ff = lambda: F.conv2d(x, wf, b, 1, pad)
            fi = None
        else:
            w, ws, wz, _, wsum = bg.int8_layer(o, xs[1], None, dev)
            wf, b = torch.randn(o, xs[1], generator=g).to(dev, dt) / 30, torch.zeros(o, device=dev, dtype=dt)
            q = torch.empty(xs, dtype=torch.int8, device=dev)
            sa = qt[0, 0].reshape(1).float().contiguous()
            fused = lambda: tk.gemm(x, w, ws, qtable=qt, step=step, w_zero=wz, bias=b, fuse_quant=True)[0]  # the op's launch
            quant = lambda: tk._quant_static_kernel[(triton.cdiv(q.numel(), 1024 if cuda else 256),)](x, q, qp, q.numel(), BLOCK=1024 if cuda else 256)
            int8k = lambda: tk.gemm(q, w, ws, a_scale=sa, w_zero=wz, bias=b, out_dtype=dt)[0]
            ff = lambda: F.linear(x, wf, b)
            a8, wt = torch.randint(-127, 128, xs, dtype=torch.int8, device=dev), w.t()
            fi = (lambda: torch._int_mm(a8, wt)) if cuda else None
        quant()
        yb = int8k()
        ys = (y if kind == "conv" else yb).float().clone()
        yf = fused().float()
        same = (ys - yf).abs().max().item() / yf.abs().max().clamp_min(1e-9).item()
        r = [gt(ff), gt(fused), gt(quant), gt(int8k)]
        r.append(r[2] + r[3])
        r.append(gt(fi) if fi else float("nan"))
        lab = f"{kind} {xs}->{o} k{k}"
        print(f"| {lab} | " + " | ".join(f"{v:.0f}" for v in r) + f" | {same:.1e} |", flush=True)
    except Exception:
        traceback.print_exc()
    print(f"[{time.time() - T0:.0f} s]", flush=True)
