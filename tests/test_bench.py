"""`accel bench` writes its report (cost model section; the full run is `make bench`)."""
import subprocess
import sys

import torch

from accel.bench.common import ideal_speedup


def test_ideal_speedup():
    assert ideal_speedup(10, 10, 5.0, 1.0) == 1.0
    assert ideal_speedup(10, 2, 1.0, 0.0) == 5.0


def test_bench_writes_report(tmp_path):
    out = tmp_path / "B.md"
    subprocess.run([sys.executable, "-m", "accel", "bench", "--quick", "--sections", "cost,gpu", "--out", str(out),
                    "--quiet"], check=True, capture_output=True)
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "accel bench" in text and "no GPU" in text
    assert "| 0 |" in text and "ideal i5" in text  # the per-branch cost table
    assert "Not run: this machine has no CUDA device" in text


def test_pipeline_flops_agrees_with_the_per_call_cost_model(tokenizer_dir):
    """FLOPs counted over a whole pipeline call equal the cost model's full/cached-call arithmetic for a
    cache, and an inheritance schedule counts less than the baseline by exactly the skipped calls' work."""
    import accel
    from accel.bench.common import accel_cache, baseline, call_flops, pipeline_flops, with_calibration

    from conftest import make_pipe

    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    full, cached = call_flops(pipe, 0, 8)
    assert pipeline_flops(pipe, baseline(), 6, 8) == 6 * full
    assert pipeline_flops(pipe, accel_cache(2, 0), 6, 8) == 3 * full + 3 * cached
    inherit = with_calibration("inherit", accel.Inherit(targets="mid_block", every=3), None)
    two_calls = pipeline_flops(pipe, with_calibration("mid", accel.Inherit(targets="mid_block", steps=[1]), None), 2, 8)
    skipped = 2 * full - two_calls  # call 1 without the mid block
    assert 0 < skipped < full
    assert pipeline_flops(pipe, inherit, 6, 8) == 6 * full - 4 * skipped


