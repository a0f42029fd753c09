"""Errors accel raises for bad input. All derive from ``ValueError`` so callers may catch either."""


class AccelError(ValueError):
    """Base class of accel's input errors."""


class InputError(AccelError):
    """An argument that cannot work (out of range, the wrong kind, a combination that does not go together), found
    before any work; the CLI prints it as one line (a bare ``ValueError`` from our code would be a bug there)."""


class UnsupportedModelError(AccelError, TypeError):
    """The pipeline or model is not one accel can transform."""


class CalibrationError(AccelError):
    """A calibration artifact is missing, corrupted, or does not match the model / scheduler / steps."""


class RecipeError(AccelError):
    """A recipe file is malformed or names unknown transforms or parameters."""


class TransformConflictError(AccelError):
    """Two transforms cannot be applied together (or one is applied twice)."""


class IrreversibleError(AccelError):
    """``remove()`` of a transform that was told not to keep what undoing it needs (``Quantize(keep_float=False)``)."""


class AccelWarning(UserWarning):
    """A legitimate but risky combination (e.g. a calibration used at another guidance scale)."""
