"""FeatureCache on real diffusers pipelines (tiny random-weight configs built offline)."""
import pytest
import torch

import accel
from accel.errors import RecipeError, TransformConflictError, UnsupportedModelError

from conftest import SCHEDULERS, CallCounter, make_pipe, pipe_inputs

KINDS = ["sd", "img2img", "inpaint", "controlnet", "sdxl"]


def run(pipe, kind, **kw):
    return pipe(**pipe_inputs(kind, **kw)).images


def snapshot(unet):
    """Everything that must be back after remove(): instance attributes of every module, parameters."""
    return ({n: sorted(m.__dict__) for n, m in unet.named_modules()},
            {k: v.clone() for k, v in unet.state_dict().items()})


def deep_probe(unet):
    """A module that only runs on full calls, whatever the branch: the mid block's first resnet."""
    return CallCounter(unet.mid_block.resnets[0])


@pytest.mark.parametrize("kind", KINDS)
def test_cache_runs_the_schedule_and_remove_restores(kind, tokenizer_dir):
    pipe = make_pipe(kind, tokenizer_dir)
    base = run(pipe, kind)
    before = snapshot(pipe.unet)
    total = CallCounter(pipe.unet)
    handle = accel.apply(pipe, accel.FeatureCache(interval=3, branch=0))
    probe = deep_probe(pipe.unet)
    out = run(pipe, kind)
    calls = total.n - 0
    probe.close()
    assert torch.isfinite(out).all()
    assert calls == handle.clock.step + 1 == handle.clock.total  # the clock counted every UNet call
    assert probe.n == len(range(0, calls, 3))  # deep modules ran on full calls only
    assert not torch.equal(out, base)
    handle.remove()
    total.close()
    after = snapshot(pipe.unet)
    assert after[0] == before[0]
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert torch.equal(run(pipe, kind), base)


@pytest.mark.parametrize("kind", KINDS)
def test_interval_one_is_exactly_the_baseline(kind, tokenizer_dir):
    pipe = make_pipe(kind, tokenizer_dir)
    base = run(pipe, kind)
    with accel.apply(pipe, accel.FeatureCache(interval=1)):
        assert torch.equal(run(pipe, kind), base)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_clock_counts_unet_calls_for_every_scheduler(scheduler, tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler=scheduler)
    counter = CallCounter(pipe.unet)
    handle = accel.apply(pipe, accel.FeatureCache(interval=2, branch=1))
    probe = deep_probe(pipe.unet)
    for _ in range(2):  # a second call starts counting anew
        counter.n = probe.n = 0
        out = run(pipe, "sd", steps=6)
        assert torch.isfinite(out).all()
        assert counter.n == handle.clock.step + 1 == handle.clock.total
        assert probe.n == len(range(0, counter.n, 2))
    if scheduler == "HeunDiscreteScheduler":
        assert counter.n == 2 * 6 - 1
    handle.remove()


def test_img2img_strength_means_fewer_calls(tokenizer_dir):
    pipe = make_pipe("img2img", tokenizer_dir, scheduler="DDIMScheduler")
    handle = accel.apply(pipe, accel.FeatureCache(interval=2))
    run(pipe, "img2img", steps=10)  # strength 0.6 -> 6 calls
    assert handle.clock.total == handle.clock.step + 1 == 6
    handle.remove()


