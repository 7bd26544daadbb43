"""Helpers for chapter 05 (decoding, the WRITEBACK stage) that do not belong in :mod:`cyclelab.core.sampling`.

* :func:`plot_pipeline` — the next-token distribution before and after each logits processor;
* :func:`encode_split`, :func:`pick_k` — the n-gram baseline on the same tokens as ``tiny``, with its
  smoothing constant chosen on a slice of the *training* plays (never on the held-out plays);
* :func:`causal_nll`, :func:`ngram_nll`, :func:`block_losses` — every model's loss at each held-out position,
  averaged per block of positions, so that two models can be compared block by block (a paired interval);
* :func:`repeated_ngrams` — how much of a generated text repeats itself, to compare samplers;
* :func:`fill_mask`, :func:`masked_vs_causal`, :func:`plot_visibility` — a masked LM (``tiny-mlm``)
  next to a causal one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cyclelab.lab.forward_by_hand import figure_token as _show
from cyclelab.lab.ngram import NGramLM
from cyclelab.loading.schema import is_int

# ------------------------------------------------------------------ the sampler, stage by stage


def plot_pipeline(stages: list[tuple[str, torch.Tensor]], token_text, k: int = 12, axes=None, title: str = ""):
    """One panel per stage of :func:`cyclelab.core.sampling.pipeline`: the probabilities of the ``k`` tokens
    most likely under the raw logits, after that stage (grey bars: tokens it removed).

    ``token_text`` maps a token id to its text (e.g. ``engine.token_text``).
    """
    import matplotlib.pyplot as plt

    if not stages:
        raise ValueError("no stages to plot: pass the list that decode.pipeline returns")
    if axes is None:
        _, axes = plt.subplots(1, len(stages), figsize=(3.1 * len(stages), 3.0), sharey=True, squeeze=False)
        axes = axes[0]
    raw = stages[0][1].detach().float()
    ids = torch.topk(raw, min(k, raw.numel())).indices.tolist()
    labels = [_show(token_text(i)) for i in ids]
    for ax, (name, logits) in zip(axes, stages):
        probs = torch.softmax(logits.detach().float(), -1)
        values = [float(probs[i]) for i in ids]
        removed = [bool(torch.isneginf(logits[i])) for i in ids]
        ax.bar(range(len(ids)), values, color=["#BBBBBB" if r else "#4C72B0" for r in removed])
        kept = int(torch.isfinite(logits).sum())
        ax.set_title(f"{name}\n{kept} tokens left, top p = {max(values):.2f}", fontsize=9)
        ax.set_xticks(range(len(ids)), labels, rotation=70, fontsize=7)
    axes[0].set_ylabel("probability")
    if title:
        plt.suptitle(title, fontsize=10)
    return axes


def entropy_nats(logits: torch.Tensor) -> float:
    """Entropy of softmax(logits) in nats: 0 for a sure choice, log(V) for V equally likely tokens."""
    return float(torch.special.entr(torch.softmax(logits.detach().double(), -1)).sum())


# ------------------------------------------------------------------ the n-gram baseline


def token_cache() -> Path:
    """Where :func:`encode_split` keeps encoded splits: ``tokens/`` in the cyclelab cache folder."""
    from cyclelab.loading.fetch import cache_dir

    return cache_dir() / "tokens"


def encode_split(tokenizer, split: str, limit: int | None = None, cache: bool = True) -> list[int]:
    """Token ids of the ``"train"`` or ``"valid"`` plays (each play followed by end-of-text), as ``tiny``
    was trained and validated on them; the first ``limit`` ids if given.

    Tokenising the 1.5M training tokens takes seconds, so with ``cache`` the ids are kept in the
    cyclelab cache folder (``tokens/``), under a hash of the tokenizer and of the texts: a changed
    tokenizer or corpus is encoded afresh. A cache this user cannot write is only read.
    """
    import hashlib

    from cyclelab.loading import corpus as data
    from cyclelab.loading.fetch import cache_writable
    from cyclelab.train.tiny import encode_plays

    plays = data.plays(split)
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    for name, text in plays.items():
        digest.update(f"\0{name}\0{text}".encode())
    path = token_cache() / f"{split}-{digest.hexdigest()[:16]}.npy"
    if cache and path.exists():
        ids = np.load(path)
    else:
        ids = encode_plays(tokenizer, plays)
        if cache and cache_writable():  # a read-only shared cache is left alone
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial.npy")
            np.save(partial, ids)
            partial.replace(path)  # atomic: a reader never sees half a file
    return [int(i) for i in (ids if limit is None else ids[:limit])]


def pick_k(
    n: int, train_ids: Sequence[int], vocab_size: int, ks: Sequence[float], tune_fraction: float = 0.1
) -> tuple[float, dict[float, float]]:
    """Choose the add-k constant of an ``n``-gram model without touching held-out data.

    The model is fitted on the first ``1 - tune_fraction`` of ``train_ids`` and scored on the rest
    (a *tuning* slice of the training data) for each ``k``; returns ``(best k, {k: perplexity})``.
    """
    if not ks:
        raise ValueError("give at least one candidate k")
    if not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction!r}")
    ids = list(train_ids)
    cut = int(len(ids) * (1 - tune_fraction))
    model = NGramLM(n, vocab_size).fit(ids[:cut])
    scores = {}
    for k in ks:
        model.k = float(k)  # the counts do not depend on k: fit once, rescore
        scores[k] = model.perplexity(ids[cut:])
    return min(scores, key=scores.get), scores


# ------------------------------------------------------------------ losses per position and per block


def causal_nll(model: torch.nn.Module, ids: Sequence[int], context: int, batch_size: int = 8) -> torch.Tensor:
    """``(len(ids),)``: a causal LM's negative log-likelihood of each token, reading ``ids`` in side-by-side
    windows of ``context`` tokens (as :func:`cyclelab.train.metrics.perplexity_of_model` does); NaN at each
    window's first position, which is context only."""
    if not is_int(context) or context < 2:
        raise ValueError(f"context must be an integer >= 2, got {context!r}")
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    out = torch.full((len(ids_t),), float("nan"), dtype=torch.float64)
    device = next(model.parameters()).device
    full = len(ids_t) // context * context
    spans = [(s, min(s + context, len(ids_t))) for s in range(0, len(ids_t), context)]
    whole = spans[: full // context]
    groups = [whole[i : i + batch_size] for i in range(0, len(whole), batch_size)] + [spans[full // context :]]
    with torch.no_grad():
        for group in (g for g in groups if g and g[0][1] - g[0][0] > 1):  # equal-length windows, batched
            batch = torch.stack([ids_t[s:e] for s, e in group])
            logp = torch.log_softmax(model(batch.to(device)).logits[:, :-1].double().cpu(), -1)
            nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]
            for row, (s, e) in enumerate(group):
                out[s + 1 : e] = nll[row]
    return out


def ngram_nll(model: NGramLM, ids: Sequence[int]) -> torch.Tensor:
    """``(len(ids),)``: an n-gram model's negative log-likelihood of each token; NaN at the first n-1."""
    out = torch.full((len(ids),), float("nan"), dtype=torch.float64)
    out[model.n - 1 :] = -torch.tensor(model.token_logprobs(ids), dtype=torch.float64)
    return out


def block_losses(nlls: dict[str, torch.Tensor], block: int) -> dict[str, list[float]]:
    """Each model's mean loss per whole block of ``block`` positions, over the positions that *every* model
    scored (so that each block compares the same tokens); a ragged last block is left out."""
    if not nlls or len({len(v) for v in nlls.values()}) != 1:
        raise ValueError("give one loss tensor per model, all of the same length")
    if not is_int(block) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    scored = torch.stack([~torch.isnan(v) for v in nlls.values()]).all(0)
    n_blocks = len(scored) // block
    if n_blocks == 0:
        raise ValueError(f"need at least one block of {block} positions, got {len(scored)}")
    out: dict[str, list[float]] = {}
    for name, v in nlls.items():
        out[name] = [
            float(v[b * block : (b + 1) * block][scored[b * block : (b + 1) * block]].mean()) for b in range(n_blocks)
        ]
    return out


def repeated_ngrams(ids: Sequence[int], n: int = 4) -> float:
    """The share of the ``n``-grams of ``ids`` that already occurred earlier in ``ids`` (0: no repeat;
    near 1: a loop). Needs at least ``n`` ids."""
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    ids = list(ids)
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        raise ValueError(f"need at least {n} ids to count {n}-grams, got {len(ids)}")
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


# ------------------------------------------------------------------ masked vs causal


def fill_mask(loaded, text: str, k: int = 5, absorb_space: bool = True) -> list[list[tuple[str, float]]]:
    """The masked LM's top-``k`` guesses for each mask token in ``text``: one list of
    ``(token text, probability)`` per mask, left to right, all from one forward pass.

    With byte-level BPE a word's token carries its leading space (``" be"``), so with
    ``absorb_space`` a space just before the mask is taken as part of the hidden token:
    ``"not to <mask>"`` is read as ``"not to<mask>"``.
    """
    tok = loaded.tokenizer
    mask = getattr(tok, "mask_token", None)
    if not mask:
        raise ValueError(f"{loaded.name!r} has no mask token: fill_mask needs a masked LM such as 'tiny-mlm'")
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if absorb_space:
        text = text.replace(" " + mask, mask)
    ids = tok(text)["input_ids"]
    positions = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
    if not positions:
        raise ValueError(f"the text has no {mask} token to fill in")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids], device=loaded.device)).logits[0]
    out = []
    for pos in positions:
        top = torch.topk(torch.softmax(logits[pos].float(), -1), k)
        out.append([(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)])
    return out


