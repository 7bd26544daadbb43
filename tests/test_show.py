"""cyclelab.show renders the package's own source, so a notebook never copies code."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

from cyclelab import show
from cyclelab.core.rope import rotate_half
from cyclelab.core.sampling import Sampling


def test_plain_text_is_the_exact_source() -> None:
    shown = show(rotate_half)
    assert inspect.getsource(rotate_half).strip() in repr(shown)
    assert repr(shown).startswith("# rotate_half — cyclelab/core/rope.py:")


def test_html_is_collapsible_highlighted_and_escaped() -> None:
    page = show(rotate_half, collapsed=True)._repr_html_()
    assert "<details" in page and " open" not in page.split(">")[1]
    assert "<span" in page  # pygments colours tokens
    assert "rotate_half" in page and "/work" not in page and "/home" not in page
    assert '<details class="cyclelab-source" open>' in show(rotate_half)._repr_html_()


def test_every_colour_of_the_source_panel_reads_at_aa_contrast() -> None:
    """WCAG AA (4.5:1) for each token colour on the panel's own background, in either Jupyter theme."""
    from cyclelab.core.engine import Engine
    from cyclelab.debugger.style import contrast

    show_module = importlib.import_module("cyclelab.show")  # the package name `show` is the function
    page = show(Engine)._repr_html_()
    colours = set(re.findall(r"color: ?(#[0-9a-fA-F]{6})", page)) | {"#111111"}
    assert len(colours) > 3, "the source is highlighted"
    low = {
        c: round(contrast(c, show_module.BACKGROUND), 2) for c in colours if contrast(c, show_module.BACKGROUND) < 4.5
    }
    assert not low, low


def test_a_class_and_a_generated_method() -> None:
    assert repr(show(Sampling)).count("class Sampling") == 1
    with pytest.raises(TypeError, match="no Python source"):
        show(Sampling.__init__)  # written by @dataclass: there is no source to show


@pytest.mark.parametrize("bad", [len, 3, "rotate_half", None], ids=["builtin", "int", "string", "none"])
def test_refuses_what_has_no_source(bad) -> None:
    with pytest.raises(TypeError, match=r"show\(\)"):
        show(bad)


def _show_calls(source: str) -> int:
    """Calls of show(...) or show_kernel(...) in a cell's code (comments and strings aside)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics: no show() in those cells
        return 0
    return sum(isinstance(node, ast.Call) and _is_show(node.func) for node in ast.walk(tree))


def _is_show(func) -> bool:
    """``show`` or ``show_kernel`` by name, or ``cyclelab.show`` (not ``plt.show``)."""
    import ast

    if isinstance(func, ast.Name):
        return func.id in ("show", "show_kernel")
    return isinstance(func, ast.Attribute) and func.attr == "show" and getattr(func.value, "id", "") == "cyclelab"


def _rendered_sources(outputs: list) -> int:
    """Outputs that are a rendered source block: their plain text starts with `# name — path`."""
    count = 0
    for out in outputs:
        text = out.get("data", {}).get("text/plain", "")
        text = "".join(text) if isinstance(text, list) else text
        count += text.startswith("# ") and " — " in text.splitlines()[0]
    return count


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("notebooks/*.ipynb")), ids=lambda p: p.stem
)
def test_every_show_call_in_a_stored_notebook_rendered(path):
    """A show(...) that is not the last expression of its cell renders nothing unless displayed: each call must
    have left its source block in the stored outputs."""
    import json

    silent = []
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code":
            continue
        calls = _show_calls("".join(cell["source"]))
        if calls and _rendered_sources(cell.get("outputs", [])) != calls:
            silent.append(index)
    assert not silent, f"{path.name}: cells {silent} call show() more often than a source block is stored"
