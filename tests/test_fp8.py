"""Quantize(dtype="fp8"): float8 e4m3 Linear layers and 1x1 convs (accel.kernels.fp8), k x k convs int8."""
import pytest
import torch
import torch.nn as nn

import accel
from accel.calibrate import calibrate
from accel.kernels import fp8
from accel.transforms.quantize import (QConv1x1FP8, QConv2d, QLinear, QLinearFP8, Quantize, QuantizedLayers,
                                      weight_bytes)

from conftest import make_pipe, pipe_inputs


def _owner(mode="dynamic", **kw):
    owner = QuantizedLayers(Quantize(dtype="fp8", backend="reference", **kw))
    owner._mode = mode
    return owner


def test_float8_codes_round_trip_and_saturate():
    x = torch.tensor([0.0, 1.0, -1.0, 448.0, -448.0, 500.0, -1e4, 0.3, 2.0 ** -9, 17.0])
    q = fp8.to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.element_size() == 1
    back = q.float()
    assert torch.isfinite(back).all() and back[5] == 448 and back[6] == -448  # saturated, not NaN
    assert torch.equal(back[[0, 1, 2, 3, 4, 8]], x[[0, 1, 2, 3, 4, 8]])  # representable values are exact
    assert back[7] == 0.3125 and back[9] == 16.0  # 3 mantissa bits, round to nearest (even)
    assert torch.equal(fp8.to_fp8(back).float(), back)  # idempotent


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv1x1_split"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_emulation_equals_an_independent_float8_round_trip(kind, mode):
    """The layer's reference computes what casting the scaled weight and activation to float8 and back, then a
    float64 product, gives (``fp8.emulate_linear``: written from the definition, per input part)."""
    g = torch.Generator().manual_seed(0)
    owner = _owner(mode)
    if kind == "linear":
        m = nn.Linear(32, 16)
        x = torch.randn(3, 5, 32, generator=g)
        q = QLinearFP8(owner, "l", m)
    else:
        m = nn.Conv2d(24, 16, 1)
        x = torch.nn.functional.silu(2 * torch.randn(2, 24, 5, 4, generator=g)).contiguous(
            memory_format=torch.channels_last)
        q = QConv1x1FP8(owner, "c", m, 8 if kind == "conv1x1_split" else None)
    assert q.weight_q0.dtype == torch.float8_e4m3fn and q.weight_zero0 is None
    parts = q._inputs(x)
    scales = shifts = None
    if mode == "static":  # int8-convention scales, as a calibration stores them (range / 127), and range centres
        lo = torch.tensor([p.min().item() for p in parts])
        hi = torch.tensor([p.max().item() for p in parts])
        shifts, scales = (hi + lo) / 2, (hi - lo) / 2 / 127
        q.act_scales, q.act_shifts = scales[None], shifts[None]
        owner.set_step(0)
    with torch.no_grad():
        y = q(x)
    ws = [m.weight] if q.split is None else [m.weight[:, :q.split], m.weight[:, q.split:]]
    expect = 0
    for i, (p, w) in enumerate(zip(parts, ws)):
        rows = p if kind == "linear" else p.permute(0, 2, 3, 1)
        kw = {} if mode == "dynamic" else dict(scale=scales[i].item() * 127 / 448, shift=shifts[i].item())
        expect = expect + fp8.emulate_linear(rows, w.reshape(w.shape[0], -1), **kw)
    expect = expect + m.bias.double()
    if kind != "linear":
        expect = expect.permute(0, 3, 1, 2)
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    ref = m(x)
    assert ((y - ref) ** 2).mean() < 5e-3 * (ref ** 2).mean()  # float8: 3 mantissa bits, ~3.6% rms per operand


