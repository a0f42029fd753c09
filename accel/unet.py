"""Finding the UNet in a pipeline and naming its parts (SD 1.x/2.x and SDXL ``UNet2DConditionModel``).

Vocabulary (see shared PAPERS.md): ``conv_in -> down_blocks[0..n-1] -> mid_block -> up_blocks[0..n-1] ->
conv_out``. DeepCache numbers places by ``(block, layer)`` counted from the *outside*: block ``i`` is
``down_blocks[i]`` on the way down and ``up_blocks[n-1-i]`` on the way up; inside a block, down layers
count resnets ``0..L-1`` then the downsampler ``L``; up layers count from the block's end (``resnets[-1]``
is layer 0). Cache branch ``b`` is ``(block, layer) = (b // (L+1), b % (L+1))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError, UnsupportedModelError

SUPPORTED = ("StableDiffusion (1.x/2.x) and StableDiffusionXL pipelines: text2img, img2img, inpaint, ControlNet "
             "(any diffusers pipeline whose `unet` is a UNet2DConditionModel), or a bare UNet2DConditionModel")


def is_unet(model) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel)


def resolve(target) -> tuple[torch.nn.Module, object | None]:
    """``(unet, pipe)`` for a pipeline or a bare UNet; a clear error for anything else."""
    if is_unet(target):
        return target, None
    unet = getattr(target, "unet", None)
    if unet is not None and is_unet(unet):
        return unet, target
    for model, where in ((target, "this UNet"), (unet, "the pipeline's UNet")):
        if is_unet(getattr(model, "_orig_mod", None)):  # torch.compile's OptimizedModule around a UNet
            raise UnsupportedModelError(
                f"{where} is compiled (torch.compile): accel transforms the model itself, so apply first, then "
                "compile: accel.apply(pipe, ...); pipe.unet = torch.compile(pipe.unet)")
    what = type(target).__name__
    inner = getattr(target, "transformer", None)
    hint = f" (its denoiser is a {type(inner).__name__}, a transformer: not a UNet)" if inner is not None else ""
    raise UnsupportedModelError(f"accel cannot transform a {what}{hint}. Supported: {SUPPORTED}.")


def layers_per_block(unet) -> int:
    return len(unet.down_blocks[0].resnets)


def num_branches(unet) -> int:
    return len(unet.down_blocks) * (layers_per_block(unet) + 1)


@dataclass(frozen=True)
class Unit:
    """A module the cache skips on cached steps (its output is reused)."""

    path: str
    module: torch.nn.Module


def branch_location(unet, branch: int) -> tuple[int, int]:
    n = num_branches(unet)
    if not 0 <= branch < n:
        raise InputError(f"cache branch {branch} out of range: this UNet has branches 0..{n - 1} "
                         f"({len(unet.down_blocks)} blocks x {layers_per_block(unet) + 1} places)")
    per = layers_per_block(unet) + 1
    return branch // per, branch % per


def cached_units(unet, branch: int) -> tuple[list[Unit], Unit]:
    """The modules a cached step skips for ``branch`` (coarsest units: whole blocks where possible), and
    the *boundary* unit: the skipped module whose output is the deep feature the shallow path consumes
    (what CacheQuant's DEC corrects and its DP schedule measures)."""
    B, L = branch_location(unet, branch)
    nb = len(unet.down_blocks)
    units: list[Unit] = []
    # down path: block B from layer L on, every deeper block whole
    blk = unet.down_blocks[B]
    for j, res in enumerate(blk.resnets):
        if j >= L:
            units.append(Unit(f"down_blocks.{B}.resnets.{j}", res))
            if getattr(blk, "attentions", None) is not None and len(blk.attentions) > j:
                units.append(Unit(f"down_blocks.{B}.attentions.{j}", blk.attentions[j]))
    for k, ds in enumerate(blk.downsamplers or []):
        units.append(Unit(f"down_blocks.{B}.downsamplers.{k}", ds))
    for i in range(B + 1, nb):
        units.append(Unit(f"down_blocks.{i}", unet.down_blocks[i]))
    units.append(Unit("mid_block", unet.mid_block))
    # up path: every deeper block whole, then block B's layers above L (counted from the block's end)
    for i in range(0, nb - 1 - B):
        units.append(Unit(f"up_blocks.{i}", unet.up_blocks[i]))
    ub_index = nb - 1 - B
    ub = unet.up_blocks[ub_index]
    n_res = len(ub.resnets)
    boundary = units[-1] if ub_index > 0 else None  # the previous up block's output (incl. upsampler)
    for k in range(n_res):
        layer = n_res - 1 - k
        if layer > L:
            units.append(Unit(f"up_blocks.{ub_index}.resnets.{k}", ub.resnets[k]))
            boundary = units[-1]
            if getattr(ub, "attentions", None) is not None and len(ub.attentions) > k:
                units.append(Unit(f"up_blocks.{ub_index}.attentions.{k}", ub.attentions[k]))
                boundary = units[-1]
    if boundary is None:  # branch at the very bottom of the outermost block: the mid block feeds it
        boundary = next(u for u in units if u.path == "mid_block")
    return units, boundary


def feature_of(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, a tuple whose first item it is, or a
    diffusers ``BaseOutput`` such as ``Transformer2DModelOutput``)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output[0]  # BaseOutput supports indexing


def with_feature(output, feature: torch.Tensor):
    """``output`` with its hidden-state tensor replaced by ``feature`` (same container type)."""
    if torch.is_tensor(output):
        return feature
    if isinstance(output, tuple):
        return (feature,) + tuple(output[1:])
    return type(output)(feature, *list(output.values())[1:])
