"""Execute notebooks the way their committed outputs are made, keep only what a reader can show, and label
each with what the stored run cost.

    .venv/bin/python scripts/store_outputs.py notebooks/00_the_clock_cycle.ipynb [more ...]

Each notebook runs top to bottom on a fresh kernel through the course runner (papermill) with the values of
its own parameters cell: the learner's (full) profile, on the CPU, with quiet progress bars and no network
for models. The executed notebook replaces the source without the runner's bookkeeping (papermill's
metadata and timings) and without the widgets' state: a widget's output keeps its text and its still
picture, since without the state JupyterLab would show "model not found" (the live widget returns when the
cell runs). The run's seconds and peak memory become the chapter's full-profile cost label, so the label
and the stored outputs come from the same run. A notebook with a failing cell is left as it was; the others are stored, and the script exits non-zero.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

from cyclelab.workshop.course import run_notebook, write_cost_label

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
ENV = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
BY = "`scripts/store_outputs.py`, the run stored here"
CHAPTER = re.compile(r"\d\d_")


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


def without_runner_metadata(nb: nbformat.NotebookNode) -> None:
    """Drop what papermill and the notebook client add: run metadata, per-cell timings, empty tag lists."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]


def store(path: Path) -> bool:
    os.environ.pop("CYCLELAB_KERNELS", None)
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_notebook(path, Path(tmp))
        if not run.ok:
            print(f"{path.name} failed, nothing stored: {run.error}", file=sys.stderr, flush=True)
            return False
        nb = nbformat.read(run.output, as_version=4)
    without_widget_views(nb)
    without_runner_metadata(nb)
    nbformat.write(nb, path)
    if CHAPTER.match(path.name):  # the bug hunt carries its own label
        write_cost_label(path, run, "full", by=BY)
    print(f"{path.name}: stored, {run.seconds:.0f} s", flush=True)
    return True


if __name__ == "__main__":
    failed = [name for name in sys.argv[1:] or sys.exit(__doc__) if not store(Path(name))]
    sys.exit(f"not stored: {', '.join(failed)}" if failed else 0)
