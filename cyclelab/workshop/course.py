"""Run the course headless: execute every chapter notebook with papermill.

``cyclelab course`` (or :func:`run_course`) executes ``notebooks/NN_*.ipynb`` in order,
each in its own kernel started in the notebook's folder, writes the executed copies to
an output folder and prints a table of status, wall time and the kernel's peak memory.
With a label (``cyclelab course --label``) it also writes those measurements into the
top cell of each source notebook: the chapter's cost label, never typed by hand.

Profiles: a notebook's parameters cell holds the learner's values, the ``full`` profile, which is
what *Run All* gives and what the committed outputs come from. Its metadata ``{"cyclelab": {"profiles":
{...}}}`` declares the overrides of ``fast`` (what the test command runs: ``tests/conftest.py`` injects
them after the parameters cell before nbval executes it) and ``gpu`` (sizes a GPU makes affordable).
``cyclelab course`` runs ``full``; ``--profile fast`` runs CI's sizes. A cell tagged ``key-results`` prints the chapter's
key numbers in one line; the runner collects that line into its table.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_NAME = "python3"
PROFILES = ("fast", "full", "gpu")
KEY_RESULTS_TAG = "key-results"
TAKEAWAY = re.compile(r"^takeaway: \w+ = (True|False)$")


@dataclass
class NotebookRun:
    """The outcome of one executed notebook."""

    notebook: str
    status: str  # "ok" or "failed"
    seconds: float
    output: Path
    error: str = ""
    peak_rss_mb: float | None = None  # the kernel's peak resident memory (Linux only)
    profile: str = "full"
    key_results: str = ""  # the line printed by the cell tagged ``key-results``

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def notebooks_dir() -> Path:
    """The course's ``notebooks/`` folder."""
    return REPO_ROOT / "notebooks"


def list_notebooks(only: Iterable[str] | None = None, root: Path | None = None) -> list[Path]:
    """Chapter notebooks ``NN_*.ipynb`` in order, without solutions.

    ``only`` keeps notebooks whose name matches one of the patterns, as a glob
    (``"0[12]_*"``) or a plain substring (``"00"``, ``"clock"``).
    """
    root = root or notebooks_dir()
    paths = sorted(p for p in root.glob("[0-9][0-9]_*.ipynb") if "solution" not in p.name.lower())
    patterns = list(only or [])
    if patterns:
        paths = [p for p in paths if any(_matches(p.name, pat) for pat in patterns)]
    return paths


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatch(name, pattern) or pattern in name


