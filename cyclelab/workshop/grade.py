"""Grade a class: run each learner's notebooks headless, then judge each check in a process of its own.

Layout: ``SUBMISSIONS/<learner>/<chapter>.ipynb``, one folder per learner holding the chapter notebooks they
hand in. A notebook is matched to the course notebook by its ``NN_`` prefix (a browser's
``01_tokenizing (1).ipynb`` is chapter 01); notebooks in a learner's subfolders are found too. The check cells
are restored from the course, and the notebook runs with papermill (cells that raise do not stop it) in a
limited process (:mod:`cyclelab.workshop.sandbox`) under a deadline scaled by the chapter's cost label; its
check cells call nothing there. Then each ``check_xxx(...)`` call of each check cell is judged by cyclelab's
own check in a fresh process (:mod:`cyclelab.workshop.verdict`) that calls the learner's function in a
limited process of its own holding only the learner's definitions (:mod:`cyclelab.workshop.learner`):
nothing printed in the learner's kernel counts, and a function that never returns or runs past a limit
errs its own row. Each call gets one row: passed, failed (with the check's hint), or error (with the reason);
a notebook that cannot be read gets rows "malformed: <reason>", and no notebook stops the run.

    cyclelab grade SUBMISSIONS/ --out grades.csv [--timeout SECONDS] [--check-timeout SECONDS] [--course DIR]
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import sys
import warnings
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from cyclelab.loading.atomic import write_atomic
from cyclelab.workshop.edition import CHECK, annotate, checked_function, read_notebook
from cyclelab.workshop.sandbox import Limits, hand_over, run_limited

LAYOUT = "SUBMISSIONS/<learner>/<chapter>.ipynb"
PASSED, FAILED, ERROR = "passed", "failed", "error"
CHAPTER = re.compile(r"^(\d\d)_")
FORMULA = ("=", "+", "-", "@", "\t", "\r")
LABEL_FACTOR, LABEL_SLACK = 3, 60  # a labelled chapter may take 3x its measured seconds, plus a minute


@dataclass
class Grade:
    """One row of the grades table: a learner's result on one check call."""

    learner: str
    notebook: str
    exercise: str
    status: str  # passed, failed or error
    hint: str  # the check's ✗ message, or the reason for an error
    points: float
    points_possible: float


# ------------------------------------------------------------------ finding the submissions


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_submissions(root: Path) -> list[tuple[str, Path]]:
    """(learner, notebook) pairs under ``root`` in the layout ``SUBMISSIONS/<learner>/<chapter>.ipynb``
    (notebooks in a learner's subfolders count, with a warning); FileNotFoundError or ValueError (naming the
    layout) when there are none or files are misplaced."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no submissions folder {root}: expected the layout {LAYOUT}")
    try:
        return _submissions(root)
    except OSError as err:  # a folder this user may not list
        where = err.filename or root
        raise ValueError(
            f"cannot read {where} ({err.strerror or err}): the grader must be able to list every learner's folder; "
            f"fix the permissions (chmod -R u+rX {root}) or grade as the folders' owner"
        ) from None


def _submissions(root: Path) -> list[tuple[str, Path]]:
    loose = sorted(p.name for p in root.glob("*.ipynb"))
    if loose:
        raise ValueError(
            f"{', '.join(loose)} in {root} belong in a folder per learner: the layout is {LAYOUT} "
            f"(e.g. {root / 'ada' / loose[0]})"
        )
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in folder.rglob("*.ipynb") if p.is_file() and _visible(p, folder)):
            if path.parent != folder:
                warnings.warn(
                    f"{path} is in a subfolder of {folder.name}'s folder: graded as {folder.name}'s "
                    f"(the layout is {LAYOUT})",
                    stacklevel=2,
                )
            found.append((folder.name, path))
    if not found:
        raise ValueError(f"no notebooks in {root}: expected the layout {LAYOUT}")
    return found


# ------------------------------------------------------------------ the course's reference


@dataclass(frozen=True)
class Call:
    """One ``check_xxx(function, ...)`` call of a course check cell: one row per learner."""

    check_id: str  # the check cell's grade_id
    check: str  # the check function's name in cyclelab.checks
    function: str  # the learner's function it checks
    args: tuple[str, ...]  # the call's argument expressions
    points: float


@dataclass
class Reference:
    """A course notebook: its name, the source of each check cell by grade_id, each check call, its deadline."""

    name: str
    checks: dict[str, tuple[str, dict]]  # grade_id -> (source, nbgrader metadata)
    calls: list[Call]
    label_seconds: float | None  # the fast profile's cost label, when the chapter has one


def check_calls(grade_id: str, source: str, points: float) -> list[Call]:
    """The ``check_xxx(...)`` calls of a check cell's source, in order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id.startswith("check_")
            and node.args
            and not node.keywords
        ):
            args = tuple(ast.unparse(a) for a in node.args)
            found.append((node.lineno, node.col_offset, Call(grade_id, node.func.id, args[0], args, points)))
    return [call for *_, call in sorted(found, key=lambda f: f[:2])]


