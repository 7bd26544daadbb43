"""The ``--nbgrader`` student edition through nbgrader itself: ``generate_assignment`` and ``autograde``.

The assignment holds two real exercises of the course, cut verbatim from their chapters: chapter
00's ``greedy_step`` (one check) and chapter 04's norms (two functions, one cell with two checks),
with real checkers, so a kernel runs in a few seconds. nbgrader must keep each stub's signature,
give a learner with right answers full marks, one who hands in the stubs zero, and one who gets
only the second norm wrong no mark for that cell.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cyclelab.workshop import edition
from cyclelab.workshop.course import notebooks_dir

pytest.importorskip("nbgrader", reason="nbgrader is a dev dependency (pip install nbgrader)")

ASSIGNMENT, NOTEBOOK = "ps1", "00_mini.ipynb"
GREEDY = """def greedy_step(logits: torch.Tensor) -> tuple[int, float]:
    p = torch.softmax(logits.double(), -1)
    return int(p.argmax()), float(p.max())"""
LAYER_NORM = """def my_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias"""
RMS_NORM = """def my_rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight"""
# what each learner writes in the two exercise cells (None: the released stub)
ANSWERS = {
    "ada": (GREEDY, LAYER_NORM + "\n\n\n" + RMS_NORM),
    "ben": (GREEDY, LAYER_NORM + "\n\n\ndef my_rms_norm(x, weight, eps):\n    return x * weight"),
    "cy": (None, None),
}


def chapter_cells(name: str, tag: str) -> list[nbformat.NotebookNode]:
    """The cells of chapter ``name`` tagged ``tag``, as the instructor edition has them."""
    nb = nbformat.read(str(next(notebooks_dir().glob(f"{name}_*.ipynb"))), as_version=4)
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def source_notebook() -> nbformat.NotebookNode:
    """The instructor's assignment: two chapters' exercises and checks, one hidden solution."""
    greedy = chapter_cells("00", "exercise")[0], chapter_cells("00", "check")[0]
    norms = chapter_cells("04", "exercise")[0], chapter_cells("04", "check")[0]
    assert "check_rms_norm" in norms[1].source and "check_layer_norm" in norms[1].source
    imports = "import torch\n\nfrom cyclelab.checks import check_greedy_step, check_layer_norm, check_rms_norm"
    cells = [new_markdown_cell("# Two chapters' exercises"), new_code_cell(imports), *greedy, *norms]
    cells += [new_markdown_cell("### Solution (open after trying)")]
    cells += [new_code_cell(GREEDY, metadata={"jupyter": {"source_hidden": True}})]
    nb = new_notebook(cells=[nbformat.from_dict(dict(c)) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def nbgrader(course: Path, *args: str) -> None:
    """Run nbgrader's own CLI in ``course``; fail with its log when it fails."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # its alembic
    env = {**os.environ, "PATH": path, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A course folder after ``generate_assignment`` and ``autograde`` of the class's hand-ins."""
    root = tmp_path_factory.mktemp("nbgrader")
    (root / "nbgrader_config.py").write_text(
        'c = get_config()\nc.CourseDirectory.course_id = "cyclelab"\nc.ExecutePreprocessor.timeout = 120\n'
    )
    (root / "source" / ASSIGNMENT).mkdir(parents=True)
    student = edition.student_notebook(source_notebook(), raising_checks=True)
    nbformat.write(student, str(root / "source" / ASSIGNMENT / NOTEBOOK))
    nbgrader(root, "generate_assignment", ASSIGNMENT, "--force")
    released = nbformat.read(str(root / "release" / ASSIGNMENT / NOTEBOOK), as_version=4)
    for learner, answers in ANSWERS.items():
        nb = nbformat.from_dict(dict(released))
        stubs = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
        for cell, answer in zip(stubs, answers):
            cell.source = answer if answer is not None else cell.source
        folder = root / "submitted" / learner / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(nb, str(folder / NOTEBOOK))
    nbgrader(root, "autograde", ASSIGNMENT, "--create", "--force")
    return root


def test_generate_assignment_keeps_the_signatures(course: Path) -> None:
    released = nbformat.read(str(course / "release" / ASSIGNMENT / NOTEBOOK), as_version=4)
    stubs = [c.source for c in released.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert stubs[0].startswith('def greedy_step(logits: torch.Tensor) -> tuple[int, float]:\n    """Return')
    assert "def my_layer_norm(" in stubs[1] and "def my_rms_norm(" in stubs[1]
    assert all(s.count("raise NotImplementedError()") == s.count("def ") for s in stubs), "one stub per function"
    assert "BEGIN SOLUTION" not in "\n".join(c.source for c in released.cells)


def test_autograde_scores_right_answers_full_and_stubs_zero(course: Path) -> None:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as book:
        scores = {who: book.find_submission(ASSIGNMENT, who).score for who in ANSWERS}
        possible = book.find_assignment(ASSIGNMENT).max_score
    assert possible == 2
    assert scores == {"ada": 2, "ben": 1, "cy": 0}, "the second check of the norm cell asserts too"
