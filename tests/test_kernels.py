"""Triton int8 kernels equal the torch reference on the integers (under TRITON_INTERPRET=1 on CPU)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (no GPU here)

import pytest
import torch
from hypothesis import given, settings, strategies as st

from accel import kernels
from accel.kernels import reference as ref


def rand_int8(*shape, g):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def test_reference_rounding_and_saturation():
    x = torch.tensor([[0.5, -0.5, 1.5, -1.5, 300.0, -300.0, 0.49]])
    q = ref.quantize_static(x, 1.0)
    assert q.tolist() == [[1, -1, 2, -2, 127, -128, 0]]  # half away from zero, clamped, no wrap
    q, s = ref.quantize_per_token(torch.tensor([[0.0, 0.0], [1.0, -2.0]]))
    assert torch.equal(s, torch.tensor([1.0, 2.0]) / 127 * torch.tensor([127.0, 1.0])) and q.tolist() == [[0, 0], [64, -127]]


def test_reference_gemm_is_the_dequantized_product():
    g = torch.Generator().manual_seed(0)
    a, w = rand_int8(5, 33, g=g), rand_int8(7, 33, g=g)
    sa, sw = torch.rand(5, generator=g), torch.rand(7, generator=g)
    za, zw = 3, torch.randint(-5, 5, (7,), generator=g)
    y = ref.w8a8_gemm(a, w, sa, sw, a_zero=za, w_zero=zw, out_dtype=torch.float64)
    expect = (sa[:, None].double() * (a.double() - za)) @ (sw[:, None].double() * (w.double() - zw[:, None])).T
    torch.testing.assert_close(y, expect.float().double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,k", [(1, 1), (3, 31), (17, 100), (8, 64)])
def test_quantize_kernels(m, k):
    g = torch.Generator().manual_seed(m * 100 + k)
    x = torch.randn(m, k, generator=g) * 3
    x[0, 0] = 0.0
    qt, st_ = kernels.quantize_per_token(x, backend="triton")
    qr, sr = kernels.quantize_per_token(x, backend="reference")
    assert torch.equal(qt, qr) and torch.equal(st_, sr)
    zero = torch.zeros(2, k)
    assert torch.equal(kernels.quantize_per_token(zero, backend="triton")[0], torch.zeros(2, k, dtype=torch.int8))
    for scale, zp in [(0.05, 0), (0.013, 7), (1e-3, -20)]:  # includes saturating values
        assert torch.equal(kernels.quantize_static(x, scale, zp, backend="triton"), ref.quantize_static(x, scale, zp))


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 80), st.booleans(), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_gemm_equals_reference(m, n, k, per_row, asym_w, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    a, w = rand_int8(m, k, g=g), rand_int8(n, k, g=g)
    sa = torch.rand(m, generator=g) + 0.01 if per_row else torch.tensor(0.02)
    sw = torch.rand(n, generator=g) + 0.01
    zw = torch.randint(-20, 20, (n,), generator=g) if asym_w else None
    bias = torch.randn(n, generator=g) if with_bias else None
    za = int(torch.randint(-10, 10, (1,), generator=g)) if not per_row else 0
    yt = kernels.w8a8_gemm(a, w, sa, sw, bias, za, zw, backend="triton")
    yr = ref.w8a8_gemm(a, w, sa, sw, bias, za, zw)
    # integers are exact in both; the float epilogue may differ only by rounding order
    torch.testing.assert_close(yt, yr, rtol=1e-6, atol=1e-5)


def test_gemm_integer_accumulator_exact():
    g = torch.Generator().manual_seed(1)
    a, w = rand_int8(19, 77, g=g), rand_int8(23, 77, g=g)
    one = torch.ones(23)
    y = kernels.w8a8_gemm(a, w, torch.tensor(1.0), one, backend="triton", out_dtype=torch.float32)
    assert torch.equal(y.long(), ref.int_matmul(a, w))  # |acc| < 2^24: exact in fp32


@pytest.mark.parametrize("m,k,n,asym", [(5, 40, 9, False), (16, 64, 16, True), (3, 7, 33, True), (1, 24, 8, False)])
def test_dynamic_linear_equals_reference(fused, m, k, n, asym):
    """Dynamic per-token W8A8 (split: the per-token quantize kernel, then the int8 GEMM with per-row scales; fused:
    one kernel) against the reference, and the per-row scales it hands back."""
    from accel.kernels import triton_kernels as tk

    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, m, k, generator=g)
    w = rand_int8(n, k, g=g)
    sw = torch.rand(n, generator=g) / 50
    zw = torch.randint(-9, 9, (n,), generator=g).to(torch.int8) if asym else None
    b = torch.randn(n, generator=g)
    yt = kernels.w8a8_linear(x, w, sw, b, zw, backend="triton")
    yr = kernels.w8a8_linear(x, w, sw, b, zw, backend="reference")
    torch.testing.assert_close(yt, yr, rtol=1e-6, atol=1e-5)
    _, scales = tk.gemm(x.reshape(-1, k), w, sw, w_zero=zw, bias=b)
    torch.testing.assert_close(scales, ref.quantize_per_token(x.reshape(-1, k))[1], rtol=0, atol=0)


@pytest.mark.parametrize("nb,c,h,w,o,kk,stride,pad,asym", [
    (1, 3, 5, 6, 4, 3, 1, 1, False), (2, 5, 7, 7, 6, 3, 2, 1, True), (1, 8, 4, 4, 3, 1, 1, 0, False),
    (1, 4, 6, 5, 5, 3, 1, 0, True)])
def test_conv_implicit_gemm_equals_reference(nb, c, h, w, o, kk, stride, pad, asym):
    g = torch.Generator().manual_seed(c * h + o)
    x = rand_int8(nb, c, h, w, g=g)
    wq = rand_int8(o, c, kk, kk, g=g)
    sw = torch.rand(o, generator=g) / 100
    zw = torch.randint(-9, 9, (o,), generator=g) if asym else None
    b = torch.randn(o, generator=g)
    yt = kernels.w8a8_conv2d(x, wq, 0.03, sw, b, stride, pad, zw, backend="triton")
    yr = kernels.w8a8_conv2d(x, wq, 0.03, sw, b, stride, pad, zw, backend="reference")
    assert yt.shape == yr.shape
    torch.testing.assert_close(yt, yr, rtol=1e-6, atol=1e-5)
    ones = torch.ones(o)
    yi = kernels.w8a8_conv2d(x, wq, 1.0, ones, None, stride, pad, None, backend="triton")
    assert torch.equal(yi.long(), ref.conv2d_int8(x, wq, stride, pad))


def test_backend_choice():
    assert kernels.choose("cpu") == "reference" and kernels.choose("cuda") == "triton"
    with pytest.raises(ValueError):
        kernels.choose("cpu", "cuda-graphs")


# ----------------------------------------------------------------------------------- static layers
@pytest.fixture(params=[False, True], ids=["split", "fused"])
def fused(request, monkeypatch):
    """A static layer both ways: quantize kernel + int8 GEMM/conv (what runs) and quantization in the A load (the
    Triton entry points' ``fuse_quant=True``, handed here to every launch the test's ops make: they do not take the
    argument; a fused run in which no launch got it fails)."""
    took = []
    if request.param:
        tk = kernels.triton_module()
        for name in ("gemm", "conv2d"):
            def fused_entry(*args, _entry=getattr(tk, name), _name=name, **kwargs):
                took.append(_name)
                return _entry(*args, fuse_quant=True, **kwargs)

            monkeypatch.setattr(tk, name, fused_entry)
    yield request.param
    assert took or not request.param, "no Triton launch ran fused"


def _layer(o, c, kh=None, g=None, asym=True):
    """int8 weights as Quantize stores them, with their scales, zero points and dequantized sums."""
    from accel.transforms.quantize import _weight_sums

    shape = (o, c) if kh is None else (o, c, kh, kh)
    w = rand_int8(*shape, g=g)
    if kh is not None:
        w = w.contiguous(memory_format=torch.channels_last)
    ws = torch.rand(o, generator=g) / 60 + 1e-3
    wz = torch.randint(-9, 9, (o,), generator=g).to(torch.int8) if asym else None
    tap, total = _weight_sums(w, ws, wz)
    return w, ws, wz, tap, total


def _table(x, g):
    """A two-call (scale, shift) table from x's range (as calibration makes it); call 1 is the real one."""
    lo, hi = x.float().min(), x.float().max()
    real = torch.stack([(hi - lo) / 2 / 127, (hi + lo) / 2])
    return torch.stack([real * 3, real]), torch.tensor([1], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,asym,shifted", [(7, 40, 9, True, True), (70, 64, 33, False, True),
                                                (33, 96, 70, True, False)])
