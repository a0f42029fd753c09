"""Where a quantized UNet's memory is: the int8 layers on the UNet's device, the float layers kept for ``remove()``
in host memory (brought back to the device for ``remove()`` and for LoRA loading/fusing), or dropped
(``Quantize(keep_float=False)``). On CPU host and device are one memory, so the moves are observed through the
one function that makes them (``quantize._move_tensors``)."""
import pytest
import torch
import torch.nn as nn
from peft import LoraConfig

import accel
from accel.errors import IrreversibleError
from accel.transforms import quantize
from accel.transforms.quantize import _QBase, device_bytes

from conftest import make_pipe, pipe_inputs

STEPS = 4


def fresh(tokenizer_dir):
    return make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")


def run(pipe):
    return pipe(**pipe_inputs("sd", steps=STEPS)).images


def snapshot(unet):
    """Every parameter and buffer: the object, and a copy of its value, dtype, strides and device."""
    out = {}
    for name, t in list(unet.named_parameters()) + list(unet.named_buffers()):
        out[name] = (t, t.detach().clone(), t.dtype, t.stride(), t.device)
    return out


def assert_restored(unet, snap):
    now = dict(list(unet.named_parameters()) + list(unet.named_buffers()))
    assert now.keys() == snap.keys()
    for name, (obj, value, dtype, stride, device) in snap.items():
        t = now[name]
        assert t is obj, name  # the same Parameter objects (optimizers, peft hold them)
        assert (t.dtype, t.stride(), t.device) == (dtype, stride, device), name
        assert torch.equal(t, value), name


class MoveSpy:
    """Records ``(module, device type)`` for every move of a float layer's tensors, and makes it."""

    def __init__(self, monkeypatch):
        self.calls, real = [], quantize._move_tensors

        def spy(m, device):
            self.calls.append((m, torch.device(device).type))
            real(m, device)

        monkeypatch.setattr(quantize, "_move_tensors", spy)


def float_layers(pipe):
    return [m for m in pipe.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_float_layers_go_to_host_memory_and_come_back_for_remove(tokenizer_dir, monkeypatch):
    pipe = fresh(tokenizer_dir)
    pipe.unet.to(memory_format=torch.channels_last)  # strides are part of "exactly as before"
    base = run(pipe)
    snap = snapshot(pipe.unet)
    floats = float_layers(pipe)
    spy = MoveSpy(monkeypatch)
    h = accel.apply(pipe, accel.Quantize(clip_search=False))
    offloaded = [m for m, dev in spy.calls if dev == "cpu"]
    assert {id(m) for m in offloaded} == {id(m) for m in floats}  # every float layer sent to host memory at apply
    quantized = [m for m in pipe.unet.modules() if isinstance(m, _QBase)]
    assert {id(q.source) for q in quantized} == {id(m) for m in floats}
    assert torch.isfinite(run(pipe)).all()
    spy.calls.clear()
    h.remove()
    # before the swap back, each float layer was sent to the device its quantized layer ran on
    assert {id(m) for m, _ in spy.calls} == {id(m) for m in floats}
    assert_restored(pipe.unet, snap)
    assert torch.equal(run(pipe), base)


def test_move_keeps_parameters_strides_and_bits():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    conv.weight.grad = torch.randn_like(conv.weight)
    w, value, stride = conv.weight, conv.weight.detach().clone(), conv.weight.stride()
    quantize._move_tensors(conv, torch.device("cpu"))
    assert conv.weight is w and conv.weight.stride() == stride and torch.equal(conv.weight, value)
    assert conv.weight.grad is not None


def test_device_bytes_count_what_a_call_reads(tokenizer_dir):
    """The UNet's device bytes: the int8 layers and their tables, not the float layers kept in host memory. On
    the miniature (small channels: each output channel's scales, weight sums and border-tap sums weigh more than
    on SD 1.5, where `accel bench` reports the same figure) they are under 0.56x of the fp16 UNet's."""
    from accel import miniature

    pipe = miniature.load_pipeline()
    unet = pipe.unet.to(torch.float16)
    fp16 = device_bytes(unet)
    assert fp16 == sum(t.numel() * t.element_size() for t in list(unet.parameters()) + list(unet.buffers()))
    h = accel.apply(pipe, accel.Quantize(mode="dynamic", clip_search=False))
    try:
        q = device_bytes(unet)
        assert q < 0.56 * fp16, q / fp16
        assert q >= quantize.weight_bytes(unet)  # + the derived sums and tables the kernels read
    finally:
        h.remove()
    assert device_bytes(unet) == fp16


def test_keep_float_false_drops_the_float_layers_and_refuses_remove(tokenizer_dir):
    pipe = fresh(tokenizer_dir)
    kept = accel.apply(pipe, accel.Quantize(clip_search=False))
    want = run(pipe)
    kept.remove()
    floats = float_layers(pipe)
    h = accel.apply(pipe, accel.Quantize(clip_search=False, keep_float=False))
    quantized = [m for m in pipe.unet.modules() if isinstance(m, _QBase)]
    assert len(quantized) == len(floats)
    with pytest.raises(AttributeError, match="keep_float=False"):
        quantized[0].source
    assert torch.equal(run(pipe), want)  # the same int8 model
    with pytest.raises(IrreversibleError, match="keep_float=False") as e:
        h.remove()
    assert "\n" not in str(e.value)
    assert h.active and [m for m in pipe.unet.modules() if isinstance(m, _QBase)] == quantized  # nothing undone
    assert torch.equal(run(pipe), want)
    with pytest.raises(IrreversibleError, match="before accel.apply"):
        pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), "late")
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())


