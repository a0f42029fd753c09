"""Calibration: DEC closed form, the artifact's checks, calibrated schedules on a real pipeline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import accel
from accel.calibrate import _batch_stats, calibrate
from accel.calibration import Calibration
from accel.errors import CalibrationError
from accel.transforms.dec import Moments, coefficients

from conftest import make_pipe, pipe_inputs

PROMPTS = ["a large red circle on the left, black background", "a small blue square at the top, white background",
           "a large green cross in the center, gray background"]


def test_dec_is_per_channel_least_squares():
    g = torch.Generator().manual_seed(0)
    n, b, c, h, w = 5, 3, 4, 6, 6
    feats = [torch.randn(b, c, h, w, generator=g)]
    for _ in range(n - 1):
        feats.append(0.7 * feats[-1] + 0.3 * torch.randn(b, c, h, w, generator=g) + 0.1)
    st = _batch_stats(feats)
    cnt = st["count"]
    m = Moments(st["sum"] / cnt, st["sumsq"] / cnt, st["cross"] / cnt)
    full = [0, 3]
    a, b_ = coefficients(m, full)
    for t, j in [(1, 0), (2, 0), (4, 3)]:
        for ch in range(c):
            x = feats[j][:, ch].reshape(-1).double().numpy()
            y = feats[t][:, ch].reshape(-1).double().numpy()
            slope, icpt = np.polyfit(x, y, 1)
            assert a[t, ch].item() == pytest.approx(slope, rel=1e-6)
            assert b_[t, ch].item() == pytest.approx(icpt, rel=1e-6, abs=1e-9)
    assert torch.equal(a[full], torch.ones(2, c, dtype=torch.float64)) and (b_[full] == 0).all()
    d = st["dist"]
    assert d[1, 0].item() == pytest.approx((feats[1] - feats[0]).abs().sum().item(), rel=1e-6)
    # the mean-only variant: unit gain, the per-channel mean shift from the kept call
    a, b_ = coefficients(m, full, gain=False)
    assert torch.equal(a, torch.ones_like(a))
    for t, j in [(1, 0), (2, 0), (4, 3)]:
        shift = (feats[t] - feats[j]).double().mean(dim=(0, 2, 3))
        torch.testing.assert_close(b_[t], shift, rtol=1e-6, atol=1e-8)  # float32 features, float64 sums


@pytest.fixture(scope="module")
def calibrated(tokenizer_dir, tmp_path_factory):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    calib = calibrate(pipe, "cachequant-dp", PROMPTS, steps=12, budget=4, batch_size=2, progress=False)
    path = tmp_path_factory.mktemp("calib") / "c"
    calib.save(path)
    return pipe, path


def test_artifact_contents(calibrated):
    pipe, path = calibrated
    assert sorted(os.listdir(path)) == ["accel.json", "calibration.safetensors"]
    meta = json.loads((path / "accel.json").read_text())
    assert meta["scheduler"] == {"class": "DDIMScheduler", "steps": 12, "unet_calls": 12}
    assert meta["cache"]["budget"] == 4 and meta["cache"]["schedule"][0] == 0 and len(meta["cache"]["schedule"]) == 4
    assert meta["recipe"]["name"] == "cachequant-dp" and meta["versions"]["diffusers"]
    assert meta["prompts"]["count"] == 3
    c = Calibration.load(path, unet=pipe.unet, pipe=pipe)
    assert c.cache(0).full_calls(12) == meta["cache"]["schedule"]
    assert c.cache(0).dp_calls(4) == meta["cache"]["dp_schedule"]
    assert len(c.cache(0).full_calls(12, budget=6)) == 6  # one calibration serves every budget
    assert c.cache(0).full_calls(12, budget=6) == c.cache(0).dp_calls(6)  # not refined: the DP's
    r = meta["cache"]["refined"]["4"]
    assert c.cache(0).refined_budgets() == [4] and r["dp"] == meta["cache"]["dp_schedule"] and r["prompts"] == 3
    assert r["error_db"] <= r["dp_error_db"] and r["evals"] >= 1


def _latent_error_db(pipe, transform, path, steps=12):
    """The refinement's objective, recomputed here from scratch on the calibration prompts and seeds."""
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="latent")
    base = pipe(PROMPTS, generator=gens(), **kw).images.double()
    with accel.apply(pipe, transform, calibration=path):
        lat = pipe(PROMPTS, generator=gens(), **kw).images.double()
    return (10 * torch.log10(((lat - base) ** 2).flatten(1).mean(1))).mean().item()


