"""``accel calibrate``: run the full-precision, uncached pipeline on calibration prompts and store what
the recipe's transforms need (CacheQuant: feature distances for the DP schedule, moments for DEC).

Statistics stream: each batch of prompts contributes partial sums (float64) and its features are freed;
memory is bounded by one batch's ``N`` deep features, not by the number of prompts. Under
``accelerate launch --num_processes N`` the batches are shared out exactly as in ``accel eval`` and the
partial sums are gathered and added in global batch order, so the artifact equals the one-process one.
"""
from __future__ import annotations

import time

import torch
from diffusers.hooks import ModelHook
from tqdm.auto import tqdm

from . import __version__, adapters, hooks, schedules
from .calibration import Calibration, fingerprint, refined_key, refined_name
from .recipe import load as load_recipe
from .transforms.cache import FeatureCache
from .transforms.dec import Moments, coefficients
from .transforms.inherit import Inherit
from .unet import cached_units, feature_of, resolve

REC_HOOK = "accel.calibrate"
INHERIT_ELEMENTS = 16384  # elements per feature kept (a fixed random subset) for inheritance distances


class _Recorder(ModelHook):
    """Appends a module's output feature (or, with ``residual``, output minus input) at every call."""

    def __init__(self, sink: list, residual: bool = False, keep: int | None = None):
        super().__init__()
        self.sink, self.residual, self.keep, self.idx = sink, residual, keep, None

    def new_forward(self, module, *args, **kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        f = feature_of(out).detach()
        if self.residual:
            x = args[0] if args else kwargs.get("hidden_states")
            if x is not None and x.shape == f.shape:
                f = f - x.detach()
        f = f.to("cpu", torch.float32)
        if self.keep is not None:  # a fixed, seeded subset of the elements bounds memory for large features
            flat = f.reshape(-1)
            if self.idx is None or self.idx.numel() > flat.numel():
                g = torch.Generator().manual_seed(0)
                self.idx = torch.randperm(flat.numel(), generator=g)[:self.keep]
            f = flat[self.idx]
        self.sink.append(f)
        return out


def _batch_stats(feats: list[torch.Tensor]) -> dict:
    """Partial sums of one pipeline call: features ``F_i`` of shape (B, C, H, W) for every call i."""
    F = torch.stack(feats)  # (N, B, C, H, W)
    n, b, c, h, w = F.shape
    per_c = F.permute(2, 0, 1, 3, 4).reshape(c, n, b * h * w)  # (C, N, M)
    return _dist_stats(feats) | {
        "sum": per_c.double().sum(-1).T.contiguous(),                            # (N, C)
        "sumsq": (per_c.double() ** 2).sum(-1).T.contiguous(),                   # (N, C)
        "cross": torch.bmm(per_c.double(), per_c.double().transpose(1, 2)).permute(1, 2, 0).contiguous(),  # (N, N, C)
        "count": b * h * w,
    }


def _dist_stats(feats: list[torch.Tensor]) -> dict:
    """The pairwise L1 distances ``||F_i - F_j||_1`` between the calls' features."""
    flat = torch.stack(feats).reshape(len(feats), -1).double()
    return {"dist": torch.cdist(flat[None], flat[None], p=1)[0]}  # (N, N)


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def _run_batches(pipe, prompts, steps, seed, guidance, batches, which, desc, progress):
    """Run the pipeline (latents only) on the prompt batches ``which``; image i uses seed ``seed + i``.
    Yields ``(batch index, latents)`` after each pipeline call."""
    for bi in tqdm(which, desc=desc, disable=not progress):
        idx = batches[bi]
        with torch.no_grad():
            lat = pipe([prompts[j] for j in idx], num_inference_steps=steps, guidance_scale=guidance,
                       generator=[torch.Generator("cpu").manual_seed(seed + j) for j in idx], output_type="latent").images
        if not torch.isfinite(lat).all():
            raise FloatingPointError("the pipeline produced NaN/inf during calibration")
        yield bi, lat


def collect_features(pipe, modules: dict, prompts: list[str], steps: int, seed: int = 0, guidance: float = 7.5,
                     batch_size: int = 4, progress: bool = True) -> tuple[dict, int]:
    """Run the unaccelerated pipeline on ``prompts`` (image i with seed ``seed + i``), recording at every UNet
    call the output of each ``modules[key] = (module, residual, keep, stat_fn)``; returns ``({key: summed
    statistics}, UNet calls per pipeline call)``. Each batch's features are reduced by ``stat_fn`` and freed;
    under ``accelerate launch`` batches are shared out and the partial sums added in global batch order."""
    from .dist import gather, state as dist_state

    unet, pipe = resolve(pipe)
    state = dist_state()
    batches = _batches(len(prompts), batch_size)
    mine = list(range(len(batches)))[state.process_index::state.num_processes]
    sinks = {key: [] for key in modules}
    for key, (m, residual, keep, _) in modules.items():
        hooks.attach(m, _Recorder(sinks[key], residual, keep), REC_HOOK, root=unet)
    partials, n_calls = {}, None
    try:
        for bi, _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, mine,
                               f"calibrate[{state.process_index}]", progress):
            counts = {len(v) for v in sinks.values()}
            if len(counts) != 1 or (n_calls is not None and counts != {n_calls}):
                raise RuntimeError(f"UNet calls per pipeline call changed ({n_calls} -> {counts})")
            n_calls = counts.pop()
            partials[bi] = {key: modules[key][3](sink) for key, sink in sinks.items()}
            for sink in sinks.values():
                sink.clear()
    finally:
        for m, *_ in modules.values():
            hooks.detach(m, REC_HOOK, root=unet)
    if state.num_processes > 1:
        partials = dict(gather([(bi, p) for bi, p in partials.items()]))
        n_calls = next(n for n in gather([n_calls]) if n is not None)
    totals = {}
    for bi in sorted(partials):  # global batch order: the same sums whatever the process count
        for key, p in partials[bi].items():
            t = totals.get(key)
            totals[key] = {k: v.clone() if torch.is_tensor(v) else v for k, v in p.items()} if t is None else \
                {k: t[k] + p[k] for k in p}
    return totals, n_calls


