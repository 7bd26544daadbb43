"""Figures as a learner's page needs them: as wide as the notebook, and with alt text.

JupyterLab draws an ``image/png`` output without alt text, and a figure wider than the notebook is
shrunk until its labels are unreadable. :func:`show_figure` fits the figure to the page width (the
text keeps its size; the axes give way) and displays it as an ``<img>`` whose ``alt`` says what the
figure shows: the caller's words, else its titles, axis labels and legend read from the figure.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

PAGE_WIDTH_IN = 9.0  # a notebook's output area at 1024 px with the file browser open, at 100 dpi
DPI = 100


def _axis_words(ax) -> str:
    """One panel in words: its title, axis labels and legend entries."""
    parts = []
    if ax.get_title():
        parts.append(f"'{ax.get_title()}'")
    if ax.get_xlabel():
        parts.append(f"x: {ax.get_xlabel()}")
    if ax.get_ylabel():
        parts.append(f"y: {ax.get_ylabel()}")
    legend = ax.get_legend()
    if legend is not None:
        labels = [t.get_text() for t in legend.get_texts() if t.get_text()]
        if labels:
            parts.append("series: " + ", ".join(labels))
    return "; ".join(parts)


def describe(fig: Figure) -> str:
    """Alt text read from ``fig``: its overall title, then each visible panel in words."""
    title = fig.get_suptitle()
    panels = [words for ax in fig.get_axes() if ax.get_visible() and ax.axison and (words := _axis_words(ax))]
    if len(panels) > 1:
        panels = [f"panel {i}: {words}" for i, words in enumerate(panels, 1)]
    text = ". ".join(p for p in [f"'{title}'" if title else "", *panels] if p)
    return f"Chart: {text}." if text else "A chart without titles or labels."


def fit_to_page(fig: Figure, width_in: float = PAGE_WIDTH_IN) -> None:
    """Narrow ``fig`` to ``width_in`` inches when it is wider (its height kept), then lay it out again."""
    w, h = fig.get_size_inches()
    if w > width_in:
        fig.set_size_inches(width_in, h)
    if fig.get_layout_engine() is None:
        fig.tight_layout()


def figure_bundle(fig: Figure, alt: str | None = None) -> tuple[dict, dict]:
    """The display bundle of ``fig`` fitted to the page: ``text/html`` (an ``<img>`` with alt text),
    ``image/png`` (with the alt text in its metadata, as nbconvert reads it) and ``text/plain``
    (``[figure: <alt>]``; nbval's sanitizer reduces both text forms to a placeholder, as it skips the PNG)."""
    if alt is not None and not alt.strip():
        raise ValueError("alt must say what the figure shows (or be None to read it from the figure)")
    alt = alt or describe(fig)
    fit_to_page(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    width = round(fig.get_size_inches()[0] * DPI)
    img = f'<img src="data:image/png;base64,{png}" alt="{html.escape(alt)}" width="{width}" style="max-width:100%">'
    return {"text/html": img, "image/png": png, "text/plain": f"[figure: {alt}]"}, {"image/png": {"alt": alt}}


def show_figure(alt: str | None = None, fig: Figure | None = None) -> None:
    """Display ``fig`` (default: the current figure) fitted to the page with alt text, then close it."""
    from IPython.display import display

    fig = fig if fig is not None else plt.gcf()
    data, metadata = figure_bundle(fig, alt)
    display(data, raw=True, metadata=metadata)
    plt.close(fig)
