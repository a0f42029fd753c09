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
