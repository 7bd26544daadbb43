"""Decode throughput: how the time of one cycle moves with the context length and the batch size.

* :func:`cache_scaling` — ms for one new token at growing context lengths, with the KV cache
  (one new position is computed) and without it (every position is recomputed each cycle).
* :func:`batch_decode` — ms per decode step and tokens/s for ``batch`` sequences decoded side by
  side: a step reads every weight once whatever the batch, so the weights' cost is shared.

Both drive the engine's own forward pass (:meth:`cyclelab.core.engine.Engine.forward`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from cyclelab.core.attention import KVCache
from cyclelab.core.engine import Engine, drain
from cyclelab.lab.roofline import best_of
from cyclelab.loading.schema import is_int

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. "


def _check_sizes(values: Sequence[int], name: str) -> list[int]:
    values = list(values)
    if not values or not all(is_int(v) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    return values


def _long_ids(engine: Engine, n: int) -> torch.Tensor:
    """``(1, n)`` token ids of a repeated line of Richard III (enough repeats for ``n`` tokens)."""
    once = engine.encode(TEXT)
    if n > engine.context_window:
        raise ValueError(f"{n} tokens exceed the model's context window of {engine.context_window}")
    return torch.tensor([(once * (n // len(once) + 1))[:n]])


def cache_scaling(engine: Engine, lengths: Sequence[int] = (32, 64, 128, 256), decode_steps: int = 4) -> list[dict]:
    """Milliseconds for one new token at each context length, with and without the KV cache."""
    lengths, (decode_steps,) = _check_sizes(lengths, "lengths"), _check_sizes([decode_steps], "decode_steps")
    all_ids = _long_ids(engine, max(lengths) + decode_steps)
    n_layers, rows = engine.arch.n_layers, []
    for n in lengths:
        cache = KVCache(n_layers, n + decode_steps)
        drain(engine.forward(all_ids[:, :n], cache))  # prefill

        start = time.perf_counter()
        for i in range(decode_steps):
            drain(engine.forward(all_ids[:, n + i : n + i + 1], cache))
        cached_ms = (time.perf_counter() - start) / decode_steps * 1e3
        no_cache_ms = best_of(lambda: drain(engine.forward(all_ids[:, : n + 1], KVCache(n_layers, n + 1))), 1) * 1e3
        rows.append(
            {"context": n, "kv_cache_ms": cached_ms, "no_cache_ms": no_cache_ms, "speedup": no_cache_ms / cached_ms}
        )
    return rows


def plot_cache_scaling(rows: list[dict], title: str = "cost of one cycle", ax=None):
    """ms per new token against the context, with and without the cache (log-log)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ctx = [r["context"] for r in rows]
    ax.plot(ctx, [r["no_cache_ms"] for r in rows], "o-", label="no cache: recompute every position")
    ax.plot(ctx, [r["kv_cache_ms"] for r in rows], "o-", label="KV cache: one new position")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per new token", title=title)
    ax.legend(fontsize=8)
    return ax


def batch_decode(
    engine: Engine, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16), prompt_len: int = 16, steps: int = 4
) -> list[dict]:
    """Greedy decode of ``batch`` sequences at once for each batch size: ms per step (one token for
    every sequence) and tokens/s over all sequences. Each sequence starts from a different offset
    of the same text, so the rows of the batch differ."""
    batch_sizes = _check_sizes(batch_sizes, "batch_sizes")
    prompt_len, steps = _check_sizes([prompt_len, steps], "prompt_len and steps")
    source = _long_ids(engine, prompt_len + max(batch_sizes))[0]
    rows = []
    for batch in batch_sizes:
        ids = torch.stack([source[i : i + prompt_len] for i in range(batch)])  # (batch, prompt_len)
        cache = KVCache(engine.arch.n_layers, prompt_len + steps)
        logits = drain(engine.forward(ids, cache))  # prefill: not timed
        start = time.perf_counter()
        for _ in range(steps):
            logits = drain(engine.forward(logits[:, -1:].argmax(-1), cache))
        seconds = (time.perf_counter() - start) / steps
        rows.append({"batch": batch, "ms_per_step": seconds * 1e3, "tokens_per_s": batch / seconds})
    return rows
