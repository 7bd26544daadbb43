"""Robustness of chapter 06's "which play" classifier: noisy input, and an adversary that edits it.

* A cheap classifier: chapter 06's :class:`~cyclelab.train.tasks.which_play.EncoderClassifier` with its encoder
  frozen, so the pooled vectors are computed once (:func:`pooled_features`) and only the head trains
  (:func:`fit_head`, :func:`head_predict`): many trainings and evaluations fit in the fast profile.
* Noise: :func:`typos` (character edits at a rate) and :func:`folio_table` (modern → First Folio
  spellings, applied with :func:`cyclelab.train.tasks.folio.modernise_by_lookup`); :func:`noisy_examples`
  turns a list of lines into noised copies, the material of augmentation.
* HotFlip (Ebrahimi et al., 2018): :func:`embedding_gradient` is the gradient of the loss with respect to
  the input's token vectors; :func:`hotflip_scores` turns it into a first-order estimate of the loss
  change of every single-token swap; :func:`hotflip_attack` applies the best swap, one at a time, until
  the decision flips; :func:`attacked_examples` keeps the flipped ones as training data.
"""

from __future__ import annotations

import random
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.loading.schema import is_int
from cyclelab.train.finetune import History, TrainConfig, train
from cyclelab.train.tasks import stack_batch
from cyclelab.train.tasks.folio import align_words

# --- a classifier whose head alone trains ------------------------------------------------------------


def _line_key(example: dict) -> tuple[int, ...]:
    """An example's real tokens (padding dropped): two examples with the same key pool to the same vector."""
    return tuple(example["input_ids"][example["attention_mask"].bool()].tolist())


@torch.no_grad()
def pooled_features(
    model: nn.Module, examples: Sequence[dict], batch_size: int = 64, cache: dict | None = None
) -> torch.Tensor:
    """The pooled encoder vectors the classifier's head reads, one row per example (n, width); examples are
    batched by length and each batch cut to its longest row, so padding costs nothing. ``cache`` (a dict
    kept by the caller for ONE frozen encoder) holds each line's vector by its tokens: a line met again,
    by another head or another call, is not encoded again."""
    if not examples:
        raise ValueError("examples is empty: nothing to encode")
    cache = {} if cache is None else cache
    keys = [_line_key(e) for e in examples]
    new = {k: e for k, e in zip(keys, examples) if k not in cache}  # each new line once
    if new:
        model.eval()
        device = next(model.parameters()).device
        todo = sorted(new, key=len)
        for i in range(0, len(todo), batch_size):
            rows = todo[i : i + batch_size]
            ids, mask = stack_batch([new[k] for k in rows], device)
            width = int(mask.sum(1).max())
            cache.update(zip(rows, model.pool(ids[:, :width], mask[:, :width]).float().cpu()))
    return torch.stack([cache[k] for k in keys])


def fit_head(model: nn.Module, examples: Sequence[dict], cfg: TrainConfig, cache: dict | None = None) -> History:
    """Train only ``model.head`` (the encoder stays as it is) on the pooled vectors of ``examples``
    (``cache``: see :func:`pooled_features`)."""
    x = pooled_features(model, examples, cache=cache)
    rows = [{"x": x[i], "labels": e["labels"]} for i, e in enumerate(examples)]
    history = train(model.head, rows, lambda head, b: F.cross_entropy(head(b["x"]), b["labels"]), cfg)
    model.head.to(next(model.encoder.parameters()).device)  # back beside the encoder, wherever cfg trained it
    return history


def head_predict(model: nn.Module, examples: Sequence[dict], cache: dict | None = None) -> list[int]:
    """The classifier's predictions, computed as :func:`pooled_features` then the head."""
    with torch.no_grad():
        x = pooled_features(model, examples, cache=cache)
        return model.head(x.to(model.head.weight.device)).argmax(-1).tolist()


# --- noise --------------------------------------------------------------------------------------------


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ValueError(f"rate must be a number between 0 and 1 (a fraction of the letters), not {rate!r}")


