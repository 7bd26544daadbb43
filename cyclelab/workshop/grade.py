"""Grade a class: run each learner's notebooks headless and read the course's own checks.

Layout: ``SUBMISSIONS/<learner>/<chapter>.ipynb``, one folder per learner holding the chapter
notebooks they hand in, named as in the course (``00_the_clock_cycle.ipynb``). Each notebook is
compared with the course notebook of the same name (its exercises and check cells, found by
:mod:`cyclelab.workshop.edition`): the check cells are restored from the course before running, so an
edited check cannot pass; the notebook runs with papermill in the fast profile, cells that raise
do not stop it (each exercise is graded on its own), and a deadline bounds the whole notebook.
Each exercise gets one row: passed, failed (with the check's hint), or error (with the reason).

    cyclelab grade SUBMISSIONS/ --out grades.csv [--timeout SECONDS] [--course DIR]
"""

from __future__ import annotations

import csv
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from cyclelab.workshop.edition import CHECK, Exercise, annotate, checked_function, read_notebook

LAYOUT = "SUBMISSIONS/<learner>/<chapter>.ipynb"
PASSED, FAILED, ERROR = "passed", "failed", "error"


@dataclass
class Grade:
    """One row of the grades table: a learner's result on one exercise."""

    learner: str
    notebook: str
    exercise: str
    status: str  # passed, failed or error
    hint: str  # the check's ✗ message, or the reason for an error
    points: float
    points_possible: float


# ------------------------------------------------------------------ finding the submissions


def find_submissions(root: Path) -> list[tuple[str, Path]]:
    """(learner, notebook) pairs under ``root`` in the layout ``SUBMISSIONS/<learner>/<chapter>.ipynb``;
    FileNotFoundError or ValueError (naming the layout) when there are none or files are misplaced."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no submissions folder {root}: expected the layout {LAYOUT}")
    loose = sorted(p.name for p in root.glob("*.ipynb"))
    if loose:
        raise ValueError(f"{', '.join(loose)} in {root} belong in a folder per learner: the layout is {LAYOUT} "
                         f"(e.g. {root / 'ada' / loose[0]})")
    found = [(folder.name, path) for folder in sorted(root.iterdir())
             if folder.is_dir() and not folder.name.startswith(".")
             for path in sorted(folder.glob("*.ipynb")) if not path.name.startswith(".")]
    if not found:
        raise ValueError(f"no notebooks in {root}: expected the layout {LAYOUT}")
    return found


# ------------------------------------------------------------------ the course's reference


@dataclass
class Reference:
    """A course notebook's exercises and the source of each check cell, by grade_id."""

    exercises: list[Exercise]
    checks: dict[str, tuple[str, dict]]  # grade_id -> (source, nbgrader metadata)


def reference(course: Path, name: str) -> Reference | None:
    """The exercises of the course notebook ``course/name``, or None when the course has no such notebook."""
    path = Path(course) / name
    if not path.is_file():
        return None
    nb = read_notebook(path)
    found = annotate(nb)
    checks = {c.metadata["nbgrader"]["grade_id"]: (c.source, dict(c.metadata["nbgrader"]))
              for c in nb.cells if CHECK in c.metadata.get("tags", [])}
    return Reference(found, checks)


def _check_id(cell: NotebookNode, ref: Reference) -> str | None:
    """The grade_id of the course check a submitted cell holds: from its nbgrader metadata (the
    student edition's), else from the ``check_xxx(function)`` call it makes; None for other cells."""
    grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
    if grade_id in ref.checks:
        return grade_id
    name = checked_function(cell.source) if cell.cell_type == "code" else None
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


# ------------------------------------------------------------------ reading the executed checks


def _text(cell: NotebookNode) -> str:
    """What a cell printed or displayed, as text."""
    parts = [o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", "")
             for o in cell.get("outputs", [])]
    return "\n".join("".join(p) if isinstance(p, list) else p for p in parts)


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


def check_status(cell: NotebookNode, stopped: str, first: str) -> tuple[str, str]:
    """(status, hint) of an executed check cell: its ✓ or ✗ line, the error it raised, or why it did not run."""
    for line in _text(cell).splitlines():
        if line.startswith("✓"):
            return PASSED, ""
        if line.startswith("✗"):
            return FAILED, line[1:].strip()
    error = _error(cell)
    if error:
        before = f" (the notebook's first error: {first})" if first and not first.endswith(error) else ""
        return ERROR, f"the check raised {error}{before}"
    if cell.get("execution_count") is None and not cell.get("outputs"):
        return ERROR, f"the check did not run: {stopped or 'the notebook stopped before it'}"
    return ERROR, "the check printed no ✓ or ✗ line"


# ------------------------------------------------------------------ grading