def test_static_linear_equals_reference(fused, dtype, m, k, n, asym, shifted):
    g = torch.Generator().manual_seed(m + k + n)
    x = (torch.nn.functional.silu(3 * torch.randn(m, k, generator=g))).to(dtype)  # skewed, like the UNet's
    w, ws, wz, _, wsum = _layer(n, k, g=g, asym=asym)
    b = torch.randn(n, generator=g).to(dtype)
    qt, step = _table(x, g)
    args = (x, w, ws, wz, b, wsum if shifted else None, qt, step)
    yt, yr = kernels.linear(*args, backend="triton"), kernels.linear(*args, backend="reference")
    assert yt.dtype == yr.dtype == dtype and yt.shape == (m, n)
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # one rounding of the output
    torch.testing.assert_close(yt.float(), yr.float(), rtol=ulp, atol=ulp)
    # the integers are exact: with unit scales and no shift the output is the integer product of the codes
    one = torch.tensor([[1.0, 0.0]])
    xi = ref.quantize_static(x, qt[1, 0], 0, qt[1, 1]).float()
    yi = kernels.linear(xi, w, torch.ones(n), None, None, None, one, None, backend="triton")
    assert torch.equal(yi.long(), ref.int_matmul(xi.to(torch.int8), w))
    if shifted:  # and close to the float layer it replaces (the shift's product is added back)
        wf = (w.float() - (wz.float()[:, None] if asym else 0)) * ws[:, None]
        yf = x.float() @ wf.T + b.float()
        assert ((yr.float() - yf) ** 2).mean() < 1e-3 * (yf ** 2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nb,c,h,wd,o,kk,stride,pad,layout", [
    (2, 6, 7, 5, 9, 3, 1, 1, "channels_last"), (1, 40, 6, 6, 36, 3, 2, 1, "nchw"),
    (2, 32, 5, 4, 20, 1, 1, 0, "channels_last"), (1, 4, 9, 9, 8, 3, 1, 1, "nchw")])
