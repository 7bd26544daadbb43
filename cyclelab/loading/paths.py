"""Where the repository's shipped data lives; no imports beyond pathlib, so light modules can use it."""

from __future__ import annotations

from pathlib import Path

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
LESSONS = REPO_DATA / "lessons"  # the course's lessons, one per stage of the cycle (scripts/record_lessons.py)
LAB_OVERRIDES = REPO_DATA / "jupyterlab" / "overrides.json"  # quiet JupyterLab settings (workshop kit)
