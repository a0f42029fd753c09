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

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from .. import schedules
from ..errors import CalibrationError, InputError
from ..hooks import attach, detach_all
from ..unet import cached_units, feature_of, num_branches, with_feature
from . import adaptive
from . import forecast as forecasting
from .base import Applied, Context, Transform, register


class _ReuseHook(ModelHook):
    """Runs the module on full calls (keeping its output) and returns the kept output on cached calls; on the
    boundary unit the kept feature is forecast and/or corrected first."""

    _is_stateful = True

    def __init__(self, owner: "_CachedFeatures", boundary: bool):
        super().__init__()
        self.owner, self.boundary, self.kept = owner, boundary, None

    def new_forward(self, module, *args, **kwargs):
        owner = self.owner
        if owner._full:
            self.kept = self.fn_ref.original_forward(*args, **kwargs)
            if self.boundary:
                owner._keep(owner._features, feature_of(self.kept))
            return self.kept
        if not self.boundary or (owner._sources < 2 and owner._correction is None and owner._dw is None):
            return self.kept
        h = owner._forecast(owner._features) if owner._sources > 1 else feature_of(self.kept)
        if owner._correction is not None:
            h = owner._correction(h)
        if owner._dw is not None:
            h = owner._rescale_difference(h)
        return with_feature(self.kept, h)

    def reset_state(self, module):
        self.kept = None
        return module


SCHEDULES = ("uniform", "quadratic", "calibrated", "dp", "adaptive")


