"""``accel bench --sections speed``: wall-clock of pipeline calls (``output_type="latent"``: the UNet work) for the
baseline, accel and the DeepCache package at the same interval and branch, interleaved (A B C A B C ...) on the
same seeds; reported as ratios to the baseline of the same run and as measured / FLOP-ideal (see
:func:`.common.speed_table`), on the miniature and (without ``--quick``) the SD 1.5 architecture."""
from __future__ import annotations

from .common import accel_cache, baseline, speed_table
from .models import sd15_architecture_pipeline


def section(mini, args, dc: list) -> list[str]:
    """The report's parts; ``dc``: the DeepCache package's methods at ``args.intervals`` (empty: not installed)."""
    ours = [accel_cache(i, 0) for i in args.intervals]
    interleaved = [baseline()] + [m for pair in zip(ours, dc or [None] * len(ours)) for m in pair if m is not None]
    parts = []
    parts.append("## Speed (wall-clock, one CPU thread)\n")
    if not dc:
        parts.append("DeepCache is not installed (`pip install DeepCache`): its rows are missing.\n")
    parts.append("### Miniature, 50 steps\n")
    table, _ = speed_table(mini, interleaved, 50, 8, args.repeats, progress=not args.quiet)
    parts.append(table + "\n")
    if not args.quick:
        sd = sd15_architecture_pipeline()
        parts.append(f"### SD 1.5 architecture, {args.sd_steps} steps, {args.sd_latent}x{args.sd_latent} latent "
                     f"(median of {args.sd_repeats} interleaved runs)\n")
        table, _ = speed_table(sd, interleaved, args.sd_steps, args.sd_latent, args.sd_repeats,
                               progress=not args.quiet)
        parts.append(table + "\n")
        del sd
    return parts