def test_keep_float_in_recipes_and_bad_values():
    t = accel.Quantize(keep_float=False)
    assert t.to_dict()["keep_float"] is False
    assert accel.Transform.from_dict(t.to_dict()).keep_float is False
    with pytest.raises(ValueError, match="keep_float"):
        accel.Quantize(keep_float="no")


def test_keep_float_false_apply_that_fails_still_undoes_itself(tokenizer_dir):
    """The float layers are dropped only once every transform is attached: a failing apply restores the model."""
    pipe = fresh(tokenizer_dir)
    snap = snapshot(pipe.unet)
    with pytest.raises(accel.CalibrationError):  # the cache's calibrated schedule needs a calibration
        accel.apply(pipe, [accel.Quantize(keep_float=False), accel.FeatureCache(schedule="calibrated")])
    assert_restored(pipe.unet, snap)


def test_lora_loaded_and_fused_after_w8a8_sees_the_float_layers_on_the_device(tokenizer_dir, monkeypatch):
    """peft places a new adapter on its base layer's device and fuses into the base weight: while it does, the
    float layers are in place and on the quantized layers' device; after, they go back to host memory."""
    pipe = fresh(tokenizer_dir)
    seen = {}
    real_add = type(pipe.unet).add_adapter

    def watch(unet, *a, **kw):
        seen["float in place"] = not any(isinstance(m, _QBase) for m in unet.modules())
        seen["moves before"] = len(spy.calls)
        return real_add(unet, *a, **kw)

    monkeypatch.setattr(type(pipe.unet), "add_adapter", watch)  # before apply: accel wraps what it finds there
    h = accel.apply(pipe, accel.Quantize(clip_search=False))
    without = run(pipe)
    spy = MoveSpy(monkeypatch)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False),
                          "late")
    assert seen["float in place"] and seen["moves before"] > 0
    assert spy.calls[-1][1] == "cpu"  # aside again
    assert not torch.equal(run(pipe), without)
    to_q = {id(m): m for m in pipe.unet.modules() if isinstance(m, _QBase) and m.path.endswith("to_q")}
    weights = {i: q.source.weight.detach().clone() for i, q in to_q.items()}
    spy.calls.clear()
    pipe.unet.fuse_lora()  # into the float weights (on the device), then re-quantized before the next call
    run(pipe)
    assert {dev for _, dev in spy.calls} == {"cpu"} and len(spy.calls) >= 2 * len(to_q)  # there and back
    assert spy.calls[-1][1] == "cpu"
    now = [m for m in pipe.unet.modules() if isinstance(m, _QBase) and m.path.endswith("to_q")]
    assert now and not any(id(q) in to_q for q in now)  # re-quantized
    assert all(not torch.equal(q.source.weight, weights[i]) for i, q in to_q.items())  # the adapter is in them
    # (the fused result against W8A8 of the LoRA fused before apply: tests/test_lora.py)
    h.remove()
    assert not any(isinstance(m, _QBase) for m in pipe.unet.modules())
