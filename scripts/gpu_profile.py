"""W8A8 on a GPU: where the time goes. torch.profiler of a 10-step SD 1.5 pipeline call, fp16 vs W8A8 (GPU kernel
time per kernel), and per layer eager vs CUDA-graph replay (host launch overhead vs GPU time).

``python scripts/gpu_profile.py [--fused]`` on a CUDA machine (see accel/bench/gpu.py for the set-up); ``--fused``
quantizes inside the kernels' A load (the Triton entry points' ``fuse_quant=True``, handed to every launch of this
run: the quantized layers' ops do not take it), as every static layer did when this ran on an H200 on
2026-11-26 (the README's "W8A8 on a GPU"). On a CPU it runs a tiny UNet with the reference backend and prints no GPU
times (a test does, so the script keeps working)."""
import functools, sys, time, traceback
import torch
import torch.nn.functional as F
import accel
from accel import kernels as _kernels
from accel.bench import gpu as bg, models
from accel.calibrate import calibrate

if "--fused" in sys.argv[1:]:
    _tk = _kernels.triton_module()
    _tk.gemm, _tk.conv2d = (functools.partial(_tk.gemm, fuse_quant=True),
                            functools.partial(_tk.conv2d, fuse_quant=True))
dev = "cuda" if torch.cuda.is_available() else "cpu"
small = dev == "cpu"
dt = torch.float16 if dev == "cuda" else torch.float32
model = models.Model("tiny", "sd", models.TINY_SD, (16,), 64) if small else bg.gpu_plan(("sd15",)).models[0]
plan = bg.dry_plan() if small else bg.gpu_plan(("sd15",))
plan.repeats, plan.inner = (1, 1) if small else (5, 20)
T0 = time.time()
def log(*a):
    print(f"[{time.time() - T0:5.0f} s]", *a, flush=True)

pipe = models.build_pipeline(model, dev, dt)
STEPS = 10
kw = dict(prompt="a red circle on a blue square", num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
          height=model.pixels, width=model.pixels)

def call():
    with torch.no_grad():
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    if dev == "cuda":
        torch.cuda.synchronize()

def profile(name):
    from torch.profiler import ProfilerActivity, profile as prof
    call(); call()
    t = time.perf_counter(); call(); wall = time.perf_counter() - t
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with prof(activities=acts) as p:
        call()
    ka = p.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ka) / 1e6
    log(f"{name}: wall {wall:.3f} s per {STEPS}-step call ({2 * STEPS if True else 0} UNet rows batch 2); "
        f"GPU kernel time (profiled call) {gpu:.3f} s")
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            print(ka.table(sort_by=key, row_limit=14, max_name_column_width=70), flush=True)
            break
        except Exception as e:  # noqa: BLE001
            print("sort", key, "failed:", e)
    for e in ka:
        if e.key.startswith("accel::") or "gemm" in e.key or "conv" in e.key.lower():
            print(f"  {e.key[:60]:60s} calls {e.count:6d}  cpu avg {e.cpu_time_total / max(e.count, 1):8.1f} us  "
                  f"gpu self total {(getattr(e, 'self_device_time_total', 0) or 0) / 1e3:8.1f} ms")

def part(name, fn):
    try:
        fn()
    except Exception:  # noqa: BLE001
        log(f"{name} FAILED"); traceback.print_exc()

part("fp16 profile", lambda: profile("fp16"))
state = {}
def quantize():
    t = time.perf_counter()
    cal = calibrate(pipe, "w8a8", [kw["prompt"]], steps=STEPS, batch_size=1, guidance=7.5, refine=False, progress=False)
    log(f"w8a8 calibration {time.perf_counter() - t:.1f} s")
    state["h"] = accel.apply(pipe, "w8a8", calibration=cal)
    t = time.perf_counter(); call(); log(f"w8a8 first call (autotune) {time.perf_counter() - t:.1f} s")
part("quantize", quantize)
if "h" in state:
    part("w8a8 profile", lambda: profile("w8a8"))
    # the autotuner's choice per key
    try:
        from accel.kernels import triton_kernels as tk
        for kern in ("_gemm_kernel", "_conv_kernel"):
            at = getattr(tk, kern, None)
            cache = getattr(at, "cache", {}) or {}
            log(f"{kern}: {len(cache)} tuned keys")
            for k, cfg in list(cache.items())[:40]:
                print("   ", k, cfg, flush=True)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    state["h"].remove()

# per layer: eager vs CUDA graph replay
from accel import kernels
def graph_time(fn):
    """Seconds per call replayed from a CUDA graph (accel.bench.gpu.graph_time; NaN off CUDA)."""
    t = bg.graph_time(fn, plan)
    return float("nan") if t is None else t

def layers():
    counts = bg.layer_shapes(model, pipe)
    ordered = sorted(counts.items(), key=lambda kv: -kv[0].macs * kv[1])
    pick = ordered[:10] + [kv for kv in ordered if kv[0].kind == "linear" and kv[1] >= 30][:2]
    print("| layer | n | fp16 eager us | fp16 graph us | W8A8 eager us | W8A8 graph us | int_mm graph us |", flush=True)
    g = torch.Generator().manual_seed(1)
    step = torch.zeros(1, dtype=torch.int32, device=dev)
    for s, n in pick:
        x = bg._skewed(s.x, dt, dev, g)
        if s.kind == "linear":
            w, ws, wz, _, wsum = bg.int8_layer(s.out, s.x[1], None, dev)
            wf, b = torch.randn(s.out, s.x[1], generator=g).to(dev, dt) / 30, torch.zeros(s.out, device=dev, dtype=dt)
            qt = bg._table(x)
            f8 = lambda: kernels.linear(x, w, ws, wz, b, wsum, qt, step, plan.backend)
            ff = lambda: F.linear(x, wf, b)
            a8, wt = torch.randint(-127, 128, s.x, dtype=torch.int8, device=dev), w.t()
            fi = (lambda: torch._int_mm(a8, wt)) if dev == "cuda" and s.x[0] > 16 else None
        else:
            x = x.contiguous(memory_format=torch.channels_last)
            w, ws, wz, tap, wsum = bg.int8_layer(s.out, s.x[1], s.k, dev)
            wf = (torch.randn(s.out, s.x[1], s.k, s.k, generator=g) / 30).to(dev, dt).contiguous(memory_format=torch.channels_last)
            b = torch.zeros(s.out, device=dev, dtype=dt)
            qt = bg._table(x)
            f8 = lambda: kernels.conv2d(x, w, ws, qt, wz, b, wsum, tap, step, None, s.stride, s.padding, plan.backend)
            ff = lambda: F.conv2d(x, wf, b, s.stride, s.padding)
            fi = None
        r = [bg.timeit(ff, plan), graph_time(ff), bg.timeit(f8, plan), graph_time(f8),
             graph_time(fi) if fi else float("nan")]
        print(f"| {s.label()} | {n} | " + " | ".join(f"{v * 1e6:.0f}" for v in r) + " |", flush=True)
part("layers", layers)
log("done")
