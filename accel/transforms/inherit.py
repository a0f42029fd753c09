"""Feature inheritance (A-SDM, tuning-free part): at chosen UNet calls a module does not run and returns what
it produced the last time it ran (or, with ``residual=True``, its last residual ``output - input`` added to
the current input).

Granularity (our reading of the paper, PAPERS.md): ``block`` = a down/mid/up block, ``layer`` = one resnet or
transformer model inside a block, ``unit`` = the self-attention (``attn1``), cross-attention (``attn2``) or
feed-forward (``ff``) of a transformer block. Targets are module-path patterns (fnmatch), e.g. ``"mid_block"``,
``"up_blocks.1.attentions.*"``, ``"*.attn2"``.

Step-level sampling modes (the calls at which the targets *inherit*; call 0 always runs):
``every=k`` (run on every k-th call, inherit in between), ``window=(start, end)`` (inherit for calls
``start <= i < end``), ``steps=[...]`` (inherit at these calls), ``schedule="calibrated"``: the targets run at
``budget`` calls chosen by CacheQuant's dynamic programme (:func:`accel.schedules.dp_schedule`) on the targets'
own output distances between calls, measured by ``accel calibrate`` (each target's distance matrix scaled to
mean 1, summed): they inherit where their output changes least.

Composes with :class:`~accel.transforms.cache.FeatureCache` (a module inside the cached branch simply does not
run on cached calls) and with :class:`~accel.transforms.quantize.Quantize`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..hooks import attach, detach_all
from ..unet import feature_of
from .base import Applied, Context, Transform, register
from ..errors import CalibrationError, InputError

GRANULARITIES = {
    "block": re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)$"),
    "layer": re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.\d+$"),
    "unit": re.compile(r"^.*\.transformer_blocks\.\d+\.(attn1|attn2|ff)$"),
}


def candidates(unet, granularity: str) -> dict[str, torch.nn.Module]:
    rx = GRANULARITIES[granularity]
    return {p: m for p, m in unet.named_modules() if rx.match(p)}


def _map(out, fn, other=None):
    """``fn(tensor, matching item of other)`` over the tensors of a block output (tensor, nested tuples,
    or a diffusers ``BaseOutput``), keeping its structure."""
    if torch.is_tensor(out):
        return fn(out, other)
    if isinstance(out, (tuple, list)):
        others = other if other is not None else [None] * len(out)
        return type(out)(_map(o, fn, r) for o, r in zip(out, others))
    if hasattr(out, "to_tuple"):
        items = list(out.values())
        others = list(other.values()) if other is not None else [None] * len(items)
        return type(out)(*[_map(o, fn, r) for o, r in zip(items, others)])
    return out


class _InheritHook(ModelHook):
    _is_stateful = True

    def __init__(self, owner: "_Inherited", path: str):
        super().__init__()
        self.owner, self.path, self.kept, self.template = owner, path, None, None

    def new_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if self.owner._inherit and self.kept is not None:
            if self.owner.residual:
                if feature_of(self.template).shape != x.shape:
                    raise InputError(f"Inherit(residual=True): {self.path} changes the feature's shape; "
                                     "inherit its output instead (residual=False)")
                # every output tensor of the input's shape (a down block's skip features too) gets x + residual
                return _map(self.template, lambda t, r: t if r is None else x + r, self.kept)
            return self.kept
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.owner.residual:
            self.template = out
            self.kept = _map(out, lambda t, _: t - x if t.shape == x.shape else None)
        else:
            self.kept = out
        return out

    def reset_state(self, module):
        self.kept = self.template = None
        return module


@register
@dataclass
class Inherit(Transform):
    """Skip modules at chosen calls by reusing their last output (A-SDM feature inheritance).

    Args:
        targets: module-path pattern(s) among the chosen granularity's modules.
        granularity: ``"block"``, ``"layer"`` or ``"unit"``.
        every / window / steps / schedule: the step-level sampling mode (exactly one); ``schedule`` takes
            ``"calibrated"`` (needs a calibration made with this recipe, see ``accel calibrate``).
        budget: with ``schedule="calibrated"``, the calls at which the targets run (default: the calibrated one).
        residual: inherit ``output - input`` instead of the output.
    """

    targets: list | str = "mid_block"
    granularity: str = "block"
    every: int | None = None
    window: list | None = None
    steps: list | None = None
    schedule: str | None = None
    budget: int | None = None
    residual: bool = False
    order = 70
    requires_pipeline = True

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.granularity not in GRANULARITIES:
            raise InputError(f"granularity {self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if self.residual and self.granularity == "unit":
            raise InputError("residual=True needs granularity 'block' or 'layer': a unit's output already is a "
                             "residual branch (the transformer block adds it to its input), inherit it as it is")
        modes = [m for m in ("every", "window", "steps", "schedule") if getattr(self, m) is not None]
        if len(modes) != 1:
            raise InputError("Inherit needs exactly one sampling mode: every=k, window=(start, end), steps=[...] "
                             "or schedule='calibrated'")
        if self.schedule is not None and self.schedule != "calibrated":
            raise InputError(f"schedule {self.schedule!r}: the only named schedule is 'calibrated'")
        if self.budget is not None and (self.schedule != "calibrated" or int(self.budget) < 1):
            raise InputError("budget=K (K >= 1) goes with schedule='calibrated'")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 2):
            raise InputError("every must be an integer >= 2")
        if self.window is not None:
            self.window = list(self.window)
            if len(self.window) != 2 or not 0 <= self.window[0] < self.window[1]:
                raise InputError("window must be (start, end) with 0 <= start < end")
        if self.steps is not None:
            self.steps = sorted({int(s) for s in self.steps})

    def matched(self, unet) -> dict[str, torch.nn.Module]:
        cands = candidates(unet, self.granularity)
        hit = {p: m for p, m in cands.items() if any(fnmatch.fnmatch(p, t) for t in self.targets)}
        if not hit:
            examples = ", ".join(list(cands)[:4])
            raise InputError(f"Inherit targets {self.targets} match no {self.granularity}-level module of this UNet "
                             f"(e.g. {examples})")
        return hit

    def attach(self, ctx: Context) -> "_Inherited":
        if self.schedule == "calibrated" and ctx.calibration is None:
            raise CalibrationError("Inherit(schedule='calibrated') needs a calibration: run `accel calibrate` with "
                                   "this recipe and pass calibration=DIR")
        return _Inherited(self, ctx)


class _Inherited(Applied):
    """An :class:`Inherit` on one UNet: its hooks and the calls at which the targets run."""

    def __init__(self, transform: Inherit, ctx: Context):
        super().__init__(transform)
        self._calib = ctx.calibration if self.schedule == "calibrated" else None
        self._hooks = {}
        self._inherit, self._shape, self._runs, self._schedules = False, None, None, {}
        try:
            for path, m in self.matched(ctx.unet).items():
                attach(m, _InheritHook(self, path), self.hook_name, root=ctx.unet)
                self._hooks[path] = m
            if self._calib is not None:
                self._calib.inherit_schedule(list(self._hooks), None, self.residual, self.budget)  # fail early
        except Exception:
            self.detach(ctx)
            raise
        ctx.clock.add_listener(self.hook_name, self._on_tick)

    def inherits_at(self, step: int) -> bool:
        if step == 0:
            return False
        if self.every is not None:
            return step % self.every != 0
        if self.window is not None:
            return self.window[0] <= step < self.window[1]
        if self.schedule == "calibrated":
            if self._runs is None:
                raise RuntimeError("the calibrated schedule is known once the pipeline call starts")
            return step not in self._runs
        return step in self.steps

    def run_calls(self, n: int) -> list[int]:
        """The calls (of ``n``) at which the targets run with the calibrated schedule (computed once per ``n``)."""
        if n not in self._schedules:
            self._schedules[n] = self._calib.inherit_schedule(list(self._hooks), n, self.residual, self.budget)
        return self._schedules[n]

    def _on_tick(self, clock):
        if clock.step == 0:
            self._shape = clock.batch_shape
            if self.schedule == "calibrated":
                self._runs = set(self.run_calls(clock.total))
        self._inherit = self.inherits_at(clock.step) and clock.batch_shape == self._shape
        if clock.batch_shape != self._shape:
            self._shape = clock.batch_shape

    def detach(self, ctx: Context) -> None:
        detach_all(self._hooks.values(), self.hook_name, ctx.unet, ctx.clock)
        self._hooks = {}
