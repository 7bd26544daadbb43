"""In-context learning on a task made from the plays: "which play is this character from?".

A *shot* is one solved example in the prompt (``Character: Banquo`` / ``Play: Macbeth``); a k-shot prompt
is an instruction, k shots and the query. :func:`label_logprobs` scores every label of every query of one
prompt prefix at once, by the label's whole log-probability: the shared prefix runs once, its key/value cache
is copied to every query, and each query runs with all the labels' tokens after it in one masked row.
"""

from __future__ import annotations

import copy
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


def label_logprobs(
    engine: Engine, prefix: str, queries: Sequence[str], labels: Sequence[str], batch: int = 32
) -> torch.Tensor:
    """``(queries, labels)``: the log-probability of each whole label (its tokens' log-probabilities summed, not
    divided by their number) as the continuation of ``prefix + query``, the label written with a leading space.

    The token ids every prompt shares run once; each query then runs, ``batch`` queries at a time, on a copy of
    that cache as one row holding the query and, after it, every label's tokens but its last — one block per
    label, which a mask lets see the query and its own earlier tokens only. One forward pass scores every label
    of every query in the batch; the same numbers as one plain forward pass per (prompt, label), up to float
    rounding."""
    if isinstance(queries, str) or not queries:
        raise ValueError(f"give a non-empty list of queries, got {queries!r}")
    if isinstance(labels, str) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"give a non-empty list of non-empty label strings, got {labels!r}")
    if not is_int(batch) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    label_ids = [engine.tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
    rows = [engine.encode(prefix + q) for q in queries]
    shared = _shared_length(rows)
    body = engine.loaded.model.base_model  # the transformer without its unembedding: logits only where read
    with torch.no_grad():
        cache = body(torch.tensor([rows[0][:shared]], device=engine.device), use_cache=True).cache if shared else None
        return torch.cat(
            [_score_rows(engine, rows[i : i + batch], shared, cache, label_ids) for i in range(0, len(rows), batch)]
        )


def _score_rows(engine: Engine, rows: list[list[int]], shared: int, cache, label_ids: list[list[int]]) -> torch.Tensor:
    """:func:`label_logprobs` for the rows of one batch, each past the ``shared`` ids the ``cache`` holds."""
    rests = [r[shared:] for r in rows]
    width = max(len(r) for r in rests)
    tails = [ids[:-1] for ids in label_ids]  # the tokens fed in; each predicts the next one of its label
    starts = [width + sum(len(t) for t in tails[:i]) for i in range(len(tails))]
    length = width + sum(len(t) for t in tails)
    ids = torch.tensor(
        [r + [r[-1]] * (width - len(r)) + [i for t in tails for i in t] for r in rests], device=engine.device
    )
    see = torch.zeros(len(rows), length, shared + length, dtype=torch.bool)
    see[:, :, :shared] = True
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for b, rest in enumerate(rests):
        see[b, :width, shared : shared + width] = torch.ones(width, width, dtype=torch.bool).tril()
        positions[b, :width] = torch.arange(shared, shared + width)
        for start, tail in zip(starts, tails):
            block = slice(start, start + len(tail))
            see[b, block, shared : shared + len(rest)] = True
            see[b, block, shared + start : shared + start + len(tail)] = torch.ones(len(tail), len(tail)).tril() > 0
            positions[b, block] = torch.arange(shared + len(rest), shared + len(rest) + len(tail))
    model = engine.loaded.model
    dtype = model.dtype
    mask = torch.zeros(see.shape, dtype=dtype).masked_fill(~see, torch.finfo(dtype).min)[:, None]
    run_cache = None
    if cache is not None:
        run_cache = copy.deepcopy(cache)
        run_cache.batch_repeat_interleave(len(rows))
    hidden = model.base_model(
        ids,
        attention_mask=mask.to(engine.device),
        position_ids=positions.to(engine.device),
        cache=run_cache,
        use_cache=False,
    ).last_hidden_state
    scores = torch.zeros(len(rows), len(label_ids))
    for b, rest in enumerate(rests):
        # where each label token is predicted: after the query for the first, after its own block for the rest
        at = [[len(rest) - 1] + list(range(s, s + len(t))) for s, t in zip(starts, tails)]
        flat = [p for where in at for p in where]
        logp = torch.log_softmax(model.get_output_embeddings()(hidden[b, flat]).float(), -1).cpu()
        targets = [i for ids in label_ids for i in ids]
        per_token = logp[torch.arange(len(flat)), targets]
        scores[b] = torch.stack([chunk.sum() for chunk in per_token.split([len(ids) for ids in label_ids])])
    return scores


def _shared_length(rows: list[list[int]]) -> int:
    """How many leading ids every row shares, leaving each row at least one id of its own."""
    n = min(len(r) for r in rows) - 1
    return next((i for i in range(n) if any(r[i] != rows[0][i] for r in rows)), n)


def correct(scores: torch.Tensor, truth: Sequence[int]) -> list[bool]:
    """Per query: is the best-scored label (largest probability or log-probability) the right one?"""
    if scores.dim() != 2 or len(truth) != scores.shape[0]:
        raise ValueError(
            f"need scores (queries, labels) and one right label per query, got {tuple(scores.shape)} "
            f"and {len(truth)} labels"
        )
    return (scores.argmax(-1) == torch.as_tensor(list(truth))).tolist()


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
    "correct",
    "label_logprobs",
    "query",
    "sample_shots",
]
