"""Execute notebooks in place the way their committed outputs are made, and keep only what a reader can show.

    .venv/bin/python scripts/store_outputs.py notebooks/00_the_clock_cycle.ipynb [more ...]

Each notebook runs top to bottom on a fresh kernel with the notebook's own parameters (CPU, quiet progress
bars, no network for models), without the widgets' state. A widget's output then keeps only its text and
its still picture: the widget view is dropped, since without its state JupyterLab would show "model not
found" where the picture can show (the live widget returns when the cell runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
ENV = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def without_widget_views(nb: nbformat.NotebookNode) -> int:
    """Drop every widget view (and the notebook's widget state) from ``nb``'s outputs; how many were dropped."""
    dropped = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if WIDGET_VIEW in out.get("data", {}):
                del out["data"][WIDGET_VIEW]
                dropped += 1
    nb.metadata.pop("widgets", None)
    return dropped


def store(path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CYCLELAB_KERNELS"} | ENV
    jupyter = Path(sys.executable).with_name("jupyter")
    subprocess.run(
        [str(jupyter), "nbconvert", "--to", "notebook", "--execute", "--inplace"]
        + ["--ExecutePreprocessor.timeout=1200", "--ExecutePreprocessor.store_widget_state=False", str(path)],
        check=True,
        env=env,
    )
    nb = nbformat.read(path, as_version=4)
    if without_widget_views(nb):
        nbformat.write(nb, path)


if __name__ == "__main__":
    for name in sys.argv[1:] or sys.exit(__doc__):
        store(Path(name))