def test_static_conv_equals_reference(fused, dtype, nb, c, h, wd, o, kk, stride, pad, layout):
    g = torch.Generator().manual_seed(c * h + o + kk)
    x = torch.nn.functional.silu(3 * torch.randn(nb, c, h, wd, generator=g)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, ws, wz, tap, wsum = _layer(o, c, kk, g=g)
    b = torch.randn(o, generator=g).to(dtype)
    qt, step = _table(x, g)
    args = (x, w, ws, qt, wz, b, wsum, tap, step, None, stride, pad)
    yt, yr = kernels.conv2d(*args, backend="triton"), kernels.conv2d(*args, backend="reference")
    assert yt.dtype == dtype and yt.shape == yr.shape and yt.is_contiguous(memory_format=torch.channels_last)
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(yt.float(), yr.float(), rtol=ulp, atol=ulp * yr.float().abs().max().item())
    # the shifted quantizer reproduces the float conv of the zero-padded input (borders included)
    wf = (w.float() - wz.float().view(-1, 1, 1, 1)) * ws.view(-1, 1, 1, 1)
    yf = torch.nn.functional.conv2d(x.float(), wf, b.float(), stride, pad)
    assert ((yr.float() - yf) ** 2).mean() < 1e-3 * (yf ** 2).mean()
    # exact integers: unit scales, no shift
    xi = ref.quantize_static(x, qt[1, 0], 0, qt[1, 1])
    yi = kernels.conv2d(xi.float(), w, torch.ones(o), torch.tensor([[1.0, 0.0]]), stride=stride, padding=pad,
                        backend="triton")
    assert torch.equal(yi.long(), ref.conv2d_int8(xi, w, stride, pad))


def test_split_conv_adds_the_second_half_in_the_kernel(fused):
    """A conv over cat([hidden, skip]) with one quantizer per half: two launches, the second adds the first."""
    g = torch.Generator().manual_seed(11)
    x = torch.nn.functional.silu(2 * torch.randn(2, 12, 5, 6, generator=g)).contiguous(memory_format=torch.channels_last)
    halves = [x[:, :8], x[:, 8:]]
    outs = {}
    for backend in ("triton", "reference"):
        y = None
        for i, xi in enumerate(halves):
            w, ws, wz, tap, wsum = _layer(7, xi.shape[1], 3, g=torch.Generator().manual_seed(i))
            qt, step = _table(xi, g)
            y = kernels.conv2d(xi, w, ws, qt, wz, torch.ones(7) if i == 0 else None, wsum, tap, step, y, 1, 1,
                               backend=backend)
        outs[backend] = y
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-5, atol=1e-5)


