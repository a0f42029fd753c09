"""accel: make stock diffusers UNet pipelines faster, smaller and more stable to train.

>>> import accel
>>> handle = accel.apply(pipe, accel.FeatureCache(interval=3, branch=0))
>>> image = pipe(prompt).images[0]
>>> handle.remove()

The names below are imported on first use (PEP 562), so ``import accel`` and ``accel --help`` do not load
torch or diffusers; ``accel.miniature``, ``accel.calibrate`` and the other submodules load the same way.
"""
__version__ = "0.1.0"

import importlib as _importlib
import os as _os
import sys as _sys

_EXPORTS = {
    "apply": "api", "Handle": "api", "AcceleratedPipeline": "api",
    "Recipe": "recipe",
    "Transform": "transforms", "FeatureCache": "transforms", "Inherit": "transforms", "Quantize": "transforms",
    "ScaleLong": "transforms",
    "AccelError": "errors", "CalibrationError": "errors", "RecipeError": "errors",
    "TransformConflictError": "errors", "UnsupportedModelError": "errors", "IrreversibleError": "errors",
    "InputError": "errors",
}
_SUBMODULES = {"adapters", "api", "bench", "calibrate", "calibration", "cli", "dist", "errors", "eval", "experiments", "fileio", "hooks",
               "kernels", "miniature", "recipe", "recipes", "schedules", "timing", "transforms", "unet"}

__all__ = ["apply", "Handle", "AcceleratedPipeline", "Recipe", "Transform", "FeatureCache", "Inherit", "Quantize", "ScaleLong", "AccelError",
           "CalibrationError", "RecipeError", "TransformConflictError", "UnsupportedModelError", "IrreversibleError",
           "InputError", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


# -- Triton's interpreter on machines without CUDA ------------------------------------------------------
# accel's Triton kernels can only run on CPU in Triton's interpreter, which reads TRITON_INTERPRET when triton is
# first imported. Deciding needs torch (torch.cuda.is_available()); so that `import accel` stays light, the decision
# is taken now if torch is already imported, else just before triton is first looked up (torch looks it up while
# it imports itself, then imports it with torch._dynamo, e.g. when diffusers loads).
class _TritonInterpreterSwitch:
    """A meta-path finder that finds nothing: it only sets TRITON_INTERPRET=1 before triton's first import
    when torch sees no CUDA device, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            _decide_triton_interpreter()
        return None


_switch = _TritonInterpreterSwitch()


def _decide_triton_interpreter():
    if "TRITON_INTERPRET" in _os.environ or "triton" in _sys.modules:
        _remove_switch()
        return
    torch = _sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return  # torch is importing itself (and looks triton up): decide at the next look-up
    _remove_switch()
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


def _remove_switch():
    if _switch in _sys.meta_path:
        _sys.meta_path.remove(_switch)


if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
    if "torch" in _sys.modules:
        _decide_triton_interpreter()
    else:
        _sys.meta_path.insert(0, _switch)
