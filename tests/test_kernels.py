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


@pytest.mark.parametrize("m,k,n", [(5, 40, 9), (16, 64, 16), (3, 7, 33)])
def test_fused_linear_equals_reference(m, k, n):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, m, k, generator=g)
    w = rand_int8(n, k, g=g)
    sw = torch.rand(n, generator=g) / 50
    b = torch.randn(n, generator=g)
    yt = kernels.w8a8_linear(x, w, sw, b, backend="triton")
    yr = kernels.w8a8_linear(x, w, sw, b, backend="reference")
    torch.testing.assert_close(yt, yr, rtol=1e-6, atol=1e-5)


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
