"""``accel.apply`` / ``Handle.remove`` and the drop-in ``AcceleratedPipeline``.

>>> handle = accel.apply(pipe, accel.FeatureCache(interval=3, branch=0))   # or a list, or a recipe name
>>> pipe(prompt, num_inference_steps=50)                                   # the unchanged call
>>> handle.remove()                                                        # the exact original back
"""
from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path

import torch

from . import hooks
from .errors import IrreversibleError, TransformConflictError, UnsupportedModelError
from .recipe import Recipe, load as load_recipe
from .transforms.base import Context, Transform
from .unet import resolve

RECIPE_FILE = "accel_recipe.toml"
CALIBRATION_DIR = "accel_calibration"

_active: "weakref.WeakKeyDictionary[object, list[Handle]]" = weakref.WeakKeyDictionary()


def _as_transforms(spec) -> tuple[list[Transform], str | None]:
    if isinstance(spec, Transform):
        return [spec], None
    if isinstance(spec, Recipe):
        return list(spec.transforms), spec.name
    if isinstance(spec, (str, os.PathLike)):
        r = load_recipe(spec)
        return list(r.transforms), r.name
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(t, Transform) for t in spec):
        return list(spec), None
    raise TypeError("accel.apply takes a Transform, a list of Transforms, a Recipe, or a recipe name / .toml path")


class Handle:
    """What :func:`apply` returns: the applied transforms, :meth:`remove` to undo them."""

    def __init__(self, unet, pipe, transforms: list[Transform], recipe_name: str | None, calibration):
        self.unet, self._pipe = unet, (weakref.ref(pipe) if pipe is not None else None)
        self.transforms, self.recipe_name, self.calibration = transforms, recipe_name, calibration
        self.clock = None
        self._attached: list[Transform] = []
        self.active = False

    @property
    def pipe(self):
        return self._pipe() if self._pipe is not None else None

    def _ctx(self):
        return Context(self.unet, self.pipe, self.clock, self.calibration)

    def _attach(self):
        self.clock = hooks.acquire_clock(self.unet, self.pipe)
        self._counts_at_attach = (self.clock.unet_calls, self.clock.pipeline_calls)
        try:
            for t in self.transforms:
                t.attach(self._ctx())
                self._attached.append(t)
        except Exception:
            self.remove()
            raise
        for t in self._attached:
            t.attached(self._ctx())
        self.active = True
        _active.setdefault(self.unet, []).append(self)

    def reset(self):
        """Forget cached state and restart the step count (a new pipeline call does this by itself)."""
        if self.clock is not None:
            self.clock.reset()
        from diffusers.hooks import HookRegistry

        if hasattr(self.unet, "_diffusers_hook"):
            HookRegistry.check_if_exists_or_initialize(self.unet).reset_stateful_hooks(recurse=True)

    def stats(self) -> dict:
        """What the transforms spent since ``apply``: UNet calls in all, full (the whole UNet ran) and cached,
        per pipeline call too (``full_per_pipeline_call``: the mean budget actually spent, the one axis on which
        fixed and adaptive cache schedules compare)."""
        for t in self.transforms:
            if hasattr(t, "stats"):
                return t.stats()
        if self.clock is None:
            raise RuntimeError("stats() of a removed handle: read them before remove()")
        n = self.clock.unet_calls - self._counts_at_attach[0]
        p = self.clock.pipeline_calls - self._counts_at_attach[1]
        return {"pipeline_calls": p, "unet_calls": n, "full": n, "cached": 0,
                "full_per_pipeline_call": n / p if p else 0.0}

    def remove(self):
        """Detach every transform; the model behaves (and is structured) exactly as before ``apply``. Refused,
        before anything is undone, when a transform did not keep what undoing it needs."""
        for t in self._attached:
            reason = t.cannot_remove()
            if reason:
                raise IrreversibleError(reason)
        for t in reversed(self._attached):
            t.detach(self._ctx())
        self._attached = []
        if self.clock is not None:
            self.clock.remove_listener(_check_key(self))
            self.clock.compiled, self.clock.cudagraphs = None, False
            hooks.release_clock(self.unet)
            self.clock = None
        handles = _active.get(self.unet, [])
        if self in handles:
            handles.remove(self)
        self.active = False

    def recipe(self) -> Recipe:
        return Recipe(name=self.recipe_name or "custom", transforms=list(self.transforms))

    def compile(self, **kwargs) -> "Handle":
        """``torch.compile`` the UNet below accel's step clock, with ``kwargs`` (``fullgraph=True`` by default):
        ``handle.compile(mode="reduce-overhead")`` for CUDA-graph replay. The clock and the transforms' per-call
        decisions run in Python before each call (a cache compiles one graph for full calls and one for cached
        calls, not one per step); what a static W8A8 call reads per step is on the device. ``remove()`` undoes it.
        Plain ``pipe.unet = torch.compile(pipe.unet)`` works as well, with one graph break at the clock (before the
        UNet's first op), so not with ``fullgraph=True``."""
        if not self.active:
            raise RuntimeError("compile() of a removed handle: apply the transforms again first")
        kwargs = {"fullgraph": True, **kwargs}
        backend = kwargs.get("backend", "inductor")
        self.clock.compiled = torch.compile(self.clock.fn_ref.original_forward, **kwargs)
        self.clock.cudagraphs = kwargs.get("mode") in ("reduce-overhead", "max-autotune") or backend == "cudagraphs"
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"Handle({state}, {[type(t).__name__ for t in self.transforms]})"


