"""What a static W8A8 UNet call costs beyond its kernels (nothing), what torch.compile makes of it (one graph,
no recompiles), and what the Triton kernels would compile to on a GPU (no spills, int8 tensor cores)."""
import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import accel
from accel.calibrate import calibrate
from accel.kernels import triton_kernels as tk
from accel.kernels.ops import IMPLS
from accel.transforms.quantize import QConv2d, QLinear, QuantizedLayers

from conftest import sd_components, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


IMPLS_BY_NAME = {str(op): impl for op, impl in IMPLS.items()}


class OpCounter(TorchDispatchMode):
    """Counts aten ops, outside the accel ops and inside them (it steps into their Python implementation);
    what the Triton interpreter does to emulate a launch is not counted (a GPU launch issues no aten op)."""

    def __init__(self):
        super().__init__()
        self.outside, self.inside = collections.Counter(), collections.Counter()
        self.depth, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            (self.inside if self.depth else self.outside)[str(func)] += 1
        impl = IMPLS_BY_NAME.get(str(func))  # by name: torch.library's opcheck (test_kernels) re-creates the overloads
        if impl is not None and not self.paused:
            self.depth += 1
            try:
                with self:
                    return impl(*args, **kwargs)
            finally:
                self.depth -= 1
        return func(*args, **kwargs)


class _Uncounted:
    """Wraps a Triton kernel so that the interpreter's emulation of its launch is not counted."""

    def __init__(self, kernel, counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.counter.paused = False
        return launch


def small_sd_pipe(tokenizer_dir):
    import diffusers

    comps = sd_components(tokenizer_dir, scheduler="DDIMScheduler")
    comps["unet"] = tiny_unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                              layers_per_block=1)
    pipe = diffusers.StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_static_w8a8_call_does_no_host_work(tokenizer_dir, monkeypatch):
    """A calibrated static W8A8 UNet call on the Triton backend: one accel op per quantized layer (two for a
    split shortcut), no host sync, no float convolution, nothing recomputed: beyond the float UNet's own
    non-layer ops the only aten work outside the ops is metadata (views, the split's slices) and the step
    counter's fill, and inside the ops only the allocations of the int8 codes and the output."""
    pipe = small_sd_pipe(tokenizer_dir)
    every_layer = accel.Recipe("w8a8-every-layer", [accel.Quantize(mode="static")])  # the w8a8 recipe keeps conv_in/out float
    cal = calibrate(pipe, every_layer, ["a red circle", "a blue square"], steps=2, batch_size=2, progress=False)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(999))
    kw = dict(encoder_hidden_states=torch.randn(2, 77, 16, generator=g))
    with torch.no_grad(), OpCounter() as float_ops:
        unet(*args, **kw)
    h = accel.apply(pipe, accel.Quantize(mode="static", backend="triton"), calibration=cal)
    try:
        qlin = [m for m in unet.modules() if isinstance(m, QLinear)]
        qconv = [m for m in unet.modules() if isinstance(m, QConv2d)]
        splits = sum(m.parts == 2 for m in qconv)
        assert splits > 0 and all(m.act_table0 is not None for m in qlin + qconv)
        counter = OpCounter()
        monkeypatch.setattr(tk, "_gemm_kernel", _Uncounted(tk._gemm_kernel, counter))
        monkeypatch.setattr(tk, "_conv_kernel", _Uncounted(tk._conv_kernel, counter))
        monkeypatch.setattr(tk, "_quant_table_kernel", _Uncounted(tk._quant_table_kernel, counter))
        with torch.no_grad(), counter:
            y = unet(*args, **kw).sample
        assert torch.isfinite(y).all()
    finally:
        h.remove()
    seen = counter.outside + counter.inside
    assert seen["aten._local_scalar_dense.default"] == 0  # no .item() / float(tensor): no host sync
    assert not [op for op in seen if "convolution" in op]  # every conv is an int8 op
    assert counter.outside["accel.linear.default"] == len(qlin)
    assert counter.outside["accel.conv2d.default"] == len(qconv) + splits
    extra = {op: n - float_ops.outside.get(op, 0) for op, n in counter.outside.items()
             if n > float_ops.outside.get(op, 0) and not op.startswith("accel.")}
    assert extra.pop("aten.fill_.Scalar", 0) <= 1  # the step counter, once per UNet call
    assert extra.pop("aten.slice.Tensor", 0) == 2 * splits  # the split shortcut's two halves (views)
    extra.pop("aten.view.default", None)  # reshapes around the GEMMs (views)
    assert extra == {}, extra
    assert set(counter.inside) <= {"aten.empty.memory_format", "aten.empty_like.default"}, counter.inside
    assert counter.inside["aten.empty.memory_format"] + counter.inside["aten.empty_like.default"] == \
        2 * (len(qlin) + len(qconv) + splits)  # per op its int8 codes and its output, nothing else


