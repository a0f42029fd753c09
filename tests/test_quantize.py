"""W8A8 Quantize transform on real diffusers UNets."""
import pytest
import torch
import torch.nn as nn

import accel
from accel.calibrate import calibrate
from accel.errors import CalibrationError
from accel.transforms.quantize import QConv2d, QLinear, _split_point, mse_scale, quantize_weight, weight_bytes

from conftest import make_pipe, pipe_inputs, tiny_unet


def test_weight_quantization_is_int8_and_accurate():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g)
    w[0, 0, 0, 0] = 25.0  # an outlier: the clip search should not let it set the whole channel's scale
    for sym in (True, False):
        q, s, z = quantize_weight(w, symmetric=sym)
        assert q.dtype == torch.int8 and s.shape == (16,) and (z is None) == sym
        deq = (q.float() - (0 if z is None else z.view(-1, 1, 1, 1))) * s.view(-1, 1, 1, 1)
        err = (deq - w)[1:].abs().max()
        assert err < 0.05  # one step of the int8 grid for N(0,1) weights
        plain = quantize_weight(w, symmetric=sym, search=False)
        deq_p = (plain[0].float() - (0 if plain[2] is None else plain[2].view(-1, 1, 1, 1))) * plain[1].view(-1, 1, 1, 1)
        assert ((deq - w).abs() ** 2.4).sum() <= ((deq_p - w).abs() ** 2.4).sum() + 1e-6


def test_modules_swapped_and_restored_exactly(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    base = pipe(**pipe_inputs("sd", steps=4)).images
    originals = {n: m for n, m in pipe.unet.named_modules()}
    before = weight_bytes(pipe.unet)
    h = accel.apply(pipe, accel.Quantize())
    qs = [m for m in pipe.unet.modules() if isinstance(m, (QLinear, QConv2d))]
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in originals.values())
    assert len(qs) == n_layers
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in pipe.unet.modules())
    assert weight_bytes(pipe.unet) < before / 2.5  # tiny channels: norms and biases weigh relatively more
    out = pipe(**pipe_inputs("sd", steps=4)).images
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    rel = ((out - base) ** 2).mean() / (base ** 2).mean()
    assert rel < 0.05
    h.remove()
    assert all(m is originals[n] for n, m in pipe.unet.named_modules())
    assert torch.equal(pipe(**pipe_inputs("sd", steps=4)).images, base)


def test_split_shortcut_points():
    unet = tiny_unet()  # block_out_channels (8, 16, 16, 16)
    for path, m in unet.named_modules():
        if path.startswith("up_blocks") and path.endswith(("resnets.0.conv1", "resnets.2.conv_shortcut")):
            split = _split_point(unet, path, m)
            assert split is not None and 0 < split < m.in_channels
    assert _split_point(unet, "up_blocks.3.resnets.2.conv_shortcut", unet.up_blocks[3].resnets[2].conv_shortcut) == 8
    assert _split_point(unet, "up_blocks.0.resnets.0.conv1", unet.up_blocks[0].resnets[0].conv1) == 16
    assert _split_point(unet, "down_blocks.0.resnets.0.conv1", unet.down_blocks[0].resnets[0].conv1) is None


def test_filter_and_exclude(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    with accel.apply(pipe, accel.Quantize(exclude=["conv_in", "conv_out", "*.attn*"])):
        assert isinstance(pipe.unet.conv_in, nn.Conv2d) and isinstance(pipe.unet.conv_out, nn.Conv2d)
        assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, nn.Linear)
        assert isinstance(pipe.unet.down_blocks[0].resnets[0].conv1, QConv2d)
    with accel.apply(pipe.unet, accel.Quantize(filter_fn=lambda m, p: isinstance(m, nn.Linear))):  # bare UNet is fine
        assert isinstance(pipe.unet.conv_in, nn.Conv2d)
        assert isinstance(pipe.unet.time_embedding.linear_1, QLinear)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_split"])
