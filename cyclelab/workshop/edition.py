"""Exercises as nbgrader sees them, and the student edition of the course.

The chapters follow one convention, which :func:`classify` reads:

- an **exercise** is a code cell with a stub: a function with ``# your code here`` (or an
  nbgrader region ``### BEGIN SOLUTION`` … ``### END SOLUTION``);
- its **check** is a later code cell calling ``check_xxx(function, …)`` from :mod:`cyclelab.checks`;
- its **solution** is a hidden code cell (``jupyter.source_hidden``) under a markdown heading
  ``### Solution(s) (open after trying)``, or a hidden cell redefining an exercise's function.

:func:`annotate` writes the tags ``exercise``, ``check``, ``solution`` and nbgrader's cell metadata
(schema version 3): an exercise is an autograded answer (``solution``), its check an autograder
test (``grade``, ``locked``, worth ``points``). Solution cells carry only their tag: they are the
instructor's, and :func:`student_notebook` removes them. The instructor edition is the repository.

    cyclelab edition annotate [NOTEBOOK ...]   tags and metadata, in place (outputs untouched)
    cyclelab edition student OUT/ [--nbgrader] the student copy of every chapter and of the bug hunt

nbgrader's autograder scores a test cell 0 only when it raises; the course's checks print ✗ instead,
so ``--nbgrader`` rewrites each check cell to print the result and then assert it.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from cyclelab.loading.atomic import write_atomic
from cyclelab.loading.schema import StrictValidator

EXERCISE, CHECK, SOLUTION, OTHER = "exercise", "check", "solution", "other"
KIND_TAGS = (EXERCISE, CHECK, SOLUTION)
SCHEMA_VERSION = 3
DEFAULT_POINTS = 1
STUB_MARK = re.compile(r"#\s*your code here", re.IGNORECASE)
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
REGION = re.compile(rf"^([ \t]*){BEGIN}[^\n]*\n.*?^[ \t]*{END}[^\n]*(\n|$)", re.MULTILINE | re.DOTALL)
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # nbgrader's own stub for Python
SOLUTION_HEADING = re.compile(r"^#{1,6}\s*Solutions?\s*\(open after trying\)\s*$", re.MULTILINE | re.IGNORECASE)
CHECK_CALL = re.compile(r"\b(check_\w+)\(\s*([A-Za-z_]\w*)")


@dataclass(frozen=True)
class Exercise:
    """One exercise of a notebook: the function to write and the check cell that grades it."""

    name: str  # the function's name; the exercise cell's grade_id
    check_id: str  # the check cell's grade_id
    points: float


# ------------------------------------------------------------------ classifying cells


def function_name(source: str) -> str | None:
    """The first top-level function a cell defines (read with a regex when the code does not parse)."""
    try:
        return next((n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)), None)
    except SyntaxError:
        found = re.search(r"^def\s+([A-Za-z_]\w*)", source, re.MULTILINE)
        return found.group(1) if found else None


def checked_function(source: str) -> str | None:
    """The function a check cell passes to its ``check_xxx(...)`` call, or None."""
    found = CHECK_CALL.search(source)
    return found.group(2) if found else None


def _hidden(cell: NotebookNode) -> bool:
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


def _is_stub(source: str) -> bool:
    return bool(STUB_MARK.search(source)) or BEGIN in source


def classify(nb: NotebookNode) -> list[str]:
    """The kind of each cell: ``exercise``, ``check``, ``solution`` or ``other`` (see the module doc)."""
    kinds: list[str] = []
    defined: set[str] = set()
    after_heading = False
    for cell in nb.cells:
        kind, source = OTHER, cell.source
        if cell.cell_type == "markdown":
            after_heading = after_heading or bool(SOLUTION_HEADING.search(source))
        elif cell.cell_type == "code" and _hidden(cell) and (after_heading or function_name(source) in defined):
            kind = SOLUTION
        elif cell.cell_type == "code" and _is_stub(source) and (name := function_name(source)):
            kind = EXERCISE
            defined.add(name)
        elif cell.cell_type == "code" and checked_function(source) in defined:
            kind = CHECK
        kinds.append(kind)
    return kinds


# ------------------------------------------------------------------ annotating


def _nbgrader(grade_id: str, *, grade: bool, solution: bool, points: float | None = None) -> dict:
    """nbgrader's cell metadata, schema version 3: an answer (solution) or a locked test (grade)."""
    meta = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": grade,
        "schema_version": SCHEMA_VERSION,
        "solution": solution,
        "task": False,
    }
    if grade:
        meta["points"] = points
    return meta


