"""LoRA adapters (peft, as diffusers loads them) with every transform, on the tiny real SD pipeline of conftest and
(slow) on the miniature. The LoRAs are made here: random, rank 4, on the attention projections and the resnet
convolutions, strong enough that they move the final latents far more than any transform's own error."""
import json
import warnings

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import accel
from accel import adapters
from accel.adapters import AdapterMismatchWarning
from accel.calibrate import calibrate
from accel.calibration import Calibration, fingerprint
from accel.errors import CalibrationError
from accel.transforms.quantize import QConv2d, QLinear, _QBase

from conftest import make_pipe, pipe_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:Already found a `peft_config`"),  # peft, on a second adapter
              pytest.mark.filterwarnings("ignore:Adapter .* have invalid shape")]  # peft, on lora_B.bias (lora_bias=True)

STEPS = 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
PROMPTS = ["a red circle", "a blue square"]
CALIBRATED = ["cachequant-dp", "cachequant-w8a8", "asdm-calibrated"]
RECIPES = ["deepcache-i3", "deepcache-i5", "cachequant-dp", "cachequant-w8a8", "w8a8", "asdm-block-mid",
           "asdm-unit-attn2", "asdm-calibrated"]


def fresh(tokenizer_dir):
    return make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")


def run(pipe, steps=STEPS):
    return pipe(**pipe_inputs("sd", steps=steps)).images


def mse(a, b):
    return ((a - b) ** 2).mean().item()


def lora_config(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 4, "target_modules": TARGETS, "init_lora_weights": False, **kw})


def make_lora(tokenizer_dir, seed, **kw) -> dict:
    """A LoRA's state dict (peft names, as ``save_lora_weights`` takes it): random A and B (not the usual zero B)."""
    pipe = fresh(tokenizer_dir)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(lora_config(**kw), "made")
    return {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="made").items()}


@pytest.fixture(scope="module")
def loras(tokenizer_dir, tmp_path_factory):
    """``style``: a LoRA folder written by ``save_lora_weights``; ``toon``: a state dict (``load_lora_weights(dict)``)."""
    import diffusers

    d = tmp_path_factory.mktemp("lora") / "style"
    diffusers.StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=make_lora(tokenizer_dir, 1))
    return {"style": d, "toon": {f"unet.{k}": v for k, v in make_lora(tokenizer_dir, 2).items()}}


def load(pipe, loras, *names):
    for n in names:
        src = loras[n]
        pipe.load_lora_weights(dict(src) if isinstance(src, dict) else src, adapter_name=n)
    return pipe


@pytest.fixture(scope="module")
def refs(tokenizer_dir, loras):
    """Uncached float latents: without adapters, with each LoRA, with both (weights 0.7 and 0.5)."""
    pipe = fresh(tokenizer_dir)
    out = {"base": run(pipe)}
    load(pipe, loras, "style", "toon")
    for name, (names, weights) in {"style": (["style"], [1.0]), "toon": (["toon"], [1.0]),
                                   "mix": (["style", "toon"], [0.7, 0.5])}.items():
        pipe.set_adapters(names, weights)
        out[name] = run(pipe)
    return out


@pytest.fixture(scope="module")
def calib(tokenizer_dir, loras, tmp_path_factory):
    """One calibration for every calibrated recipe (cache, quantization and inheritance statistics), made on the
    pipeline with the ``style`` LoRA active (what it is used with)."""
    pipe = load(fresh(tokenizer_dir), loras, "style")
    recipes = [accel.recipe.load(r) for r in ("cachequant-w8a8", "asdm-calibrated")]
    transforms = [t for r in recipes for t in r.transforms]
    assert type(transforms[0]).__name__ == "Quantize"  # with the paper's quantization DEC (not in the recipe)
    transforms[0] = accel.Quantize(**{**transforms[0].to_dict_fields(), "correction": "dec"})
    every = accel.Recipe("lora-test", transforms)
    path = tmp_path_factory.mktemp("calib") / "c"
    calibrate(pipe, every, PROMPTS, steps=STEPS, budget=3, batch_size=2, progress=False, refine=False).save(path)
    return path


def w8a8():
    """W8A8 without the weights' clip search (the recipe's search is exercised above; this is faster to re-quantize)."""
    return accel.Quantize(clip_search=False)


def modules_of(pipe):
    return dict(pipe.unet.named_modules())


