"""Check the declared version range: build a scratch environment, run the checks, print a table.

    python scripts/compat.py oldest|newest [--python PY] [--local-torch VERSION] [--reuse] [--pytest ARGS]

``oldest`` installs every dependency of pyproject.toml (and of its ``dev`` extra) at its
floor, the lowest version its specifier allows; ``newest`` lets pip take the newest
allowed. The scratch virtualenv lives in ``.compat/PROFILE/`` (git-ignored). In it we run
the package tests (``tests/``, without the ``slow`` and ``browser`` marks) and the fast
course (``cyclelab course``), then print a Markdown table of the installed versions and of
what passed, and write it to ``docs/compat-PROFILE.md``.

torch: PyPI's Linux wheels are CUDA builds, so torch never comes from PyPI here. With
``CYCLELAB_TORCH_INDEX`` (a pip --index-url, e.g. https://download.pytorch.org/whl/cpu) the
profile's torch comes from that index; without it, ``--local-torch`` (the version dev.sh
pins) is installed, as dev.sh does. The table says which. ``bash scripts/dev.sh compat``
calls this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("oldest", "newest")
INDIRECT = ("huggingface-hub",)  # not declared, but where drift shows first: listed for reference
PYTEST_ARGS = ["-n", "2", "--dist", "loadscope", "-m", "not slow and not browser", "-q", "-rfE"]
COURSE_ROW = re.compile(r"^(\d\d_\S+\.ipynb)\s+(ok|failed)\s+([\d.]+)")


@dataclass
class Check:
    """One line of the result table."""

    name: str
    ok: bool
    detail: str
    seconds: float
    errors: list[str] = field(default_factory=list)


def declared() -> list[Requirement]:
    """The dependencies of pyproject.toml and of its ``course`` and ``dev`` extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["course"] + extras["dev"]]


def floor(req: Requirement) -> str:
    """The lowest version ``req`` allows (its ``>=``, ``==`` or ``~=`` bound)."""
    bounds = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if len(bounds) != 1:
        raise ValueError(f"pyproject.toml: {req} needs exactly one lower bound (>=) for the oldest profile")
    return bounds[0]


def pins(profile: str, reqs: list[Requirement]) -> list[str]:
    """pip arguments that pin every package but torch at its floor (oldest), or none (newest)."""
    if profile == "newest":
        return []
    return [f"{r.name}=={floor(r)}" for r in reqs if r.name != "torch"]


def torch_choice(profile: str, reqs: list[Requirement], local: str) -> tuple[str, list[str], str]:
    """(requirement, extra pip arguments, note for the table) for this profile's torch."""
    (torch,) = [r for r in reqs if r.name == "torch"]
    index = os.environ.get("CYCLELAB_TORCH_INDEX", "")
    if not index:
        return f"torch=={local}", [], f"the CPU wheel dev.sh pins (torch=={local}); no CYCLELAB_TORCH_INDEX set"
    spec = f"torch=={floor(torch)}" if profile == "oldest" else f"torch{torch.specifier}"
    return spec, ["--index-url", index], f"{spec} from {index}"


class Env:
    """The scratch virtualenv of one profile."""

    def __init__(self, profile: str) -> None:
        self.dir = ROOT / ".compat" / profile
        self.venv = self.dir / "venv"
        self.python = self.venv / "bin" / "python"
        self.log = self.dir / "install.log"

    def environ(self) -> dict[str, str]:
        """The environment the checks run in: this venv first, its own Jupyter kernel, offline."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        cores = os.cpu_count() or 2
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // 2)))
        env.update(
            PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(self.venv),
            JUPYTER_PATH=str(self.venv / "share" / "jupyter"),
            TQDM_DISABLE="1",
            TRANSFORMERS_VERBOSITY="error",
            HF_HUB_OFFLINE="1",
            PYDEVD_DISABLE_FILE_VALIDATION="1",
        )
        return env

    def run(self, *args: str | Path, log: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command in this environment, its output appended to ``log`` (or captured)."""
        cmd = [str(a) for a in args]
        if log is None:
            return subprocess.run(cmd, cwd=ROOT, env=self.environ(), capture_output=True, text=True)
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            return subprocess.run(cmd, cwd=ROOT, env=self.environ(), stdout=out, stderr=subprocess.STDOUT, text=True)

    def pip(self, *args: str | Path) -> None:
        """pip install, quietly, into this venv; raises with the log's tail when it fails."""
        if self.run(self.python, "-m", "pip", "install", "-q", *args, log=self.log).returncode:
            tail = self.log.read_text().splitlines()[-25:]
            raise RuntimeError("pip install failed (" + str(self.log) + "):\n" + "\n".join(tail))


