"""What changed, in words: the status line after each debugger command, and which views it changed.

The status line names the cycle (counted from 1, as the counter does), the token and its
probability ``p`` (after the sampler's settings), as the output and sampler panels write them
(:func:`~cyclelab.debugger.views.chosen_words`). :func:`view_keys` reduces a
:class:`~cyclelab.debugger.views.State` to what each view shows, so two states tell which views differ
(``State.changed``, for the widget to highlight them).
"""

from __future__ import annotations

from cyclelab.core.events import CycleRecord, Event
from cyclelab.debugger.views import Chosen, State, chosen_words

HINT = "press Next token (or Step for one op)"
VIEWS = ("pipeline", "registers", "memory", "output", "sampler", "text", "branches", "status")


def start_words(model: str, prompt: str) -> str:
    """The status before any click: the model, the prompt and what to press."""
    return f"{model}, prompt {prompt!r}: {HINT}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cycle_words(chosen: Chosen, records: list[CycleRecord]) -> str:
    """'cycle 7: chose ␣art (p 0.074, greedy), KV cache +1 position (now 9)' for the cycle just written back."""
    record = records[-1]
    before = records[-2].cache_len if len(records) > 1 else 0
    if record.n_inputs > 1 and record.cycle > 0:
        cache = f"KV cache rebuilt: the run restarted here and re-read {plural(record.n_inputs, 'token')}"
    elif record.n_inputs > 1:
        cache = f"KV cache +{plural(record.cache_len - before, 'position')} (the prompt, read at once)"
    else:
        cache = f"KV cache +{plural(record.cache_len - before, 'position')} (now {record.cache_len})"
    return f"cycle {chosen.cycle}: {chosen_words(chosen)}, {cache}"


def op_words(cycle: int, event: Event, chosen: Chosen | None) -> str:
    """'cycle 8: EXECUTE, layer 2, attention_scores' for a position inside a cycle."""
    where = f"cycle {cycle}: {event.stage.value}" + (f", layer {event.layer}" if event.layer is not None else "")
    if event.op == "choose" and chosen is not None:
        return f"{where}, choose: {chosen_words(chosen)}, not yet written back"
    return f"{where}, {event.op}"


def ablation_words(heads) -> str:
    """'L1 H2, L3 H0': attention heads in plain words."""
    return ", ".join(f"L{layer} H{head}" for layer, head in sorted(heads))


def view_keys(state: State) -> dict[str, object]:
    """What each view of ``state`` shows, reduced to comparable values (equal keys: an unchanged view)."""
    return {
        "pipeline": (state.cycle, state.done, state.stage, state.layer, state.op, state.total, state.reread),
        "registers": state.registers,
        "memory": (state.memory, state.attention, state.encoder_memory, state.cross),
        "output": (state.output, state.chosen),
        "sampler": (state.sampler, state.draw, state.sampling, state.chosen, state.preview),
        "text": (state.prompt, [(r.token_id, r.prob) for r in state.records]),
        "branches": ([r.token_id for r in state.timeline], [[r.token_id for r in b] for b in state.branches]),
        "status": (state.message, state.error, state.notes),
    }


def changed_views(before: dict[str, object], after: dict[str, object]) -> frozenset[str]:
    """The names of the views whose keys differ."""
    return frozenset(name for name, key in after.items() if before.get(name) != key)
