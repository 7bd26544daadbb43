"""Premises and context: how the prompt moves the memorised answer, and where in the layers it moves.

:func:`answer_probs` measures the probability of each candidate answer's first token after a prompt;
:func:`lens_probs` reads the same candidates off every layer's residual stream with the logit lens
(the engine's WRITEBACK applied to a middle layer: :meth:`~cyclelab.core.engine.Engine.read_out`), and
:func:`settles_at` finds the layer from which the lens's preference no longer changes — where the model
"makes up its mind", the layer the debugger's ``break_on_lens_change`` would stop at last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cyclelab.core.engine import Engine
from cyclelab.lab.patching import resid_post

#: The false premise of issue #15 and its variants; each ends where the answer's first word goes.
QUESTION = "Q: What did Shakespeare write?\nA: He wrote"
PREMISE_VARIANTS = {
    "no premise": QUESTION,
    "false premise": "Shakespeare was not a writer. " + QUESTION,
    "negation": "Shakespeare never wrote anything. " + QUESTION,
    "contradicting context": "In this story, Shakespeare is a baker who cannot write. " + QUESTION,
    "distractor": "Christopher Marlowe wrote plays. " + QUESTION,
}
#: The memorised answer and the one a reader who believed the premise would give.
ANSWERS = (" plays", " nothing")


def first_tokens(engine: Engine, answers: Sequence[str]) -> list[int]:
    """The first token id of each answer (text, leading space included); ValueError for an empty one."""
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"answers must be a list of non-empty strings such as [' plays', ' nothing'], got {answers!r}")
    return [engine.tokenizer.encode(a, add_special_tokens=False)[0] for a in answers]


def answer_probs(engine: Engine, prompt, answers: Sequence[str]) -> list[float]:
    """P(first token of each answer) as the next token after ``prompt``."""
    ids = first_tokens(engine, answers)
    probs = torch.softmax(engine.logits(engine.encode(prompt))[0, -1].float(), -1)
    return [float(probs[i]) for i in ids]


def lens_probs(engine: Engine, prompt, answers: Sequence[str], stream: torch.Tensor | None = None) -> torch.Tensor:
    """``(layers, answers)``: the logit lens's probability of each answer's first token at the last position,
    read from the residual stream after each layer (``stream``, ``(layers, positions, width)``, if already
    computed by :func:`~cyclelab.lab.patching.resid_post` for ``prompt``)."""
    ids = first_tokens(engine, answers)
    stream = resid_post(engine, prompt) if stream is None else stream
    return torch.softmax(engine.read_out(stream[:, -1]).float(), -1)[:, ids]  # read_out: (layers, vocab)


def settles_at(preferred: Sequence[int]) -> int:
    """The first layer from which ``preferred`` (one choice per layer) never changes again."""
    if not preferred:
        raise ValueError("no layers given")
    layer = len(preferred) - 1
    while layer > 0 and preferred[layer - 1] == preferred[-1]:
        layer -= 1
    return layer


def plot_premises(names: Sequence[str], probs: Sequence[Sequence[float]], answers: Sequence[str], ax=None):
    """Grouped bars: each answer's probability under each prompt variant."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(9, 3.4))[1]
    width = 0.8 / len(answers)
    for j, answer in enumerate(answers):
        ax.bar(
            [i + (j - (len(answers) - 1) / 2) * width for i in range(len(names))],
            [p[j] for p in probs],
            width,
            label=f"P({answer!r})",
        )
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set(ylabel="probability of the first token", title="the memorised answer against the premise's")
    ax.legend(fontsize=8)
    return ax


__all__ = [
    "ANSWERS",
    "PREMISE_VARIANTS",
    "QUESTION",
    "answer_probs",
    "first_tokens",
    "lens_probs",
    "plot_premises",
    "settles_at",
]