def typos(text: str, rate: float, seed: int = 0) -> str:
    """``text`` with each letter, with probability ``rate``, given one typo: dropped, doubled, swapped
    with the next character, or replaced by a random lowercase letter (one of the four at random).
    Other characters stay; the same ``seed`` gives the same typos."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    _check_rate(rate)
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        c = text[i]
        kind = rng.randrange(4) if c.isalpha() and rng.random() < rate else None
        if kind == 1:
            out += [c, c]
        elif kind == 2 and i + 1 < len(text):
            out += [text[i + 1], c]
            i += 1
        elif kind in (2, 3):
            out.append(rng.choice(string.ascii_lowercase))
        elif kind is None:
            out.append(c)
        i += 1  # kind 0 drops the letter
    return "".join(out)


def folio_table(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Modern word → its most frequent First Folio form in the aligned ``(folio, modern)`` ``pairs``
    (a tie goes to the form seen first); only words whose Folio form differs are kept."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for old, new in pairs:
        for o, n in align_words(old, new):
            if n is not None:
                seen[n][o] += 1
    table = {word: forms.most_common(1)[0][0] for word, forms in seen.items()}
    return {modern: folio for modern, folio in table.items() if folio != modern}


def noisy_examples(texts: Sequence[str], rates: Sequence[float], seed: int = 0) -> list[str]:
    """One noised copy of each text, its rate drawn from ``rates`` (a seeded choice per text)."""
    if not rates:
        raise ValueError("rates is empty: give at least one noise rate, e.g. [0.05, 0.1, 0.2]")
    for rate in rates:
        _check_rate(rate)
    rng = random.Random(seed)
    return [typos(t, rng.choice(list(rates)), seed=seed * 100_003 + i) for i, t in enumerate(texts)]


# --- HotFlip ----------------------------------------------------------------------------------------


def embedding_gradient(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, gradient)``: the classifier's logits (batch, classes) and the gradient of each example's
    cross-entropy with respect to its token vectors, the output of the encoder's input embedding (batch,
    tokens, width). A forward hook swaps that output for a leaf tensor, so frozen weights need no gradient."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, out):
        captured["x"] = out.detach().requires_grad_(True)
        return captured["x"]

    handle = model.encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(ids, mask)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")  # examples do not mix: one sum
            (grad,) = torch.autograd.grad(loss, captured["x"])
    finally:
        handle.remove()
    return logits.detach(), grad


def hotflip_scores(grad: torch.Tensor, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """First-order change of the loss if position ``i``'s token became ``v``, for every ``(i, v)``:
    ``(E[v] − E[ids[i]]) · grad[i]``. ``grad`` is (tokens, width), ``embeddings`` (vocab, width),
    ``ids`` (tokens,); the result is (tokens, vocab). The largest entry is HotFlip's swap."""
    if grad.dim() != 2 or embeddings.dim() != 2 or grad.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"need grad (tokens, width) and embeddings (vocab, width) of the same width, got "
            f"{tuple(grad.shape)} and {tuple(embeddings.shape)}"
        )
    if ids.shape != grad.shape[:1]:
        raise ValueError(
            f"ids must hold one token per row of grad: shape {tuple(grad.shape[:1])}, got {tuple(ids.shape)}"
        )
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < embeddings.shape[0]:
        raise ValueError(f"ids must lie in [0, {embeddings.shape[0]}) (rows of embeddings), got {ids.tolist()}")
    now = (grad * embeddings[ids]).sum(-1, keepdim=True)  # (tokens, 1): the current tokens' term
    return grad @ embeddings.T - now


@dataclass
class Attack:
    """What :func:`hotflip_attack` did to each example."""

    ids: torch.Tensor  # (batch, tokens): the inputs after the swaps
    correct: torch.Tensor  # (batch,) bool: classified right before any swap (only these are attacked)
    flipped: torch.Tensor  # (batch,) bool: right before, wrong after
    edits: torch.Tensor  # (batch,) int: swaps made

    @property
    def success_rate(self) -> float:
        """Flipped examples among those that were classified right."""
        return float(self.flipped.sum()) / max(1, int(self.correct.sum()))