def build(env: Env, profile: str, base_python: str, local_torch: str) -> str:
    """Create the venv afresh and install the profile's packages; returns the torch note."""
    shutil.rmtree(env.dir, ignore_errors=True)
    env.dir.mkdir(parents=True)
    subprocess.run([base_python, "-m", "venv", str(env.venv)], check=True)
    reqs = declared()
    torch_spec, torch_args, note = torch_choice(profile, reqs, local_torch)
    say(f"{profile}: installing {torch_spec} (log: {env.log.relative_to(ROOT)})")
    env.pip(*torch_args, torch_spec)
    # Hold the torch just installed, so resolving the rest can never swap in a (CUDA) build from PyPI.
    constraints = env.dir / "constraints.txt"
    constraints.write_text(f"torch=={installed(env, ['torch'])['torch']}\n")
    say(
        f"{profile}: installing cyclelab[course,dev]"
        + (" with every dependency at its floor" if profile == "oldest" else "")
    )
    env.pip("-c", constraints, "-e", f"{ROOT}[course,dev]", *pins(profile, reqs))
    env.run(env.python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3", log=env.log)
    say(f"{profile}: fetching the assets (nothing to do when the cache is complete)")
    if env.run(env.venv / "bin" / "cyclelab", "fetch", log=env.log).returncode:
        raise RuntimeError(f"cyclelab fetch failed (see {env.log})")
    return note


def installed(env: Env, names: list[str]) -> dict[str, str]:
    """The installed version of each distribution (``-`` when absent)."""
    code = (
        "import json, sys; from importlib import metadata as m\n"
        "def v(n):\n try: return m.version(n)\n except m.PackageNotFoundError: return '-'\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    done = env.run(env.python, "-c", code, *names)
    return json.loads(done.stdout)


def run_tests(env: Env, extra: list[str]) -> Check:
    """The package tests, as dev.sh runs them (two workers), minus the slow and browser marks."""
    name, junit, log = "tests/ (not slow, not browser)", env.dir / "tests.xml", env.dir / "tests.log"
    junit.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    say(f"running {name} {' '.join(extra)}")
    start = time.perf_counter()
    done = env.run(env.python, "-m", "pytest", "tests", *PYTEST_ARGS, f"--junitxml={junit}", *extra, log=log)
    seconds = time.perf_counter() - start
    if not junit.exists():
        return Check(name, False, f"pytest exited {done.returncode} without results (see tests.log)", seconds)
    counts, failed = junit_summary(junit)
    detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return Check(name, done.returncode == 0 and not failed, detail, seconds, failed)


def junit_summary(path: Path) -> tuple[dict[str, int], list[str]]:
    """Counts of passed/failed/errors/skipped and the ids of the tests that failed."""
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        kind = (
            "failed"
            if "failure" in kinds
            else "errors"
            if "error" in kinds
            else ("skipped" if "skipped" in kinds else "passed")
        )
        counts[kind] += 1
        if kind in ("failed", "errors"):
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failed


def run_course(env: Env) -> list[Check]:
    """``cyclelab course``: every chapter headless with papermill, one row per chapter."""
    say("running the course (cyclelab course)")
    log = env.dir / "course.log"
    log.unlink(missing_ok=True)
    done = env.run(env.venv / "bin" / "cyclelab", "course", "--out", env.dir / "course", log=log)
    text = log.read_text()
    errors = dict(re.findall(r"^(\d\d_\S+\.ipynb): (.+)$", text, re.M))
    matches = (COURSE_ROW.match(line) for line in text.splitlines())
    rows = [
        Check(name, status == "ok", status, float(sec), [errors[name]] if name in errors else [])
        for name, status, sec in (m.groups() for m in matches if m)
    ]
    if not rows or (done.returncode and all(r.ok for r in rows)):
        rows.append(Check("course", False, f"cyclelab course exited {done.returncode} (see course.log)", 0.0))
    return rows


def table(
    profile: str,
    python: str,
    versions: dict[str, str],
    reqs: list[Requirement],
    torch_note: str,
    checks: list[Check],
    minutes: float,
) -> str:
    """The Markdown report: environment, packages, checks, and what failed."""
    passed = sum(c.ok for c in checks)
    lines = [
        f"# Compatibility: {profile} versions",
        "",
        f"`bash scripts/dev.sh compat {profile}` on {datetime.date.today().isoformat()}: "
        f"Python {python}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; {minutes:.0f} min. **{passed} of {len(checks)} checks passed.**",
        "",
        f"torch: {versions.get('torch', '-')}, {torch_note}.",
        "",
        "| package | declared | installed |",
        "|---|---|---|",
        *(f"| {r.name} | `{r.specifier}` | {installed_cell(profile, r, versions[r.name])} |" for r in reqs),
        *(f"| {name} (indirect) | | {versions[name]} |" for name in INDIRECT),
        "",
        "| check | result | detail | time |",
        "|---|---|---|---|",
        *(f"| {c.name} | {'pass' if c.ok else '**FAIL**'} | {c.detail} | {c.seconds:.0f} s |" for c in checks),
    ]
    above = [r.name for r in reqs if "not the floor" in installed_cell(profile, r, versions[r.name])]
    if above:
        lines[4:4] = [f"Not installed at their floor, so not tested there: {', '.join(above)}.", ""]
    failures = [f"- {c.name}: {e}" for c in checks for e in c.errors]
    return "\n".join(lines + (["", "Failures:", "", *failures] if failures else [])) + "\n"


def installed_cell(profile: str, req: Requirement, version: str) -> str:
    """The installed version; in the oldest profile marked when it is not the declared floor."""
    if profile != "oldest":
        return version
    try:
        at_floor = Version(Version(version).public) == Version(floor(req))
    except InvalidVersion:
        at_floor = False
    return version if at_floor else f"{version} (**not the floor**)"


def say(text: str) -> None:
    print(f"[compat] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", nargs="?", choices=PROFILES, default="newest")
    parser.add_argument(
        "--python",
        default=shutil.which("python3.11") or sys.executable,
        help="the Python to build the scratch venv with",
    )
    parser.add_argument("--local-torch", default="2.13.0", help="torch to install without CYCLELAB_TORCH_INDEX")
    parser.add_argument("--out", type=Path, help="where to write the table (default docs/compat-PROFILE.md)")
    parser.add_argument("--reuse", action="store_true", help="keep the venv of an earlier run (while iterating)")
    parser.add_argument("--pytest", default="", metavar="ARGS", help="more pytest arguments, e.g. '-x -k tokenize'")
    args = parser.parse_args(argv)
    start, env, reqs = time.perf_counter(), Env(args.profile), declared()
    if args.reuse and env.python.exists():
        torch_note = (env.dir / "torch-note.txt").read_text()
    else:
        torch_note = build(env, args.profile, args.python, args.local_torch)
        (env.dir / "torch-note.txt").write_text(torch_note)
    checks = [run_tests(env, shlex.split(args.pytest)), *run_course(env)]
    versions = installed(env, [r.name for r in reqs] + list(INDIRECT))
    python = env.run(env.python, "-c", "import platform; print(platform.python_version())").stdout.strip()
    report = table(args.profile, python, versions, reqs, torch_note, checks, (time.perf_counter() - start) / 60)
    out = args.out or ROOT / "docs" / f"compat-{args.profile}.md"
    out.write_text(report)
    print(report)
    say(f"table written to {out}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
