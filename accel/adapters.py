"""A UNet's identity as a calibration records it: its base weights (:func:`fingerprint`, without LoRA adapters)
and its (peft) LoRA adapters: which modules are adapters, which are the layers they adapt, what they are.

diffusers loads LoRAs through peft (``pip install accel-diffusion[lora]``): ``pipe.load_lora_weights``,
``unet.add_adapter(LoraConfig(...))`` and ``unet.load_lora_adapter`` wrap each targeted ``nn.Linear`` /
``nn.Conv2d`` in a peft *tuner layer* (``lora.Linear``, ``lora.Conv2d``) that keeps the original module as
``base_layer`` and adds the adapters (``lora_A``, ``lora_B``, ...) beside it; ``fuse_lora`` adds the scaled
adapter into ``base_layer``'s weight. accel sees through the wrapper: the layer at ``...attn1.to_q`` is the base
layer whatever wraps it (its *logical* path has no ``.base_layer``), and the adapters themselves are never
quantized or fingerprinted (they stay in float beside the int8 base layer, as QLoRA-style serving does).

Nothing here imports peft: a UNet can only hold tuner layers once peft is imported.
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from typing import Iterator

import torch
import torch.nn as nn


class AdapterMismatchWarning(UserWarning):
    """A calibration was measured with other (unfused) LoRA adapters active than the UNet has now."""


def _tuner_class():
    mod = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(mod, "BaseTunerLayer", None) if mod is not None else None


def is_tuner_layer(module: nn.Module) -> bool:
    """A peft tuner layer (a module that wraps a ``base_layer`` and holds adapters beside it)."""
    cls = _tuner_class()
    return cls is not None and isinstance(module, cls)


def logical_path(path: str) -> str:
    """The path a layer has without adapters: ``...to_q.base_layer`` -> ``...to_q``."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


def base_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """``(logical path, module, wrapper)`` for every module of ``root`` that is not part of an adapter, parents
    first (``named_modules`` order). Inside a tuner layer only its ``base_layer`` is visited; it gets the
    wrapper's path and ``wrapper`` is the tuner layer directly around it (else ``None``)."""
    seen: set[int] = set()

    def walk(module, path, wrapper):
        if id(module) in seen:
            return
        seen.add(id(module))
        yield path, module, wrapper
        if is_tuner_layer(module):
            base = module._modules.get("base_layer")
            if base is not None:
                yield from walk(base, path, module)
            return
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{path}.{name}" if path else name, None)

    yield from walk(root, "", None)


def tuner_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(logical path, tuner layer)`` of every peft tuner layer in ``root``."""
    return [(p, m) for p, m, _ in base_modules(root) if is_tuner_layer(m)]


def base_state(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state-dict tensors of ``root`` without its adapters, under their logical names (what a UNet's state
    dict is before any adapter was loaded; fused adapters are in the base weights)."""
    for path, module, _ in base_modules(root):
        if is_tuner_layer(module):
            continue  # its own tensors, if any, are adapter state; its base layer is visited next
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and name not in skip:
                yield (f"{path}.{name}" if path else name), t


