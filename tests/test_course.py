"""The headless course runner: papermill runs of throwaway notebooks, and the results table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

from cyclelab.cli import main
from cyclelab.workshop import course

KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _write(path: Path, *cells: nbformat.NotebookNode) -> Path:
    nb = nbformat.v4.new_notebook(cells=list(cells), metadata={"kernelspec": KERNEL})
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def chapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake notebooks folder: a parameterised chapter, a failing one, and files to skip."""
    root = tmp_path_factory.mktemp("notebooks")
    params = nbformat.v4.new_code_cell("steps = 1", metadata={"tags": ["parameters"]})
    _write(root / "01_ok.ipynb", params, nbformat.v4.new_code_cell("import os\nassert steps == 3\nprint(os.getcwd())"))
    _write(root / "02_fails.ipynb", nbformat.v4.new_code_cell("raise ValueError('boom')"))
    _write(root / "02_fails_solutions.ipynb", nbformat.v4.new_code_cell("pass"))
    _write(root / "scratch.ipynb", nbformat.v4.new_code_cell("pass"))
    return root


@pytest.fixture(scope="module")
def runs(chapters: Path) -> list[course.NotebookRun]:
    return course.run_course(chapters / "out", parameters={"steps": 3}, root=chapters)


def test_python3_kernel_is_this_interpreter() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec(course.KERNEL_NAME).argv[0]
    # jupyter_client runs a spec whose argv[0] is plain "python" with sys.executable
    assert argv0 in ("python", "python3") or Path(argv0).resolve() == Path(sys.executable).resolve()


def test_list_notebooks_orders_and_filters(chapters: Path) -> None:
    assert [p.name for p in course.list_notebooks(root=chapters)] == ["01_ok.ipynb", "02_fails.ipynb"]
    assert [p.name for p in course.list_notebooks(["fail"], root=chapters)] == ["02_fails.ipynb"]
    assert [p.name for p in course.list_notebooks(["01_*"], root=chapters)] == ["01_ok.ipynb"]
    assert course.list_notebooks(["nothing"], root=chapters) == []


def test_statuses_and_errors(runs: list[course.NotebookRun]) -> None:
    assert [(r.notebook, r.status) for r in runs] == [("01_ok.ipynb", "ok"), ("02_fails.ipynb", "failed")]
    assert runs[0].error == ""
    assert "ValueError: boom" in runs[1].error
    assert all(r.seconds > 0 and r.output.is_file() for r in runs)


def test_parameters_injected_and_cwd_is_notebook_folder(runs: list[course.NotebookRun], chapters: Path) -> None:
    nb = nbformat.read(runs[0].output, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "steps = 3" in injected[0].source
    assert nb.cells[-1].outputs[0]["text"].strip() == str(chapters)


def test_peak_memory_is_plausible(runs: list[course.NotebookRun]) -> None:
    if not Path("/proc").is_dir():
        pytest.skip("peak RSS is read from /proc")
    assert runs[0].peak_rss_mb is not None and 10 < runs[0].peak_rss_mb < 100_000


def test_runs_table(runs: list[course.NotebookRun]) -> None:
    table = course.runs_table(runs).splitlines()
    assert table[0].split()[:4] == ["notebook", "profile", "status", "seconds"]
    assert table[2].split()[:3] == ["01_ok.ipynb", "full", "ok"]
    assert table[3].split()[:3] == ["02_fails.ipynb", "full", "failed"]
    assert re.match(r"02_fails\.ipynb: cell \d+: ValueError: boom", table[-1])
    assert course.runs_table([]) == "no notebooks to run"


def test_cli_course_without_matches_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["course", "--only", "no-such-chapter-xyz"]) == 0
    assert "no notebooks" in capsys.readouterr().out


def test_cost_label_is_written_once_per_profile_and_leaves_the_rest(tmp_path: Path) -> None:
    intro = "# 01 · A chapter\n\nGoals: read this."
    code = nbformat.v4.new_code_cell("x = 1", outputs=[nbformat.v4.new_output("stream", text="kept\n")])
    path = _write(tmp_path / "01_x.ipynb", nbformat.v4.new_markdown_cell(intro), code)
    fast = course.NotebookRun("01_x.ipynb", "ok", 12.4, tmp_path, peak_rss_mb=1536)
    course.write_cost_label(path, fast, "fast")
    course.write_cost_label(path, course.NotebookRun("01_x.ipynb", "ok", 99.6, tmp_path, peak_rss_mb=None), "full")
    course.write_cost_label(path, fast, "fast")  # a refresh replaces its own line
    nb = nbformat.read(path, as_version=4)
    lines = nb.cells[0].source.split("\n")
    assert lines[:3] == intro.split("\n") and lines[3] == ""
    labels = [line for line in lines if "<!-- cost:" in line]
    assert all(label.startswith("**Cost, ") for label in labels)  # Markdown renders it (no HTML block)
    assert len(labels) == 2 and "12 s, peak memory 1.5 GB" in labels[1] and "100 s on" in labels[0]
    assert nb.cells[1].source == "x = 1" and nb.cells[1].outputs[0].text == "kept\n"


def test_cost_label_needs_a_markdown_top_cell(tmp_path: Path) -> None:
    path = _write(tmp_path / "01_x.ipynb", nbformat.v4.new_code_cell("x = 1"))
    run = course.NotebookRun("01_x.ipynb", "ok", 1.0, tmp_path)
    with pytest.raises(ValueError, match="markdown"):
        course.write_cost_label(path, run, "fast")
    with pytest.raises(ValueError, match="profile"):
        course.write_cost_label(path, run, "fast profile")


