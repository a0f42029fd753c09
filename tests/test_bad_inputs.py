"""Bad input, tried as a new user would, for every CLI subcommand and the Python API: a one-line error (exit 2 for
the CLI, no traceback) before any work, nothing written, and whatever was there before left as it was.

CLI cases run in-process through ``accel.cli.main`` (the work functions are replaced by ones that fail the test, so a
check that comes after the work starts is caught); a few run in a real subprocess to prove there is no traceback.
"""
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import accel
from accel import miniature
from accel.cli import main
from accel.errors import AccelError, AccelWarning, CalibrationError, RecipeError, UnsupportedModelError

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
PROMPT = "a large red circle on the left, black background"


# ----------------------------------------------------------------------------------- helpers and fixtures
def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles, only_line=True):
    """Exit 2 and exactly one ``accel CMD: error: ...`` line naming ``needles``; with ``only_line`` stderr holds
    nothing else (no progress bar: no work started)."""
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if ": error: " in l]
    assert len(errors) == 1 and errors[0].startswith("accel"), err
    if only_line:
        assert err.strip() == errors[0], err
    for n in needles:
        assert n in errors[0], err
    return errors[0]


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (and its siblings' names): what must be intact after a refused command."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading the model, generating, calibrating or benchmarking."""
    import accel.bench
    import accel.calibrate
    import accel.cli.common
    from accel.eval import runner

    def work(*a, **k):
        raise AssertionError("the work started before the bad input was refused")

    monkeypatch.setattr(accel.cli.common, "load_model", work)  # where the subcommands look it up
    monkeypatch.setattr(runner, "generate", work)
    monkeypatch.setattr(accel.calibrate, "collect_features", work)
    monkeypatch.setattr(accel.bench, "run", work)


@pytest.fixture
def no_images(monkeypatch):
    """The model may load; the first image must not be made."""
    from accel.eval import runner

    def work(*a, **k):
        raise AssertionError("an image was generated before the bad input was refused")

    monkeypatch.setattr(runner, "generate", work)


@pytest.fixture(scope="module")
def mini():
    return miniature.load_pipeline()


@pytest.fixture(scope="module")
def calib_dir(mini, tmp_path_factory):
    """A small cache calibration of the miniature: cachequant-dp, 4 steps, guidance 3.0, no activation scales."""
    from accel.calibrate import calibrate

    c = calibrate(mini, "cachequant-dp", miniature.prompts(2, seed=0, split="train"), steps=4, budget=2,
                  guidance=miniature.GUIDANCE, batch_size=2, refine=False, progress=False)
    return c.save(tmp_path_factory.mktemp("calib") / "c")


@pytest.fixture
def precious(tmp_path):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.txt").write_text("x")
    return d


# ----------------------------------------------------------------------------------- calibrate
def test_calibrate_refuses_a_folder_that_is_not_a_calibration(capsys, no_work, precious):
    before = snapshot(precious)
    rc, _, err = cli(capsys, "calibrate", "--budget", "11", "--num-prompts", "4", "--no-refine", "--out", precious)
    one_line_error(rc, err, "precious", "not an accel calibration folder")
    assert snapshot(precious) == before


def test_calibrate_out_dot(capsys, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "calibrate", "--out", ".")
    one_line_error(rc, err, "--out .", "not an accel calibration folder")
    (tmp_path / "notes.txt").unlink()
    rc, _, err = cli(capsys, "calibrate", "--out", ".")  # empty: still not a name to replace
    one_line_error(rc, err, "current folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--num-prompts", "0"], "--num-prompts"),
    (["--budget", "0"], "--budget"),
    (["--steps", "1"], "--steps"),
    (["--steps", "four"], "not an integer"),
    (["--seed", "-1"], "--seed"),
    (["--guidance", "nan"], "--guidance"),
    (["--batch-size", "0"], "--batch-size"),
    (["--refine-evals", "0"], "--refine-evals"),
    (["--num-prompts", "4", "--refine-prompts", "8"], "--refine-prompts 8 is more than the 4 calibration prompts"),
    (["--refine-prompts", "9"], "--refine-prompts 9 is more than the 8 calibration prompts"),
    (["--threads", "0"], "--threads"),
    (["--recipe", "deepcache-i3"], "uses no calibration"),
    (["--recipe", "no-such-recipe"], "unknown recipe"),
    (["--prompts", "/nonexistent/prompts.txt"], "prompt file not found"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "warp-drive"], "--device"),
    (["/nonexistent/model"], "/nonexistent/model"),
    (["--bogus-option"], "unrecognized arguments"),
])
def test_calibrate_bad_arguments(capsys, no_work, tmp_path, args, needle):
    rc, _, err = cli(capsys, "calibrate", *args, "--out", tmp_path / "c")
    one_line_error(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_needs_out(capsys, no_work):
    rc, _, err = cli(capsys, "calibrate")
    one_line_error(rc, err, "--out")


def test_calibrate_model_folder_without_model_index(capsys, no_work, tmp_path):
    (tmp_path / "m").mkdir()
    rc, _, err = cli(capsys, "calibrate", tmp_path / "m", "--out", tmp_path / "c")
    one_line_error(rc, err, "model_index.json")


def test_calibrate_budget_beyond_the_unet_calls_is_refused_before_running(capsys, monkeypatch, tmp_path):
    import accel.calibrate

    def work(*a, **k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(accel.calibrate, "collect_features", work)
    rc, _, err = cli(capsys, "calibrate", "--recipe", "cachequant-dp", "--steps", "4", "--out", tmp_path / "c")
    one_line_error(rc, err, "the default --budget 10", "1..5", only_line=False)
    rc, _, err = cli(capsys, "calibrate", "--steps", "4", "--budget", "3", "6", "--out", tmp_path / "c")
    one_line_error(rc, err, "--budget 3 6", "1..5", only_line=False)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_w8a8_needs_no_cache_budget(capsys, tmp_path):
    """`calibrate --recipe w8a8 --steps 4` (no cache in the recipe) runs; the folder gets normal permissions, and a
    second run replaces the calibration (a given --budget or --refine-prompts, even one larger than the prompts, is
    ignored, with a warning, as in the API)."""
    out = tmp_path / "w8"
    rc, stdout, err = cli(capsys, "calibrate", "--recipe", "w8a8", "--steps", "4", "--num-prompts", "1",
                          "--batch-size", "1", "--out", out)
    assert rc == 0, err
    assert "DP schedule" not in stdout  # the recipe has no cache: no schedule to report
    from accel.calibration import Calibration
    from accel.fileio import umask

    c = Calibration.load(out)
    assert c.quant() is not None and c.meta["scheduler"]["unet_calls"] == 5
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask()
    rc, _, err = cli(capsys, "calibrate", "--recipe", "w8a8", "--steps", "4", "--num-prompts", "1", "--budget", "3",
                     "--refine-prompts", "4", "--batch-size", "1", "--seed", "1", "--out", out)
    assert rc == 0, err
    assert "accel calibrate: warning: --budget is ignored" in err
    assert "accel calibrate: warning: --refine-prompts is ignored" in err
    assert Calibration.load(out).meta["generation"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8"]  # no temporary left beside it


# ----------------------------------------------------------------------------------- generate
def test_generate_out_is_a_file(capsys, no_work, tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("keep")
    rc, _, err = cli(capsys, "generate", "--out", f)
    one_line_error(rc, err, "afile.txt", "is a file")
    assert f.read_text() == "keep"


def test_generate_refuses_a_folder_it_did_not_write(capsys, no_work, precious):
    before = snapshot(precious)
    rc, _, err = cli(capsys, "generate", "--out", precious)
    one_line_error(rc, err, "not a folder written by accel generate")
    assert snapshot(precious) == before


@pytest.mark.parametrize("args,needle", [
    (["--num-images", "0"], "--num-images"),
    (["--num-images", "-3"], "--num-images"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--guidance", "inf"], "--guidance"),
    (["--threads", "0"], "--threads"),
    (["--clip", "bogus"], "MODEL:PRETRAINED"),
    (["--clip", "ViT-B-32:no-such-tag"], "--clip ViT-B-32:no-such-tag"),
    (["--clip", "local-dir:/nonexistent"], "--clip local-dir:/nonexistent"),
    (["--recipe", "no-such-recipe"], "unknown recipe"),
    (["--recipe", "/nonexistent/r.toml"], "recipe file not found"),
    (["--prompts", "/nonexistent.txt"], "prompt file not found"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--model", "/nonexistent/model"], "no such folder"),
    (["--calibration", "/nonexistent/calib", "--recipe", "cachequant-dp"], "not a calibration folder"),
    (["--scheduler", "DPMSolver"], "--scheduler DPMSolver: not a diffusers scheduler"),
])
def test_generate_bad_arguments(capsys, no_work, tmp_path, args, needle):
    rc, _, err = cli(capsys, "generate", *args, "--out", tmp_path / "out")
    one_line_error(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_generate_model_folder_checks(capsys, no_work, tmp_path):
    (tmp_path / "m").mkdir()
    rc, _, err = cli(capsys, "generate", "--model", tmp_path / "m", "--out", tmp_path / "o")
    one_line_error(rc, err, "model_index.json")
    (tmp_path / "f").write_text("x")
    rc, _, err = cli(capsys, "generate", "--model", tmp_path / "f", "--out", tmp_path / "o")
    one_line_error(rc, err, "a file, not a diffusers pipeline folder")


def test_calibration_without_recipe_or_with_a_recipe_that_ignores_it(capsys, no_work, calib_dir, tmp_path):
    rc, _, err = cli(capsys, "generate", "--calibration", calib_dir, "--out", tmp_path / "o")
    one_line_error(rc, err, "--calibration needs --recipe", "cachequant-dp")
    rc, _, err = cli(capsys, "eval", "--recipe", "deepcache-i3", "--calibration", calib_dir, "--out", tmp_path / "r.json")
    one_line_error(rc, err, "uses no calibration")
    assert list(tmp_path.iterdir()) == []


def test_guidance_on_off_mismatch_is_refused_before_work(capsys, no_work, calib_dir, tmp_path):
    """The calibration was made with classifier-free guidance (3.0); at 1.0 the UNet batch halves."""
    rc, _, err = cli(capsys, "generate", "--recipe", "cachequant-dp", "--calibration", calib_dir, "--guidance", "1.0",
                     "--steps", "4", "--out", tmp_path / "o")
    one_line_error(rc, err, "guidance 3.0", "1.0", "recalibrate")


def test_calibration_made_for_another_step_count_is_refused_before_work(capsys, no_work, calib_dir, tmp_path):
    rc, _, err = cli(capsys, "eval", "--recipe", "cachequant-dp", "--calibration", calib_dir, "--steps", "6",
                     "--out", tmp_path / "r.json")
    one_line_error(rc, err, "made for 4 steps (5 UNet calls", "--steps 6")


def test_calibration_made_with_another_scheduler_names_the_flag(capsys, no_images, calib_dir, tmp_path):
    """The calibration was made with the miniature's PNDM: another --scheduler is refused before the model loads,
    and a model whose own scheduler differs (here: --scheduler on calibrate) gets the flag to add."""
    rc, _, err = cli(capsys, "generate", "--recipe", "cachequant-dp", "--calibration", calib_dir, "--steps", "4",
                     "--scheduler", "EulerDiscreteScheduler", "--out", tmp_path / "o")
    one_line_error(rc, err, "made with PNDMScheduler", "--scheduler EulerDiscreteScheduler", "--scheduler PNDMScheduler")
    from accel.calibration import Calibration

    other = tmp_path / "euler"
    c = Calibration.load(calib_dir)
    c.meta["scheduler"]["class"] = "EulerDiscreteScheduler"  # as if calibrated with --scheduler EulerDiscreteScheduler
    c.save(other)
    rc, _, err = cli(capsys, "eval", "--recipe", "cachequant-dp", "--calibration", other, "--steps", "4",
                     "--out", tmp_path / "r.json")
    one_line_error(rc, err, "made with EulerDiscreteScheduler", "PNDMScheduler", "add --scheduler EulerDiscreteScheduler",
                   only_line=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["euler"]


def test_scheduler_flag_samples_with_that_scheduler(capsys, tmp_path, monkeypatch):
    """--scheduler swaps the model's scheduler (from its config) for calibrate, generate and eval, the calibration
    records it and the report names it."""
    from accel.eval import runner

    seen = []
    real = runner.generate

    def spy(pipe, *a, **k):
        seen.append(type(pipe.scheduler).__name__)
        return real(pipe, *a, **k)

    monkeypatch.setattr(runner, "generate", spy)
    cal = tmp_path / "c"
    rc, _, err = cli(capsys, "calibrate", "--recipe", "cachequant-dp", "--scheduler", "DPMSolverMultistepScheduler",
                     "--steps", "4", "--budget", "2", "--num-prompts", "2", "--no-refine", "--out", cal)
    assert rc == 0, err
    assert json.loads((cal / "accel.json").read_text())["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    rc, _, err = cli(capsys, "eval", "--num-images", "1", "--steps", "4", "--recipe", "cachequant-dp", "--calibration",
                     cal, "--scheduler", "DPMSolverMultistepScheduler", "--quiet", "--out", tmp_path / "r.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["scheduler"] == "DPMSolverMultistepScheduler" and seen == ["DPMSolverMultistepScheduler"]
    # DPM-Solver++ takes one UNet call per step (PNDM's 4 steps are 5 calls)
    assert rep["unet_calls"]["unet_calls"] == 4 and rep["unet_calls"]["full"] == 2


def test_w8a8_with_a_calibration_without_activation_scales(capsys, no_images, calib_dir, tmp_path):
    rc, _, err = cli(capsys, "generate", "--recipe", "w8a8", "--calibration", calib_dir, "--steps", "4",
                     "--out", tmp_path / "o")
    one_line_error(rc, err, "no activation scales", "cachequant-dp", only_line=False)
    assert list(tmp_path.iterdir()) == []


def test_calibrated_budget_beyond_the_calibration_is_refused_at_apply(capsys, no_images, calib_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[transform]]\ntype = "FeatureCache"\nschedule = "calibrated"\nbudget = 60\n')
    rc, _, err = cli(capsys, "generate", "--recipe", recipe, "--calibration", calib_dir, "--steps", "4",
                     "--out", tmp_path / "o")
    one_line_error(rc, err, "budget 60", "1..5", only_line=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_generate_output_is_complete_and_replaced_only_when_ours(capsys, calib_dir, tmp_path):
    """A reused --out holds exactly this run's images; the report names the recipe, model and calibration; a run
    at another guidance scale than the calibration's works, with a one-line warning."""
    out = tmp_path / "out"
    common = ["generate", "--prompt", PROMPT, "--steps", "4", "--recipe", "cachequant-dp", "--calibration", calib_dir,
              "--out", out]
    rc, stdout, err = cli(capsys, *common, "--num-images", "2")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"] == "cachequant-dp" and rep["model"] == "miniature"
    assert rep["calibration"] == str(calib_dir.resolve()) and rep["guidance"] == miniature.GUIDANCE
    assert [im["path"] for im in rep["images"]] == [str(out / "00000.png"), str(out / "00001.png")]
    rc, _, err = cli(capsys, *common, "--num-images", "1", "--guidance", "5")
    assert rc == 0, err
    assert [l.split("\r")[-1] for l in err.splitlines() if "warning" in l] == [
        "accel generate: warning: this calibration was made at guidance 3.0, this run uses 5.0: its statistics "
        "depend on the scale; for the best schedule recalibrate with --guidance 5.0"]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "report.json"]  # no stale 00001.png
    assert json.loads((out / "report.json").read_text())["num_images"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    # a bad --clip after a complete run: refused before any image, the previous output intact
    before = snapshot(out)
    rc, _, err = cli(capsys, *common, "--clip", "bogus")
    one_line_error(rc, err, "MODEL:PRETRAINED")
    assert snapshot(out) == before
    # a folder with a file accel did not write is not replaced
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, *common)
    one_line_error(rc, err, "not a folder written by accel generate")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failure_midway_leaves_the_previous_output(capsys, monkeypatch, tmp_path):
    """An error after some images were written: the output folder is the previous one, no half-written folder."""
    from accel.eval import runner

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"clip_model": "m", "images": [], "clip_score": 0.0}))
    before = snapshot(out)
    real_decode, calls = runner.decode, []

    def decode_then_fail(pipe, latents):
        calls.append(1)
        if len(calls) > 1:
            raise FloatingPointError("simulated failure in the second batch")
        return real_decode(pipe, latents)

    monkeypatch.setattr(runner, "decode", decode_then_fail)
    rc, _, err = cli(capsys, "generate", "--num-images", "2", "--batch-size", "1", "--steps", "2", "--out", out)
    one_line_error(rc, err, "simulated failure", only_line=False)
    assert len(calls) == 2 and snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------- eval
def test_eval_out_is_a_folder(capsys, no_work, tmp_path):
    d = tmp_path / "EXISTING_DIR"
    d.mkdir()
    rc, _, err = cli(capsys, "eval", "--num-images", "1", "--out", d)
    one_line_error(rc, err, "EXISTING_DIR", "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING_DIR"] and list(d.iterdir()) == []


def test_eval_refuses_to_replace_what_it_did_not_write(capsys, no_work, tmp_path, precious):
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    rc, _, err = cli(capsys, "eval", "--out", other)
    one_line_error(rc, err, "not an accel eval report")
    assert other.read_text() == '{"mine": 1}'
    before = snapshot(precious)
    rc, _, err = cli(capsys, "eval", "--save-images", precious, "--out", tmp_path / "r.json")
    one_line_error(rc, err, "--save-images", "not a folder written by accel")
    assert snapshot(precious) == before and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--num-images", "0"], "--num-images"),
    (["--steps", "-1"], "--steps"),
    (["--seed", "x"], "not an integer"),
    (["--clip", "bogus"], "MODEL:PRETRAINED"),
    (["--prompts", "/nonexistent.txt"], "prompt file not found"),
    (["--recipe", "cachequant-dp", "--calibration", "/nonexistent"], "not a calibration folder"),
])
def test_eval_bad_arguments(capsys, no_work, tmp_path, args, needle):
    rc, _, err = cli(capsys, "eval", *args, "--out", tmp_path / "r.json")
    one_line_error(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_file(capsys, no_work, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# only a comment\n\n")
    rc, _, err = cli(capsys, "eval", "--prompts", p, "--out", tmp_path / "r.json")
    one_line_error(rc, err, "no prompts")


def test_eval_report_records_the_calibration(capsys, calib_dir, tmp_path):
    out, images = tmp_path / "r.json", tmp_path / "imgs"
    rc, _, err = cli(capsys, "eval", "--num-images", "1", "--steps", "4", "--recipe", "cachequant-dp", "--calibration",
                     calib_dir, "--save-images", images, "--quiet", "--out", out)
    assert rc == 0, err
    rep = json.loads(out.read_text())
    assert rep["calibration"] == str(calib_dir.resolve()) and rep["recipe"] == "cachequant-dp"
    # what the recipe spent: 4 PNDM steps are 5 UNet calls, the calibrated budget is 2 full calls
    assert rep["unet_calls"] == {"pipeline_calls": 1, "unet_calls": 5, "full": 2, "cached": 3, "full_per_pipeline_call": 2.0}
    assert sorted(p.name for p in images.iterdir()) == ["00000.png", "report.json"]
    rc, _, err = cli(capsys, "eval", "--num-images", "1", "--steps", "2", "--save-images", images, "--quiet",
                     "--out", out)  # both are ours now: replaced
    assert rc == 0, err
    assert json.loads(out.read_text())["calibration"] is None


# ----------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("args,needle", [
    (["--sections", "speeed", "--out", "{tmp}/B.md"], "valid: cost,speed,quality,quant,asdm,compile,gpu,curves"),
    (["--sections", "cost,", "--out", "{tmp}/B.md"], "unknown section"),
    ([], "--out"),
    (["--intervals", "0,3", "--out", "{tmp}/B.md"], "--intervals"),
    (["--repeats", "0", "--out", "{tmp}/B.md"], "--repeats"),
    (["--out", "{tmp}"], "is a folder"),
    (["--sections", "curves", "--curve-samplers", "DPMSolver", "--out", "{tmp}/B.md"], "unknown sampler"),
    (["--sections", "curves", "--curve-refine-prompts", "9", "--out", "{tmp}/B.md"], "at most 8"),
])
def test_bench_bad_arguments(capsys, no_work, tmp_path, args, needle):
    rc, _, err = cli(capsys, "bench", *[a.format(tmp=tmp_path) for a in args])
    one_line_error(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_bench_does_not_overwrite_a_file_it_did_not_write(capsys, no_work, tmp_path):
    mine = tmp_path / "NOTES.md"
    mine.write_text("# my notes\n")
    rc, _, err = cli(capsys, "bench", "--out", mine)
    one_line_error(rc, err, "not a report written by accel bench")
    assert mine.read_text() == "# my notes\n"


def test_bench_sections_are_the_ones_bench_runs():
    """cli.BENCH_SECTIONS (what --sections accepts, without importing torch) names every section bench.run knows."""
    import re

    import accel.bench
    from accel.cli import BENCH_SECTIONS

    src = Path(accel.bench.__file__).read_text()
    used = set(re.findall(r'"(\w+)" in sections', src))
    for group in re.findall(r"sections & \{([^}]*)\}", src):
        used |= set(re.findall(r'"(\w+)"', group))
    assert used == set(BENCH_SECTIONS)


def test_curve_samplers_are_the_ones_the_curves_section_measures():
    """cli.CURVE_SAMPLERS (what --curve-samplers accepts, without importing torch) is accel.bench.curves.SETTINGS."""
    from accel.bench.curves import SETTINGS
    from accel.cli import CURVE_SAMPLERS

    assert CURVE_SAMPLERS == tuple(s for s, _ in SETTINGS)


def test_help_describes_every_option(capsys):
    import argparse

    from accel.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == {"generate", "eval", "calibrate", "bench"}
    for cmd, sub in subcommands.items():
        for action in sub._actions:
            assert action.help, f"accel {cmd} {action.option_strings or action.dest} has no help"
        assert main([cmd, "--help"]) == 0
    assert "about an hour" in " ".join(capsys.readouterr().out.split())  # bench says how long a full run takes


# ----------------------------------------------------------------------------------- in a real process
@pytest.mark.parametrize("args,needle", [
    (["generate", "--out", "{tmp}/afile.txt"], "is a file"),
    (["generate", "--device", "cuda", "--out", "{tmp}/o"] if not torch.cuda.is_available() else
     ["generate", "--device", "cuda:99", "--out", "{tmp}/o"], "--device"),
    (["calibrate", "--out", "{tmp}/precious"], "not an accel calibration folder"),
    (["bench", "--sections", "speeed", "--out", "{tmp}/B.md"], "valid:"),
])
def test_subprocess_one_line_no_traceback(tmp_path, args, needle):
    (tmp_path / "afile.txt").write_text("keep")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("x")
    before = snapshot(tmp_path / "afile.txt")
    r = subprocess.run([sys.executable, "-m", "accel", *[a.format(tmp=tmp_path) for a in args]], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert snapshot(tmp_path / "afile.txt") == before


def test_help_is_fast_and_import_accel_is_light():
    """`accel --help` imports no torch (the issue's target: under 1 s; asserted loosely on this shared machine)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "accel", "--help"], capture_output=True, text=True, env=ENV)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0 and "calibrate" in r.stdout
    assert seconds < 2.0, f"accel --help took {seconds:.2f} s"
    r = subprocess.run([sys.executable, "-c", "import sys, accel, accel.cli; accel.cli.build_parser(); "
                        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"],
                       capture_output=True, text=True, env=ENV, check=True)
    assert r.stdout.strip() == "[]"


def test_readme_first_line_and_lazy_names_in_a_fresh_process():
    code = ("import accel\n"
            "pipe = accel.miniature.load_pipeline()\n"
            "h = accel.apply(pipe, accel.FeatureCache(interval=3))\n"
            "assert isinstance(h, accel.Handle) and issubclass(accel.CalibrationError, accel.AccelError)\n"
            "h.remove()\n"
            "assert 'miniature' in dir(accel) and accel.__version__\n"
            "try:\n    accel.nonexistent\nexcept AttributeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "has no attribute 'nonexistent'" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without CUDA")
def test_triton_interpreter_is_on_before_triton_is_imported():
    """Lazy `import accel` still switches Triton's interpreter on before triton's first import (here by diffusers,
    through torch._dynamo), so the int8 kernels run on CPU."""
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    code = ("import os, sys, accel\n"
            "assert 'torch' not in sys.modules and 'TRITON_INTERPRET' not in os.environ\n"
            "from diffusers import UNet2DConditionModel\n"
            "assert 'triton' in sys.modules and os.environ['TRITON_INTERPRET'] == '1'\n"
            "from accel import kernels\n"
            "kernels.triton_module()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------- Python API
def no_hooks(pipe) -> bool:
    return not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("make,exc,needle", [
    (lambda: accel.FeatureCache(), ValueError, "needs interval"),
    (lambda: accel.FeatureCache(interval=0), ValueError, "positive integer"),
    (lambda: accel.FeatureCache(schedule="bogus"), ValueError, "schedule 'bogus'"),
    (lambda: accel.FeatureCache(interval=2, budget=3), ValueError, "goes with schedule"),
    (lambda: accel.FeatureCache(schedule="calibrated", budget=0), ValueError, "K >= 1"),
    (lambda: accel.FeatureCache(interval=2, correction="dek"), ValueError, "correction 'dek'"),
    (lambda: accel.Quantize(weights=4), ValueError, "W8A8"),
    (lambda: accel.Quantize(mode="fast"), ValueError, "mode"),
    (lambda: accel.Inherit(targets="mid_block", every=1), ValueError, "every"),
    (lambda: accel.Inherit(targets="mid_block"), ValueError, "exactly one sampling mode"),
    (lambda: accel.ScaleLong(kind="huge"), ValueError, "huge"),
])
def test_transform_parameters(make, exc, needle):
    with pytest.raises(exc) as e:
        make()
    assert needle in one_line(e)


@pytest.mark.parametrize("target,transforms,exc,needle", [
    ("pipe", "no-such-recipe", RecipeError, "unknown recipe"),
    (42, "deepcache-i3", UnsupportedModelError, "cannot transform a int"),
    ("pipe", 3, TypeError, "accel.apply takes"),
    ("pipe", "cachequant-dp", CalibrationError, "needs a calibration"),
    ("pipe", [accel.FeatureCache(interval=2), accel.FeatureCache(interval=3)], AccelError, "appears 2 times"),
    ("pipe", accel.FeatureCache(interval=2, branch=99), ValueError, "branch 99"),
    ("pipe", accel.Inherit(targets="no_such_block", every=2), ValueError, "match no"),
    ("unet", accel.FeatureCache(interval=2), UnsupportedModelError, "needs the pipeline"),
])
def test_apply_bad_input_leaves_the_model_untouched(mini, target, transforms, exc, needle):
    target = {"pipe": mini, "unet": mini.unet}.get(target, target) if isinstance(target, str) else target
    with pytest.raises(exc) as e:
        accel.apply(target, transforms)
    assert needle in one_line(e)
    assert no_hooks(mini)


def test_calibrated_budget_beyond_the_calibration_is_refused_by_apply(mini, calib_dir):
    with pytest.raises(CalibrationError) as e:
        accel.apply(mini, accel.FeatureCache(schedule="calibrated", budget=60), calibration=calib_dir)
    assert "budget 60 must be in 1..5" in one_line(e)
    with pytest.raises(CalibrationError):
        accel.apply(mini, accel.FeatureCache(schedule="dp", budget=6), calibration=calib_dir)
    assert no_hooks(mini)
    with accel.apply(mini, accel.FeatureCache(schedule="calibrated", budget=5), calibration=calib_dir):
        pass


def test_quantize_refuses_a_calibration_without_activation_scales(mini, calib_dir):
    with pytest.raises(CalibrationError) as e:
        accel.apply(mini, "w8a8", calibration=calib_dir)
    assert "no activation scales" in one_line(e) and "cachequant-dp" in str(e.value)
    assert no_hooks(mini) and all(type(m).__name__ not in ("QConv2d", "QLinear") for m in mini.unet.modules())
    with accel.apply(mini, accel.Quantize(mode="dynamic"), calibration=calib_dir):  # asked for: fine
        pass


def test_guidance_against_the_calibration(mini, calib_dir):
    """Made at 3.0: at 1.0 (no CFG, half the UNet batch) an error at the first UNet call; at 7.5 a warning; at 3.0
    nothing."""
    import warnings

    kw = dict(num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    with accel.apply(mini, "cachequant-dp", calibration=calib_dir):
        with pytest.raises(CalibrationError) as e:
            mini(PROMPT, guidance_scale=1.0, **kw)
        assert "guidance 3.0" in one_line(e) and "halves" in str(e.value)
        with pytest.warns(AccelWarning, match="made at guidance 3.0, this run uses 7.5"):
            mini(PROMPT, guidance_scale=7.5, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AccelWarning)
            assert torch.isfinite(mini(PROMPT, guidance_scale=miniature.GUIDANCE, **kw).images).all()
    assert no_hooks(mini)


def test_static_int8_at_another_step_count_is_refused(mini, tmp_path):
    """Per-call activation scales used at fewer UNet calls than calibrated would quantize call i with call i's
    scales of another trajectory: refused at the first UNet call, before the UNet runs."""
    from accel.calibrate import calibrate

    c = calibrate(mini, "w8a8", [PROMPT], steps=4, guidance=miniature.GUIDANCE, batch_size=1, progress=False)
    kw = dict(guidance_scale=miniature.GUIDANCE, output_type="latent")
    with accel.apply(mini, "w8a8", calibration=c):
        with pytest.raises(CalibrationError) as e:
            mini(PROMPT, num_inference_steps=3, **kw)
        assert "made for 5 UNet calls" in one_line(e) and "makes 4" in str(e.value)
        assert torch.isfinite(mini(PROMPT, num_inference_steps=4, **kw).images).all()
    with accel.apply(mini, accel.Quantize(mode="dynamic"), calibration=c):  # reads no calibration: any step count
        assert torch.isfinite(mini(PROMPT, num_inference_steps=3, **kw).images).all()


def test_compiled_unet_says_apply_first(mini):
    from diffusers import StableDiffusionPipeline

    compiled = StableDiffusionPipeline(**{**mini.components, "unet": torch.compile(mini.unet)})
    for target in (compiled, compiled.unet):
        with pytest.raises(UnsupportedModelError) as e:
            accel.apply(target, "deepcache-i3")
        assert "compiled" in one_line(e) and "apply first, then compile" in str(e.value)
    assert no_hooks(mini)


def test_from_pretrained_on_the_shipped_miniature_folder(mini):
    """Loading the miniature by path works like miniature.load_pipeline(): every component float32, same output."""
    apipe = accel.AcceleratedPipeline.from_pretrained(miniature.PIPELINE_DIR, recipe="deepcache-i3")
    assert {p.dtype for p in apipe.text_encoder.parameters()} == {torch.float32}
    kw = dict(num_inference_steps=3, guidance_scale=miniature.GUIDANCE, output_type="latent")
    got = apipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    with accel.apply(mini, "deepcache-i3"):
        want = mini(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_calibration_load_bad_folders(tmp_path, precious):
    from accel.calibration import Calibration

    for path, needle in [(tmp_path / "missing", "not a calibration folder"), (precious, "not a calibration folder")]:
        with pytest.raises(CalibrationError) as e:
            Calibration.load(path)
        assert needle in one_line(e)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "accel.json").write_text('{"format": "something-else"}')
    (bad / "calibration.safetensors").write_bytes(b"")
    with pytest.raises(CalibrationError) as e:
        Calibration.load(bad)
    assert "not an accel calibration" in one_line(e)


def test_calibration_save_refuses_what_it_did_not_write_and_replaces_a_calibration(calib_dir, tmp_path, precious):
    from accel.calibration import Calibration

    c = Calibration.load(calib_dir)
    before = snapshot(precious)
    with pytest.raises(AccelError) as e:
        c.save(precious)
    assert "not an accel calibration folder" in one_line(e)
    assert snapshot(precious) == before
    dest = c.save(tmp_path / "dest")  # new
    c.meta["prompts"]["count"] = 99
    c.save(tmp_path / "dest")  # replaces a calibration
    assert Calibration.load(dest).meta["prompts"]["count"] == 99
    empty = tmp_path / "empty"
    empty.mkdir()
    c.save(empty)  # an empty folder loses nothing
    assert sorted(p.name for p in empty.iterdir()) == ["accel.json", "calibration.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "empty", "precious"]


def test_calibrate_api_checks_come_first(mini, monkeypatch):
    import accel.calibrate

    def work(*a, **k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(accel.calibrate, "collect_features", work)
    for kwargs, needle in [(dict(recipe="deepcache-i3"), "uses no calibration"),
                           (dict(recipe="cachequant-dp", steps=4), "the default --budget 10"),
                           (dict(recipe="cachequant-dp", budget=0), "--budget must be >= 1"),
                           (dict(recipe="cachequant-dp", prompts=[]), "no calibration prompts"),
                           (dict(recipe="cachequant-dp", guidance=math.nan), "--guidance"),
                           (dict(recipe="cachequant-dp", refine_evals=0), "--refine-evals")]:
        with pytest.raises(ValueError) as e:
            accel.calibrate.calibrate(mini, progress=False, **kwargs)
        assert needle in one_line(e)


def test_write_text_atomic_leaves_nothing_on_failure(tmp_path):
    from accel.fileio import write_text_atomic

    d = tmp_path / "EXISTING_DIR"
    d.mkdir()
    with pytest.raises(AccelError, match="is a folder"):
        write_text_atomic(d, "x")
    f = tmp_path / "r.json"
    f.write_text("old")
    with pytest.raises(TypeError):
        write_text_atomic(f, None)
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING_DIR", "r.json"]
