"""ScaleLong: the skip numbering, the coefficients, LS training, save/load, remove(), torch.compile."""
import pytest
import torch

import accel
from accel.transforms.scalelong import ScaleLong, skip_layout

from conftest import tiny_unet


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500])[:batch], ctx


def down_path_features(unet):
    """The features of the down path in the order UNet2DConditionModel.forward stacks them (skip 1 first),
    captured with plain torch forward hooks (independent of accel's numbering)."""
    mods = [unet.conv_in]
    for block in unet.down_blocks:
        layers = block.attentions if getattr(block, "attentions", None) else block.resnets  # resnet -> attn -> skip
        mods += list(layers) + list(block.downsamplers or [])
    feats = [None] * len(mods)

    def grab(j):
        def hook(module, args, out):
            feats[j] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook
    return feats, [m.register_forward_hook(grab(j)) for j, m in enumerate(mods)]


def skip_inputs(unet):
    """What each up-block resnet receives as its skip: the trailing channels of its concatenated input."""
    got = {}

    def grab(b, r, skip_channels):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input_tensor"]
            got[(b, r)] = x[:, x.shape[1] - skip_channels:].detach().clone()
        return hook
    handles = []
    for b, numbers, channels in skip_layout(unet):
        block = unet.up_blocks[b]
        for r, res in enumerate(block.resnets):  # resnet r pops the tuple from its end
            handles.append(res.register_forward_pre_hook(grab(b, r, channels[-1 - r]), with_kwargs=True))
    return got, handles


@pytest.mark.parametrize("kind", ["cs", "sqrt2", "none"])
def test_constant_scaling_multiplies_skip_i_by_s_i(kind):
    torch.manual_seed(0)
    unet = tiny_unet()
    layout = skip_layout(unet)
    assert sorted(i for _, numbers, _ in layout for i in numbers) == list(range(1, 13))  # SD's 12 long skips
    t = ScaleLong(kind=kind, kappa=0.7)
    h = accel.apply(unet, t)
    feats, fh = down_path_features(unet)
    got, sh = skip_inputs(unet)
    with torch.no_grad():
        unet(*unet_inputs(unet)[:2], encoder_hidden_states=unet_inputs(unet)[2])
    for hd in fh + sh:
        hd.remove()
    for b, numbers, _ in layout:
        for r in range(len(numbers)):
            i = numbers[-1 - r]
            expect = {"cs": 0.7 ** (i - 1), "sqrt2": 2 ** -0.5, "none": 1.0}[kind] * feats[i - 1]
            torch.testing.assert_close(got[(b, r)], expect, rtol=1e-6, atol=1e-6)
    assert t.coefficient(1) == pytest.approx({"cs": 1.0, "sqrt2": 2 ** -0.5, "none": 1.0}[kind])
    h.remove()


def test_ls_trains_saves_loads_and_removes_exactly(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    x, t, ctx = unet_inputs(unet)
    keys, config = set(unet.state_dict()), dict(unet.config)
    h = accel.apply(unet, ScaleLong(kind="ls", reduction=4, record_norms=True))
    sl = h.applied(ScaleLong)
    se_params = [n for n, _ in unet.named_parameters() if ".scalelong." in n]
    assert len(se_params) == 12 * 4 and len(sl.modules()) == 12  # fc1/fc2 weight+bias per skip
    # one optimizer step on a UNet: the LS modules get gradients and move
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    snapshot = {n: p.detach().clone() for n, p in unet.named_parameters() if ".scalelong." in n}
    unet.train()
    loss = unet(x, t, encoder_hidden_states=ctx).sample.square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if ".scalelong." in n}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("fc2.bias"))  # every skip's module learns
    opt.step()
    unet.eval()
    assert any(not torch.equal(p, snapshot[n]) for n, p in unet.named_parameters() if n in snapshot)
    assert set(sl.norms) == set(range(1, 13)) and all(v > 0 for v in sl.norms.values())
    with torch.no_grad():
        trained = unet(x, t, encoder_hidden_states=ctx).sample
    unet.save_pretrained(tmp_path / "unet")
    unet2, h2 = ScaleLong.from_pretrained(tmp_path / "unet")
    with torch.no_grad():
        loaded = unet2(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)  # same weights; float order may differ
    h2.remove()
    # remove(): no LS modules, no config key, no hooks; the non-LS weights are those the optimizer left
    h.remove()
    assert set(unet.state_dict()) == keys and dict(unet.config) == config
    assert not any(hasattr(b, "scalelong") for b in unet.up_blocks)
    assert all("_diffusers_hook" not in m.__dict__ for m in unet.modules())


def test_remove_restores_exact_outputs():
    torch.manual_seed(0)
    unet = tiny_unet()
    x, t, ctx = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        h = accel.apply(unet, ScaleLong(kind="cs", kappa=0.5))
        scaled = unet(x, t, encoder_hidden_states=ctx).sample
        h.remove()
        back = unet(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(scaled, ref)
    assert torch.equal(back, ref)


def test_composes_with_cache_on_a_pipeline(tokenizer_dir):
    from conftest import make_pipe, pipe_inputs

    pipe = make_pipe("sd", tokenizer_dir)
    h = accel.apply(pipe, [ScaleLong(kind="cs", kappa=0.9), accel.FeatureCache(interval=3, branch=0)])
    out = pipe(**pipe_inputs("sd", steps=6)).images
    assert torch.isfinite(torch.as_tensor(out)).all()
    h.remove()


def test_under_torch_compile_and_autograd():
    torch.manual_seed(0)
    unet = tiny_unet()
    x, t, ctx = unet_inputs(unet)
    h = accel.apply(unet, ScaleLong(kind="ls", reduction=4))
    eager = unet(x, t, encoder_hidden_states=ctx).sample
    compiled = torch.compile(unet, backend="aot_eager")
    out = compiled(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in unet.named_parameters() if ".scalelong." in n)
    h.remove()


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ScaleLong(kind="quadratic")
    with pytest.raises(ValueError, match="kappa"):
        ScaleLong(kind="cs", kappa=1.5)
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no ScaleLong"):
        ScaleLong.from_pretrained(tmp_path / "plain")
    with pytest.raises(accel.RecipeError):
        accel.Transform.from_dict({"type": "ScaleLong", "kind": "ls", "gamma": 2})


def test_training_recipe_takes_scalelong_and_resumes(tmp_path):
    """`python -m accel.miniature.train unet --scalelong ls` on the miniature UNet (a few batch-2 steps): the LS
    modules train, skip norms are logged, a resumed run continues, the result loads with from_pretrained."""
    import json

    from accel.miniature import train

    weights = train.REPO / "accel" / "miniature" / "weights" / "pipeline"
    args = ["unet", "--scalelong", "ls", "--out", str(tmp_path / "run"), "--set", "batch=2", "--set", "save_every=2",
            "--set", f"tokenizer='{weights / 'tokenizer'}'", "--set", f"vae='{weights / 'vae'}'"]
    train.main(args + ["--set", "steps=2"])
    train.main(args + ["--set", "steps=3"])  # resumes at step 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(r[f"skip_{i}"] > 0 for r in log for i in range(1, 13))
    unet, h = ScaleLong.from_pretrained(tmp_path / "run" / "final" / "unet")
    assert h.transforms[0].kind == "ls" and len(h.applied("ScaleLong").modules()) == 12
    h.remove()
