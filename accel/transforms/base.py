"""What every transform is: a small, pure config object, and what it leaves on a live UNet while attached.

A :class:`Transform` holds its parameters only: attaching it to a UNet builds an :class:`Applied`, the run-time
half (the hooks, kept features, quantized layers and counters of that one model), which the handle holds and
undoes. The config never changes after construction, so one config applies to any number of pipelines at once
and copies of it (:meth:`Transform.replace`) need nothing reset, as diffusers' cache configs and torchao's
``quantize_`` configs work. A transform declares ``order`` (where it goes when several are applied together: structural changes
such as module replacement first, step-level skipping last) and ``requires_pipeline`` (it needs the
pipeline's scheduler to know where a pipeline call starts and how many UNet calls it makes).
Parameters are dataclass fields; :meth:`to_dict` / :meth:`from_dict` are what recipes read and write.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass

from ..errors import RecipeError

REGISTRY: dict[str, type["Transform"]] = {}


def register(cls):
    REGISTRY[cls.__name__] = cls
    return cls


@dataclass
class Context:
    """What a transform gets when attached."""

    unet: object
    pipe: object | None
    clock: object
    calibration: object | None = None  # accel.calibration.Calibration, when one was given


class Applied:
    """One transform attached to one UNet: the run-time state its hooks read and write, and how to undo it.

    Made by :meth:`Transform.attach`; ``transform`` is the config it was made from. The run-time code reads the
    config's fields as its own attributes (``self.interval`` is ``self.transform.interval``): only names the run
    does not set itself are looked up on the config."""

    def __init__(self, transform: "Transform"):
        self.transform = transform

    def __getattr__(self, name):
        if name == "transform":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.transform, name)

    def detach(self, ctx: Context) -> None:
        """Undo the attach exactly."""
        raise NotImplementedError

    def attached(self, ctx: Context) -> None:
        """Called once every transform of an ``apply`` is attached (what may only happen once nothing can fail and
        make ``apply`` undo itself: e.g. ``Quantize(keep_float=False)`` drops the float layers here)."""

    def cannot_remove(self) -> str | None:
        """Why :meth:`detach` cannot restore the original model (``None``: it can)."""
        return None


class Transform(abc.ABC):
    order: int = 50
    requires_pipeline: bool = False

    @property
    def hook_name(self) -> str:
        return f"accel.{type(self).__name__}"

    @abc.abstractmethod
    def attach(self, ctx: Context) -> Applied:
        """Attach hooks / swap modules on ``ctx.unet``; what is kept for that model lives in the returned
        :class:`Applied` (never on the config: ``self`` is not changed)."""

    def config(self) -> dict:
        """The constructor arguments (every init field, ``None`` and callables included): ``type(t)(**t.config())``
        is an equal copy. Run-time state is never here: it lives in the :class:`Applied` objects."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **changes) -> "Transform":
        """A copy with ``changes`` (``dataclasses.replace``: validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            if v is not None:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        d = dict(d)
        kind = d.pop("type", None)
        if kind not in REGISTRY:
            raise RecipeError(f"unknown transform type {kind!r}; known: {', '.join(sorted(REGISTRY))}")
        klass = REGISTRY[kind]
        allowed = {f.name for f in dataclasses.fields(klass) if not f.name.startswith("_")}
        unknown = set(d) - allowed
        if unknown:
            raise RecipeError(f"{kind}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(sorted(allowed))}")
        try:
            return klass(**d)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{kind}: {e}") from None
