"""Metrics: perplexity (how surprised a language model is by a text) and BLEU (text-to-text overlap).

Perplexity is ``exp(total negative log-likelihood / number of scored tokens)``. A model
that spreads its bets evenly over V tokens has perplexity V; lower is better.

:func:`perplexity_of_model` scores a long token sequence with a causal transformers
model, window by window, so that it can be compared with an n-gram model scored on
the same tokens. :func:`block_nll` keeps one mean loss per block, so that two models scored on
the same blocks can be compared with a paired interval over the blocks (``cyclelab.lab.stats``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from cyclelab.loading.schema import is_int


def perplexity(nll_sum: float, count: int) -> float:
    """exp(nll_sum / count): the perplexity from a summed negative log-likelihood (nats) over ``count`` tokens."""
    if not is_int(count) or count < 1:
        raise ValueError(f"count (the number of scored tokens) must be an integer >= 1, got {count!r}")
    if math.isnan(nll_sum):
        raise ValueError(f"nll_sum must be a number, got {nll_sum!r}")
    return math.exp(nll_sum / count)


def windows(length: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(start, end, first_scored)`` for each window over positions ``[0, length)``.

    Windows are ``context`` tokens long and start every ``stride`` tokens; each scores
    the positions ``first_scored .. end - 1`` that no earlier window scored, never its
    own first position (it has nothing to be predicted from).
    """
    scored_until, start = 0, 0
    while scored_until < length:
        end = min(start + context, length)
        first = max(start + 1, scored_until)
        if first < end:
            yield start, end, first
        scored_until, start = end, start + stride


