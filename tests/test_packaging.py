"""Packaging stays in step: pyproject.toml vs environment.yml, README vs CI, the setup script."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"pytorch": "torch"}  # conda name -> PyPI name
NOT_PACKAGES = {"python", "pip"}
REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def normalise(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name.lower())
    return CONDA_NAMES.get(name, name)


def parse(requirement: str) -> tuple[str, str]:
    """(normalised name, sorted specifier string without spaces) for ``"name>=1,<2"``."""
    match = REQ.match(requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    specs = sorted(s for s in match.group(3).replace(" ", "").split(",") if s)
    return normalise(match.group(1)), ",".join(specs)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pip_requirements() -> dict[str, str]:
    project = pyproject()["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(parse(r) for r in reqs)


def conda_environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_requirements() -> dict[str, str]:
    deps = [d for d in conda_environment()["dependencies"] if isinstance(d, str)]
    return {name: spec for name, spec in map(parse, deps) if name not in NOT_PACKAGES}


def test_same_packages_in_pyproject_and_environment_yml() -> None:
    pip, conda = pip_requirements(), conda_requirements()
    assert sorted(pip) == sorted(conda), (
        f"only in pyproject: {sorted(set(pip) - set(conda))}; only in environment.yml: {sorted(set(conda) - set(pip))}"
    )


def test_same_version_specifiers() -> None:
    pip, conda = pip_requirements(), conda_requirements()
    differ = {name: (pip[name], conda[name]) for name in pip if name in conda and pip[name] != conda[name]}
    assert not differ, f"pyproject vs environment.yml specifiers differ: {differ}"


def test_environment_yml_installs_the_package_and_a_supported_python() -> None:
    deps = conda_environment()["dependencies"]
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip_section
    python = next(d for d in deps if isinstance(d, str) and normalise(parse(d)[0]) == "python")
    minimum = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert _version(python.split("=")[-1]) >= _version(minimum)


def test_setup_script_pins_a_torch_inside_the_declared_range() -> None:
    pinned = re.search(r"^TORCH_VERSION=(\S+)$", (ROOT / "scripts/dev.sh").read_text(), re.M).group(1)
    for spec in pip_requirements()["torch"].split(","):
        op, bound = re.match(r"([<>=!]=?)(.+)", spec).groups()
        assert _compare(_version(pinned), op, _version(bound)), f"torch=={pinned} violates {spec}"


def test_ci_runs_the_readme_test_command() -> None:
    commands = _readme_bash_lines()
    test_command = next(line for line in commands if "scripts/dev.sh test" in line)
    ci = ROOT / ".ci" / "run"
    assert test_command in [line.strip() for line in ci.read_text().splitlines()]
    assert os.access(ci, os.X_OK), ".ci/run must be executable"


def test_readme_quick_start_has_the_two_commands() -> None:
    commands = _readme_bash_lines()
    assert "bash scripts/dev.sh lab" in commands and "bash scripts/dev.sh test" in commands


def test_dev_script_is_valid_bash_and_rejects_unknown_commands() -> None:
    script = str(ROOT / "scripts" / "dev.sh")
    subprocess.run(["bash", "-n", script], check=True)
    done = subprocess.run(["bash", script, "no-such-command"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown command: no-such-command" in done.stderr


def _readme_bash_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _compare(a: tuple[int, ...], op: str, b: tuple[int, ...]) -> bool:
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
