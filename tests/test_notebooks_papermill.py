"""Each chapter notebook through papermill, the way ``cyclelab course`` runs it.

nbval already runs every notebook with its default (fast) parameters. A notebook that
declares other parameters in its metadata, ``{"cyclelab": {"papermill_alt": {...}}}``,
is run here with those instead (another model, other lengths), so the parameter cell
and the non-default path are exercised; one without them runs with no parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cyclelab.course import list_notebooks, run_notebook

NOTEBOOKS = list_notebooks()


def alt_parameters(path: Path) -> dict:
    """The notebook's ``cyclelab.papermill_alt`` metadata, or no parameters."""
    metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    return dict(metadata.get("cyclelab", {}).get("papermill_alt", {}))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_under_papermill(path: Path, tmp_path: Path) -> None:
    run = run_notebook(path, tmp_path, alt_parameters(path))
    assert run.ok, f"{run.notebook} failed with {alt_parameters(path)}: {run.error} (output: {run.output})"
