"""Quantize only the layers that are faster quantized: ``Quantize(select="speed")``.

Whether an int8 (or fp8) layer beats its float one depends on the GPU and the shape: on an H200 cuBLAS's int8
GEMM only ties fp16 at SD 1.5 sizes, and small layers are bound by launch overhead either way. So the choice is
measured, per layer *shape* (the input the layer sees at the pipeline's default resolution, batch 2 for
classifier-free guidance, recorded by one forward pass at ``apply``), each shape once per device: float against
quantized, both replayed from CUDA graphs (the GPU's time, as ``handle.compile(mode="reduce-overhead")`` runs them;
on a CPU, wall time of the eager call). The measurements go to a table in the user's cache folder
(``$ACCEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/accel`` or ``~/.cache/accel``: ``layer-speed.json``), keyed by the
device, torch and Triton versions, so a second ``apply`` measures nothing. ``select="all"`` (the default)
quantizes every layer: the smallest memory.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TABLE = "layer-speed.json"


def table_path() -> Path:
    root = os.environ.get("ACCEL_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "accel"
    return Path(root) / TABLE


def device_key(device: torch.device) -> str:
    """The device a measurement holds for: its name and the torch (and Triton) version that ran it."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton

        return f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | triton {triton.__version__}"
    return f"{device.type} | torch {torch.__version__}"


def shape_key(m: nn.Module, x_shape: tuple, dtype: torch.dtype, quant: str) -> str:
    """``linear 8192x320->2560 float16 int8`` / ``conv3x3/1p1 2x320x64x64->320 float16 int8``."""
    dims = "x".join(str(d) for d in x_shape)
    if isinstance(m, nn.Linear):
        return f"linear {dims}->{m.out_features} {str(dtype)[6:]} {quant}"
    k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
    return f"conv{k}x{k}/{s}p{p} {dims}->{m.out_channels} {str(dtype)[6:]} {quant}"


class SpeedTable:
    """``{device key: {shape key: [float seconds, quantized seconds]}}`` in a JSON file (written atomically)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else table_path()
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.changed = False

    def get(self, device: str, key: str):
        return self.data.get(device, {}).get(key)

    def put(self, device: str, key: str, float_s: float, quant_s: float) -> None:
        self.data.setdefault(device, {})[key] = [float_s, quant_s]
        self.changed = True

    def save(self) -> None:
        if self.changed:
            from ..fileio import write_text_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            self.changed = False


def layer_inputs(unet, pipe, layers: dict[str, nn.Module], batch: int = 2) -> dict[str, tuple]:
    """The input shape each of ``layers`` (path -> module) sees in one UNet call at the pipeline's default size."""
    from .. import hooks

    cfg = unet.config
    p = next(unet.parameters())
    side = getattr(pipe, "default_sample_size", None) or cfg.sample_size
    side = side if isinstance(side, int) else side[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(p.device, p.dtype)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(p.device, p.dtype)
    kw = dict(encoder_hidden_states=ctx)
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        px = side * 8
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text, device=p.device, dtype=p.dtype),
                                   "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=p.device,
                                                            dtype=p.dtype)}
    shapes, handles = {}, []

    def record(path):
        def hook(mod, args):
            a = args[0]
            shapes.setdefault(path, (a.numel() // a.shape[-1], a.shape[-1]) if isinstance(mod, nn.Linear)
                              else tuple(a.shape))
        return hook

    for path, m in layers.items():
        handles.append(m.register_forward_pre_hook(record(path)))
    clock = hooks.get_clock(unet, create=False)
    forward = clock.fn_ref.original_forward if clock is not None else unet.forward  # no step counted
    try:
        with torch.no_grad():
            forward(x, torch.tensor(500, device=p.device), **kw)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _time(fn, device: torch.device, repeats: int = 5, n: int = 10) -> float:
    """Seconds per call of ``fn``: replayed from a CUDA graph on CUDA (the GPU's time), else (or if it cannot be
    captured) wall time, synchronised."""
    if device.type == "cuda":
        from ..timing import cuda_graph_time

        try:
            return cuda_graph_time(fn, n, repeats)
        except Exception:  # noqa: BLE001 -- not capturable: timed eagerly below
            pass
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        runs.append((time.perf_counter() - t) / n)
    return statistics.median(runs)


def measure(m: nn.Module, q: nn.Module, x_shape: tuple) -> tuple[float, float]:
    """Seconds per call of the float layer ``m`` and its quantized ``q`` on an input of ``x_shape`` (SiLU-like
    values, the UNet's device and dtype)."""
    w = m.weight
    g = torch.Generator().manual_seed(0)
    x = F.silu(3 * torch.randn(x_shape, generator=g)).to(w.device, w.dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return _time(lambda: m(x), w.device), _time(lambda: q(x), w.device)


def faster_quantized(quant, unet, pipe, layers: dict[str, nn.Module], build) -> set[str]:
    """The paths of ``layers`` whose quantized layer (``build(path, module)``) ran faster than the float one on
    this device, measured where the table has no figure yet (and written to it)."""
    if not layers:
        return set()
    first = next(iter(layers.values()))
    dev, dtype = first.weight.device, first.weight.dtype
    table, key = SpeedTable(), device_key(dev)
    shapes = layer_inputs(unet, pipe, layers)
    chosen = set()
    for path, m in layers.items():
        if path not in shapes:  # not called at the default size (e.g. a branch this UNet does not take)
            continue
        k = shape_key(m, shapes[path], dtype, quant.dtype)
        got = table.get(key, k)
        if got is None:
            got = list(measure(m, build(path, m), shapes[path]))
            table.put(key, k, *got)
        if got[1] < got[0]:
            chosen.add(path)
    try:
        table.save()
    except OSError:  # a read-only cache folder: the choice stands, it is measured again next time
        pass
    return chosen