def test_triton_backend_equals_reference_module(kind):
    from accel.transforms.quantize import Quantize, QuantizedLayers

    g = torch.Generator().manual_seed(3)
    owner_r, owner_t = QuantizedLayers(Quantize(backend="reference")), QuantizedLayers(Quantize(backend="triton"))
    if kind == "linear":
        m = nn.Linear(24, 10)
        x = torch.randn(2, 5, 24, generator=g)
        qr, qt = QLinear(owner_r, "l", m), QLinear(owner_t, "l", m)
    else:
        m = nn.Conv2d(12, 6, 3, padding=1)
        x = torch.randn(2, 12, 5, 5, generator=g)
        split = 4 if kind == "conv_split" else None
        qr, qt = QConv2d(owner_r, "c", m, split), QConv2d(owner_t, "c", m, split)
    for owner in (owner_r, owner_t):
        owner._mode = "dynamic"
    yr, yt = qr(x), qt(x)
    torch.testing.assert_close(yt, yr, rtol=1e-5, atol=1e-5)
    ref = m(x)
    assert ((yr - ref) ** 2).mean() < 0.01 * (ref ** 2).mean()


def test_static_needs_calibration_and_composes(tokenizer_dir, tmp_path):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    with pytest.raises(CalibrationError, match="activation scales"):
        accel.apply(pipe, accel.Quantize(mode="static"))
    prompts = ["a red circle", "a blue square", "a green cross", "a small yellow triangle"]
    cal = calibrate(pipe, "cachequant-w8a8", prompts, steps=8, budget=3, batch_size=2, progress=False)
    assert cal.meta["quant"]["dec_layers"] == []  # the recipe has no quantization DEC (measured not to help)
    assert cal.meta["cache"]["refined"]["taylor1+skill.3"]["quantized"]
    cal.save(tmp_path / "c")
    base = pipe(**pipe_inputs("sd", steps=8)).images
    with accel.apply(pipe, "cachequant-w8a8", calibration=tmp_path / "c") as h:
        assert [type(t).__name__ for t in h.transforms] == ["Quantize", "FeatureCache"]
        out = pipe(**pipe_inputs("sd", steps=8)).images
        assert torch.isfinite(out).all()
        with pytest.raises(CalibrationError, match="recalibrate"):
            pipe(**pipe_inputs("sd", steps=12))
    assert torch.equal(pipe(**pipe_inputs("sd", steps=8)).images, base)
    with accel.apply(pipe, "w8a8", calibration=tmp_path / "c"):  # static scales from the same calibration
        assert torch.isfinite(pipe(**pipe_inputs("sd", steps=8)).images).all()