def _best_swaps(grad, emb, ids, editable, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """The (position, token) of the largest score of each row, over editable positions and candidates."""
    pos, tok = [], []
    for b in range(len(ids)):
        scores = hotflip_scores(grad[b], emb, ids[b])
        scores[~editable[b]] = -torch.inf
        scores[:, ~candidates] = -torch.inf
        best = int(scores.argmax())
        pos.append(best // scores.shape[1])
        tok.append(best % scores.shape[1])
    return torch.tensor(pos), torch.tensor(tok)


def hotflip_attack(model: nn.Module, examples: Sequence[dict], candidates: torch.Tensor, max_edits: int = 3) -> Attack:
    """Swap tokens of each rightly classified example, one per step, each time the swap with the largest
    :func:`hotflip_scores` (the largest estimated rise of the true label's loss), until the prediction
    changes or ``max_edits`` swaps are made. Only positions whose token is a candidate are edited, each
    at most once; ``candidates`` (vocab,) bool says which tokens may be written."""
    if not is_int(max_edits) or max_edits < 1:
        raise ValueError(f"max_edits must be a positive int, not {max_edits!r}")
    if not examples:
        raise ValueError("examples is empty: nothing to attack")
    emb = model.encoder.get_input_embeddings().weight.detach()
    if candidates.dtype != torch.bool or candidates.shape != emb.shape[:1]:
        raise ValueError(
            f"candidates must be a bool tensor with one entry per token ({emb.shape[0]}), got "
            f"{candidates.dtype} of shape {tuple(candidates.shape)}"
        )
    model.eval()
    candidates = candidates.to(emb.device)
    padded, full_mask = stack_batch(examples, emb.device)
    width = int(full_mask.sum(1).max())  # no row needs the padding columns past its longest one
    ids, mask = padded[:, :width].clone(), full_mask[:, :width]
    labels = torch.stack([e["labels"] for e in examples]).to(emb.device)
    editable = mask.bool() & candidates[ids]
    logits, grad = embedding_gradient(model, ids, mask, labels)
    correct = logits.argmax(-1) == labels
    flipped, edits = torch.zeros_like(correct), torch.zeros(len(ids), dtype=torch.long, device=ids.device)
    rows, grad = torch.nonzero(correct).flatten(), grad[correct]
    for _ in range(max_edits):
        keep = editable[rows].any(-1)
        rows, grad = rows[keep], grad[keep]
        if len(rows) == 0:
            break
        pos, tok = (t.to(ids.device) for t in _best_swaps(grad, emb, ids[rows], editable[rows], candidates))
        ids[rows, pos], editable[rows, pos] = tok, False
        edits[rows] += 1
        logits, grad = embedding_gradient(model, ids[rows], mask[rows], labels[rows])  # only the rows still right
        still = logits.argmax(-1) == labels[rows]
        flipped[rows[~still]] = True
        rows, grad = rows[still], grad[still]
    padded = padded.clone()
    padded[:, :width] = ids
    return Attack(padded, correct, flipped, edits)


def word_candidates(tokenizer) -> torch.Tensor:
    """(vocab,) bool: the tokens an attack may write, lowercase words and word pieces (``##ing``)."""
    allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, i in tokenizer.get_vocab().items():
        allowed[i] = token.removeprefix("##").isalpha() and token.removeprefix("##").islower()
    return allowed


def attacked_examples(examples: Sequence[dict], attack: Attack) -> list[dict]:
    """Copies of the flipped ``examples`` with the attack's tokens and their TRUE labels: adversarial
    training data."""
    if len(examples) != len(attack.ids):
        raise ValueError(f"the attack holds {len(attack.ids)} examples, not {len(examples)}: pass the same list")
    return [{**e, "input_ids": attack.ids[i].cpu()} for i, e in enumerate(examples) if attack.flipped[i]]
