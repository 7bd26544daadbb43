"""Before and after: the same prompt through two versions of a model, cycle by cycle.

Fine-tuning changes the weights that every cycle READs. To see what that did, run the
*before* model greedily, then read both models' logits over exactly those tokens. One forward
pass (:meth:`Engine.run_with_cache`) over the whole sequence is enough: the causal mask keeps
position ``t`` from seeing anything after it, so the logits at ``t`` are the ones the cycle that
wrote token ``t + 1`` chose from, the same as replaying the run cycle by cycle. At each cycle we
can then ask: how likely did each model find the token that was written back, what would the new
model have chosen, and which tokens' probabilities moved the most?

>>> shifts = before_after(Engine(old), Engine(new), "Shall I compare thee", max_new_tokens=10)
>>> print(format_shifts(shifts))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cyclelab.core.engine import Engine
from cyclelab.core.events import Trace, show_token


@dataclass
class Shift:
    """One cycle of a before/after comparison."""

    cycle: int
    token: str  # the token written back (chosen by the before model, forced on the after model)
    before: float  # its probability under the before model
    after: float  # and under the after model
    after_choice: str  # the after model's own greedy choice at this cycle
    movers: list[tuple[str, float, float]]  # (token, before, after) of the tokens that moved most

    @property
    def change(self) -> float:
        """How much more (or less, if negative) likely the written-back token became."""
        return self.after - self.before


def cycle_logits(engine: Engine, trace: Trace) -> torch.Tensor:
    """The logits each of ``trace``'s cycles chose from, ``(cycles, vocab)``, read by ``engine``
    in one forward pass over the trace's tokens (the last token chose nothing and is left out)."""
    if not trace.records:
        raise ValueError("the trace has no generated tokens to compare")
    logits, _ = engine.run_with_cache(trace.all_ids[:-1], names=())  # (1, positions, vocab)
    return logits[0, len(trace.prompt_ids) - 1 :]


def compare_runs(before: Engine, after: Engine, trace: Trace, movers: int = 3) -> list[Shift]:
    """Each cycle of ``trace`` (a run of ``before``) read by both engines: the written-back token's
    probability before and after, ``after``'s own choice, and the ``movers`` tokens whose
    probability changed the most."""
    if movers < 1:
        raise ValueError(f"movers must be at least 1, got {movers}")
    if before.vocab_size != after.vocab_size:
        raise ValueError(
            f"the models' vocabularies differ ({before.vocab_size} vs {after.vocab_size} tokens): "
            "compare two versions of one model (same tokenizer and vocabulary)"
        )
    before.check_trace(trace, "tokenizer")
    after.check_trace(trace, "tokenizer")
    p_before = torch.softmax(cycle_logits(before, trace).float(), -1)  # (cycles, vocab)
    p_after = torch.softmax(cycle_logits(after, trace).float(), -1)
    moved = torch.topk((p_after - p_before).abs(), min(movers, p_before.shape[-1]), dim=-1).indices
    shifts, text = [], before.token_text
    for record, old, new, top in zip(trace.records, p_before, p_after, moved.tolist()):
        shifts.append(
            Shift(
                record.cycle,
                record.token,
                float(old[record.token_id]),
                float(new[record.token_id]),
                text(int(new.argmax())),
                [(text(i), float(old[i]), float(new[i])) for i in top],
            )
        )
    return shifts


def before_after(before: Engine, after: Engine, prompt, max_new_tokens: int = 12, movers: int = 3) -> list[Shift]:
    """Greedy generation of ``prompt`` by ``before``, read by both models; see :func:`compare_runs`."""
    return compare_runs(before, after, before.generate(prompt, max_new_tokens), movers)


def format_shifts(shifts: list[Shift], digits: int = 3) -> str:
    """A text table: cycle, token, its probability before → after, the after model's choice,
    and the tokens that moved most (``token before→after``)."""
    lines = [f"{'cycle':>5}  {'token':<12} {'before':>7} {'after':>7}  {'after picks':<12} most moved"]
    for s in shifts:
        moved = "  ".join(f"{show_token(t)} {b:.{digits}f}→{a:.{digits}f}" for t, b, a in s.movers)
        lines.append(
            f"{s.cycle:>5}  {show_token(s.token):<12} {s.before:>7.{digits}f} {s.after:>7.{digits}f}  "
            f"{show_token(s.after_choice):<12} {moved}"
        )
    return "\n".join(lines)


def plot_shifts(shifts: list[Shift], title: str = "the same tokens, before and after fine-tuning"):
    """Bars: each cycle's written-back token, its probability before and after."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(shifts)), 3.2))
    x = range(len(shifts))
    ax.bar([i - 0.2 for i in x], [s.before for s in shifts], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [s.after for s in shifts], width=0.4, label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels([show_token(s.token) for s in shifts], rotation=45, ha="right")
    ax.set(ylabel="probability of the token", xlabel="cycle: token written back", title=title)
    ax.legend()
    fig.tight_layout()
    return fig
