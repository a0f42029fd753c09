"""The quantized layers that replace ``nn.Linear`` / ``nn.Conv2d`` (int8, and float8 for Linear and 1x1 convs):
their weights as the kernels read them, their per-call activation tables on the device, one custom op per call
(:mod:`accel.kernels.ops`, :mod:`accel.kernels.fp8`), and the float layer each keeps for ``remove()``; plus the
byte counts of a quantized UNet. The transform that builds them is :mod:`.quantize`."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .. import kernels
from ..kernels import fp8
from .quantizers import quantize_weight
from ..errors import InputError

# ----------------------------------------------------------------------------------- quantized modules
class _QBase(nn.Module):
    """Shared: int8 weight buffers, activation quantizer(s), the per-call scale table, quant DEC.

    Everything a call needs is on the device before the first call: the int8 weights in the layout the kernel
    reads (channels_last for convs), the dequantized weight sums the activation shift adds back (``weight_sum``
    per output channel and, for a padded conv, ``weight_tap`` per tap: the border term), the per-call
    ``(scale, shift)`` tables and the DEC tables. The call's row is picked on the device by the owner's step
    tensor: a static call does no host sync, no host-to-device copy and recomputes nothing. ``owner`` is the
    :class:`accel.transforms.quantize.QuantizedLayers` the layer belongs to (its config, mode and step tensor)."""

    def __init__(self, owner, path: str, weight: torch.Tensor, bias: torch.Tensor | None,
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
            raise InputError(f"{path}: unsupported Conv2d configuration for int8")
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
