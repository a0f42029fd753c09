"""`accel bench` writes its report (cost model section; the full run is `make bench`)."""
import subprocess
import sys

from accel.bench import ideal_speedup


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
