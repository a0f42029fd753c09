"""Transforms: one technique per module."""
from .base import REGISTRY, Context, Transform, register
from .cache import FeatureCache

__all__ = ["Transform", "Context", "REGISTRY", "register", "FeatureCache"]
from .quantize import Quantize  # noqa: E402

__all__ += ["Quantize"]
from .inherit import Inherit  # noqa: E402

__all__ += ["Inherit"]
from .scalelong import ScaleLong  # noqa: E402

__all__ += ["ScaleLong"]
