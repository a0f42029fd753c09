"""``accel bench --sections cost``: exact FLOPs of a full and of a cached UNet call per cache branch and the
FLOP-ideal speedups of uniform schedules, for the miniature and (without ``--quick``) the SD 1.5 *architecture*
(its standard UNet config with random weights: no download, and FLOPs depend on the architecture only)."""
from __future__ import annotations

from .common import cached_call_flops, call_flops, ideal_speedup, unet_calls
from .models import sd15_architecture_pipeline


def table(pipe, latent, n_calls, intervals=(3, 5)) -> str:
    """Per cache branch: a cached call's GFLOP, its share of a full call, and the ideal speedups at ``intervals``."""
    full, _ = call_flops(pipe, None, latent)
    from accel.unet import num_branches

    rows = []
    for b in range(num_branches(pipe.unet)):
        cached = cached_call_flops(pipe, latent, b)
        ideals = " | ".join(f"{ideal_speedup(n_calls, len(range(0, n_calls, i)), full, cached):.2f}x" for i in intervals)
        rows.append(f"| {b} | {cached / 1e9:.3f} | {100 * cached / full:.1f}% | {ideals} |")
    head = (f"Full call: **{full / 1e9:.3f} GFLOP** (CFG batch 2, {latent}x{latent} latent). "
            f"Ideal speedups for {n_calls} UNet calls.\n\n"
            "| branch | cached call GFLOP | of full | " + " | ".join(f"ideal i{i}" for i in intervals) + " |\n"
            "|---|---|---|" + "---|" * len(intervals))
    return head + "\n" + "\n".join(rows)


def section(mini, args) -> list[str]:
    """The report's parts (joined by the report with newlines)."""
    parts = []
    parts.append("## Cost model (FLOPs)\n")
    parts.append(f"### Miniature (50 steps, PNDM: {unet_calls(mini, 50)} UNet calls)\n")
    parts.append(table(mini, 8, unet_calls(mini, 50), args.intervals) + "\n")
    if not args.quick:
        sd = sd15_architecture_pipeline()
        parts.append(f"### SD 1.5 architecture ({args.sd_steps} steps, PNDM: {unet_calls(sd, args.sd_steps)} UNet calls, "
                     f"{args.sd_latent}x{args.sd_latent} latent, random weights)\n")
        parts.append(table(sd, args.sd_latent, unet_calls(sd, args.sd_steps), args.intervals) + "\n")
    return parts
