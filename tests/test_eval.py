"""Evaluation on the shipped miniature world: CLIP score, the judge, `accel eval` / `accel generate`."""
import json
import os
import subprocess
import sys

import pytest

from accel import miniature
from accel.eval import CLIPScorer, resolve_clip
from accel.eval.judge import judge

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def scorer():
    return CLIPScorer("miniature")


def to_pil(images):
    from torchvision.transforms.functional import to_pil_image

    return [to_pil_image(x) for x in images]


def test_loaders_are_stock_and_offline():
    from diffusers import StableDiffusionPipeline

    pipe = miniature.load_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    assert len(pipe.unet.down_blocks) == 4 and pipe.unet.config.layers_per_block == 2
    n_skips = 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in pipe.unet.down_blocks)
    assert n_skips == 12  # SD's 12 long skips
    assert pipe.vae.config.block_out_channels and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    model, preprocess, tokenizer = miniature.load_clip()
    assert tokenizer(["a red circle"]).shape[0] == 1
    size = sum(f.stat().st_size for f in miniature.PIPELINE_DIR.parent.rglob("*") if f.is_file())
    assert size < 25 * 2 ** 20


def test_right_caption_scores_higher_than_wrong(scorer):
    images, captions, attrs = miniature.sample(48, seed=7, split="heldout")
    pil = to_pil(images)
    wrong = []
    for a in attrs:
        other = next(c for c in miniature.COLOURS if c != a.colour)
        wrong.append(miniature.caption(**{**a.asdict(), "colour": other}))
    right_s, wrong_s = scorer.score(pil, captions), scorer.score(pil, wrong)
    assert right_s.mean() > wrong_s.mean() + 2
    assert (right_s > wrong_s).float().mean() >= 0.9
    assert (right_s >= 0).all() and (right_s <= 100).all()


def test_miniature_clip_zero_shot_quality(scorer):
    """The README's first quality figure: shape and colour right for >= 95% of held-out images."""
    images, _, attrs = miniature.sample(300, seed=0, split="heldout")
    verdict = judge(scorer, to_pil(images), attrs)
    assert verdict["colour_accuracy"] >= 0.95 and verdict["shape_accuracy"] >= 0.95
    assert verdict["all_accuracy"] >= 0.95


def test_clip_spec_errors():
    with pytest.raises(ValueError, match="MODEL:PRETRAINED"):
        resolve_clip("nonsense")
    assert resolve_clip("ViT-g-14:laion2b_s34b_b88k").pretrained == "laion2b_s34b_b88k"
    with pytest.raises(ValueError):
        CLIPScorer("miniature").score([], ["x"])


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "accel", *args], capture_output=True, text=True, env=ENV, check=check)


def test_eval_cli_report(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# a comment\na large red circle on the left, black background\n\n"
                       "a small blue square at the top, white background\n")
    out = tmp_path / "r.json"
    r = run_cli("eval", "--prompts", str(prompts), "--num-images", "3", "--steps", "6", "--out", str(out), "--quiet")
    rep = json.loads(out.read_text())
    assert rep["num_images"] == 3 and rep["steps"] == 6 and rep["clip_model"] == "miniature-clip:accel"
    assert [im["seed"] for im in rep["images"]] == [0, 1, 2]
    assert rep["images"][2]["prompt"] == rep["images"][0]["prompt"]  # cycled
    assert "CLIP score" in r.stdout and 0 <= rep["clip_score"] <= 100
    assert "judged_correct" in rep


@pytest.mark.parametrize("args,msg", [
    (["eval", "--prompts", "/nonexistent.txt"], "prompt file not found"),
    (["eval", "--num-images", "0", "--steps", "2"], "num-images"),
    (["eval", "--steps", "0"], "--steps"),
    (["generate", "--recipe", "no-such-recipe", "--steps", "2", "--num-images", "1"], "unknown recipe"),
    (["eval", "--clip", "bogus", "--steps", "2", "--num-images", "1"], "MODEL:PRETRAINED"),
    (["calibrate", "--out", "/tmp/x", "--budget", "0", "--steps", "4"], "budget"),
])
def test_cli_bad_input_is_one_line_exit_2(args, msg):
    r = run_cli(*args, check=False)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("accel")]
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_generate_writes_images(tmp_path):
    r = run_cli("generate", "--prompt", "a large red circle on the left, black background", "--num-images", "2",
                "--steps", "5", "--out", str(tmp_path), "--recipe", "deepcache-i3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png", "report.json"]
    assert "clip=" in r.stdout and "checker: " in r.stdout  # the pixel checker's verdict per image


@pytest.mark.slow
def test_two_process_eval_equals_one_process(tmp_path):
    common = ["eval", "--num-images", "4", "--steps", "6", "--batch-size", "1", "--quiet"]
    run_cli(*common, "--out", str(tmp_path / "one.json"))
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "29519", "-m", "accel", *common, "--out", str(tmp_path / "two.json")],
                   check=True, env=ENV, capture_output=True)
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert [i["clip_score"] for i in one["images"]] == [i["clip_score"] for i in two["images"]]
    assert one["clip_score"] == two["clip_score"]


@pytest.mark.slow
def test_generated_images_show_the_prompt():
    """The README's second quality figure: >= 80% of 100 generated images (default steps, the miniature's
    recommended guidance) show the prompted shape and colour."""
    from accel import miniature
    from accel.experiments.miniature_quality import generation

    g = generation(100)
    assert g["guidance"] == miniature.GUIDANCE and g["steps"] == 50
    assert g["judged_correct"] >= 0.8
