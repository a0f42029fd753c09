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

from .. import adapters, kernels
from ..kernels import fp8
from ..errors import AccelWarning, CalibrationError, IrreversibleError
from .base import Context, Transform, register

P_NORM = 2.4
CLIP_GRID = torch.linspace(0.5, 1.0, 21)


# ----------------------------------------------------------------------------------- weight quantization
def quantize_weight(w: torch.Tensor, symmetric: bool = True, search: bool = True):
    """Per-output-channel int8 of a ``(O, ...)`` weight: ``(q int8, scale (O,), zero (O,) int or None)``."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    best_err = torch.full((flat.shape[0],), float("inf"), device=flat.device)
    best = None
    for alpha in (CLIP_GRID if search else torch.tensor([1.0])):
        if symmetric:
            s = (flat.abs().amax(1) * alpha / 127).clamp_min(1e-12)
            q = kernels.reference.round_half_away(flat / s[:, None]).clamp(-127, 127)
            deq, z = q * s[:, None], None
        else:
            lo, hi = flat.amin(1).clamp(max=0) * alpha, flat.amax(1).clamp(min=0) * alpha
            s = ((hi - lo) / 255).clamp_min(1e-12)
            z = (-128 - kernels.reference.round_half_away(lo / s)).clamp(-128, 127)
            q = (kernels.reference.round_half_away(flat / s[:, None]) + z[:, None]).clamp(-128, 127)
            deq = (q - z[:, None]) * s[:, None]
        err = (deq - flat).abs().pow(P_NORM).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        if best is None:
            best = [q.clone(), s.clone(), None if z is None else z.clone()]
        else:
            best[0][better], best[1][better] = q[better], s[better]
            if z is not None:
                best[2][better] = z[better]
    q, s, z = best
    return q.to(torch.int8).reshape(w.shape), s.float(), (None if z is None else z.to(torch.int8))


def range_scale(absmax: float) -> float:
    """The scale that maps ``[-absmax, absmax]`` onto int8 without clipping."""
    return absmax / 127 if absmax > 0 else 1.0


def mse_scale(samples: torch.Tensor, absmax: float) -> float:
    """Symmetric per-tensor activation scale minimising the MSE on ``samples`` (CacheQuant's MSE search)."""
    if absmax <= 0:
        return 1.0
    best, best_s = float("inf"), absmax / 127
    for alpha in CLIP_GRID:
        s = absmax * float(alpha) / 127
        q = kernels.reference.round_half_away(samples / s).clamp(-127, 127)
        err = ((q * s - samples) ** 2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


# ----------------------------------------------------------------------------------- quantized modules
class _QBase(nn.Module):
    """Shared: int8 weight buffers, activation quantizer(s), the per-call scale table, quant DEC.

    Everything a call needs is on the device before the first call: the int8 weights in the layout the kernel
    reads (channels_last for convs), the dequantized weight sums the activation shift adds back (``weight_sum``
    per output channel and, for a padded conv, ``weight_tap`` per tap: the border term), the per-call
    ``(scale, shift)`` tables and the DEC tables. The call's row is picked on the device by the owner's step
    tensor: a static call does no host sync, no host-to-device copy and recomputes nothing."""

    def __init__(self, owner: "Quantize", path: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 split: int | None):
        super().__init__()
        self.owner, self.path, self.split = owner, path, split
        sym = owner.weights_symmetric
        parts = [weight] if split is None else [weight[:, :split], weight[:, split:]]
        for i, w in enumerate(parts):
            q, s, z, tap, total = self._quantize_part(w, sym)
            self.register_buffer(f"weight_q{i}", q)
            self.register_buffer(f"weight_scale{i}", s)
            self.register_buffer(f"weight_zero{i}", z if z is not None else None)
            self.register_buffer(f"weight_sum{i}", total, persistent=False)
            self.register_buffer(f"weight_tap{i}", tap, persistent=False)
            self.register_buffer(f"act_table{i}", None, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("dec_alpha", None, persistent=False)
        self.register_buffer("dec_beta", None, persistent=False)
        self._act_scales: torch.Tensor | None = None  # (num_calls, num_parts) from calibration
        self._act_shifts: torch.Tensor | None = None  # (num_calls, num_parts): the range centres m

    def _quantize_part(self, w: torch.Tensor, sym: bool):
        """``(q, scale, zero, tap, total)`` of one input part: int8 per output channel (channels_last for convs) and
        the weight sums the activation shift adds back (derived constants: not saved, recomputable)."""
        q, s, z = quantize_weight(w, sym, self.owner.clip_search)
        if q.dim() == 4:
            q = q.contiguous(memory_format=torch.channels_last)  # (O, KH, KW, C) memory: what the conv reads
        tap, total = _weight_sums(q, s, z)
        return q, s, z, tap, total

    @property
    def parts(self) -> int:
        return 1 if self.split is None else 2

    # -- calibration tables (set once; forward reads the device copies) ---------------------------------
    @property
    def act_scales(self) -> torch.Tensor | None:
        return self._act_scales

    @act_scales.setter
    def act_scales(self, scales):
        self._act_scales = scales
        self._build_tables()

    @property
    def act_shifts(self) -> torch.Tensor | None:
        return self._act_shifts

    @act_shifts.setter
    def act_shifts(self, shifts):
        self._act_shifts = shifts
        self._build_tables()

    @property
    def calls(self) -> int | None:
        """UNet calls the static tables cover (None: dynamic)."""
        return None if self._act_scales is None else self._act_scales.shape[0]

    def _build_tables(self):
        """``act_table{i}``: float32 ``(T, 2)`` rows ``(scale, shift)`` on the weights' device."""
        dev = self.weight_q0.device
        for i in range(self.parts):
            table = None
            if self._act_scales is not None:
                s = self._act_scales[:, i].float()
                m = self._act_shifts[:, i].float() if self._act_shifts is not None and self.owner.act_asymmetric \
                    else torch.zeros_like(s)
                table = torch.stack([s, m], 1).to(dev).contiguous()
            setattr(self, f"act_table{i}", table)

    @property
    def dec(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.dec_alpha is None else (self.dec_alpha, self.dec_beta)

    @dec.setter
    def dec(self, value):
        """Quantization DEC ``(alpha (N, O), beta (N, O))`` per call and output channel, kept on the device."""
        dev = self.weight_q0.device
        self.dec_alpha, self.dec_beta = (None, None) if value is None else \
            (value[0].float().to(dev).contiguous(), value[1].float().to(dev).contiguous())

    # -- per call ---------------------------------------------------------------------------------------
    def _inputs(self, x):
        return [x] if self.split is None else [x[:, :self.split], x[:, self.split:]]

    def _quantizer(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``(table, step, shifted)`` for part i: the calibrated per-call table and the owner's device step
        (static), or a one-row table from this tensor's range, computed on the device (dynamic per tensor)."""
        table = getattr(self, f"act_table{i}")
        if table is not None:
            return table, self.owner._step_t, self.owner.act_asymmetric
        x = x.detach()
        lo, hi = torch.aminmax(x)
        lo, hi = lo.float(), hi.float()
        if self.owner.act_asymmetric:
            shift, amax = (hi + lo) / 2, (hi - lo) / 2
        else:
            shift, amax = torch.zeros_like(lo), torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        return torch.stack([scale, shift]).view(1, 2), None, self.owner.act_asymmetric

    def _correct(self, y, channel_dim):
        if self.dec_alpha is None:
            return y
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        step = self.owner._step_t
        alpha = self.dec_alpha.index_select(0, step).view(shape).to(y.dtype)
        beta = self.dec_beta.index_select(0, step).view(shape).to(y.dtype)
        return y * alpha + beta

    def weight_bytes(self) -> int:
        """Bytes of what is stored (int8 weights, scales, zero points, bias; not the derived sums or tables)."""
        return sum(b.numel() * b.element_size() for n, b in self._buffers.items()
                   if b is not None and n not in self._non_persistent_buffers_set)

    # -- what code written for nn.Linear / nn.Conv2d reads: peft's LoRA wrapper around a quantized base layer --
    def _keep_source(self, m: nn.Module) -> None:
        self.__dict__["_source"] = m  # a plain attribute: not a submodule (not in state_dict, parameters(), .to())

    @property
    def source(self) -> nn.Module:
        """The float module this layer was quantized from (what ``remove()`` puts back; in host memory while the
        quantized layer runs on an accelerator)."""
        try:
            return self.__dict__["_source"]
        except KeyError:
            raise AttributeError("source") from None  # then __getattr__ (_Dropped's) says why

    def _drop_source(self) -> None:
        """``Quantize(keep_float=False)``: forget the float module; ``source`` / ``weight`` then say why they are
        gone (the class becomes a subclass that knows; nothing changes on the call path)."""
        self.__dict__.pop("_source", None)
        self.__class__ = _dropped_class(type(self))

    @property
    def weight(self) -> nn.Parameter:
        """The float weight this layer was quantized from (the source module's). peft reads it (device and dtype
        of new adapters, DoRA's weight norm) and ``fuse_lora`` / ``unfuse_lora`` write the adapter into it;
        :class:`Quantize` re-quantizes the layer from it before the next UNet call."""
        return self.source.weight


class _Dropped:
    """Mixed in front of a quantized layer's class once its float source is dropped."""

    def __getattr__(self, name):
        if name in ("source", "weight", "_source"):
            raise AttributeError(f"{type(self).__name__} {self.path!r} has no float {name.strip('_')}: "
                                 "Quantize(keep_float=False) dropped it")
        return super().__getattr__(name)


@functools.lru_cache(maxsize=None)
def _dropped_class(cls: type) -> type:
    return type(cls.__name__, (_Dropped, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _weight_sums(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None):
    """The dequantized weight summed over input channels, per tap ``(O, KH * KW)`` (None for Linear) and over
    everything ``(O,)``: what a shift ``m`` of the input adds (``m W 1``), from exact integer sums."""
    q = q.long()
    per_tap = q.sum(1).reshape(q.shape[0], -1) if q.dim() == 4 else None  # (O, KH * KW)
    total = q.reshape(q.shape[0], -1).sum(1)
    if z is not None:
        if per_tap is not None:
            per_tap = per_tap - z.long()[:, None] * q.shape[1]
        total = total - z.long() * (q[0].numel())
    tap = None if per_tap is None else (per_tap.double() * s.double()[:, None]).float()
    return tap, (total.double() * s.double()).float()

class QLinear(_QBase):
    def __init__(self, owner, path, m: nn.Linear):
        super().__init__(owner, path, m.weight, m.bias, None)
        self.in_features, self.out_features = m.in_features, m.out_features
        self._keep_source(m)

    def forward(self, x):
        if self.act_table0 is None and self.owner._mode == "dynamic":  # per token, fused in the kernel
            y = kernels.linear(x, self.weight_q0, self.weight_scale0, self.weight_zero0, self.bias,
                               backend=self.owner.backend)
            return self._correct(y, -1)
        table, step, shifted = self._quantizer(0, x)
        y = kernels.linear(x, self.weight_q0, self.weight_scale0, self.weight_zero0, self.bias,
                           self.weight_sum0 if shifted else None, table, step, self.owner.backend)
        return self._correct(y, -1)


class QConv2d(_QBase):
    def __init__(self, owner, path, m: nn.Conv2d, split: int | None):
        if m.groups != 1 or m.dilation != (1, 1) or m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1] \
                or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"{path}: unsupported Conv2d configuration for int8")
        super().__init__(owner, path, m.weight, m.bias, split)
        self.stride, self.padding, self.out_channels = m.stride[0], m.padding[0], m.out_channels
        self.in_channels, self.kernel_size, self.groups, self.dilation = m.in_channels, m.kernel_size, 1, (1, 1)
        self._keep_source(m)

    def forward(self, x):
        y = None  # the second half of a split input adds its product to the first's inside the kernel
        for i, xi in enumerate(self._inputs(x)):
            table, step, shifted = self._quantizer(i, xi)
            y = kernels.conv2d(xi, getattr(self, f"weight_q{i}"), getattr(self, f"weight_scale{i}"), table,
                               getattr(self, f"weight_zero{i}"), self.bias if i == 0 else None,
                               getattr(self, f"weight_sum{i}") if shifted else None,
                               getattr(self, f"weight_tap{i}") if shifted else None, step, y, self.stride,
                               self.padding, self.owner.backend)
        return self._correct(y, 1)


class _FP8GEMM:
    """``Quantize(dtype="fp8")``'s GEMM layers (mixed in before :class:`QLinear` / :class:`QConv2d`): float8 e4m3
    weights ``(O, K)`` per output channel, the calibration's per-call int8 ranges as float8 scales (same ranges,
    same shifts), one ``accel::fp8_linear`` op per input part (:mod:`accel.kernels.fp8`)."""

    def _quantize_part(self, w, sym):
        return fp8.quantize_part(w)

    def _build_tables(self):
        super()._build_tables()
        for i in range(self.parts):
            table = getattr(self, f"act_table{i}")
            if table is not None:
                setattr(self, f"act_table{i}", fp8.fp8_table(table))

    def _gemm(self, i, x, residual=None):
        table = getattr(self, f"act_table{i}")  # None: dynamic per token
        shifted = table is not None and self.owner.act_asymmetric
        return fp8.linear(x, getattr(self, f"weight_q{i}"), getattr(self, f"weight_scale{i}"),
                          self.bias if i == 0 else None, getattr(self, f"weight_sum{i}") if shifted else None, table,
                          None if table is None else self.owner._step_t, residual, self.owner.backend)


class QLinearFP8(_FP8GEMM, QLinear):
    def forward(self, x):
        return self._correct(self._gemm(0, x), -1)


class QConv1x1FP8(_FP8GEMM, QConv2d):
    """A 1x1 conv as a float8 GEMM over the pixels (NHWC rows: a view of a channels_last input; the output is
    channels_last); a split input's second half adds its product to the first's inside the op."""

    def forward(self, x):
        y = None
        for i, xi in enumerate(self._inputs(x)):
            y = self._gemm(i, fp8.pixels(xi), y)
        return self._correct(fp8.unpixels(y), 1)


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
    _originals: dict = field(default_factory=dict, init=False, repr=False)
    _modules: dict = field(default_factory=dict, init=False, repr=False)
    _wrappers: dict = field(default_factory=dict, init=False, repr=False)  # path -> peft wrapper around the layer
    _merged: dict = field(default_factory=dict, init=False, repr=False)    # path -> adapters fused when quantized

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
        self._dropped = False  # keep_float=False: the float layers are gone
        self._step, self._mode = -1, self.mode
        self._step_t = torch.zeros(1, dtype=torch.int32)  # the current UNet call, on the UNet's device
        self._calls: int | None = None  # UNet calls the static tables cover

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("filter_fn", None)
        return d

    def to_dict_fields(self) -> dict:
        """Constructor arguments (incl. ``filter_fn``) to build a copy."""
        return {k: getattr(self, k) for k in ("weights", "activations", "dtype", "weight_scheme", "act_scheme",
                                               "act_clip", "mode", "backend",
                                               "exclude", "split_shortcut", "clip_search", "correction", "filter_fn",
                                               "keep_float", "select")}

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

    def attach(self, ctx: Context) -> None:
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


def _move_tensors(m: nn.Module, device: torch.device) -> None:
    """Move ``m``'s parameters and buffers to ``device`` in place: the same ``Parameter`` objects (what optimizers
    and peft hold), bit-identical, with their strides; host copies are pinned where CUDA is present (one DMA back)."""
    def moved(t):
        if t.device == device:
            return t
        pin = device.type == "cpu" and torch.cuda.is_available()
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device, pin_memory=pin)
        return out.copy_(t.detach())

    with torch.no_grad():
        for mod in m.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    p.data = moved(p.data)
                    if p.grad is not None:
                        p.grad = moved(p.grad)
            for name, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[name] = moved(b)


def device_bytes(unet) -> int:
    """Bytes the UNet holds outside host-only memory: every parameter and buffer of its module tree (what a call
    reads: int8 weights, scales, weight sums, per-call tables; what ``unet.to(device)`` moves) plus any float
    layer kept for ``remove()`` that is not in host memory. Each storage counted once. On a CPU UNet this is what
    would be on the GPU after ``unet.to("cuda")`` (the float layers kept aside stay in host memory)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None:
            return
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()

    for m in unet.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            add(t)
        if isinstance(m, _QBase) and "_source" in m.__dict__:
            for t in list(m.source.parameters()) + list(m.source.buffers()):
                if t.device.type != "cpu":
                    add(t)
    return total


def weight_bytes(unet) -> int:
    """Bytes of the UNet's weights as they are stored now (int8 buffers for quantized layers)."""
    total = 0
    for m in unet.modules():
        if isinstance(m, _QBase):
            total += m.weight_bytes()
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
