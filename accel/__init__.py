"""accel: make stock diffusers UNet pipelines faster, smaller and more stable to train.

>>> import accel
>>> handle = accel.apply(pipe, accel.FeatureCache(interval=3, branch=0))
>>> image = pipe(prompt).images[0]
>>> handle.remove()
"""
__version__ = "0.1.0"

from .api import AcceleratedPipeline, Handle, apply
from .errors import AccelError, CalibrationError, RecipeError, TransformConflictError, UnsupportedModelError
from .recipe import Recipe
from .transforms import FeatureCache, Transform

__all__ = ["apply", "Handle", "AcceleratedPipeline", "Recipe", "Transform", "FeatureCache", "AccelError",
           "CalibrationError", "RecipeError", "TransformConflictError", "UnsupportedModelError", "__version__"]