@register
@dataclass
class FeatureCache(Transform):
    """Reuse (or forecast) the deep UNet features between full calls.

    Args:
        interval: a full call every ``interval`` UNet calls (DeepCache's ``cache_interval``).
        schedule: explicit full-call indices (a list) or ``"uniform"`` / ``"quadratic"`` (DeepCache's
            non-uniform schedule; with ``interval`` it sets the number of full calls), ``"calibrated"``
            (the schedule ``accel calibrate`` chose: the DP's, refined on the final samples' error for the
            budgets it was calibrated at), ``"dp"`` (CacheQuant's DP schedule on the calibrated feature
            distances, unrefined) or ``"adaptive"`` (decided at every UNet call from a free probe, see
            :mod:`accel.transforms.adaptive`: with ``budget=K`` the threshold ``accel calibrate`` found for a
            mean of K full calls, or an explicit ``threshold``).
        branch: DeepCache's ``cache_branch_id`` (0 = shallowest, fastest).
        correction: ``"dec"`` applies CacheQuant's per-channel cache-error correction ``a_t h + b_t`` from the
            calibration, ``"dec-mean"`` its mean-only variant (``h + b_t``, ours: more conservative);
            ``None`` reuses features as they are. With a forecast, the correction applies to the forecast.
        budget: with ``schedule="calibrated"``, ``"dp"`` or ``"adaptive"``, the number of full calls (default:
            the calibrated budget); one calibration serves every budget.
        forecast: what a cached call hands the shallow path: ``None`` the last full call's feature (DeepCache),
            ``"taylor1"`` / ``"taylor2"`` its extrapolation from the last 2 / 3 full calls in the call index
            (TaylorSeer's finite-difference Taylor expansion, :mod:`accel.transforms.forecast`);
            ``"taylor1-cfg"`` / ``"taylor2-cfg"`` under classifier-free guidance extrapolate only the mean of the
            unconditional and conditional halves and keep their difference from the last full call (it does not move
            along a line: :func:`accel.transforms.forecast.cfg_mean_step`); best at few steps (DPM-Solver++ 25);
            without guidance (the pipeline's ``do_classifier_free_guidance`` off) they are ``"taylor1"`` / ``"taylor2"``.
        trust: ``"skill"`` scales each sample's forecast step by how well the forecast did at the last full call,
            against reuse (:func:`accel.transforms.forecast.skill`: 1 = as extrapolated, 0 = reuse), on the device;
            extrapolating far (few steps, long gaps) otherwise feeds errors back into the trajectory.
        threshold: ``schedule="adaptive"`` without a calibration: a call is full when the probe's relative L1
            error exceeds this (e.g. 0.05-0.3).
        max_cached: ``schedule="adaptive"``: at most this many consecutive cached calls (MagCache's cap).
        difference: with a ``-cfg`` forecast and ``schedule="calibrated"``, ``"calibrated"`` rescales the guidance
            difference it keeps, per sample and channel, by the norm model ``accel calibrate`` fit for the schedule
            (:func:`accel.transforms.forecast.rescale_difference`; issue #25: at DPM-Solver++ 25 the difference
            changes 8-30% per call, so keeping it is the larger error); the halves' mean keeps the forecast. Without
            guidance at run time it does nothing.
    """

    interval: int | None = None
    schedule: list | str | None = None
    branch: int = 0
    correction: str | None = None
    budget: int | None = None
    forecast: str | None = None
    trust: str | None = None
    threshold: float | None = None
    max_cached: int | None = None
    difference: str | None = None
    order = 80
    requires_pipeline = True

    def __post_init__(self):
        if self.interval is None and self.schedule is None:
            raise InputError("FeatureCache needs interval=N or schedule=[...] / 'quadratic' / 'calibrated' / 'adaptive'")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise InputError(f"interval must be a positive integer, got {self.interval!r}")
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULES:
            raise InputError(f"schedule {self.schedule!r}: use a list of full-call indices, "
                             + ", ".join(repr(s) for s in SCHEDULES))
        if self.schedule in ("uniform", "quadratic") and self.interval is None:
            raise InputError(f"schedule={self.schedule!r} needs interval=N")
        if isinstance(self.schedule, (list, tuple)):
            self.schedule = schedules.validate(self.schedule, None)
        if self.budget is not None and (self.schedule not in ("calibrated", "dp", "adaptive") or self.budget < 1):
            raise InputError("budget=K (K >= 1) goes with schedule='calibrated', 'dp' or 'adaptive'")
        if self.correction not in (None, "dec", "dec-mean"):
            raise InputError(f"correction {self.correction!r}: use None, 'dec' or 'dec-mean'")
        self._order = forecasting.order_of(self.forecast)
        self._cfg = forecasting.on_cfg_mean(self.forecast)
        if self._cfg and self.correction is not None:
            raise InputError(f"forecast={self.forecast!r} mixes the guidance halves, which the calibrated correction "
                             "cannot model: use forecast='taylor1' with a correction, or no correction")
        if self.trust not in (None, "skill"):
            raise InputError(f"trust {self.trust!r}: use None or 'skill'")
        if self.trust is not None and self._order == 0:
            raise InputError("trust='skill' weighs a forecast: give forecast='taylor1', 'taylor2' (or a '-cfg' one)")
        if self.trust is not None and self.correction is not None:
            raise InputError("trust='skill' damps each sample's forecast at run time, which the calibrated correction "
                             "cannot model: use one of trust and correction")
        if self.difference not in (None, "calibrated"):
            raise InputError(f"difference {self.difference!r}: use None (keep the last full call's) or 'calibrated'")
        if self.difference is not None and not self._cfg:
            raise InputError("difference='calibrated' rescales the guidance difference a '-cfg' forecast keeps: give "
                             "forecast='taylor1-cfg' (or 'taylor2-cfg')")
        if self.difference is not None and self.schedule != "calibrated":
            raise InputError("difference='calibrated' is fit per cached call of the calibrated schedule: give "
                             "schedule='calibrated'")
        self._depth = self._order + 1 + (self.trust is not None)  # full calls kept (skill needs one more)
        if self.schedule == "adaptive":
            if self.threshold is not None and self.budget is not None:
                raise InputError("schedule='adaptive' takes budget=K (a calibrated threshold) or threshold=x, not both")
            if self.threshold is not None and not self.threshold > 0:
                raise InputError(f"threshold must be > 0, got {self.threshold!r}")
        elif self.threshold is not None or self.max_cached is not None:
            raise InputError("threshold and max_cached go with schedule='adaptive'")
        if self.max_cached is not None and (not isinstance(self.max_cached, int) or self.max_cached < 1):
            raise InputError(f"max_cached must be a positive integer, got {self.max_cached!r}")

    @property
    def prediction(self) -> str | None:
        """What cached calls hand on, as calibrations name it: None (reuse), ``"taylor1"``, ``"taylor1+skill"``..."""
        return None if self.forecast is None else self.forecast + (f"+{self.trust}" if self.trust else "")

    def needs_calibration(self) -> bool:
        """Whether this cache reads a calibration (its schedule, correction or adaptive threshold)."""
        return self.schedule in ("calibrated", "dp") or self.correction is not None or \
            (self.schedule == "adaptive" and self.threshold is None)

    def attach(self, ctx: Context) -> "_CachedFeatures":
        n = num_branches(ctx.unet)
        if not 0 <= self.branch < n:
            raise InputError(f"branch {self.branch} out of range 0..{n - 1} for this UNet")
        if self.needs_calibration() and ctx.calibration is None:
            raise CalibrationError(f"FeatureCache(schedule={self.schedule!r}, correction={self.correction!r}) needs a "
                                   "calibration: run `accel calibrate` and pass calibration=DIR"
                                   + (" (or give threshold=x)" if self.schedule == "adaptive" else ""))
        return _CachedFeatures(self, ctx)