def run_notebook(
    path: Path, out_dir: Path, parameters: dict[str, Any] | None = None, profile: str = "full", **options: Any
) -> NotebookRun:
    """Execute one notebook with papermill into ``out_dir`` with ``profile``'s parameters (and
    ``parameters`` on top); never raises on a failing cell. ``options`` go to papermill and the
    notebook client (``allow_errors``, ``timeout_func``, ...; ``cwd`` is the notebook's folder)."""
    import papermill as pm

    path, out_dir = Path(path).resolve(), Path(out_dir)
    values = {**profile_parameters(path, profile), **(parameters or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    probe = _RssProbe()
    start = time.perf_counter()
    status, error = "ok", ""
    try:
        pm.execute_notebook(
            str(path),
            str(output),
            parameters=values,
            kernel_name=KERNEL_NAME,
            log_output=False,
            progress_bar=False,
            **{"cwd": str(path.parent), **options},
            on_notebook_start=probe.start,
            on_cell_executed=probe.sample,
            extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no start-up warnings from each kernel
        )
    except Exception as err:  # a failing cell, a missing kernel, a timeout: all reported
        status, error = "failed", _summary(err)
    seconds = time.perf_counter() - start
    return NotebookRun(path.name, status, seconds, output, error, probe.peak_mb, profile, key_results(output))


def run_course(
    out_dir: Path,
    only: Iterable[str] | None = None,
    parameters: dict[str, Any] | None = None,
    root: Path | None = None,
    profile: str = "full",
) -> list[NotebookRun]:
    """Execute every chapter notebook (or those matching ``only``) in order, in ``profile``."""
    paths = list_notebooks(only, root)
    for path in paths:  # an unknown profile fails before anything runs
        profile_parameters(path, profile)
    return [run_notebook(p, out_dir, parameters, profile) for p in paths]


# ------------------------------------------------------------------ profiles and key results


def cyclelab_metadata(path: Path) -> dict:
    """The notebook's ``metadata.cyclelab`` dict (profiles, papermill_alt), or {}."""
    import json

    return json.loads(Path(path).read_text(encoding="utf-8")).get("metadata", {}).get("cyclelab", {})


def notebook_profiles(path: Path) -> dict[str, dict[str, Any]]:
    """The profiles ``path`` declares: name -> parameter values over the parameters cell's own (``full``, and
    ``fast`` where the notebook declares none, are {}: the cell's values)."""
    return {"full": {}, "fast": {}, **cyclelab_metadata(path).get("profiles", {})}


def false_takeaways(path: Path) -> list[str]:
    """The ``takeaway: name = False`` lines in an executed notebook's outputs (``lab.stats.takeaway``)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    texts = [out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])]
    return [line for text in texts for line in text.splitlines() if TAKEAWAY.match(line) and line.endswith("False")]


def with_profile(source: str, path: Path, profile: str) -> str:
    """A parameters cell's ``source`` followed by ``profile``'s values as assignments, as papermill's injected
    cell sets them: how the test command runs the fast profile of a notebook that stores the learner's run."""
    values = profile_parameters(path, profile)
    if not values:
        return source
    assignments = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    return f"{source}\n# injected by the test command: the {profile} profile\n{assignments}"


def profile_parameters(path: Path, profile: str) -> dict[str, Any]:
    """The parameter values of ``profile`` in ``path``; ValueError naming the valid profiles."""
    profiles = notebook_profiles(path)
    if profile not in profiles:
        raise ValueError(
            f"{Path(path).name} has no profile {profile!r}; its profiles are {', '.join(sorted(profiles))}"
        )
    return dict(profiles[profile])


def parameter_names(path: Path) -> set[str]:
    """The names the cell tagged ``parameters`` assigns."""
    import ast

    import nbformat

    for cell in nbformat.read(str(path), as_version=4).cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            targets = [
                t
                for node in ast.parse(cell.source).body
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            ]
            return {name.id for t in targets for name in ast.walk(t) if isinstance(name, ast.Name)}  # a, b = 1, 2
    raise ValueError(f"{Path(path).name} has no cell tagged 'parameters'")


def key_results(executed: Path) -> str:
    """The text printed by the cell tagged ``key-results`` of an executed notebook, one line."""
    import nbformat

    try:
        cells = nbformat.read(str(executed), as_version=4).cells
    except (OSError, ValueError):
        return ""
    for cell in cells:
        if KEY_RESULTS_TAG in cell.get("metadata", {}).get("tags", []):
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            return "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return ""


def results_table(runs: list[NotebookRun]) -> str:
    """A markdown table of key results: chapter, profile, key results, seconds, peak memory."""
    lines = ["| chapter | profile | key results | seconds | peak memory |", "|---|---|---|---|---|"]
    for r in runs:
        memory = "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb / 1024:.1f} GB"
        result = r.key_results if r.ok else f"failed: {r.error}"
        lines.append(f"| {r.notebook.removesuffix('.ipynb')} | {r.profile} | {result} | {r.seconds:.0f} | {memory} |")
    return "\n".join(lines)


def cost_label(run: NotebookRun, profile: str) -> str:
    """The cost line for ``run``: profile, seconds, peak memory, cores and date; its marker comes last, since a
    line that *starts* with an HTML comment is an HTML block in Markdown and its bold text would show raw."""
    memory = "" if run.peak_rss_mb is None else f", peak memory {run.peak_rss_mb / 1024:.1f} GB"
    return (
        f"**Cost, {profile} profile:** {run.seconds:.0f} s{memory} on {os.cpu_count()} CPU cores (measured by "
        f"`cyclelab course --label {profile}` on {datetime.date.today().isoformat()}) <!-- cost:{profile} -->"
    )


def write_cost_label(path: Path, run: NotebookRun, profile: str) -> None:
    """Put ``run``'s cost line at the end of the notebook's first cell (a markdown cell),
    replacing the line of the same profile if there is one. Nothing else in the file changes."""
    if not profile.replace("-", "").isalnum():
        raise ValueError(f"a profile name is letters, digits and dashes, got {profile!r}")
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    cells = notebook.cells
    if not cells or cells[0].get("cell_type") != "markdown":
        raise ValueError(f"{path}: the first cell must be a markdown cell to hold the cost label")
    lines = cells[0].source.split("\n")
    marker = f"<!-- cost:{profile} -->"
    kept = [line for line in lines if marker not in line]
    while kept and not kept[-1].strip():
        kept.pop()
    has_label = any("<!-- cost:" in line for line in kept)
    kept += ([] if has_label else [""]) + [cost_label(run, profile)]
    cells[0].source = "\n".join(kept)
    nbformat.write(notebook, str(path))


def runs_table(runs: list[NotebookRun]) -> str:
    """A plain-text table: notebook, profile, status, seconds, peak memory, key results; errors below."""
    if not runs:
        return "no notebooks to run"
    rows = [("notebook", "profile", "status", "seconds", "peak MB", "key results")]
    rows += [(r.notebook, r.profile, r.status, f"{r.seconds:.1f}", _mb(r.peak_rss_mb), r.key_results) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{r.notebook}: {r.error}" for r in runs if not r.ok]
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _summary(err: Exception) -> str:
    """One line: for a failing cell its number, exception name and message."""
    if hasattr(err, "ename"):  # papermill.PapermillExecutionError
        text = f"cell {err.exec_count}: {err.ename}: {err.evalue}"
    else:
        text = f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


class _RssProbe:
    """Reads the kernel's peak RSS (``VmHWM``) from ``/proc`` after each cell; Linux only.

    The kernel is the child process of this one that appears when the notebook starts.
    """

    def __init__(self) -> None:
        self.before = _children()
        self.pid: int | None = None
        self.peak_mb: float | None = None

    def start(self, **_: Any) -> None:
        new = _children() - self.before
        self.pid = new.pop() if len(new) == 1 else None

    def sample(self, **_: Any) -> None:
        if self.pid is not None:
            self.peak_mb = _vm_hwm_mb(self.pid) or self.peak_mb


def _children() -> set[int]:
    """PIDs of this process's direct children (empty where ``/proc`` is absent)."""
    me, found = os.getpid(), set()
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.add(int(entry.name))
    return found


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
