"""W8A8 post-training quantization of a UNet's Conv2d and Linear layers (CacheQuant's quantization half).

* Weights: int8 per output channel, symmetric or asymmetric, the clipping range searched to minimise the
  L_p error (p = 2.4, as in CacheQuant/Q-Diffusion). What is stored is int8 (a ~4x smaller UNet), not
  fake-quantized floats.
* Activations: int8 per tensor with a scale *per UNet call* from calibration (``mode="static"``, the
  CacheQuant setting, MSE-searched), or dynamic (``mode="dynamic"``: per token for Linear, per tensor for
  Conv2d) when there is no calibration. ``act_scheme="asymmetric"`` (default) also shifts each per-tensor
  quantizer to the centre ``m`` of its range: ``x = m + s * q``. Most UNet layers read SiLU/GELU outputs
  (>= -0.28), where a symmetric range wastes half the int8 codes. The shift costs no integer work: ``W (m + x')
  = W x' + m W 1`` and the second term is a per-output-channel constant for Linear (folded into the bias)
  and, for a zero-padded Conv2d, ``m`` times the sum of the weight taps that fall inside the image (exact at
  the borders too). The weight sums are computed once, when the layer is quantized.
* Split shortcut (Q-Diffusion): the layers that consume ``cat([hidden, skip])`` in up-block resnets get one
  quantizer per half and two integer products.
* GroupNorm, softmax, nonlinearities, the VAE and the text encoder stay in float.
* Backends: Triton on CUDA, the torch reference on CPU (``backend=`` overrides; ``"triton"`` on CPU runs
  under the interpreter). Every layer call is one ``accel::linear`` / ``accel::conv2d`` custom op
  (:mod:`accel.kernels.ops`; a split conv is two), so ``torch.compile`` sees one node per layer. With Triton an
  eager static layer is two kernels: an elementwise pass writes the activation's int8 codes, then the int8
  GEMM/conv runs with the dequantization in its epilogue (the scale and shift read on the device from the
  per-call table at the device step index; quantizing inside the K loop kept it from being pipelined on an
  H200); conv outputs are channels_last (the next conv reads contiguous channels without a copy). Eager
  inference calls the op's implementation directly (:func:`accel.kernels.direct`: the dispatcher's host cost).
  Traced by ``torch.compile`` for inference, a static layer's quantization is torch ops before an
  ``accel::linear_codes`` / ``accel::conv2d_codes`` op on the int8 codes (:func:`accel.kernels.in_graph`), which
  inductor fuses into the kernel that produces the activation (GroupNorm + SiLU, LayerNorm, the residual add).
* Quantization DEC: on the layers that consume the cached feature, ``Y_fp ~ alpha_t * Y_q + beta_t`` per
  output channel and call, folded into the layer's output (:mod:`accel.transforms.dec`).
* ``dtype="fp8"``: float8 e4m3 instead of int8 for the Linear layers and 1x1 convs (per-channel weights,
  ``amax / 448``; the activations' calibrated ranges and shifts as float8 scales, ``s * 127 / 448``; dynamic per
  token without a calibration): ``torch._scaled_mm`` on compute capability 8.9+, an exact emulation on CPU, one
  ``accel::fp8_linear`` op per call (:mod:`accel.kernels.fp8`). k x k convs stay int8 (no float8 conv to call).

The transform swaps modules (like torchao's ``quantize_``); ``remove()`` puts the original float modules
back, bit-identical (the same ``Parameter`` objects, values, dtypes, strides and device). Until then the float
layers are kept in host memory (pinned where CUDA is present), not on the accelerator: a quantized UNet holds
only what its calls read there (:func:`device_bytes`). ``Quantize(keep_float=False)`` drops them once ``apply``
has succeeded (like torchao, which keeps none): the smallest footprint, and ``remove()`` is then refused.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .. import adapters
from ..kernels import fp8
from ..errors import AccelWarning, CalibrationError, IrreversibleError
from .base import Applied, Context, Transform, register
# The layers and quantizers are importable from here too (their public home before the split).
from .qlayers import (QConv1x1FP8, QConv2d, QLinear, QLinearFP8, _QBase, _move_tensors, _weight_sums,  # noqa: F401
                      device_bytes, weight_bytes)
from .quantizers import CLIP_GRID, P_NORM, mse_scale, quantize_weight, range_scale  # noqa: F401


# ----------------------------------------------------------------------------------- the transform
def _split_point(unet, path: str, module: nn.Module) -> int | None:
    """Channels of the hidden half of ``cat([hidden, skip])`` for up-block resnet convs that consume it."""
    parts = path.split(".")
    if len(parts) == 5 and parts[0] == "up_blocks" and parts[2] == "resnets" and parts[4] in ("conv1", "conv_shortcut"):
        block = unet.up_blocks[int(parts[1])]
        i = int(parts[3])
        if i == 0:  # the previous up block's output (the mid block's for the deepest)
            prev = list(unet.config.block_out_channels)[::-1][max(int(parts[1]) - 1, 0)]
        else:
            prev = block.resnets[i - 1].out_channels
        in_ch = module.in_channels
        if 0 < prev < in_ch:
            return prev
    return None


@register
@dataclass
class Quantize(Transform):
    """W8A8 int8 of every Conv2d and Linear of the UNet (see the module docstring).

    Args:
        weights, activations: bit widths (8 and 8: what the kernels implement).
        dtype: ``"int8"`` or ``"fp8"``: float8 e4m3 weights and activations for the Linear layers and 1x1 convs
            (``torch._scaled_mm`` on compute capability 8.9+, an exact emulation on CPU; the same calibration's
            ranges and shifts), k x k convs int8 (:mod:`accel.kernels.fp8` says why).
        weight_scheme: ``"asymmetric"`` (CacheQuant) or ``"symmetric"`` per output channel.
        act_scheme: per-tensor activation quantizers centred on their range (``"asymmetric"``) or on zero
            (``"symmetric"``).
        act_clip: static scales from the calibrated range (``"range"``) or CacheQuant's MSE clip search on
            sampled inputs (``"mse"``; on the miniature it clipped outliers that matter: worse).
        mode: ``"static"`` (per-call scales from a calibration) or ``"dynamic"``; ``None``: static when the
            calibration has scales, else dynamic.
        backend: ``None`` (by device), ``"reference"`` or ``"triton"``.
        exclude: module path patterns (fnmatch) to keep in float, e.g. ``["conv_in", "*.proj_out"]``.
        split_shortcut: separate quantizers for the two halves of concatenated skip inputs.
        clip_search: search the weight clipping range (else plain min/max).
        correction: ``"dec"`` folds the calibrated quantization-error correction into the layers that
            consume the cached feature.
        filter_fn: ``(module, path) -> bool`` (Python API only), like torchao's.
        select: ``"all"`` quantizes every selected layer (the smallest memory); ``"speed"`` only those whose quantized
            layer measured faster than the float one on this device at their shape (:mod:`accel.transforms.speed`:
            measured once per device and shape, kept in the user's cache folder).
        keep_float: keep the float layers (in host memory) so that ``remove()`` restores them and LoRA adapters
            can be loaded or fused later; ``False`` drops them when ``apply`` succeeds (``remove()``, loading and
            fusing adapters are then refused with a one-line error; adapters loaded before ``apply`` still run).
    """

    weights: int = 8
    activations: int = 8
    dtype: str = "int8"
    weight_scheme: str = "asymmetric"
    act_scheme: str = "asymmetric"
    act_clip: str = "range"
    mode: str | None = None
    backend: str | None = None
    exclude: list = field(default_factory=list)
    split_shortcut: bool = True
    clip_search: bool = True
    correction: str | None = None
    filter_fn: Callable | None = None
    keep_float: bool = True
    select: str = "all"
    order = 10

    def __post_init__(self):
        if (self.weights, self.activations) != (8, 8):
            raise ValueError("Quantize implements W8A8 (weights=8, activations=8)")
        if self.weight_scheme not in ("symmetric", "asymmetric"):
            raise ValueError("weight_scheme must be 'symmetric' or 'asymmetric'")
        if self.act_scheme not in ("symmetric", "asymmetric"):
            raise ValueError("act_scheme must be 'symmetric' or 'asymmetric'")
        if self.act_clip not in ("range", "mse"):
            raise ValueError("act_clip must be 'range' or 'mse'")
        if self.mode not in (None, "static", "dynamic"):
            raise ValueError("mode must be 'static', 'dynamic' or None")
        if self.backend not in (None, "reference", "triton"):
            raise ValueError("backend must be None, 'reference' or 'triton'")
        if self.correction not in (None, "dec"):
            raise ValueError("correction must be None or 'dec'")
        if self.dtype not in ("int8", "fp8"):
            raise ValueError(f"dtype must be 'int8' or 'fp8' (float8 e4m3), not {self.dtype!r}")
        if not isinstance(self.keep_float, bool):
            raise ValueError("keep_float must be true or false")
        if self.select not in ("all", "speed"):
            raise ValueError(f"select must be 'all' or 'speed' (only the layers measured faster quantized), not "
                             f"{self.select!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("filter_fn", None)
        return d

    def to_dict_fields(self) -> dict:
        """Constructor arguments (incl. ``filter_fn``) to build a copy (:meth:`Transform.config`)."""
        return self.config()

    @property
    def weights_symmetric(self) -> bool:
        return self.weight_scheme == "symmetric"

    @property
    def act_asymmetric(self) -> bool:
        return self.act_scheme == "asymmetric"

    def selected(self, unet) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of the layers to quantize. Inside a peft LoRA wrapper the layer is its ``base_layer``
        under the wrapper's path (``...to_q``, see :mod:`accel.adapters`); the adapters stay in float."""
        out = []
        for path, m, _ in adapters.base_modules(unet):
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if any(fnmatch.fnmatch(path, pat) for pat in self.exclude):
                continue
            if self.filter_fn is not None and not self.filter_fn(m, path):
                continue
            out.append((path, m))
        return out

    def attach(self, ctx: Context) -> "QuantizedLayers":
        return QuantizedLayers(self, ctx)


class QuantizedLayers(Applied):
    """A :class:`Quantize` on one UNet: the quantized layers (``_modules``, by path) and the float layers they
    replaced (``_originals``), the device step index the per-call tables are read at, the LoRA wrappers around
    them. The quantized layers read their configuration from it (``owner``). ``QuantizedLayers(quant)`` without a
    context is the owner of hand-made layers (tests and scripts that build a layer on its own)."""

    def __init__(self, transform: Quantize, ctx: Context | None = None):
        super().__init__(transform)
        self._dropped = False  # keep_float=False: the float layers are gone
        self._step, self._mode = -1, self.mode
        self._step_t = torch.zeros(1, dtype=torch.int32)  # the current UNet call, on the UNet's device
        self._calls: int | None = None  # UNet calls the static tables cover
        self._originals, self._modules, self._bias0 = {}, {}, {}
        self._wrappers, self._merged = {}, {}  # path -> peft wrapper around the layer / adapters fused when quantized
        self._qcal = self._unet = None
        self._guarded = {}  # adapter-loader methods wrapped on the UNet instance
        if ctx is not None:
            self._attach(ctx)

    def set_step(self, step: int) -> None:
        """Make the quantized layers read their per-call tables at UNet call ``step``: written into a device
        tensor (the clock's listener runs outside any compiled graph), so a static call neither syncs nor
        specialises a compiled graph on the step."""
        if self._calls is not None and step >= self._calls:
            raise CalibrationError(f"activation scales calibrated for {self._calls} UNet calls, this is call "
                                   f"{step + 1}: recalibrate for this step count")
        q = next(iter(self._modules.values()), None)
        dev = q.weight_q0.device if q is not None else self._step_t.device
        if self._step_t.device != dev:
            self._step_t = torch.zeros(1, dtype=torch.int32, device=dev)
        self._step_t.fill_(max(step, 0))
        self._step = step

    def _tables_ready(self) -> None:
        """After the layers are swapped in: the step tensor on their device, the calls the tables cover."""
        calls = [q.calls for q in self._modules.values() if q.calls is not None]
        self._calls = min(calls) if calls else None
        self.set_step(0)

    def _on_tick(self, clock):
        self.set_step(clock.step)
        if self._wrappers:
            self._sync_adapters()

    def _quantized(self, unet, path: str, m: nn.Module, device: torch.device | None = None) -> "_QBase":
        """The quantized layer of float ``m``, on ``device`` (default: ``m``'s). A float layer kept in host memory
        comes to ``device`` for this (re-quantizing after a LoRA fuse runs where the UNet runs) and stays there
        until :meth:`_offload` puts it back."""
        device = m.weight.device if device is None else torch.device(device)
        if m.weight.device != device:
            _move_tensors(m, device)
        split = _split_point(unet, path, m) if self.split_shortcut and isinstance(m, nn.Conv2d) else None
        if self.dtype == "fp8" and fp8.gemm_layer(m):  # float8 GEMMs; k x k convs stay int8 (see accel.kernels.fp8)
            fp8.check_device(device)
            q = QLinearFP8(self, path, m) if isinstance(m, nn.Linear) else QConv1x1FP8(self, path, m, split)
        else:
            q = QLinear(self, path, m) if isinstance(m, nn.Linear) else QConv2d(self, path, m, split)
        q.to(device)
        if self._qcal is not None:
            q.act_scales, q.act_shifts = self._qcal.scales(path, q.parts, self.act_asymmetric, self.act_clip)
            if self.correction == "dec":
                q.dec = self._qcal.dec(path)
        self._bias0[path] = None if q.bias is None else q.bias.clone()
        return q

    def _attach(self, ctx: Context) -> None:
        unet = ctx.unet
        qcal = None
        if ctx.calibration is not None and self.mode != "dynamic":
            qcal = ctx.calibration.quant()
        if self.mode == "static" and qcal is None:
            raise CalibrationError("Quantize(mode='static') needs a calibration with activation scales: run "
                                   "`accel calibrate --recipe w8a8` (or cachequant-w8a8)")
        if self.correction == "dec" and qcal is None:
            raise CalibrationError("Quantize(correction='dec') needs a calibration")
        if self.mode is None and ctx.calibration is not None and qcal is None:
            made_for = ctx.calibration.meta.get("recipe", {}).get("name", "another recipe")
            raise CalibrationError(f"the calibration (made for {made_for}) has no activation scales for Quantize: "
                                   "calibrate with a recipe that holds Quantize (`accel calibrate --recipe w8a8`), or "
                                   "say Quantize(mode='dynamic')")
        self._mode = self.mode or ("static" if qcal is not None else "dynamic")
        self._qcal, self._unet, self._bias0 = qcal, unet, {}
        self._originals, self._modules = {}, {}
        layers, built = self.selected(unet), {}
        if self.select == "speed" and layers:
            from . import speed

            self._step_t = torch.zeros(1, dtype=torch.int32, device=layers[0][1].weight.device)

            def build(path, m):
                built[path] = self._quantized(unet, path, m)
                return built[path]

            keep = speed.faster_quantized(self, unet, ctx.pipe, dict(layers), build)
            if not keep:
                warnings.warn(f"Quantize(select='speed'): no layer ran faster quantized than in float on "
                              f"{layers[0][1].weight.device}; nothing is quantized", AccelWarning, stacklevel=3)
            layers = [(p, m) for p, m in layers if p in keep]
        for path, m in layers:
            self._originals[path] = m
            self._modules[path] = built[path] if path in built else self._quantized(unet, path, m)
        _swap(unet, {id(m): self._modules[p] for p, m in self._originals.items()})
        self._track_adapters()
        self._guard_adapter_loaders(unet)
        self._tables_ready()
        self._offload()
        ctx.clock.add_listener(self.hook_name, self._on_tick)

    def attached(self, ctx: Context) -> None:
        """``keep_float=False``: drop the float layers now that ``apply`` cannot fail and undo itself."""
        if not self.keep_float:
            for q in self._modules.values():
                q._drop_source()
            self._originals, self._dropped = {}, True

    def cannot_remove(self) -> str | None:
        if self._dropped:
            return ("Quantize(keep_float=False) dropped the float layers: the quantized UNet cannot be restored; "
                    "reload the model (or apply with keep_float=True, the default)")
        return None

    def detach(self, ctx: Context) -> None:
        if self._dropped:
            raise IrreversibleError(self.cannot_remove())
        ctx.clock.remove_listener(self.hook_name)
        self._unguard_adapter_loaders(ctx.unet)
        self._bring_home()
        _swap(ctx.unet, {id(q): self._originals[p] for p, q in self._modules.items()})
        self._originals, self._modules, self._wrappers, self._merged = {}, {}, {}, {}
        self._qcal = self._unet = None

    # -- the float layers for remove(): in host memory while quantized ----------------------------------
    def _offload(self, paths=None) -> None:
        """Move the float layers (all, or ``paths``) to host memory, pinned where CUDA is present. A layer whose
        LoRA wrapper uses DoRA stays on the device: DoRA reads the base weight at every call. ``keep_float=False``:
        nothing moves (the float layers are dropped once ``apply`` has succeeded)."""
        if not self.keep_float:
            return
        for path in self._originals if paths is None else paths:
            wrapper = self._wrappers.get(path)
            if wrapper is not None and any(getattr(wrapper, "use_dora", {}).values()):
                continue
            _move_tensors(self._originals[path], torch.device("cpu"))

    def _bring_home(self, paths=None) -> None:
        """Move the float layers to the device their quantized layers are on now (which may not be where the
        UNet was at ``apply``: ``unet.to(...)`` moves the quantized layers, not the float ones kept aside)."""
        for path in self._originals if paths is None else paths:
            _move_tensors(self._originals[path], self._modules[path].weight_q0.device)

    def layer(self, path: str) -> "_QBase | None":
        """The quantized layer of the UNet's layer at ``path`` (``None``: that layer stays in float)."""
        return self._modules.get(path)

    def float_layer(self, path: str) -> nn.Module:
        """The float layer at ``path`` on the device its quantized layer runs on: the original itself if it is
        there, else a copy (what calibration runs beside the quantized layer)."""
        m, dev = self._originals[path], self._modules[path].weight_q0.device
        return m if m.weight.device == dev else copy.deepcopy(m).to(dev)

    # -- LoRA adapters (peft) around quantized layers ---------------------------------------------------
    # A wrapper keeps its quantized base layer and adds the float adapters beside it (QLoRA-style); switching,
    # weighting and disabling adapters need nothing from us. Fusing does: peft writes the adapter into
    # ``base_layer.weight``, which is the float source's weight (``_QBase.weight``); the layer is re-quantized
    # from it before the next UNet call. Loading or adding adapters while quantized goes through the float
    # layers (peft can only wrap nn.Linear / nn.Conv2d): see ``_guard_adapter_loaders``.
    def _track_adapters(self) -> None:
        """Find the peft wrapper around each quantized layer; remember which adapters were fused into the weights
        the layer was quantized from (kept for layers tracked before, whose wrapper may have left the model)."""
        ours = {id(q): p for p, q in self._modules.items()}
        old_merged = getattr(self, "_merged", {})
        self._wrappers, self._merged = {}, {}
        for _, m, wrapper in adapters.base_modules(self._unet):
            path = ours.get(id(m))
            if path is not None and wrapper is not None:
                self._wrappers[path] = wrapper
                self._merged[path] = old_merged.get(path, tuple(wrapper.merged_adapters))

    def _sync_adapters(self) -> None:
        unmerge = [w for w in self._wrappers.values() if w.disable_adapters and w.merged]
        if unmerge:  # what peft's forward does first with adapters disabled; now, so we re-quantize first (on the
            with self._float_layers_in_place():  # float layers, on the device: peft writes into the base weight)
                for wrapper in unmerge:
                    wrapper.unmerge()
        changed = []
        for path, wrapper in self._wrappers.items():
            merged = tuple(wrapper.merged_adapters)
            if merged != self._merged[path]:
                changed.append(path)
                self._merged[path] = merged
        if changed:
            self._requantize(changed)

    def _requantize(self, paths: list[str]) -> None:
        """Re-quantize layers whose float weights a LoRA (un)fuse changed."""
        swap = {}
        for path in paths:
            old, m = self._modules[path], self._originals[path]
            bias0 = self._bias0.get(path)
            dev = old.weight_q0.device
            if bias0 is not None and m.bias is not None and not torch.equal(old.bias, bias0):
                with torch.no_grad():  # peft (un)merged a LoRA bias (lora_bias=True) into the quantized layer's bias
                    _move_tensors(m, dev)
                    m.bias.copy_(old.bias if torch.equal(m.bias, bias0) else m.bias + (old.bias - bias0))
            self._modules[path] = swap[id(old)] = self._quantized(self._unet, path, m, dev)
        _swap(self._unet, swap)
        self._offload(paths)

    def _guard_adapter_loaders(self, unet) -> None:
        """Adapters added after quantizing: while ``unet.add_adapter`` / ``load_lora_adapter`` / ``load_attn_procs``
        (what ``pipe.load_lora_weights`` calls) run, the float layers are back in place, so peft wraps them; then the
        quantized layers go back, as the base layers of the new wrappers. Instance attributes, removed by detach."""
        self._guarded = {}
        for name in ADAPTER_LOADERS:
            if not callable(getattr(type(unet), name, None)):
                continue
            self._guarded[name] = unet.__dict__.get(name, _MISSING)
            unet.__dict__[name] = functools.wraps(getattr(unet, name))(
                functools.partial(self._with_float_layers, getattr(unet, name)))

    def _unguard_adapter_loaders(self, unet) -> None:
        for name, before in getattr(self, "_guarded", {}).items():
            unet.__dict__.pop(name, None)
            if before is not _MISSING:
                unet.__dict__[name] = before
        self._guarded = {}

    def _with_float_layers(self, method, *args, **kwargs):
        self._sync_adapters()
        with self._float_layers_in_place():
            return method(*args, **kwargs)

    @contextlib.contextmanager
    def _float_layers_in_place(self):
        """The float layers in place of the quantized ones, on the device (peft places new adapters on the base
        layer's device and (un)fuses into its weight); then the quantized layers back, the float ones aside."""
        if self._dropped:
            raise IrreversibleError("Quantize(keep_float=False) dropped the float layers: LoRA adapters cannot be "
                                    "loaded, fused or unfused in the quantized UNet; load (and fuse) them before "
                                    "accel.apply, or apply with keep_float=True (the default)")
        unet = self._unet
        self._bring_home()
        _swap(unet, {id(q): self._originals[p] for p, q in self._modules.items()})
        try:
            yield
        finally:
            _swap(unet, {id(m): self._modules[p] for p, m in self._originals.items()})
            self._track_adapters()
            self._offload()


ADAPTER_LOADERS = ("add_adapter", "load_lora_adapter", "load_attn_procs", "fuse_lora", "unfuse_lora")
_MISSING = object()


def _swap(root: nn.Module, new: dict[int, nn.Module]) -> None:
    """Put ``new[id(m)]`` wherever a module ``m`` is in ``root`` (found by identity, so a layer that a peft
    wrapper took in, or that ``unload_lora_weights`` moved back out, is found where it is now)."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, name, new[id(child)])
