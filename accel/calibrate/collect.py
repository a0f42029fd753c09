"""Statistics collection for ``accel calibrate``: the hooks that record, on the unaccelerated (or, for
quantization DEC, the quantized) pipeline, what each transform's calibration needs, and their reduction to
partial sums.

Statistics stream: each batch of prompts contributes partial sums (float64) and its features are freed;
memory is bounded by one batch's ``N`` deep features, not by the number of prompts. Under
``accelerate launch --num_processes N`` the batches are shared out exactly as in ``accel eval`` and the
partial sums are gathered and added in global batch order, so the artifact equals the one-process one.
"""
from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from tqdm.auto import tqdm

from .. import hooks
from ..calibration import Calibration, quant_key
from ..unet import cached_units, feature_of, resolve

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


def _shared_batches(n: int, batch_size: int):
    """``(batches, the indices of those this process runs, process state)``: under ``accelerate launch`` the batches
    are shared out as in ``accel eval``."""
    from ..dist import state as dist_state

    state = dist_state()
    batches = _batches(n, batch_size)
    return batches, list(range(len(batches)))[state.process_index::state.num_processes], state


def _sum_in_batch_order(partials: dict) -> dict:
    """``{batch: {key: {stat: partial sum}}}`` of every process gathered and added in global batch order (the same
    sums whatever the process count)."""
    from ..dist import gather, state as dist_state

    if dist_state().num_processes > 1:
        partials = dict(gather([(bi, p) for bi, p in partials.items()]))
    totals = {}
    for bi in sorted(partials):
        for key, p in partials[bi].items():
            t = totals.get(key)
            totals[key] = {k: v.clone() if torch.is_tensor(v) else v for k, v in p.items()} if t is None else \
                {k: t[k] + p[k] for k in p}
    return totals


def collect_features(pipe, modules: dict, prompts: list[str], steps: int, seed: int = 0, guidance: float = 7.5,
                     batch_size: int = 4, progress: bool = True) -> tuple[dict, int]:
    """Run the unaccelerated pipeline on ``prompts`` (image i with seed ``seed + i``), recording at every UNet
    call the output of each ``modules[key] = (module, residual, keep, stat_fn)``; returns ``({key: summed
    statistics}, UNet calls per pipeline call)``. Each batch's features are reduced by ``stat_fn`` and freed;
    under ``accelerate launch`` batches are shared out and the partial sums added in global batch order."""
    from ..dist import gather

    unet, pipe = resolve(pipe)
    batches, mine, state = _shared_batches(len(prompts), batch_size)
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
        hooks.detach_all([m for m, *_ in modules.values()], REC_HOOK, unet)
    if state.num_processes > 1:
        n_calls = next(n for n in gather([n_calls]) if n is not None)
    return _sum_in_batch_order(partials), n_calls


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
    from ..transforms.quantize import _split_point, mse_scale, range_scale

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
        hooks.detach_all([m for _, m in layers], REC_HOOK, unet)
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
            tensors[quant_key("shift" if k == "shift" else f"scale_{k}", path)] = v
    return tensors


def _static(quant):
    """The recipe's quantizer in static mode without quantization DEC: what schedules are fit and DEC is measured with."""
    return quant.replace(correction=None, mode="static")


def collect_quant_dec(pipe, quant, cache, calib: Calibration, prompts, steps, n_calls, seed=0, guidance=7.5,
                      batch_size=4, progress=True) -> dict:
    """CacheQuant's quantization DEC of the layers that consume the cached feature: per call and output channel,
    the least-squares map from the quantized layer's output to the float layer's on the same input, measured with
    ``cache`` (the final schedule) and the quantized model active; ``calib`` holds the activation scales. Returns
    the ``quant.dec_alpha.*`` / ``quant.dec_beta.*`` tensors."""
    from ..api import apply
    from ..transforms.quantize import QConv2d

    unet, _ = resolve(pipe)
    q = _static(quant)
    handle = apply(pipe, [cache, q], calibration=calib)
    clock, layers = handle.clock, handle.applied(q.__class__)
    consumers = _consumers(unet, cache.branch)
    decs, tensors = {}, {}
    try:
        for path in consumers:
            qm = layers.layer(path)  # by path: a LoRA wrapper may sit at the path, the layer is its base layer
            if isinstance(qm, QConv2d) or hasattr(qm, "weight_q0"):
                decs[path] = hooks.attach(qm, _DecRecorder(clock, layers.float_layer(path), n_calls), REC_HOOK, root=unet)
        batches = _batches(len(prompts), batch_size)
        for _, _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, range(len(batches)),
                              "calibrate quant DEC", progress):
            pass
    finally:
        hooks.detach_all([layers.layer(path) for path in decs], REC_HOOK, unet)
        handle.remove()
    for path, rec in decs.items():
        alpha, beta = rec.coefficients()
        tensors[quant_key("dec_alpha", path)], tensors[quant_key("dec_beta", path)] = alpha, beta
    return tensors


