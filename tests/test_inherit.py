"""A-SDM feature inheritance on real diffusers pipelines."""
import pytest
import torch

import accel
from accel.transforms.inherit import candidates

from conftest import CallCounter, make_pipe, pipe_inputs


def run(pipe, kind="sd", **kw):
    return pipe(**pipe_inputs(kind, **kw)).images


@pytest.mark.parametrize("granularity,target,probe", [
    ("block", "mid_block", "mid_block.resnets.0"),
    ("layer", "up_blocks.1.attentions.*", "up_blocks.1.attentions.0.proj_in"),
    ("unit", "*.attn2", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"),
])
@pytest.mark.parametrize("residual", [False, True])
def test_inherit_skips_at_the_chosen_calls(granularity, target, probe, residual, tokenizer_dir):
    if residual and granularity == "unit":
        with pytest.raises(ValueError, match="already is a residual branch"):
            accel.Inherit(targets=target, granularity=granularity, every=2, residual=True)
        return
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    base = run(pipe, steps=8)
    counter = CallCounter(pipe.unet.get_submodule(probe))
    h = accel.apply(pipe, accel.Inherit(targets=target, granularity=granularity, every=2, residual=residual))
    out = run(pipe, steps=8)
    assert counter.n == 4  # calls 0, 2, 4, 6 run; 1, 3, 5, 7 inherit
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    h.remove()
    counter.close()
    assert torch.equal(run(pipe, steps=8), base)


def test_modes(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    counter = CallCounter(pipe.unet.mid_block.resnets[0])
    for t, ran in [(accel.Inherit(window=(2, 6)), 4), (accel.Inherit(steps=[0, 1, 7]), 6),
                   (accel.Inherit(every=3), 3)]:
        counter.n = 0
        with accel.apply(pipe, t):
            run(pipe, steps=8)
        assert counter.n == ran, t


def test_composes_with_cache_and_quantize(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    base = run(pipe, steps=8)
    stack = [accel.Quantize(), accel.Inherit(targets="*.attn2", granularity="unit", every=2),
             accel.FeatureCache(interval=2, branch=3)]
    with accel.apply(pipe, stack) as h:
        assert [type(t).__name__ for t in h.transforms] == ["Quantize", "Inherit", "FeatureCache"]
        out = run(pipe, steps=8)
        assert torch.isfinite(out).all()
    assert torch.equal(run(pipe, steps=8), base)


def test_bad_input(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    with pytest.raises(ValueError, match="match no block"):
        accel.apply(pipe, accel.Inherit(targets="nothing.*", every=2))
    with pytest.raises(ValueError, match="exactly one"):
        accel.Inherit(every=2, window=(1, 3))
    with pytest.raises(ValueError, match="granularity"):
        accel.Inherit(granularity="pixel", every=2)
    with pytest.raises(ValueError):
        accel.Inherit(every=1)
    assert "mid_block" in candidates(pipe.unet, "block")
    assert any(p.endswith("attn1") for p in candidates(pipe.unet, "unit"))


def test_sdxl_and_controlnet(tokenizer_dir):
    for kind in ("sdxl", "controlnet"):
        pipe = make_pipe(kind, tokenizer_dir, scheduler="DDIMScheduler")
        with accel.apply(pipe, accel.Inherit(targets=["mid_block", "up_blocks.0"], every=2)):
            assert torch.isfinite(pipe(**pipe_inputs(kind, steps=6)).images).all()


def test_calibrated_schedule_runs_where_the_outputs_change_most(tokenizer_dir, tmp_path):
    """schedule='calibrated': the targets run at the DP schedule of their own output distances, measured here
    independently (plain torch hooks on a plain run) and compared with what accel calibrate stored and applies."""
    from accel import schedules
    from accel.calibrate import calibrate
    from accel.calibration import Calibration
    from accel.errors import CalibrationError

    prompts = ["a large red circle on the left, black background", "a small blue square at the top, white background"]
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    targets = ["mid_block", "up_blocks.0"]
    recipe = accel.Recipe(name="asdm-cal", transforms=[accel.Inherit(targets=targets, schedule="calibrated")])
    calib = calibrate(pipe, recipe, prompts, steps=12, budget=4, batch_size=2, progress=False)
    calib.save(tmp_path / "cal")
    calib = Calibration.load(tmp_path / "cal", unet=pipe.unet, pipe=pipe)
    # independent measurement: every target's outputs per call, same prompts and seeds
    feats = {t: [] for t in targets}
    hs = [pipe.unet.get_submodule(t).register_forward_hook(
        lambda m, a, o, t=t: feats[t].append((o[0] if isinstance(o, tuple) else o).detach().reshape(-1)))
        for t in targets]
    with torch.no_grad():
        pipe(prompts, num_inference_steps=12, guidance_scale=7.5, output_type="latent",
             generator=[torch.Generator().manual_seed(i) for i in range(2)])
    for h in hs:
        h.remove()
    D = 0
    for t in targets:
        F = torch.stack(feats[t]).double()
        Dt = torch.cdist(F[None], F[None], p=1)[0].numpy()
        D = D + Dt / Dt.mean()
    lo, hi = schedules.paper_bounds(12, 4)
    expect = schedules.dp_schedule(schedules.group_cost(D=D), 4, lo, hi)[0]
    assert calib.meta["inherit"]["schedule"] == expect and len(expect) == 4
    # applied: the mid block runs exactly at those calls, for the calibrated budget and for another one
    calls, ran = [], []
    hu = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(True))
    h = pipe.unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: ran.append(len(calls) - 1))
    for budget, want in [(None, expect), (6, None)]:
        calls.clear(), ran.clear()
        with accel.apply(pipe, accel.Inherit(targets=targets, schedule="calibrated", budget=budget), calibration=calib):
            run(pipe, steps=12)
        assert ran == (want or calib.inherit_schedule(targets, 12, budget=6))
    assert len(ran) == 6
    h.remove(), hu.remove()
    with pytest.raises(CalibrationError, match="12 UNet calls"):
        with accel.apply(pipe, accel.Inherit(targets=targets, schedule="calibrated"), calibration=calib):
            run(pipe, steps=10)
    with pytest.raises(CalibrationError, match="no inheritance statistics"):
        accel.apply(pipe, accel.Inherit(targets="up_blocks.1", schedule="calibrated"), calibration=calib)
    with pytest.raises(CalibrationError, match="residuals"):
        accel.apply(pipe, accel.Inherit(targets=targets, schedule="calibrated", residual=True), calibration=calib)
    with pytest.raises(ValueError, match="needs a calibration"):
        accel.apply(pipe, accel.Inherit(targets=targets, schedule="calibrated"))
    with pytest.raises(ValueError, match="budget"):
        accel.Inherit(every=2, budget=3)


def test_residual_on_a_down_block_updates_its_skip_features_too(tokenizer_dir):
    """A down block returns (hidden, skip features); inheriting its residual moves every output of the input's
    shape by the new input, so the up path does not read the skips of the previous call."""
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    block = pipe.unet.down_blocks[3]  # no downsampler: every output has the input's shape
    seen = {"x": [], "out": []}
    hs = [block.register_forward_pre_hook(lambda m, a, k: seen["x"].append((a[0] if a else k["hidden_states"]).clone()),
                                          with_kwargs=True),
          block.register_forward_hook(lambda m, a, k, o: seen["out"].append(o), with_kwargs=True)]
    with accel.apply(pipe, accel.Inherit(targets="down_blocks.3", residual=True, steps=[1])):
        run(pipe, steps=3)
    for h in hs:
        h.remove()
    (x0, x1), (o0, o1) = seen["x"][:2], seen["out"][:2]
    torch.testing.assert_close(o1[0], x1 + (o0[0] - x0))
    assert len(o1[1]) == len(o0[1]) == 2
    for r0, r1 in zip(o0[1], o1[1]):
        torch.testing.assert_close(r1, x1 + (r0 - x0))