def assert_same_modules(pipe, before):
    after = modules_of(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def assert_keeps_adapter(out, refs, name="style"):
    """The transform's latents are much closer to the LoRA pipeline's uncached ones than to the adapter-less ones."""
    to_lora, to_base = mse(out, refs[name]), mse(out, refs["base"])
    assert to_lora < 0.2 * to_base, (to_lora, to_base)


# ----------------------------------------------------------------------------------- every recipe
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_keeps_the_adapter_disables_and_removes_exactly(recipe, tokenizer_dir, loras, refs, calib):
    calib = calib if recipe in CALIBRATED else None
    plain = fresh(tokenizer_dir)  # the adapter-less pipeline (same base weights)
    with pytest.warns(AdapterMismatchWarning) if calib else warnings.catch_warnings():
        with accel.apply(plain, recipe, calibration=calib):
            plain_out = run(plain)
    pipe = load(fresh(tokenizer_dir), loras, "style")
    before = modules_of(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterMismatchWarning)  # calibrated with this adapter: no warning
        h = accel.apply(pipe, recipe, calibration=calib)
    out = run(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, refs["style"])
    assert_keeps_adapter(out, refs)
    pipe.unet.disable_lora()
    assert torch.equal(run(pipe), plain_out)  # adapters off under the transform: the adapter-less pipeline's output
    pipe.unet.enable_lora()
    assert torch.equal(run(pipe), out)
    h.remove()
    assert_same_modules(pipe, before)
    assert torch.equal(run(pipe), refs["style"])


# ----------------------------------------------------------------------------------- W8A8 around adapters
def test_w8a8_quantizes_base_layers_and_keeps_adapters_in_float(tokenizer_dir, loras):
    pipe = load(fresh(tokenizer_dir), loras, "style")
    plain = fresh(tokenizer_dir)
    q = accel.Quantize()
    assert [p for p, _ in q.selected(pipe.unet)] == [p for p, _ in q.selected(plain.unet)]  # paths without .base_layer
    weights = {p: m.weight for p, m in q.selected(pipe.unet)}
    with accel.apply(pipe, q):
        wrapped = [(p, m) for p, m in adapters.tuner_layers(pipe.unet)]
        assert len(wrapped) > 100
        for path, w in wrapped:
            assert isinstance(w.base_layer, (QLinear, QConv2d)) and w.base_layer.weight is weights[path]
            assert isinstance(w.lora_A["style"], (nn.Linear, nn.Conv2d)) and w.lora_A["style"].weight.dtype == torch.float32
        quantized = [m for m in pipe.unet.modules() if isinstance(m, _QBase)]
        assert len(quantized) == len(weights)
        conv = next(m for m in quantized if isinstance(m, QConv2d))
        assert (conv.in_channels, conv.kernel_size, conv.groups) == (conv.source.in_channels, conv.source.kernel_size, 1)
        assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) and not adapters.is_tuner_layer(m)
                       for p, m, _ in adapters.base_modules(pipe.unet) if "lora" not in p)


@pytest.mark.parametrize("recipe", ["w8a8", "deepcache-i3", "asdm-block-mid"])
def test_adapters_loaded_after_apply(recipe, tokenizer_dir, loras, refs):
    first = load(fresh(tokenizer_dir), loras, "style")  # adapters first, then the transform
    with accel.apply(first, recipe):
        want = run(first)
    pipe = fresh(tokenizer_dir)
    plain_modules = modules_of(pipe)
    h = accel.apply(pipe, recipe)
    load(pipe, loras, "style")  # pipe.load_lora_weights while the transform is applied
    assert torch.equal(run(pipe), want)
    pipe.unet.add_adapter(lora_config(target_modules=["to_q"]), "extra")  # unet.add_adapter too
    pipe.unet.set_adapters(["style"])
    assert torch.equal(run(pipe), want)
    h.remove()
    assert not {"add_adapter", "load_lora_adapter", "load_attn_procs"} & set(vars(pipe.unet))
    for path, m, _ in adapters.base_modules(pipe.unet):  # the original layers are back, inside the wrappers
        if path in plain_modules and isinstance(plain_modules[path], (nn.Linear, nn.Conv2d)):
            assert m is plain_modules[path] or getattr(m, "base_layer", None) is plain_modules[path]
    assert torch.equal(run(pipe), refs["style"])


def test_several_adapters_switching_and_weights(tokenizer_dir, loras, refs):
    pipe = load(fresh(tokenizer_dir), loras, "style", "toon")
    pipe.set_adapters(["style", "toon"], [0.7, 0.5])
    before = modules_of(pipe)
    h = accel.apply(pipe, [w8a8(), accel.FeatureCache(interval=3)])
    assert_keeps_adapter(run(pipe), refs, "mix")
    pipe.set_adapters("toon")
    out = run(pipe)
    assert_keeps_adapter(out, refs, "toon")
    assert mse(out, refs["toon"]) < 0.1 * mse(out, refs["style"])
    pipe.set_adapters(["style", "toon"], [0.7, 0.5])
    h.remove()
    assert_same_modules(pipe, before)
    assert torch.equal(run(pipe), refs["mix"])