# ----------------------------------------------------------------------------------- the identity
def tensor_sample(t: torch.Tensor) -> bytes:
    """The values :func:`fingerprint` reads of a tensor, as float32 bytes: all of a small tensor; of a larger one
    its first and last 64 values and, for every output channel (first dimension), 8 values spread over the rest.
    A fused LoRA changes every row it touches (``W + s B A``), so it shows in the per-row samples even where it
    leaves the first and last values alone (e.g. a LoRA whose ``B`` is zero outside some middle channels)."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= 4096:
        vals = flat
    else:
        rows = flat.reshape(t.shape[0], -1) if t.dim() > 1 else flat.reshape(1, -1)
        cols = torch.linspace(0, rows.shape[1] - 1, 8, device=flat.device).round().long().unique()
        vals = torch.cat([flat[:64], flat[-64:], rows[:, cols].reshape(-1)])
    return vals.to("cpu", torch.float32).numpy().tobytes()


def fingerprint(unet) -> str:
    """A cheap, weight-sensitive identity of a UNet: its config plus, for every tensor, its name, shape and
    sampled raw values (:func:`tensor_sample`; float64 sums would miss permutations, raw values do not).
    Unfused LoRA adapters are not part of it (they are recorded beside it, :func:`record`): the
    base weights are read under their names without adapters; a fused LoRA is in the base weights and changes it."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in base_state(unet):
            h.update(f"{name}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(tensor_sample(t))
    return h.hexdigest()[:32]



# ----------------------------------------------------------------------------------- the record
def _adapter_tensors(layer: nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    out = []
    for attr in getattr(layer, "adapter_layer_names", ()):
        holder = getattr(layer, attr, None)
        if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and name in holder:
            item = holder[name]
            if isinstance(item, nn.Module):
                out += [(f"{attr}.{k}", t) for k, t in item.state_dict().items()]
            else:
                out.append((attr, item))
    return out


def _adapter_names(layer: nn.Module) -> set[str]:
    names = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        holder = getattr(layer, attr, None)
        if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
            names.update(holder.keys())
    return names


def record(unet: nn.Module) -> dict | None:
    """What a calibration stores about the UNet's adapters (``None`` without peft tuner layers)::

        {"layers": 96, "enabled": true, "active": ["style"], "fused": [],
         "adapters": {"style": {"layers": 96, "rank": 4, "weight": 0.7, "digest": "..."}}}

    ``weight`` is the ``set_adapters`` weight (``None`` if it differs between layers); ``digest`` identifies the
    adapter's values and its per-layer scaling (a renamed copy has the same digest, another weight another one).
    Fused adapters are part of the base weights (and of :func:`fingerprint`)."""
    layers = tuner_layers(unet)
    if not layers:
        return None
    per: dict[str, dict] = {}
    enabled, active, fused = False, set(), set()
    for path, layer in layers:
        enabled |= not getattr(layer, "disable_adapters", False)
        active.update(getattr(layer, "active_adapters", []))
        fused.update(getattr(layer, "merged_adapters", []))
        for name in sorted(_adapter_names(layer)):
            a = per.setdefault(name, {"layers": 0, "ranks": set(), "weights": set(), "hash": hashlib.sha256()})
            a["layers"] += 1
            r = getattr(layer, "r", {}).get(name)
            scaling = getattr(layer, "scaling", {}).get(name)
            alpha = getattr(layer, "lora_alpha", {}).get(name)
            if r is not None:
                a["ranks"].add(int(r))
            if scaling is not None and r and alpha:
                rs = getattr(layer, "use_rslora", {}).get(name, False)
                a["weights"].add(round(float(scaling) / (alpha / (r ** 0.5 if rs else r)), 6))
            a["hash"].update(f"{path}|{scaling!r}".encode())
            for key, t in _adapter_tensors(layer, name):
                a["hash"].update(f"{key}{tuple(t.shape)}".encode() + tensor_sample(t))
    adapters = {}
    for name, a in sorted(per.items()):
        adapters[name] = {"layers": a["layers"],
                          "rank": next(iter(a["ranks"])) if len(a["ranks"]) == 1 else sorted(a["ranks"]) or None,
                          "weight": next(iter(a["weights"])) if len(a["weights"]) == 1 else None,
                          "digest": a["hash"].hexdigest()[:32]}
    return {"layers": len(layers), "enabled": enabled, "active": sorted(active & set(per)),
            "fused": sorted(fused), "adapters": adapters}


def effective(rec: dict | None) -> list[str]:
    """The adapters that change the UNet's outputs unfused: the digests of the active, unfused adapters of an
    enabled UNet (sorted; empty without adapters)."""
    if not rec or not rec.get("enabled"):
        return []
    fused = set(rec.get("fused", []))
    return sorted(rec["adapters"][n]["digest"] for n in rec.get("active", []) if n not in fused and n in rec["adapters"])


def describe(rec: dict | None) -> str:
    """``style (weight 0.7), toon (weight 1.0)`` or ``no adapters``, for messages."""
    if not effective(rec):
        return "no active unfused LoRA adapters"
    fused = set(rec.get("fused", []))
    parts = []
    for n in rec["active"]:
        if n in fused or n not in rec["adapters"]:
            continue
        w = rec["adapters"][n].get("weight")
        parts.append(f"{n!r} (weight {w})" if w is not None else f"{n!r} (per-layer weights)")
    return "LoRA adapters " + ", ".join(parts)


def warn_mismatch(recorded: dict | None, unet: nn.Module) -> None:
    """One line of warning when the calibration's active unfused adapters are not the UNet's."""
    now = record(unet)
    if effective(recorded) != effective(now):
        warnings.warn(f"this calibration was measured with {describe(recorded)}, the UNet now has {describe(now)}: "
                      "its statistics may not fit; recalibrate with the adapters (and weights) you generate with",
                      AdapterMismatchWarning, stacklevel=3)
