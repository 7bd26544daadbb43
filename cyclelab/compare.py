"""Before and after: the same prompt through two versions of a model, cycle by cycle.

Fine-tuning changes the weights that every cycle READs. To see what that did, run the
*before* model greedily, then replay its tokens through the *after* model (the engine forces
them), keeping the logits each cycle chose from. Both runs then share every position, so at
each cycle we can ask: how likely did each model find the token that was written back, what
would the new model have chosen, and which tokens' probabilities moved the most?

>>> shifts = before_after(Engine(old), Engine(new), "Shall I compare thee", max_new_tokens=10)
>>> print(format_shifts(shifts))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cycle import Trace, show_token
from .engine import Engine


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


def _choice_logits(trace: Trace) -> list[torch.Tensor]:
    """The logits each cycle chose from: the last position of the WRITEBACK ``logits`` op."""
    logits = [e.tensors["out"][0, -1] for e in trace.events if e.op == "logits" and "out" in e.tensors]
    if len(logits) != len(trace.records):
        raise ValueError("the trace kept no logits for its cycles: run it with capture={'logits'}, keep_events=True")
    return logits


def compare_traces(before: Trace, after: Trace, decode, movers: int = 3) -> list[Shift]:
    """Compare two traces of the **same** tokens (the second a replay of the first through other
    weights), both run with ``capture={"logits"}, keep_events=True``. ``decode(token_id)`` gives
    a token's text. Each cycle's ``movers`` are the tokens whose probability changed the most."""
    if before.all_ids != after.all_ids:
        raise ValueError("the traces hold different tokens: replay the first through the second model "
                         "(Engine.replay) so that every cycle sees the same positions")
    if movers < 1:
        raise ValueError(f"movers must be at least 1, got {movers}")
    shifts = []
    for record, old, new in zip(before.records, _choice_logits(before), _choice_logits(after)):
        if old.shape != new.shape:
            raise ValueError(f"the models' vocabularies differ ({old.shape[-1]} vs {new.shape[-1]} tokens): "
                             "compare two versions of one model")
        p_old, p_new = torch.softmax(old.float(), -1), torch.softmax(new.float(), -1)
        moved = torch.topk((p_new - p_old).abs(), min(movers, p_old.numel())).indices.tolist()
        shifts.append(Shift(record.cycle, record.token, float(p_old[record.token_id]), float(p_new[record.token_id]),
                            decode(int(p_new.argmax())),
                            [(decode(i), float(p_old[i]), float(p_new[i])) for i in moved]))
    return shifts


def before_after(before: Engine, after: Engine, prompt, max_new_tokens: int = 12, movers: int = 3) -> list[Shift]:
    """Greedy generation of ``prompt`` by ``before``, replayed through ``after``; see :func:`compare_traces`."""
    if before.arch.model.get_input_embeddings().weight.shape != after.arch.model.get_input_embeddings().weight.shape:
        raise ValueError("before and after must be two versions of one model (same tokenizer and vocabulary)")
    old = before.generate(prompt, max_new_tokens, capture={"logits"}, keep_events=True)
    new = after.replay(old, capture={"logits"})
    return compare_traces(old, new, before.token_text, movers)


def format_shifts(shifts: list[Shift], digits: int = 3) -> str:
    """A text table: cycle, token, its probability before → after, the after model's choice,
    and the tokens that moved most (``token before→after``)."""
    lines = [f"{'cycle':>5}  {'token':<12} {'before':>7} {'after':>7}  {'after picks':<12} most moved"]
    for s in shifts:
        moved = "  ".join(f"{show_token(t)} {b:.{digits}f}→{a:.{digits}f}" for t, b, a in s.movers)
        lines.append(f"{s.cycle:>5}  {show_token(s.token):<12} {s.before:>7.{digits}f} {s.after:>7.{digits}f}  "
                     f"{show_token(s.after_choice):<12} {moved}")
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