def test_fuse_lora_before_or_after_w8a8(tokenizer_dir, loras, refs):
    """Fused before quantizing, the LoRA is in the weights that get quantized. (Un)fused while quantized, the layers
    are re-quantized from the float weights peft wrote: the same int8 model as quantizing after the same peft calls."""
    ops = [lambda p: p.fuse_lora(), lambda p: p.unfuse_lora(), lambda p: (p.fuse_lora(), p.unet.disable_lora())]
    twin = load(fresh(tokenizer_dir), loras, "style")  # the peft calls first, then w8a8
    want = []
    for op in ops:
        op(twin)
        with accel.apply(twin, w8a8()):
            want.append(run(twin))
    twin.unet.enable_lora()
    pipe = load(fresh(tokenizer_dir), loras, "style")  # w8a8 first, then the peft calls
    before = modules_of(pipe)
    with accel.apply(pipe, w8a8()):
        for op, w in zip(ops, want):
            op(pipe)
            assert torch.equal(run(pipe), w)
        pipe.unet.enable_lora()
    assert_same_modules(pipe, before)
    assert torch.equal(run(pipe), run(twin))
    fused, unfused, disabled = want
    assert_keeps_adapter(fused, refs)
    assert_keeps_adapter(unfused, refs)
    plain = fresh(tokenizer_dir)
    with accel.apply(plain, w8a8()):
        assert mse(disabled, run(plain)) < 0.1 * mse(disabled, refs["style"])


def test_fuse_then_unload_under_w8a8(tokenizer_dir, loras):
    """diffusers' "fuse, then unload the adapters": the quantized layer leaves its wrapper; remove() still finds it."""
    ref = load(fresh(tokenizer_dir), loras, "style")
    ref.fuse_lora()
    ref.unload_lora_weights()
    with accel.apply(ref, w8a8()):
        want = run(ref)
    pipe = fresh(tokenizer_dir)
    plain_modules = modules_of(pipe)
    load(pipe, loras, "style")
    with accel.apply(pipe, w8a8()):
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        assert not adapters.tuner_layers(pipe.unet)
        assert torch.equal(run(pipe), want)
    assert_same_modules(pipe, plain_modules)
    assert torch.equal(run(pipe), run(ref))


def test_lora_bias_and_dora_under_w8a8(tokenizer_dir):
    torch.manual_seed(3)
    biased = dict(lora_bias=True, target_modules=["to_out.0", "conv1", "conv2"])  # layers with a bias
    sd = make_lora(tokenizer_dir, 3, **biased)
    for k, v in sd.items():
        if k.endswith("lora_B.bias"):
            v.normal_()
    twin = fresh(tokenizer_dir)
    twin.unet.add_adapter(lora_config(**biased), "b")
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(twin.unet, sd, adapter_name="b")
    twin.fuse_lora()
    with accel.apply(twin, w8a8()):
        want = run(twin)  # quantized after fusing
    pipe = fresh(tokenizer_dir)
    pipe.unet.add_adapter(lora_config(**biased), "b")
    set_peft_model_state_dict(pipe.unet, sd, adapter_name="b")
    with accel.apply(pipe, w8a8()):
        pipe.fuse_lora()  # the LoRA bias goes into the quantized layers' bias, and from there into the float one
        assert torch.equal(run(pipe), want)
    assert torch.equal(run(pipe), run(twin))
    # DoRA: its weight norm reads the float weight; the base product is int8
    dora = fresh(tokenizer_dir)
    torch.manual_seed(4)
    dora.unet.add_adapter(lora_config(use_dora=True), "d")
    base = run(fresh(tokenizer_dir))
    ref = run(dora)
    with accel.apply(dora, w8a8()):
        out = run(dora)
    assert mse(out, ref) < 0.1 * mse(out, base)
    assert torch.equal(run(dora), ref)


