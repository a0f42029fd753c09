"""ScaleLong (Huang et al., NeurIPS 2023): scale the UNet's long skip connections for stabler training.

Every up-block of a ``UNet2DConditionModel`` concatenates the skip features of the matching down path
(``res_hidden_states_tuple``). Number the skips ``i = 1 .. N`` from the outermost (the ``conv_in`` output,
consumed last) inwards; ScaleLong feeds ``s_i * skip_i`` instead of ``skip_i``:

* ``kind="cs"``: ``s_i = kappa ** (i - 1)`` (constant scaling, CS),
* ``kind="sqrt2"``: ``s_i = 2 ** -0.5`` for every skip (the 1/sqrt(2)-CS of the paper),
* ``kind="ls"``: ``s_i = sigmoid(W2 relu(W1 pool(skip_i)))`` per sample and channel: a squeeze-excitation
  module per skip (reduction 16, pooled over H x W), trained with the UNet (learnable scaling, LS),
* ``kind="none"``: ``s_i = 1``, the unscaled UNet, with the same diagnostics (a baseline for experiments).

One ``diffusers.hooks`` pre-forward hook per up-block rescales its ``res_hidden_states_tuple``; nothing else
changes. The LS modules are registered as submodules of their up-block (``up_blocks.B.scalelong.J``), so an
optimizer built after ``apply`` sees them and ``unet.save_pretrained`` writes them; the transform's settings
go to ``config.json`` (``accel_scalelong``). :meth:`ScaleLong.from_pretrained` loads such a folder back.
``record_norms=True`` keeps ``norms[i]``: the mean per-sample L2 norm of skip ``i`` before scaling (the
hidden-feature norms the paper analyses). Works under autograd and ``torch.compile``.

It is a training-time change: applied to a model trained without it, it changes the outputs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..hooks import attach, detach_all
from .base import Applied, Context, Transform, register
from ..errors import InputError

KINDS = ("cs", "ls", "sqrt2", "none")
CONFIG_KEY = "accel_scalelong"
MODULE_NAME = "scalelong"


class SqueezeExcite(nn.Module):
    """``sigmoid(W2 relu(W1 mean_hw(x)))`` -> per-sample, per-channel coefficients ``(B, C, 1, 1)``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return s[:, :, None, None].to(x.dtype)


def skip_layout(unet) -> list[tuple[int, list[int], list[int]]]:
    """For each up-block ``b``: ``(b, skip numbers i (1 = outermost) of its res_hidden_states_tuple in tuple
    order, their channel counts)``, following ``UNet2DConditionModel.forward``'s slicing of the down path."""
    down_channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        down_channels += [r.out_channels for r in block.resnets]
        if getattr(block, "downsamplers", None):
            down_channels.append(block.downsamplers[0].out_channels if hasattr(block.downsamplers[0], "out_channels")
                                 else block.resnets[-1].out_channels)
    n_left, layout = len(down_channels), []
    for b, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        idx = list(range(n_left - n, n_left))
        layout.append((b, [j + 1 for j in idx], [down_channels[j] for j in idx]))
        n_left -= n
    if n_left != 0:
        raise InputError(f"ScaleLong: the up path consumes {len(down_channels) - n_left} of {len(down_channels)} skips")
    return layout


class _SkipScaleHook(ModelHook):
    def __init__(self, owner: "_ScaledSkips", numbers: list[int], se: nn.ModuleList | None):
        super().__init__()
        self.owner, self.numbers, self.se = owner, numbers, se

    def pre_forward(self, module, *args, **kwargs):
        skips = kwargs.get("res_hidden_states_tuple")
        if skips is None:  # positional (hidden_states, res_hidden_states_tuple, ...)
            args = list(args)
            args[1] = self._scale(args[1])
            return tuple(args), kwargs
        kwargs["res_hidden_states_tuple"] = self._scale(skips)
        return args, kwargs

    def _scale(self, skips):
        o = self.owner
        if o.record_norms:
            for i, s in zip(self.numbers, skips):
                o.norms[i] = float(s.detach().float().flatten(1).norm(dim=1).mean())
        if o.kind == "none":
            return skips
        if o.kind == "ls":
            return tuple(s * se(s) for s, se in zip(skips, self.se))
        return tuple(s * o.coefficient(i) for i, s in zip(self.numbers, skips))


