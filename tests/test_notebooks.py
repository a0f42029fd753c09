"""The notebooks in notebooks/: committed executed, with their figures (a reader of the repository sees the plots;
`make notebooks` regenerates them), and each runs top to bottom on the miniature and draws its figures."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "notebooks"))
import execute  # noqa: E402  (notebooks/execute.py: what `make notebooks` runs)


def test_there_are_notebooks():
    assert {"cache_schedules", "quickstart", "scalelong_stability"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_shows_its_figures(path):
    """Committed executed: every code cell ran, in order, without error, and every plt.show() left a PNG."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not executed: run `make notebooks`"
    assert not execute.errors(nb)
    shown = execute.figures(nb)
    assert shown and all(n >= 1 for n in shown), f"figures per plt.show() cell: {shown}"
    assert not any('matplotlib.use("Agg")' in c.source for c in code)  # the non-interactive backend draws nothing


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_draws_its_figures(path):
    nb = execute.execute(path, timeout=1800)
    assert not execute.errors(nb)
    shown = execute.figures(nb)
    assert shown and all(n >= 1 for n in shown), f"figures per plt.show() cell: {shown}"