def _label_seconds(nb: NotebookNode) -> float | None:
    from cyclelab.workshop.planning import COST

    first = nb.cells[0].source if nb.cells else ""
    labels = {m["profile"]: float(m["seconds"]) for m in COST.finditer(first)}
    return labels.get("fast")


def course_notebook(course: Path, name: str) -> Path | None:
    """The course notebook a submitted file ``name`` is: the same name, else the one notebook with the
    same ``NN_`` prefix; where a number has several notebooks (06), the one whose name (without
    ``.ipynb``) the submitted name starts with, the longest such (``06_fine_tuning_tasks-ann.ipynb`` is
    the tasks notebook, ``06_fine_tuning (1).ipynb`` the methods one)."""
    if (Path(course) / name).is_file():
        return Path(course) / name
    prefix = CHAPTER.match(name)
    matches = sorted(Path(course).glob(f"{prefix.group(1)}_*.ipynb")) if prefix else []
    if len(matches) > 1:
        matches = sorted((p for p in matches if name.startswith(p.stem)), key=lambda p: len(p.stem))[-1:]
    return matches[0] if len(matches) == 1 else None


def reference(course: Path, name: str) -> Reference | None:
    """The checks of the course notebook for ``name``, or None when the course has no such notebook."""
    path = course_notebook(course, name)
    if path is None:
        return None
    nb = read_notebook(path)
    annotate(nb)
    checks = {
        c.metadata["nbgrader"]["grade_id"]: (c.source, dict(c.metadata["nbgrader"]))
        for c in nb.cells
        if CHECK in c.metadata.get("tags", [])
    }
    calls = [
        call
        for grade_id, (source, meta) in checks.items()
        for call in check_calls(grade_id, source, meta.get("points", 1))
    ]
    return Reference(path.name, checks, calls, _label_seconds(nb))


def deadline(ref: Reference, timeout: float) -> tuple[float, str]:
    """Seconds the notebook may run, and why: scaled from the chapter's cost label, at most ``timeout``."""
    if ref.label_seconds is None:
        return timeout, f"--timeout {timeout:g} s"
    scaled = LABEL_FACTOR * ref.label_seconds + LABEL_SLACK
    if scaled >= timeout:
        return timeout, f"--timeout {timeout:g} s"
    return scaled, (
        f"{scaled:g} s: {LABEL_FACTOR}x the chapter's cost label of {ref.label_seconds:g} s + {LABEL_SLACK} s"
    )


def _check_id(cell: NotebookNode, ref: Reference) -> str | None:
    """The grade_id of the course check a submitted cell holds: from its nbgrader metadata (the
    student edition's), else from the ``check_xxx(function)`` call it makes; None for other cells."""
    if cell.cell_type != "code":
        return None
    grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
    if grade_id in ref.checks:
        return grade_id
    name = checked_function(cell.source)
    return f"check_{name}" if f"check_{name}" in ref.checks else None


def prepare(nb: NotebookNode, ref: Reference) -> set[str]:
    """Restore a submission's check cells from the course in place (source and metadata; a copy
    of a check counts for nothing); return the grade_ids of the checks it lacks."""
    present = set()
    for cell in nb.cells:
        grade_id = _check_id(cell, ref)
        if grade_id in present:
            cell.metadata.pop("nbgrader", None)
        elif grade_id:
            source, meta = ref.checks[grade_id]
            cell.source, cell.metadata["nbgrader"] = source, dict(meta)
            present.add(grade_id)
    return set(ref.checks) - present


def load_submission(path: Path) -> NotebookNode:
    """The submitted notebook, validated; ValueError "malformed: <reason>" when it is not one."""
    try:
        nb = nbformat.reads(Path(path).read_text(encoding="utf-8"), as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if not (isinstance(cell.get("source"), str) and isinstance(cell.get("metadata"), dict)):
                raise ValueError("a cell has no text source or metadata")
    except Exception as err:  # noqa: BLE001 - any shape of broken file is a row, not a crash
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"malformed: {type(err).__name__}: {reason[:200]}") from None
    return nb