@register
@dataclass
class ScaleLong(Transform):
    """Scale the long skip connections of a ``UNet2DConditionModel``.

    Args:
        kind: ``"cs"`` (``kappa ** (i - 1)``), ``"ls"`` (learnable squeeze-excitation per skip), ``"sqrt2"``
            (``2 ** -0.5``) or ``"none"`` (unscaled, for baselines).
        kappa: CS base; the paper's range is [0.5, 0.95] (with SD's 12 skips, kappa near 0.8-0.9).
        reduction: LS squeeze-excitation reduction.
        record_norms: keep the skips' mean L2 norms (before scaling) of the last forward in the handle's
            ``applied(ScaleLong).norms``.
    """

    kind: str = "cs"
    kappa: float = 0.8
    reduction: int = 16
    record_norms: bool = False
    order = 5  # structural (adds modules) and step-independent: first
    requires_pipeline = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if not 0 < float(self.kappa) <= 1:
            raise InputError("kappa must be in (0, 1]")
        if int(self.reduction) < 1:
            raise InputError("reduction must be >= 1")

    def coefficient(self, i: int) -> float:
        """``s_i`` of the constant kinds (``i = 1`` the outermost skip)."""
        if self.kind == "cs":
            return float(self.kappa) ** (i - 1)
        if self.kind == "sqrt2":
            return 1 / math.sqrt(2)
        if self.kind == "none":
            return 1.0
        raise InputError("learnable scaling (ls) has per-sample coefficients: see the modules' outputs")

    def attach(self, ctx: Context) -> "_ScaledSkips":
        return _ScaledSkips(self, ctx)

    @staticmethod
    def from_pretrained(path, subfolder: str | None = None, **kwargs):
        """Load a UNet saved with ScaleLong applied (``unet.save_pretrained``): ``(unet, handle)`` with the
        transform re-applied and the LS modules' trained weights loaded. ``kwargs`` go to diffusers'
        ``UNet2DConditionModel.from_pretrained``."""
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        from . import compose

        folder = Path(path) / (subfolder or "")
        cfg = json.loads((folder / "config.json").read_text())
        if CONFIG_KEY not in cfg:
            raise InputError(f"{folder} holds no ScaleLong UNet (no '{CONFIG_KEY}' in config.json)")
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # the config key and LS weights are ours: no "unexpected" warnings
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, **kwargs)
        finally:
            dlogging.set_verbosity(level)
        transform = Transform.from_dict(cfg[CONFIG_KEY])
        handle = compose.attach(unet, None, [transform])
        if transform.kind == "ls":
            state = {}
            for f in sorted(folder.glob("*.safetensors")):
                state.update({k: v for k, v in load_file(f).items() if f".{MODULE_NAME}." in k})
            own = {k for k in unet.state_dict() if f".{MODULE_NAME}." in k}
            if set(state) != own:
                handle.remove()
                raise InputError(f"{folder}: ScaleLong LS weights do not match the model "
                                 f"(missing {sorted(own - set(state))[:3]}, unexpected {sorted(set(state) - own)[:3]})")
            unet.load_state_dict(state, strict=False)
        return unet, handle


class _ScaledSkips(Applied):
    """A :class:`ScaleLong` on one UNet: the hooked up blocks, their LS modules, the recorded skip norms."""

    def __init__(self, transform: ScaleLong, ctx: Context):
        super().__init__(transform)
        self.norms: dict[int, float] = {}  # skip number -> mean L2 norm at the last forward (record_norms=True)
        self._blocks, self._config = [], None
        try:
            self._attach(ctx.unet)
        except Exception:
            self.detach(ctx)
            raise

    def modules(self) -> nn.ModuleList:
        """The LS squeeze-excitation modules (empty for the constant kinds), outermost skip first."""
        mods = []
        for block in reversed(self._blocks):
            se = getattr(block, MODULE_NAME, None)
            if se is not None:
                mods += list(reversed(list(se)))
        return nn.ModuleList(mods)

    def _attach(self, unet) -> None:
        layout = skip_layout(unet)
        ref = next(unet.parameters())
        for b, numbers, channels in layout:
            block = unet.up_blocks[b]
            se = None
            if self.kind == "ls":
                if hasattr(block, MODULE_NAME):
                    raise InputError(f"up_blocks.{b} already has a '{MODULE_NAME}' submodule")
                se = nn.ModuleList([SqueezeExcite(c, int(self.reduction)) for c in channels]).to(ref.device, ref.dtype)
                block.add_module(MODULE_NAME, se)
            attach(block, _SkipScaleHook(self, numbers, se), self.hook_name, root=unet)
            self._blocks.append(block)
        self._config = unet._internal_dict
        unet.register_to_config(**{CONFIG_KEY: self.to_dict()})

    def detach(self, ctx: Context) -> None:
        detach_all(self._blocks, self.hook_name, ctx.unet)
        for block in self._blocks:
            if MODULE_NAME in block._modules:
                del block._modules[MODULE_NAME]
        self._blocks = []
        if self._config is not None:
            ctx.unet._internal_dict = self._config
            self._config = None