def _set_kind(cell: NotebookNode, kind: str) -> None:
    """Our tag for ``kind`` on the cell, and none of the other two (its other tags stay)."""
    tags = [t for t in cell.metadata.get("tags", []) if t not in KIND_TAGS or t == kind]
    if kind in KIND_TAGS and kind not in tags:
        tags.append(kind)
    if tags:
        cell.metadata["tags"] = tags
    else:
        cell.metadata.pop("tags", None)


def annotate(nb: NotebookNode) -> list[Exercise]:
    """Tag and annotate ``nb``'s exercise, check and solution cells in place; return its exercises.

    Idempotent; a check cell keeps the points an instructor has set in its nbgrader metadata."""
    kinds = classify(nb)
    found: list[Exercise] = []
    for cell, kind in zip(nb.cells, kinds):
        was_ours = any(t in KIND_TAGS for t in cell.metadata.get("tags", []))
        _set_kind(cell, kind)
        if kind == EXERCISE:
            cell.metadata["nbgrader"] = _nbgrader(function_name(cell.source), grade=False, solution=True)
        elif kind == CHECK:
            name = checked_function(cell.source)
            points = cell.metadata.get("nbgrader", {}).get("points", DEFAULT_POINTS)
            cell.metadata["nbgrader"] = _nbgrader(f"check_{name}", grade=True, solution=False, points=points)
            found.append(Exercise(name, f"check_{name}", points))
        elif was_ours:  # a cell annotated before that no longer follows the convention
            cell.metadata.pop("nbgrader", None)
    return found


def annotate_file(path: Path) -> tuple[list[Exercise], bool]:
    """Annotate the notebook at ``path`` in place (written only when something changed, as
    nbformat writes it); return its exercises and whether the file changed."""
    path = Path(path)
    nb = read_notebook(path)
    before = nbformat.writes(nb)
    found = annotate(nb)
    validate(nb, path.name)
    changed = nbformat.writes(nb) != before
    if changed:
        save_notebook(nb, path)
    return found, changed


def save_notebook(nb: NotebookNode, path: Path) -> None:
    """Write ``nb`` as ``nbformat.write`` does, atomically: a failed save keeps the previous file whole."""
    text = nbformat.writes(nb)
    write_atomic(path, text if text.endswith("\n") else text + "\n")


def read_notebook(path: Path) -> NotebookNode:
    """The notebook at ``path``; FileNotFoundError or ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}: check the path (give .ipynb files)")
    try:
        return nbformat.read(str(path), as_version=4)
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as err:  # not JSON, or not a notebook
        raise ValueError(
            f"{path} is not a readable notebook ({type(err).__name__}: {err}): give a Jupyter notebook (.ipynb)"
        ) from None


def exercises_of(nb: NotebookNode) -> list[Exercise]:
    """The exercises of an annotated notebook, read from its check cells' nbgrader metadata."""
    found = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if CHECK in cell.metadata.get("tags", []) and meta.get("grade"):
            found.append(Exercise(meta["grade_id"].removeprefix("check_"), meta["grade_id"], meta["points"]))
    return found


# ------------------------------------------------------------------ nbgrader's schema, version 3

_TYPES = {"schema_version": "integer", "grade": "boolean", "locked": "boolean", "solution": "boolean"}
_TYPES |= {"task": "boolean", "grade_id": "string", "points": "number", "checksum": "string", "cell_type": "string"}
_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "grade", "locked", "solution"],
    "additionalProperties": False,
    "properties": {name: {"type": kind} for name, kind in _TYPES.items()},
}
_CHECK = StrictValidator(_SCHEMA)
_GRADE_ID = re.compile(r"^[A-Za-z0-9_\-]*$")


