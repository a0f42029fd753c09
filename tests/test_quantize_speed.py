"""``Quantize(select="speed")``: only the layers whose quantized layer measured faster than the float one at their
shape, measured once per device and kept in the user's cache folder (here a temporary one)."""
import warnings

import pytest
import torch
import torch.nn as nn

import accel
from accel.errors import AccelWarning
from accel.transforms import speed
from accel.transforms.quantize import _QBase

from conftest import make_pipe, pipe_inputs


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fresh(tokenizer_dir):
    return make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")


def float_layers(unet):
    return {p: m for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def quantized_paths(unet):
    return {m.path for m in unet.modules() if isinstance(m, _QBase)}


def test_the_table_decides_and_nothing_is_measured_again(tokenizer_dir, cache_dir, monkeypatch):
    pipe = fresh(tokenizer_dir)
    layers = float_layers(pipe.unet)
    shapes = speed.layer_inputs(pipe.unet, pipe, layers)
    assert set(shapes) == set(layers)  # every layer runs at the default size
    table, dev = speed.SpeedTable(), speed.device_key(torch.device("cpu"))
    for path, m in layers.items():  # as if measured: the Linear layers faster quantized, the convs not
        table.put(dev, speed.shape_key(m, shapes[path], torch.float32, "int8"), 1.0,
                  0.5 if isinstance(m, nn.Linear) else 2.0)
    table.save()
    assert (cache_dir / "layer-speed.json").exists()
    monkeypatch.setattr(speed, "measure", lambda *a: pytest.fail("measured although the table has every shape"))
    base = pipe(**pipe_inputs("sd", steps=3)).images
    h = accel.apply(pipe, accel.Quantize(select="speed", clip_search=False))
    assert quantized_paths(pipe.unet) == {p for p, m in layers.items() if isinstance(m, nn.Linear)}
    assert not any(isinstance(m, nn.Linear) for m in pipe.unet.modules())
    assert any(isinstance(m, nn.Conv2d) for m in pipe.unet.modules())  # the convs stay in float
    assert torch.isfinite(pipe(**pipe_inputs("sd", steps=3)).images).all()
    h.remove()
    assert torch.equal(pipe(**pipe_inputs("sd", steps=3)).images, base)
    assert float_layers(pipe.unet) == layers


def test_first_use_measures_and_writes_the_table(tokenizer_dir, cache_dir, monkeypatch):
    pipe = fresh(tokenizer_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccelWarning)  # on this CPU few layers, if any, are faster in int8
        h = accel.apply(pipe, accel.Quantize(select="speed", clip_search=False))
    chosen = quantized_paths(pipe.unet)
    h.remove()
    data = speed.SpeedTable().data[speed.device_key(torch.device("cpu"))]
    layers = float_layers(pipe.unet)
    shapes = speed.layer_inputs(pipe.unet, pipe, layers)
    keys = {p: speed.shape_key(m, shapes[p], torch.float32, "int8") for p, m in layers.items()}
    assert set(keys.values()) == set(data)  # one measurement per shape, every shape
    assert all(f > 0 and q > 0 for f, q in data.values())
    assert chosen == {p for p, k in keys.items() if data[k][1] < data[k][0]}
    monkeypatch.setattr(speed, "measure", lambda *a: pytest.fail("measured twice"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccelWarning)
        h = accel.apply(pipe, accel.Quantize(select="speed", clip_search=False))
    assert quantized_paths(pipe.unet) == chosen
    h.remove()


def test_nothing_faster_warns_and_quantizes_nothing(tokenizer_dir, cache_dir, monkeypatch):
    pipe = fresh(tokenizer_dir)
    monkeypatch.setattr(speed, "measure", lambda m, q, shape: (1.0, 3.0))
    with pytest.warns(AccelWarning, match="nothing is quantized"):
        h = accel.apply(pipe, accel.Quantize(select="speed", clip_search=False))
    assert quantized_paths(pipe.unet) == set()
    h.remove()


def test_select_values():
    assert accel.Quantize(select="speed").to_dict()["select"] == "speed"
    with pytest.raises(ValueError, match="select"):
        accel.Quantize(select="fast")
