"""DeepCache-style feature caching (Ma et al., CVPR 2024) with pluggable schedules.

On a *full* UNet call the whole UNet runs and the outputs of the deep modules are kept; on a *cached*
call only the shallow path of the cache branch runs (``conv_in`` and the outer down/up layers) and the
deep modules return what they returned at the last full call. ``branch`` has DeepCache's meaning
(``cache_branch_id``: 0 is the shallowest, most reuse), so the two can be compared at equal settings.

Differences from the DeepCache package, on purpose: hooks through ``diffusers.hooks`` on the coarsest
units (a skipped block is one hook, not one per layer), a step clock that counts UNet calls (DeepCache
searches ``scheduler.timesteps`` for the value, which miscounts PNDM's repeated timestep and Heun), and an
optional per-call affine correction of the reused feature (CacheQuant's DEC, :mod:`accel.transforms.dec`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook

from .. import schedules
from ..errors import CalibrationError
from ..hooks import attach, detach
from ..unet import cached_units, feature_of, num_branches, with_feature
from .base import Context, Transform, register


class _ReuseHook(ModelHook):
    """Runs the module on full calls (keeping its output) and returns the kept output on cached calls."""

    _is_stateful = True

    def __init__(self, owner: "FeatureCache", boundary: bool):
        super().__init__()
        self.owner, self.boundary, self.kept = owner, boundary, None

    def new_forward(self, module, *args, **kwargs):
        if self.owner._full:
            self.kept = self.fn_ref.original_forward(*args, **kwargs)
            return self.kept
        if self.boundary and self.owner._correction is not None:
            return with_feature(self.kept, self.owner._correction(feature_of(self.kept)))
        return self.kept

    def reset_state(self, module):
        self.kept = None
        return module


@register
@dataclass
class FeatureCache(Transform):
    """Reuse the deep UNet features between full calls.

    Args:
        interval: a full call every ``interval`` UNet calls (DeepCache's ``cache_interval``).
        schedule: explicit full-call indices (a list) or ``"uniform"`` / ``"quadratic"`` (DeepCache's
            non-uniform schedule; with ``interval`` it sets the number of full calls), ``"calibrated"``
            (the schedule ``accel calibrate`` chose: the DP's, refined on the final samples' error for the
            budgets it was calibrated at) or ``"dp"`` (CacheQuant's DP schedule on the calibrated feature
            distances, unrefined).
        branch: DeepCache's ``cache_branch_id`` (0 = shallowest, fastest).
        correction: ``"dec"`` applies CacheQuant's per-channel cache-error correction ``a_t h + b_t`` from the
            calibration, ``"dec-mean"`` its mean-only variant (``h + b_t``, ours: more conservative);
            ``None`` reuses features as they are.
        budget: with ``schedule="calibrated"`` or ``"dp"``, the number of full calls (default: the calibrated budget);
            one calibration serves every budget.
    """

    interval: int | None = None
    schedule: list | str | None = None
    branch: int = 0
    correction: str | None = None
    budget: int | None = None
    order = 80
    requires_pipeline = True
    _hooks: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.interval is None and self.schedule is None:
            raise ValueError("FeatureCache needs interval=N or schedule=[...] / 'quadratic' / 'calibrated'")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"interval must be a positive integer, got {self.interval!r}")
        if isinstance(self.schedule, str) and self.schedule not in ("uniform", "quadratic", "calibrated", "dp"):
            raise ValueError(f"schedule {self.schedule!r}: use a list of full-call indices, 'uniform', "
                             "'quadratic', 'calibrated' or 'dp'")
        if self.schedule in ("uniform", "quadratic") and self.interval is None:
            raise ValueError(f"schedule={self.schedule!r} needs interval=N")
        if isinstance(self.schedule, (list, tuple)):
            self.schedule = schedules.validate(self.schedule, None)
        if self.budget is not None and (self.schedule not in ("calibrated", "dp") or self.budget < 1):
            raise ValueError("budget=K (K >= 1) goes with schedule='calibrated' or 'dp'")
        if self.correction not in (None, "dec", "dec-mean"):
            raise ValueError(f"correction {self.correction!r}: use None, 'dec' or 'dec-mean'")
        self._full, self._plan, self._correction, self._calib, self._dec = True, None, None, None, None
        self._shape = None

    # -- the schedule ------------------------------------------------------------------------------
    def full_calls(self, n: int | None) -> list[int] | None:
        """Full-call indices for a pipeline call of ``n`` UNet calls (``None`` = decided per call)."""
        if isinstance(self.schedule, list):
            return schedules.validate(self.schedule, n)
        if self.schedule == "calibrated":
            return self._calib.full_calls(n)  # checks n against the calibrated call count
        if self.schedule == "dp":
            self._calib.check_calls(n)
            return self._calib.dp_calls()
        if n is None:
            if self.schedule == "quadratic":
                raise ValueError("schedule='quadratic' needs the number of UNet calls: apply to the pipeline")
            return None
        if self.schedule == "quadratic":
            return schedules.quadratic(n, self.interval)
        return schedules.uniform(n, self.interval)

    def _on_tick(self, clock):
        if clock.step == 0:
            full = self.full_calls(clock.total)
            self._plan = set(full) if full is not None else None
            self._shape = clock.batch_shape
            if self.correction is not None:
                self._calib.check_calls(clock.total)
                key = tuple(full) if full is not None else None
                if key not in self._dec_cache:
                    if key is None:
                        raise ValueError(f"correction={self.correction!r} needs the number of UNet calls: apply to the pipeline")
                    self._dec_cache[key] = self._calib.dec(full, gain=self.correction == "dec")
                self._dec = self._dec_cache[key]
        if self._plan is None:
            self._full = clock.step % self.interval == 0
        else:
            self._full = clock.step in self._plan
        if clock.batch_shape != self._shape:  # a different batch than the kept features: recompute
            self._full, self._shape = True, clock.batch_shape
        if not self._full and self._dec is not None:
            self._correction = self._dec.for_call(clock.step)
        else:
            self._correction = None

    # -- attach / detach ---------------------------------------------------------------------------
    def attach(self, ctx: Context) -> None:
        n = num_branches(ctx.unet)
        if not 0 <= self.branch < n:
            raise ValueError(f"branch {self.branch} out of range 0..{n - 1} for this UNet")
        self._dec, self._dec_cache = None, {}
        if self.schedule in ("calibrated", "dp") or self.correction is not None:
            if ctx.calibration is None:
                raise CalibrationError(f"FeatureCache(schedule={self.schedule!r}, correction={self.correction!r}) needs a "
                                       "calibration: run `accel calibrate` and pass calibration=DIR")
            self._calib = ctx.calibration.cache(self.branch, self.budget)
        units, boundary = cached_units(ctx.unet, self.branch)
        self._hooks = {}
        for u in units:
            hook = _ReuseHook(self, boundary=u.path == boundary.path)
            attach(u.module, hook, self.hook_name, root=ctx.unet)
            self._hooks[u.path] = (u.module, hook)
        self._full, self._shape = True, None
        ctx.clock.add_listener(self.hook_name, self._on_tick)

    def detach(self, ctx: Context) -> None:
        ctx.clock.remove_listener(self.hook_name)
        for module, _ in self._hooks.values():
            detach(module, self.hook_name, root=ctx.unet)
        self._hooks = {}