def graph_counter():
    """``(graphs, backend)``: a torch.compile backend (AOTAutograd's fake tensors and functionalization, eager
    kernels) that appends every graph it compiles to ``graphs``; dynamo and its counters reset first."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    return graphs, aot_autograd(fw_compiler=count)


@pytest.mark.slow
def test_compiled_w8a8_pipeline_one_graph_no_recompiles():
    """`accel.apply(pipe, "w8a8", calibration)` then `pipe.unet = torch.compile(pipe.unet)`: a 50-step call
    compiles one graph (the step is a device tensor, not a Python number dynamo would specialise on), the
    second call none, and the images equal eager's. The backend is AOTAutograd's (fake tensors,
    functionalization, the ops' fake implementations) with eager kernels: inductor would give the same graph;
    its float reassociation differs from eager by ~1e-7, which flips the odd int8 code (measured: 1 in 4096 at
    the first layer it reaches), so its images are not bit-comparable to eager's."""
    from torch._dynamo.utils import counters

    from accel import miniature

    steps = 50
    pipe = miniature.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cal = calibrate(pipe, "w8a8", miniature.prompts(1, seed=0, split="train"), steps=steps,
                    batch_size=1, progress=False, guidance=miniature.GUIDANCE, refine=False)
    kw = dict(prompt=["a red circle on a blue square"], num_inference_steps=steps, guidance_scale=miniature.GUIDANCE,
              output_type="latent")
    with accel.apply(pipe, "w8a8", calibration=cal):
        eager = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        graphs, backend = graph_counter()
        unet = pipe.unet
        pipe.unet = torch.compile(unet, backend=backend)
        try:
            first = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
            n_first = len(graphs)
            second = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        finally:
            pipe.unet = unet
            torch._dynamo.reset()
    assert 1 <= n_first <= 3, n_first  # a handful at most, not one per step
    assert len(graphs) == n_first  # nothing new on the second call
    assert counters["stats"]["unique_graphs"] == n_first
    graph_ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("accel.linear" in t or "accel.conv2d" in t for t in graph_ops) > 100  # the layers are in the graph
    assert (first - eager).abs().max() < 1e-4 and (second - eager).abs().max() < 1e-4


def _report(out, only=(), configs=()):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "accel.kernels.build_report", "--out", str(out), "--jobs", "2"]
    if only:
        cmd += ["--only", *only]
    if configs:
        cmd += ["--configs", *configs]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return json.loads((out / "report.json").read_text())


def _assert_clean(report, expect_builds):
    rows = report["builds"]
    assert len(rows) == expect_builds
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    for r in rows:
        assert r["registers"] and r["registers"] <= 255
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        if r["kernel"] in ("gemm", "conv"):
            assert r["int8_mma"] > 0, r  # int8 tensor-core instructions (mma.sync ... s8 / wgmma ... s8)
    assert report["summary"]["spilling"] == [] and report["summary"]["tensor_core_kernels_without_int8_mma"] == []


def test_build_report_static_kernels(tmp_path):
    """The GEMM/conv kernels a static fp16 layer launches (on the int8 codes of the quantize kernel), in their
    largest tile, for sm_80 and sm_90a: no spills, int8 tensor-core instructions, one PTX file per build. (Every
    variant and config, the fused ones too: the slow test below.)"""
    report = _report(tmp_path, ["gemm.codes.fp16", "conv.codes.fp16.3x3"], ["128x128"])
    variants = {"gemm.codes.fp16", "gemm.codes.fp16.oddk", "conv.codes.fp16.3x3", "conv.codes.fp16.3x3.split"}
    # (names and their dotted sub-variants; conv_in's 4-channel variant autotunes over 32-wide blocks only)
    assert {r["variant"] for r in report["builds"]} == variants
    _assert_clean(report, 2 * len(variants))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([r["ptx"] for r in report["builds"]] + ["report.json"])


@pytest.mark.slow
def test_build_report_every_kernel_every_config(tmp_path):
    from accel.kernels.build_report import VARIANTS

    report = _report(tmp_path)
    assert {r["variant"] for r in report["builds"]} == set(VARIANTS)
    per_arch = {r["arch"]: 0 for r in report["builds"]}
    for r in report["builds"]:
        per_arch[r["arch"]] += 1
    _assert_clean(report, 2 * per_arch["sm_80"])


