"""``cyclelab grade`` against a made-up class that cheats, breaks and renames things.

The course is test_grade's two-exercise notebook (checks: greedy step, roofline; both cheap). Each learner
edits the student edition with nbformat: right, stub, wrong, crashing, looping (its check times out, the next
one is graded), malformed, renamed, in a subfolder, named like a spreadsheet formula, leaving a process behind,
and every cheat an instructor found: among them function bodies that patch cyclelab, patch it through
sys.modules, or write a fake cyclelab where the checker used to run. The whole CSV is asserted: every cheat is
graded failed.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nbformat
import pytest
from test_grade import ATTAINABLE_RIGHT, CHAPTER, GREEDY_RIGHT, GREEDY_STUB, mini_course

from cyclelab.cli import main
from cyclelab.workshop import edition, grade

STUB = GREEDY_STUB
MARK = "317.25"  # a sleeping process left by a learner carries this argument
CHEATS = {  # learner -> greedy_step cell (attainable is answered right, so only the cheat is at stake)
    "rebind": STUB + "\n\nfrom cyclelab.checks import Result\ncheck_greedy_step = lambda fn: Result(True, 'ok')",
    "prints": 'def greedy_step(logits):\n    print("✓ correct")\n    return 0, 0.0',
    "str-patch": STUB + "\n\nfrom cyclelab.checks import Result\nResult.__str__ = lambda self: '✓ correct'",
    "hook": STUB + "\n\nget_ipython().events.register('pre_run_cell', lambda *a: print('✓ correct'))",
    "copied": "from cyclelab.checks.clock_cycle import _greedy_hint as greedy_step",
    "wraps-ref": "import cyclelab.checks as c\n\ndef greedy_step(logits):\n    return c._ref_greedy(logits)",
    "patches-cyclelab": "def greedy_step(logits):\n    import cyclelab.checks.harness as h\n"
    "    h.Result.__bool__ = lambda self: True\n    h.close = lambda *a, **k: True\n    return 0, 0.0",
    "patches-sys-modules": "import sys\n\ndef greedy_step(logits):\n"
    "    sys.modules['cyclelab.checks'].check_greedy_step = lambda fn: sys.modules['cyclelab.checks'].Result(True, '')\n"
    "    __import__('cyclelab.workshop.verdict')\n    sys.modules['cyclelab.workshop.verdict'].judge = lambda spec: {'status': 'passed', 'hint': ''}\n"
    "    return 0, 0.0",
}
# the function writes a cyclelab package whose verdict says "passed" where the checker used to run (its folder,
# first on sys.path): the next check (attainable, answered wrong here) must not import it
FAKE = 'import json\nprint(json.dumps({"status": "passed", "hint": ""}))\n'
WRITES = f"""def greedy_step(logits):
    import os
    for folder in ("cyclelab", "cyclelab/workshop", "cyclelab/checks"):
        os.makedirs(folder, exist_ok=True)
        open(folder + "/__init__.py", "w").close()
    for name in ("cyclelab/workshop/verdict.py", "sitecustomize.py"):
        with open(name, "w") as handle:
            handle.write({FAKE!r})
    return 0, 0.0"""
ATTAINABLE_WRONG = "def attainable(flops, nbytes, peak, bandwidth):\n    return max(peak, flops / nbytes * bandwidth)"
ANSWERS = {
    "right": GREEDY_RIGHT,
    "stub": None,
    "wrong": "def greedy_step(logits):\n    return int(logits.argmax()), float(logits.max())",
    "crash": "def greedy_step(logits):\n    return 1 // 0",
    "=1+2": GREEDY_RIGHT,
    "leaves-a-process": f"import subprocess\nsubprocess.Popen(['sleep', '{MARK}'], start_new_session=True)\n\n"
    + GREEDY_RIGHT,
    **CHEATS,
}
EXPECTED = {  # (learner, notebook) -> [(exercise, status, points)], in the CSV's order
    **{
        (who, CHAPTER): [("greedy_step", "passed", "1"), ("attainable", "passed", "1")]
        for who in ("right", "'=1+2", "leaves-a-process")
    },
    **{
        (who, CHAPTER): [("greedy_step", "failed", "0"), ("attainable", "passed", "1")]
        for who in ("stub", "wrong", "crash", *CHEATS)
    },
    ("looping", CHAPTER): [("greedy_step", "error", "0"), ("attainable", "passed", "1")],
    ("writes-a-file", CHAPTER): [("greedy_step", "failed", "0"), ("attainable", "failed", "0")],
    ("malformed", CHAPTER): [("greedy_step", "error", "0"), ("attainable", "error", "0")],
    ("renamed", "00_mini (1).ipynb"): [("greedy_step", "passed", "1"), ("attainable", "passed", "1")],
    ("deeper", "inner/00_mini.ipynb"): [("greedy_step", "passed", "1"), ("attainable", "passed", "1")],
}


def _hand_in(student: Path, target: Path, greedy: str | None, attainable: str | None = ATTAINABLE_RIGHT) -> None:
    nb = nbformat.read(str(student), as_version=4)
    stubs = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    for cell, answer in zip(stubs, (greedy, attainable)):
        cell.source = answer if answer is not None else cell.source
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(target))


def _sleepers() -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if MARK in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    root = tmp_path_factory.mktemp("cheats")
    course = mini_course(root / "course")
    edition.write_student_edition(root / "student", course)
    student, subs = root / "student" / CHAPTER, root / "subs"
    for learner, answer in ANSWERS.items():
        _hand_in(student, subs / learner / CHAPTER, answer)
    _hand_in(student, subs / "looping" / CHAPTER, "def greedy_step(logits):\n    while True:\n        pass")
    _hand_in(student, subs / "writes-a-file" / CHAPTER, WRITES, ATTAINABLE_WRONG)
    _hand_in(student, subs / "renamed" / "00_mini (1).ipynb", GREEDY_RIGHT)
    _hand_in(student, subs / "deeper" / "inner" / CHAPTER, GREEDY_RIGHT)
    (subs / "malformed").mkdir()
    (subs / "malformed" / CHAPTER).write_text(json.dumps({"cells": 3, "nbformat": 4}))
    out = root / "grades.csv"
    with pytest.warns(UserWarning, match=r"inner/00_mini\.ipynb is in a subfolder of deeper's folder"):
        status = main(
            [
                "grade",
                str(subs),
                "--out",
                str(out),
                "--course",
                str(course),
                "--executed",
                str(root / "executed"),
                "--jobs",
                "2",
                "--timeout",
                "40",
                "--check-timeout",
                "15",
            ]
        )
    assert status == 0
    with open(out, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_whole_csv(rows: list[dict[str, str]]) -> None:
    got: dict[tuple[str, str], list] = {}
    for r in rows:
        got.setdefault((r["learner"], r["notebook"]), []).append((r["exercise"], r["status"], r["points"]))
    assert got == EXPECTED


@pytest.mark.parametrize(
    "learner, pattern",
    [
        ("stub", r"^the probability should be"),
        ("wrong", "returned the logit itself"),
        ("crash", "raised ZeroDivisionError"),
        ("prints", r"^the probability should be"),
        ("rebind", r"^the probability should be"),
        ("str-patch", r"^the probability should be"),
        ("hook", r"^the probability should be"),
        ("copied", r"^copied from the package: greedy_step is not yours \(its code is cyclelab's own"),
        ("wraps-ref", r"^copied from the package: greedy_step is not yours \(it calls the package's reference _ref_"),
        ("looping", r"^timed out after 15 s: greedy_step did not return"),
        ("patches-cyclelab", r"^the probability should be"),
        ("patches-sys-modules", r"^the probability should be"),
        ("writes-a-file", r"^the probability should be"),
        ("malformed", r"^malformed: "),
    ],
)
def test_each_row_says_why(rows: list[dict[str, str]], learner: str, pattern: str) -> None:
    import re

    row = next(r for r in rows if r["learner"] == learner and r["exercise"] == "greedy_step")
    assert re.search(pattern, row["hint"]), row["hint"]


def test_the_file_was_written_and_not_read(rows: list[dict[str, str]], tmp_path_factory) -> None:
    written = list(tmp_path_factory.getbasetemp().glob("cheats*/executed/writes-a-file/*/submitted/cyclelab"))
    assert written and (written[0] / "workshop" / "verdict.py").read_text() == FAKE
    row = next(r for r in rows if r["learner"] == "writes-a-file" and r["exercise"] == "attainable")
    assert row["status"] == "failed" and row["hint"], row


def test_no_process_is_left_behind(rows: list[dict[str, str]]) -> None:
    assert _sleepers() == []


def test_two_checks_in_one_cell_are_two_rows() -> None:
    calls = grade.check_calls(
        "check_my_layer_norm", "# x\nprint(check_layer_norm(my_layer_norm))\nprint(check_rms_norm(my_rms_norm))", 2
    )
    assert [(c.check, c.function, c.args, c.points) for c in calls] == [
        ("check_layer_norm", "my_layer_norm", ("my_layer_norm",), 2),
        ("check_rms_norm", "my_rms_norm", ("my_rms_norm",), 2),
    ]


@pytest.mark.parametrize(
    "value, cell",
    [
        ("=1+2", "'=1+2"),
        ("+x", "'+x"),
        ("-1", "'-1"),
        ("@a", "'@a"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("ada", "ada"),
        (1.0, 1.0),
    ],
)
def test_csv_cells_cannot_be_formulas(value, cell) -> None:
    assert grade.cell(value) == cell


@pytest.mark.parametrize(
    "name, chapter",
    [("00_mini (1).ipynb", CHAPTER), ("00_mini.ipynb", CHAPTER), ("99_x.ipynb", None), ("mini.ipynb", None)],
)
def test_chapters_match_by_prefix(tmp_path: Path, name: str, chapter: str | None) -> None:
    course = mini_course(tmp_path / "course")
    found = grade.course_notebook(course, name)
    assert (found.name if found else None) == chapter
