"""Texts longer than a model's context: chunks with overlap, and a sliding window.

* ``minilm`` reads at most 512 tokens. :func:`chunk_spans` cuts a long token sequence into windows that
  overlap; :func:`chunk_embeddings` embeds each (mean-pooled, as chapter 02), so a whole scene becomes the
  mean of its chunks' vectors; the first chunk alone is what truncation keeps. :func:`play_scenes` reads a
  play's scenes and :func:`nearest_centroid` classifies them, leaving each scene out of its own centroid.
* ``tiny`` reads at most 256 tokens. :func:`window_nll` scores a long passage window by window: with
  ``stride == window`` the windows are independent blocks, each starting with no context; a smaller stride
  slides the window so every scored token sees at least ``window − stride`` tokens before it.
  :func:`loss_by_position` shows what a block start costs (:func:`block_losses`: block by block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.lab.embedding import mean_pool
from cyclelab.loading import corpus as data
from cyclelab.loading.schema import is_int


def _positive_int(value, name: str) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")


def chunk_spans(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open spans ``(start, end)`` of at most ``size`` tokens covering ``n`` tokens: each starts
    ``size − overlap`` after the one before, and the last is the first to reach ``n``."""
    _positive_int(n, "n (the number of tokens)")
    _positive_int(size, "size")
    if not is_int(overlap) or not 0 <= overlap < size:
        raise ValueError(
            f"overlap must be an int in [0, size) = [0, {size}), not {overlap!r}: "
            "windows that overlap fully would never move"
        )
    spans, start = [], 0
    while True:
        spans.append((start, min(start + size, n)))
        if start + size >= n:
            return spans
        start += size - overlap


# --- minilm: chunks of a scene --------------------------------------------------------------------------

_SCENE = re.compile(r"^\s*SCENE\s+[IVXL]+\b")


def play_scenes(play: str) -> list[str]:
    """The spoken lines of each scene of ``play`` (speaker tags and stage directions dropped), one text
    per scene, in order; a scene starts at a heading ``SCENE I.``, ``SCENE II.``, ..."""
    out: list[list[str]] = []
    for line in data.normalize_speakers(data.read_work(play)).splitlines():
        if _SCENE.match(line):
            out.append([])
        elif out:
            out[-1] += data.spoken_lines(line, folio=False, min_words=1)
    return [" ".join(lines) for lines in out if lines]


@torch.no_grad()
def chunk_embeddings(loaded, text: str, size: int = 512, overlap: int = 64, batch: int = 8) -> torch.Tensor:
    """One unit vector per chunk of ``text`` (chunks, width): windows of ``size`` tokens (the encoder's
    [CLS] and [SEP] included) that overlap by ``overlap``, each mean-pooled. Row 0 is truncation."""
    tok = loaded.tokenizer
    limit = loaded.model.config.max_position_embeddings
    if not 3 <= size <= limit:
        raise ValueError(
            f"size must be in [3, {limit}]: {loaded.name} reads at most {limit} tokens, two of them [CLS] and [SEP]"
        )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("text has no tokens: give a non-empty text")
    pieces = [[tok.cls_token_id, *ids[s:e], tok.sep_token_id] for s, e in chunk_spans(len(ids), size - 2, overlap)]
    vectors = []
    for i in range(0, len(pieces), batch):
        enc = tok.pad({"input_ids": pieces[i : i + batch]}, return_tensors="pt").to(loaded.device)
        hidden = loaded.model(**enc).last_hidden_state
        vectors.append(F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
    return torch.cat(vectors).cpu()


def nearest_centroid(vectors: torch.Tensor, labels: list[int]) -> list[int]:
    """Leave-one-out nearest centroid by cosine: each row is given the class whose mean of the OTHER rows
    (its own left out) points most nearly its way."""
    if vectors.dim() != 2 or len(vectors) != len(labels):
        raise ValueError(f"need vectors (n, width) and n labels, got {tuple(vectors.shape)} and {len(labels)} labels")
    classes = sorted(set(labels))
    if any(labels.count(c) < 2 for c in classes):
        raise ValueError("every class needs at least two rows: one left out, one to form its centroid")
    y = torch.tensor(labels)
    sums = torch.stack([vectors[y == c].sum(0) for c in classes])  # (classes, width)
    counts = torch.tensor([labels.count(c) for c in classes], dtype=vectors.dtype)
    out = []
    for i, v in enumerate(vectors):
        own = torch.tensor([c == labels[i] for c in classes])
        centroids = (sums - own[:, None] * v) / (counts - own.to(vectors.dtype))[:, None]
        out.append(classes[int(F.cosine_similarity(centroids, v[None], dim=-1).argmax())])
    return out


# --- tiny: a sliding window -------------------------------------------------------------------------


@dataclass
class WindowScore:
    """The negative log-likelihood of a passage scored window by window."""

    nll: float  # summed over the scored tokens (nats)
    scored: int  # tokens predicted (each once)
    computed: int  # token positions run through the model, overlaps counted again
    losses: torch.Tensor | None = None  # (tokens,) each token's loss, NaN where no window predicted it

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.nll / self.scored)))


