"""The page a learner reads: no test markers in sight, solutions that leave the learner's function in
place on Run All, and figures that fit the notebook and carry alt text."""

from __future__ import annotations

import ast
import base64
import re
import struct
from pathlib import Path

import matplotlib
import nbformat
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cyclelab.lab import figures  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [ROOT / "notebooks/workshop/bug_hunt.ipynb"]
MAX_WIDTH_PX = round(figures.PAGE_WIDTH_IN * figures.DPI)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _defined(source: str) -> set[str]:
    """Top-level names a cell defines or assigns."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_test_marker_is_in_the_learners_sight(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    marked = [i for i, c in enumerate(nb.cells) if re.search(r"^\s*#\s*NBVAL_", c.source, re.MULTILINE)]
    assert not marked, f"cells {marked} carry an NBVAL comment: use the nbval-… cell tags"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_run_all_leaves_the_learners_function_in_place(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    exercises = set().union(*[_defined(c.source) for c in nb.cells if "exercise" in _tags(c)] or [set()])
    for i, cell in enumerate(nb.cells):
        if "solution" in _tags(cell):
            rebound = _defined(cell.source) & exercises
            assert not rebound, f"solution cell {i} rebinds the learner's {sorted(rebound)}"


def _images(nb) -> list[tuple[int, dict]]:
    return [
        (i, out)
        for i, cell in enumerate(nb.cells)
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]


@pytest.mark.parametrize("path", NOTEBOOKS[:-1], ids=lambda p: p.name)
def test_every_stored_figure_fits_the_page_and_has_alt_text(path: Path) -> None:
    for i, out in _images(nbformat.read(path, as_version=4)):
        html = out["data"].get("text/html", "")
        alt = re.search(r'<img [^>]*alt="([^"]+)"', html)
        assert alt and len(alt.group(1)) > 20, f"cell {i}: a figure without alt text"
        width = struct.unpack(">I", base64.b64decode(out["data"]["image/png"])[16:20])[0]
        assert width <= MAX_WIDTH_PX, f"cell {i}: {width} px, wider than the page ({MAX_WIDTH_PX})"


def test_alt_text_is_read_from_the_figure() -> None:
    fig, (left, right) = plt.subplots(1, 2)
    left.plot([1, 2], label="tiny")
    left.legend()
    left.set(title="loss", xlabel="step", ylabel="nats")
    right.axis("off")
    fig.suptitle("training")
    assert figures.describe(fig) == "Chart: 'training'. 'loss'; x: step; y: nats; series: tiny."
    plt.close(fig)


def test_a_wide_figure_is_narrowed_to_the_page_and_keeps_its_height() -> None:
    fig = plt.figure(figsize=(16, 3))
    fig.add_subplot().plot([0, 1])
    data, metadata = figures.figure_bundle(fig, alt="a rising line")
    width, height = struct.unpack(">II", base64.b64decode(data["image/png"])[16:24])
    assert (width, height) == (MAX_WIDTH_PX, 300)
    assert 'alt="a rising line"' in data["text/html"] and metadata == {"image/png": {"alt": "a rising line"}}
    assert data["text/plain"] == "[figure: a rising line]"
    plt.close(fig)


def test_alt_text_is_escaped_and_cannot_be_blank() -> None:
    fig = plt.figure(figsize=(4, 3))
    data, _ = figures.figure_bundle(fig, alt='a "quoted" <b>')
    assert 'alt="a &quot;quoted&quot; &lt;b&gt;"' in data["text/html"]
    with pytest.raises(ValueError, match="alt must say what the figure shows"):
        figures.figure_bundle(fig, alt="  ")
    plt.close(fig)


def _integral_floats(value, path: str = "") -> list[str]:
    if isinstance(value, float) and value.is_integer():
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _integral_floats(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _integral_floats(v, f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saving_in_lab_leaves_the_metadata_as_it_is(path: Path) -> None:
    """JupyterLab writes a float such as 0.0 back as 0: metadata holding one diffs on every save."""
    nb = nbformat.read(path, as_version=4)
    found = _integral_floats(nb.metadata, "metadata")
    found += [p for i, c in enumerate(nb.cells) for p in _integral_floats(c.metadata, f"cell {i}")]
    assert not found, f"write these as integers: {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_parses(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and not cell.source.lstrip().startswith(("%", "!")):
            try:
                ast.parse(cell.source)
            except SyntaxError as error:
                pytest.fail(f"cell {i} does not parse: {error}")


@pytest.mark.parametrize("path", NOTEBOOKS[:-1], ids=lambda p: p.name)
def test_no_stored_output_is_a_widgets_repr(path: Path) -> None:
    """A widget saved without its state shows its text form: a line and a picture, never `VBox(children=…`."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = out.get("data", {}).get("text/plain", "")
            assert "VBox(" not in "".join(text), f"cell {i} stores a widget's repr"


@pytest.mark.parametrize("path", NOTEBOOKS[:-1], ids=lambda p: p.name)
def test_a_stored_widget_is_its_picture_not_a_view_without_state(path: Path) -> None:
    """Without the widgets' state, a stored widget view shows "model not found" in JupyterLab."""
    nb = nbformat.read(path, as_version=4)
    views = [i for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if WIDGET_VIEW in o.get("data", {})]
    assert not views or "widgets" in nb.metadata, f"cells {views}: run scripts/store_outputs.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebooks_carry_no_run_bookkeeping(path: Path) -> None:
    """scripts/store_outputs.py drops papermill's metadata and the per-cell timings: a diff shows outputs only."""
    nb = nbformat.read(path, as_version=4)
    assert "papermill" not in nb.metadata
    kept = [i for i, c in enumerate(nb.cells) if {"papermill", "execution"} & set(c.metadata)]
    assert not kept, f"cells {kept} keep run timings: run scripts/store_outputs.py"
