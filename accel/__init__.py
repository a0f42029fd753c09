"""accel: make stock diffusers UNet pipelines faster, smaller and more stable to train.

>>> import accel
>>> handle = accel.apply(pipe, accel.FeatureCache(interval=3, branch=0))
>>> image = pipe(prompt).images[0]
>>> handle.remove()
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():  # Triton kernels can then only run in the interpreter
        _os.environ["TRITON_INTERPRET"] = "1"

from .api import AcceleratedPipeline, Handle, apply
from .errors import AccelError, CalibrationError, RecipeError, TransformConflictError, UnsupportedModelError
from .recipe import Recipe
from .transforms import FeatureCache, Inherit, Quantize, ScaleLong, Transform

__all__ = ["apply", "Handle", "AcceleratedPipeline", "Recipe", "Transform", "FeatureCache", "Inherit", "Quantize", "ScaleLong", "AccelError",
           "CalibrationError", "RecipeError", "TransformConflictError", "UnsupportedModelError", "__version__"]
