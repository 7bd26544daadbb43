"""The README and docs/ stay true to the repository: every module named in the architecture page,
the benchmarks page generated from the recorded results, links that resolve, no lab-log dates
outside CHANGELOG.md, and the README's Python example runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/report.py by its path: the repository's benchmarks folder is not an installed package.
_SPEC = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Written by tools that record when they ran (scripts/compat.py), not prose.
GENERATED_WITH_DATES = {"compat-oldest.md", "compat-newest.md"}


def _package_files() -> list[str]:
    package = ROOT / "cyclelab"
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in package.rglob("*")
        if p.suffix in {".py", ".c"} and "__pycache__" not in p.parts
    )


def test_architecture_names_every_module() -> None:
    page = (DOCS / "architecture.md").read_text()
    missing = [path for path in _package_files() if f"`{path}`" not in page]
    assert not missing, (
        "docs/architecture.md has no line for these modules; add a row "
        "`| `cyclelab/...` | what it holds |` to their layer's table:\n" + "\n".join(missing)
    )


def test_architecture_names_no_module_that_is_gone() -> None:
    page = (DOCS / "architecture.md").read_text()
    named = set(re.findall(r"`(cyclelab/[\w/]+\.(?:py|c))`", page))
    gone = sorted(named - set(_package_files()))
    assert not gone, "docs/architecture.md names modules that do not exist: " + ", ".join(gone)


def test_benchmarks_page_is_the_generated_report() -> None:
    assert (DOCS / "benchmarks.md").read_text() == report.render(), (
        "docs/benchmarks.md is stale: run python -m benchmarks.report --write"
    )


def test_benchmark_report_states_each_cpu(tmp_path: Path) -> None:
    machine = {"benchmark": "machine", "cpus": 2, "torch_threads": 2, "torch": "2.13.0+cpu"}
    row = {
        "benchmark": "decode targets (greedy, batch 1)",
        "row": "tiny float32: engine, no capture",
        "tokens_per_s": 100.0,
        "against": "transformers.generate",
        "against_tokens_per_s": 50.0,
        "ratio": 2.0,
    }
    (tmp_path / "a.json").write_text(
        json.dumps([machine | {"cpu_model": "Chip A", "cpu_flags": ["avx2", "fma"], "date_utc": "1"}, row])
    )
    (tmp_path / "b.json").write_text(
        json.dumps([machine | {"cpu_model": "Chip A", "date_utc": "2"}, row | {"tokens_per_s": 120.0}])
    )
    (tmp_path / "c.json").write_text(json.dumps([machine, row | {"tokens_per_s": 7.0}]))
    (tmp_path / "quick.json").write_text(json.dumps([machine | {"cpu_model": "Smoke"}, row]))
    page = report.render(report.load_runs(tmp_path))
    summary = page.split("## Decode speed, one row per CPU")[1].split("\n## ")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| CPU not recorded", "| Chip A"]  # one row per CPU, newest run
    assert "| 120.0 | 2.0× |" in summary and "| 7.0 | 2.0× |" in summary and "100.0" not in page
    assert "Smoke" not in page  # the --quick smoke run is not a result
    assert "| Chip A | not recorded | `b.json` |" in page


def _markdown_pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files: {broken}"


@pytest.mark.parametrize(
    "page",
    [README, *sorted(p for p in DOCS.glob("*.md") if p.name not in GENERATED_WITH_DATES)],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_no_lab_log_outside_the_changelog(page: Path) -> None:
    """Dates, clock times and issue numbers belong in CHANGELOG.md; elsewhere the docs state facts."""
    text = page.read_text()
    found = re.findall(r"\b20\d\d-\d\d-\d\d\b|\b\d\d:\d\d UTC\b|(?<![\w&])#\d+\b|no GPU was lent", text)
    assert not found, f"{page.name} reads like a lab log: {found}"


def test_readme_is_short_and_points_to_the_docs() -> None:
    text = README.read_text()
    assert 150 <= len(text.splitlines()) <= 200
    for name in ["engine", "debugger", "benchmarks", "testing", "compatibility", "architecture", "workshop"]:
        assert f"docs/{name}.md" in text, f"the README does not link docs/{name}.md"


def test_readme_chapter_table_lists_every_chapter() -> None:
    text = README.read_text()
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"`{notebook.stem}`" in text, f"the README's chapter table has no row for {notebook.name}"


def test_readme_python_example_runs() -> None:
    block = re.search(r"```python\n(from cyclelab import load, Engine, Debugger\n.*?)```", README.read_text(), re.S)
    assert block, "the README has no example starting with `from cyclelab import load, Engine, Debugger`"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 12
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    assert "cycle" in printed and "WRITEBACK" in printed and "stopped" in printed
