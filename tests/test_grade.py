"""``cyclelab grade`` on a synthetic class.

The course is a two-exercise notebook written here in the chapters' conventions, with real
checkers from cyclelab.checks (greedy step, roofline: both cheap). Its student edition is handed
to the class; each learner edits the exercise cells the way learners do: right, a typical mistake
per exercise, untouched, and raising. The whole class runs once (one kernel per learner) and the
tests read the CSV it wrote; the timeout runs a light notebook of its own, and edited or deleted
check cells are read without a kernel.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cyclelab.cli import main
from cyclelab.workshop import edition, grade

CHAPTER = "00_mini.ipynb"
GREEDY_STUB = '''def greedy_step(logits):
    """Return (token_id, probability) of the greedy choice."""
    # your code here — replace the line below
    return 0, 0.0'''
ATTAINABLE = """def attainable(flops, nbytes, peak, bandwidth):
    ### BEGIN SOLUTION
    return min(peak, flops / nbytes * bandwidth)
    ### END SOLUTION"""
GREEDY_RIGHT = """def greedy_step(logits):
    p = torch.softmax(logits.double(), -1)
    return int(p.argmax()), float(p.max())"""
ATTAINABLE_RIGHT = """def attainable(flops, nbytes, peak, bandwidth):
    roof = bandwidth * flops / nbytes
    return peak if roof > peak else roof"""
# what each learner writes in the two exercise cells
ANSWERS = {
    "ada": (GREEDY_RIGHT, ATTAINABLE_RIGHT),
    "ben": (
        "def greedy_step(logits):\n    return int(logits.argmax()), float(logits.max())",  # the logit, not p
        "def attainable(flops, nbytes, peak, bandwidth):\n    return max(peak, flops / nbytes * bandwidth)",
    ),
    "cy": (None, None),  # blank: the student edition's stubs
    "dee": (
        "def greedy_step(logits):\n    return 1 // 0",
        "oops = undefined_name + 1\n\n" + ATTAINABLE_RIGHT,
    ),  # the cell raises before its def
}


def mini_course(folder: Path) -> Path:
    """The instructor's notebook: two exercises, their checks, a hidden solution under the heading."""
    hidden = {"jupyter": {"source_hidden": True}}
    cells = [
        new_markdown_cell("# Mini chapter"),
        new_code_cell("n = 3", metadata={"tags": ["parameters"]}),
        new_code_cell("import torch\n\nfrom cyclelab.checks import check_attainable, check_greedy_step"),
        new_markdown_cell("## Exercise 1: greedy"),
        new_code_cell(GREEDY_STUB),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\ncheck_greedy_step(greedy_step)"),
        new_markdown_cell("## Exercise 2: the roof"),
        new_code_cell(ATTAINABLE),
        new_code_cell("# NBVAL_IGNORE_OUTPUT\ncheck_attainable(attainable)"),
        new_markdown_cell("## What next\nMore chapters.\n\n### Solution (open after trying)"),
        new_code_cell(GREEDY_RIGHT + "\n\n\nprint(check_greedy_step(greedy_step))", metadata=hidden),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=cells), str(folder / CHAPTER))
    return folder


def hand_in(student: Path, folder: Path, answers: tuple[str | None, str | None]) -> Path:
    """A learner's copy of the student notebook with ``answers`` in the exercise cells."""
    nb = nbformat.read(str(student), as_version=4)
    stubs = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    for cell, answer in zip(stubs, answers):
        cell.source = answer if answer is not None else cell.source
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(folder / CHAPTER))
    return nb


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The course, its student edition, and the class's hand-ins."""
    root = tmp_path_factory.mktemp("class")
    course = mini_course(root / "course")
    edition.write_student_edition(root / "student", course)
    subs = root / "submissions"
    for learner, answers in ANSWERS.items():
        hand_in(root / "student" / CHAPTER, subs / learner, answers)
    return {"root": root, "course": course, "student": root / "student", "submissions": subs}


@pytest.fixture(scope="module")
def grades(classroom: dict[str, Path]) -> dict[tuple[str, str], dict[str, str]]:
    """The CSV of ``cyclelab grade`` over the class, by (learner, exercise)."""
    out, here = classroom["root"] / "grades.csv", os.getcwd()
    status = main(
        [
            "grade",
            str(classroom["submissions"]),
            "--out",
            str(out),
            "--course",
            str(classroom["course"]),
            "--executed",
            str(classroom["root"] / "executed"),
            "--jobs",
            "2",
        ]
    )
    assert status == 0 and os.getcwd() == here, "two notebooks at a time, and this process stays in its folder"
    assert sorted(p.name for p in (classroom["root"] / "executed").iterdir()) == sorted(ANSWERS)
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["learner", "notebook", "exercise", "status", "hint", "points", "points_possible"]
    return {(r["learner"], r["exercise"]): r for r in rows}


