"""Forecasting caches (TaylorSeer for UNets), run-time adaptive schedules and the spent-calls counter."""
import numpy as np
import pytest
import torch

import accel
from accel.calibrate import _batch_stats, calibrate
from accel.transforms import forecast
from accel.transforms.dec import Moments, coefficient, coefficients
from accel.unet import cached_units, feature_of

from conftest import CallCounter, make_pipe, pipe_inputs

PROMPTS = ["a large red circle on the left, black background", "a small blue square at the top, white background"]


def run(pipe, kind="sd", **kw):
    return pipe(**pipe_inputs(kind, **kw)).images


@pytest.mark.parametrize("xs", [[4], [4, 1], [7, 5, 1], [9, 6, 2]])
def test_weights_reproduce_polynomials_of_their_order(xs):
    order = len(xs) - 1
    coef = np.random.default_rng(len(xs)).normal(size=order + 1)
    poly = lambda x: sum(c * x ** i for i, c in enumerate(coef))
    for t in (xs[0] + 1, xs[0] + 3, xs[0] + 7):
        w = forecast.weights(xs, t)
        assert sum(w) == pytest.approx(1.0)
        assert sum(wm * poly(x) for wm, x in zip(w, xs)) == pytest.approx(poly(t), rel=1e-9, abs=1e-9)
    assert forecast.sources([0, 3, 5, 9], 8, 1) == [5, 3] and forecast.sources([0, 3], 2, 2) == [0]


class _Boundary:
    """Records what the shallow path receives from the deep part: the boundary unit's output at every call
    (a plain torch hook registered after the cache's, so it sees the forecast feature)."""

    def __init__(self, unet, branch):
        _, b = cached_units(unet, branch)
        self.seen = []
        self._h = b.module.register_forward_hook(lambda m, i, o: self.seen.append(feature_of(o).detach().clone()))

    def close(self):
        self._h.remove()


