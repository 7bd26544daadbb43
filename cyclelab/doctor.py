"""Environment self-check: ``cyclelab doctor``, or ``print(cyclelab.doctor.report())`` in a notebook.

Each check gives a name, whether it passed, and a detail: what was found, or, when
it failed, the one-line fix.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable, NamedTuple

SETUP = "run `bash scripts/dev.sh setup` from the repository root"


class Check(NamedTuple):
    """One line of the doctor's report."""

    check: str
    ok: bool
    detail: str


def run_checks() -> list[Check]:
    """Run every check; a check that crashes is reported as failed, never raised."""
    checks: list[Check] = []
    for probe in (
        _python,
        _torch,
        _transformers,
        _device,
        _cache,
        _assets,
        _smollm2_cache,
        _tiny,
        _kernel,
        _own_kernels,
    ):
        try:
            result = probe()
        except PermissionError as err:  # a shared cache written under a hardened umask, most likely
            result = Check(probe.__name__.lstrip("_"), False, f"{type(err).__name__}: {err}; {_permission_fix()}")
        except Exception as err:  # a broken install must still give a report
            result = Check(probe.__name__.lstrip("_"), False, f"{type(err).__name__}: {err}; {SETUP}")
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def report(checks: list[Check] | None = None) -> str:
    """The checks as a plain-text table; paths under the repository read ``<repo>/…`` and paths
    under the home folder ``~/…``, so the report reads the same on every machine."""
    checks = run_checks() if checks is None else checks
    width = max(len(c.check) for c in checks)
    lines = [f"{c.check.ljust(width)}  {'ok ' if c.ok else 'FIX'}  {short_paths(c.detail)}" for c in checks]
    bad = sum(not c.ok for c in checks)
    lines.append("all checks passed" if not bad else f"{bad} problem(s): see FIX lines")
    return "\n".join(lines)


def short_paths(text: str) -> str:
    """``text`` with the repository root written ``<repo>`` and the home folder ``~``."""
    from pathlib import Path

    repo = str(Path(__file__).resolve().parent.parent)
    return text.replace(repo, "<repo>").replace(str(Path.home()), "~")


def _version_check(name: str, module: str) -> Callable[[], Check]:
    def probe() -> Check:
        try:
            mod = __import__(module)
        except ImportError as err:
            return Check(name, False, f"not importable ({err}); {SETUP}")
        return Check(name, True, mod.__version__)

    probe.__name__ = name
    return probe


def _python() -> Check:
    ok = sys.version_info >= (3, 10)
    detail = f"{platform.python_version()} at {sys.executable}"
    return Check("python", ok, detail if ok else f"{detail}; need >= 3.10: install Python 3.11, then {SETUP}")


_torch = _version_check("torch", "torch")
_transformers = _version_check("transformers", "transformers")


def _device() -> Check:
    from cyclelab.loading.device import pick_device

    try:
        device = pick_device()
    except ValueError as err:
        return Check("device", False, f"{err}; or `unset CYCLELAB_DEVICE` to choose automatically")
    note = "" if device.type != "cpu" else " (no GPU found: the course runs on CPU)"
    return Check("device", True, f"{device}{note}")


def _cache() -> Check:
    from cyclelab.loading.cache_guard import blocking
    from cyclelab.loading.fetch import cache_dir, cache_writable

    try:
        root = cache_dir()
    except NotADirectoryError as err:
        return Check("cache", False, f"{err}: e.g. `export CYCLELAB_CACHE=~/.cache/cyclelab`")
    problem = blocking(root, "run `cyclelab fetch`")
    if problem:
        return Check("cache", False, problem)
    closed = unreadable(root)
    if closed:
        first = closed[0]
        return Check("cache", False, f"{len(closed)} entries unreadable for you, e.g. {first}; {_permission_fix()}")
    return Check("cache", True, f"{root} ({'writable' if cache_writable() else 'read-only for you'})")