def _rows(learner: str, name: str, ref: Reference, status: str, hint: str) -> list[Grade]:
    """One row per exercise of ``ref``, all with the same status and hint."""
    return [Grade(learner, name, e.name, status, hint, 0, e.points) for e in ref.exercises]


def _deadline(seconds: float):
    """A nbclient ``timeout_func``: each cell may use what is left of ``seconds`` from now."""
    end = time.monotonic() + seconds
    return lambda cell: max(1, int(end - time.monotonic() + 0.999))


def _timed_out(error: str) -> bool:
    """True when a run stopped on the deadline (not when a learner's cell raised a TimeoutError)."""
    return not error.startswith("cell ") and error.split(":")[0].endswith("TimeoutError")


def grade_notebook(learner: str, path: Path, course: Path, work: Path, timeout: float) -> list[Grade]:
    """The rows of one learner's notebook; every problem becomes an ``error`` row, never an exception."""
    from cyclelab.workshop.course import run_notebook

    ref = reference(course, path.name)
    if ref is None:
        return [Grade(learner, path.name, "", ERROR, f"the course has no notebook {path.name} (in {course}): "
                      "name it as in the course", 0, 0)]
    try:
        nb = read_notebook(path)
    except ValueError as err:
        return _rows(learner, path.name, ref, ERROR, f"cannot read the notebook: {err}")
    missing = prepare(nb, ref)
    prepared = work / learner / "submitted" / path.name
    prepared.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(prepared))
    run = run_notebook(prepared, work / learner, allow_errors=True, timeout_func=_deadline(timeout),
                       cwd=None, resources={"metadata": {"path": str(prepared.parent)}})  # the kernel's folder
    # (papermill's cwd would change this process's folder, which other grading threads share)
    if _timed_out(run.error):
        return _rows(learner, path.name, ref, ERROR, f"timed out: the notebook ran past --timeout {timeout:g} s")
    return _read_checks(learner, path.name, ref, missing, run.output, run.error)


def _read_checks(learner: str, name: str, ref: Reference, missing: set[str], output: Path,
                 run_error: str) -> list[Grade]:
    """The rows read from the executed notebook at ``output``."""
    try:
        executed = nbformat.read(str(output), as_version=4)
    except (OSError, ValueError) as err:
        return _rows(learner, name, ref, ERROR, f"the notebook did not run: {run_error or err}")
    cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in executed.cells}
    first = first_error(executed)
    stopped = "" if run_error.startswith("cell ") else run_error
    rows = []
    for exercise in ref.exercises:
        if exercise.check_id in missing or exercise.check_id not in cells:
            status, hint = ERROR, f"the check cell {exercise.check_id} is missing from the notebook"
        else:
            status, hint = check_status(cells[exercise.check_id], stopped, first)
        earned = exercise.points if status == PASSED else 0
        rows.append(Grade(learner, name, exercise.name, status, hint, earned, exercise.points))
    return rows


def grade_class(submissions: Path, course: Path | None = None, work: Path = Path("outputs/graded"),
                timeout: float = 600, jobs: int = 1) -> list[Grade]:
    """Grade every notebook under ``submissions`` (layout ``SUBMISSIONS/<learner>/<chapter>.ipynb``),
    ``jobs`` notebooks at a time; rows in the order of learners and notebooks."""
    from concurrent.futures import ThreadPoolExecutor

    from cyclelab.workshop.course import notebooks_dir

    if not timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"--jobs must be a whole number >= 1, got {jobs}")
    course, work = Path(course or notebooks_dir()).resolve(), Path(work).resolve()
    if not course.is_dir():
        raise FileNotFoundError(f"no course folder {course}: give --course the folder of the chapter notebooks")
    pairs = find_submissions(submissions)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each notebook runs in its own kernel process
        graded = pool.map(lambda pair: grade_notebook(*pair, course, work, timeout), pairs)
        return [row for rows in graded for row in rows]


def write_csv(rows: list[Grade], path: Path) -> None:
    """The grades as CSV: learner, notebook, exercise, status, hint, points, points_possible."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([f.name for f in fields(Grade)])
        writer.writerows(astuple(row) for row in rows)


def summary(rows: list[Grade]) -> str:
    """One line per learner: points earned of possible, and how many exercises passed, failed, errored."""
    lines = []
    for learner in dict.fromkeys(r.learner for r in rows):
        mine = [r for r in rows if r.learner == learner]
        counts = ", ".join(f"{sum(r.status == s for r in mine)} {s}" for s in (PASSED, FAILED, ERROR))
        lines.append(f"{learner}: {sum(r.points for r in mine):g}/{sum(r.points_possible for r in mine):g} "
                     f"points ({counts})")
    return "\n".join(lines)