def test_cache_schedule_is_fit_with_the_quantizer_running(tokenizer_dir):
    """cachequant-w8a8: the activation scales come first, then the refinement measures each schedule with the
    quantized model running (its stored DP error is what [Quantize, FeatureCache] on the DP schedule gives, not
    what the float model with the cache gives); the quantization DEC, when a recipe asks for it, is measured on
    the final schedule."""
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    prompts, steps, guidance = ["a red circle", "a blue square"], 8, 7.5
    cal = calibrate(pipe, "cachequant-w8a8", prompts, steps=steps, budget=3, batch_size=2, refine_evals=4,
                    progress=False)
    rec = cal.meta["cache"]["refined"]["taylor1+skill.3"]
    assert rec["quantized"] and rec["prompts"] == 2
    assert cal.meta["cache"]["schedule"] == cal.tensors["cache.b0.refined.taylor1+skill.3"].tolist()  # what runs

    def error_db(transforms):
        def latents():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                        generator=[torch.Generator().manual_seed(i) for i in range(2)]).images.double()
        base = latents()
        with accel.apply(pipe, transforms, calibration=cal):
            d = latents() - base
        return (10 * torch.log10((d ** 2).flatten(1).mean(1).clamp_min(1e-30))).mean().item()

    fc = lambda: accel.FeatureCache(schedule=rec["dp"], forecast="taylor1", trust="skill")
    quantized = error_db([accel.Quantize(mode="static", exclude=["conv_in", "conv_out"]), fc()])
    assert rec["dp_error_db"] == pytest.approx(quantized, abs=1e-3)
    assert abs(error_db(fc()) - quantized) > 0.1  # the float model with the cache scores differently
    assert rec["error_db"] <= rec["dp_error_db"]
    paper = accel.Recipe("paper", [accel.Quantize(mode="static", correction="dec"),
                                   accel.FeatureCache(schedule="calibrated", correction="dec")])
    cal = calibrate(pipe, paper, prompts, steps=steps, budget=3, batch_size=2, refine_evals=2, progress=False)
    assert cal.meta["cache"]["refined"]["3"]["quantized"]
    assert cal.meta["quant"]["dec_layers"] == ["up_blocks.3.resnets.2.conv1", "up_blocks.3.resnets.2.conv_shortcut"]
    with accel.apply(pipe, paper, calibration=cal):
        assert torch.isfinite(pipe(**pipe_inputs("sd", steps=steps)).images).all()


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_split", "conv_stride2"])
def test_asymmetric_activations_shift_exactly_and_help_on_skewed_inputs(kind):
    """x = m + s q: the shift's product is added back exactly (borders of a zero-padded conv included), so a
    constant input offset costs nothing, and on SiLU-like inputs the error is smaller than symmetric."""
    from accel.transforms.quantize import Quantize, QuantizedLayers

    g = torch.Generator().manual_seed(5)
    if kind == "linear":
        m, shape = nn.Linear(32, 16), (3, 7, 32)
    else:
        m = nn.Conv2d(16, 8, 3, padding=1, stride=2 if kind == "conv_stride2" else 1)
        shape = (2, 16, 6, 6)
    errors = {}
    for scheme in ("asymmetric", "symmetric"):
        owner = QuantizedLayers(Quantize(backend="reference", act_scheme=scheme))
        owner._mode = "static"
        split = 6 if kind == "conv_split" else None
        q = QLinear(owner, "l", m) if kind == "linear" else QConv2d(owner, "c", m, split)
        # an input that is a pure offset is reproduced up to the weights' rounding only
        const = torch.full(shape, 3.0)
        q.act_scales = torch.full((1, q.parts), 1e-3 if scheme == "asymmetric" else 3.0 / 127)
        q.act_shifts = torch.full((1, q.parts), 3.0)
        owner.set_step(0)
        with torch.no_grad():
            ref = m(const)
            err = ((q(const) - ref) ** 2).mean() / (ref ** 2).mean()
        if scheme == "asymmetric":
            assert err < 1e-4, err  # without the border correction a padded conv is off by O(1) at its edges
        # SiLU-like activations: calibrate each scheme on them as accel calibrate does, compare the errors
        x = torch.nn.functional.silu(3 * torch.randn(shape, generator=g))
        parts = q._inputs(x)
        lo = torch.tensor([min(p.min().item(), 0) for p in parts])
        hi = torch.tensor([max(p.max().item(), 0) for p in parts])
        if scheme == "asymmetric":
            shift = (hi + lo) / 2
            scale = [mse_scale(p.reshape(-1) - c, (h - l).item() / 2) for p, c, l, h in zip(parts, shift, lo, hi)]
        else:
            shift = torch.zeros(len(parts))
            scale = [mse_scale(p.reshape(-1), max(-l.item(), h.item())) for p, l, h in zip(parts, lo, hi)]
        q.act_scales, q.act_shifts = torch.tensor([scale]), shift[None]
        with torch.no_grad():
            errors[scheme] = (((q(x) - m(x)) ** 2).mean() / (m(x) ** 2).mean()).item()
    assert errors["asymmetric"] < errors["symmetric"], errors