class _ActRecorder(ModelHook):
    """Keeps, per UNet call and input part, the running min and max and a seeded random sample of a layer's input."""

    def __init__(self, clock, split: int | None, per_call: int, gen: torch.Generator):
        super().__init__()
        self.clock, self.split, self.per_call, self.gen = clock, split, per_call, gen
        self.lo: dict[tuple[int, int], float] = {}
        self.hi: dict[tuple[int, int], float] = {}
        self.samples: dict[tuple[int, int], list[torch.Tensor]] = {}

    def pre_forward(self, module, *args, **kwargs):
        x = args[0].detach().float()
        parts = [x] if self.split is None else [x[:, :self.split], x[:, self.split:]]
        for i, xi in enumerate(parts):
            key = (self.clock.step, i)
            flat = xi.reshape(-1)  # range and sample taken where the tensor is: only the sample is copied
            lo, hi = torch.aminmax(flat)
            self.lo[key] = min(self.lo.get(key, 0.0), lo.item())
            self.hi[key] = max(self.hi.get(key, 0.0), hi.item())
            idx = torch.randint(0, flat.numel(), (min(self.per_call, flat.numel()),), generator=self.gen)
            self.samples.setdefault(key, []).append(flat[idx.to(flat.device)].cpu())
        return args, kwargs