def test_gpu_bench_dry_run_and_not_run(tmp_path, monkeypatch):
    """`accel bench --gpu` runs its three sections' code on CPU with tiny models (--dry-run), marked as such;
    without --dry-run on a machine without CUDA the report is 'not run' and nothing else."""
    from accel.bench import gpu as bench_gpu
    from accel.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path / "cache"))  # the select=speed row's measurements
    out = tmp_path / "gpu.md"
    assert main(["bench", "--gpu", "--out", str(out)]) == 0
    assert out.read_text() == bench_gpu.NOT_RUN
    assert main(["bench", "--gpu", "--dry-run", "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert text.startswith("# GPU benchmark: DRY RUN on CPU") and "not GPU figures" in text
    assert "**NO**" not in text and text.count("**yes**") >= 8  # section (a): every kernel's integers exact
    for model in ("SD-like tiny", "SDXL-like tiny"):
        assert f"## (b) Layer throughput: {model}" in text and f"## (c) End to end: {model}" in text
    ind = " + torch.compile (inductor, CUDA graphs: mode=reduce-overhead) |"
    rows = ["| float |", "| float + torch.compile |", "| cache I=5 |", "| W8A8 (static, per-call scales) |",
            "| W8A8 + torch.compile |", "| cachequant-w8a8 (2 full calls) |", "| float + CUDA graphs |",
            "| W8A8 + CUDA graphs |", "| cache only, cachequant-w8a8's schedule (2 full calls) + CUDA graphs |",
            "| cachequant-w8a8 (2 full calls) + CUDA graphs |", "| float" + ind, "| W8A8" + ind,
            "| W8A8, only the layers measured faster (select=speed) + CUDA graphs |", "| fp8 + CUDA graphs |",
            "| cachequant-w8a8 (2 full calls)" + ind]
    for row in rows:
        assert text.count(row) == 2, row  # both models
    assert "failed" not in text and "not run" not in text and "GiB" in text and " n/a " in text  # no GPU memory on CPU
    # --quick: the same functions (just run), other rows and the ten heaviest layer shapes; rows not re-measured here
    monkeypatch.setattr(bench_gpu, "_measure", lambda plan, pipe, call, transforms, cal, compiled: (1.0, 1.0, "n/a", 1))
    assert main(["bench", "--gpu", "--dry-run", "--quick", "--out", str(out), "--quiet"]) == 0
    quick = out.read_text()
    assert "--quick" in quick and "failed" not in quick and "| float + torch.compile |" not in quick
    assert all(quick.count(row) == 2 for row in rows if row not in ("| float + torch.compile |", "| W8A8 + torch.compile |",
                                                                     "| cachequant-w8a8 (2 full calls) |"))
    assert quick.count("lighter shapes (by MACs x calls) | | not timed: the quick run times the 10 heaviest") == 2


def test_flop_counter_counts_quantized_layers_as_their_float_layers(tokenizer_dir):
    """The int8 custom ops have FLOP formulas: a W8A8 pipeline call counts the float call's FLOPs (the FLOP-ideal
    speedup of a composition with W8A8 is that of its cache), and the split shortcut's two halves add up."""
    import accel
    from accel.bench.common import baseline, pipeline_flops, with_calibration

    from conftest import make_pipe

    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    base = pipeline_flops(pipe, baseline(), 3, 8)
    w8a8 = with_calibration("w8a8", accel.Quantize(mode="dynamic"), None)
    assert base > 0 and pipeline_flops(pipe, w8a8, 3, 8) == base
    both = with_calibration("cache + w8a8", [accel.FeatureCache(schedule=[0]), accel.Quantize(mode="dynamic")], None)
    cache = with_calibration("cache", accel.FeatureCache(schedule=[0]), None)
    assert pipeline_flops(pipe, both, 3, 8) == pipeline_flops(pipe, cache, 3, 8) < base


def test_timing_reads_full_calls_from_caches_and_runs_every_other_method(tokenizer_dir):
    """The speed table's timer records what a cache spent (an adaptive one decides per call) and times methods
    whose handle has no per-call cache statistics (inheritance, W8A8) as well."""
    import accel
    from accel.bench.common import accel_cache, baseline, time_methods, with_calibration

    from conftest import make_pipe

    pipe = make_pipe("sd", tokenizer_dir, scheduler="DDIMScheduler")
    methods = [baseline(), accel_cache(2, 0),
               with_calibration("inherit", accel.Inherit(targets="mid_block", every=2), None),
               with_calibration("adaptive", accel.FeatureCache(schedule="adaptive", threshold=0.5), None)]
    times = time_methods(pipe, methods, 6, 8, repeats=2, progress=False)
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    assert methods[1].spent == [3, 3] and methods[2].spent == [] and methods[0].spent == []
    assert len(methods[3].spent) == 2 and all(1 <= k <= 6 for k in methods[3].spent)


def test_gpu_bench_sections_fail_alone_and_report_as_they_go(monkeypatch):
    """A section that breaks is reported in one line and the next one runs; after every section the report so far
    goes to ``emit``; with the time budget spent, sections are reported "not run" and not started."""
    from accel.bench import gpu as bench_gpu

    plan = bench_gpu.dry_plan()
    plan.models = plan.models[:1]
    monkeypatch.setattr(bench_gpu, "kernel_checks", lambda plan: ("| kernels |", True))
    monkeypatch.setattr(bench_gpu, "build_pipeline", lambda *a: "pipe")

    def broken(plan, model, pipe):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(bench_gpu, "end_to_end", broken)
    monkeypatch.setattr(bench_gpu, "layer_throughput", lambda plan, model, pipe: f"table of {pipe}\n")
    parts = []
    text = bench_gpu.run(plan, "accel bench --gpu --dry-run", emit=parts.append)
    assert "## (c) End to end: SD-like tiny (64 px), 3 steps\n\n**Failed**: `RuntimeError: boom`\n" in text
    assert "## (b) Layer throughput: SD-like tiny (64 px)\n\ntable of pipe\n" in text
    assert len(parts) == 3 and parts[-1] == text and all(text.startswith(p) for p in parts)

    def must_not_run(*a):
        raise AssertionError("started past the time budget")

    plan = bench_gpu.dry_plan()
    plan.models, plan.time_budget_s = plan.models[:1], 0.0
    monkeypatch.setattr(bench_gpu, "end_to_end", must_not_run)
    monkeypatch.setattr(bench_gpu, "layer_throughput", must_not_run)
    monkeypatch.setattr(bench_gpu, "build_pipeline", must_not_run)
    text = bench_gpu.run(plan, "accel bench --gpu --dry-run")
    assert text.count("Not run: under") == 2 and "**Failed**" not in text


def test_gpu_bench_end_to_end_rows_fail_alone(monkeypatch):
    """One end-to-end row that breaks (or a calibration that does) is a row saying so; the others are measured."""
    import accel.calibrate
    from accel.bench import gpu as bench_gpu

    def measure(plan, pipe, call, transforms, cal, compiled):
        if compiled:
            raise RuntimeError("no compiler here")
        return 2.0 if transforms is None else 1.0, 3.0, "n/a", 2**20

    def calibrate(*a, **k):
        raise ValueError("no prompts")

    monkeypatch.setattr(bench_gpu, "_measure", measure)
    monkeypatch.setattr(accel.calibrate, "calibrate", calibrate)
    plan = bench_gpu.dry_plan()
    text = bench_gpu.end_to_end(plan, plan.models[0], None)
    assert "| float | 2.00 | 1.00x | 3.0 | n/a | 1.0 |" in text
    assert "| cache I=5 | 1.00 | 2.00x | 3.0 | n/a | 1.0 |" in text
    compiled = sum(bool(c) for _, _, c in bench_gpu.e2e_rows(plan))
    assert compiled >= 8 and text.count("failed: `RuntimeError: no compiler here`") == compiled  # every compiled row
    assert "calibration" in text.lower() and "failed (`ValueError: no prompts`)" in text


def test_gpu_bench_cli_leaves_the_partial_report(tmp_path, monkeypatch):
    """`accel bench --gpu` writes the report after every section: a run that dies leaves what it measured, marked
    partial."""
    from accel.bench import gpu as bench_gpu
    from accel.cli import main

    def run(plan, line, emit=None):
        emit("# GPU benchmark: DRY RUN on CPU\n\n## (a) Kernels against the reference\n\n| kernels |\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_gpu, "run", run)
    out = tmp_path / "gpu.md"
    assert main(["bench", "--gpu", "--dry-run", "--out", str(out)]) != 0  # "accel: interrupted"
    text = out.read_text()
    assert text.startswith("# GPU benchmark: DRY RUN on CPU\n\n## (a) Kernels") and text.endswith(bench_gpu.PARTIAL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--gpu", "--out", str(out)]) == 0  # a partial report is ours: it may be replaced
    assert out.read_text() == bench_gpu.NOT_RUN


def test_gpu_probe_scripts_run(tmp_path):
    """scripts/gpu_split.py and scripts/gpu_profile.py (the H200 diagnosis the README quotes) run on CPU with tiny
    shapes: their code stays working for the next GPU session."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for script, args, rows in (("gpu_split.py", [], 2), ("gpu_profile.py", ["--fused"], 10)):
        res = subprocess.run([sys.executable, str(root / "scripts" / script), *args], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 0 and "Traceback" not in out and "FAILED" not in out, out[-2000:]
        assert out.count("\n| ") >= rows, out[-2000:]  # one table row per layer shape


def test_host_overhead_script_measures_both_paths():
    """scripts/host_overhead.py (the README's eager host cost per quantized layer call) runs and measures the
    direct call and the custom op's dispatcher; the figures themselves are machine-dependent (not asserted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from accel import kernels

    tk = kernels.triton_module()
    saved = tk.gemm, tk.conv2d
    try:
        out = mod.measure(calls=20)
    finally:
        tk.gemm, tk.conv2d = saved
    assert set(out) == {"nn.Linear", "nn.Conv2d", "QLinear", "QConv2d", "QLinear via the op", "QConv2d via the op"}
    assert all(v > 0 for v in out.values())
