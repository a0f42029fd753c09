"""``accel bench --sections compile``: ``torch.compile`` of a UNet with accel's cache applied: graph breaks (the
step clock's tick), graphs compiled, outputs against eager, and the first call's compile time."""
from __future__ import annotations

import time

import torch

from .common import Method, accel_cache


def graph_breaks(pipe, method: Method, steps=6) -> str:
    """Run ``torch.compile(pipe.unet)`` with the method applied; count graph breaks and compare outputs."""
    from torch import _dynamo
    from torch._dynamo.utils import counters

    undo = method.setup(pipe)
    try:
        kw = dict(prompt="a red circle", num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eager = pipe(**kw).images
        unet = pipe.unet
        _dynamo.reset()
        counters.clear()
        pipe.unet = torch.compile(unet)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                comp = pipe(**dict(kw, generator=torch.Generator().manual_seed(0))).images
            secs = time.perf_counter() - t0
        finally:
            pipe.unet = unet
        breaks = sum(counters["graph_break"].values())
        reasons = sorted(counters["graph_break"])[:3]
        same = torch.allclose(comp, eager, rtol=1e-4, atol=1e-4)
        err = (comp - eager).abs().max().item()
    finally:
        undo()
    return (f"{method.name}: graph breaks **{breaks}**, unique graphs compiled "
            f"{counters['stats'].get('unique_graphs', 'n/a')}, outputs equal to eager: **{same}** "
            f"(max abs diff {err:.2e}); first call incl. compilation {secs:.1f} s."
            + (f" Break reasons (first {len(reasons)}): " + "; ".join(r.replace("\n", " ")[:160] for r in reasons)
               if reasons else ""))


def section(mini) -> list[str]:
    """The report's parts: the miniature with a uniform cache (interval 3, branch 0)."""
    return ["## torch.compile\n", graph_breaks(mini, accel_cache(3, 0)) + "\n"]