class _CachedFeatures(Applied):
    """A :class:`FeatureCache` on one UNet: its hooks, the full calls of this pipeline call, the features kept for
    the forecast, the correction of this call, the counts."""

    def __init__(self, transform: FeatureCache, ctx: Context):
        super().__init__(transform)
        self._full, self._plan, self._correction, self._calib, self._dec = True, None, None, None, None
        self._shape, self._open, self._run, self._skill = None, False, 0, None
        self._idx: list[int] = []        # the full calls the forecast uses, newest first
        self._features: list = []        # the boundary feature at those calls
        self._probes: list = []          # the probe feature at those calls (adaptive)
        self._w = torch.zeros(forecasting.ORDERS["taylor2"] + 1)  # forecast weights of this call (on the features' device)
        self._sources = 1
        self._dec_cache, self._threshold = {}, None
        self._dtab, self._dw = None, None  # the difference model's W (calls, C, 3) and this call's row (device)
        if self.needs_calibration():
            self._calib = ctx.calibration.cache(self.branch, self.budget)
        if self.difference is not None:
            self._dtab = self._calib.dscale(forecast=self.prediction)
        if self.schedule == "adaptive":
            self._threshold = self.threshold if self.threshold is not None else \
                self._calib.threshold(self.prediction, self.max_cached, self.correction)
        units, boundary = cached_units(ctx.unet, self.branch)
        self._hooks = {}
        for u in units:
            hook = _ReuseHook(self, boundary=u.path == boundary.path)
            attach(u.module, hook, self.hook_name, root=ctx.unet)
            self._hooks[u.path] = (u.module, hook)
        if self.schedule == "adaptive":
            attach(ctx.unet.conv_in, adaptive.Probe(self), self.hook_name, root=ctx.unet)
            self._hooks["conv_in"] = (ctx.unet.conv_in, None)
        self._clock, self._pipe, self._split = ctx.clock, ctx.pipe, False
        self._stats = _Stats()
        ctx.clock.add_listener(self.hook_name, self._on_tick)
        ctx.clock.add_listener(self.hook_name, self._after_call, after=True)

    # -- the schedule ------------------------------------------------------------------------------
    def full_calls(self, n: int | None) -> list[int] | None:
        """Full-call indices for a pipeline call of ``n`` UNet calls (``None`` = decided per call)."""
        if isinstance(self.schedule, list):
            return schedules.validate(self.schedule, n)
        if self.schedule == "calibrated":
            return self._calib.full_calls(n, forecast=self.prediction)  # checks n against the calibrated call count
        if self.schedule == "dp":
            self._calib.check_calls(n)
            return self._calib.dp_calls()
        if self.schedule == "adaptive":
            return None
        if n is None:
            if self.schedule == "quadratic":
                raise InputError("schedule='quadratic' needs the number of UNet calls: apply to the pipeline")
            return None
        if self.schedule == "quadratic":
            return schedules.quadratic(n, self.interval)
        return schedules.uniform(n, self.interval)

    def _on_tick(self, clock):
        t = clock.step
        if t == 0:
            # a '-cfg' forecast splits the batch in guidance halves only when the pipeline runs guidance (host bool)
            self._split = self._cfg and bool(getattr(self._pipe, "do_classifier_free_guidance", False))
            full = self.full_calls(clock.total)
            self._plan = set(full) if full is not None else None
            self._shape, self._run = clock.batch_shape, 0
            self._idx, self._features, self._probes, self._skill = [], [], [], None
            self._stats.begin()
            if self.correction is not None:
                self._calib.check_calls(clock.total)
                if self.schedule != "adaptive":
                    key = tuple(full) if full is not None else None
                    if key not in self._dec_cache:
                        if key is None:
                            raise InputError(f"correction={self.correction!r} needs the number of UNet calls: apply to the pipeline")
                        self._dec_cache[key] = self._calib.dec(full, gain=self.correction == "dec", order=self._order)
                    self._dec = self._dec_cache[key]
        self._open = False
        if self.schedule == "adaptive":
            self._full = t == 0 or (self.max_cached is not None and self._run >= self.max_cached)
            self._open = not self._full  # the probe decides (Probe hook on conv_in)
        elif self._plan is None:
            self._full = t % self.interval == 0
        else:
            self._full = t in self._plan
        if clock.batch_shape != self._shape:  # a different batch than the kept features: recompute
            self._full, self._open, self._shape = True, False, clock.batch_shape
            self._idx, self._features, self._probes, self._skill = [], [], [], None
        self._prepare(t)
        if not self._open:
            self._settle(t)

    def _prepare(self, t):
        """The forecast weights for call ``t`` from the full calls kept (used if ``t`` is cached)."""
        self._sources = min(len(self._idx), self._order + 1)
        if self._sources > 1:
            kept = self._features or self._probes
            dev = kept[0].device if kept else self._w.device
            w = torch.tensor(forecasting.weights(self._idx[: self._sources], t), dtype=torch.float32,
                             pin_memory=dev.type == "cuda")
            # on the features' device, copied without a host sync: no CPU tensor in a compiled or captured call
            self._w = w.to(dev, non_blocking=True)

    def _settle(self, t):
        """The call is decided: count it, and pick the correction of a cached call."""
        self._stats.count(self._full)
        self._run = 0 if self._full else self._run + 1
        self._dw = None
        if self._full:
            self._correction = None
            self._idx = [t] + self._idx[: self._depth - 1]
        elif self.correction is None:
            self._correction = None
            if self._split and self._dtab is not None:  # the row of W of this call, chosen on the host by call index
                dev = self._features[0].device
                if self._dtab.device != dev:  # once per device: no CPU tensor in a compiled or captured call
                    self._dtab = self._dtab.to(dev)
                self._dw = self._dtab[t]
        elif self._dec is not None:
            self._correction = self._dec.for_call(t)
        else:  # adaptive: the coefficients of this call for the full calls that happened
            key = (t, tuple(self._idx))
            fn = self._dec_cache.get(key)
            if fn is None:
                fn = self._dec_cache[key] = self._calib.dec_for(t, self._idx[: self._order + 1],
                                                                gain=self.correction == "dec")
            self._correction = fn

    @torch.compiler.disable
    def _decide(self, p):
        """Probe hook (conv_in output ``p``): decide an open call; keep the probe of full calls."""
        if self._open:
            t = self._clock.step
            pred = self._forecast(self._probes) if self._sources > 1 else self._probes[0]
            # the one deliberate host sync of the adaptive mode: the decision is a host branch
            self._full = float(adaptive.relative_error(p, pred)) > self._threshold
            self._open = False
            self._settle(t)
        if self._full and self.schedule == "adaptive":
            self._keep(self._probes, p)

    def _keep(self, store: list, f):
        """Keep a full call's feature for the forecast (newest first, as many as the forecast needs)."""
        if self.trust is not None and store is self._features:
            self._skill = forecasting.skill(f, store, self._idx, self._order, cfg=self._split)
        store.insert(0, f)
        del store[self._depth:]

    def _forecast(self, store: list):
        """``sum_m w_m F_{x_m}`` over the kept features (Lagrange form of the Taylor expansion); with
        ``trust="skill"``, the step from the last feature scaled per sample by the forecast's skill; with a ``-cfg``
        forecast under guidance, the step averaged over the guidance halves."""
        w = self._w
        h = store[0] * w[0]
        for m in range(1, self._sources):
            h = h + store[m] * w[m]
        if self._skill is not None and store is self._features:
            h = torch.lerp(store[0], h, self._skill)
        if self._split and store is self._features:
            h = forecasting.cfg_mean_step(h, store[0])
        return h

    def _rescale_difference(self, h):
        """``h`` with its guidance difference rescaled by the norm model (:mod:`accel.transforms.forecast`) from the
        kept features of the last two full calls; on the device, no sync."""
        f = self._features
        d_j, x = forecasting.difference_regressors(f[0], f[1] if len(f) > 1 else None)
        return forecasting.rescale_difference(h, d_j, x, self._dw)

    def _after_call(self, clock):
        """After a full call replayed from CUDA graphs: what is kept for the next calls is copied out of the graph's
        memory pool, which the next replay of that graph overwrites (what torch's CUDA-graph trees ask of tensors
        kept across calls: "clone the tensor outside of torch.compile")."""
        if not (clock.cudagraphs and self._full):
            return
        from torch.utils._pytree import tree_map

        copy = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
        for _, hook in self._hooks.values():
            if hook is not None and hook.kept is not None:
                hook.kept = tree_map(copy, hook.kept)
                if hook.boundary and self._features:
                    self._features[0] = feature_of(hook.kept)
        if self._probes:
            self._probes[0] = self._probes[0].clone()
        if self._skill is not None:
            self._skill = self._skill.clone()

    def detach(self, ctx: Context) -> None:
        detach_all([module for module, _ in self._hooks.values()], self.hook_name, ctx.unet, ctx.clock)
        self._hooks = {}
        self._idx, self._features, self._probes, self._clock, self._pipe = [], [], [], None, None
        self._dtab, self._dw = None, None

    def stats(self) -> dict:
        """Full and cached UNet calls since apply, in all and per pipeline call."""
        return self._stats.as_dict()



class _Stats:
    """Counts of full and cached UNet calls, per pipeline call."""

    def __init__(self):
        self.per_call: list[list[int]] = []

    def begin(self):
        self.per_call.append([0, 0])

    def count(self, full: bool):
        if not self.per_call:
            self.begin()
        self.per_call[-1][0 if full else 1] += 1

    def as_dict(self) -> dict:
        full = sum(f for f, _ in self.per_call)
        cached = sum(c for _, c in self.per_call)
        n = len(self.per_call)
        return {"pipeline_calls": n, "unet_calls": full + cached, "full": full, "cached": cached,
                "full_per_pipeline_call": full / n if n else 0.0,
                "per_pipeline_call": [{"full": f, "cached": c} for f, c in self.per_call]}
