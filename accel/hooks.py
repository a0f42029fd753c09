"""The one hook layer (diffusers' own ``diffusers.hooks``) and the one step clock.

Every accel transform attaches ``diffusers.hooks.ModelHook`` objects to module *instances* through
``HookRegistry``: the mechanism diffusers' own caches, layer skip, group offloading and layerwise casting
use, so accel composes with them. This module adds only what diffusers lacks, thinly:

* :func:`attach` / :func:`detach`: register a hook under an ``accel.*`` name and, on removal, leave the
  module exactly as it was (the instance ``forward`` attribute and the registry that diffusers leaves
  behind are deleted when no hook remains).
* :class:`StepClock`: a stateful hook on the UNet that counts UNet calls within one pipeline call.
  Every schedule reads it. A new pipeline call is recognised without reading any device tensor: the
  pipeline's scheduler builds a new ``timesteps`` tensor in ``set_timesteps`` (object identity changes),
  and diffusers resets stateful hooks at the end of every pipeline call (``maybe_free_model_hooks``).
  The count is therefore right with CFG (one batched call per step), keyword or positional timesteps,
  schedulers that call the UNet twice per step (Heun) or repeat a timestep (PNDM), img2img's
  ``strength`` (fewer calls: the pipeline's ``_num_timesteps``, else ``len(timesteps) - begin_index``)
  and interrupted calls.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

CLOCK_HOOK = "accel.clock"


def attach(module: torch.nn.Module, hook: ModelHook, name: str, root: torch.nn.Module | None = None) -> ModelHook:
    """Register ``hook`` on ``module`` under ``name`` (diffusers' ``HookRegistry``). ``root``: the model
    that contains ``module`` (its registry's cached list of child registries is invalidated)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    _invalidate(root)
    return hook


def detach(module: torch.nn.Module, name: str, root: torch.nn.Module | None = None) -> None:
    """Remove the hook ``name`` from ``module``; if it was the last hook, restore the module exactly
    (no instance ``forward`` override, no ``_diffusers_hook`` attribute)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        module.__dict__.pop("forward", None)
        del module._diffusers_hook
    _invalidate(root)


def detach_all(modules, name: str, root: torch.nn.Module | None = None, clock: "StepClock | None" = None) -> None:
    """What every transform's (and calibration recorder's) undo does: the clock listener ``name`` (when a
    ``clock`` is given) off the step clock, then the hook ``name`` off each of ``modules``."""
    if clock is not None:
        clock.remove_listener(name)
    for module in modules:
        detach(module, name, root=root)


def _invalidate(root):
    registry = getattr(root, "_diffusers_hook", None) if root is not None else None
    if registry is not None:
        registry.invalidate_child_registries_cache()


def hooks_of(module: torch.nn.Module) -> list[str]:
    """Names of the hooks registered on ``module`` (empty if none)."""
    registry = getattr(module, "_diffusers_hook", None)
    return list(registry._hook_order) if registry is not None else []


class StepClock(ModelHook):
    """Counts UNet calls within a pipeline call; schedules read :attr:`step` and :attr:`total`.

    Listeners (``add_listener``) are called once per UNet call, *before* the UNet runs, with the clock;
    they set plain Python booleans that the transforms' hooks read (so ``torch.compile`` guards on a bool
    rather than on an integer that changes every step). ``after=True`` listeners run once the UNet returned.

    The UNet below the clock can be compiled (:meth:`accel.Handle.compile` sets :attr:`compiled`): the count and
    the listeners' decisions stay in Python, outside the compiled region, so ``fullgraph=True`` and CUDA-graph
    replay (``mode="reduce-overhead"``) see a UNet call without host work; ``torch.compile(pipe.unet)`` works
    too, with one graph break at the clock, before the UNet's first op.
    """

    _is_stateful = True

    def __init__(self, pipe=None):
        super().__init__()
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self._listeners: dict[str, Callable[["StepClock"], None]] = {}
        self._after: dict[str, Callable[["StepClock"], None]] = {}
        self.compiled: Callable | None = None  # the UNet's forward below the clock, compiled (Handle.compile)
        self.cudagraphs = False  # compiled with CUDA-graph replay: its outputs live in a pool the next replay reuses
        self._timesteps_id = None
        self.step = -1           # index of the current UNet call in this pipeline call
        self.total: int | None = None  # UNet calls this pipeline call will make (None if unknown)
        self.batch_shape = None  # shape of the current UNet input
        self.users = 0           # transforms sharing this clock
        self.unet_calls = self.pipeline_calls = 0  # counted since the clock was attached

    # -- listeners ---------------------------------------------------------------------------------
    def add_listener(self, key: str, fn: Callable[["StepClock"], None], after: bool = False):
        (self._after if after else self._listeners)[key] = fn

    def remove_listener(self, key: str):
        self._listeners.pop(key, None)
        self._after.pop(key, None)

    # -- hook ------------------------------------------------------------------------------------
    @property
    def pipe(self):
        return self._pipe() if self._pipe is not None else None

    def _scheduler_calls(self):
        """(the scheduler's timesteps object, UNet calls of this pipeline call or None)."""
        pipe = self.pipe
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        ts = getattr(scheduler, "timesteps", None)
        if ts is None:
            return None, None
        total = getattr(pipe, "_num_timesteps", None)  # diffusers pipelines set len(timesteps) before the loop
        if not isinstance(total, int):
            total = len(ts) - (getattr(scheduler, "begin_index", None) or 0)
        return ts, total

    @torch.compiler.disable
    def tick(self, sample: torch.Tensor | None):
        ts, total = self._scheduler_calls()
        if ts is not None and ts is not self._timesteps_id:
            self._timesteps_id, self.step = ts, -1  # the scheduler was set up anew: a new pipeline call
        self.step += 1
        self.unet_calls += 1
        self.pipeline_calls += self.step == 0
        self.total = total
        self.batch_shape = tuple(sample.shape) if sample is not None else None
        for fn in self._listeners.values():
            fn(self)

    def pre_forward(self, module, *args, **kwargs):
        self.tick(args[0] if args else kwargs.get("sample"))
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        """The UNet below the clock: compiled if :attr:`compiled` is set; then the ``after`` listeners."""
        forward = self.compiled if self.compiled is not None else self.fn_ref.original_forward
        out = forward(*args, **kwargs)
        if self._after:
            self._done()
        return out

    @torch.compiler.disable
    def _done(self):
        for fn in self._after.values():
            fn(self)

    def reset_state(self, module):
        self.reset()
        return module

    def reset(self):
        """Start counting anew (called by diffusers at the end of every pipeline call)."""
        self.step, self.total, self._timesteps_id = -1, None, None


def get_clock(unet: torch.nn.Module, pipe=None, create: bool = True) -> StepClock | None:
    """The UNet's clock (one per UNet, shared by every transform on it)."""
    registry = getattr(unet, "_diffusers_hook", None)
    clock = registry.get_hook(CLOCK_HOOK) if registry is not None else None
    if clock is None and create:
        clock = attach(unet, StepClock(pipe), CLOCK_HOOK)
    elif clock is not None and pipe is not None and clock.pipe is None:
        clock._pipe = weakref.ref(pipe)
    return clock


def acquire_clock(unet, pipe=None) -> StepClock:
    clock = get_clock(unet, pipe)
    clock.users += 1
    return clock


def release_clock(unet) -> None:
    clock = get_clock(unet, create=False)
    if clock is None:
        return
    clock.users -= 1
    if clock.users <= 0:
        detach(unet, CLOCK_HOOK)
