"""Test order for the test command's two xdist workers (``--dist loadscope --no-loadscope-reorder``).

Each notebook and each test module is one scope that runs on one worker. Scopes start in the order
collected here: the longest first (the notebooks, by the fast-profile cost in their labels; then the
modules known to be slow for their size), so that no long scope starts last and runs alone at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

#: Test modules that take long for their number of tests: browsers, subprocesses, smollm2 runs.
SLOW_MODULES = (
    "test_browser_view.py",
    "test_browser.py",
    "test_workshop.py",
    "test_grade.py",
    "test_learner_process.py",
    "test_engine.py",
    "test_notebooks_papermill.py",
)
COST = re.compile(r"cost:fast -->.*?([\d.]+) s")


def notebook_cost(path: Path) -> float:
    """Seconds in a notebook's fast-profile cost label; 0 when it has none."""
    try:
        first = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return 0.0
    match = COST.search("".join(first.get("source", "")))
    return float(match.group(1)) if match else 0.0


def scope_rank(path: Path, costs: dict[Path, float]) -> tuple[int, float]:
    """Sort key of a scope: notebooks by cost (longest first), then the slow modules, then the rest."""
    if path.suffix == ".ipynb":
        if path not in costs:
            costs[path] = notebook_cost(path)
        return (0, -costs[path])
    if path.name in SLOW_MODULES:
        return (1, SLOW_MODULES.index(path.name))
    return (2, 0)


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