def test_custom_ops_fake_and_autograd():
    """torch.library's own checks (schema, fake tensors incl. strides, AOT dispatch, autograd registration),
    and the straight-through gradient: dL/dx through the dequantized weights."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 5, 5, generator=g)
    w, ws, wz, tap, wsum = _layer(4, 6, 3, g=g)
    qt, step = _table(x, g)
    for backend in ("reference", "triton"):
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.library.opcheck(torch.ops.accel.conv2d.default,
                                  (xx, w, ws, wz, None, wsum, tap, qt, step, None, 1, 1, backend))
        x2 = torch.randn(9, 6, generator=g)
        lw, lws, lwz, _, lsum = _layer(5, 6, g=g)
        torch.library.opcheck(torch.ops.accel.linear.default, (x2, lw, lws, lwz, torch.randn(5), lsum, qt, step, backend))
        torch.library.opcheck(torch.ops.accel.linear.default, (x2, lw, lws, None, None, None, None, None, backend))
    xg = x.clone().requires_grad_()
    kernels.conv2d(xg, w, ws, qt, wz, None, wsum, tap, step, None, 1, 1, backend="reference").sum().backward()
    wf = ((w.float() - wz.float().view(-1, 1, 1, 1)) * ws.view(-1, 1, 1, 1))
    xf = x.clone().requires_grad_()
    torch.nn.functional.conv2d(xf, wf, padding=1).sum().backward()
    torch.testing.assert_close(xg.grad, xf.grad)


def test_quantize_table_any_strides():
    """The static quantize kernel writes dense codes, equal to the reference's, from dense and strided inputs (a
    split shortcut's channel halves, row-strided matrices), channels_last codes when the channels are contiguous."""
    from accel.kernels import triton_kernels as tk

    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.silu(3 * torch.randn(2, 12, 5, 6, generator=g))
    qt, step = _table(base, g)
    cases = [base, base.contiguous(memory_format=torch.channels_last), base[:, 4:],
             base.contiguous(memory_format=torch.channels_last)[:, :7], torch.randn(9, 40, generator=g)[:, 3:35],
             torch.randn(9, 40, generator=g)]
    for x in cases:
        q = tk.quantize_table(x, qt, step)
        assert q.dtype == torch.int8 and q.shape == x.shape
        assert q.is_contiguous() or q.is_contiguous(memory_format=torch.channels_last)
        if x.dim() == 4 and x.stride(1) == 1:
            assert q.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(q, ref.quantize_static(x, qt[1, 0], 0, qt[1, 1]))


# ----------------------------------------------------------------------------------- GPU builds (no GPU needed)
def test_tile_configs_per_arch():
    """Every config the autotuner sees on sm_90a meets Triton's conditions for an int8 wgmma (num_warps % 4, BLOCK_M
    % 64, BLOCK_N % 8, BLOCK_K >= 32, 3-4 stages); sm_80/sm_89 keep their mma.sync tiles within sm_89's shared
    memory; the interpreter (these tests) runs its one small config."""
    from accel.kernels import triton_kernels as tk

    assert tk.uses_wgmma(90) and not any(tk.uses_wgmma(a) for a in (80, 86, 89, 100, None))
    for kernel in ("gemm", "conv"):
        hopper = tk.tile_configs(kernel, 90)
        for c in hopper:
            kw = c.kwargs
            assert c.num_warps % 4 == 0 and kw["BLOCK_M"] % 64 == 0 and kw["BLOCK_N"] % 8 == 0, c
            assert kw["BLOCK_K"] >= 32 and c.num_stages in (3, 4), c
        assert tk.conv_configs(hopper, 4) and tk.conv_configs(hopper, 320)  # conv_in's channels and the rest
        assert [str(c) for c in tk.tile_configs(kernel, None)] == [str(c) for c in hopper]
        for arch in (80, 89):
            for c in tk.tile_configs(kernel, arch):
                kw = c.kwargs
                assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] <= 99 * 1024, c
    if tk.INTERPRET:
        assert tk.ARCH is None
        assert [c.kwargs for c in tk.GEMM_CONFIGS] == [c.kwargs for c in tk.CONV_CONFIGS] == \
            [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)]