# ------------------------------------------------------------------ reading the executed notebook


def _error(cell: NotebookNode) -> str:
    """``Name: message`` of the exception a cell raised, or ''."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"
    return ""


def first_error(nb: NotebookNode) -> str:
    """``cell N: Name: message`` of the first cell that raised, or ''; N counts the learner's cells
    from 1 (not the error banners papermill adds)."""
    cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    for number, cell in enumerate(cells, 1):
        if cell.cell_type == "code" and _error(cell):
            return f"cell {number}: {_error(cell)}"
    return ""


# ------------------------------------------------------------------ grading


def _rows(learner: str, name: str, ref: Reference, status: str, hint: str) -> list[Grade]:
    """One row per check call of ``ref``, all with the same status and hint."""
    return [Grade(learner, name, c.function, status, hint, 0, c.points) for c in ref.calls]


def _child_env() -> dict:
    """The environment of the grader's children: this one, with cyclelab importable as here."""
    here = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}


def _child(mode: str, spec: dict, timeout: float, cwd: Path) -> tuple[dict | None, str]:
    """Run ``python -m cyclelab.workshop.verdict MODE`` limited; its JSON answer (None on a timeout) or why not.
    ``-P``: no module is imported from ``cwd``, where the learner's code may have written files."""
    cores = os.cpu_count() or 1
    limits = Limits(cpu_seconds=int(timeout * cores) + 120)
    command = [sys.executable, "-P", "-m", "cyclelab.workshop.verdict", mode]
    done = run_limited(command, timeout, json.dumps(spec), limits, _child_env(), cwd)
    if done.timed_out:
        return None, "timed out"
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]), ""
    except (IndexError, ValueError):
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {}, f"the grader's {mode} process ended without an answer ({tail[0][:200]})"


@dataclass(frozen=True)
class Budget:
    """What one learner's function may use within one check: seconds (None: the notebook's deadline) and
    the limits of its process."""

    seconds: float | None = None
    limits: Limits = Limits()


def grade_notebook(
    learner: str,
    path: Path,
    course: Path,
    work: Path,
    timeout: float,
    root: Path | None = None,
    budget: Budget = Budget(),
) -> list[Grade]:
    """The rows of one learner's notebook; every problem becomes an ``error`` row, never an exception."""
    name = path.name if root is None else str(path.relative_to(root / learner))
    try:
        return _grade(learner, name, path, course, work, timeout, budget)
    except Exception as err:  # noqa: BLE001 - one notebook never stops the class
        return [
            Grade(learner, name, "", ERROR, f"the grader failed on this notebook: {type(err).__name__}: {err}", 0, 0)
        ]


def runnable(nb: NotebookNode, ref: Reference) -> NotebookNode:
    """A copy of a prepared notebook whose check cells call nothing: the kernel runs the learner's cells, and
    each check is judged apart, so a function that never returns stops its own check, not the notebook."""
    copy = nbformat.from_dict(json.loads(json.dumps(nb)))
    for cell in copy.cells:
        if cell.get("cell_type") == "code" and cell.metadata.get("nbgrader", {}).get("grade_id") in ref.checks:
            cell.source = "# graded in a process of its own: " + " ".join(cell.source.split())
    return copy


def _grade(
    learner: str, name: str, path: Path, course: Path, work: Path, timeout: float, budget: Budget
) -> list[Grade]:
    ref = reference(course, path.name)
    if ref is None:
        return [
            Grade(
                learner,
                name,
                "",
                ERROR,
                f"the course has no notebook {path.name} (in {course}): name it as in the course (its NN_ prefix)",
                0,
                0,
            )
        ]
    try:
        nb = load_submission(path)
    except ValueError as err:
        return _rows(learner, name, ref, ERROR, str(err))
    missing = prepare(nb, ref)
    folder = work / learner / Path(name).with_suffix("").name
    prepared = folder / "submitted" / ref.name
    prepared.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(runnable(nb, ref), str(prepared))
    hand_over(folder)
    seconds, why = deadline(ref, timeout)
    answer, problem = _child(
        "notebook",
        {"notebook": str(prepared), "out_dir": str(folder), "timeout": seconds},
        seconds + 60,
        prepared.parent,
    )
    error = (answer or {}).get("error", "")
    if answer is None or (not error.startswith("cell ") and error.split(":")[0].endswith("TimeoutError")):
        return _rows(learner, name, ref, ERROR, f"timed out: the notebook ran past {why}")
    if problem:
        return _rows(learner, name, ref, ERROR, problem)
    if error and not error.startswith("cell "):
        return _rows(learner, name, ref, ERROR, f"the check did not run: {error}")
    budget = Budget(budget.seconds or seconds, budget.limits)
    return [_judge(learner, name, nb, ref, call, missing, budget, prepared.parent) for call in ref.calls]