class _DecRecorder(ModelHook):
    """On a quantized layer: accumulates, per call and output channel, the moments that give the least-squares
    fit ``Y_fp ~ alpha * Y_q + beta`` (the float layer run on the same input gives Y_fp)."""

    def __init__(self, clock, float_module, n_calls: int):
        super().__init__()
        self.clock, self.float_module, self.n = clock, float_module, n_calls
        self.stats = None

    def new_forward(self, module, *args, **kwargs):
        y_q = self.fn_ref.original_forward(*args, **kwargs)
        y_fp = self.float_module(*args, **kwargs)
        dims = [d for d in range(y_q.dim()) if d != 1]
        yq, yf = y_q.detach().double(), y_fp.detach().double()
        row = torch.stack([torch.full_like(yq.sum(dims), yq[0].numel() / yq.shape[1] * yq.shape[0]),
                           yq.sum(dims), yf.sum(dims), (yq * yq).sum(dims), (yq * yf).sum(dims)])
        if self.stats is None:
            self.stats = torch.zeros(self.n, *row.shape, dtype=torch.float64)
        self.stats[self.clock.step] += row.cpu()
        return y_q

    def coefficients(self):
        n, sq, sf, sqq, sqf = self.stats.unbind(1)
        n = n.clamp_min(1)
        mq, mf = sq / n, sf / n
        var = (sqq / n - mq ** 2).clamp_min(1e-12)
        alpha = (sqf / n - mq * mf) / var
        beta = mf - alpha * mq
        seen = self.stats[:, 0].sum(-1) > 0
        alpha[~seen], beta[~seen] = 1.0, 0.0
        return alpha.float(), beta.float()


def collect_scales(pipe, quant, prompts, steps, n_calls, seed=0, guidance=7.5, batch_size=4, progress=True,
                   per_call: int = 1024) -> dict:
    """Activation quantizers per layer and call, measured on the uncached float trajectory (so every layer has
    one at every call, one calibration serves W8A8 with or without the cache, and they do not depend on the cache
    schedule): symmetric and range-centred, each from the full range and from CacheQuant's MSE clip search on
    sampled inputs. Returns the ``quant.scale_*`` / ``quant.shift.*`` tensors."""
    from .transforms.quantize import _split_point, mse_scale, range_scale

    unet, _ = resolve(pipe)
    layers = quant.selected(unet)
    clock = hooks.acquire_clock(unet, pipe)
    gen = torch.Generator().manual_seed(seed)
    recs = {}
    try:
        for path, m in layers:
            split = _split_point(unet, path, m) if quant.split_shortcut and isinstance(m, torch.nn.Conv2d) else None
            recs[path] = hooks.attach(m, _ActRecorder(clock, split, per_call, gen), REC_HOOK, root=unet)
        batches = _batches(len(prompts), batch_size)
        for _, _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, range(len(batches)),
                              "calibrate scales", progress):
            pass
    finally:
        for path, m in layers:
            hooks.detach(m, REC_HOOK, root=unet)
        hooks.release_clock(unet)
    tensors = {}
    for path, rec in tqdm(recs.items(), desc="activation scales", disable=not progress):
        parts = 1 + max((k[1] for k in rec.lo), default=0)
        t = {k: torch.full((n_calls, parts), float("nan")) for k in ("sym", "asym", "sym_mse", "asym_mse", "shift")}
        for (step, i), lo in rec.lo.items():
            hi, x = rec.hi[(step, i)], torch.cat(rec.samples[(step, i)])
            m, half, amax = (hi + lo) / 2, (hi - lo) / 2, max(-lo, hi)  # the range always includes 0
            t["shift"][step, i] = m
            t["sym"][step, i], t["asym"][step, i] = range_scale(amax), range_scale(half)
            t["sym_mse"][step, i], t["asym_mse"][step, i] = mse_scale(x, amax), mse_scale(x - m, half)
        if torch.isnan(t["sym"]).any():
            raise RuntimeError(f"layer {path} did not run at every UNet call during calibration")
        for k, v in t.items():
            tensors[f"quant.{'shift' if k == 'shift' else 'scale_' + k}.{path}"] = v
    return tensors


def _static(quant):
    """The recipe's quantizer in static mode without quantization DEC: what schedules are fit and DEC is measured with."""
    return type(quant)(**{**quant.to_dict_fields(), "correction": None, "mode": "static"})