@pytest.mark.slow
def test_handle_compile_fullgraph_static_w8a8_with_forecasting_cache(tokenizer_dir):
    """`handle.compile()` compiles the UNet below accel's step clock with `fullgraph=True`: a static W8A8 UNet with
    a forecasting cache (cachequant-w8a8's transforms) compiles a few graphs on the first pipeline call (full and
    cached calls, the forecast's warm-up), whatever the step count, none on the second; nothing in them reads a
    value back to the host or has a data-dependent shape (what would keep CUDA-graph replay from capturing them);
    the latents equal eager's. With CUDA-graph replay what the cache keeps across calls is copied out of the
    graph's memory pool after each full call (exercised here by setting the flag the CUDA-graph modes set)."""
    from torch._dynamo.utils import counters

    pipe = small_sd_pipe(tokenizer_dir)
    every_layer = accel.Recipe("w8a8-every-layer", [accel.Quantize(mode="static")])
    steps = 12
    cal = calibrate(pipe, every_layer, ["a red circle", "a blue square"], steps=steps, batch_size=2, progress=False)
    kw = dict(prompt=["a red circle"], num_inference_steps=steps, output_type="latent")
    transforms = [accel.Quantize(mode="static"), accel.FeatureCache(interval=3, forecast="taylor1", trust="skill")]
    h = accel.apply(pipe, transforms, calibration=cal)
    try:
        eager = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        graphs, backend = graph_counter()
        h.compile(backend=backend)  # fullgraph=True: a graph break would raise
        first = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        n_first = len(graphs)
        second = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        assert 2 <= n_first <= 8 and len(graphs) == n_first, n_first  # full / cached calls, not one per step
        assert counters["stats"]["unique_graphs"] == n_first
        ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        host = ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.masked_select", "aten.unique")
        assert not [op for op in ops if op.startswith(host)], set(ops)
        assert sum("accel.linear" in op or "accel.conv2d" in op for op in ops) > 20
        assert torch.equal(first, eager) and torch.equal(second, eager)
        cache = h.applied(accel.FeatureCache)
        h.clock.cudagraphs = True  # as mode="reduce-overhead" sets it: kept features copied after full calls
        copied, after = [], cache._after_call

        def watch(clock):
            newest = cache._features[0] if cache._features else None
            after(clock)
            copied.append(newest is not None and cache._features[0] is not newest
                          and torch.equal(cache._features[0], newest))
        h.clock.add_listener(cache.hook_name, watch, after=True)
        third = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        assert torch.equal(third, eager) and len(graphs) == n_first
        assert sum(copied) == len(range(0, steps, 3))  # after each full call, the kept feature is a copy
    finally:
        h.remove()
        torch._dynamo.reset()
    assert "forward" not in pipe.unet.__dict__  # the UNet as it was, uncompiled


def test_eager_inference_skips_the_dispatcher_and_nothing_else_does(tokenizer_dir):
    """Eager inference calls each layer's op implementation directly (the dispatcher costs the host as much as the
    rest of the layer: scripts/host_overhead.py); the outputs are the op's, and autograd, dispatch modes (FLOP
    counting, op counts, fake tensors) and torch.compile still see the op."""
    from torch.utils.flop_counter import FlopCounterMode

    from accel import kernels

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    owner = QuantizedLayers(accel.Quantize(mode="static"))
    q = QConv2d(owner, "conv", conv, None)
    q.act_scales, q.act_shifts = torch.full((1, 1), 0.02), torch.zeros(1, 1)
    owner._modules = {"conv": q}
    owner._tables_ready()
    x = torch.randn(2, 8, 6, 6, generator=g)
    with torch.no_grad():
        assert kernels.direct()
        y = q(x)
        with OpCounter() as counted:
            y_op = q(x)
        with FlopCounterMode(display=False) as flops:
            q(x)
    assert torch.equal(y, y_op) and counted.outside["accel.conv2d.default"] == 1
    assert flops.get_total_flops() == 2 * y.numel() * 8 * 9
    assert not kernels.direct()  # gradients on: the op (its straight-through backward)
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def _static_conv(cin=16, cout=16, k=3, padding=1, shift=0.1):
    owner = QuantizedLayers(accel.Quantize(mode="static", backend="triton"))
    conv = torch.nn.Conv2d(cin, cout, k, padding=padding)
    q = QConv2d(owner, "conv", conv, None)
    q.act_scales, q.act_shifts = torch.full((2, 1), 0.02), torch.full((2, 1), shift)
    owner._modules = {"conv": q}
    owner._tables_ready()
    owner.set_step(1)
    return owner, q