@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_backend_equals_reference(static):
    """The GPU path's code (``torch._scaled_mm`` with a row-major A, a column-major B = the stored weight's
    transpose, float32 scale tensors, float32 out) runs on CPU too: same result as the emulation."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(20, 48, generator=g), torch.randn(32, 48, generator=g)
    qw, sw = fp8.quantize_weight(w)
    assert qw.shape == (32, 48) and qw.is_contiguous() and qw.t().stride() == (1, 48)  # b: column-major
    bias, w_sum = torch.randn(32, generator=g), fp8.weight_sum(qw, sw)
    table = torch.tensor([[0.5, 0.0], [0.02, 0.3]]) if static else None
    step = torch.tensor([1], dtype=torch.int32) if static else None
    args = (x, qw, sw, bias, w_sum if static else None, table, step, None)
    a, b = fp8.fp8_linear_impl(*args, "scaled_mm"), fp8.fp8_linear_impl(*args, "reference")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_straight_through_backward():
    m = nn.Linear(16, 8)
    q = QLinearFP8(_owner(), "l", m)
    x = torch.randn(4, 16, requires_grad=True)
    q(x).sum().backward()
    w_deq = q.weight_q0.float() * q.weight_scale0[:, None]
    torch.testing.assert_close(x.grad, w_deq.sum(0).expand(4, 16))


def test_layers_weight_bytes_and_remove_restores_exactly(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    base = pipe(**pipe_inputs("sd", steps=4)).images
    originals = dict(pipe.unet.named_modules())
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    int8_bytes = None
    with accel.apply(pipe, accel.Quantize()):
        int8_bytes = weight_bytes(pipe.unet)
    h = accel.apply(pipe, accel.Quantize(dtype="fp8"))
    kinds = {}
    for path, m in pipe.unet.named_modules():
        if isinstance(m, (QLinear, QConv2d)):
            kinds.setdefault(type(m).__name__, []).append(path)
            src = originals[path]
            if isinstance(m, (QLinearFP8, QConv1x1FP8)):
                assert m.weight_q0.dtype == torch.float8_e4m3fn
                assert isinstance(src, nn.Linear) or src.kernel_size == (1, 1)
            else:
                assert m.weight_q0.dtype == torch.int8 and src.kernel_size != (1, 1)
    assert set(kinds) == {"QLinearFP8", "QConv1x1FP8", "QConv2d"}
    assert "down_blocks.0.attentions.0.proj_in" in kinds["QConv1x1FP8"]  # SD 1.x's 1x1 projections
    assert "up_blocks.3.resnets.0.conv_shortcut" in kinds["QConv1x1FP8"]  # a split 1x1 conv
    assert "down_blocks.0.resnets.0.conv1" in kinds["QConv2d"]
    # 1 byte per float8 weight, like int8; a float32 scale per output channel and no zero points
    expected = 0
    for m in pipe.unet.modules():
        if isinstance(m, (QLinearFP8, QConv1x1FP8)):
            for i in range(m.parts):
                w = getattr(m, f"weight_q{i}")
                expected += w.numel() + 4 * w.shape[0]
            expected += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        elif isinstance(m, QConv2d):
            expected += m.weight_bytes()
        else:
            expected += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    assert weight_bytes(pipe.unet) == expected < int8_bytes  # no zero points
    out = pipe(**pipe_inputs("sd", steps=4)).images
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert ((out - base) ** 2).mean() < 0.05 * (base ** 2).mean()
    h.remove()
    assert all(m is originals[n] for n, m in pipe.unet.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(pipe(**pipe_inputs("sd", steps=4)).images, base)


def _psnr(pipe, transforms, calibration, prompts, steps):
    from accel.eval import psnr
    from accel.miniature import GUIDANCE

    def images():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images

    base = images()
    with accel.apply(pipe, transforms, calibration=calibration):
        out = images()
    return psnr(out, base).mean().item()


def test_miniature_fidelity_static_and_dynamic():
    """On the trained miniature: fp8 W8A8 (static, from the same calibration as int8, and dynamic) stays far above
    noise against the float pipeline (an attribute flip is ~12 dB), below int8: e4m3 keeps 3 mantissa bits, a
    ~-29 dB relative error per activation wherever it lies in the range, where int8 over a calibrated range does
    better (here: int8 34.2, fp8 static 26.0, dynamic 26.9 dB; at 50 steps on 32 held-out prompts see the commit
    adding kernels/fp8.py)."""
    from accel import miniature
    from accel.miniature import GUIDANCE

    pipe = miniature.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    steps, ends = 8, ["conv_in", "conv_out"]
    cal = calibrate(pipe, "w8a8", miniature.prompts(2, seed=0, split="train"), steps=steps, guidance=GUIDANCE,
                    batch_size=2, progress=False)
    prompts = miniature.prompts(2, seed=0)
    db = {name: _psnr(pipe, t, cal, prompts, steps) for name, t in [
        ("int8", accel.Quantize(mode="static", exclude=ends)),
        ("fp8", accel.Quantize(dtype="fp8", mode="static", exclude=ends)),
        ("fp8 dynamic", accel.Quantize(dtype="fp8", mode="dynamic", exclude=ends))]}
    print({k: round(v, 2) for k, v in db.items()})
    assert db["int8"] > 30 and db["fp8"] > 22 and db["fp8 dynamic"] > 22, db


def _capturing_aot_eager(graphs):
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, inputs):
        graphs.append(gm)
        return aot_eager(gm, inputs)

    return backend


def test_torch_compile_fullgraph_one_op_per_layer(tokenizer_dir):
    """Static (per-call scales from a calibration, picked on the device by the step tensor): a UNet call compiles
    into one graph (fullgraph=True, aot_eager) with one accel::fp8_linear node per float8 layer part, equal to
    eager; another step reuses the graph (no recompilation). Dynamic layers too (per-token amax inside the op)."""
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    cal = calibrate(pipe, "w8a8", ["a red circle", "a blue square"], steps=4, batch_size=2, progress=False)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([10, 500])
    graphs = []
    torch._dynamo.reset()
    with accel.apply(pipe, accel.Quantize(dtype="fp8", mode="static", exclude=["conv_in", "conv_out"]),
                     calibration=cal) as h:
        q = h.applied(accel.Quantize)
        fn = torch.compile(lambda *a, **k: type(unet).forward(unet, *a, **k), fullgraph=True,
                           backend=_capturing_aot_eager(graphs))
        with torch.no_grad():
            for step in (0, 2):
                q.set_step(step)
                eager = type(unet).forward(unet, x, t, encoder_hidden_states=ctx).sample
                out = fn(x, t, encoder_hidden_states=ctx).sample
                torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        layers = [m for m in unet.modules() if isinstance(m, (QLinearFP8, QConv1x1FP8))]
        nodes = [n for n in graphs[0].graph.nodes if "fp8_linear" in str(n.target)]
        assert len(graphs) == 1 and len(nodes) == sum(m.parts for m in layers) > 0
    owner = _owner("dynamic")
    for layer, inp in [(QLinearFP8(owner, "l", nn.Linear(16, 32)), torch.randn(2, 3, 16)),
                       (QConv1x1FP8(owner, "c", nn.Conv2d(16, 8, 1), 4), torch.randn(2, 16, 3, 3))]:
        graphs.clear()
        torch._dynamo.reset()
        out = torch.compile(layer, fullgraph=True, backend=_capturing_aot_eager(graphs))(inp)
        torch.testing.assert_close(out, layer(inp))
        assert sum("fp8_linear" in str(n.target) for n in graphs[0].graph.nodes) == layer.parts
    torch._dynamo.reset()


def test_bad_input_and_old_gpus(monkeypatch):
    with pytest.raises(ValueError, match="dtype must be 'int8' or 'fp8'") as e:
        accel.Quantize(dtype="fp4")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="dtype"):
        accel.Transform.from_dict({"type": "Quantize", "dtype": "float8"})
    q = accel.Quantize(dtype="fp8")
    assert q.to_dict()["dtype"] == "fp8" and q.to_dict_fields()["dtype"] == "fp8"
    assert accel.Quantize().to_dict()["dtype"] == "int8"
    assert accel.Transform.from_dict(q.to_dict()).dtype == "fp8"
    # an A100 (sm_80) has no float8 tensor cores: a one-line error when the layers are built (at apply)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8\.9\+.*sm_80.*dtype='int8'") as e:
        fp8.check_device("cuda")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_device("cuda")  # an H100 / H200
    fp8.check_device("cpu")  # the emulation