def collect_quant_dec(pipe, quant, cache, calib: Calibration, prompts, steps, n_calls, seed=0, guidance=7.5,
                      batch_size=4, progress=True) -> dict:
    """CacheQuant's quantization DEC of the layers that consume the cached feature: per call and output channel,
    the least-squares map from the quantized layer's output to the float layer's on the same input, measured with
    ``cache`` (the final schedule) and the quantized model active; ``calib`` holds the activation scales. Returns
    the ``quant.dec_alpha.*`` / ``quant.dec_beta.*`` tensors."""
    from .api import apply
    from .transforms.quantize import QConv2d

    unet, _ = resolve(pipe)
    q = _static(quant)
    handle = apply(pipe, [cache, q], calibration=calib)
    clock = handle.clock
    consumers = _consumers(unet, cache.branch)
    decs, tensors = {}, {}
    try:
        for path in consumers:
            qm = q._modules.get(path)  # by path: a LoRA wrapper may sit at the path, the layer is its base layer
            if isinstance(qm, QConv2d) or hasattr(qm, "weight_q0"):
                decs[path] = hooks.attach(qm, _DecRecorder(clock, q.float_layer(path), n_calls), REC_HOOK, root=unet)
        batches = _batches(len(prompts), batch_size)
        for _, _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, range(len(batches)),
                              "calibrate quant DEC", progress):
            pass
    finally:
        for path in decs:
            hooks.detach(q._modules[path], REC_HOOK, root=unet)
        handle.remove()
    for path, rec in decs.items():
        alpha, beta = rec.coefficients()
        tensors[f"quant.dec_alpha.{path}"], tensors[f"quant.dec_beta.{path}"] = alpha, beta
    return tensors


def _consumers(unet, branch: int) -> list[str]:
    """The layers that consume the cached feature: the convs of the first up-path resnet that runs on cached calls."""
    from .unet import branch_location

    B, L = branch_location(unet, branch)
    ub = len(unet.up_blocks) - 1 - B
    k = len(unet.up_blocks[ub].resnets) - 1 - L
    res = unet.up_blocks[ub].resnets[k]
    names = ["conv1"] + (["conv_shortcut"] if getattr(res, "conv_shortcut", None) is not None else [])
    return [f"up_blocks.{ub}.resnets.{k}.{n}" for n in names]


DEFAULT_BUDGET = 10  # full UNet calls per pipeline call when no budget is given
DEFAULT_PROMPTS = 8  # calibration prompts (the miniature's train stream) when none are given
REFINE_PROMPTS = 8  # of them, the ones a cache's schedule (or adaptive threshold) is refined on, by default: on 4 the
# refinement overfits (held-out fidelity 1-4 dB below the fit prompts'; docs/CACHE_BENCHMARKS.md's fit column)


def unet_calls(pipe, steps: int) -> int:
    """UNet calls one text-to-image pipeline call of ``steps`` steps makes with the pipeline's scheduler
    (PNDM: steps + 1), known before running it."""
    s = type(pipe.scheduler).from_config(pipe.scheduler.config)
    s.set_timesteps(steps)
    return len(s.timesteps)


def check_recipe(recipe):
    """The :class:`Recipe` for ``recipe`` if it has something to calibrate, else a one-line ``ValueError``."""
    from .calibration import uses_calibration
    from .recipe import available

    r = load_recipe(recipe) if not hasattr(recipe, "transforms") else recipe
    if not any(uses_calibration(t) for t in r.transforms):
        users = [n for n in available() if any(uses_calibration(t) for t in load_recipe(n).transforms)]
        raise ValueError(f"recipe {r.name!r} uses no calibration (none of its transforms reads one): nothing to "
                         f"calibrate; recipes that use one: {', '.join(users)}")
    return r


def refines_cache(recipe, refine: bool = True) -> bool:
    """Whether calibrating ``recipe`` fits a cache's schedule (unless ``refine`` is off) or its adaptive threshold on
    the refinement prompts, the ones ``refine_prompts`` counts."""
    caches = [t for t in check_recipe(recipe).transforms if isinstance(t, FeatureCache)]
    return bool(caches) and (refine or caches[0].schedule == "adaptive")


def check_refine_prompts(refine_prompts: int | None, n_prompts: int) -> None:
    """More refinement prompts than calibration prompts would silently fit on fewer than asked for."""
    if refine_prompts is not None and refine_prompts > n_prompts:
        raise ValueError(f"--refine-prompts {refine_prompts} is more than the {n_prompts} calibration prompts: give "
                         f"at least {refine_prompts} prompts (--num-prompts) or --refine-prompts {n_prompts}")