def context_length(config: Any) -> int:
    """The most positions a model attends over: GPT-2 configs call it ``n_positions``, Llama and BERT
    configs ``max_position_embeddings``."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"{type(config).__name__} gives no context length (neither n_positions nor max_position_embeddings)"
    )


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, window: int, stride: int) -> WindowScore:
    """Score ``ids`` (1-d) with windows of ``window`` tokens moved by ``stride``: each window predicts only
    the tokens no earlier window predicted. ``stride == window`` gives independent blocks (each block's
    first token is never predicted); a smaller stride gives every scored token ``window − stride`` or more
    tokens of context."""
    if ids.dim() != 1 or len(ids) < 2:
        raise ValueError(f"ids must be one sequence of at least 2 tokens, got shape {tuple(ids.shape)}")
    _positive_int(stride, "stride")
    context = context_length(model.config)
    if not is_int(window) or not stride <= window <= context:
        raise ValueError(f"window must be an int in [stride, {context}] (the model's context), not {window!r}")
    ids = ids.to(next(model.parameters()).device)
    losses = torch.full((len(ids),), float("nan"))
    computed, done = 0, 1  # token 0 has nothing before it
    for start, end in chunk_spans(len(ids), window, window - stride):
        first = max(done, start + 1)  # the first token this window predicts
        if first < end:
            logits = model(ids[start:end][None]).logits[0].float()
            logp = F.log_softmax(logits[first - start - 1 : end - start - 1], -1)
            losses[first:end] = -logp.gather(-1, ids[first:end, None])[:, 0].cpu()
            computed += end - start
        done = end
    scored = ~losses.isnan()
    return WindowScore(float(losses[scored].sum()), int(scored.sum()), computed, losses)


@torch.no_grad()
def block_losses(model: nn.Module, ids: torch.Tensor, window: int, batch: int = 8) -> torch.Tensor:
    """Loss of the token at each position ``1 .. window − 1`` of every independent block of ``window``
    tokens, shape (blocks, window − 1) (column k is position k + 1): one row per block, so a mean over the
    blocks can carry an interval over them."""
    _positive_int(window, "window")
    _positive_int(batch, "batch")
    n_blocks = len(ids) // window
    if n_blocks < 1 or window < 2:
        raise ValueError(f"need at least one block of window >= 2 tokens, got {len(ids)} tokens and window {window}")
    blocks = ids[: n_blocks * window].reshape(n_blocks, window).to(next(model.parameters()).device)
    rows = []
    for part in blocks.split(batch):  # a few blocks at a time: the logits are (blocks, window, vocab)
        logits = model(part).logits[:, :-1].float()
        rows.append(F.cross_entropy(logits.transpose(1, 2), part[:, 1:], reduction="none").cpu())
    return torch.cat(rows)


def loss_by_position(model: nn.Module, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Mean loss of the token at each position ``1 .. window − 1`` of independent blocks of ``window``
    tokens (result[k] is position k + 1): how much worse a token is predicted with little context."""
    return block_losses(model, ids, window).mean(0)