def _schema_problem(meta: dict, cell_type: str) -> str | None:
    """What breaks nbgrader's v3 cell schema (``_SCHEMA``: strict ints, finite numbers) and rules in ``meta``, or None."""
    if not isinstance(meta, dict):
        return f"metadata must be a dict, got {type(meta).__name__}"
    errors = list(_CHECK.iter_errors(meta))
    missing = [k for k in _SCHEMA["required"] if k not in meta]
    extra = sorted(set(meta) - set(_TYPES))
    wrong = sorted({e.path[0] for e in errors if e.validator == "type" and e.path})
    if errors:
        return f"missing {missing}, unknown {extra}, wrong type {wrong}"
    if meta["schema_version"] != SCHEMA_VERSION:
        return f"schema_version is {meta['schema_version']}, expected {SCHEMA_VERSION}"
    if (meta["grade"] or meta["solution"] or meta["locked"]) and not meta.get("grade_id"):
        return "a graded, solution or locked cell needs a non-empty grade_id"
    if not _GRADE_ID.match(meta.get("grade_id", "")):
        return f"grade_id {meta['grade_id']!r} may hold only letters, digits, _ and -"
    if meta["grade"] and not meta.get("points", -1) >= 0:
        return "a graded cell needs points >= 0"
    if cell_type == "markdown" and not meta.get("task") and meta["grade"] != meta["solution"]:
        return "a markdown answer must be both grade and solution"
    if meta.get("task") and cell_type != "markdown":
        return "a task cell must be markdown"
    return None


def validate(nb: NotebookNode, name: str = "notebook") -> None:
    """Check every cell's nbgrader metadata against nbgrader's schema version 3 and its rules
    (unique grade_ids among graded, solution and locked cells); ValueError naming cell and problem."""
    seen: set[str] = set()
    for index, cell in enumerate(nb.cells):
        if "nbgrader" not in cell.metadata:
            continue
        meta = cell.metadata["nbgrader"]
        problem = _schema_problem(meta, cell.cell_type)
        if problem:
            raise ValueError(f"{name}, cell {index}: nbgrader metadata: {problem}")
        if meta["grade"] or meta["solution"] or meta["locked"]:
            if meta["grade_id"] in seen:
                raise ValueError(f"{name}, cell {index}: nbgrader metadata: duplicate grade_id {meta['grade_id']!r}")
            seen.add(meta["grade_id"])


# ------------------------------------------------------------------ the student edition


def strip_solution_regions(source: str) -> str:
    """``source`` with each ``### BEGIN SOLUTION`` … ``### END SOLUTION`` region replaced by nbgrader's
    stub, indented like the region's first line."""

    return REGION.sub(lambda m: _indented(m.group(1), CODE_STUB) + m.group(2), source)


def _without_heading(source: str) -> str:
    """A markdown cell's text without the solution heading (and the blank lines it leaves at the end)."""
    return SOLUTION_HEADING.sub("", source).rstrip()


def _clear_outputs(cell: NotebookNode) -> None:
    cell.outputs = []
    cell.execution_count = None
    cell.metadata.pop("execution", None)


def _check_statement(node: ast.stmt) -> ast.Call | None:
    """The ``check_xxx(...)`` call a top-level statement makes, bare or inside ``print(...)``, or None."""
    call = node.value if isinstance(node, ast.Expr) else None
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print" and call.args:
        call = call.args[0] if len(call.args) == 1 else None
    func = call.func if isinstance(call, ast.Call) else None
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return call if name.startswith("check_") else None


def assert_on_failure(source: str) -> str:
    """A check cell's source where every ``check_xxx(...)`` statement (bare or printed) prints the
    result and raises AssertionError when the check fails: how nbgrader's autograder sees a failing test."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines = source.split("\n")
    for node in reversed(tree.body):
        call = _check_statement(node)
        if call is None:
            continue
        expr = ast.get_source_segment(source, call)
        block = [f"check_result = {expr}", "print(check_result)", "assert check_result, check_result.message"]
        lines[node.lineno - 1 : node.end_lineno] = "\n".join(block).split("\n")
    return "\n".join(lines).rstrip()


def _body_start(source_lines: list[str], node: ast.FunctionDef) -> int:
    """The index of the first line of ``node``'s body after its docstring, comments included."""
    first = node.body[0]
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    if doc:
        return first.end_lineno  # type: ignore[return-value]
    start = first.lineno - 1
    while start - 1 > node.lineno - 1 and source_lines[start - 1].strip().startswith("#"):
        start -= 1
    return start


