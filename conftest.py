"""Test order for the test command's two xdist workers (``--dist loadscope --no-loadscope-reorder``).

Each notebook and each test module is one scope that runs on one worker. Scopes start in the order
collected here: the longest first (the notebooks by the fast-profile cost in their labels, the modules known
to be slow for their size by MODULE_SECONDS), so that no long scope starts last and runs alone at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

#: Test modules that take long for their number of tests (grading a class, browsers, subprocesses, smollm2
#: runs): about the seconds their slowest tests took on 2 cores (``--durations``), to rank them with the notebooks.
MODULE_SECONDS = {
    "test_grade_cheats.py": 175.0,
    "test_grade.py": 52.0,
    "test_browser_view.py": 47.0,
    "test_kernel_build.py": 34.0,
    "test_nbgrader.py": 33.0,
    "test_engine.py": 28.0,
    "test_faults.py": 22.0,
    "test_learner_process.py": 18.0,
    "test_packaging.py": 17.0,
    "test_workshop.py": 12.0,
    "test_notebooks_papermill.py": 11.0,
    "test_browser.py": 10.0,
}
COST = re.compile(r"\*\*Cost, fast profile:\*\* ([\d.]+) s[^\n]*<!-- cost:fast -->")


def notebook_cost(path: Path) -> float:
    """Seconds in a notebook's fast-profile cost label; 0 when it has none."""
    try:
        first = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return 0.0
    match = COST.search("".join(first.get("source", "")))
    return float(match.group(1)) if match else 0.0


def scope_rank(path: Path, costs: dict[Path, float]) -> float:
    """Sort key of a scope: minus its expected seconds (notebooks by their fast cost label, the slow modules by
    MODULE_SECONDS, any other 0), so the longest start first."""
    if path.suffix == ".ipynb":
        if path not in costs:
            costs[path] = notebook_cost(path)
        return -costs[path]
    return -MODULE_SECONDS.get(path.name, 0.0)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    inject_profile(items)
    costs: dict[Path, float] = {}
    items.sort(key=lambda item: scope_rank(Path(item.path), costs))  # stable: a scope's own order is kept


# ------------------------------------------------------------------ the profile nbval runs
#: The profile whose parameters the test command injects into each notebook (``CYCLELAB_NBVAL_PROFILE``).
NBVAL_PROFILE_ENV = "CYCLELAB_NBVAL_PROFILE"


def inject_profile(items: list) -> None:
    """Give each notebook's ``parameters`` cell (in memory only) the chosen profile's values: the committed
    notebook holds the learner's run, the test command runs ``fast``."""
    import os

    from cyclelab.workshop.course import with_profile

    profile = os.environ.get(NBVAL_PROFILE_ENV, "fast")
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source = with_profile(cell.source, Path(item.path), profile)
