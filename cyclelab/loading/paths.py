"""Where the repository's shipped data lives; only standard-library imports, so light modules can use it.

In a checkout it is the repository's ``data/``; a wheel installs the same files under ``<prefix>/share/cyclelab``
(``pyproject.toml``'s data files), found through :mod:`sysconfig` (the environment's prefix, else the user's).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "data"  # the repository's data/, next to pyproject.toml


def installed_data() -> list[Path]:
    """Where an installed wheel put the data: the environment's ``share/cyclelab``, the user scheme's, and the one
    beside the package (``pip install --target DIR`` puts it in ``DIR/share/cyclelab``)."""
    folders = [Path(sysconfig.get_path("data")) / "share" / "cyclelab"]
    if f"{os.name}_user" in sysconfig.get_scheme_names():  # pip install --user
        folders.append(Path(sysconfig.get_path("data", f"{os.name}_user")) / "share" / "cyclelab")
    folders.append(Path(__file__).resolve().parents[2] / "share" / "cyclelab")
    return folders


def find_data(checkout: Path = CHECKOUT_DATA, installed: list[Path] | None = None) -> Path:
    """The checkout's ``data/`` (when it sits next to ``pyproject.toml``), else the first installed copy that holds
    the tiny model, else the checkout's path (its absence is reported where a file is looked up)."""
    if (checkout.parent / "pyproject.toml").is_file():
        return checkout
    for folder in installed_data() if installed is None else installed:
        if (folder / "tiny" / "config.json").is_file():
            return folder
    return checkout


REPO_DATA = find_data()
LESSONS = REPO_DATA / "lessons"  # the course's lessons, one per stage of the cycle (scripts/record_lessons.py)
LAB_OVERRIDES = REPO_DATA / "jupyterlab" / "overrides.json"  # quiet JupyterLab settings (workshop kit)
