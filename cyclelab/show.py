"""Show the package's own source on the page: the code a chapter teaches, in one place.

``show(fn)`` renders a function, class or method with syntax highlighting inside a
collapsible ``<details>`` block in Jupyter, and as plain source in a terminal or in a
notebook's text output. The notebook never copies the code: it displays the tested one.
"""

from __future__ import annotations

import html
import inspect
import re
import textwrap
from typing import Any

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name

# A light panel in either theme, with a highlighting style whose every colour reads at 4.5:1 or more on it
# (WCAG AA; the theme's own editor background made pygments' light colours unreadable in dark mode).
BACKGROUND, PYGMENTS_STYLE = "#ffffff", "xcode"
_STYLE = (
    f"<style>.cyclelab-source .highlight pre{{background:{BACKGROUND};"
    "color:#111;padding:6px 10px;border-radius:4px;overflow-x:auto;border:1px solid #767676;"
    "font-size:12px;line-height:1.35}.cyclelab-source summary{cursor:pointer;font-family:monospace}</style>"
)


class Source:
    """A piece of the package's source, ready to display."""

    def __init__(self, name: str, location: str, code: str, *, open_: bool = True, language: str = "python") -> None:
        self.name, self.location, self.code, self.open, self.language = name, location, code, open_, language

    def __repr__(self) -> str:
        return f"# {self.name} — {self.location}\n{self.code}"

    def _repr_html_(self) -> str:
        formatter = HtmlFormatter(nowrap=False, noclasses=True, style=PYGMENTS_STYLE)
        body = highlight(self.code, get_lexer_by_name(self.language), formatter)
        summary = f"<summary><b>{html.escape(self.name)}</b> — <code>{html.escape(self.location)}</code></summary>"
        state = " open" if self.open else ""
        return f'{_STYLE}<details class="cyclelab-source"{state}>{summary}{body}</details>'


def _location(obj: Any) -> str:
    """``cyclelab/module.py:LINE``, relative to the package, never a machine path."""
    module = inspect.getmodule(obj)
    name = module.__name__ if module else "?"
    try:
        line = inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return name.replace(".", "/") + ".py"
    return f"{name.replace('.', '/')}.py:{line}"


def show(obj: Any, *, collapsed: bool = False) -> Source:
    """The source of a function, class or method of the package, to display in a notebook.

    ``collapsed=True`` starts the block folded (the learner opens it after an exercise).
    Raises ``TypeError`` for objects without Python source (builtins, instances, strings).
    """
    target = obj.fget if isinstance(obj, property) else obj
    if not (inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target)):
        raise TypeError(
            f"show() takes a function, class or method, not {type(obj).__name__}: "
            "pass the object itself, e.g. show(cyclelab.core.sampling.top_p_filter)"
        )
    try:
        code = textwrap.dedent(inspect.getsource(target)).rstrip() + "\n"
    except (OSError, TypeError) as err:
        raise TypeError(f"show(): no Python source for {target!r} ({err})") from err
    name = getattr(target, "__qualname__", getattr(target, "__name__", "?"))
    return Source(name, _location(target), code, open_=not collapsed)


def show_kernel(function: str, *, collapsed: bool = False) -> Source:
    """The C source of one of the engine's kernels (:mod:`cyclelab.kernels`: ``"f32_linear"``,
    ``"f32_conv1d"``, ``"f32_rms_norm"``, ``"f32_rope"``, ``"int8_linear"``, ``"f32_scores"``, ``"f32_softmax"``,
    ``"f32_mix"``) with the comment above it."""
    from cyclelab.kernels import SOURCE

    start = SOURCE.find(f"void {function}(")
    if start < 0:
        names = ", ".join(re.findall(r"^void (\w+)\(", SOURCE, flags=re.MULTILINE))
        raise ValueError(f"no kernel {function!r}; the kernels are {names}")
    comment = SOURCE.rfind("/*", 0, start)
    end = SOURCE.index("\n}\n", start) + 3
    return Source(
        function,
        "cyclelab/kernels/kernels.c (compiled on first use)",
        SOURCE[comment:end],
        open_=not collapsed,
        language="c",
    )
