"""How transforms are applied together and removed: :func:`attach` puts a list of transforms on a UNet in their
declared order (one step clock for all), :class:`Handle` is what the user holds to undo them.

This is the mechanism below ``accel.apply`` (which adds recipes by name, calibration folders and the pipeline-call
checks): a transform that must apply itself, as :meth:`ScaleLong.from_pretrained` does, uses it without the API.
"""
from __future__ import annotations

import weakref

import torch

from .. import hooks
from ..errors import IrreversibleError, TransformConflictError, UnsupportedModelError
from .base import Applied, Context, Transform
from .recipe import Recipe

# The handles active on each UNet: a second transform of a type already applied is refused.
_active: "weakref.WeakKeyDictionary[object, list[Handle]]" = weakref.WeakKeyDictionary()


class Handle:
    """What :func:`apply` returns: the applied transforms, :meth:`remove` to undo them."""

    def __init__(self, unet, pipe, transforms: list[Transform], recipe_name: str | None, calibration):
        self.unet, self._pipe = unet, (weakref.ref(pipe) if pipe is not None else None)
        self.transforms, self.recipe_name, self.calibration = transforms, recipe_name, calibration
        self.clock = None
        self._attached: list[Applied] = []  # the run-time half of each transform attached, in attach order
        self._made: list[Applied] = []      # the same, kept after remove() for stats() and applied()
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
                applied = t.attach(self._ctx())
                if not isinstance(applied, Applied):
                    raise TypeError(f"{type(t).__name__}.attach must return what it attached (an "
                                    f"accel.transforms.base.Applied), got {type(applied).__name__}")
                self._attached.append(applied)
                self._made = list(self._attached)
        except Exception:
            self.remove()
            raise
        for a in self._attached:
            a.attached(self._ctx())
        self.active = True
        _active.setdefault(self.unet, []).append(self)

    def reset(self):
        """Forget cached state and restart the step count (a new pipeline call does this by itself)."""
        if self.clock is not None:
            self.clock.reset()
        from diffusers.hooks import HookRegistry

        if hasattr(self.unet, "_diffusers_hook"):
            HookRegistry.check_if_exists_or_initialize(self.unet).reset_stateful_hooks(recurse=True)

    def applied(self, kind) -> Applied:
        """The run-time state of the transform ``kind`` (its class or its name, e.g. ``ScaleLong``) on this UNet:
        what it keeps while attached (``handle.applied(ScaleLong).norms``, ``.modules()``)."""
        name = kind if isinstance(kind, str) else kind.__name__
        for a in self._made:
            if type(a.transform).__name__ == name:
                return a
        raise KeyError(f"no {name} attached through this handle (it holds {[type(t).__name__ for t in self.transforms]})")

    def stats(self) -> dict:
        """What the transforms spent since ``apply``: UNet calls in all, full (the whole UNet ran) and cached,
        per pipeline call too (``full_per_pipeline_call``: the mean budget actually spent, the one axis on which
        fixed and adaptive cache schedules compare)."""
        for a in self._made:
            if hasattr(type(a), "stats"):
                return a.stats()
        if self.clock is None:
            raise RuntimeError("stats() of a removed handle: read them before remove()")
        n = self.clock.unet_calls - self._counts_at_attach[0]
        p = self.clock.pipeline_calls - self._counts_at_attach[1]
        return {"pipeline_calls": p, "unet_calls": n, "full": n, "cached": 0,
                "full_per_pipeline_call": n / p if p else 0.0}

    def remove(self):
        """Detach every transform; the model behaves (and is structured) exactly as before ``apply``. Refused,
        before anything is undone, when a transform did not keep what undoing it needs."""
        for a in self._attached:
            reason = a.cannot_remove()
            if reason:
                raise IrreversibleError(reason)
        for a in reversed(self._attached):
            a.detach(self._ctx())
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


def check(unet, pipe, transforms: list[Transform]) -> None:
    """Whether ``transforms`` can go on ``unet`` together (cheap; before any work): each type once, none already
    applied to this UNet, a pipeline for those that need one."""
    kinds = [type(t).__name__ for t in transforms]
    for k in set(kinds):
        if kinds.count(k) > 1:
            raise TransformConflictError(f"{k} appears {kinds.count(k)} times; apply it once")
    for h in _active.get(unet, []):
        clash = set(kinds) & {type(t).__name__ for t in h.transforms}
        if clash:
            raise TransformConflictError(f"{', '.join(sorted(clash))} is already applied to this UNet "
                                         f"({h!r}); remove that handle first")
    if pipe is None:
        needs = [type(t).__name__ for t in transforms if t.requires_pipeline]
        if needs:
            raise UnsupportedModelError(
                f"{', '.join(needs)} needs the pipeline, not a bare UNet: it counts UNet calls per pipeline "
                "call from the pipeline's scheduler. Use accel.apply(pipe, ...).")


def attach(unet, pipe, transforms: list[Transform], recipe_name: str | None = None, calibration=None,
           checked: bool = False) -> Handle:
    """Attach ``transforms`` to ``unet`` (of ``pipe``, or ``None`` for a bare UNet) in their declared order, after
    :func:`check` (``checked=True``: the caller ran it). When an ``attach`` fails, those before it are undone."""
    if not checked:
        check(unet, pipe, transforms)
    # the configs stay as they are (what is kept for this model lives in the handle's Applied objects), so one
    # config applies to several pipelines at once and each handle undoes exactly its own
    handle = Handle(unet, pipe, sorted(transforms, key=lambda t: t.order), recipe_name, calibration)
    handle._attach()
    return handle


def _check_key(handle) -> str:
    return f"accel.calibration_check.{id(handle)}"


