"""The student edition and the nbgrader metadata, on copies of the real chapters.

The chapter notebooks are never annotated in place here: each test copies them into tmp_path.
Expected exercises were read off the chapters by hand. nbgrader's own validator, when nbgrader
is importable, confirms the metadata and rejects the same bad rows as cyclelab's.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cyclelab.checks import check_attainable
from cyclelab.cli import main
from cyclelab.workshop import edition
from cyclelab.workshop.course import list_notebooks, notebooks_dir

CHAPTERS = list_notebooks()
# exercises (the functions learners write), read from the chapters by hand
EXPECTED = {
    "00": {"greedy_step"},
    "01": {"merge_pair", "count_pairs"},
    "02": {"embed_lookup", "rope_pair"},
    "03": {"causal_attention"},
    "04": {"block"},
    "05": {"top_p_filter", "predict_masked"},
    "06_fine_tuning": {"lora_forward", "training_step"},
    "06_fine_tuning_tasks": {"masked_labels"},
    "07": {"attainable", "int8_row"},
    "09": {"swap_scores", "overlapping_spans"},
    "10": {"cross_attention", "beam_step"},
}
OURS = ("nbgrader", "tags")


def nbgrader_validator():
    """nbgrader's MetadataValidatorV3, or None where nbgrader is not installed."""
    try:
        from nbgrader.nbgraderformat.v3 import MetadataValidatorV3
    except ImportError:
        return None
    return MetadataValidatorV3()