def unreadable(root: Path) -> list[Path]:
    """The folders under ``root`` (itself included) this user cannot list or enter, and the files
    it cannot open: what a cache written by an admin with umask 027 looks like to a learner."""
    closed: list[Path] = []
    if not root.exists():
        return closed
    for folder, _, files in os.walk(root, onerror=lambda err: closed.append(Path(err.filename))):
        if not os.access(folder, os.R_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            closed.append(Path(folder))
            continue
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb"):
                    pass
            except PermissionError:
                closed.append(Path(folder, name))
    return sorted(set(closed))


def _permission_fix() -> str:
    """The fix for a cache this user may not read: one admin command."""
    from cyclelab.loading.fetch import cache_dir

    return f"an admin must make the shared cache readable: `sudo chmod -R a+rX {cache_dir()}`"


def _assets() -> list[Check]:
    from cyclelab.loading.cache_guard import diagnose
    from cyclelab.loading.checksums import ModelFileError
    from cyclelab.loading.fetch import PACKAGES, asset_path, cache_dir, fetch_command, is_fetched, verify_asset

    try:
        cache_dir()
    except NotADirectoryError:
        return [Check("assets", False, "not checked: the cache is not a folder (see the `cache` line)")]
    checks = []
    for key in PACKAGES:
        problem = diagnose(PACKAGES[key].folder, fetch_command(key), cache_dir())
        if problem or not is_fetched(key):
            checks.append(Check(f"asset {key}", False, problem or f"missing; {fetch_command(key)}"))
            continue
        try:
            verify_asset(key)
            checks.append(Check(f"asset {key}", True, f"{asset_path(key)} (checksums match)"))
        except ModelFileError as err:
            checks.append(Check(f"asset {key}", False, str(err)))
    return checks


def _smollm2_cache() -> Check:
    from cyclelab.loading.cache_guard import diagnose
    from cyclelab.loading.checksums import ModelFileError, verify_folder
    from cyclelab.loading.fetch import cache_dir, fetch_command, smollm2_cache

    name = "smollm2 safetensors"
    try:
        folder = smollm2_cache()
    except NotADirectoryError:
        return Check(name, False, "not checked: the cache is not a folder (see the `cache` line)")
    problem = diagnose(folder, fetch_command("smollm2"), cache_dir())
    if problem:
        return Check(name, False, problem.replace(" is missing:", " is not converted yet:"))
    try:  # required, as load() requires it: a cache without its SHA256SUMS is refused by both
        verify_folder(folder, fetch_command("smollm2"), required=True)
    except ModelFileError as err:
        return Check(name, False, f"{err} (load('smollm2') refuses it too)")
    return Check(name, True, f"{folder} (checksums match)")


def _tiny() -> list[Check]:
    from cyclelab.loading import loader
    from cyclelab.loading.checksums import ModelFileError, read_sums, shipped_hashes, verify_folder

    checks = []
    for name in ("tiny", "tiny-mlm"):
        folder = loader.REPO_DATA / name
        repair = f"run `git checkout data/{name}`"
        try:
            if not folder.is_dir():
                raise ModelFileError(f"{folder} is missing. To repair: {repair}.")
            verify_folder(folder, repair, required=True, shipped=shipped_hashes(name))  # as load() checks it
            changed = sorted(k for k, v in shipped_hashes(name).items() if read_sums(folder, repair).get(k) != v)
            note = (  # a retrained model is recorded so (train-tiny writes data/<name>): not damage, but say so
                f"; {', '.join(changed)} differ from the model this cyclelab ships (retrained here, or changed "
                f"and its SHA256SUMS recomputed): `git checkout data/{name}` restores the shipped one"
                if changed
                else ""
            )
            checks.append(Check(f"{name} model", True, f"{folder} (checksums match{note})"))
        except ModelFileError as err:
            checks.append(Check(f"{name} model", False, str(err)))
    return checks


def _kernel() -> Check:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" in specs:
        return Check("jupyter kernel", True, f"python3 at {specs['python3']}")
    return Check("jupyter kernel", False, f"no 'python3' kernel; {SETUP}")


def _own_kernels() -> Check:
    """Whether the engine's own C kernels are built and loaded, where, and if not, why (the engine then runs on
    torch's kernels: the same numbers, more slowly)."""
    from cyclelab.kernels import build, choice

    found = build.status()
    if found.library is not None:
        return Check("own kernels", True, f"{found.line().removeprefix('own C kernels: ')}; {choice.status_line()}")
    if build.mode() == "torch":
        return Check("own kernels", True, found.line().removeprefix("own C kernels: "))
    return Check(
        "own kernels",
        False,
        f"{found.reason}; the engine runs on torch's kernels. Install a C compiler "
        "(apt-get install gcc), or set CYCLELAB_KERNELS=torch to choose torch's",
    )
