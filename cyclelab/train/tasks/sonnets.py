"""Task 1 of chapter 06, causal LM adaptation: move ``tiny`` (trained on the plays) toward the Sonnets.

:func:`sonnets`, :func:`lm_windows` and :func:`sonnet_perplexity` make the data and the score; held-out
sonnets are the last ones, so "after" perplexity measures sonnets the model never trained on.
:func:`compare_methods` runs the task with full fine-tuning, LoRA, adapters, prefix tuning and prompt
tuning over one grid of learning rates, :func:`best_per_method` keeps each method's best run,
:func:`play_perplexity` measures what the model forgets of the plays, and :func:`plot_losses` draws
the training curves.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn

from cyclelab.loading import corpus as data
from cyclelab.train.finetune import (
    PrefixTuning,
    PromptTuning,
    TrainConfig,
    add_adapters,
    add_lora,
    count_trainable,
    lm_loss,
    train,
)
from cyclelab.train.metrics import perplexity_of_model

_ROMAN = re.compile(r"^\s*[IVXLC]+\s*$")


def sonnets() -> list[str]:
    """The 154 sonnets, each a string of its 14 (or so) lines, in order."""
    parts: list[list[str]] = []
    for line in data.read_work("sonnets").splitlines():
        if _ROMAN.match(line):
            parts.append([])  # a numeral starts the next sonnet; the title before the first is dropped
        elif parts and line.strip():
            parts[-1].append(line.strip())
    return ["\n".join(p) + "\n" for p in parts if p]


def sonnet_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``texts`` joined, each followed by the end-of-text token."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def lm_windows(tokenizer, texts: Sequence[str], length: int = 64) -> list[torch.Tensor]:
    """Training examples for a causal LM: consecutive windows of ``length`` tokens."""
    ids = sonnet_ids(tokenizer, texts)
    windows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length // 2)]
    if not windows:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {length}")
    return windows


def sonnet_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], context: int = 128) -> float:
    """Perplexity of ``model`` on ``texts`` (windows of ``context`` tokens)."""
    return perplexity_of_model(model, sonnet_ids(tokenizer, texts), context=context)


METHODS = ("full", "lora", "adapters", "prefix", "prompt")  #: the ways :func:`prepare` adapts a model


def prepare(model: nn.Module, method: str, r: int = 8, bottleneck: int = 16, n_virtual: int = 8) -> nn.Module:
    """A copy of ``model`` ready for ``method``: ``"full"``, ``"lora"`` (on ``c_attn`` and ``c_fc``),
    ``"adapters"`` (after each ``mlp``), ``"prefix"`` (``n_virtual`` learned keys and values in every
    layer) or ``"prompt"`` (``n_virtual`` learned input vectors)."""
    model = copy.deepcopy(model)  # never train the cached model that load() hands out
    if method == "full":
        return model
    if method == "lora":
        return add_lora(model, ["c_attn", "c_fc"], r=r, alpha=2 * r)
    if method == "adapters":
        return add_adapters(model, ["mlp"], bottleneck=bottleneck)
    if method == "prefix":
        return PrefixTuning(model, n_virtual=n_virtual)
    if method == "prompt":
        return PromptTuning(model, n_virtual=n_virtual)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def play_perplexity(model: nn.Module, tokenizer, n_tokens: int = 4096, context: int = 128) -> float:
    """Perplexity on the first ``n_tokens`` of the held-out plays (:data:`cyclelab.loading.corpus.VALID_PLAYS`,
    never trained on): what fine-tuning toward the sonnets may make the model forget."""
    ids = tokenizer(data.corpus("valid")[: 8 * n_tokens])["input_ids"]  # 8 characters hold at least a token
    if len(ids) < n_tokens:
        raise ValueError(f"the held-out plays give {len(ids)} tokens, fewer than n_tokens={n_tokens}")
    return perplexity_of_model(model, ids[:n_tokens], context=context)


def compare_methods(
    model: nn.Module,
    tokenizer,
    train_texts: Sequence[str],
    valid_texts: Sequence[str],
    lrs: Sequence[float],
    steps: int = 20,
    batch_size: int = 8,
    window: int = 64,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
) -> list[dict]:
    """Fine-tune a copy of ``model`` on ``train_texts`` with each method at each learning rate of
    ``lrs`` (the same grid for every method); one row per run: method, lr, trainable and total
    parameters, seconds per step, perplexity on ``valid_texts`` (to choose the rate by), the
    history and the fine-tuned model."""
    if not lrs:
        raise ValueError("give at least one learning rate in lrs")
    examples = lm_windows(tokenizer, train_texts, window)
    rows = []
    for method in methods:
        for lr in lrs:
            torch.manual_seed(seed)
            tuned = prepare(model, method)
            cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=seed)
            history = train(tuned, examples, lm_loss, cfg)
            trainable, total = count_trainable(tuned)
            rows.append(
                {
                    "method": method,
                    "lr": lr,
                    "trainable": trainable,
                    "total": total,
                    "s_per_step": history.seconds_per_step,
                    "history": history,
                    "model": tuned,
                    "valid": sonnet_perplexity(tuned, tokenizer, valid_texts),
                }
            )
    return rows


def best_per_method(rows: Sequence[dict]) -> list[dict]:
    """The run with the lowest validation perplexity of each method, in the order of ``rows``."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["method"] not in best or row["valid"] < best[row["method"]]["valid"]:
            best[row["method"]] = row
    return list(best.values())


def plot_losses(rows: Sequence[dict]):
    """Training loss per step of each run of :func:`compare_methods` (e.g. each method's best)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for row in rows:
        label = f"{row['method']} (lr {row['lr']:g})"
        ax.plot(range(1, len(row["history"].loss) + 1), row["history"].loss, label=label)
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="fine-tuning tiny on the sonnets")
    ax.legend()
    fig.tight_layout()
    return fig
