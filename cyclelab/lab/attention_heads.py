"""Attention, chapter 03: heads, masks, grouped-query attention, the KV cache, real heads.

The arithmetic the engine runs (heads split and merged, masked scores, the mix of values, the
KV cache) lives in the core module :mod:`cyclelab.core.attention` and is imported here, so the chapter
shows the code the engine runs. Shapes follow one convention everywhere:
``(batch, heads, positions, head_dim)``.
"""

from __future__ import annotations

import math

import torch

from cyclelab.core.attention import KVCache, attention_mix, attention_scores, causal_mask, merge_heads, split_heads  # noqa: F401 (re-exported)
from cyclelab.loading.schema import is_int


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: share each key/value head among ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """Shapes ``(…, positions, d)``: q and k share d, k and v share the positions."""
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(
                f"{name} must be a tensor of shape (..., positions, head_dim), got {type(t).__name__} "
                f"{tuple(getattr(t, 'shape', ()))}"
            )
        if t.shape[-2] == 0 or t.shape[-1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): attention needs at least one position")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k and v must have the same number of positions, got {k.shape[-2]} and {v.shape[-2]}")
    if q.shape[:-2] != k.shape[:-2] or (v is not None and v.shape[:-2] != k.shape[:-2]):
        raise ValueError(
            f"q, k and v must share their leading (batch, heads) dimensions, got {tuple(q.shape[:-2])}, "
            f"{tuple(k.shape[:-2])}"
            + (f" and {tuple(v.shape[:-2])}" if v is not None else "")
            + " (for grouped-query attention, repeat_kv the keys and values first)"
        )


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in its four textbook steps; returns ``(output, probs)``.

    1. scores ``q @ kᵀ`` (one per query-key pair), 2. times ``scale`` (default ``1/sqrt(d)``),
    3. the causal mask (the queries are the last positions), 4. softmax over the keys,
    then the mix ``probs @ v``. Shapes: q ``(…, Tq, d)``, k ``(…, Tk, d)``, v ``(…, Tk, dv)``.
    """
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v, probs


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each query's attention distribution over the keys: ``(…, Tq)``.

    0 means the query reads one position only; ``log(n)`` means it spreads evenly over ``n``.
    """
    if probs.dim() < 1 or probs.shape[-1] == 0:
        raise ValueError("probs must have at least one key position on its last axis")
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def entropy_vs_scale(q: torch.Tensor, k: torch.Tensor, scales, causal: bool = True) -> list[float]:
    """Mean attention entropy when the scores ``q @ kᵀ`` are multiplied by each of ``scales``.

    A large scale sharpens the softmax (low entropy, one winner); a small one flattens it.
    The model's own scale is ``1/sqrt(d)``.
    """
    _check_qkv(q, k)
    scores = (q @ k.transpose(-1, -2)).double()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    out = []
    for s in scales:
        z = scores * float(s)
        if mask is not None:
            z = z.masked_fill(mask, float("-inf"))
        out.append(float(attention_entropy(torch.softmax(z, -1)).mean()))
    return out