# ----------------------------------------------------------------------------------- calibrations
def test_fingerprint_sees_fused_loras_not_unfused_ones(tokenizer_dir, loras):
    plain = fresh(tokenizer_dir)
    fp = fingerprint(plain.unet)
    pipe = load(fresh(tokenizer_dir), loras, "style")
    assert fingerprint(pipe.unet) == fp  # unfused adapters are recorded beside the fingerprint, not in it
    pipe.fuse_lora()
    assert fingerprint(pipe.unet) != fp
    # a LoRA that changes only middle output channels of one conv: the first and last 64 values of the weight, all
    # the old fingerprint read of it, stay the same; the per-channel samples see it
    mid = fresh(tokenizer_dir)
    path = "up_blocks.1.resnets.0.conv1"
    w0 = mid.unet.get_submodule(path).weight.detach().clone().reshape(-1)
    assert w0.numel() > 4096
    torch.manual_seed(5)
    mid.unet.add_adapter(lora_config(target_modules=[path]), "mid")
    layer = mid.unet.get_submodule(path)
    with torch.no_grad():
        layer.lora_B["mid"].weight[:4] = 0
        layer.lora_B["mid"].weight[-4:] = 0
    mid.fuse_lora()
    w1 = layer.base_layer.weight.detach().reshape(-1)
    assert torch.equal(w0[:64], w1[:64]) and torch.equal(w0[-64:], w1[-64:]) and not torch.equal(w0, w1)
    assert fingerprint(mid.unet) != fp


def test_calibration_records_adapters_and_checks_them(tokenizer_dir, loras, calib):
    path = calib
    meta = json.loads((path / "accel.json").read_text())
    rec = meta["model"]["adapters"]
    assert rec["active"] == ["style"] and rec["fused"] == [] and rec["enabled"]
    assert rec["adapters"]["style"]["rank"] == 4 and rec["adapters"]["style"]["weight"] == 1.0
    # the quantization DEC of the layers that consume the cached feature, conv1 inside a LoRA wrapper included
    assert meta["quant"]["dec_layers"] == ["up_blocks.3.resnets.2.conv1", "up_blocks.3.resnets.2.conv_shortcut"]
    pipe = load(fresh(tokenizer_dir), loras, "style")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterMismatchWarning)
        Calibration.load(path, unet=pipe.unet, pipe=pipe)
    pipe.set_adapters("style", 0.5)
    with pytest.warns(AdapterMismatchWarning, match=r"'style' \(weight 1.0\).*'style' \(weight 0.5\)"):
        Calibration.load(path, unet=pipe.unet)
    pipe.set_adapters("style", 1.0)
    pipe.unet.disable_lora()
    with pytest.warns(AdapterMismatchWarning, match="now has no active unfused LoRA adapters"):
        Calibration.load(path, unet=pipe.unet)
    pipe.unet.enable_lora()
    renamed = load(fresh(tokenizer_dir), {"other": loras["style"]}, "other")  # the same LoRA under another name
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterMismatchWarning)
        Calibration.load(path, unet=renamed.unet)
    with pytest.warns(AdapterMismatchWarning):
        Calibration.load(path, unet=load(fresh(tokenizer_dir), loras, "toon").unet)
    pipe.fuse_lora()
    with pytest.raises(CalibrationError, match=r"another model.*fused LoRA adapters.*\['style'\] fused"):
        Calibration.load(path, unet=pipe.unet)


# ----------------------------------------------------------------------------------- the miniature, 50 steps
@pytest.mark.slow
def test_miniature_recipes_keep_a_lora(tmp_path):
    """The trained miniature with a LoRA on its attention projections, 50 PNDM steps: every recipe's images are
    closer to the LoRA pipeline's uncached images than to the adapter-less pipeline's; remove() is exact."""
    from accel import miniature

    pipe = miniature.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a large red circle on the left, black background", "a small blue square at the top, white background"],
              num_inference_steps=50, guidance_scale=miniature.GUIDANCE, output_type="np")

    def images():
        return torch.from_numpy(pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images)

    base = images()
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), "style")
    lora = images()
    print(f"LoRA vs adapter-less images: MSE {mse(lora, base):.2e}")
    assert mse(lora, base) > 0.01  # the adapter visibly changes the images (pixel values in [0, 1])
    calib = tmp_path / "c"
    calibrate(pipe, "cachequant-w8a8", kw["prompt"], steps=50, budget=11, batch_size=2, progress=False,
              guidance=miniature.GUIDANCE,
              refine=False).save(calib)
    for recipe in ["deepcache-i3", "cachequant-dp", "cachequant-w8a8", "w8a8", "asdm-block-mid", "asdm-unit-attn2"]:
        with accel.apply(pipe, recipe, calibration=calib if recipe.startswith("cachequant") else None):
            out = images()
        print(f"{recipe}: image MSE to the LoRA pipeline's {mse(out, lora):.2e}, to the adapter-less one's {mse(out, base):.2e}")
        assert not torch.equal(out, lora) and mse(out, lora) < 0.2 * mse(out, base), (recipe, mse(out, lora), mse(out, base))
        assert torch.equal(images(), lora)
