"""Each chapter notebook through papermill, the way ``cyclelab course`` runs it.

nbval already runs every notebook with its fast profile. A notebook that
declares other parameters in its metadata, ``{"cyclelab": {"papermill_alt": {...}}}``,
is run here with those instead (another model, other lengths), so the parameter cell
and the non-default path are exercised; one without them runs with no parameters.

One test class per notebook: the test command distributes tests by class (``--dist
loadscope``), so the chapters' papermill runs share the workers instead of queueing on one.

The test command runs chapter 00's (the runner's own path: papermill, the injected parameters,
the kernel) and leaves the other chapters' alternative runs to ``CYCLELAB_SLOW=1``: nbval already
executes every chapter in the same test command, and the other chapters' runs cost minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cyclelab.workshop.course import cyclelab_metadata, list_notebooks, run_notebook

NOTEBOOKS = list_notebooks()


def alt_parameters(path: Path) -> dict:
    """The notebook's ``cyclelab.papermill_alt`` metadata, or no parameters."""
    return dict(cyclelab_metadata(path).get("papermill_alt", {}))


class _Papermill:
    path: Path

    def test_runs_under_papermill(self, tmp_path: Path) -> None:
        run = run_notebook(self.path, tmp_path, alt_parameters(self.path), profile="fast")
        assert run.ok, f"{run.notebook} failed with {alt_parameters(self.path)}: {run.error} (output: {run.output})"


IN_TEST_COMMAND = {"00"}

for _path in NOTEBOOKS:
    _number = _path.stem.split("_")[0]
    _name = "TestChapter" + _path.stem  # unique: two notebooks may share a chapter number (06)
    _class = type(_name, (_Papermill,), {"path": _path})
    globals()[_name] = _class if _number in IN_TEST_COMMAND else pytest.mark.slow(_class)
