"""``accel calibrate``: run the full-precision, uncached pipeline on calibration prompts and store what
the recipe's transforms need (CacheQuant: feature distances for the DP schedule, moments for DEC).

Statistics stream: each batch of prompts contributes partial sums (float64) and its features are freed;
memory is bounded by one batch's ``N`` deep features, not by the number of prompts. Under
``accelerate launch --num_processes N`` the batches are shared out exactly as in ``accel eval`` and the
partial sums are gathered and added in global batch order, so the artifact equals the one-process one.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers.hooks import ModelHook
from tqdm.auto import tqdm

from . import __version__, hooks, schedules
from .calibration import Calibration, fingerprint
from .recipe import load as load_recipe
from .transforms.cache import FeatureCache
from .transforms.dec import Moments, coefficients
from .unet import cached_units, feature_of, resolve

REC_HOOK = "accel.calibrate"


class _Recorder(ModelHook):
    def __init__(self, clock, sink: list):
        super().__init__()
        self.clock, self.sink = clock, sink

    def post_forward(self, module, output):
        self.sink.append(feature_of(output).detach().to("cpu", torch.float32))
        return output


def _batch_stats(feats: list[torch.Tensor]) -> dict:
    """Partial sums of one pipeline call: features ``F_i`` of shape (B, C, H, W) for every call i."""
    F = torch.stack(feats)  # (N, B, C, H, W)
    n, b, c, h, w = F.shape
    per_c = F.permute(2, 0, 1, 3, 4).reshape(c, n, b * h * w)  # (C, N, M)
    flat = F.reshape(n, -1)
    return {
        "sum": per_c.double().sum(-1).T.contiguous(),                            # (N, C)
        "sumsq": (per_c.double() ** 2).sum(-1).T.contiguous(),                   # (N, C)
        "cross": torch.bmm(per_c.double(), per_c.double().transpose(1, 2)).permute(1, 2, 0).contiguous(),  # (N, N, C)
        "dist": torch.cdist(flat.double()[None], flat.double()[None], p=1)[0],   # (N, N) L1
        "count": b * h * w,
    }


def collect(pipe, prompts: list[str], steps: int, branch: int, seed: int = 0, guidance: float = 7.5,
            batch_size: int = 4, progress: bool = True) -> tuple[dict, int]:
    """Run the uncached pipeline on ``prompts`` (image i with seed ``seed + i``) and return the summed
    statistics of the branch's deep feature and the number of UNet calls per pipeline call."""
    from .dist import gather, state as dist_state

    unet, pipe = resolve(pipe)
    state = dist_state()
    _, boundary = cached_units(unet, branch)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    mine = list(range(len(batches)))[state.process_index::state.num_processes]
    clock = hooks.acquire_clock(unet, pipe)
    sink: list[torch.Tensor] = []
    hooks.attach(boundary.module, _Recorder(clock, sink), REC_HOOK, root=unet)
    partials, n_calls = {}, None
    try:
        for bi in tqdm(mine, desc=f"calibrate[{state.process_index}]", disable=not progress):
            idx = batches[bi]
            sink.clear()
            with torch.no_grad():
                lat = pipe([prompts[i] for i in idx], num_inference_steps=steps, guidance_scale=guidance,
                           generator=[torch.Generator("cpu").manual_seed(seed + i) for i in idx],
                           output_type="latent").images
            if not torch.isfinite(lat).all():
                raise FloatingPointError("the pipeline produced NaN/inf during calibration")
            if n_calls is not None and len(sink) != n_calls:
                raise RuntimeError(f"UNet calls per pipeline call changed ({n_calls} -> {len(sink)})")
            n_calls = len(sink)
            partials[bi] = _batch_stats(sink)
            sink.clear()
    finally:
        hooks.detach(boundary.module, REC_HOOK, root=unet)
        hooks.release_clock(unet)
    if state.num_processes > 1:
        partials = dict(gather([(bi, p) for bi, p in partials.items()]))
        n_calls = next(n for n in gather([n_calls]) if n is not None)
    total = None
    for bi in sorted(partials):  # global batch order: the same sums whatever the process count
        p = partials[bi]
        total = {k: v.clone() if torch.is_tensor(v) else v for k, v in p.items()} if total is None else \
            {k: total[k] + p[k] for k in p}
    return total, n_calls


