"""Task 1 of chapter 06, causal LM adaptation: move ``tiny`` (trained on the plays) toward the Sonnets.

:func:`sonnets`, :func:`lm_windows` and :func:`sonnet_perplexity` make the data and the score; held-out
sonnets are the last ones, so "after" perplexity measures sonnets the model never trained on.
:func:`line_losses` scores held-out sonnets line by line (the items of a paired comparison).
:func:`compare_methods` runs the task with full fine-tuning, LoRA, adapters, prefix tuning and prompt
tuning, each over its own grid of learning rates, :func:`best_per_method` keeps each method's best run,
:func:`run_method` reruns one at other seeds, :func:`play_perplexity` and :func:`play_losses` measure
what the model forgets of the plays, and :func:`plot_losses` draws the training curves.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
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


def _max_positions(model: nn.Module) -> int:
    inner = getattr(model, "model", model)  # prefix and prompt tuning wrap the language model
    return int(getattr(inner.config, "n_positions", 1024)) - getattr(model, "n_virtual", 0)


@torch.no_grad()
def line_losses(model: nn.Module, tokenizer, texts: Sequence[str]) -> list[tuple[float, int]]:
    """Per line of each of ``texts`` (sonnets, lines split on newlines): the summed next-token negative
    log-likelihood of the line's tokens and their count, each line read after the poem's earlier lines
    (an end-of-text token starts each poem, so the first line's first token is scored too)."""
    if not texts:
        raise ValueError("no texts to score")
    rows, spans = [], []
    for text in texts:
        ids, bounds = [tokenizer.eos_token_id], []
        for line in text.splitlines(keepends=True):
            start = len(ids)
            ids += tokenizer(line)["input_ids"]
            bounds.append((start, len(ids)))
        if len(ids) > _max_positions(model):
            raise ValueError(f"a text of {len(ids)} tokens is longer than the model reads ({_max_positions(model)})")
        rows.append(ids)
        spans.append(bounds)
    width = max(len(r) for r in rows)
    batch = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
    was_training = model.training
    model.eval()
    try:
        logp = F.log_softmax(model(input_ids=batch).logits.float(), -1)
    finally:
        model.train(was_training)
    nll = -logp[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]  # nll[k, t]: token t + 1 of row k
    return [(float(nll[k, a - 1 : b - 1].sum()), b - a) for k, bounds in enumerate(spans) for a, b in bounds if b > a]


def lines_perplexity(losses: Sequence[tuple[float, int]]) -> float:
    """Perplexity of the lines scored by :func:`line_losses` (all their tokens together)."""
    return math.exp(sum(n for n, _ in losses) / sum(c for _, c in losses))


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


@torch.no_grad()
def play_losses(model: nn.Module, tokenizer, n_tokens: int = 8192, context: int = 64) -> list[float]:
    """Mean next-token loss (nats) of each window of ``context`` tokens in the first ``n_tokens`` of the
    held-out plays: the items of a paired comparison of forgetting (``exp`` of their mean is the
    perplexity, the windows being of equal length)."""
    ids = tokenizer(data.corpus("valid")[: 8 * n_tokens])["input_ids"]
    if len(ids) < n_tokens or n_tokens < context:
        raise ValueError(f"n_tokens={n_tokens} must be at least context={context} and at most {len(ids)}")
    batch = torch.tensor(ids[: n_tokens - n_tokens % context]).view(-1, context)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=batch).logits[:, :-1].float()
    finally:
        model.train(was_training)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return nll.view(len(batch), -1).mean(1).tolist()


def run_method(
    model: nn.Module,
    examples: Sequence,
    method: str,
    lr: float,
    steps: int,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Fine-tune a copy of ``model`` on ``examples`` (:func:`lm_windows`) with ``method`` at ``lr``:
    a row with the method, lr, seed, trainable and total parameters, seconds per step, the history and
    the fine-tuned model."""
    torch.manual_seed(seed)
    tuned = prepare(model, method)
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=seed, progress=progress
    )
    history = train(tuned, examples, lm_loss, cfg)
    trainable, total = count_trainable(tuned)
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "trainable": trainable,
        "total": total,
        "s_per_step": history.seconds_per_step,
        "history": history,
        "model": tuned,
    }


def compare_methods(
    model: nn.Module,
    tokenizer,
    train_texts: Sequence[str],
    valid_texts: Sequence[str],
    lrs: Sequence[float] | Mapping[str, Sequence[float]],
    steps: int = 20,
    batch_size: int = 8,
    window: int = 64,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    progress: bool = False,
) -> list[dict]:
    """Fine-tune a copy of ``model`` on ``train_texts`` with each method at each learning rate of its
    grid: ``lrs`` maps a method to its own rates (or is one list for all); one :func:`run_method` row
    per run (``progress``: a tqdm bar each), plus the perplexity on ``valid_texts`` (to choose by)."""
    grids = lrs if isinstance(lrs, Mapping) else {m: lrs for m in methods}
    missing = [m for m in methods if not grids.get(m)]
    if missing:
        raise ValueError(f"give at least one learning rate for each method; none for {', '.join(missing)}")
    examples = lm_windows(tokenizer, train_texts, window)
    rows = []
    for method in methods:
        for lr in grids[method]:
            row = run_method(model, examples, method, lr, steps, batch_size, seed, progress)
            row["valid"] = sonnet_perplexity(row["model"], tokenizer, valid_texts)
            rows.append(row)
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
