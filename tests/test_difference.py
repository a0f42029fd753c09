"""The guidance-difference norm model (issue #25): FeatureCache(difference='calibrated') on a '-cfg' forecast."""
import pytest
import torch

import accel
from accel.calibrate import calibrate
from accel.calibration import Calibration, dscale_key
from accel.errors import CalibrationError, InputError
from accel.hooks import hooks_of
from accel.transforms import forecast
from accel.unet import cached_units, feature_of

from conftest import make_pipe, pipe_inputs

PROMPTS = ["a large red circle on the left, black background", "a small blue square at the top, white background",
           "a green cross in the middle", "a small yellow triangle, grey background"]
STEPS, BUDGET = 8, 3


def cfg_d(**kw):
    return accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg", difference="calibrated", **kw)


def run(pipe, **kw):
    return pipe(**pipe_inputs("sd", steps=STEPS, batch=2, **kw)).images


@pytest.fixture(scope="module")
def pipe(tokenizer_dir):
    return make_pipe("sd", tokenizer_dir, scheduler="DPMSolverMultistepScheduler")


@pytest.fixture(scope="module")
def calib(pipe):
    return calibrate(pipe, accel.Recipe("d", [cfg_d()]), PROMPTS, steps=STEPS, budget=BUDGET, batch_size=2,
                     progress=False, refine_evals=4, difference_prompts=4)


def with_w(calib, w):
    """A copy of ``calib`` whose difference model of the default budget is ``w``."""
    key = dscale_key(0, BUDGET, "taylor1-cfg")
    return Calibration(calib.meta, dict(calib.tensors, **{key: w}))


def test_rescale_changes_only_the_difference():
    g = torch.Generator().manual_seed(0)
    last, prev = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    h = forecast.cfg_mean_step(torch.randn(4, 3, 2, 2, generator=g), last)  # a '-cfg' forecast: difference of last
    w = torch.randn(3, 3, generator=g) * 0.3
    d_j, x = forecast.difference_regressors(last, prev)
    out = forecast.rescale_difference(h, d_j, x, w)
    (hu, hc), (ou, oc) = h.chunk(2), out.chunk(2)
    torch.testing.assert_close(ou + oc, hu + hc)  # the halves' mean: the forecast's
    n = lambda d: d.flatten(2).norm(dim=-1)  # noqa: E731
    y = w[:, 0] + w[:, 1] * (n(d_j) / n(forecast.guidance_difference(prev))).log() + w[:, 2] * n(d_j).log()
    torch.testing.assert_close(oc - ou, d_j * y.exp()[..., None, None])  # D_hat = D_j exp(W . x), per sample, channel
    assert torch.equal(forecast.rescale_difference(h, d_j, x, torch.zeros_like(w)), h)  # W = 0: the forecast itself
    _, x0 = forecast.difference_regressors(last, None)
    assert torch.equal(x0[..., 1], torch.zeros_like(x0[..., 1]))  # no earlier full call: no ratio


def test_calibration_fits_and_round_trips_w(calib, tmp_path):
    c = calib.cache(0)
    full = c.full_calls(STEPS, BUDGET, "taylor1-cfg")
    w = c.dscale(forecast="taylor1-cfg")
    assert w.shape == (STEPS, 8, 3) and torch.isfinite(w).all()  # tiny UNet: 8 channels at branch 0
    assert all(w[t].abs().sum() == 0 for t in full) and all(w[t].abs().sum() > 0 for t in range(STEPS) if t not in full)
    assert calib.meta["cache"]["difference"]["prompts"] == 4
    calib.save(tmp_path / "c")
    loaded = Calibration.load(tmp_path / "c")
    assert torch.equal(loaded.cache(0).dscale(forecast="taylor1-cfg"), w)
    with pytest.raises(CalibrationError, match="difference='calibrated'"):
        loaded.cache(0).dscale(budget=2, forecast="taylor1-cfg")


def test_cached_calls_get_the_rescaled_difference(pipe, calib):
    """What the shallow path receives on a cached call: the taylor1-cfg forecast's mean and the kept difference
    rescaled by exp(W[t] . x) from the last two full calls, per sample and channel."""
    full = calib.cache(0).full_calls(STEPS, BUDGET, "taylor1-cfg")
    W = calib.cache(0).dscale(forecast="taylor1-cfg")
    _, b = cached_units(pipe.unet, 0)
    seen = []
    with accel.apply(pipe, cfg_d(), calibration=calib) as h:
        hk = b.module.register_forward_hook(lambda m, i, o: seen.append(feature_of(o).detach().clone()))
        out = run(pipe)
        hk.remove()
        assert h.stats()["full"] == BUDGET and torch.isfinite(out).all()
    changed = 0
    for t in range(STEPS):
        if t in full:
            continue
        xs = forecast.sources(full, t, 1)
        lin = sum(wm * seen[x] for wm, x in zip(forecast.weights(xs, t), xs))
        cfg = forecast.cfg_mean_step(lin, seen[xs[0]])
        d_j, x = forecast.difference_regressors(seen[xs[0]], seen[xs[1]] if len(xs) > 1 else None)
        torch.testing.assert_close(seen[t], forecast.rescale_difference(cfg, d_j, x, W[t]), rtol=1e-5, atol=1e-6)
        (u, c), (cu, cc) = seen[t].chunk(2), cfg.chunk(2)
        torch.testing.assert_close(u + c, cu + cc, rtol=1e-5, atol=1e-6)  # the mean: the forecast's
        changed += not torch.allclose(c - u, cc - cu)
    assert changed  # the difference did move