def nbgrader_regions(source: str) -> str:
    """An exercise cell's source for nbgrader's ``generate_assignment``: the body (after the
    docstring) of each stub function between ``### BEGIN SOLUTION`` and ``### END SOLUTION``, so
    the stub it writes keeps the signature; an instructor's region keeps only nbgrader's stub."""
    if BEGIN in source:
        return REGION.sub(lambda m: _indented(m.group(1), f"{BEGIN}\n{CODE_STUB}\n{END}") + m.group(2), source)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines = source.split("\n")
    stubs = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and STUB_MARK.search(ast.get_source_segment(source, n) or "")
    ]
    for node in reversed(stubs):
        start = _body_start(lines, node)
        indent = re.match(r"[ \t]*", lines[node.body[-1].lineno - 1]).group(0)  # type: ignore[union-attr]
        lines[start : node.end_lineno] = [indent + BEGIN, *lines[start : node.end_lineno], indent + END]
    return "\n".join(lines)


def _indented(indent: str, text: str) -> str:
    return "\n".join(indent + line for line in text.split("\n"))


def student_notebook(nb: NotebookNode, raising_checks: bool = False) -> NotebookNode:
    """The student copy of ``nb``: annotated, without solution cells, solution regions or the
    solution heading; exercise and check cells kept with their outputs cleared. With
    ``raising_checks`` (nbgrader's source version) every check call raises when it fails, since
    nbgrader's autograder counts errors, and each stub's body sits in a solution region."""
    nb = copy.deepcopy(nb)
    annotate(nb)
    cells = []
    for cell, kind in zip(nb.cells, classify(nb)):
        if kind == SOLUTION:
            continue
        if cell.cell_type == "markdown":
            cell.source = _without_heading(cell.source) if SOLUTION_HEADING.search(cell.source) else cell.source
            if not cell.source.strip():
                continue
        if kind == EXERCISE and raising_checks:
            cell.source = nbgrader_regions(cell.source)
        elif cell.cell_type == "code":
            cell.source = strip_solution_regions(cell.source)
        if kind in (EXERCISE, CHECK):
            _clear_outputs(cell)
        if kind == CHECK and raising_checks:
            cell.source = assert_on_failure(cell.source)
        cells.append(cell)
    nb.cells = cells
    return nb


STUDENT_README = """# cyclelab: the student edition

This is your copy of the course. Each chapter (`NN_topic.ipynb`) teaches one stage of the clock
cycle and ends in exercises: a stub for you to fill in (it runs, returning a wrong answer), then a
check cell that prints ✓ or ✗ with a hint naming the symptom. Run the chapter from the top, write
each function, and rerun its check until it passes.

The solutions are **not** in this edition: your instructor keeps them. The check cells and their
hints are the feedback; ask your instructor when a hint is not enough.

`workshop/bug_hunt.ipynb` is the bug hunt: a small GPT with planted bugs. Find each one from its
symptom, fix the function, and a check confirms the fix. Its solutions are not here either.

Shut down a chapter's kernel (Kernel → Shut Down Kernel) before opening the next: the hub gives
each learner memory for one chapter at a time.
"""


def write_student_edition(out: Path, root: Path | None = None, raising_checks: bool = False) -> list[Path]:
    """Write the student copy of every chapter notebook in ``root`` (the course's notebooks/), of
    the workshop notebooks in its ``workshop/`` (the bug hunt) and a README for learners into
    ``out``; return the notebooks written. ``out`` must not be ``root``."""
    from cyclelab.workshop.course import list_notebooks, notebooks_dir

    root, out = Path(root or notebooks_dir()), Path(out)
    if out.resolve() == root.resolve():
        raise ValueError(
            f"OUT ({out}) is the course's own notebooks folder: the student edition would "
            "overwrite the instructor's; choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT ({out}) is a file: give a folder for the student edition")
    if root.resolve() in out.resolve().parents:  # inside it: the next course run would execute the copies
        raise ValueError(
            f"OUT ({out}) is inside the course's notebooks folder {root}: the student copies would be mixed "
            "with the instructor's notebooks; choose a folder outside it"
        )
    sources = list_notebooks(root=root)
    if not sources:
        raise FileNotFoundError(f"no chapter notebooks (NN_*.ipynb) in {root}")
    sources += sorted((root / "workshop").glob("*.ipynb"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"OUT ({out}) cannot be created ({err.strerror or err}): choose a folder you can write"
        ) from None
    written = []
    for path in sources:
        target = out / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_notebook(student_notebook(read_notebook(path), raising_checks), target)
        written.append(target)
    write_atomic(out / "README.md", STUDENT_README)
    return written