def masked_vs_causal(causal, masked, ids: Sequence[int], window: int = 64, every: int = 8) -> dict[str, dict]:
    """Score the same tokens two ways: ``causal`` predicts each from the tokens before it (left context
    only); ``masked`` from both sides, with only that one token hidden behind its mask token.

    ``ids`` is cut into windows of ``window`` tokens; in each, the positions ``every, 2 * every, ...``
    are scored. Both models must share the token ids (``tiny`` and ``tiny-mlm`` do). Returns
    ``{"causal": {...}, "masked": {...}}`` with each model's top-1 ``accuracy``, ``perplexity``, the
    number of scored ``tokens`` and the negative log-likelihood of each (``nlls``, in the same order).
    """
    mask_id = masked.tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(f"{masked.name!r} has no mask token")
    if not 1 <= every < window:
        raise ValueError(f"every must be in [1, window), got every={every}, window={window}")
    ids = list(ids)
    stats = {name: {"hits": 0, "nll": 0.0, "tokens": 0, "nlls": []} for name in ("causal", "masked")}
    for start in range(0, len(ids) - window + 1, window):
        chunk = torch.tensor(ids[start : start + window])
        positions = list(range(every, window, every))
        targets = chunk[positions]
        hidden = chunk.repeat(len(positions), 1)
        hidden[range(len(positions)), positions] = mask_id  # row r hides position positions[r] only
        with torch.no_grad():
            left = torch.log_softmax(causal.model(chunk[None].to(causal.device)).logits[0].float().cpu(), -1)
            both = torch.log_softmax(masked.model(hidden.to(masked.device)).logits.float().cpu(), -1)
        for name, logp in (
            ("causal", left[[p - 1 for p in positions]]),  # position p is predicted at p - 1
            ("masked", both[range(len(positions)), positions]),
        ):
            stats[name]["hits"] += int((logp.argmax(-1) == targets).sum())
            token_nll = -logp.gather(-1, targets[:, None])[:, 0]
            stats[name]["nll"] += float(token_nll.sum())
            stats[name]["nlls"] += token_nll.tolist()
            stats[name]["tokens"] += len(positions)
    if not stats["causal"]["tokens"]:
        raise ValueError(f"need at least one window of {window} tokens, got {len(ids)} ids")
    return {
        name: {
            "accuracy": s["hits"] / s["tokens"],
            "perplexity": math.exp(s["nll"] / s["tokens"]),
            "tokens": s["tokens"],
            "nlls": s["nlls"],
        }
        for name, s in stats.items()
    }


