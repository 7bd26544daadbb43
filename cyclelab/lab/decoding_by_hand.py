"""Helpers for chapter 05 (decoding, the WRITEBACK stage) that do not belong in :mod:`cyclelab.core.sampling`.

* :func:`plot_pipeline` — the next-token distribution before and after each logits processor;
* :func:`encode_split`, :func:`pick_k` — the n-gram baseline on the same tokens as ``tiny``, with its
  smoothing constant chosen on a slice of the *training* plays (never on the held-out plays);
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
    ``{"causal": {...}, "masked": {...}}`` with each model's top-1 ``accuracy``, ``perplexity`` and the
    number of scored ``tokens``.
    """
    mask_id = masked.tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(f"{masked.name!r} has no mask token")
    if not 1 <= every < window:
        raise ValueError(f"every must be in [1, window), got every={every}, window={window}")
    ids = list(ids)
    stats = {name: {"hits": 0, "nll": 0.0, "tokens": 0} for name in ("causal", "masked")}
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
            stats[name]["nll"] -= float(logp.gather(-1, targets[:, None]).sum())
            stats[name]["tokens"] += len(positions)
    if not stats["causal"]["tokens"]:
        raise ValueError(f"need at least one window of {window} tokens, got {len(ids)} ids")
    return {
        name: {
            "accuracy": s["hits"] / s["tokens"],
            "perplexity": math.exp(s["nll"] / s["tokens"]),
            "tokens": s["tokens"],
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
    "encode_split",
    "entropy_nats",
    "fill_mask",
    "masked_vs_causal",
    "pick_k",
    "plot_pipeline",
    "plot_visibility",
    "sample_ngram_text",
]
