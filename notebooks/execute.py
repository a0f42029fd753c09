"""Run notebooks top to bottom and store them with their outputs and figures (``make notebooks``), so that a
reader of the repository sees the plots; a notebook is rewritten only if every cell ran without error.

    python notebooks/execute.py [NOTEBOOK ...]      # default: every notebook in notebooks/

Each runs in a fresh kernel (this Python) inside an empty temporary folder, on the thread count the
environment sets (``make notebooks`` sets OMP_NUM_THREADS=1). Library progress bars (model loading) and tqdm's
note that ipywidgets is missing are kept out of the stored outputs: they are noise to a reader.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def execute(path: str | Path, timeout: int = 3600):
    """The notebook at ``path``, executed (raises ``nbclient.exceptions.CellExecutionError`` on a failing cell)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    quiet = "import warnings; warnings.filterwarnings('ignore', message='IProgress not found')"
    env = dict(os.environ, TQDM_DISABLE="1")  # tqdm's default for every bar the libraries draw
    with tempfile.TemporaryDirectory() as cwd:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       extra_arguments=[f"--IPKernelApp.exec_lines={quiet}"],
                       resources={"metadata": {"path": cwd}}).execute(env=env)
    return nb


def figures(nb) -> list[int]:
    """Per code cell that calls ``plt.show()``, how many PNG images its outputs hold (what a reader sees)."""
    return [sum("image/png" in o.get("data", {}) for o in c.get("outputs", []))
            for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]


def errors(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def main(paths: list[str]) -> int:
    import nbformat

    from accel.fileio import write_text_atomic

    for p in paths or sorted(HERE.glob("*.ipynb")):
        print(f"executing {p} ...", flush=True)
        nb = execute(p)
        write_text_atomic(p, nbformat.writes(nb) + "\n")
        print(f"  {p}: {sum(figures(nb))} figures", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
