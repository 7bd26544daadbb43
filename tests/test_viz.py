"""Figures are built from the trace's own numbers."""

import matplotlib

matplotlib.use("Agg")

import pytest

from cyclelab.core.events import Stage
from cyclelab.debugger.shading import op_times, plot_stage_times, stage_times


def test_stage_times_add_up_to_the_events(smollm2_engine):
    trace = smollm2_engine.generate("Hello", max_new_tokens=3, keep_events=True)
    times = stage_times(trace)
    total = sum(sum(v) for v in times.values())
    assert total == pytest.approx(sum(e.seconds for e in trace.events) * 1e3)
    assert all(times[Stage.EXECUTE][c] > 0 for c in range(3))
    ax = plot_stage_times(trace)
    assert len(ax.patches) == 4 * len(trace.records)
    ops = op_times(trace)
    assert {"qkv", "softmax", "logits"} <= set(ops)


def test_a_trace_without_events_is_refused(smollm2_engine):
    trace = smollm2_engine.generate("Hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="keep_events"):
        stage_times(trace)
