"""Figures for the chapters (matplotlib only: works offline and in every front end)."""

from __future__ import annotations

from collections import defaultdict

from cyclelab.core.events import Stage, Trace

STAGE_COLOURS = {Stage.FETCH: "#4C72B0", Stage.READ: "#DD8452", Stage.EXECUTE: "#55A868", Stage.WRITEBACK: "#C44E52"}


def stage_times(trace: Trace) -> dict[Stage, list[float]]:
    """Milliseconds spent in each stage, per cycle, from a trace's kept events."""
    if not trace.events:
        raise ValueError("the trace kept no events: generate with keep_events=True")
    totals: dict[Stage, list[float]] = {s: [0.0] * len(trace.records) for s in Stage}
    for event in trace.events:
        totals[event.stage][event.cycle] += event.seconds * 1e3
    return totals


def op_times(trace: Trace, cycles: slice = slice(1, None)) -> dict[str, float]:
    """Mean milliseconds per cycle of each op (summed over layers), decode cycles by default."""
    chosen = range(len(trace.records))[cycles]
    if not chosen:
        raise ValueError("no cycles selected")
    sums: dict[str, float] = defaultdict(float)
    for event in trace.events:
        if event.cycle in chosen:
            sums[event.op] += event.seconds * 1e3
    return {op: ms / len(chosen) for op, ms in sums.items()}


def plot_stage_times(trace: Trace, ax=None, title: str | None = None):
    """Stacked bars: how long each cycle spent in each stage. Cycle 0 reads the whole prompt."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.2))
    times = stage_times(trace)
    cycles = range(len(trace.records))
    bottom = [0.0] * len(trace.records)
    for stage in Stage:
        ax.bar(cycles, times[stage], bottom=bottom, color=STAGE_COLOURS[stage], label=stage.value)
        bottom = [b + t for b, t in zip(bottom, times[stage])]
    ax.set(
        xlabel="cycle (one generated token each)",
        ylabel="milliseconds",
        title=title or f"{trace.model}: time per cycle by stage (cycle 0 = prompt)",
    )
    ax.legend(ncols=4, fontsize=8, loc="upper right")
    return ax
