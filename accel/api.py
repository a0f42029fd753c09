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

from .transforms.base import Transform
from .transforms.compose import Handle, _check_key, attach, check
from .transforms.recipe import Recipe, load as load_recipe
from .unet import resolve

RECIPE_FILE = "accel_recipe.toml"
CALIBRATION_DIR = "accel_calibration"

__all__ = ["apply", "Handle", "AcceleratedPipeline", "load_pipeline"]


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
    check(unet, pipe, ts)
    if calibration is not None and not hasattr(calibration, "cache"):
        from .calibration import Calibration

        calibration = Calibration.load(calibration, unet=unet, pipe=pipe)
    handle = attach(unet, pipe, ts, recipe_name, calibration, checked=True)
    if calibration is not None and pipe is not None:
        from .calibration import uses_calibration

        if any(uses_calibration(t) for t in ts):
            handle.clock.add_listener(_check_key(handle), _calibration_check(calibration, weakref.ref(pipe)))
    return handle


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
