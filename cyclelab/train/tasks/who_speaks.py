"""Task 3 of chapter 06, span extraction: who speaks this line?

A passage of a few speeches (``NAME: ...``) and one of its lines as the question; the answer is the
speaker's name where it stands in the passage (:func:`speaker_questions`). ``minilm`` with a
start/end head (:class:`SpanExtractor`), scored by exact match and F1 (:func:`exact_match_f1`);
the baselines never read the question (:func:`baseline_answers`): the passage's first, last
or most frequent speaker.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.loading import corpus as data
from cyclelab.train.tasks import stack_batch, unpadded


def speaker_questions(
    plays: Sequence[str], n: int, k: int = 3, seed: int = 0, min_words: int = 4, lines_per_speech: int = 1
) -> list[dict]:
    """``n`` span-extraction examples: a passage of ``k`` consecutive speeches by at least two
    speakers (the first ``lines_per_speech`` lines of each, introduced by ``NAME:``), a line of one
    of them as the question, and as the answer the speaker's name where it stands in the passage
    (``answer_start`` is a character offset)."""
    if n < 1 or k < 2 or lines_per_speech < 1:
        raise ValueError(
            f"need n >= 1 questions, k >= 2 speeches and lines_per_speech >= 1; got {n}, {k}, {lines_per_speech}"
        )
    rng = random.Random(seed)
    pool = [play for play in (data.speeches(p) for p in plays) if len(play) > k]
    if not pool:
        raise ValueError(f"no play among {list(plays)} has more than {k} speeches")
    out = []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        play = rng.choice(pool)
        i = rng.randrange(0, len(play) - k)
        window = play[i : i + k]
        if len({name for name, _ in window}) < 2:
            continue
        target = rng.randrange(k)
        candidates = [line for line in window[target][1][:lines_per_speech] if len(line.split()) >= min_words]
        if not candidates:
            continue
        context, start = "", 0
        for j, (name, lines) in enumerate(window):
            if j == target:
                start = len(context)
            context += f"{name}: {' '.join(lines[:lines_per_speech])}\n"
        out.append(
            {"question": rng.choice(candidates), "context": context, "answer": window[target][0], "answer_start": start}
        )
    return out


def baseline_answers(examples: Sequence[dict], rule: str = "first") -> list[str]:
    """Answers by a rule, no learning: three that never read the question, the passage's ``"first"``
    speaker, its ``"last"``, or the one with the ``"most"`` speeches in it (the earliest of a tie);
    and ``"match"``, string matching: the speaker of the first speech whose text contains the
    question (the first speaker when none does)."""
    out = []
    for ex in examples:
        speeches = [line.split(":", 1) for line in ex["context"].splitlines() if ":" in line]
        names = [name for name, _ in speeches]
        if not names:
            raise ValueError(f"no 'NAME:' speech in the passage {ex['context']!r}")
        if rule == "match":
            out.append(next((name for name, text in speeches if ex["question"] in text), names[0]))
        elif rule == "first":
            out.append(names[0])
        elif rule == "last":
            out.append(names[-1])
        elif rule == "most":
            out.append(max(names, key=lambda name: (names.count(name), -names.index(name))))
        else:
            raise ValueError(f"unknown baseline rule {rule!r}; choose 'first', 'last', 'most' or 'match'")
    return out


def span_data(tokenizer, examples: Sequence[dict], max_len: int = 128) -> tuple[list[dict], list[dict]]:
    """Encode ``question [SEP] passage`` and the answer's first and last token positions.
    Returns the encodings and the examples they encode: an example whose answer falls beyond
    ``max_len`` tokens is left out of both."""
    if not examples:
        raise ValueError("no questions to encode")
    out, kept = [], []
    for ex in examples:
        enc = tokenizer(
            ex["question"],
            ex["context"],
            truncation="only_second",
            max_length=max_len,
            padding="max_length",
            return_offsets_mapping=True,
        )
        first, last = ex["answer_start"], ex["answer_start"] + len(ex["answer"])
        seq = enc.sequence_ids()
        tokens = [
            t for t, ((a, b), s) in enumerate(zip(enc["offset_mapping"], seq)) if s == 1 and a < last and b > first
        ]
        if not tokens:  # the answer was truncated away
            continue
        kept.append(ex)
        out.append(
            {
                "input_ids": torch.tensor(enc["input_ids"]),
                "attention_mask": torch.tensor(enc["attention_mask"]),
                "start": torch.tensor(tokens[0]),
                "end": torch.tensor(tokens[-1]),
                "context_mask": torch.tensor([s == 1 for s in seq]),
                "offsets": torch.tensor(enc["offset_mapping"]),
            }
        )
    return out, kept


class SpanExtractor(nn.Module):
    """An encoder and a linear layer giving each token a start score and an end score."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        start, end = self.head(h).float().unbind(-1)
        return start, end


def span_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean of the cross-entropies of the start and the end position."""
    mask, ids = unpadded(batch["attention_mask"], batch["input_ids"])
    start, end = model(ids, mask)
    return (F.cross_entropy(start, batch["start"]) + F.cross_entropy(end, batch["end"])) / 2


@torch.no_grad()
def predict_spans(
    model: nn.Module, encoded: Sequence[dict], examples: Sequence[dict], max_tokens: int = 12, batch_size: int = 64
) -> list[str]:
    """The best passage span (start <= end < start + ``max_tokens``) of each example, as text."""
    if len(encoded) != len(examples):
        raise ValueError(f"{len(encoded)} encoded examples but {len(examples)} examples")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        ids, attention = stack_batch(chunk, device)
        attention, ids, mask = unpadded(attention, ids, torch.stack([e["context_mask"] for e in chunk]).to(device))
        start, end = model(ids, attention)
        start, end = start.masked_fill(~mask, -1e9), end.masked_fill(~mask, -1e9)
        n = start.shape[1]
        allowed = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device)) & ~torch.triu(
            torch.ones(n, n, dtype=torch.bool, device=device), diagonal=max_tokens
        )
        scores = (start[:, :, None] + end[:, None, :]).masked_fill(~allowed, -1e18)
        for enc, ex, best in zip(chunk, examples[i : i + batch_size], scores.flatten(1).argmax(-1).tolist()):
            s, e = divmod(best, n)
            out.append(ex["context"][int(enc["offsets"][s][0]) : int(enc["offsets"][e][1])])
    return out


def _words(s: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", s.lower()).split()


def exact_matches(predictions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """SQuAD-style exact match of each prediction (lowercased, punctuation dropped): the items of an
    interval (``cyclelab.lab.stats.accuracy``) or a paired comparison."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError("give one prediction per answer (and at least one)")
    return [_words(p) == _words(a) for p, a in zip(predictions, answers)]


def exact_match_f1(predictions: Sequence[str], answers: Sequence[str]) -> tuple[float, float]:
    """SQuAD-style exact match and mean token F1 (lowercased, punctuation dropped), in percent."""
    words = _words
    if len(predictions) != len(answers) or not answers:
        raise ValueError("give one prediction per answer (and at least one)")
    em = f1 = 0.0
    for p, a in zip(predictions, answers):
        pw, aw = words(p), words(a)
        em += pw == aw
        common = sum(min(pw.count(w), aw.count(w)) for w in set(pw))
        if common:
            precision, recall = common / len(pw), common / len(aw)
            f1 += 2 * precision * recall / (precision + recall)
    return 100 * em / len(answers), 100 * f1 / len(answers)
