"""Packaging stays in step: pyproject.toml vs environment.yml, README vs CI, the setup script,
and the packages the code imports vs the ones it declares."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
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
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return dict(parse(r) for r in reqs)


def conda_environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_requirements() -> dict[str, str]:
    """conda packages, and those its pip section installs (those conda-forge lacks), but the project."""
    deps = conda_environment()["dependencies"]
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    reqs = [d for d in deps if isinstance(d, str)] + [r for r in pip_section if not r.startswith("-e")]
    return {name: spec for name, spec in map(parse, reqs) if name not in NOT_PACKAGES}


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


@pytest.mark.parametrize(
    "folders, extras",
    [
        (["cyclelab/kernels", "cyclelab/loading", "cyclelab/core"], []),
        (["cyclelab"], ["course"]),
        (["tests", "scripts", "benchmarks"], ["course", "dev"]),
    ],
    ids=[
        "engine-layers-import-only-runtime-dependencies",
        "package-imports-in-dependencies-or-course",
        "test-and-script-imports-in-dependencies-or-dev",
    ],
)
def test_every_third_party_import_is_declared(folders: list[str], extras: list[str]) -> None:
    project = pyproject()["project"]
    declared = {parse(r)[0] for r in project["dependencies"]}
    declared |= {parse(r)[0] for extra in extras for r in project["optional-dependencies"][extra]}
    owners = packages_distributions()
    modules = set().union(*(_third_party_imports(ROOT / f) for f in folders))
    unknown = sorted(m for m in modules if m not in owners)
    assert not unknown, f"imported but not installed, so its distribution is unknown: {unknown}"
    undeclared = sorted(
        f"{m} ({', '.join(owners[m])})" for m in modules if not declared & {normalise(d) for d in owners[m]}
    )
    assert not undeclared, f"imported in {folders} but not declared in pyproject.toml: {undeclared}"


@pytest.mark.parametrize(
    "requirement, expected",
    [
        ("torch>=2.13,<2.15", "2.13"),
        ("numpy >= 1.26", "1.26"),
        ("gguf==0.10", "0.10"),
        ("regex~=2023.12", "2023.12"),
    ],
    ids=["floor-and-cap", "spaces", "exact-pin", "compatible-release"],
)
def test_compat_oldest_installs_the_lower_bound(requirement: str, expected: str) -> None:
    compat = _compat_script()
    assert compat.floor(compat.Requirement(requirement)) == expected


@pytest.mark.parametrize("requirement", ["tqdm", "tqdm<5", "tqdm>=4,>=4.66"], ids=["none", "cap-only", "two-floors"])
def test_compat_refuses_a_requirement_without_one_floor(requirement: str) -> None:
    compat = _compat_script()
    with pytest.raises(ValueError, match=r"pyproject\.toml: tqdm.* needs exactly one lower bound \(>=\)"):
        compat.floor(compat.Requirement(requirement))


def test_every_declared_dependency_has_a_floor_for_compat_oldest() -> None:
    compat = _compat_script()
    pins = compat.pins("oldest", compat.declared())
    names = {parse(r)[0] for r in pip_requirements()}
    assert {normalise(p.split("==")[0]) for p in pins} == names - {"torch"}  # torch is installed on its own
    assert compat.pins("newest", compat.declared()) == []


def _compat_script():
    """scripts/compat.py as a module (registered first: its dataclass looks itself up there)."""
    if "compat_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("compat_script", ROOT / "scripts" / "compat.py")
        sys.modules["compat_script"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["compat_script"])
    return sys.modules["compat_script"]


def _third_party_imports(folder: Path) -> set[str]:
    """Top-level names of the absolute imports under ``folder``, less the standard library, cyclelab, the folder's
    own modules (a test importing a sibling's helpers) and the repository's own packages (``benchmarks``)."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {path.stem for path in folder.rglob("*.py")}
    local |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    return names - set(sys.stdlib_module_names) - {"cyclelab", "__future__"} - local


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


def test_benchmark_results_record_the_machine(tmp_path) -> None:
    """Timings mean little without the machine: the results JSON starts with its CPU, features, cores and torch."""
    import torch

    from benchmarks.__main__ import cpu_flags, write_results

    out = tmp_path / "results" / "latest.json"
    write_results([{"benchmark": "decode", "tokens_per_s": 1.0}], out)
    machine, row = json.loads(out.read_text())
    assert machine["benchmark"] == "machine" and row == {"benchmark": "decode", "tokens_per_s": 1.0}
    assert machine["torch"] == torch.__version__ and machine["cpus"] == os.cpu_count() and machine["cpu"]
    assert set(machine) >= {"cpu_flags", "cores_usable", "gpu", "kernels", "torch_cpu_capability"}
    info = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n"
    assert cpu_flags(info) == ["sse4_2", "avx", "avx2", "fma", "avx512f"] and cpu_flags("") == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked files (the build's scratch folders stay out of the checkout)."""
    source, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file() and not name.startswith(("notebooks/", "docs/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (found,) = out.glob("cyclelab-*.whl")
    return found


def test_the_wheel_ships_the_kernels_source_and_the_tiny_models(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cyclelab/kernels/kernels.c" in names
    shipped = {n.split(".data/data/share/cyclelab/", 1)[1] for n in names if ".data/data/share/cyclelab/" in n}
    for model in ("tiny", "tiny-mlm", "folio-mt"):
        want = {p.name for p in (ROOT / "data" / model).iterdir() if p.is_file()}
        assert {f"{model}/{name}" for name in want} <= shipped, model
    assert not any(n.startswith("data/") for n in names)  # not as a top-level package


def test_an_installed_copy_finds_the_shipped_data(tmp_path: Path) -> None:
    from cyclelab.loading.paths import CHECKOUT_DATA, find_data

    installed = tmp_path / "share" / "cyclelab"
    (installed / "tiny").mkdir(parents=True)
    (installed / "tiny" / "config.json").write_text("{}")
    site = tmp_path / "site-packages" / "data"  # an install: no pyproject.toml next to it
    assert find_data(site, [tmp_path / "nowhere", installed]) == installed
    assert find_data(site, [tmp_path / "nowhere"]) == site  # nothing installed: the lookup names the usual place
    assert find_data(CHECKOUT_DATA, [installed]) == CHECKOUT_DATA  # a checkout uses its own data/


def test_the_wheel_installed_outside_the_checkout_loads_tiny_and_builds_its_kernels(
    wheel: Path, tmp_path: Path
) -> None:
    """`pip install .` without -e: the wheel, unpacked as pip would (`--target`), imported from another folder, loads
    the shipped `tiny` (checksums verified) and builds the own kernels from the shipped `kernels.c`."""
    import zipfile

    target = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            data = ".data/data/"  # a wheel's data files: pip installs them under the prefix (here: the target)
            destination = target / name.split(data, 1)[1] if data in name else target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(name))
    tmp_path.chmod(0o700)
    code = (
        "import cyclelab, pathlib; from cyclelab.kernels import status; "
        "assert pathlib.Path(cyclelab.__file__).is_relative_to(pathlib.Path.cwd()); "
        "print(len(cyclelab.Engine(cyclelab.load('tiny')).generate('ROMEO:', max_new_tokens=3).token_ids)); "
        "print(status().reason)"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "CYCLELAB_KERNELS_DIR": str(tmp_path / "kernels")}
    run = subprocess.run([sys.executable, "-c", code], cwd=target, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split()
    assert lines[0] == "3" and "verified" in run.stdout