def test_zero_w_is_the_cfg_forecast_and_remove_restores(pipe, calib):
    base = run(pipe)
    with accel.apply(pipe, accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg"), calibration=calib):
        plain = run(pipe)
    zero = with_w(calib, torch.zeros_like(calib.cache(0).dscale(forecast="taylor1-cfg")))
    with accel.apply(pipe, cfg_d(), calibration=zero):
        assert torch.equal(run(pipe), plain)
    with accel.apply(pipe, cfg_d(), calibration=calib):
        assert not torch.equal(run(pipe), plain)
    assert torch.equal(run(pipe), base)
    assert all(not hooks_of(m) for m in pipe.unet.modules())


def test_guidance_off_does_nothing(pipe, calib):
    meta = dict(calib.meta, generation={k: v for k, v in calib.meta["generation"].items() if k != "guidance"})
    loose = Calibration(meta, calib.tensors)  # no recorded scale: the per-call guidance check does not apply
    outs = []
    for t in (accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg"), cfg_d()):
        with accel.apply(pipe, t, calibration=loose):
            outs.append(run(pipe, guidance=1.0))
    assert torch.equal(outs[0], outs[1])


def test_bad_settings_are_refused(pipe):
    with pytest.raises(InputError, match="'-cfg' forecast"):
        accel.FeatureCache(schedule="calibrated", forecast="taylor1", difference="calibrated")
    with pytest.raises(InputError, match="'-cfg' forecast"):
        accel.FeatureCache(schedule="calibrated", difference="calibrated")
    with pytest.raises(InputError, match="schedule='calibrated'"):
        accel.FeatureCache(interval=3, forecast="taylor1-cfg", difference="calibrated")
    with pytest.raises(InputError, match="schedule='calibrated'"):
        accel.FeatureCache(schedule="adaptive", budget=3, forecast="taylor1-cfg", difference="calibrated")
    with pytest.raises(InputError, match="difference 'yes'"):
        accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg", difference="yes")
    with pytest.raises(InputError, match="guidance halves"):
        cfg_d(correction="dec-mean")
    recipe = accel.Recipe("d", [cfg_d()])
    with pytest.raises(InputError, match="guidance > 1"):
        calibrate(pipe, recipe, PROMPTS, steps=STEPS, budget=BUDGET, guidance=1.0, progress=False)
    with pytest.raises(InputError, match="--difference-prompts 5"):
        calibrate(pipe, recipe, PROMPTS, steps=STEPS, budget=BUDGET, difference_prompts=5, progress=False)


def test_a_calibration_without_the_model_names_the_fix(pipe):
    calib = calibrate(pipe, accel.Recipe("c", [accel.FeatureCache(schedule="calibrated", forecast="taylor1-cfg")]),
                      PROMPTS[:2], steps=STEPS, budget=BUDGET, batch_size=2, progress=False, refine_evals=2)
    with pytest.raises(CalibrationError, match="difference='calibrated'.*--budget 3"):
        accel.apply(pipe, cfg_d(), calibration=calib)


def test_composes_with_w8a8(pipe):
    """[Quantize, FeatureCache(difference)]: the scales first, the schedule and the difference model fit with the
    quantized model running (the records are of the model that will run)."""
    recipe = accel.Recipe("qd", [accel.Quantize(mode="static"), cfg_d()])
    cal = calibrate(pipe, recipe, PROMPTS[:2], steps=STEPS, budget=BUDGET, batch_size=2, progress=False, refine_evals=2)
    assert cal.meta["cache"]["refined"]["taylor1-cfg.3"]["quantized"] and "difference" in cal.meta["cache"]
    w = cal.cache(0).dscale(forecast="taylor1-cfg")
    float_cal = calibrate(pipe, accel.Recipe("d", [cfg_d()]), PROMPTS[:2], steps=STEPS, budget=BUDGET, batch_size=2,
                          progress=False, refine_evals=2)
    if float_cal.cache(0).full_calls(STEPS, BUDGET, "taylor1-cfg") == cal.cache(0).full_calls(STEPS, BUDGET, "taylor1-cfg"):
        assert not torch.equal(float_cal.cache(0).dscale(forecast="taylor1-cfg"), w)  # fit on the quantized model
    base = run(pipe)
    with accel.apply(pipe, recipe, calibration=cal) as h:
        assert [type(t).__name__ for t in h.transforms] == ["Quantize", "FeatureCache"]
        assert torch.isfinite(run(pipe)).all() and h.stats()["full"] == BUDGET
    assert torch.equal(run(pipe), base)


def test_recipe_and_curves_bench_mode():
    """Recipe cache-forecast-cfg-d is cache-forecast-cfg with the difference model; the curves bench runs it beside
    'refined + taylor1-cfg' from one calibration (the schedule is refined without the model: the same key)."""
    from accel.bench import curves

    recipe = accel.recipe.load("cache-forecast-cfg-d")
    assert [t.to_dict() for t in recipe.transforms] == [cfg_d().to_dict()]
    assert "cache-forecast-cfg-d" in accel.recipe.available()
    mode = dict(curves.modes(7, 3))["refined + taylor1-cfg + difference"]
    assert (mode.schedule, mode.forecast, mode.difference, mode.budget) == ("calibrated", "taylor1-cfg", "calibrated", 7)
    assert "refined + taylor1-cfg + difference" in curves.CALIBRATED
    assert any(t.difference == "calibrated" for t in curves.calibrations())


def test_cli_difference_prompts(tmp_path, capsys):
    """`accel calibrate --difference-prompts N` more than the prompts: a one-line error before the model loads."""
    from accel.cli import main

    code = main(["calibrate", "--recipe", "cache-forecast-cfg-d", "--num-prompts", "4", "--difference-prompts", "8",
                 "--out", str(tmp_path / "c")])
    assert code == 2 and "--difference-prompts 8" in capsys.readouterr().err and not (tmp_path / "c").exists()