@pytest.mark.parametrize("name,order", [("taylor1", 1), ("taylor2", 2)])
def test_cached_calls_receive_the_extrapolated_feature(name, order, tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    full = [0, 2, 3, 6, 8]
    handle = accel.apply(pipe, accel.FeatureCache(schedule=full, forecast=name, branch=1))
    rec = _Boundary(pipe.unet, 1)
    out = run(pipe, steps=10)
    rec.close()
    assert torch.isfinite(out).all() and len(rec.seen) == 10
    for t in range(10):
        if t in full:
            continue
        xs = forecast.sources(full, t, order)
        want = sum(w * rec.seen[x] for w, x in zip(forecast.weights(xs, t), xs))
        torch.testing.assert_close(rec.seen[t], want, rtol=1e-5, atol=1e-6)
    assert handle.stats()["full"] == len(full) and handle.stats()["cached"] == 10 - len(full)
    handle.remove()


def test_forecast_none_is_deepcache_reuse_and_remove_is_exact(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    base = run(pipe)
    with accel.apply(pipe, accel.FeatureCache(interval=3)):
        reuse = run(pipe)
    with accel.apply(pipe, accel.FeatureCache(interval=3, forecast="taylor1")):
        fc = run(pipe)
    assert not torch.equal(fc, reuse)
    assert torch.equal(run(pipe), base)


def test_dec_on_a_forecast_is_least_squares_on_the_forecast():
    g = torch.Generator().manual_seed(0)
    n, b, c, h, w = 7, 3, 4, 5, 5
    feats = [torch.randn(b, c, h, w, generator=g)]
    for i in range(n - 1):
        feats.append(0.8 * feats[-1] + 0.2 * torch.randn(b, c, h, w, generator=g) + 0.05 * i)
    st = _batch_stats(feats)
    m = Moments(st["sum"] / st["count"], st["sumsq"] / st["count"], st["cross"] / st["count"])
    full = [0, 2, 3]
    a, b_ = coefficients(m, full, order=1)
    for t in (4, 5, 6):
        xs = forecast.sources(full, t, 1)
        x = sum(wm * feats[s].double() for wm, s in zip(forecast.weights(xs, t), xs))
        for ch in range(c):
            slope, icpt = np.polyfit(x[:, ch].reshape(-1).numpy(), feats[t][:, ch].reshape(-1).double().numpy(), 1)
            assert a[t, ch].item() == pytest.approx(slope, rel=1e-6)
            assert b_[t, ch].item() == pytest.approx(icpt, rel=1e-6, abs=1e-9)
        a_t, b_t = coefficient(m, xs, t, gain=False)
        torch.testing.assert_close(b_t, (feats[t].double() - x).mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-8)
        assert torch.equal(a_t, torch.ones_like(a_t))
    a0, _ = coefficients(m, full, order=0)  # order 0 is the paper's DEC on the reused feature
    ar, _ = coefficients(m, full)
    assert torch.equal(a0, ar)


@pytest.mark.parametrize("name", [None, "taylor1"])
def test_adaptive_decides_from_the_probe(name, tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    probes, fulls = [], []
    inner = pipe.unet.mid_block.resnets[0]  # runs on full calls only

    def on_probe(module, inputs, output):
        probes.append(output.detach().clone())
        fulls.append(False)

    def on_full(*_):
        fulls[-1] = True

    h1, h2 = pipe.unet.conv_in.register_forward_hook(on_probe), inner.register_forward_pre_hook(on_full)
    handle = accel.apply(pipe, accel.FeatureCache(schedule="adaptive", threshold=0.25, forecast=name))
    pipe(**pipe_inputs("sd", steps=12))
    st = handle.stats()
    handle.remove()
    h1.remove(), h2.remove()
    assert st["unet_calls"] == len(fulls) == 12 and st["full"] == sum(fulls) and 1 < st["full"] < 12
    # replay every decision independently: full iff the probe's relative L1 error to its forecast from the
    # last full calls (reuse: the last full call's probe) exceeds the threshold
    order = forecast.order_of(name)
    full_calls = [0]
    for t in range(1, 12):
        xs = forecast.sources(full_calls, t, order)
        pred = sum(w * probes[x] for w, x in zip(forecast.weights(xs, t), xs))
        err = ((probes[t] - pred).abs().flatten(1).mean(1) / probes[t].abs().flatten(1).mean(1)).max().item()
        assert fulls[t] == (err > 0.25), (t, err)
        if fulls[t]:
            full_calls.append(t)
    # a cap on consecutive cached calls, and a very high threshold: full calls exactly every cap+1 calls
    with accel.apply(pipe, accel.FeatureCache(schedule="adaptive", threshold=1e9, max_cached=2)) as h:
        counter = CallCounter(inner)
        pipe(**pipe_inputs("sd", steps=12))
        assert counter.n == len(range(0, 12, 3)) and h.stats()["full"] == counter.n
        counter.close()


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet", "sdxl"])
def test_adaptive_forecast_on_every_pipeline_kind(kind, tokenizer_dir):
    pipe = make_pipe(kind, tokenizer_dir)
    base = run(pipe, kind)
    with accel.apply(pipe, accel.FeatureCache(schedule="adaptive", threshold=0.05, max_cached=3,
                                              forecast="taylor2")) as h:
        out = run(pipe, kind, batch=2)
        assert torch.isfinite(out).all() and h.stats()["pipeline_calls"] == 1
        assert h.stats()["unet_calls"] == h.clock.total
    assert torch.equal(run(pipe, kind), base)


def test_stats_per_pipeline_call(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    with accel.apply(pipe, accel.FeatureCache(interval=4)) as h:
        run(pipe, steps=8)
        run(pipe, steps=10)
        st = h.stats()
    assert st["per_pipeline_call"] == [{"full": 2, "cached": 6}, {"full": 3, "cached": 7}]
    assert st["full"] == 5 and st["full_per_pipeline_call"] == 2.5
    with accel.apply(pipe, accel.Inherit(targets="mid_block", every=2)) as h:
        run(pipe, steps=6)
        assert h.stats()["unet_calls"] == 6 and h.stats()["full"] == 6


def test_bad_settings_are_refused():
    FC = accel.FeatureCache
    for kw, msg in [(dict(interval=2, forecast="taylor3"), "forecast"),
                    (dict(interval=2, threshold=0.1), "adaptive"),
                    (dict(schedule="adaptive", threshold=0.1, budget=3), "not both"),
                    (dict(schedule="adaptive", threshold=-1.0), "> 0"),
                    (dict(schedule="adaptive", threshold=0.1, max_cached=0), "max_cached")]:
        with pytest.raises(ValueError, match=msg):
            FC(**kw)


@pytest.fixture(scope="module")
def adaptive_calibration(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    recipe = accel.Recipe("t", [accel.FeatureCache(schedule="adaptive", forecast="taylor1", correction="dec-mean")])
    calib = calibrate(pipe, recipe, PROMPTS, steps=12, budget=[5, 3], batch_size=2, progress=False)
    return pipe, calib


def test_calibrated_threshold_spends_the_budget(adaptive_calibration):
    pipe, calib = adaptive_calibration
    entry, = calib.meta["cache"]["adaptive"]
    assert entry["forecast"] == "taylor1" and entry["correction"] == "dec-mean" and entry["prompts"] == 2
    assert float(entry["thresholds"]["3"]) >= float(entry["thresholds"]["5"])
    for k in (5, 3):
        spent = []
        with accel.apply(pipe, accel.FeatureCache(schedule="adaptive", forecast="taylor1", correction="dec-mean",
                                                  budget=k), calibration=calib) as h:
            for i, p in enumerate(PROMPTS):  # the calibration's own runs: each prompt alone, seed i
                pipe(p, num_inference_steps=12, guidance_scale=7.5, generator=torch.Generator().manual_seed(i),
                     output_type="latent")
            spent = h.stats()["full_per_pipeline_call"]
        assert spent == pytest.approx(entry["full_calls"][str(k)]) and spent <= k
    with pytest.raises(accel.CalibrationError, match="no adaptive threshold"):
        accel.apply(pipe, accel.FeatureCache(schedule="adaptive", forecast="taylor2", budget=3), calibration=calib)
    with pytest.raises(accel.CalibrationError, match="needs a calibration"):
        accel.apply(pipe, accel.FeatureCache(schedule="adaptive", budget=3))


def test_calibrated_forecast_schedule_is_refined_with_the_forecast(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    recipe = accel.recipe.load("cache-forecast-plain")
    plain = accel.FeatureCache(schedule="calibrated", forecast="taylor1")
    assert [t.to_dict() for t in recipe.transforms] == [plain.to_dict()]
    calib = calibrate(pipe, recipe, PROMPTS, steps=10, budget=4, batch_size=2, progress=False, refine_evals=8)
    c = calib.cache(0)
    assert c.refined_budgets("taylor1") == [4] and c.refined_budgets() == []
    assert "taylor1.4" in calib.meta["cache"]["refined"]
    assert c.full_calls(10, 4, "taylor1") == calib.tensors["cache.b0.refined.taylor1.4"].tolist()
    assert c.full_calls(10, 4) == c.dp_calls(4)  # another forecast: the DP's schedule
    with accel.apply(pipe, accel.FeatureCache(schedule="calibrated", forecast="taylor1"), calibration=calib) as h:
        run(pipe, steps=10)
        assert h.stats()["full"] == 4
        with pytest.raises(accel.CalibrationError, match="10 UNet calls"):
            run(pipe, steps=8)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                                       "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"])
def test_forecast_and_adaptive_with_every_scheduler(scheduler, tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler=scheduler)
    base = run(pipe, steps=8)
    for t in (accel.FeatureCache(interval=3, forecast="taylor2"),
              accel.FeatureCache(schedule="adaptive", threshold=0.2, max_cached=3, forecast="taylor1")):
        with accel.apply(pipe, t) as h:
            for _ in range(2):  # a second pipeline call starts afresh
                out = run(pipe, steps=8)
                assert torch.isfinite(out).all()
            st = h.stats()
            assert st["pipeline_calls"] == 2 and st["unet_calls"] == 2 * h.clock.total
            assert st["per_pipeline_call"][0] == st["per_pipeline_call"][1]  # same inputs, same decisions
    assert torch.equal(run(pipe, steps=8), base)


def test_skill_scores_the_forecast_against_reuse():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    line = lambda x: a + x * b  # a feature moving on a straight line: taylor1 is exact, skill 1
    s = forecast.skill(line(9.0), [line(6.0), line(2.0)], [9, 6, 2], order=1)
    torch.testing.assert_close(s, torch.ones(2, 1, 1, 1))
    # truth on the segment between reuse (prev) and the forecast X = line(9): as far from X as from prev -> 0;
    # at 2/3 of the way to X its squared error is a quarter of reuse's -> 0.75
    f, prev, older = line(9.0), line(6.0), line(3.0)
    for alpha, want in ((0.5, 0.0), (2 / 3, 0.75), (0.2, 0.0)):
        truth = prev + alpha * (f - prev)
        torch.testing.assert_close(forecast.skill(truth, [prev, older], [9, 6, 3], 1), torch.full((2, 1, 1, 1), want))
    assert float(forecast.skill(f, [prev], [9, 6], 1)) == 0.0  # one earlier full call: the forecast was reuse


def test_trusted_forecast_lerps_by_the_skill(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    full = [0, 2, 4, 6, 8]
    rec = _Boundary(pipe.unet, 0)
    with accel.apply(pipe, accel.FeatureCache(schedule=full, forecast="taylor1", trust="skill")) as h:
        run(pipe, steps=10)
        assert h.stats()["full"] == 5
    rec.close()
    F = rec.seen
    for t in (1, 3):  # after one or two full calls: reuse
        torch.testing.assert_close(F[t], F[t - 1])
    for t in (5, 7, 9):
        j, i, k = t - 1, t - 3, t - 5  # the last full call, the one before, and the one before that
        s = forecast.skill(F[j], [F[i], F[k]], [j, i, k], 1)
        want = torch.lerp(F[j], F[j] + (F[j] - F[i]) / 2, s)
        torch.testing.assert_close(F[t], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="trust"):
        accel.FeatureCache(interval=2, trust="skill")
    with pytest.raises(ValueError, match="one of trust and correction"):
        accel.FeatureCache(schedule="calibrated", forecast="taylor1", trust="skill", correction="dec")


def test_batches_and_guidance_off(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    for guidance in (1.0, 7.5):
        base = run(pipe, batch=3, guidance=guidance)
        for t in (accel.FeatureCache(interval=3, forecast="taylor1", trust="skill"),
                  accel.FeatureCache(schedule="adaptive", threshold=0.2, forecast="taylor2")):
            with accel.apply(pipe, t) as h:
                out = run(pipe, batch=3, guidance=guidance)
                assert out.shape == base.shape and torch.isfinite(out).all()
                assert h.clock.batch_shape[0] == (3 if guidance == 1.0 else 6)
                run(pipe, batch=1, guidance=guidance)  # another batch size: the kept features are not reused
            assert torch.equal(run(pipe, batch=3, guidance=guidance), base)


def test_cfg_mean_step_keeps_the_guidance_difference():
    g = torch.Generator().manual_seed(0)
    last, h = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    out = forecast.cfg_mean_step(h, last)
    (hu, hc), (lu, lc), (ou, oc) = h.chunk(2), last.chunk(2), out.chunk(2)
    torch.testing.assert_close(ou + oc, hu + hc)  # the halves' mean: forecast
    torch.testing.assert_close(oc - ou, lc - lu)  # their difference: the last full call's
    swap = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731
    torch.testing.assert_close(forecast.cfg_mean_step(swap(h), swap(last)), swap(out))  # order of halves: no matter
    assert forecast.order_of("taylor1-cfg") == 1 and forecast.order_of("taylor2-cfg") == 2
    assert forecast.on_cfg_mean("taylor1-cfg") and not forecast.on_cfg_mean("taylor1")


def test_cfg_forecast_extrapolates_the_guidance_mean_only(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DPMSolverMultistepScheduler")
    full = [0, 2, 3, 6, 8]
    rec = _Boundary(pipe.unet, 1)
    with accel.apply(pipe, accel.FeatureCache(schedule=full, forecast="taylor1-cfg", branch=1)) as h:
        out = run(pipe, steps=10, batch=2)  # guidance on: a batch of 4, [uncond; cond]
        assert h.stats()["full"] == len(full)
    rec.close()
    F = rec.seen
    assert torch.isfinite(out).all() and len(F) == 10 and F[0].shape[0] == 4
    for t in range(10):
        if t in full:
            continue
        xs = forecast.sources(full, t, 1)
        lin = sum(w * F[x] for w, x in zip(forecast.weights(xs, t), xs))
        torch.testing.assert_close(F[t], forecast.cfg_mean_step(lin, F[xs[0]]), rtol=1e-5, atol=1e-6)
        (u, c), (lu, lc) = F[t].chunk(2), F[xs[0]].chunk(2)
        torch.testing.assert_close(c - u, lc - lu, rtol=1e-5, atol=1e-5)
    # guidance off (no halves): the plain forecast, bit for bit; with skill too
    for trust in (None, "skill"):
        outs = []
        for name in ("taylor1", "taylor1-cfg"):
            with accel.apply(pipe, accel.FeatureCache(interval=3, forecast=name, trust=trust)):
                outs.append(run(pipe, steps=10, batch=2, guidance=1.0))
        assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="guidance halves"):
        accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg", correction="dec-mean")


def test_cfg_forecast_schedule_is_refined_with_it(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DPMSolverMultistepScheduler")
    fc = accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg", trust="skill")
    assert fc.prediction == "taylor1-cfg+skill"
    calib = calibrate(pipe, accel.Recipe("t", [fc]), PROMPTS, steps=8, budget=3, batch_size=2, progress=False,
                      refine_evals=4)
    c = calib.cache(0)
    assert c.refined_budgets("taylor1-cfg+skill") == [3] and c.refined_budgets("taylor1+skill") == []
    with accel.apply(pipe, fc, calibration=calib) as h:
        assert torch.isfinite(run(pipe, steps=8)).all() and h.stats()["full"] == 3


def test_cache_forecast_cfg_recipe_and_curves_bench_mode():
    """Recipe cache-forecast-cfg is the refined schedule with the guidance-mean forecast (no skill), and the curves
    bench (`make bench-cache`) runs it at every sampler, with a calibration that refines its schedule."""
    from accel.bench import curves as bench_cache

    recipe = accel.recipe.load("cache-forecast-cfg")
    cfg = accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg")
    assert [t.to_dict() for t in recipe.transforms] == [cfg.to_dict()] and "cache-forecast-cfg" in accel.recipe.available()
    calibrated = {(t.schedule, t.prediction) for t in bench_cache.calibrations()}
    for interval in bench_cache.INTERVALS:
        named = dict(bench_cache.modes(7, interval))
        mode = named["refined + taylor1-cfg"]
        assert (mode.schedule, mode.forecast, mode.trust, mode.budget) == ("calibrated", "taylor1-cfg", None, 7)
        for name, t in named.items():  # every calibrated mode finds what it reads in one of the calibrations
            if t.schedule in ("calibrated", "adaptive"):
                assert name in bench_cache.CALIBRATED and (t.schedule, t.prediction) in calibrated, name
    assert "refined + taylor1-cfg" in bench_cache.CALIBRATED