def _consumers(unet, branch: int) -> list[str]:
    """The layers that consume the cached feature: the convs of the first up-path resnet that runs on cached calls."""
    from ..unet import branch_location

    B, L = branch_location(unet, branch)
    ub = len(unet.up_blocks) - 1 - B
    k = len(unet.up_blocks[ub].resnets) - 1 - L
    res = unet.up_blocks[ub].resnets[k]
    names = ["conv1"] + (["conv_shortcut"] if getattr(res, "conv_shortcut", None) is not None else [])
    return [f"up_blocks.{ub}.resnets.{k}.{n}" for n in names]


# ----------------------------------------------------------------------------------- the guidance-difference model
RIDGE = 1e-3  # ridge penalty on the slopes of the norm model (per sample, on the mean normal equations)


class _InputRecorder(ModelHook):
    """Keeps a detached copy of the UNet's inputs at every call, to replay them on the model without the cache."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def pre_forward(self, module, *args, **kwargs):
        from torch.utils._pytree import tree_map

        self.sink.append(tree_map(lambda t: t.detach().clone() if torch.is_tensor(t) else t, (args, kwargs)))
        return args, kwargs


def _difference_stats(F: list[torch.Tensor], full: list[int]) -> dict:
    """Partial sums of the norm model's normal equations, per cached call and channel, from the true deep features
    ``F`` (one per call, ``(2B, C, ...)``) of one closed-loop batch: ``xx`` (N, C, 3, 3), ``xy`` (N, C, 3), ``count``."""
    from ..transforms import forecast

    n, c, r = len(F), F[0].shape[1], forecast.DIFFERENCE_REGRESSORS
    xx, xy = torch.zeros(n, c, r, r, dtype=torch.float64), torch.zeros(n, c, r, dtype=torch.float64)
    for t in range(n):
        if t in full:
            continue
        j, p = (forecast.sources(full, t, 1) + [None])[:2]
        _, x = forecast.difference_regressors(F[j], F[p] if p is not None else None)
        y = forecast.log_norms(forecast.guidance_difference(F[t])) - x[..., 2]  # log(|D_true_t| / |D_j|)
        x, y = x.double(), y.double()
        xx[t], xy[t] = torch.einsum("bci,bcj->cij", x, x), torch.einsum("bci,bc->ci", x, y)
    return {"xx": xx, "xy": xy, "count": F[0].shape[0] // 2}


def fit_difference(stats: dict, ridge: float = RIDGE) -> torch.Tensor:
    """``W`` (N, C, 3) float32 of the norm model: per cached call and channel the ridge solution of
    ``(XX / n + ridge diag(0, 1, 1)) w = XY / n`` (the intercept unpenalised); rows of full calls (no records) 0."""
    n = max(stats["count"], 1)
    pen = torch.diag(torch.tensor([0.0] + [ridge] * (stats["xx"].shape[-1] - 1), dtype=torch.float64))
    A, b = stats["xx"] / n + pen, stats["xy"] / n
    seen = stats["xx"][..., 0, 0] > 0
    w = torch.zeros_like(b)
    w[seen] = torch.linalg.solve(A[seen], b[seen])
    return w.float()


def collect_difference(pipe, cache, calib: Calibration, full: list[int], prompts, steps, seed=0, guidance=7.5,
                       batch_size=4, progress=True, quant=None) -> torch.Tensor:
    """Fit the guidance-difference norm model (:mod:`accel.transforms.forecast`) of ``cache`` (a ``-cfg`` forecast)
    for the schedule ``full`` on closed-loop records: each batch of ``prompts`` runs the pipeline with the cache
    (the model off; with ``quant``, the quantizer too: the records are of the model that will run) while its UNet
    inputs are kept; then the same inputs are replayed on the model without the cache, which gives the true deep
    feature at every call of the trajectory the cache produced (at full calls, what the cache kept). Returns ``W``."""
    from ..api import apply

    unet, _ = resolve(pipe)
    boundary = cached_units(unet, cache.branch)[1].module
    fc = cache.replace(schedule=list(full), interval=None, budget=None, difference=None)
    batches, mine, _ = _shared_batches(len(prompts), batch_size)
    partials = {}
    for bi in tqdm(mine, desc=f"calibrate guidance difference ({len(full)} full)", disable=not progress):
        inputs, F = [], []
        hooks.attach(unet, _InputRecorder(inputs), REC_HOOK, root=unet)
        try:
            handle = apply(pipe, fc if quant is None else [quant, fc], calibration=calib)
            try:
                for _ in _run_batches(pipe, prompts, steps, seed, guidance, batches, [bi], "", False):
                    pass
            finally:
                handle.remove()
        finally:
            hooks.detach(unet, REC_HOOK, root=unet)
        hooks.attach(boundary, _Recorder(F), REC_HOOK, root=unet)
        try:
            handle = apply(pipe, quant, calibration=calib) if quant is not None else None
            try:
                with torch.no_grad():
                    for args, kwargs in inputs:
                        unet(*args, **kwargs)
            finally:
                if handle is not None:
                    handle.remove()
        finally:
            hooks.detach(boundary, REC_HOOK, root=unet)
        partials[bi] = {"d": _difference_stats(F, full)}
    return fit_difference(_sum_in_batch_order(partials)["d"])
