"""Every number a chapter's prose cites is printed by the same run (or set in its code).

The rule, applied to each markdown cell of each notebook under ``notebooks/``:

* A *figure* is a number with a decimal point (``2.7``), a percentage (``95%``), or an
  integer of 100 or more (``4096``, ``110 592``, ``49,152``; digit groups are joined).
* Exempt: integers below 100 (counts, chapter and section numbers, "GPT-2"), section numbers
  such as "7.3" at the start of a heading or after "Exercise", "section" or "§", years
  (1500–2100), anything in inline or fenced code or LaTeX (that is code or a formula, not a
  claim), link targets, the reading-time line (computed by ``python -m cyclelab.workshop reading-time``)
  and the cost-label lines written by ``cyclelab course --label``
  (a measurement of the whole run, recorded by the course runner, not by a cell).
* A figure is *cited from the run* when it appears in an output of a code cell or in a
  code cell's source (a parameter the run used), after dropping digit-group separators.
* A figure from outside the run (a paper's number) must be declared in the markdown cell's
  metadata, ``{"cyclelab": {"external_numbers": {"4.5": "source: ..."}}}``, with its source;
  a declaration whose number the cell no longer cites is stale and fails too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted(Path(__file__).resolve().parents[1].joinpath("notebooks").rglob("*.ipynb"))

_GROUPED = r"\d{1,3}(?:[,\u202f\u2009 ]\d{3})+(?![\d])"
_NUMBER = re.compile(rf"(?<![\w.,/^\-])({_GROUPED}|\d+)(\.\d+)?(%?)(?![\w])")
_HIDDEN = [
    r"^[^\n]*<!-- (?:cost:\w+|reading-time) -->[^\n]*$",  # measured labels, not the run's findings
    r"```.*?```",
    r"`[^`]*`",
    r"\$\$.*?\$\$",
    r"\$[^$\n]*\$",
    r"\]\([^)]*\)",
    r"<[^>]+>",
    r"^#+\s+[\d.]+",
    r"(?i)(?:\bexercise|\bsection|§)\s*\d+(?:\.\d+)*",
]


def _plain(number: str) -> str:
    return re.sub(r"[,\u202f\u2009 ]", "", number)


def figures(markdown: str) -> list[str]:
    """The figures a markdown text cites, as written (see the module docstring)."""
    for pattern in _HIDDEN:
        markdown = re.sub(pattern, " ", markdown, flags=re.S | re.M)
    found = []
    for match in _NUMBER.finditer(markdown):
        whole, fraction, percent = match.groups()
        value = int(_plain(whole))
        if not fraction and not percent and (value < 100 or 1500 <= value <= 2100):
            continue
        found.append(match.group(0))
    return found


def printed_text(notebook: dict) -> str:
    """Code sources and text outputs of every code cell, digit separators dropped."""
    parts = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts += ["".join(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return _plain("\n".join(parts))


def unsupported(notebook: dict) -> list[str]:
    """``cell N: figure`` for each figure no output prints, and each stale external declaration."""
    run = printed_text(notebook)
    problems = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        cited = figures("".join(cell["source"]))
        external = cell.get("metadata", {}).get("cyclelab", {}).get("external_numbers", {})
        problems += [
            f"cell {index}: {f!r} is printed by no output"
            for f in cited
            if f not in external and _plain(f).rstrip("%") not in run
        ]
        problems += [f"cell {index}: external number {f!r} is no longer cited" for f in external if f not in cited]
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_prose_cites_only_numbers_of_its_own_run(path: Path) -> None:
    problems = unsupported(json.loads(path.read_text()))
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("decode runs at 2.7 GB/s", ["2.7"]),
        ("95% of the time, 12 heads", ["95%"]),
        ("a vocabulary of 49,152 tokens and 110 592 weights", ["49,152", "110 592"]),
        ("GPT-2 in 2019, chapter 07, 3 layers", []),
        ("`lr = 3e-4` and $d^{0.5}$ and [link](https://x.org/1234)", []),
        ("**Cost:** 16 s, peak memory 0.9 GB <!-- cost:fast -->", []),
        ("```\nprint(12345)\n```", []),
        ("### 7.3 · Exercise 2.1, see section 4.2 and § 1.5", []),
    ],
    ids=[
        "decimal",
        "percent",
        "grouped",
        "small-and-years",
        "code-math-links",
        "cost-label",
        "fenced",
        "section-numbers",
    ],
)
def test_rule_finds_figures(text: str, expected: list[str]) -> None:
    assert figures(text) == expected


def _notebook(markdown: str, output: str, external: dict | None = None) -> dict:
    meta = {"cyclelab": {"external_numbers": external}} if external else {}
    return {
        "cells": [
            {"cell_type": "code", "source": ["print(x)"], "outputs": [{"output_type": "stream", "text": [output]}]},
            {"cell_type": "markdown", "source": [markdown], "metadata": meta},
        ]
    }


@pytest.mark.parametrize(
    "markdown, output, external, ok",
    [
        ("loss fell to 2.31", "loss 2.31\n", None, True),
        ("loss fell to 2.31", "loss 2.35\n", None, False),
        ("4096 rows", "vocab 4,096\n", None, True),
        ("about 4.5× in other languages", "", {"4.5": "Petrov et al. 2023"}, True),
        ("nothing cited here", "", {"4.5": "Petrov et al. 2023"}, False),
    ],
    ids=["printed", "not-printed", "separators", "declared-external", "stale-declaration"],
)
def test_rule_against_outputs(markdown: str, output: str, external: dict | None, ok: bool) -> None:
    assert (unsupported(_notebook(markdown, output, external)) == []) is ok
