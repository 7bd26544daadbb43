"""In-context learning on a task made from the plays: "which play is this character from?".

A *shot* is one solved example in the prompt (``Character: Banquo`` / ``Play: Macbeth``); a k-shot prompt
is an instruction, k shots and the query. :func:`label_probs` scores every query of one prompt prefix at
once: the shared prefix runs once, its key/value cache is copied to every query, and the queries run as
one right-padded batch (padding after a row's last token cannot reach it through causal attention).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from cyclelab.core.engine import Engine
from cyclelab.lab.knowledge import TITLES
from cyclelab.loading.schema import is_int

#: Three wordings of the same six labels: the titles, the Folger Shakespeare Library's abbreviations, and bare
#: letters (the instruction says which play each abbreviation or letter stands for, so each carries the same
#: information as a title).
LABELS: dict[str, dict[str, str]] = {
    "title": dict(TITLES),
    "abbreviation": dict(zip(TITLES, ["Mac", "Oth", "Tmp", "JC", "TN", "Rom"])),
    "letter": {play: "ABCDEF"[i] for i, play in enumerate(TITLES)},
}


def instruction(labels: Mapping[str, str]) -> str:
    """The task's first line, naming the answers allowed (with the play each stands for when it is not the title)."""
    names = [
        label if label.lower() == TITLES.get(play, label).lower() else f"{label} ({TITLES.get(play, play)})"
        for play, label in labels.items()
    ]
    return "Which play is each character from? " + ", ".join(names) + "?\n\n"


def query(character: str) -> str:
    """The query for ``character``; it ends where the label goes."""
    return f"Character: {character.title()}\nPlay:"


def few_shot_prefix(shots: Sequence[tuple[str, str]], labels: Mapping[str, str]) -> str:
    """The instruction, then one solved ``(character, play)`` example per shot, in the order given."""
    missing = sorted({play for _, play in shots} - set(labels))
    if missing:
        raise ValueError(f"no label for play(s) {missing}: labels cover {sorted(labels)}")
    return instruction(labels) + "".join(f"{query(c)} {labels[play]}\n\n" for c, play in shots)


def sample_shots(pool: Sequence[tuple[str, str]], k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` examples drawn from ``pool`` without replacement, in a random order fixed by ``seed``."""
    if not is_int(k) or not 0 <= k <= len(pool):
        raise ValueError(f"k must be an integer from 0 to the pool's size {len(pool)}, got {k!r}")
    return random.Random(seed).sample(list(pool), k)


def first_tokens(engine: Engine, labels: Sequence[str]) -> list[int]:
    """The first token of each label as it follows ``"Play:"`` (with its leading space); distinct or ValueError."""
    firsts = [engine.tokenizer.encode(" " + label, add_special_tokens=False)[0] for label in labels]
    if len(set(firsts)) < len(firsts):
        raise ValueError(
            f"two labels of {list(labels)} start with the same token: the first token cannot tell them apart"
        )
    return firsts


def label_probs(engine: Engine, prefix: str, queries: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """``(queries, labels)``: the probability of each label's first token after ``prefix + query``.

    The token ids the prompts share run once; the rest of each prompt runs as one right-padded batch on a copy
    of that cache. The same numbers as one plain forward pass per prompt, up to float rounding."""
    if isinstance(queries, str) or not queries:
        raise ValueError(f"give a non-empty list of queries, got {queries!r}")
    firsts = first_tokens(engine, labels)
    rows = [engine.encode(prefix + q) for q in queries]
    shared = _shared_length(rows)
    model, device = engine.loaded.model, engine.device
    body = model.base_model  # the transformer without its unembedding: logits only where they are read
    with torch.no_grad():
        cache = None
        if shared:
            cache = body(torch.tensor([rows[0][:shared]], device=device), use_cache=True).cache
            cache.batch_repeat_interleave(len(rows))
        width = max(len(r) for r in rows) - shared
        rest = torch.tensor([r[shared:] + [r[-1]] * (width - len(r) + shared) for r in rows], device=device)
        hidden = body(rest, cache=cache, use_cache=False).last_hidden_state
        last = torch.tensor([len(r) - shared - 1 for r in rows], device=device)
        logits = model.get_output_embeddings()(hidden[torch.arange(len(rows), device=device), last])
    return torch.softmax(logits.float(), -1)[:, firsts].cpu()


def _shared_length(rows: list[list[int]]) -> int:
    """How many leading ids every row shares, leaving each row at least one id of its own."""
    n = min(len(r) for r in rows) - 1
    return next((i for i in range(n) if any(r[i] != rows[0][i] for r in rows)), n)


def accuracy(probs: torch.Tensor, truth: Sequence[int]) -> int:
    """How many rows of ``probs`` have their largest value at the right column ``truth[row]`` (a count)."""
    if probs.dim() != 2 or len(truth) != probs.shape[0]:
        raise ValueError(
            f"need probs (queries, labels) and one right label per query, got {tuple(probs.shape)} "
            f"and {len(truth)} labels"
        )
    return int((probs.argmax(-1) == torch.as_tensor(list(truth))).sum())


__all__ = [
    "LABELS",
    "accuracy",
    "few_shot_prefix",
    "first_tokens",
    "instruction",
    "label_probs",
    "query",
    "sample_shots",
]