def test_codes_ops_equal_the_float_ops_on_both_backends():
    """What a compiled static layer runs (torch-op quantization, then `accel::*_codes` on the int8 codes) gives the
    float-input op's result exactly, Triton (interpreter) and reference alike: the same integers, the same epilogue."""
    from accel.kernels import ops

    g = torch.Generator().manual_seed(0)
    owner, qc = _static_conv()
    x = torch.nn.functional.silu(3 * torch.randn(2, 16, 6, 6, generator=g)).contiguous(memory_format=torch.channels_last)
    table, step = qc.act_table0, owner._step_t
    w = (qc.weight_q0, qc.weight_scale0, qc.weight_zero0, qc.bias, qc.weight_sum0, qc.weight_tap0)
    for backend in ("triton", "reference"):
        want = ops.conv2d_impl(x, *w[:4], w[4], w[5], table, step, None, 1, 1, backend)
        got = ops.conv2d_codes_impl(ops.quantize_codes(x, table, step), *w[:4], w[4], w[5], table, step, None, 1, 1,
                                    x.dtype, backend)
        assert torch.equal(got, want), backend
    lin = QLinear(owner, "lin", torch.nn.Linear(24, 40))
    lin.act_scales, lin.act_shifts = torch.full((2, 1), 0.03), torch.full((2, 1), -0.05)
    xl = torch.randn(10, 24, generator=g)
    args = (lin.weight_q0, lin.weight_scale0, lin.weight_zero0, lin.bias, lin.weight_sum0)
    for backend in ("triton", "reference"):
        want = ops.linear_impl(xl, *args, lin.act_table0, step, backend)
        got = ops.linear_codes_impl(ops.quantize_codes(xl, lin.act_table0, step), *args, lin.act_table0, step,
                                    xl.dtype, backend)
        assert torch.equal(got, want), backend


@pytest.mark.slow
def test_inductor_fuses_the_activation_quantization_into_its_producer():
    """Compiled with inductor (here its CPU code generator; on a GPU its Triton one), GroupNorm + SiLU + a static
    W8A8 conv is one generated kernel that normalises, activates and writes the int8 codes (the per-call table row
    read on the device), then the int8 conv op: the quantization makes no pass over memory of its own."""
    import re

    from torch._inductor.utils import run_and_get_code

    owner, q = _static_conv()
    owner.backend = "reference"  # the generated code calls the op's CPU path
    gn = torch.nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def block(t):
        return q(torch.nn.functional.silu(gn(t)))

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = block(x)
            out, code = run_and_get_code(torch.compile(block, fullgraph=True), x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, eager)
    kernels = set(re.findall(r"cpp_fused_\w+", "\n".join(code)))
    assert len(kernels) == 1, kernels  # one kernel before the int8 op, nothing after it
    (name,) = kernels
    assert all(part in name for part in ("native_group_norm", "silu", "clamp", "index_select")), name
    assert "torch.ops.accel.conv2d_codes.default" in "\n".join(code)


@pytest.mark.slow
def test_inductor_quantizes_q_k_v_in_the_layer_norm_kernel():
    """A LayerNorm feeding three static quantized projections (to_q, to_k, to_v: three calibrated quantizers) is one
    generated kernel that reads the normalised activation once and writes the three int8 codes."""
    import re

    from torch._inductor.utils import run_and_get_code

    owner = QuantizedLayers(accel.Quantize(mode="static"))
    qs = []
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        q = QLinear(owner, name, torch.nn.Linear(32, 32))
        q.act_scales, q.act_shifts = torch.full((2, 1), 0.02 * (i + 1)), torch.full((2, 1), 0.01 * i)
        qs.append(q)
    owner._modules = {q.path: q for q in qs}
    owner._tables_ready()
    ln = torch.nn.LayerNorm(32)
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))

    def attention_inputs(t):
        h = ln(t)
        return [q(h) for q in qs]

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = attention_inputs(x)
            out, code = run_and_get_code(torch.compile(attention_inputs, fullgraph=True), x)
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    text = "\n".join(code)
    kernels = set(re.findall(r"cpp_fused_\w+", text))
    assert len(kernels) == 1 and "native_layer_norm" in next(iter(kernels)), kernels
    assert text.count("torch.ops.accel.linear_codes.default(") == 3