def plot_visibility(tokens: Sequence[str], causal: bool, ax=None, hidden: int | None = None, title: str = ""):
    """Which positions each position can read: the causal triangle (a next-token model) or the full
    square (a masked model). ``hidden`` marks a masked position: its row is the one being predicted."""
    import matplotlib.pyplot as plt

    n = len(tokens)
    see = torch.ones(n, n).tril() if causal else torch.ones(n, n)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(see, cmap="Blues", vmin=0, vmax=1.4)
    shown = [_show(t) for t in tokens]
    ax.set_xticks(range(n), shown, rotation=90, fontsize=7)
    ax.set_yticks(range(n), shown, fontsize=7)
    ax.set(xlabel="position read", ylabel="position reading")
    if hidden is not None:
        ax.add_patch(plt.Rectangle((-0.5, hidden - 0.5), n, 1, fill=False, edgecolor="#C44E52", lw=2))
    ax.set_title(title, fontsize=9)
    return ax


def sample_ngram_text(model: NGramLM, tokenizer, prompt_ids: Sequence[int], length: int, seed: int = 0) -> str:
    """``length`` tokens sampled from an n-gram model after ``prompt_ids``, decoded to text."""
    generator = torch.Generator().manual_seed(seed)
    return tokenizer.decode(model.sample(list(prompt_ids), length, generator))


def bits_per_token(perplexity: float) -> float:
    """log2 of a perplexity: the average number of bits the model needs per token."""
    return math.log2(perplexity)


__all__ = [
    "bits_per_token",
    "block_losses",
    "causal_nll",
    "encode_split",
    "entropy_nats",
    "fill_mask",
    "masked_vs_causal",
    "ngram_nll",
    "pick_k",
    "plot_pipeline",
    "plot_visibility",
    "repeated_ngrams",
    "sample_ngram_text",
]
