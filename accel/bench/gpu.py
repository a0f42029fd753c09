"""The GPU benchmark: ``accel bench --gpu --out docs/GPU_BENCHMARKS.md`` (``make bench-gpu``), one GPU, < 10 min.

Three sections, each a function below:

(a) :func:`kernel_checks`: every Triton kernel against the torch reference on the GPU: exact integers (unit scales,
    integer-valued inputs) and the float epilogue's largest difference.
(b) :func:`layer_throughput`: the int8 kernels on the real Linear/Conv2d shapes of the SD 1.5 UNet at 512 px and
    the SDXL UNet at 1024 px (batch 2: classifier-free guidance), recorded by hooks on one forward, each shape
    timed as a static W8A8 layer (quantize kernel + int8 GEMM/conv) against fp16 cuBLAS/cuDNN (``F.linear``,
    ``F.conv2d``, channels_last), eager and replayed from a CUDA graph (the GPU's time without the host's launch
    overhead), with the quantization fused into the kernel's A load (the Triton entry points' ``fuse_quant=True``;
    graph) and ``torch._int_mm`` (cuBLAS int8 GEMM alone, no quantization or epilogue; graph).
(c) :func:`end_to_end`: SD 1.5 and SDXL architectures (random weights, fp16, channels_last, one prompt with CFG,
    50 steps, 10 with ``--quick``): the rows of :func:`e2e_rows` (fp16, W8A8, W8A8 with ``select="speed"``, fp8,
    cache I=5, cachequant-w8a8's cache alone and cachequant-w8a8 (one calibration, made here with one prompt and
    the same step count), eager, compiled, replayed from CUDA graphs without inductor and with it; transformed
    UNets through :meth:`accel.Handle.compile`), seconds per image, speed-up, peak memory and the UNet's bytes on
    the device.

The pipelines are :mod:`accel.bench.models`' (the CPU report builds the same SD 1.5 architecture). The CPU report's
``--sections gpu`` table (:func:`section`, the W8A8 GEMM's TFLOP/s where CUDA exists) lives here too, with the GPU code.

Without CUDA the report is the one line "not run" (no CPU figure stands in for a GPU one). ``--dry-run`` runs the
same functions on CPU with tiny UNets, few steps and the reference backend (a test does; its numbers are CPU
numbers of tiny models and say so), so the GPU run is the code that CI exercised.

Running it on a machine that has PyTorch and Triton but not diffusers (this workplace's GPU machines; see
the device tool's README in the workplace's tool library): carry diffusers as a wheel and lay this checkout out as installed
(``pyproject.toml`` maps ``kernels/``, ``eval/``, ``recipes/`` into the package; copying needs no setuptools)::

    echo /.whl/ >> .git/info/exclude      # once, here
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
    # on the GPU machine (carry .whl), from the checkout:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    mkdir -p /tmp/pkg/accel && cp -r accel/. /tmp/pkg/accel/ && cp -r kernels /tmp/pkg/accel/kernels \\
        && cp -r eval /tmp/pkg/accel/eval && cp -r recipes /tmp/pkg/accel/recipes
    export PYTHONPATH=/tmp/pkg:/tmp/site HF_HUB_OFFLINE=1; cd /tmp
    python3 -m accel bench --gpu --out $OUT/GPU_BENCHMARKS.md   # = make bench-gpu, report written as it goes

(That ran on an H200 on 2026-11-26: 435 s for section (a) and SD 1.5 with ``--gpu-budget-s 470``; SDXL needs a run
of its own, ``--gpu-models sdxl``.) ``bash scripts/gpu_bench.sh`` does all of the GPU-machine part in one command,
with ``--gpu --quick`` (both models in about 8 minutes, see :func:`gpu_plan`) unless given other arguments.
(transformers, huggingface_hub >= 1.32, safetensors >= 0.8, regex, requests, Pillow, numpy and tqdm are in that
image; Python 3.12 needs no importlib_metadata.)
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .models import SD15_UNET, SDXL_UNET, TINY_SD, TINY_SDXL, Model, build_pipeline, unet_inputs


# what is left of the run's time budget for a part to be started (a part that would overrun is reported "not run")
COMPILE_RESERVE_S = 180  # an end-to-end row with torch.compile (inductor on a UNet)
CUDAGRAPHS_RESERVE_S = 45  # an end-to-end row replayed from CUDA graphs without inductor
ROW_RESERVE_S = 30  # any other end-to-end row
LAYER_RESERVE_S = 60  # section (b) of one model
E2E_RESERVE_S = 90  # section (c) of one model: its calibration and first rows


@dataclass
class Plan:
    """What one run measures and how hard it tries."""

    device: str
    dtype: torch.dtype
    models: list
    steps: int
    kernel_m: int  # rows of section (a)'s problems
    kernel_c: int  # channels of section (a)'s problems
    inner: int  # kernel calls per timing
    repeats: int  # timings per measurement (median)
    e2e_repeats: int
    budget_full_calls: int  # cachequant-w8a8's full UNet calls
    compile_backend: str
    time_budget_s: float
    kernel_dtypes: tuple = (torch.float32,)  # activation dtypes of section (a)'s GEMMs
    dry_run: bool = False
    quick: bool = False  # the quick run's rows (CUDA-graph rows first, inductor last) and layer shapes
    layer_limit: int | None = None  # section (b): only the heaviest shapes (MACs x calls)
    started: float = field(default_factory=time.perf_counter)

    @property
    def backend(self) -> str:
        return "triton" if self.device == "cuda" else "reference"

    def left(self) -> float:
        return self.time_budget_s - (time.perf_counter() - self.started)


QUICK_STEPS, QUICK_BUDGET_S, QUICK_LAYERS = 10, 450.0, 10


def gpu_plan(models=("sd15", "sdxl"), steps: int | None = None, time_budget_s: float | None = None,
             quick: bool = False) -> Plan:
    """The GPU run. ``quick`` (``accel bench --gpu --quick``, ``make bench-gpu-quick``): both models in about 8
    minutes: 10 steps (every row's per-step cost, as the full run's 50), section (a) in fp16 only, the end-to-end
    rows that answer "is int8 faster than fp16 on this GPU" first (fp16, W8A8, fp8 and the caches, each replayed
    from CUDA graphs), the inductor rows last (they cost a compile of a minute or more each), and the
    ten heaviest layer shapes."""
    table = {"sd15": Model("SD 1.5 (512 px)", "sd", SD15_UNET, (768,), 512),
             "sdxl": Model("SDXL (1024 px)", "sdxl", SDXL_UNET, (768, 1280), 1024)}
    steps = steps or (QUICK_STEPS if quick else 50)
    budget = time_budget_s or (QUICK_BUDGET_S if quick else 540.0)
    full_calls = max(2, round(steps * 0.4))  # cachequant-w8a8's full calls: 20 of 50, as in the full run
    return Plan("cuda", torch.float16, [table[m] for m in models], steps, kernel_m=4096, kernel_c=320, inner=10,
                repeats=5, e2e_repeats=2, budget_full_calls=full_calls, compile_backend="inductor",
                time_budget_s=budget, kernel_dtypes=(torch.float16,) if quick else (torch.float16, torch.bfloat16),
                quick=quick, layer_limit=QUICK_LAYERS if quick else None)


def dry_plan(quick: bool = False) -> Plan:
    return Plan("cpu", torch.float32, [Model("SD-like tiny (64 px)", "sd", TINY_SD, (16,), 64),
                                       Model("SDXL-like tiny (64 px)", "sdxl", TINY_SDXL, (16, 16), 64)],
                steps=3, kernel_m=40, kernel_c=24, inner=1, repeats=1, e2e_repeats=1, budget_full_calls=2,
                compile_backend="eager", time_budget_s=float("inf"), dry_run=True, quick=quick,
                layer_limit=QUICK_LAYERS if quick else None)


# ----------------------------------------------------------------------------------- timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable, plan: Plan) -> float:
    """Median seconds per call of ``fn`` (after a warm-up that includes Triton's autotuning)."""
    fn()
    _sync(plan.device)
    times = []
    for _ in range(plan.repeats):
        if plan.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(plan.inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / plan.inner)
        else:
            t0 = time.perf_counter()
            for _ in range(plan.inner):
                fn()
            times.append((time.perf_counter() - t0) / plan.inner)
    return statistics.median(times)


# ----------------------------------------------------------------------------------- layer constants
def int8_layer(o: int, c: int, k: int | None, device, seed: int = 0):
    """int8 weights laid out as :class:`accel.Quantize` stores them, with their constants."""
    from ..transforms.quantize import _weight_sums

    g = torch.Generator().manual_seed(seed)
    shape = (o, c) if k is None else (o, c, k, k)
    w = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
    if k is not None:
        w = w.contiguous(memory_format=torch.channels_last)
    ws = torch.rand(o, generator=g) / 100 + 1e-3
    wz = torch.randint(-8, 8, (o,), generator=g).to(torch.int8)
    tap, total = _weight_sums(w, ws, wz)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(w), to(ws), to(wz), to(tap), to(total)


def _table(x) -> torch.Tensor:
    lo, hi = x.float().aminmax()
    return torch.stack([(hi - lo) / 254, (hi + lo) / 2]).view(1, 2)


def _skewed(shape, dtype, device, g):
    return F.silu(3 * torch.randn(shape, generator=g)).to(device, dtype)


# ----------------------------------------------------------------------------------- (a) kernels
def kernel_checks(plan: Plan) -> tuple[str, bool]:
    """Every Triton kernel against the reference: exact integers and the float epilogue's difference (a
    markdown table, and whether every integer check passed). In a dry run the Triton kernels run in the
    interpreter."""
    from .. import kernels
    from ..kernels import reference as ref

    dev, m, c = plan.device, plan.kernel_m, plan.kernel_c
    g = torch.Generator().manual_seed(0)
    rows = []

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()

    unit = torch.tensor([[1.0, 0.0]], device=dev)
    # GEMM with int8 A
    a = torch.randint(-128, 128, (m + 3, c), dtype=torch.int8, generator=g).to(dev)
    w = torch.randint(-128, 128, (2 * c + 8, c), dtype=torch.int8, generator=g).to(dev)
    yi = kernels.w8a8_gemm(a, w, torch.tensor(1.0, device=dev), torch.ones(w.shape[0], device=dev), backend="triton")
    exact = torch.equal(yi.long(), ref.int_matmul(a, w))
    sa, sw = torch.rand(a.shape[0], generator=g).to(dev), torch.rand(w.shape[0], generator=g).to(dev)
    wz = torch.randint(-8, 8, (w.shape[0],), generator=g).to(dev)
    yt = kernels.w8a8_gemm(a, w, sa, sw, None, 0, wz, backend="triton")
    rows.append(("GEMM, int8 A (per-row scales, asymmetric W)", f"{a.shape[0]}x{w.shape[0]}x{c}", exact,
                 rel(yt, ref.w8a8_gemm(a, w, sa, sw, None, 0, wz))))
    # static (fused) and dynamic GEMMs
    for dtype in plan.kernel_dtypes:
        x = _skewed((m + 3, c), dtype, dev, g)
        lw, lws, lwz, _, lsum = int8_layer(2 * c + 8, c, None, dev)
        b = torch.randn(lw.shape[0], generator=g).to(dev, dtype)
        qt, step = torch.cat([_table(x) * 2, _table(x)]), torch.tensor([1], dtype=torch.int32, device=dev)
        codes = ref.quantize_static(x, qt[1, 0], 0, qt[1, 1])
        yi = kernels.linear(codes.float(), lw, torch.ones_like(lws), None, None, None, unit, None, backend="triton")
        exact = torch.equal(yi.long(), ref.int_matmul(codes, lw))
        args = (x, lw, lws, lwz, b, lsum, qt, step)
        rows.append((f"GEMM, static {str(dtype)[6:]} A quantized in the kernel", f"{x.shape[0]}x{lw.shape[0]}x{c}",
                     exact, rel(kernels.linear(*args, backend="triton"), kernels.linear(*args, backend="reference"))))
        args = (x, lw, lws, lwz, b)
        rows.append((f"GEMM, dynamic per-token {str(dtype)[6:]} A", f"{x.shape[0]}x{lw.shape[0]}x{c}", None,
                     rel(kernels.linear(*args, backend="triton"), kernels.linear(*args, backend="reference"))))
    # convolutions
    side = max(4, int((m / 2) ** 0.5))
    for label, cin, kk, stride, pad in [("3x3", c, 3, 1, 1), ("3x3 stride 2", c, 3, 2, 1), ("1x1", c, 1, 1, 0),
                                        ("3x3, 4 channels (conv_in)", 4, 3, 1, 1)]:
        dtype = plan.dtype
        x = _skewed((2, cin, side, side), dtype, dev, g).contiguous(memory_format=torch.channels_last)
        cw, cws, cwz, ctap, csum = int8_layer(c + 8, cin, kk, dev)
        b = torch.randn(cw.shape[0], generator=g).to(dev, dtype)
        qt, step = _table(x), None
        codes = ref.quantize_static(x, qt[0, 0], 0, qt[0, 1])
        yi = kernels.conv2d(codes.float(), cw, torch.ones_like(cws), unit, stride=stride, padding=pad, backend="triton")
        exact = torch.equal(yi.long(), ref.conv2d_int8(codes, cw, stride, pad))
        args = (x, cw, cws, qt, cwz, b, csum, ctap, step, None, stride, pad)
        rows.append((f"conv {label}, static {str(dtype)[6:]} A quantized in the kernel",
                     f"{tuple(x.shape)}->{cw.shape[0]}", exact,
                     rel(kernels.conv2d(*args, backend="triton"), kernels.conv2d(*args, backend="reference"))))
    xq = torch.randint(-128, 128, (2, c, side, side), dtype=torch.int8, generator=g).to(dev)
    cw, cws, cwz, _, _ = int8_layer(c + 8, c, 3, dev)
    yi = kernels.w8a8_conv2d(xq, cw, 1.0, torch.ones_like(cws), None, 1, 1, backend="triton")
    rows.append(("conv 3x3, int8 A", f"{tuple(xq.shape)}->{cw.shape[0]}", torch.equal(yi.long(), ref.conv2d_int8(xq, cw, 1, 1)),
                 rel(kernels.w8a8_conv2d(xq, cw, 0.02, cws, None, 1, 1, cwz, backend="triton"),
                     kernels.w8a8_conv2d(xq, cw, 0.02, cws, None, 1, 1, cwz, backend="reference"))))
    # quantize kernels
    x = torch.randn(m, c, generator=g).to(dev) * 3
    qt_, st_ = kernels.quantize_per_token(x, backend="triton")
    qr, sr = kernels.quantize_per_token(x, backend="reference")
    rows.append(("quantize per token", f"{m}x{c}", torch.equal(qt_, qr) and torch.equal(st_, sr), None))
    rows.append(("quantize static (scale, shift, zero point)", f"{m}x{c}",
                 torch.equal(kernels.quantize_static(x, 0.013, 7, 0.25, backend="triton"),
                             ref.quantize_static(x, 0.013, 7, 0.25)), None))
    head = ("| kernel | problem | integers exact | max \\|Δ\\| / max \\|y\\| (float epilogue) |\n|---|---|---|---|")
    fmt = lambda v: "—" if v is None else ("**yes**" if v is True else ("**NO**" if v is False else f"{v:.1e}"))  # noqa: E731
    return head + "\n" + "\n".join(f"| {n} | {p} | {fmt(e)} | {fmt(r)} |" for n, p, e, r in rows), \
        all(e is not False for _, _, e, _ in rows)


# ----------------------------------------------------------------------------------- (b) layer shapes
@dataclass(frozen=True)
class LayerShape:
    kind: str  # "linear" | "conv"
    x: tuple  # (M, K) or (N, C, H, W)
    out: int
    k: int = 1
    stride: int = 1
    padding: int = 0

    @property
    def macs(self) -> int:
        if self.kind == "linear":
            return self.x[0] * self.x[1] * self.out
        n, c, h, w = self.x
        ho, wo = (h + 2 * self.padding - self.k) // self.stride + 1, (w + 2 * self.padding - self.k) // self.stride + 1
        return n * ho * wo * self.out * c * self.k * self.k

    def label(self) -> str:
        if self.kind == "linear":
            return f"linear {self.x[0]}x{self.x[1]} -> {self.out}"
        n, c, h, w = self.x
        return f"conv{self.k}x{self.k}{'/2' if self.stride == 2 else ''} {n}x{c}x{h}x{w} -> {self.out}"


def layer_shapes(model: Model, pipe) -> dict:
    """``{LayerShape: count}`` of every Linear and Conv2d call in one UNet forward at the model's resolution."""
    counts: dict = {}
    hooks = []

    def record(module, args):
        x = args[0]
        if isinstance(module, torch.nn.Linear):
            s = LayerShape("linear", (x.numel() // x.shape[-1], x.shape[-1]), module.out_features)
        else:
            s = LayerShape("conv", tuple(x.shape), module.out_channels, module.kernel_size[0], module.stride[0],
                           module.padding[0])
        counts[s] = counts.get(s, 0) + 1

    for m in pipe.unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            hooks.append(m.register_forward_pre_hook(record))
    args, kw = unet_inputs(model, pipe)
    try:
        with torch.no_grad():
            pipe.unet(*args, **kw)
    finally:
        for h in hooks:
            h.remove()
    return counts


def graph_time(fn: Callable, plan: Plan, n: int = 20) -> float | None:
    """Seconds per call of ``fn`` replayed from a CUDA graph: the GPU's time alone, without the host's launch
    overhead (None off CUDA, or when ``fn`` cannot be captured)."""
    if plan.device != "cuda":
        return None
    from ..timing import cuda_graph_time

    try:
        return cuda_graph_time(fn, n, plan.repeats)
    except Exception:  # noqa: BLE001 -- reported as "—"; the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        return None


def time_layer(s: LayerShape, plan: Plan) -> dict:
    """Seconds per call of one layer shape: fp16 cuBLAS/cuDNN and the static W8A8 op eager (host launch overhead
    included) and replayed from a CUDA graph (GPU time); the W8A8 op with the quantization fused into the kernel's
    A load (graph); ``torch._int_mm`` alone (graph)."""
    from .. import kernels

    dev, dt = plan.device, plan.dtype
    g = torch.Generator().manual_seed(1)
    step = torch.zeros(1, dtype=torch.int32, device=dev)
    out = {}
    if s.kind == "linear":
        x = _skewed(s.x, dt, dev, g)
        w, ws, wz, _, wsum = int8_layer(s.out, s.x[1], None, dev)
        wf, b = torch.randn(s.out, s.x[1], generator=g).to(dev, dt) / 30, torch.zeros(s.out, device=dev, dtype=dt)
        qt = _table(x)
        int8 = lambda: kernels.linear(x, w, ws, wz, b, wsum, qt, step, plan.backend)  # noqa: E731
        fp16 = lambda: F.linear(x, wf, b)  # noqa: E731
        if dev == "cuda" and s.x[0] > 16 and s.x[1] % 8 == 0 and s.out % 8 == 0:
            a8, wt = torch.randint(-127, 128, s.x, dtype=torch.int8, device=dev), w.t()
            out["int_mm"] = graph_time(lambda: torch._int_mm(a8, wt), plan)
    else:
        x = _skewed(s.x, dt, dev, g).contiguous(memory_format=torch.channels_last)
        w, ws, wz, tap, wsum = int8_layer(s.out, s.x[1], s.k, dev)
        wf = (torch.randn(s.out, s.x[1], s.k, s.k, generator=g) / 30).to(dev, dt).contiguous(memory_format=torch.channels_last)
        b = torch.zeros(s.out, device=dev, dtype=dt)
        qt = _table(x)
        int8 = lambda: kernels.conv2d(x, w, ws, qt, wz, b, wsum, tap, step, None, s.stride, s.padding,  # noqa: E731
                                      plan.backend)
        fp16 = lambda: F.conv2d(x, wf, b, s.stride, s.padding)  # noqa: E731
    out["int8"], out["int8_graph"] = timeit(int8, plan), graph_time(int8, plan)
    out["fp16"], out["fp16_graph"] = timeit(fp16, plan), graph_time(fp16, plan)
    if plan.backend == "triton":  # the op's own launch (as kernels.linear / conv2d make it), asked for the fused kernel
        tk = kernels.triton_module()
        if s.kind == "linear":
            fused = lambda: tk.gemm(x, w, ws, qtable=qt, step=step, w_zero=wz, bias=b, w_sum=wsum,  # noqa: E731
                                    fuse_quant=True)[0]
        else:
            n, _, h, wd = s.x
            y_shape = (n, s.out, (h + 2 * s.padding - s.k) // s.stride + 1, (wd + 2 * s.padding - s.k) // s.stride + 1)
            fused = lambda: tk.conv2d(  # noqa: E731
                x, w, ws, torch.empty(y_shape, dtype=dt, device=dev, memory_format=torch.channels_last), qtable=qt,
                step=step, w_zero=wz, bias=b, w_sum=wsum, w_tap=tap, stride=s.stride, padding=s.padding,
                fuse_quant=True)
        out["fused_graph"] = graph_time(fused, plan)
    return out


def layer_throughput(plan: Plan, model: Model, pipe) -> str:
    counts = layer_shapes(model, pipe)
    rows, tot = [], {"int8": 0.0, "fp16": 0.0, "int8_graph": 0.0, "fp16_graph": 0.0}
    float_name = "fp16 cuBLAS/cuDNN" if plan.device == "cuda" else f"{str(plan.dtype)[6:]} torch (CPU)"
    ordered = sorted(counts.items(), key=lambda kv: -kv[0].macs * kv[1])
    skipped = 0
    if plan.layer_limit is not None and len(ordered) > plan.layer_limit:
        ordered, skipped = ordered[:plan.layer_limit], len(ordered) - plan.layer_limit
    timed = 0
    for i, (s, n) in enumerate(ordered):
        if plan.left() < 0:
            rows.append(f"| {len(ordered) - i} more shapes (the smallest by MACs x calls) | | not timed: time "
                        "budget | | | | | | |")
            break
        t = time_layer(s, plan)
        timed += 1
        for key in tot:
            tot[key] += n * (t.get(key) or 0.0)

        def cell(key):
            sec = t.get(key)
            return "—" if sec is None else f"{sec * 1e6:.0f} ({2 * s.macs / sec / 1e12:.1f})"

        ratio = lambda a, b: "—" if not (t.get(a) and t.get(b)) else f"{t[a] / t[b]:.2f}x"  # noqa: E731
        rows.append(f"| {s.label()} | {n} | {cell('fp16')} | {cell('int8')} | {cell('fp16_graph')} | "
                    f"{cell('int8_graph')} | {cell('fused_graph')} | {cell('int_mm')} | {ratio('fp16', 'int8')} / "
                    f"{ratio('fp16_graph', 'int8_graph')} |")
    head = (f"| layer (batch 2) | calls per UNet call | {float_name} µs (TOPS) | static W8A8 µs (TOPS) | "
            "float, CUDA graph µs | W8A8, CUDA graph µs | W8A8 with the quantization fused into the A load, graph µs | "
            "torch._int_mm alone, graph µs | float / W8A8 (eager / graph) |\n|---|---|---|---|---|---|---|---|---|")
    which = "All" if timed == len(ordered) and not skipped else "The timed shapes' (not all)"
    if skipped:
        rows.append(f"| {skipped} lighter shapes (by MACs x calls) | | not timed: the quick run times the "
                    f"{plan.layer_limit} heaviest | | | | | | |")
    graphs = (f"; replayed from CUDA graphs (GPU time alone) {tot['fp16_graph'] * 1e3:.1f} ms vs "
              f"{tot['int8_graph'] * 1e3:.1f} ms") if tot["int8_graph"] else ""
    summary = (f"\n{which} Linear/Conv2d calls of one UNet call, weighted by count: {float_name} "
               f"{tot['fp16'] * 1e3:.1f} ms, static W8A8 {tot['int8'] * 1e3:.1f} ms "
               f"({tot['fp16'] / max(tot['int8'], 1e-12):.2f}x) eager{graphs}. A static W8A8 layer is two kernels "
               "(quantize, then the int8 GEMM/conv); eager, each pays the host's launch overhead. Split-shortcut "
               "convs (two int8 halves) are timed whole here.\n")
    return head + "\n" + "\n".join(rows) + "\n" + summary


# ----------------------------------------------------------------------------------- (c) end to end
def _peak_reset(dev):
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(dev) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if dev == "cuda" else "n/a"


GRAPHS = "graphs"  # inductor + CUDA graph replay (mode="reduce-overhead"; on CPU: compiled as the other compile rows)
CUDAGRAPHS = "cudagraphs"  # dynamo's cudagraphs backend: the eager kernels replayed from CUDA graphs, no inductor
# (a compile of seconds, not minutes: what separates a GPU's time from the host's launch overhead end to end)


def _failure(e: BaseException) -> str:
    """What broke, for the report: ``Type: first line of the message`` in backticks (the traceback goes to
    stderr)."""
    traceback.print_exc(file=sys.stderr)
    return f"`{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}`"


def _measure(plan: Plan, pipe, call: Callable, transforms, cal, compiled: bool | str):
    """One end-to-end row: median seconds per image, first call's seconds, peak memory, UNet weight bytes.
    ``remove()`` restores the pipeline whatever happens."""
    import accel
    from ..transforms.quantize import device_bytes

    _peak_reset(plan.device)
    handle = accel.apply(pipe, transforms, calibration=cal) if transforms is not None else None
    unet = pipe.unet
    try:
        wbytes = device_bytes(unet)
        if compiled:
            torch._dynamo.reset()
            if compiled == GRAPHS and plan.device == "cuda":  # inductor + CUDA graph replay of the UNet call
                how = dict(mode="reduce-overhead")
            elif compiled == CUDAGRAPHS and plan.device == "cuda":
                how = dict(backend="cudagraphs")
            else:
                how = dict(backend=plan.compile_backend)
            if handle is not None:  # below accel's step clock: one graph per kind of call, fullgraph
                handle.compile(**how)
            else:
                pipe.unet = torch.compile(unet, fullgraph=True, **how)
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        secs = []
        for _ in range(plan.e2e_repeats):
            t0 = time.perf_counter()
            call()
            secs.append(time.perf_counter() - t0)
        return statistics.median(secs), first, _peak(plan.device), wbytes
    finally:
        pipe.unet = unet
        if handle is not None:
            handle.remove()
        if compiled:
            torch._dynamo.reset()


def _quant(recipe_name: str = "w8a8", **changes):
    """The recipe's quantizer with ``changes`` (same calibration)."""
    import accel

    quant = accel.recipe.load(recipe_name).transforms[0]
    return [type(quant)(**{**quant.to_dict_fields(), **changes})]


def _fp8():
    """The w8a8 quantizer with fp8 (e4m3) weights and activations, or None where the GPU has no fp8 tensor cores
    (before sm_89)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        return None
    return _quant(dtype="fp8")


def _cache_only(recipe_name: str = "cachequant-w8a8"):
    """The recipe's cache without its quantizer: the cache-only row at the same full calls."""
    import accel

    return [t for t in accel.recipe.load(recipe_name).transforms if type(t).__name__ != "Quantize"]


def e2e_rows(plan: Plan) -> list[tuple[str, object, object]]:
    """``(label, transforms or recipe name or None, compiled)`` of section (c), in the order they run (a row that
    would overrun the time budget is not started, so what matters most comes first)."""
    import accel

    fl = "fp16" if plan.dtype == torch.float16 else "float"
    k = plan.budget_full_calls
    ind, cg = " + torch.compile (inductor, CUDA graphs: mode=reduce-overhead)", " + CUDA graphs"
    fp8 = _fp8()
    quick = [(fl, None, False),
             (f"{fl}{cg}", None, CUDAGRAPHS),
             (f"W8A8{cg}", "w8a8", CUDAGRAPHS),
             (f"W8A8, only the layers measured faster (select=speed){cg}", _quant(select="speed"), CUDAGRAPHS)]
    if fp8 is not None:
        quick.append((f"fp8{cg}", fp8, CUDAGRAPHS))
    quick += [("cache I=5", [accel.FeatureCache(interval=5)], False),
              (f"cache only, cachequant-w8a8's schedule ({k} full calls){cg}", _cache_only(), CUDAGRAPHS),
              (f"cachequant-w8a8 ({k} full calls){cg}", "cachequant-w8a8", CUDAGRAPHS),
              ("W8A8 (static, per-call scales)", "w8a8", False),
              (f"{fl}{ind}", None, GRAPHS),
              (f"W8A8{ind}", "w8a8", GRAPHS)]
    if fp8 is not None:
        quick.append((f"fp8{ind}", fp8, GRAPHS))
    quick.append((f"cachequant-w8a8 ({k} full calls){ind}", "cachequant-w8a8", GRAPHS))
    if plan.quick:
        return quick
    return quick[:1] + [(f"{fl} + torch.compile", None, True), ("W8A8 + torch.compile", "w8a8", True),
                        (f"cachequant-w8a8 ({k} full calls)", "cachequant-w8a8", False)] + quick[1:]


def end_to_end(plan: Plan, model: Model, pipe) -> str:
    from ..calibrate import calibrate

    kw = dict(prompt="a red circle on a blue square", num_inference_steps=plan.steps, guidance_scale=7.5,
              output_type="latent", height=model.pixels, width=model.pixels)

    def call():
        with torch.no_grad():
            out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        _sync(plan.device)
        return out

    t0 = time.perf_counter()
    try:
        cal = calibrate(pipe, "cachequant-w8a8", ["a red circle on a blue square"], steps=plan.steps,
                        budget=plan.budget_full_calls, batch_size=1, guidance=7.5, refine=False, progress=False)
        cal_note = f"{time.perf_counter() - t0:.0f} s"
    except Exception as e:  # noqa: BLE001 -- the rows without a calibration still run
        cal, cal_note = None, f"failed ({_failure(e)})"
    lines, base = [], None
    for name, transforms, compiled in e2e_rows(plan):
        reserve = COMPILE_RESERVE_S if compiled in (True, GRAPHS) else CUDAGRAPHS_RESERVE_S if compiled else ROW_RESERVE_S
        if plan.left() < reserve:  # a row that would overrun is not started
            lines.append(f"| {name} | not run (time budget) | | | | |")
            continue
        try:
            sec, first, peak, wbytes = _measure(plan, pipe, call, transforms, cal, compiled)
        except Exception as e:  # noqa: BLE001 -- one broken row is reported as such; the others still run
            lines.append(f"| {name} | failed: {_failure(e)} | | | | |")
            continue
        if base is None and transforms is None and not compiled:
            base = sec
        speed = f"{base / sec:.2f}x" if base else "—"
        lines.append(f"| {name} | {sec:.2f} | {speed} | {first:.1f} | {peak} | {wbytes / 2**20:.1f} |")
    head = ("| method | s / image | speed-up | first call s (compile, autotune) | peak GPU memory GiB | "
            "UNet on the device MiB |\n|---|---|---|---|---|---|")
    return (head + "\n" + "\n".join(lines) + f"\n\nCalibration (cachequant-w8a8, 1 prompt, {plan.steps} steps; the "
            f"W8A8 and fp8 rows use its static scales): {cal_note}. \"CUDA graphs\": `torch.compile(unet, "
            "backend=\"cudagraphs\", fullgraph=True)`, the eager kernels replayed (no inductor); \"inductor\": "
            "`mode=\"reduce-overhead\", fullgraph=True`. Peak memory is of the whole row (apply included); the float "
            "layers `accel.apply` keeps for `remove()` are in host memory (`Quantize(keep_float=True)`), and \"UNet "
            "on the device\" is `accel.transforms.quantize.device_bytes`.\n")


# ----------------------------------------------------------------------------------- report
def _section(out: list, title: str, fn: Callable[[], str], emit: Callable[[str], None] | None) -> None:
    """Append section ``title`` with ``fn()``'s text to ``out`` (or the one-line reason it failed: a section that
    breaks does not take the others with it; the traceback goes to stderr), then hand the report so far to
    ``emit``."""
    try:
        body = fn()
    except Exception as e:  # noqa: BLE001 -- reported in the document and on stderr, then the next section runs
        body = f"**Failed**: {_failure(e)}\n"
    out.append(f"## {title}\n\n{body}")
    if emit is not None:
        emit("\n".join(out))


def run(plan: Plan, command_line: str, emit: Callable[[str], None] | None = None) -> str:
    """The report. ``emit`` receives the report so far after every section (``accel bench --gpu`` writes it to
    ``--out``, so a run stopped from outside leaves what it measured)."""
    import triton

    if plan.device == "cuda":
        dev = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
        head = [f"# GPU benchmarks\n\nGenerated by `{command_line}` — do not edit by hand. Device: {dev}; torch "
                f"{torch.__version__}, triton {triton.__version__}, {plan.steps} steps, batch 2 (one prompt with CFG).\n"]
    else:
        head = [f"# GPU benchmark: DRY RUN on CPU\n\nGenerated by `{command_line}` on {platform.processor() or 'CPU'}: "
                "tiny UNets, few steps, the reference backend (the Triton kernels in the interpreter for section "
                "(a)). These are not GPU figures; they show that the benchmark's code runs.\n"]
    out = head

    def kernels_section():
        table, ok = kernel_checks(plan)
        return table + "\n" + ("" if ok else "\n**A kernel disagrees with the reference: the timings below are of "
                                             "wrong kernels.**\n")

    _section(out, "(a) Kernels against the reference", kernels_section, emit)
    for model in plan.models:
        pipe = None

        def built():
            nonlocal pipe
            if pipe is None:
                pipe = build_pipeline(model, plan.device, plan.dtype)
            return pipe

        # end to end first: when time runs short, the per-image figures are what a user wants
        for title, fn, reserve in ((f"(c) End to end: {model.name}, {plan.steps} steps", end_to_end, E2E_RESERVE_S),
                                   (f"(b) Layer throughput: {model.name}", layer_throughput, LAYER_RESERVE_S)):
            if plan.left() < reserve:
                _section(out, title, lambda: f"Not run: under {reserve} s of the run's time budget "
                                             f"({plan.time_budget_s:.0f} s) was left.\n", emit)
                continue
            _section(out, title, lambda: fn(plan, model, built()), emit)
        del pipe
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(out)


DEFAULT_OUT = "docs/GPU_BENCHMARKS.md"
NOT_RUN = "# GPU benchmarks\n\nNot run: no CUDA device on the machine that ran `accel bench --gpu`.\n"
PARTIAL = "\n**Partial report: the run was still going (or was stopped) after the last section above.**\n"


def main(args, emit: Callable[[str], None] | None = None) -> str:
    """``accel bench --gpu``: the report's text (see :data:`NOT_RUN` without CUDA unless ``--dry-run``); ``emit``
    as in :func:`run`."""
    line = "accel bench --gpu" + (" --dry-run" if args.dry_run else "")
    quick = getattr(args, "quick", False)
    line += " --quick" if quick else ""
    if args.dry_run:
        return run(dry_plan(quick), line, emit)
    if not torch.cuda.is_available():
        return NOT_RUN
    return run(gpu_plan(tuple(args.gpu_models.split(",")), args.gpu_steps, args.gpu_budget_s, quick), line, emit)


# ----------------------------------------------------------------------------------- accel bench --sections gpu
def gpu_section() -> str:  # pragma: no cover - needs CUDA
    """Kernel TFLOP/s of the W8A8 GEMM against fp16 ``torch.mm`` at SD-like shapes (CUDA only)."""
    from .. import kernels

    rows = []
    for m, n, k in [(4096, 320, 320), (4096, 1280, 320), (1024, 640, 2560), (256, 1280, 5120)]:
        a = torch.randint(-127, 127, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda")
        sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
        af, wf = a.half(), w.half()

        def bench(fn, reps=50):
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps / 1e3

        t8 = bench(lambda: kernels.w8a8_gemm(a, w, sa, sw, out_dtype=torch.float16))
        t16 = bench(lambda: af @ wf.T)
        fl = 2 * m * n * k
        rows.append(f"| {m}x{n}x{k} | {fl / t8 / 1e12:.1f} | {fl / t16 / 1e12:.1f} | {t16 / t8:.2f}x |")
    return ("| M x N x K | W8A8 Triton TFLOP/s | fp16 torch.mm TFLOP/s | ratio |\n|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\nDevice: {torch.cuda.get_device_name()}.\n")


def section() -> list[str]:
    """The CPU report's ``gpu`` section: the kernel table where CUDA exists, else why no GPU figure is reported."""
    parts = ["## GPU\n"]
    if torch.cuda.is_available():
        parts.append(gpu_section())
    else:
        parts.append("Not run: this machine has no CUDA device. The Triton kernels were checked for exactness "
                     "against the torch reference under `TRITON_INTERPRET=1` (tests/test_kernels.py); their speed "
                     "(kernel vs fp16 `torch.mm` TFLOP/s, end-to-end) is measured only where a GPU exists. "
                     "No GPU figure is reported here.\n")
    return parts