def test_the_student_edition_of_the_course(classroom: dict[str, Path]) -> None:
    nb = nbformat.read(str(classroom["student"] / CHAPTER), as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "min(peak" not in text and "BEGIN SOLUTION" not in text, "the solution region is gone"
    assert "raise NotImplementedError()" in text, "nbgrader's stub replaces it"
    assert "softmax" not in text and "open after trying" not in text, "the hidden solution and its heading are gone"
    assert "## What next\nMore chapters." in text, "the rest of the heading's cell stays"
    assert [c.metadata.get("tags") for c in nb.cells if c.metadata.get("tags") not in (None, ["parameters"])] == [
        ["exercise"],
        ["check"],
        ["exercise"],
        ["check"],
    ]


def test_one_row_per_learner_and_exercise(grades: dict) -> None:
    assert set(grades) == {(learner, ex) for learner in ANSWERS for ex in ("greedy_step", "attainable")}
    assert all(r["notebook"] == CHAPTER and r["points_possible"] == "1" for r in grades.values())


@pytest.mark.parametrize(
    "learner, exercise, status, hint",
    [
        ("ada", "greedy_step", "passed", r"^$"),
        ("ada", "attainable", "passed", r"^$"),
        ("ben", "greedy_step", "failed", r"returned the logit itself"),
        ("ben", "attainable", "failed", r"memory is the limit.*take min\(peak"),
        ("cy", "greedy_step", "failed", r"chose token 0|probability"),
        ("cy", "attainable", "failed", r"raised NotImplementedError"),
        ("dee", "greedy_step", "failed", r"raised ZeroDivisionError"),
        (
            "dee",
            "attainable",
            "error",
            r"NameError: name 'attainable' is not defined.*first error: cell 8: "
            r"NameError: name 'undefined_name'",
        ),
    ],
    ids=[
        "right-1",
        "right-2",
        "mistake-logit",
        "mistake-max",
        "blank-stub",
        "blank-nbgrader-stub",
        "raises-in-function",
        "raises-at-top-level",
    ],
)
def test_each_learner_gets_a_clear_row(grades: dict, learner: str, exercise: str, status: str, hint: str) -> None:
    row = grades[(learner, exercise)]
    assert row["status"] == status
    assert re.search(hint, row["hint"]), row["hint"]
    assert row["points"] == ("1" if status == "passed" else "0")


@pytest.mark.parametrize(
    "first_cell, timeout, pattern",
    [
        ("import time\ntime.sleep(120)", 2, r"timed out: the notebook ran past --timeout 2 s"),
        ("import os\nos._exit(1)", 60, r"the check did not run: DeadKernelError: Kernel died"),
    ],
    ids=["timeout", "kernel-dies"],
)
def test_a_notebook_that_hangs_or_crashes_gets_error_rows(
    classroom: dict[str, Path], tmp_path: Path, first_cell: str, timeout: float, pattern: str
) -> None:
    nb = nbformat.read(str(classroom["student"] / CHAPTER), as_version=4)
    nb.cells.insert(0, new_code_cell(first_cell))  # before torch: a light kernel
    (tmp_path / "subs" / "zed").mkdir(parents=True)
    nbformat.write(nb, str(tmp_path / "subs" / "zed" / CHAPTER))
    rows = grade.grade_class(tmp_path / "subs", classroom["course"], tmp_path / "executed", timeout=timeout)
    assert [(r.exercise, r.status, r.points) for r in rows] == [("greedy_step", "error", 0), ("attainable", "error", 0)]
    assert all(re.fullmatch(pattern, r.hint) for r in rows), rows


def test_an_edited_check_is_restored_and_a_deleted_one_reported(classroom: dict[str, Path]) -> None:
    ref = grade.reference(classroom["course"], CHAPTER)
    nb = nbformat.read(str(classroom["student"] / CHAPTER), as_version=4)
    checks = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
    checks[0].source = 'print("✓ correct")'
    nb.cells.remove(checks[1])
    fake = nbformat.from_dict(checks[0])  # a copy of the check, edited: counts for nothing
    nb.cells.append(fake)
    assert grade.prepare(nb, ref) == {"check_attainable"}
    assert checks[0].source == "# NBVAL_IGNORE_OUTPUT\ncheck_greedy_step(greedy_step)"
    assert fake.source == 'print("✓ correct")' and "nbgrader" not in fake.metadata


def _bad(tmp_path: Path, case: str) -> list[str]:
    """The ``cyclelab grade`` arguments of one bad-input case (the mini course in tmp_path/course)."""
    subs, course = tmp_path / "subs", mini_course(tmp_path / "course")
    extra: list[str] = []
    if case == "empty":
        subs.mkdir()
    elif case == "no-notebooks":
        (subs / "ada").mkdir(parents=True)
        (subs / "ada" / "notes.txt").write_text("my answers")
    elif case == "loose-notebook":
        subs.mkdir()
        (subs / CHAPTER).write_text("{}")
    elif case == "out-is-a-folder":
        (tmp_path / "g.csv").mkdir()
        (subs / "ada").mkdir(parents=True)
        (subs / "ada" / CHAPTER).write_text("{}")
    elif case in ("corrupt-json", "unknown-chapter", "bad-timeout", "no-course", "bad-jobs"):
        (subs / "ada").mkdir(parents=True)
        name = "99_other.ipynb" if case == "unknown-chapter" else CHAPTER
        (subs / "ada" / name).write_text('{"cells": [', encoding="utf-8")
        extra = {
            "bad-timeout": ["--timeout", "0"],
            "no-course": ["--course", str(tmp_path / "nowhere")],
            "bad-jobs": ["--jobs", "0"],
        }.get(case, [])
    return [
        "grade",
        str(subs),
        "--out",
        str(tmp_path / "g.csv"),
        "--course",
        str(course),
        "--executed",
        str(tmp_path / "executed"),
        *extra,
    ]


@pytest.mark.parametrize(
    "case, code, pattern",
    [
        ("missing", 2, r"no submissions folder .*subs: expected the layout SUBMISSIONS/<learner>/<chapter>\.ipynb"),
        ("empty", 2, r"no notebooks in .*subs: expected the layout"),
        ("no-notebooks", 2, r"no notebooks in .*subs"),
        ("loose-notebook", 2, r"00_mini\.ipynb in .* belong in a folder per learner"),
        ("bad-timeout", 2, r"--timeout must be a positive number of seconds, got 0"),
        ("no-course", 2, r"no course folder .*nowhere: give --course"),
        ("bad-jobs", 2, r"--jobs must be a whole number >= 1, got 0"),
        ("corrupt-json", 0, r'ada,00_mini\.ipynb,greedy_step,error,"malformed: NotJSONError'),
        ("unknown-chapter", 0, r"ada,99_other\.ipynb,,error,the course has no notebook 99_other\.ipynb"),
        ("out-is-a-folder", 2, r"--out .*g\.csv is a folder: give the CSV file"),
    ],
    ids=[
        "missing-folder",
        "empty-folder",
        "no-notebooks",
        "loose-notebook",
        "bad-timeout",
        "no-course",
        "bad-jobs",
        "corrupt-json",
        "unknown-chapter",
        "out-is-a-folder",
    ],
)
def test_bad_input_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, code: int, pattern: str
) -> None:
    """Layout problems stop the grader with exit 2 and a message; a bad notebook is a row, exit 0."""
    assert main(_bad(tmp_path, case)) == code
    text = capsys.readouterr().err if code else (tmp_path / "g.csv").read_text(encoding="utf-8")
    assert re.search(pattern, text), text


def test_a_submission_maps_to_its_notebook_when_a_number_has_two(tmp_path: Path) -> None:
    for name in ("05_decoding.ipynb", "06_fine_tuning.ipynb", "06_fine_tuning_tasks.ipynb"):
        (tmp_path / name).write_text("{}")
    found = {
        sub: (p.name if (p := grade.course_notebook(tmp_path, sub)) else None)
        for sub in (
            "06_fine_tuning_tasks.ipynb",
            "06_fine_tuning_tasks-ann.ipynb",
            "06_fine_tuning (1).ipynb",
            "05_decoding-copy.ipynb",
            "06_other.ipynb",
            "07_efficiency.ipynb",
        )
    }
    assert found == {
        "06_fine_tuning_tasks.ipynb": "06_fine_tuning_tasks.ipynb",
        "06_fine_tuning_tasks-ann.ipynb": "06_fine_tuning_tasks.ipynb",
        "06_fine_tuning (1).ipynb": "06_fine_tuning.ipynb",
        "05_decoding-copy.ipynb": "05_decoding.ipynb",
        "06_other.ipynb": None,
        "07_efficiency.ipynb": None,
    }
