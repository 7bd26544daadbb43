"""cyclelab.show renders the package's own source, so a notebook never copies code."""

import inspect

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


def test_a_class_and_a_generated_method() -> None:
    assert repr(show(Sampling)).count("class Sampling") == 1
    with pytest.raises(TypeError, match="no Python source"):
        show(Sampling.__init__)  # written by @dataclass: there is no source to show


@pytest.mark.parametrize("bad", [len, 3, "rotate_half", None], ids=["builtin", "int", "string", "none"])
def test_refuses_what_has_no_source(bad) -> None:
    with pytest.raises(TypeError, match=r"show\(\)"):
        show(bad)