@pytest.mark.parametrize("branch", [0, 1, 2, 4, 8, 11])
def test_equals_deepcache_at_equal_settings(branch, tokenizer_dir):
    from DeepCache import DeepCacheSDHelper

    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    with accel.apply(pipe, accel.FeatureCache(interval=3, branch=branch)):
        ours = run(pipe, "sd")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = run(pipe, "sd")
    finally:
        helper.disable()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_batch_and_guidance_off(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    for guidance in (1.0, 7.5):
        single = [run(pipe, "sd", batch=1, guidance=guidance, seed=s) for s in (0,)]
        with accel.apply(pipe, accel.FeatureCache(interval=2)) as h:
            b = run(pipe, "sd", batch=3, guidance=guidance)
            assert b.shape[0] == 3 and torch.isfinite(b).all()
            assert h.clock.batch_shape[0] == (3 if guidance == 1.0 else 6)
        assert single[0].shape[0] == 1


def test_two_pipelines_share_no_state(tokenizer_dir):
    a, b = make_pipe("sd", tokenizer_dir, seed=0), make_pipe("sd", tokenizer_dir, seed=1)
    ha = accel.apply(a, accel.FeatureCache(interval=2))
    hb = accel.apply(b, accel.FeatureCache(interval=4, branch=2))
    ra1, rb1 = run(a, "sd"), run(b, "sd")
    rb2, ra2 = run(b, "sd"), run(a, "sd")  # interleaved, repeated
    assert torch.equal(ra1, ra2) and torch.equal(rb1, rb2)
    ha.remove()
    assert torch.equal(run(b, "sd"), rb1)
    hb.remove()


def test_one_config_applied_to_two_pipelines(tokenizer_dir):
    """The same FeatureCache object applied to two pipelines: each handle owns the state of what it attached (the
    config is not changed by attaching it), counts only its own calls, and each remove() restores its model
    exactly, in either order (the state lived on the shared object: the second remove() left 16 hooks behind)."""
    a, b = make_pipe("sd", tokenizer_dir, seed=0), make_pipe("sd", tokenizer_dir, seed=1)
    base_a, base_b, before_a = run(a, "sd"), run(b, "sd"), snapshot(a.unet)
    fc = accel.FeatureCache(interval=3)
    config = dict(vars(fc))
    ha, hb = accel.apply(a, fc), accel.apply(b, fc)
    assert ha.transforms[0] is fc and hb.transforms[0] is fc
    assert ha.applied(accel.FeatureCache) is not hb.applied(accel.FeatureCache)
    ra, rb = run(a, "sd"), run(b, "sd")
    assert torch.equal(run(a, "sd"), ra) and not torch.equal(ra, base_a)
    assert ha.stats()["pipeline_calls"] == 2 and hb.stats()["pipeline_calls"] == 1
    hb.remove()
    assert torch.equal(run(a, "sd"), ra) and torch.equal(run(b, "sd"), base_b)
    ha.remove()
    assert not [n for p in (a, b) for n, m in p.unet.named_modules() if hasattr(m, "_diffusers_hook")]
    after = snapshot(a.unet)
    assert after[0] == before_a[0] and torch.equal(run(a, "sd"), base_a)
    assert vars(fc) == config  # run-time state lived in the handles' Applied objects, not on the config


def test_attaching_never_changes_a_config(tokenizer_dir):
    """Every transform keeps what it holds for one model in the handle's Applied object: its config is the same
    before apply, while it runs and after remove (so one config serves several pipelines, and a recipe that was
    applied saves as it was written)."""
    import copy

    pipe = make_pipe("sd", tokenizer_dir)
    configs = [accel.ScaleLong(kind="cs", kappa=0.9), accel.Quantize(mode="dynamic", exclude=["conv_in"]),
               accel.Inherit(targets="mid_block", every=2), accel.FeatureCache(interval=3, forecast="taylor1")]
    before = [copy.deepcopy(vars(t)) for t in configs]
    h = accel.apply(pipe, configs)
    run(pipe, "sd")
    assert [vars(t) for t in configs] == before
    assert {type(h.applied(type(t)).transform) for t in configs} == {type(t) for t in configs}
    assert h.applied("Quantize").layer("down_blocks.0.resnets.0.conv1") is not None
    h.remove()
    assert [vars(t) for t in configs] == before and [t.to_dict() for t in h.recipe().transforms] == \
        [t.to_dict() for t in sorted(configs, key=lambda t: t.order)]
    with pytest.raises(KeyError, match="no ScaleLong attached"):
        accel.apply(pipe, accel.FeatureCache(interval=2)).applied(accel.ScaleLong)


def test_schedule_variants(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    counter = deep_probe(pipe.unet)
    for fc, expected in [(accel.FeatureCache(schedule=[0, 1, 5]), 3),
                         (accel.FeatureCache(schedule="quadratic", interval=3), 4)]:
        counter.n = 0
        with accel.apply(pipe, fc):
            run(pipe, "sd", steps=10)
        assert counter.n == expected
    with accel.apply(pipe, accel.FeatureCache(schedule=[0, 20])):
        with pytest.raises(ValueError, match="UNet calls"):
            run(pipe, "sd", steps=10)


def test_bad_input(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    with pytest.raises(ValueError):
        accel.FeatureCache()
    with pytest.raises(ValueError):
        accel.FeatureCache(interval=0)
    with pytest.raises(ValueError, match="call 0"):
        accel.FeatureCache(schedule=[2, 4])
    with pytest.raises(ValueError, match="out of range"):
        accel.apply(pipe, accel.FeatureCache(interval=2, branch=99))
    assert not hasattr(pipe.unet, "_diffusers_hook")  # a failed apply leaves nothing behind
    with pytest.raises(UnsupportedModelError, match="needs the pipeline"):
        accel.apply(pipe.unet, accel.FeatureCache(interval=2))
    with pytest.raises(UnsupportedModelError, match="Supported"):
        accel.apply(object(), accel.FeatureCache(interval=2))
    h = accel.apply(pipe, accel.FeatureCache(interval=2))
    with pytest.raises(TransformConflictError):
        accel.apply(pipe, accel.FeatureCache(interval=3))
    with pytest.raises(TransformConflictError):
        accel.apply(make_pipe("sd", tokenizer_dir), [accel.FeatureCache(interval=3), accel.FeatureCache(interval=2)])
    h.remove()
    h.remove()  # idempotent


def test_dit_pipeline_is_refused_clearly():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    pipe = DiTPipeline(transformer=dit, vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=4),
                       scheduler=DDIMScheduler())
    with pytest.raises(UnsupportedModelError, match="transformer.*Supported: StableDiffusion"):
        accel.apply(pipe, "deepcache-i3")


def test_recipes(tmp_path, tokenizer_dir):
    from accel import recipe

    assert {"deepcache-i3", "deepcache-i5"} <= set(recipe.available())
    r = recipe.load("deepcache-i3")
    assert r.transforms[0].interval == 3 and r.transforms[0].branch == 0
    assert recipe.parse(r.to_toml()).transforms[0] == r.transforms[0]
    bad = {
        "nope = 1\n[[transform]]\ntype='FeatureCache'\ninterval=2": "unknown key",
        "[[transform]]\ntype='Nope'": "unknown transform type",
        "[[transform]]\ntype='FeatureCache'\ninterval=2\nspeed=9": "unknown parameter",
        "[[transform]]\ntype='FeatureCache'\ninterval=-1": "interval",
        "name = 'x'": "at least one",
        "[[transform": "not valid TOML",
        "version = 7\n[[transform]]\ntype='FeatureCache'\ninterval=2": "version",
    }
    for text, msg in bad.items():
        with pytest.raises(RecipeError, match=msg):
            recipe.parse(text)
    with pytest.raises(RecipeError, match="available"):
        recipe.load("no-such-recipe")
    p = tmp_path / "mine.toml"
    p.write_text(r.to_toml())
    pipe = make_pipe("sd", tokenizer_dir)
    with accel.apply(pipe, str(p)) as h:
        assert h.recipe_name == "deepcache-i3"


def test_accelerated_pipeline_roundtrip(tmp_path, tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir)
    base = run(pipe, "sd")
    pipe.save_pretrained(tmp_path / "plain")
    apipe = accel.AcceleratedPipeline.from_pretrained(tmp_path / "plain", recipe="deepcache-i3")
    out = apipe(**pipe_inputs("sd")).images
    with accel.apply(pipe, "deepcache-i3"):
        assert torch.equal(out, run(pipe, "sd"))
    apipe.save_pretrained(tmp_path / "acc")
    assert (tmp_path / "acc" / "accel_recipe.toml").is_file()
    again = accel.AcceleratedPipeline.from_pretrained(tmp_path / "acc")
    assert again.handle.recipe_name == "deepcache-i3"
    assert torch.equal(again(**pipe_inputs("sd")).images, out)
    plain = again.remove()
    assert torch.equal(plain(**pipe_inputs("sd")).images, base)
    assert again.scheduler is plain.scheduler  # attribute access falls through to the pipeline


def test_interrupted_call_does_not_leak_state(tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    h = accel.apply(pipe, accel.FeatureCache(interval=3))
    ref = run(pipe, "sd")

    def stop(p, i, t, kw):
        if i == 4:
            raise KeyboardInterrupt
        return kw

    with pytest.raises(KeyboardInterrupt):
        pipe(**pipe_inputs("sd"), callback_on_step_end=stop)
    assert torch.equal(run(pipe, "sd"), ref)
    h.remove()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(interval=3), dict(schedule=[0, 2, 3, 5], forecast="taylor2"),
                                dict(schedule="adaptive", threshold=0.25, forecast="taylor1")],
                         ids=["reuse", "forecast", "adaptive"])
def test_torch_compile_after_apply(kw, tokenizer_dir):
    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    h = accel.apply(pipe, accel.FeatureCache(**kw))
    eager = run(pipe, "sd", steps=6)
    pipe.unet = torch.compile(pipe.unet)
    compiled = run(pipe, "sd", steps=6)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    pipe.unet = pipe.unet._orig_mod
    h.remove()