def apply(target, transforms, calibration=None) -> Handle:
    """Apply transforms to a diffusers pipeline (or a bare ``UNet2DConditionModel``).

    Args:
        target: a pipeline whose ``unet`` is a ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL; text2img,
            img2img, inpaint, ControlNet), or the UNet itself.
        transforms: a :class:`Transform`, a list of them, a :class:`Recipe`, a recipe name
            (``"deepcache-i3"``) or a path to a recipe ``.toml``.
        calibration: a calibration folder (``accel calibrate``) or a loaded ``Calibration``.
    Returns:
        a :class:`Handle`; ``handle.remove()`` restores the original model.
    """
    unet, pipe = resolve(target)
    ts, recipe_name = _as_transforms(transforms)
    kinds = [type(t).__name__ for t in ts]
    for k in set(kinds):
        if kinds.count(k) > 1:
            raise TransformConflictError(f"{k} appears {kinds.count(k)} times; apply it once")
    for h in _active.get(unet, []):
        clash = set(kinds) & {type(t).__name__ for t in h.transforms}
        if clash:
            raise TransformConflictError(f"{', '.join(sorted(clash))} is already applied to this UNet "
                                         f"({h!r}); remove that handle first")
    if pipe is None:
        needs = [type(t).__name__ for t in ts if t.requires_pipeline]
        if needs:
            raise UnsupportedModelError(
                f"{', '.join(needs)} needs the pipeline, not a bare UNet: it counts UNet calls per pipeline "
                "call from the pipeline's scheduler. Use accel.apply(pipe, ...).")
    if calibration is not None and not hasattr(calibration, "cache"):
        from .calibration import Calibration

        calibration = Calibration.load(calibration, unet=unet, pipe=pipe)
    ts = sorted(ts, key=lambda t: t.order)
    handle = Handle(unet, pipe, ts, recipe_name, calibration)
    handle._attach()
    if calibration is not None and pipe is not None:
        from .calibration import uses_calibration

        if any(uses_calibration(t) for t in ts):
            handle.clock.add_listener(_check_key(handle), _calibration_check(calibration, weakref.ref(pipe)))
    return handle


def _check_key(handle) -> str:
    return f"accel.calibration_check.{id(handle)}"


def _calibration_check(calibration, pipe_ref):
    """At the first UNet call of a pipeline call, before the UNet runs: the call's UNet-call count and guidance scale
    against the calibration's (its statistics are per call; :meth:`Calibration.check_guidance`: an error when
    classifier-free guidance is on in one and off in the other, a warning for another scale)."""
    def check(clock):
        pipe = pipe_ref()
        if clock.step == 0 and pipe is not None:
            calibrated = calibration.meta.get("scheduler", {}).get("unet_calls")
            if calibrated is not None:
                calibration.check_calls(calibrated, clock.total)
            calibration.check_guidance(getattr(pipe, "_guidance_scale", None))
    return check


def load_pipeline(path_or_id, pipeline_class=None, **kwargs):
    """diffusers' ``from_pretrained`` (``pipeline_class``, default ``DiffusionPipeline``), every component in
    float32 unless ``dtype`` / ``torch_dtype`` says otherwise: without it transformers loads a text encoder in the
    dtype its config stores (the miniature's: float16) beside a float32 UNet, and the first call fails."""
    import torch

    if pipeline_class is None:
        from diffusers import DiffusionPipeline as pipeline_class
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.float32
    return pipeline_class.from_pretrained(path_or_id, **kwargs)


class AcceleratedPipeline:
    """A drop-in wrapper: same ``__call__`` and outputs as the wrapped diffusers pipeline.

    >>> apipe = AcceleratedPipeline.from_pretrained("path/or/id", recipe="deepcache-i3")
    >>> apipe("a prompt").images[0]
    >>> pipe = apipe.remove()      # the plain pipeline, exactly as loaded
    """

    def __init__(self, pipeline, recipe=None, calibration=None):
        self.pipeline = pipeline
        self.handle = apply(pipeline, recipe, calibration) if recipe is not None else None

    @classmethod
    def from_pretrained(cls, path_or_id, recipe=None, calibration=None, pipeline_class=None, **kwargs):
        """Load a pipeline with diffusers' ``from_pretrained`` (:func:`load_pipeline`) and apply ``recipe``. A
        folder written by :meth:`save_pretrained` carries its recipe and calibration, used when none is given."""
        pipe = load_pipeline(path_or_id, pipeline_class, **kwargs)
        folder = Path(path_or_id)
        if recipe is None and (folder / RECIPE_FILE).is_file():
            recipe = folder / RECIPE_FILE
        if calibration is None and (folder / CALIBRATION_DIR).is_dir():
            calibration = folder / CALIBRATION_DIR
        return cls(pipe, recipe, calibration)

    def __call__(self, *args, **kwargs):
        if self.handle is not None:
            self.handle.reset()
        return self.pipeline(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("pipeline", "handle"):
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def remove(self):
        """Undo the acceleration; returns the plain pipeline."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        return self.pipeline

    def save_pretrained(self, path, **kwargs):
        """The pipeline's own ``save_pretrained`` (original weights), plus ``accel_recipe.toml`` and the
        calibration folder, so ``from_pretrained(path)`` restores the same acceleration."""
        path = Path(path)
        handle = self.handle
        if handle is not None:
            handle.remove()
        try:
            self.pipeline.save_pretrained(path, **kwargs)
        finally:
            if handle is not None:
                self.handle = apply(self.pipeline, handle.transforms, handle.calibration)
                self.handle.recipe_name = handle.recipe_name
        if self.handle is not None:
            self.handle.recipe().save(path / RECIPE_FILE)
            calib = self.handle.calibration
            if calib is not None:
                dest = path / CALIBRATION_DIR
                shutil.rmtree(dest, ignore_errors=True)
                calib.save(dest)

    def __repr__(self):
        return f"AcceleratedPipeline({type(self.pipeline).__name__}, {self.handle!r})"