def kv_head_of(query_head: int, n_heads: int, n_kv_heads: int) -> int:
    """Which key/value head a query head reads under grouped-query attention (as ``repeat_kv``)."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot be shared evenly among {n_kv_heads} key/value heads")
    if not 0 <= query_head < n_heads:
        raise ValueError(f"query head must be in 0..{n_heads - 1}, got {query_head}")
    return query_head // (n_heads // n_kv_heads)


# --- the KV cache as memory ------------------------------------------------------------------------


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_value: int | float) -> int:
    """Bytes of KV cache one token occupies: a key and a value vector per KV head, per layer.

    ``2 × n_layers × n_kv_heads × head_dim × bytes_per_value`` (2 bytes for fp16/bf16, 4 for fp32).
    """
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(bytes_per_value, (int, float)) or bytes_per_value <= 0:
        raise ValueError(f"bytes_per_value must be positive (2 for fp16, 4 for fp32), got {bytes_per_value!r}")
    return int(round(2 * n_layers * n_kv_heads * head_dim * bytes_per_value))


def kv_cache_growth(engine, prompt, max_new_tokens: int = 8) -> list[dict]:
    """Generate (greedily) and read ``engine.cache`` at the end of every cycle.

    One row per cycle: ``cycle``, the ``token`` chosen, ``fed`` (tokens the cycle read in),
    ``positions`` held in the cache and its ``bytes`` (keys and values of all layers).
    """
    rows = []
    for event in engine.run(prompt, max_new_tokens=max_new_tokens, stop_at_eos=False):
        if event.op == "append":
            record = event.info["record"]
            rows.append(
                {
                    "cycle": event.cycle,
                    "token": record.token,
                    "fed": record.n_inputs,
                    "positions": len(engine.cache),
                    "bytes": engine.cache.nbytes(),
                }
            )
    return rows


# --- reading real heads ----------------------------------------------------------------------------


def attention_maps(engine, ids) -> list[torch.Tensor]:
    """Attention probabilities of every layer for one prompt: a list of ``(heads, T, T)`` tensors.

    Runs the engine's forward pass once (a prefill) keeping only each layer's ``softmax``
    (TransformerLens's ``hook_pattern``).
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(engine.arch.n_layers)]
    _, cache = engine.run_with_cache(ids, names=names)
    return [cache[name][0].float().cpu() for name in names]


def _square_probs(probs: torch.Tensor) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor) or probs.dim() < 2 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(
            f"probs must be (..., T, T) attention of T queries over the same T keys, "
            f"got {tuple(getattr(probs, 'shape', ()))}"
        )
    if probs.shape[-1] < 2:
        raise ValueError("a score needs at least 2 positions (row 0 can only attend to itself)")
    return probs.float()


def previous_token_score(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention mass each query ``i >= 1`` puts on position ``i - 1`` (the diagonal below
    the main one): ``(…)`` from probs ``(…, T, T)``. 1.0 = a perfect previous-token head."""
    p = _square_probs(probs)
    return p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)


def first_token_score(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention mass each query ``i >= 1`` puts on position 0 (row 0 is left out: it can
    only read itself): ``(…)`` from probs ``(…, T, T)``. 1.0 = everything goes to the first token."""
    p = _square_probs(probs)
    return p[..., 1:, 0].mean(-1)


def find_heads(engine, ids, score_fn, top: int | None = None, decimals: int = 4) -> list[tuple[int, int, float]]:
    """Rank every (layer, head) of ``engine``'s model by ``score_fn(probs)`` on a prompt.

    ``score_fn`` maps ``(heads, T, T)`` attention to one score per head (e.g.
    :func:`previous_token_score`). Returns ``(layer, head, score)``, highest first;
    scores equal to ``decimals`` places count as tied and keep layer/head order, so float
    noise (another CPU, thread count or GPU) does not reorder heads that score the same.
    """
    scored = []
    for layer, probs in enumerate(attention_maps(engine, ids)):
        scores = torch.as_tensor(score_fn(probs)).flatten()
        if scores.numel() != probs.shape[0]:
            raise ValueError(f"score_fn must give one score per head ({probs.shape[0]}), got {scores.numel()}")
        scored += [(layer, head, float(s)) for head, s in enumerate(scores)]
    scored.sort(key=lambda row: (-round(row[2], decimals), row[0], row[1]))
    return scored[:top] if top is not None else scored


def plot_attention(probs: torch.Tensor, tokens=None, ax=None, title: str = ""):
    """One head's attention map: row = query (the reading position), column = key (what it reads)."""
    import matplotlib.pyplot as plt

    probs = torch.as_tensor(probs).detach().float().cpu()
    if probs.dim() != 2:
        raise ValueError(f"plot one head at a time: probs must be (T, T), got {tuple(probs.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=1)
    if tokens is not None:
        shown = [t.replace("\n", "⏎") for t in tokens]
        ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=6)
        ax.set_yticks(range(len(shown)), shown, fontsize=6)
    else:
        ax.set(xlabel="key position (read)", ylabel="query position (reading)")
    ax.set_title(title, fontsize=9)
    return ax
