"""The GitHub Actions workflows: valid for actionlint, and running the commands the README gives."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def actionlint() -> str:
    """The actionlint command of the dev extra: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "actionlint"
    found = str(beside) if beside.exists() else shutil.which("actionlint")
    assert found, "actionlint is missing: install the dev extra (pip install -e '.[dev]')"
    return found


def lint(*paths: Path) -> subprocess.CompletedProcess:
    # -shellcheck= and -pyflakes= switch off the optional linters, so that every machine
    # gives the same answer whether or not it has them.
    cmd = [actionlint(), "-no-color", "-shellcheck=", "-pyflakes=", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def runs(workflow: dict) -> list[str]:
    return [step["run"].strip() for step in steps(workflow) if "run" in step]


def test_actionlint_finds_nothing_in_the_workflows() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} == {"ci.yml", "compat.yml"}
    done = lint(*files)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize(
    "body, finding",
    [
        (
            "on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope }}\n",
            r"property \"nope\" is not defined",
        ),
        (
            "on: pish\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n",
            r"unknown Webhook event \"pish\"",
        ),
        ("on: push\njobs:\n  t:\n    steps:\n      - run: echo\n", r"\"runs-on\" section is missing"),
    ],
    ids=["undefined-context-property", "unknown-event", "missing-runs-on"],
)
def test_actionlint_reports_a_broken_workflow(tmp_path: Path, body: str, finding: str) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(body)
    done = lint(broken)
    assert done.returncode == 1
    assert re.search(finding, done.stdout), done.stdout


def test_ci_runs_exactly_the_readme_test_command_on_push_and_pull_request() -> None:
    ci = load("ci.yml")
    assert runs(ci) == ["bash .ci/run"]  # .ci/run is the README's test command (test_packaging checks it)
    assert {"push", "pull_request"} <= set(triggers(ci))
    assert [job["runs-on"] for job in ci["jobs"].values()] == ["ubuntu-latest"]


@pytest.mark.parametrize("name", ["ci.yml", "compat.yml"])
def test_workflow_takes_cpu_torch_python_311_and_caches_pip_and_the_assets(name: str) -> None:
    workflow = load(name)
    envs = [job.get("env", {}) for job in workflow["jobs"].values()]
    assert all(env.get("CYCLELAB_TORCH_INDEX") == CPU_INDEX for env in envs), "pip must never pull a CUDA torch"
    pythons = [
        s["with"]["python-version"] for s in steps(workflow) if s.get("uses", "").startswith("actions/setup-python")
    ]
    assert pythons == ["3.11"]
    cached = {s["with"]["path"] for s in steps(workflow) if s.get("uses", "").startswith("actions/cache")}
    assert cached == {"~/.cache/pip", "~/.cache/cyclelab"}


def test_compat_runs_weekly_and_keeps_the_table() -> None:
    compat = load("compat.yml")
    on = triggers(compat)
    assert "workflow_dispatch" in on and len(on["schedule"]) == 1
    assert on["schedule"][0]["cron"].split()[2:] == ["*", "*", "1"]  # one day a week
    assert runs(compat) == ['bash scripts/dev.sh compat "$PROFILE"']
    assert "'newest'" in compat["jobs"]["compat"]["env"]["PROFILE"]  # the schedule's profile
    upload = next(s for s in steps(compat) if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "docs/compat-${{ env.PROFILE }}.md" in upload["with"]["path"] and upload["if"] == "always()"