def _check_inputs(pipe, prompts, steps, budget, guidance, batch_size, refine_prompts, refine_evals,
                  uses_budget: bool, refines: bool = False, refine_prompts_given: bool = False) -> list[int]:
    """Every argument of :func:`calibrate` that can be checked before the pipeline runs; returns the budgets.
    ``refines``: the cache's schedule or threshold will be fit on the first ``refine_prompts`` prompts (a number
    given for a calibration that refines nothing is ignored, with a warning)."""
    import math
    import warnings

    from .errors import AccelWarning

    if not prompts:
        raise ValueError("no calibration prompts")
    if steps < 2:
        raise ValueError("--steps must be >= 2")
    for name, v in (("--batch-size", batch_size), ("--refine-prompts", refine_prompts), ("--refine-evals", refine_evals)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    if refines:
        check_refine_prompts(refine_prompts, len(prompts))
    elif refine_prompts_given:
        warnings.warn("--refine-prompts is ignored: nothing is refined (no FeatureCache in the recipe, or --no-refine "
                      "with a fixed schedule)", AccelWarning, stacklevel=3)
    n = unet_calls(pipe, steps)
    given = budget is not None
    budgets = [int(b) for b in (budget if isinstance(budget, (list, tuple)) else [budget if given else DEFAULT_BUDGET])]
    if not budgets or min(budgets) < 1:
        raise ValueError("--budget must be >= 1")
    if not uses_budget:  # W8A8 alone: the budget only sets the default of the stored cache statistics
        if given:
            warnings.warn("--budget is ignored: the recipe has no FeatureCache and no Inherit(schedule='calibrated')",
                          AccelWarning, stacklevel=3)
        return [min(DEFAULT_BUDGET, n)]
    if max(budgets) > n:
        what = f"--budget {' '.join(map(str, budgets))}" if given else f"the default --budget {DEFAULT_BUDGET}"
        raise ValueError(f"{what}: full calls must be in 1..{n}, the UNet calls of one pipeline call at {steps} steps "
                         f"({type(pipe.scheduler).__name__}); give --budget K with K <= {n}")
    return budgets


def calibrate(pipe, recipe="cachequant-dp", prompts: list[str] | None = None, steps: int = 50,
              budget: int | list[int] | None = None, seed: int = 0, guidance: float = 7.5, batch_size: int = 4,
              constrained: bool = True, prompt_source: str = "miniature grammar (train stream)", progress: bool = True,
              refine: bool = True, refine_prompts: int | None = None, refine_evals: int = 60) -> Calibration:
    """Calibrate ``pipe`` for ``recipe`` and return the :class:`Calibration` (``.save(DIR)`` writes it).

    ``budget``: full UNet calls per pipeline call, or a list of them (the first is the default budget of the
    artifact; default :data:`DEFAULT_BUDGET`); a recipe without a cache or a calibrated ``Inherit`` needs none
    (a given one is ignored, with a warning). With a cache and ``refine``, each budget's DP schedule is refined by :func:`refine_schedule` on
    the first ``refine_prompts`` prompts (default :data:`REFINE_PROMPTS`, or all when fewer are given; more than
    were given is an error) (at most ``refine_evals`` pipeline runs per start); other budgets
    asked for later get the DP schedule alone. With a ``Quantize`` too, its activation scales are measured first and
    the schedule (or the adaptive threshold) is fit with the quantized model running: on the miniature a forecast
    schedule refined without it lost 1.8 dB once quantized (docs/BENCHMARKS.md)."""
    import diffusers

    from accel import miniature

    from .transforms.quantize import Quantize

    t0 = time.time()
    r = check_recipe(recipe)
    caches = [t for t in r.transforms if isinstance(t, FeatureCache)]
    quants = [t for t in r.transforms if isinstance(t, Quantize)]
    inherits = [t for t in r.transforms if isinstance(t, Inherit) and t.schedule == "calibrated"]
    prompts = prompts if prompts is not None else miniature.prompts(DEFAULT_PROMPTS, seed=seed, split="train")
    unet, pipe = resolve(pipe)
    if pipe is None:
        raise ValueError("calibration needs the pipeline (it runs it), not a bare UNet")
    given = refine_prompts is not None
    if refine_prompts is None:
        refine_prompts = min(REFINE_PROMPTS, len(prompts))
    budgets = _check_inputs(pipe, prompts, steps, budget, guidance, batch_size, refine_prompts, refine_evals,
                            uses_budget=bool(caches or inherits), refines=refines_cache(r, refine),
                            refine_prompts_given=given)
    budget = budgets[0]
    meta = {
        "recipe": {"name": r.name, "transforms": [t.to_dict() for t in r.transforms]},
        "versions": {"accel": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "model": {"class": type(unet).__name__, "fingerprint": fingerprint(unet), "adapters": adapters.record(unet)},
        "prompts": {"source": prompt_source, "count": len(prompts)},
        "generation": {"seed": seed, "guidance": guidance, "batch_size": batch_size},
    }
    tensors: dict[str, torch.Tensor] = {}
    cache = caches[0] if caches else None
    branch = cache.branch if cache else 0
    modules = {}
    if caches or quants:
        modules["cache"] = (cached_units(unet, branch)[1].module, False, None, _batch_stats)
    targets = inherits[0].matched(unet) if inherits else {}
    for path, m in targets.items():
        modules[f"inherit.{path}"] = (m, inherits[0].residual, INHERIT_ELEMENTS, _dist_stats)
    totals, n = collect_features(pipe, modules, prompts, steps, seed, guidance, batch_size, progress)
    meta["scheduler"] = {"class": type(pipe.scheduler).__name__, "steps": steps, "unet_calls": n}
    if not all(1 <= b <= n for b in budgets):
        raise ValueError(f"--budget must be in 1..{n} (UNet calls per pipeline call), got {budgets}")
    if inherits:
        for path in targets:
            tensors[f"inherit.{path}.distance"] = totals[f"inherit.{path}"]["dist"]
        meta["inherit"] = {"targets": list(targets), "residual": inherits[0].residual, "budget": budget}
        meta["inherit"]["schedule"] = Calibration(meta, tensors).inherit_schedule(list(targets), n, inherits[0].residual)
    if not (caches or quants):
        meta["seconds"] = round(time.time() - t0, 2)
        return Calibration(meta, tensors)
    stats = totals["cache"]
    count = stats["count"] * 1.0
    m = Moments(stats["sum"] / count, stats["sumsq"] / count, stats["cross"] / count)
    C = schedules.group_cost(D=stats["dist"].numpy())
    lo, hi = schedules.paper_bounds(n, budget) if constrained else (1, n)
    full, cost = schedules.dp_schedule(C, budget, lo, hi)
    key = f"cache.b{branch}"
    tensors.update({f"{key}.distance": stats["dist"], f"{key}.mean": m.mean, f"{key}.sq": m.sq, f"{key}.cross": m.cross})
    meta["cache"] = {"branch": branch, "budget": budget, "dp_schedule": full, "constrained": constrained,
                     "group_len": [lo, hi], "dp_cost": cost}
    quant = _static(quants[0]) if quants else None
    if quant is not None:  # the scales do not depend on the schedule: measured first, so that it is fit with them
        qt = collect_scales(pipe, quant, prompts, steps, n, seed, guidance, batch_size, progress)
        tensors.update(qt)
        meta["quant"] = {"layers": sum(k.startswith("quant.shift.") for k in qt)}
    if cache is not None and cache.schedule == "adaptive":
        meta["cache"]["adaptive"] = [calibrate_threshold(pipe, cache, Calibration(meta, tensors), budgets,
                                                         prompts[:refine_prompts], steps, seed, guidance, progress,
                                                         quant=quant)]
    elif refine and cache is not None:
        meta["cache"]["refined"] = {}
        ref_prompts = prompts[:refine_prompts]
        smaller = None  # the refined schedule of the next smaller budget: more budget must not be worse
        for k in sorted(set(budgets)):
            calib = Calibration(meta, tensors)
            dp = calib.cache(branch, k).dp_calls(k)
            r = refine_schedule(pipe, cache, calib, dp, ref_prompts, steps, seed, guidance, refine_evals, progress,
                                quant=quant, smaller=smaller)
            smaller = (r["schedule"], r["error_db"])
            tensors[refined_key(branch, k, cache.prediction)] = torch.tensor(r.pop("schedule"), dtype=torch.int64)
            meta["cache"]["refined"][refined_name(k, cache.prediction)] = r
    full = Calibration(meta, tensors).cache(branch, budget).full_calls(n, budget, cache.prediction if cache else None)
    a, b = coefficients(m, full)
    tensors.update({f"{key}.schedule": torch.tensor(full, dtype=torch.int64), f"{key}.dec_a": a, f"{key}.dec_b": b})
    meta["cache"]["schedule"] = full
    if quant is not None:
        dec = {}
        if quants[0].correction == "dec" and cache is not None:
            dec = collect_quant_dec(pipe, quant, cache, Calibration(meta, tensors), prompts, steps, n, seed, guidance,
                                    batch_size, progress)
            tensors.update(dec)
        meta["quant"]["dec_layers"] = sorted(k[len("quant.dec_alpha."):] for k in dec if k.startswith("quant.dec_alpha."))
    meta["seconds"] = round(time.time() - t0, 2)
    return Calibration(meta, tensors)


def calibrate_threshold(pipe, cache: FeatureCache, calib: Calibration, budgets: list[int], prompts: list[str], steps: int,
                        seed: int, guidance: float, progress: bool = True, iterations: int = 10,
                        bounds: tuple[float, float] = (1e-3, 1.0), quant=None) -> dict:
    """The probe threshold of ``FeatureCache(schedule="adaptive")`` that spends each budget.

    For a threshold, the pipeline runs each of ``prompts`` (the refinement's share of the calibration prompts) alone (image i with seed ``seed + i``; alone,
    because a batch runs the full UNet when any of its samples needs it) with the recipe's adaptive cache
    (its branch, forecast, cap and correction), and the full calls are counted (``Handle.stats()``). Fewer full
    calls with a higher threshold: bisection in log space finds, per budget K, the smallest threshold whose mean
    is at most K. Returns the record stored in ``accel.json`` (``cache.adaptive``): the cache's settings, the
    threshold and the mean full calls measured per budget.
    """
    from .api import apply

    t0 = time.time()
    batches = [[i] for i in range(len(prompts))]
    spent: dict[float, float] = {}

    def mean_full(tau: float) -> float:
        if tau not in spent:
            fc = FeatureCache(schedule="adaptive", threshold=tau, branch=cache.branch, forecast=cache.forecast,
                              trust=cache.trust, max_cached=cache.max_cached, correction=cache.correction)
            handle = apply(pipe, fc if quant is None else [quant, fc], calibration=calib)
            try:
                for _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, range(len(batches)), "", False):
                    pass
                spent[tau] = handle.stats()["full_per_pipeline_call"]
            finally:
                handle.remove()
            bar.update()
        return spent[tau]

    thresholds, full = {}, {}
    bar = tqdm(total=iterations * len(budgets) + 2, desc="calibrate adaptive threshold", disable=not progress)
    try:
        for k in budgets:
            lo, hi = bounds  # mean_full(lo) > k expected, mean_full(hi) <= k expected
            if mean_full(hi) > k:
                lo = hi
            elif mean_full(lo) <= k:
                hi = lo
            for _ in range(iterations if lo < hi else 0):
                mid = (lo * hi) ** 0.5
                if mean_full(mid) > k:
                    lo = mid
                else:
                    hi = mid
            thresholds[str(k)], full[str(k)] = hi, round(mean_full(hi), 3)
    finally:
        bar.close()
    return {"forecast": cache.prediction, "max_cached": cache.max_cached, "correction": cache.correction,
            "quantized": quant is not None,
            "thresholds": thresholds, "full_calls": full, "prompts": len(prompts), "runs": len(spent) * len(prompts),
            "seconds": round(time.time() - t0, 2)}


def refine_schedule(pipe, cache: FeatureCache, calib: Calibration, start: list[int], prompts: list[str], steps: int,
                    seed: int, guidance: float, max_evals: int = 60, progress: bool = True, quant=None,
                    smaller: tuple[list[int], float] | None = None) -> dict:
    """Refine a cache schedule on what it is for: the error of the final sample.

    The DP (CacheQuant's DPS) minimises a proxy, the summed feature distance of each cached call to its group's
    full call, as if a cached call cost the same wherever it falls. On the miniature one cached call among the
    last few moves the final sample an order of magnitude more than one mid-sampling (nothing after it corrects
    the error; ``notebooks/cache_schedules.ipynb`` measures it), and the DP's schedule lost to the uniform one
    at 11 and 8 full calls of 51. This runs the pipeline with
    the recipe's cache (its branch, forecast and correction; with ``quant``, the recipe's static quantizer without
    quantization DEC, its activation scales in ``calib``: the schedule is fit on the model that will run) on ``prompts`` (image i with seed ``seed + i``, the
    calibration seeds) and moves full calls one at a time while the final latents get closer to the
    uncached ones (:func:`accel.schedules.refine`). The objective is the mean over images of
    ``10 log10 MSE(latent, uncached latent)`` (dB, lower is better): a latent-space negative PSNR. ``dp_error_db``
    in the result is the DP schedule's value (the refinement is never worse on these prompts).

    The search starts from the DP's schedule and from the even one. ``smaller`` is the refined schedule of a smaller
    budget and its error on the same prompts: when both searches end worse than it (more full calls, a larger
    error: a poorer local optimum), a third starts from that schedule with the extra full calls added in its
    longest cached runs (:func:`accel.schedules.extend`), so that more budget is not worse on these prompts.
    Every process runs the same search on the same prompts, so the result does not depend on the process count.
    """
    from .api import apply

    t0 = time.time()

    def latents():  # all refinement prompts in one pipeline call, image i with seed ``seed + i``
        (_, lat), = _run_batches(pipe, prompts, steps, seed, guidance, [list(range(len(prompts)))], [0], "", False)
        return lat.double()

    base = latents()
    measured: dict[tuple, float] = {}  # one pipeline run per schedule, shared by both searches

    def error_db(full):
        key = tuple(full)
        if key not in measured:
            fc = FeatureCache(schedule=list(full), branch=cache.branch, correction=cache.correction,
                              forecast=cache.forecast, trust=cache.trust)
            handle = apply(pipe, fc if quant is None else [quant, fc], calibration=calib)
            try:
                d = latents() - base
            finally:
                handle.remove()
            mse = (d ** 2).flatten(1).mean(1).clamp_min(1e-30)
            measured[key] = (10 * torch.log10(mse)).mean().item()
        return measured[key]

    n = calib.cache(cache.branch).n
    starts = {"dp": list(start), "uniform": schedules.even(n, len(start))}
    bar = tqdm(total=max_evals * len(starts), desc=f"refine schedule ({len(start)} full)", disable=not progress)
    found = {}

    def search(name, s):
        done = bar.n  # the evaluations of the searches before this one
        found[name] = schedules.refine(s, error_db, n, max_evals, tol=0.01,
                                       progress=lambda count: bar.update(done + count - bar.n))

    try:
        for name, s in starts.items():
            if name == "dp" or s != starts["dp"]:
                search(name, s)
        if smaller is not None and min(v[1] for v in found.values()) > smaller[1]:
            bar.total += max_evals
            search("smaller", schedules.extend(smaller[0], len(start), n))
    finally:
        bar.close()
    best = min(found, key=lambda k: found[k][1])
    full, db, _ = found[best]
    return {"schedule": full, "dp": list(start), "dp_error_db": round(error_db(start), 3), "error_db": round(db, 3),
            "from": best, "evals": len(measured), "prompts": len(prompts), "quantized": quant is not None,
            "seconds": round(time.time() - t0, 2)}