# --- profiles and key results -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chapter whose cell holds the learner's (full) values and whose metadata declares fast, with a
    key-results cell."""
    root = tmp_path_factory.mktemp("profiled")
    params = nbformat.v4.new_code_cell(
        "steps = 7\nname: str = 'x'\nlow, high = 0, 9", metadata={"tags": ["parameters"]}
    )
    key = nbformat.v4.new_code_cell("print(f'steps {steps}')\nprint('loss 0.5')", metadata={"tags": ["key-results"]})
    path = _write(root / "01_p.ipynb", params, key)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["cyclelab"] = {"profiles": {"full": {}, "fast": {"steps": 1}}}
    nbformat.write(nb, path)
    return root


def test_a_profile_sets_its_parameters_and_the_key_results_are_collected(profiled: Path) -> None:
    (fast,) = course.run_course(profiled / "out-fast", root=profiled, profile="fast")
    (full,) = course.run_course(profiled / "out-full", root=profiled)
    assert (fast.profile, fast.key_results) == ("fast", "steps 1; loss 0.5")
    assert (full.profile, full.key_results) == ("full", "steps 7; loss 0.5")
    table = course.results_table([fast, full]).splitlines()
    assert table[0] == "| chapter | profile | key results | seconds | peak memory |"
    assert table[3].startswith("| 01_p | full | steps 7; loss 0.5 | ")


def test_an_unknown_profile_names_the_valid_ones(profiled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"01_p.ipynb has no profile 'huge'; its profiles are fast, full"):
        course.run_course(profiled / "out", root=profiled, profile="huge")
    assert main(["course", "--profile", "huge", "--only", "00_the_clock_cycle"]) == 2
    assert "has no profile 'huge'; its profiles are fast, full, gpu" in capsys.readouterr().err


def test_parameter_names_reads_the_parameters_cell(profiled: Path, tmp_path: Path) -> None:
    assert course.parameter_names(profiled / "01_p.ipynb") == {"steps", "name", "low", "high"}
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        course.parameter_names(_write(tmp_path / "01_x.ipynb", nbformat.v4.new_code_cell("x = 1")))


CHAPTERS = course.list_notebooks()


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_chapter_declares_its_profiles_and_a_key_results_cell(path: Path) -> None:
    profiles = course.notebook_profiles(path)
    assert set(course.PROFILES) <= set(profiles), f"{path.name} declares {sorted(profiles)}"
    assert profiles["full"] == {}, f"{path.name}: the parameters cell holds the full profile (the learner's run)"
    names = course.parameter_names(path)
    for name, values in profiles.items():
        unknown = set(values) - names
        assert not unknown, f"{path.name}'s {name} profile sets {sorted(unknown)}, not in its parameters cell"
    tagged = [c for c in nbformat.read(path, as_version=4).cells if "key-results" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].outputs, f"{path.name} needs one executed cell tagged key-results"


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_a_chapter_runs_its_full_profile(path: Path, tmp_path: Path) -> None:
    """Minutes per chapter: run with CYCLELAB_SLOW=1 (not part of the default test command)."""
    run = course.run_notebook(path, tmp_path, profile="full")
    assert run.ok and run.key_results, run.error
    assert not course.false_takeaways(run.output), f"{path.name}: {course.false_takeaways(run.output)}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_stored_takeaway_holds(path: Path) -> None:
    """The committed outputs are the learner's run: each sentence of prose backed by a ``takeaway:`` line
    there printed True."""
    assert not course.false_takeaways(path), f"{path.name} stores takeaways that do not hold"


def test_the_test_command_runs_the_fast_profile_in_the_parameters_cell(profiled: Path) -> None:
    """What conftest.py does to each notebook before nbval runs it: the fast values after the cell's own."""
    cell = nbformat.read(profiled / "01_p.ipynb", as_version=4).cells[0]
    injected = course.with_profile(cell.source, profiled / "01_p.ipynb", "fast")
    namespace: dict = {}
    exec(injected, namespace)
    assert (namespace["steps"], namespace["name"], namespace["high"]) == (1, "x", 9)
    assert course.with_profile(cell.source, profiled / "01_p.ipynb", "full") == cell.source


def test_false_takeaways_finds_only_the_false_lines(tmp_path: Path) -> None:
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="takeaway: a = True\ntakeaway: b_2 = False\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert course.false_takeaways(tmp_path / "x.ipynb") == ["takeaway: b_2 = False"]


def test_the_test_order_reads_every_notebooks_fast_cost_label() -> None:
    """conftest.py starts the longest scopes first by each notebook's fast label: a label it cannot read
    ranks the notebook as free and leaves it to run last (its pattern once matched none)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("root_conftest", root / "conftest.py")
    assert spec is not None and spec.loader is not None
    order = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(order)
    notebooks = sorted(p for p in (root / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert notebooks and all(order.notebook_cost(path) > 0 for path in notebooks)
    ranked = sorted(
        [root / "tests" / "test_grade_cheats.py", root / "tests" / "test_cli.py", *notebooks],
        key=lambda path: order.scope_rank(path, {}),
    )
    assert ranked[0].name == "test_grade_cheats.py" and ranked[-1].name == "test_cli.py"