def test_refined_schedule_lowers_the_measured_final_error(calibrated):
    pipe, path = calibrated
    meta = json.loads((path / "accel.json").read_text())
    r = meta["cache"]["refined"]["4"]
    refined = _latent_error_db(pipe, accel.FeatureCache(schedule="calibrated", correction="dec-mean"), path)
    dp = _latent_error_db(pipe, accel.FeatureCache(schedule="dp", correction="dec-mean"), path)  # cachequant-dp's
    assert refined == pytest.approx(r["error_db"], abs=1e-3) and dp == pytest.approx(r["dp_error_db"], abs=1e-3)
    assert refined <= dp
    with pytest.raises(ValueError, match="goes with schedule"):
        accel.FeatureCache(interval=2, budget=3)


def test_several_budgets_and_no_refinement(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    calib = calibrate(pipe, "cachequant-dp", PROMPTS[:2], steps=10, budget=[3, 5], batch_size=2, progress=False,
                      refine_evals=6)
    c = calib.cache(0)
    assert c.budget == 3 and c.refined_budgets() == [3, 5]
    assert all(calib.meta["cache"]["refined"][k]["evals"] <= 12 for k in ("3", "5"))
    assert len(c.full_calls(10, 5)) == 5 and calib.meta["cache"]["schedule"] == c.full_calls(10)
    plain = calibrate(pipe, "cachequant-dp", PROMPTS[:2], steps=10, budget=3, batch_size=2, progress=False,
                      refine=False)
    assert "refined" not in plain.meta["cache"] and plain.cache(0).full_calls(10) == plain.cache(0).dp_calls(3)
    assert plain.meta["cache"]["schedule"] == calib.meta["cache"]["dp_schedule"]  # same statistics, same DP
    with pytest.raises(ValueError, match="budget"):
        calibrate(pipe, "cachequant-dp", PROMPTS[:2], steps=10, budget=[3, 11], batch_size=2, progress=False)


def test_a_larger_budget_that_refines_worse_than_a_smaller_one_restarts_from_it(calibrated, monkeypatch):
    """refine_schedule's third start: only when both searches end worse than the smaller budget's schedule (its error
    on the same prompts), from that schedule extended to this budget; the best of the searches is kept."""
    from accel import calibrate as cal_mod
    from accel import schedules

    pipe, path = calibrated
    c = Calibration.load(path)
    starts, real = [], schedules.refine
    monkeypatch.setattr(cal_mod.schedules, "refine", lambda s, *a, **k: starts.append(list(s)) or real(s, *a, **k))
    fc = accel.FeatureCache(schedule="calibrated")
    kw = dict(steps=12, seed=0, guidance=7.5, max_evals=4, progress=False)
    dp = c.cache(0).dp_calls(5)
    r = cal_mod.refine_schedule(pipe, fc, c, dp, PROMPTS[:2], smaller=([0, 6, 9], float("inf")), **kw)
    assert len(starts) == 2 and r["from"] in ("dp", "uniform")  # better than the smaller budget: as before
    starts.clear()
    r = cal_mod.refine_schedule(pipe, fc, c, dp, PROMPTS[:2], smaller=([0, 6, 9], -1e9), **kw)
    assert len(starts) == 3 and starts[2] == schedules.extend([0, 6, 9], 5, 12) == [0, 3, 6, 9, 10]
    assert r["from"] in ("dp", "uniform", "smaller") and len(r["schedule"]) == 5 and r["evals"] <= 12


def test_calibrated_schedule_and_dec_run(calibrated):
    pipe, path = calibrated
    kw = dict(steps=12)
    base = pipe(**pipe_inputs("sd", **kw)).images
    errs = {}
    for name, t in {"uniform": accel.FeatureCache(interval=3),
                    "dp": accel.FeatureCache(schedule="calibrated"),
                    "uniform+dec": accel.FeatureCache(interval=3, correction="dec"),
                    "uniform+dec-mean": accel.FeatureCache(interval=3, correction="dec-mean")}.items():
        with accel.apply(pipe, t, calibration=path):
            out = pipe(**pipe_inputs("sd", **kw)).images
        errs[name] = ((out - base) ** 2).mean().item()
        assert torch.isfinite(out).all()
    assert errs["uniform+dec"] < errs["uniform"]  # DEC removes part of the cache error
    with accel.apply(pipe, "cachequant-dp", calibration=path):
        assert torch.isfinite(pipe(**pipe_inputs("sd", **kw)).images).all()


def test_step_count_mismatch_is_a_clear_error(calibrated):
    pipe, path = calibrated
    with accel.apply(pipe, "cachequant-dp", calibration=path):
        with pytest.raises(CalibrationError, match="made for 12 UNet calls.*makes 20"):
            pipe(**pipe_inputs("sd", steps=20))


def test_other_model_and_scheduler_are_refused(calibrated, tokenizer_dir):
    pipe, path = calibrated
    other = make_pipe("sd", tokenizer_dir, seed=5, scheduler="DDIMScheduler")
    with pytest.raises(CalibrationError, match="another model"):
        accel.apply(other, "cachequant-dp", calibration=path)
    assert not hasattr(other.unet, "_diffusers_hook")
    euler = make_pipe("sd", tokenizer_dir, scheduler="EulerDiscreteScheduler")  # same weights (seed 0)
    with pytest.raises(CalibrationError, match="DDIMScheduler"):
        accel.apply(euler, "cachequant-dp", calibration=path)
    with pytest.raises(CalibrationError, match="needs a calibration"):
        accel.apply(pipe, "cachequant-dp")
    with pytest.raises(CalibrationError, match="branch 3"):
        accel.apply(pipe, accel.FeatureCache(schedule="calibrated", branch=3), calibration=path)


def test_corrupted_artifacts(calibrated, tmp_path):
    import shutil

    pipe, path = calibrated
    cases = {}
    t = tmp_path / "trunc"
    shutil.copytree(path, t)
    data = (t / "calibration.safetensors").read_bytes()
    (t / "calibration.safetensors").write_bytes(data[: len(data) // 2])
    cases[t] = "truncated"
    f = tmp_path / "flip"
    shutil.copytree(path, f)
    data = bytearray((f / "calibration.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (f / "calibration.safetensors").write_bytes(bytes(data))
    cases[f] = "checksum"
    j = tmp_path / "json"
    shutil.copytree(path, j)
    (j / "accel.json").write_text("{not json")
    cases[j] = "corrupted"
    cases[tmp_path / "missing"] = "not a calibration folder"
    for p, msg in cases.items():
        with pytest.raises(CalibrationError, match=msg):
            Calibration.load(p)
    c = Calibration.load(path)
    key = next(k for k in c.tensors if k.endswith(".mean"))
    c.tensors[key] = c.tensors[key].clone()
    c.tensors[key][0, 0] = float("nan")
    c.save(tmp_path / "nan")  # a consistent file with a NaN in it
    with pytest.raises(CalibrationError, match="NaN"):
        Calibration.load(tmp_path / "nan")


def test_save_is_atomic(calibrated, tmp_path, monkeypatch):
    import safetensors.torch

    pipe, path = calibrated
    c = Calibration.load(path)
    dest = tmp_path / "dest"
    c.save(dest)
    before = (dest / "calibration.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        c.save(dest)
    assert (dest / "calibration.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no temporary left behind


def test_no_pickle_anywhere(calibrated):
    _, path = calibrated
    for f in path.iterdir():
        assert f.read_bytes()[:2] != b"\x80\x04"  # a pickle protocol header


@pytest.mark.slow
def test_two_process_calibration_equals_one_process(tokenizer_dir, tmp_path):
    from safetensors.torch import load_file

    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS + PROMPTS[:1]))
    common = ["calibrate", str(tmp_path / "model"), "--steps", "8", "--budget", "3", "4", "--batch-size", "1",
              "--prompts", str(tmp_path / "prompts.txt")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "accel", *common, "--out", str(tmp_path / "one")], check=True, env=env)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29517", "-m", "accel"]
    subprocess.run([*launcher, *common, "--out", str(tmp_path / "two")], check=True, env=env)
    a, b = load_file(tmp_path / "one" / "calibration.safetensors"), load_file(tmp_path / "two" / "calibration.safetensors")
    assert a.keys() == b.keys() and {"cache.b0.refined.3", "cache.b0.refined.4"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refine_prompts_default_and_bounds(tokenizer_dir, monkeypatch):
    """refine_prompts: by default 8, or every prompt when fewer are given; more than were given is refused before
    the pipeline runs (it used to refine on fewer than asked for, silently)."""
    import accel.calibrate as cal

    class Ran(Exception):
        pass

    def stop(*a, **k):
        raise Ran

    pipe = make_pipe("sd", tokenizer_dir)
    monkeypatch.setattr(cal, "collect_features", stop)
    seen = []
    real = cal._check_inputs
    monkeypatch.setattr(cal, "_check_inputs", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    for prompts, asked in ((["a", "b"], None), (list("abcdefghij"), None), (list("abcdef"), 6)):
        with pytest.raises(Ran):
            cal.calibrate(pipe, "cachequant-dp", prompts, steps=10, budget=4, refine_prompts=asked)
    assert seen == [2, 8, 6]
    with pytest.raises(ValueError, match="--refine-prompts 7 is more than the 6 calibration prompts"):
        cal.calibrate(pipe, "cachequant-dp", list("abcdef"), steps=10, budget=4, refine_prompts=7)
    from accel.errors import AccelWarning

    with pytest.raises(Ran), pytest.warns(AccelWarning, match="--refine-prompts is ignored"):
        # without refinement the number is not used: said, not refused
        cal.calibrate(pipe, "cachequant-dp", list("abcdef"), steps=10, budget=4, refine_prompts=7, refine=False)