def _max_positions(model: torch.nn.Module) -> int | None:
    """The longest input the model accepts, if its config says."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check(model: torch.nn.Module, ids: torch.Tensor, context: int, stride: int, batch_size: int) -> None:
    """Raise ValueError for settings or ids the model cannot score."""
    for name, value in (("context", context), ("stride", stride), ("batch_size", batch_size)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if context < 2:
        raise ValueError(f"context must be >= 2 (a window's first token is never scored), got {context}")
    if stride > context:
        raise ValueError(f"stride must be in [1, context={context}] so that no token is skipped, got {stride}")
    limit = _max_positions(model)
    if limit is not None and context > limit:
        raise ValueError(f"context={context} is longer than the model's {limit} positions")
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids must be a flat sequence of at least 2 token ids, got shape {tuple(ids.shape)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        raise ValueError(f"ids must be token ids in [0, {vocab})")


def perplexity_of_model(
    model: torch.nn.Module,
    ids: Sequence[int] | torch.Tensor,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of a causal language model on a long sequence of token ids.

    The sequence is cut into windows of ``context`` tokens starting every ``stride``
    tokens (by default ``stride = context``: windows side by side, no overlap). The
    model reads each window separately and scores every position except the window's
    first, so with the default stride the tokens at positions 0, context, 2*context, ...
    are context only, exactly like the first n-1 tokens for an n-gram model. With a
    smaller stride the windows overlap and each token is scored once, by the first
    window that can predict it (the last ``stride`` positions of later windows), with
    more context. The last window may be shorter.

    Runs without gradients on the model's device, in eval mode (restored afterwards).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:  # a (1, seq) batch, as tokenizers return it
        ids = ids[0]
    stride = context if stride is None else stride
    _check(model, ids, context, stride, batch_size)
    device = next(model.parameters()).device
    spans = list(windows(len(ids), context, stride))
    nll_sum, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length in sorted({end - start for start, end, _ in spans}):
                group = [s for s in spans if s[1] - s[0] == length]
                for i in range(0, len(group), batch_size):
                    nll, n = _window_nll(model, ids, group[i : i + batch_size], device)
                    nll_sum, count = nll_sum + nll, count + n
    finally:
        model.train(was_training)
    return perplexity(nll_sum, count)


def block_nll(
    model: torch.nn.Module, ids: Sequence[int] | torch.Tensor, context: int, batch_size: int = 8
) -> torch.Tensor:
    """Mean negative log-likelihood (nats per token) of each independent block of ``context`` tokens of
    ``ids``, shape (blocks,): every position but the block's first is scored; a last, shorter block is
    left out, so the blocks weigh alike and ``exp(result.mean())`` is their perplexity."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    _check(model, ids, context, context, batch_size)
    n_blocks = len(ids) // context
    if n_blocks < 1:
        raise ValueError(f"need at least one block: {len(ids)} tokens is fewer than context={context}")
    device = next(model.parameters()).device
    spans = [(b * context, (b + 1) * context, b * context + 1) for b in range(n_blocks)]
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, n_blocks, batch_size):
                batch = torch.stack([ids[start:end] for start, end, _ in spans[i : i + batch_size]]).to(device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                out.append(loss.mean(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _window_nll(
    model: torch.nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]], device: torch.device
) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens for equal-length windows."""
    batch = torch.stack([ids[start:end] for start, end, _ in spans]).to(device)
    targets = batch[:, 1:].clone()
    for row, (start, _, first) in enumerate(spans):
        targets[row, : first - start - 1] = -100  # positions scored by an earlier window
    logits = model(input_ids=batch).logits[:, :-1]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((targets != -100).sum())


# --- BLEU: n-gram overlap with a reference, for text-to-text tasks ---------------------------------

_PUNCT = re.compile(r"([^\w\s'])")


def bleu_tokenize(text: str) -> list[str]:
    """sacrebleu's ``13a`` tokenisation, simplified: every character that is not a letter, digit,
    space or apostrophe becomes a token of its own, then split on whitespace. (13a also keeps
    ``.`` and ``,`` inside numbers and unescapes HTML entities; neither occurs in our lines.)"""
    return _PUNCT.sub(r" \1 ", text).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-4 on a 0–100 scale, as ``sacrebleu.corpus_bleu`` computes it.

    Clipped n-gram counts (n = 1..4) are summed over the whole corpus, their precisions combined
    by a geometric mean and multiplied by the brevity penalty ``exp(1 - r/c)`` when the hypotheses
    (``c`` tokens) are shorter than the references (``r`` tokens, the closest reference length per
    sentence). A precision with no match is smoothed like sacrebleu's default ``exp`` method.
    ``references`` holds one string per hypothesis, or a list of strings (several references).
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: give one (or a list) per hypothesis"
        )
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        h = bleu_tokenize(hyp)
        rs = [bleu_tokenize(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            hyp_ngrams = _ngrams(h, n)
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in hyp_ngrams.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0:
        return 0.0
    log_p, smooth = 0.0, 1.0
    for c, t in zip(correct, total):
        if t == 0:
            return 0.0
        if c == 0:
            smooth *= 2
            p = 1.0 / (smooth * t)
        else:
            p = c / t
        log_p += math.log(p) / max_n
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> list[tuple[int, ...]]:
    """Per line, the counts corpus BLEU sums: clipped matches and totals for n = 1..``max_n``, then the
    hypothesis and reference lengths. :func:`bleu_of_statistics` of a list of them is :func:`bleu` of those
    lines, so a bootstrap over lines (``cyclelab.lab.stats.corpus_interval``) need not re-tokenize."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"give one reference per hypothesis (and at least one): {len(hypotheses)} and {len(references)}"
        )
    out = []
    for hyp, ref in zip(hypotheses, references):
        h, r = bleu_tokenize(hyp), bleu_tokenize(ref)
        matches = [sum((_ngrams(h, n) & _ngrams(r, n)).values()) for n in range(1, max_n + 1)]
        totals = [max(0, len(h) - n + 1) for n in range(1, max_n + 1)]
        out.append((*matches, *totals, len(h), len(r)))
    return out


def bleu_of_statistics(stats: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU (0–100, sacrebleu's formula and ``exp`` smoothing) from :func:`bleu_statistics` rows."""
    if not stats:
        raise ValueError("no lines to score")
    sums = [sum(col) for col in zip(*stats)]
    max_n = (len(sums) - 2) // 2
    correct, total, (hyp_len, ref_len) = sums[:max_n], sums[max_n : 2 * max_n], sums[-2:]
    if hyp_len == 0 or min(total) == 0:
        return 0.0
    log_p, smooth = 0.0, 1.0
    for c, t in zip(correct, total):
        if c == 0:
            smooth *= 2
        log_p += math.log(c / t if c else 1.0 / (smooth * t)) / max_n
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)