def _judge(
    learner: str, name: str, nb: NotebookNode, ref: Reference, call: Call, missing: set[str], budget: Budget, cwd: Path
) -> Grade:
    """The row of one check call, judged in a fresh process."""
    if call.check_id in missing:
        return Grade(
            learner,
            name,
            call.function,
            ERROR,
            f"the check cell {call.check_id} is missing from the notebook",
            0,
            call.points,
        )
    cells = []
    for number, cell in enumerate(nb.cells, 1):
        if cell.metadata.get("nbgrader", {}).get("grade_id") == call.check_id:
            break
        if cell.cell_type == "code" and not _check_id(cell, ref):
            cells.append([number, cell.source])
    spec = {"cells": cells, "check": call.check, "function": call.function, "args": list(call.args)}
    spec |= {"timeout": budget.seconds, "limits": asdict(budget.limits), "cwd": str(cwd)}
    outer = budget.seconds + 120  # the learner's time, then the check's own (its imports, its references)
    answer, problem = _child("check", spec, outer, Path("/"))  # nothing the learner wrote is beside it
    if answer is None:
        status, hint = ERROR, f"timed out: the check of {call.function} ran past {outer:g} s"
    else:
        status, hint = (ERROR, problem) if problem else (answer["status"], answer["hint"])
    return Grade(learner, name, call.function, status, hint, call.points if status == PASSED else 0, call.points)


def grade_class(
    submissions: Path,
    course: Path | None = None,
    work: Path = Path("outputs/graded"),
    timeout: float = 600,
    jobs: int = 1,
    budget: Budget = Budget(),
) -> list[Grade]:
    """Grade every notebook under ``submissions`` (layout ``SUBMISSIONS/<learner>/<chapter>.ipynb``),
    ``jobs`` notebooks at a time; rows in the order of learners and notebooks. ``budget``: what a learner's
    function may use in one check (by default the notebook's deadline, and :class:`Limits`' defaults)."""
    from concurrent.futures import ThreadPoolExecutor

    from cyclelab.workshop.course import notebooks_dir

    if not timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"--jobs must be a whole number >= 1, got {jobs}")
    course, work = Path(course or notebooks_dir()).resolve(), Path(work).resolve()
    if not course.is_dir():
        raise FileNotFoundError(f"no course folder {course}: give --course the folder of the chapter notebooks")
    root = Path(submissions)
    pairs = find_submissions(root)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each notebook runs in processes of its own
        graded = pool.map(lambda pair: grade_notebook(*pair, course, work, timeout, root, budget), pairs)
        return [row for rows in graded for row in rows]


def check_out(path: Path) -> None:
    """ValueError unless the CSV can be written at ``path`` (checked before any grading starts)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: give the CSV file to write, e.g. {path / 'grades.csv'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is a file, not a folder: give --out a path inside a folder")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise ValueError(f"--out {path} cannot be written (permission denied)")


def cell(value) -> str | float:
    """A CSV cell a spreadsheet shows as text: one starting with = + - @, a tab or CR gets a ' in front."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA) else value


def write_csv(rows: list[Grade], path: Path) -> None:
    """The grades as CSV: learner, notebook, exercise, status, hint, points, points_possible."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow([f.name for f in fields(Grade)])
    writer.writerows([cell(v) for v in astuple(row)] for row in rows)
    write_atomic(path, table.getvalue())  # a full disk keeps the previous grades.csv whole


def summary(rows: list[Grade]) -> str:
    """One line per learner: points earned of possible, and how many checks passed, failed, errored."""
    lines = []
    for learner in dict.fromkeys(r.learner for r in rows):
        mine = [r for r in rows if r.learner == learner]
        counts = ", ".join(f"{sum(r.status == s for r in mine)} {s}" for s in (PASSED, FAILED, ERROR))
        lines.append(
            f"{learner}: {sum(r.points for r in mine):g}/{sum(r.points_possible for r in mine):g} points ({counts})"
        )
    return "\n".join(lines)