def calibrate(pipe, recipe="cachequant-dp", prompts: list[str] | None = None, steps: int = 50, budget: int = 10,
              seed: int = 0, guidance: float = 7.5, batch_size: int = 4, constrained: bool = True,
              prompt_source: str = "miniature grammar (train stream)", progress: bool = True) -> Calibration:
    """Calibrate ``pipe`` for ``recipe`` and return the :class:`Calibration` (``.save(DIR)`` writes it)."""
    from accel import miniature

    t0 = time.time()
    r = load_recipe(recipe) if not hasattr(recipe, "transforms") else recipe
    caches = [t for t in r.transforms if isinstance(t, FeatureCache)]
    if not caches:
        raise ValueError(f"recipe {r.name!r} has nothing to calibrate (no FeatureCache)")
    branch = caches[0].branch
    prompts = prompts if prompts is not None else miniature.prompts(8, seed=seed, split="train")
    unet, pipe = resolve(pipe)
    if pipe is None:
        raise ValueError("calibration needs the pipeline (it runs it), not a bare UNet")
    if steps < 2:
        raise ValueError("--steps must be >= 2")
    stats, n = collect(pipe, prompts, steps, branch, seed, guidance, batch_size, progress)
    count = stats["count"] * 1.0
    m = Moments(stats["sum"] / count, stats["sumsq"] / count, stats["cross"] / count)
    if not 1 <= budget <= n:
        raise ValueError(f"--budget must be in 1..{n} (UNet calls per pipeline call)")
    C = schedules.group_cost(D=stats["dist"].numpy())
    lo, hi = schedules.paper_bounds(n, budget) if constrained else (1, n)
    full, cost = schedules.dp_schedule(C, budget, lo, hi)
    a, b = coefficients(m, full)
    key = f"cache.b{branch}"
    tensors = {f"{key}.distance": stats["dist"], f"{key}.mean": m.mean, f"{key}.sq": m.sq, f"{key}.cross": m.cross,
               f"{key}.schedule": torch.tensor(full, dtype=torch.int64), f"{key}.dec_a": a, f"{key}.dec_b": b}
    import diffusers

    meta = {
        "recipe": {"name": r.name, "transforms": [t.to_dict() for t in r.transforms]},
        "versions": {"accel": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "model": {"class": type(unet).__name__, "fingerprint": fingerprint(unet)},
        "scheduler": {"class": type(pipe.scheduler).__name__, "steps": steps, "unet_calls": n},
        "prompts": {"source": prompt_source, "count": len(prompts)},
        "generation": {"seed": seed, "guidance": guidance, "batch_size": batch_size},
        "cache": {"branch": branch, "budget": budget, "schedule": full, "constrained": constrained,
                  "group_len": [lo, hi], "dp_cost": cost},
        "seconds": round(time.time() - t0, 2),
    }
    return Calibration(meta, tensors)


def add_parser(sub):
    p = sub.add_parser("calibrate", help="calibrate a model for a recipe once (writes accel.json + safetensors)")
    p.add_argument("model", nargs="?", default="miniature", help="'miniature' (default) or a pipeline folder/id")
    p.add_argument("--recipe", default="cachequant-dp")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--budget", type=int, default=10, help="full UNet calls per pipeline call (default 10)")
    p.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: 8 miniature captions)")
    p.add_argument("--num-prompts", type=int, help="use this many prompts (cycled)")
    p.add_argument("--unconstrained", action="store_true", help="no group-length bounds in the DP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", required=True, help="calibration folder to write")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args):
    from .cli import load_model
    from .dist import state
    from .eval.runner import load_prompts

    if args.prompts is None:
        from accel import miniature

        prompts = miniature.prompts(args.num_prompts or 8, seed=args.seed, split="train")
        source = "miniature grammar (train stream)"
    else:
        prompts = load_prompts(args.prompts, args.num_prompts, seed=args.seed)
        source = str(args.prompts)
    pipe = load_model(args.model, args.device)
    calib = calibrate(pipe, args.recipe, prompts, args.steps, args.budget, args.seed, args.guidance,
                      args.batch_size, not args.unconstrained, source)
    if state().is_main_process:
        calib.save(args.out)
        c = calib.meta["cache"]
        print(f"calibration -> {Path(args.out).resolve()} ({calib.meta['seconds']} s, {len(prompts)} prompts, "
              f"{calib.meta['scheduler']['unet_calls']} UNet calls)")
        print(f"DP schedule (branch {c['branch']}, {c['budget']} full calls): {c['schedule']}")