def test_build_report_flags_builds_without_wgmma():
    """The report's summary counts wgmma and mma.sync builds per arch and fails an sm_90a GEMM/conv build that
    fell back to mma.sync, one that spills, one with a transposed operand, one over the arch's shared memory."""
    from accel.kernels.build_report import summary, summary_lines

    def row(arch, config, wgmma=0, mma=0, spill=0, transposed=False, shared=16384, kernel="gemm"):
        return dict(kernel=kernel, variant=f"{kernel}.codes.fp16", config=config, arch=arch, registers=128,
                    spill_store_bytes=spill, spill_load_bytes=spill, shared_bytes=shared, shared_limit_bytes=101376,
                    wgmma=wgmma, mma_sync=mma, int8_mma=wgmma + mma, operand_transposed=transposed)

    clean = [row("sm_80", "a", mma=16), row("sm_90a", "a", wgmma=2), row("sm_90a", "b", wgmma=4, kernel="conv"),
             dict(row("sm_90a", "q"), kernel="quant_table")]
    s = summary(clean)
    assert s["problems"] == 0 and s["per_arch"]["sm_90a"]["wgmma_builds"] == 2
    lines = summary_lines(s)
    assert "sm_90a: 2/2 GEMM/conv builds use wgmma (0 mma.sync)" in lines[1] and "0 spills" in lines[1]
    assert lines[0].startswith("sm_80: 1/1 GEMM/conv builds use mma.sync") and lines[-1].endswith("all checks pass")
    bad = clean + [row("sm_90a", "c", mma=16), row("sm_90a", "d", wgmma=2, spill=8),
                   row("sm_90a", "e", wgmma=2, transposed=True), row("sm_89", "f", mma=8, shared=120000)]
    s = summary(bad)
    assert s["sm_90a_tensor_core_kernels_without_wgmma"] == ["gemm.codes.fp16 c sm_90a"]
    assert len(s["spilling"]) == len(s["operand_transposed"]) == len(s["over_shared_memory"]) == 1
    assert s["problems"] == 4 and sum(line.startswith("FAIL") for line in summary_lines(s)) == 4


def _build_report(out, *args, jobs=1):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "accel.kernels.build_report", "--out", str(out), "--jobs", str(jobs), *args]
    res = subprocess.run(cmd, cwd=root, env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True,
                         timeout=1200)
    return res, json.loads((out / "report.json").read_text())


def _assert_hopper_builds(report, out):
    for r in report["builds"]:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["registers"] <= 255 and not r["operand_transposed"] and r["shared_bytes"] <= r["shared_limit_bytes"], r
        if r["kernel"] not in ("gemm", "conv"):
            continue
        if r["arch"] == "sm_90a":  # every GEMM/conv: wgmma, nothing left on mma.sync, Triton applied MMA v3
            assert r["wgmma"] > 0 and r["mma_sync"] == 0 and not r["mma_v3_not_applied"], r
            assert r["cp_async"] > 0, r  # a pipelined K loop
            assert "wgmma.mma_async" in (out / r["ptx"]).read_text()
        else:
            assert r["mma_sync"] > 0 and r["wgmma"] == 0, r


def test_build_report_sm90a_uses_wgmma(tmp_path):
    """A GEMM and a conv (the ones a static fp16 layer runs, with their sub-variants) in their 128x128 tile, for
    sm_90a and sm_89: wgmma on sm_90a, mma.sync on sm_89, no spills, and the report's summary line and exit code."""
    res, report = _build_report(tmp_path, "--arch", "89", "90", "--only", "gemm.codes.fp16", "conv.codes.fp16.3x3",
                                "--configs", "128x128")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = report["builds"]
    assert {r["arch"] for r in rows} == {"sm_89", "sm_90a"} and {r["kernel"] for r in rows} == {"gemm", "conv"}
    _assert_hopper_builds(report, tmp_path)
    n = sum(r["arch"] == "sm_90a" for r in rows)
    assert n == 4 and f"sm_90a: {n}/{n} GEMM/conv builds use wgmma (0 mma.sync)" in res.stdout
    assert report["summary"]["problems"] == 0


@pytest.mark.slow
def test_build_report_every_sm90a_gemm_and_conv_uses_wgmma(tmp_path):
    """Every GEMM/conv variant in every config the sm_90a autotuner has: wgmma, no spills (about 100 builds)."""
    from accel.kernels.build_report import VARIANTS

    res, report = _build_report(tmp_path, "--arch", "90", "--only", "gemm", "conv", jobs=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {r["variant"] for r in report["builds"]} == {v for v in VARIANTS if v.split(".")[0] in ("gemm", "conv")}
    _assert_hopper_builds(report, tmp_path)
    s = report["summary"]["per_arch"]["sm_90a"]
    assert s["wgmma_builds"] == s["tensor_core_builds"] == s["builds"] and s["spilling"] == 0