def _without_ours(nb: nbformat.NotebookNode) -> str:
    """The notebook as nbformat writes it, without the tags and nbgrader metadata annotate writes."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        cell.metadata["tags"] = [t for t in cell.metadata.get("tags", []) if t not in edition.KIND_TAGS]
        if not cell.metadata["tags"]:
            del cell.metadata["tags"]
        cell.metadata.pop("nbgrader", None)
    return nbformat.writes(nb) + "\n"


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list, bool, bool]]:
    """Each chapter copied and annotated twice: (copy, exercises, changed the first time, the second)."""
    folder = tmp_path_factory.mktemp("annotated")
    result = {}
    for path in CHAPTERS:
        copy = Path(shutil.copy(path, folder / path.name))
        found, changed = edition.annotate_file(copy)
        again, changed_again = edition.annotate_file(copy)
        assert again == found
        result[path.stem] = (copy, found, changed, changed_again)
    return result


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_annotate_finds_the_exercises_and_changes_only_metadata(annotated: dict, path: Path) -> None:
    copy, found, changed, changed_again = annotated[path.stem]
    names = {e.name for e in found}
    assert len(found) >= 1 and EXPECTED.get(path.stem, EXPECTED.get(path.name[:2], set())) <= names
    assert all(e.check_id == f"check_{e.name}" and e.points == 1 for e in found)
    original, text = path.read_text(encoding="utf-8"), copy.read_text(encoding="utf-8")
    nb = nbformat.read(str(copy), as_version=4)
    assert changed == (text != original) and not changed_again, "written when needed; idempotent"
    assert _without_ours(nb) == _without_ours(nbformat.reads(original, as_version=4)), "only our metadata changed"
    assert text == nbformat.writes(nb) + "\n", "formatted as nbformat writes (indent 1)"
    edition.validate(nb, copy.name)
    assert edition.exercises_of(nb) == found
    hidden = [c for c in nb.cells if c.cell_type == "code" and c.metadata.get("jupyter", {}).get("source_hidden")]
    assert hidden and all(c.metadata["tags"][-1] == "solution" and "nbgrader" not in c.metadata for c in hidden)


def test_nbgrader_own_validator_accepts_the_annotations(annotated: dict) -> None:
    validator = nbgrader_validator() or pytest.skip("nbgrader is not installed (pip install nbgrader)")
    for copy, *_ in annotated.values():
        validator.validate_nb(nbformat.read(str(copy), as_version=4))


def test_the_student_edition_of_the_course(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edition", "student", str(tmp_path / "student")]) == 0
    assert f"{len(CHAPTERS) + 1} notebooks" in capsys.readouterr().out
    written = sorted((tmp_path / "student").iterdir())
    assert [p.name for p in written] == sorted([p.name for p in CHAPTERS] + ["README.md", "workshop"])
    for path in CHAPTERS:
        original = nbformat.read(str(path), as_version=4)
        student = nbformat.read(str(tmp_path / "student" / path.name), as_version=4)
        nbformat.validate(student)
        edition.validate(student, path.name)
        hidden = [c.source for c in original.cells if c.metadata.get("jupyter", {}).get("source_hidden")]
        sources = [c.source for c in student.cells]
        assert hidden and not set(hidden) & set(sources), "no solution cell"
        assert "open after trying" not in "\n".join(sources)
        kept = [c for c in student.cells if {"exercise", "check"} & set(c.metadata.get("tags", []))]
        assert len(kept) == 2 * len(edition.exercises_of(student)) >= 2
        assert all(c.outputs == [] and c.execution_count is None for c in kept)
        stubs = [c.source for c in original.cells if c.cell_type == "code" and "# your code here" in c.source]
        assert stubs == [c.source for c in kept if "exercise" in c.metadata["tags"]], "stubs kept as they were"


def test_the_student_bug_hunt_and_readme(tmp_path: Path) -> None:
    edition.write_student_edition(tmp_path / "student")
    hunt = nbformat.read(str(notebooks_dir() / "workshop" / "bug_hunt.ipynb"), as_version=4)
    student = nbformat.read(str(tmp_path / "student" / "workshop" / "bug_hunt.ipynb"), as_version=4)
    hidden = [c.source for c in hunt.cells if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert len(hidden) == 4 and not set(hidden) & {c.source for c in student.cells}, "its solutions are gone"
    text = "\n".join(c.source for c in student.cells)
    assert "bug 4: the pairing" not in text and "open after trying" not in text
    assert len(student.cells) == len(hunt.cells) - len(hidden), "only the solutions (and their heading) go"
    readme = (tmp_path / "student" / "README.md").read_text()
    assert "solutions are **not** in this edition" in readme and "workshop/bug_hunt.ipynb" in readme
    assert "Solutions in collapsed cells" not in readme, "not the instructor's house style"


def test_nbgrader_mode_asserts_every_check_of_a_cell() -> None:
    source = edition.assert_on_failure("# NBVAL_IGNORE_OUTPUT\nprint(check_attainable(f))\ncheck_attainable(g)")
    assert source.count("assert check_result, check_result.message") == 2
    right = {"check_attainable": check_attainable, "f": lambda f, b, p, w: min(p, f / b * w)}
    with pytest.raises(AssertionError, match="take min"):  # the first check passes, the second fails
        exec(source, {**right, "g": lambda f, b, p, w: p, "torch": torch})
    exec(source, {**right, "g": right["f"]})


def test_nbgrader_mode_wraps_stub_bodies_in_solution_regions() -> None:
    stub = 'def f(x: int) -> int:\n    """Doc."""\n    # your code here\n    return 0\n\n\ndef g(y):\n    # your code here\n    return y'
    assert edition.nbgrader_regions(stub) == (
        'def f(x: int) -> int:\n    """Doc."""\n    ### BEGIN SOLUTION\n    # your code here\n    return 0\n'
        "    ### END SOLUTION\n\n\ndef g(y):\n    ### BEGIN SOLUTION\n    # your code here\n    return y\n"
        "    ### END SOLUTION"
    )
    region = "def f(x):\n    ### BEGIN SOLUTION\n    return x * 2\n    ### END SOLUTION"
    assert "x * 2" not in edition.nbgrader_regions(region) and "### END SOLUTION" in edition.nbgrader_regions(region)


def test_solution_regions_become_nbgrader_stubs() -> None:
    source = (
        "import math\n\ndef f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return math.sqrt(x)\n"
        "    ### END SOLUTION\n\nprint(f)"
    )
    assert edition.strip_solution_regions(source) == (
        "import math\n\ndef f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f)"
    )


def test_points_set_by_an_instructor_stay_and_stale_annotations_go() -> None:
    nb = new_notebook(
        cells=[
            new_code_cell("def f(x):\n    # your code here\n    return 0"),
            new_code_cell("check_attainable(f)"),
            new_markdown_cell("### Solution (open after trying)"),
        ]
    )
    edition.annotate(nb)
    nb.cells[1].metadata["nbgrader"]["points"] = 3
    assert edition.annotate(nb) == [edition.Exercise("f", "check_f", 3)]
    nb.cells[0].source = "x = 1"  # no longer an exercise: its check is no longer one either
    assert edition.annotate(nb) == []
    assert all("nbgrader" not in c.metadata and "tags" not in c.metadata for c in nb.cells)


def test_nbgrader_mode_checks_raise_when_they_fail() -> None:
    source = edition.assert_on_failure("# NBVAL_IGNORE_OUTPUT\ncheck_attainable(attainable)")
    assert source.startswith("# NBVAL_IGNORE_OUTPUT\ncheck_result = check_attainable(attainable)\nprint(check_result)")
    right = {"check_attainable": check_attainable, "attainable": lambda f, b, p, w: min(p, f / b * w)}
    exec(source, right)  # passes: no exception
    with pytest.raises(AssertionError, match="take min"):
        exec(source, {"check_attainable": check_attainable, "attainable": lambda f, b, p, w: p, "torch": torch})


META = {
    "grade": True,
    "grade_id": "check_f",
    "locked": True,
    "points": 1,
    "schema_version": 3,
    "solution": False,
    "task": False,
}


@pytest.mark.parametrize(
    "change, cell_type, pattern",
    [
        ({"grade_id": None}, "code", r"needs a non-empty grade_id"),
        ({"grade_id": "check f!"}, "code", r"grade_id 'check f!' may hold only letters, digits"),
        ({"schema_version": 2}, "code", r"schema_version is 2, expected 3"),
        ({"points": None}, "code", r"a graded cell needs points"),
        ({"points": -1}, "code", r"a graded cell needs points >= 0"),
        ({"points": True}, "code", r"wrong type \['points'\]"),
        ({"locked": "yes"}, "code", r"wrong type \['locked'\]"),
        ({"solution": None}, "code", r"missing \['solution'\]"),
        ({"hint": "x"}, "code", r"unknown \['hint'\]"),
        ({}, "markdown", r"markdown answer must be both grade and solution"),
        ({"task": True}, "code", r"task cell must be markdown"),
    ],
    ids=[
        "no-grade-id",
        "bad-grade-id",
        "old-schema",
        "no-points",
        "negative-points",
        "bool-points",
        "string-flag",
        "missing-field",
        "unknown-field",
        "markdown-grade-only",
        "task-on-code",
    ],
)
def test_bad_nbgrader_metadata_is_named(change: dict, cell_type: str, pattern: str) -> None:
    meta = {k: v for k, v in {**META, **change}.items() if v is not None}
    cell = new_code_cell("check_f(f)") if cell_type == "code" else new_markdown_cell("answer")
    cell.metadata["nbgrader"] = meta
    nb = new_notebook(cells=[new_markdown_cell("# x"), cell])
    with pytest.raises(ValueError, match=r"^ch\.ipynb, cell 1: nbgrader metadata: .*" + pattern):
        edition.validate(nb, "ch.ipynb")
    validator = nbgrader_validator()
    if validator is not None:  # nbgrader agrees
        with pytest.raises(Exception):
            validator.validate_nb(nb)


def test_a_duplicate_grade_id_is_named() -> None:
    cells = [new_code_cell("check_f(f)"), new_code_cell("check_f(f)")]
    for cell in cells:
        cell.metadata["nbgrader"] = dict(META)
    with pytest.raises(ValueError, match=r"ch\.ipynb, cell 1: nbgrader metadata: duplicate grade_id 'check_f'"):
        edition.validate(new_notebook(cells=cells), "ch.ipynb")


def _course_copy(tmp_path: Path) -> Path:
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(CHAPTERS[0], course)
    return course


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        ("out-is-the-course", ValueError, r"is the course's own notebooks folder: .*overwrite the instructor's"),
        ("out-is-a-file", ValueError, r"OUT \(.*\) is a file: give a folder"),
        ("no-chapters", FileNotFoundError, r"no chapter notebooks \(NN_\*\.ipynb\) in"),
    ],
    ids=["out-is-the-course", "out-is-a-file", "no-chapters"],
)
def test_bad_student_edition_target_is_named(tmp_path: Path, case: str, error: type, pattern: str) -> None:
    course = _course_copy(tmp_path)
    out = {"out-is-the-course": course, "out-is-a-file": course / CHAPTERS[0].name}.get(case, tmp_path / "out")
    root = tmp_path / "empty" if case == "no-chapters" else course
    root.mkdir(exist_ok=True)
    before = (course / CHAPTERS[0].name).read_bytes()
    with pytest.raises(error, match=pattern):
        edition.write_student_edition(out, root)
    assert (course / CHAPTERS[0].name).read_bytes() == before


@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, r"^error: no notebook at .*missing\.ipynb: check the path \(give \.ipynb files\)$"),
        ('{"cells": [', r"^error: .*bad\.ipynb is not a readable notebook \(NotJSONError"),
        ("[1, 2]", r"^error: .*bad\.ipynb is not a readable notebook"),
    ],
    ids=["missing-file", "corrupt-json", "json-not-a-notebook"],
)
def test_annotate_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, pattern: str
) -> None:
    path = tmp_path / ("missing.ipynb" if content is None else "bad.ipynb")
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["edition", "annotate", str(path)]) == 2
    assert re.search(pattern, capsys.readouterr().err.strip())


def test_the_cli_annotates_named_copies_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / CHAPTERS[0].name  # not annotated, even once the chapters are
    copy.write_text(_without_ours(nbformat.read(str(CHAPTERS[0]), as_version=4)), encoding="utf-8")
    before = {p: p.read_bytes() for p in notebooks_dir().glob("*.ipynb")}
    assert main(["edition", "annotate", str(copy)]) == 0
    assert main(["edition", "annotate", str(copy)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{copy.name}: ") and "greedy_step" in out[0] and not out[0].endswith("(unchanged)")
    assert out[1] == out[0] + " (unchanged)"
    assert {p: p.read_bytes() for p in notebooks_dir().glob("*.ipynb")} == before


@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.stem)
def test_the_course_notebooks_are_annotated(path):
    """`cyclelab edition annotate` has been run: annotating again changes nothing, and nbgrader's rules hold."""
    nb = edition.read_notebook(path)
    before = nbformat.writes(nb)
    edition.annotate(nb)
    assert nbformat.writes(nb) == before, f"run `cyclelab edition annotate` ({path.name} is not annotated)"
    edition.validate(nb, path.name)
