"""The attention arithmetic the engine runs, and its memory, the KV cache (core).

Heads split and merged, scaled dot products with the causal mask, the weighted mix of values,
and the cache that keeps every layer's keys and values. Shapes follow one convention
everywhere: ``(batch, heads, positions, head_dim)``. Chapter 03 (:mod:`cyclelab.lab.attention_heads`)
teaches these pieces and imports them from here.
"""

from __future__ import annotations

import math

import torch


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(batch, positions, n_heads * d)`` -> ``(batch, n_heads, positions, d)``."""
    b, t, width = x.shape
    if width % n_heads:
        raise ValueError(f"width {width} is not divisible by {n_heads} heads")
    if t == 1:  # one position (decode): the same memory either way, so one view instead of two ops
        return x.view(b, n_heads, 1, width // n_heads)
    return x.view(b, t, n_heads, width // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, positions, d)`` -> ``(batch, positions, heads * d)``."""
    b, h, t, d = x.shape
    if t == 1 and x.is_contiguous():  # one position: already in that order
        return x.view(b, 1, h * d)
    return x.transpose(1, 2).reshape(b, t, h * d)


def causal_mask(n_queries: int, n_keys: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask, True where a query must NOT look.

    The queries are the last ``n_queries`` of ``n_keys`` positions (earlier ones are in
    the cache), so query ``i`` sits at position ``n_keys - n_queries + i`` and may see
    keys up to and including that position.
    """
    if n_queries > n_keys:
        raise ValueError(f"{n_queries} queries cannot be the last of only {n_keys} keys")
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    return torch.arange(n_keys, device=device)[None, :] > q_pos


def outside_window(n_queries: int, n_keys: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask, True where a key is ``window`` or more positions before its query (a sliding window:
    each query sees itself and the ``window - 1`` positions before it). Queries are placed as in :func:`causal_mask`."""
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    return torch.arange(n_keys, device=device)[None, :] <= q_pos - window


def _by_key_head(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """``(b, h, t, n)`` -> ``(b, n_kv_heads, h // n_kv_heads * t, n)``: the query heads that share a
    key/value head stacked as rows (the grouping of :func:`repeat_kv`, without copying the keys)."""
    b, h, t, n = x.shape
    return x.reshape(b, n_kv_heads, h // n_kv_heads * t, n)


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot products ``q · k / sqrt(d)`` with the causal mask applied (-inf).

    ``k`` may have fewer heads than ``q`` (grouped-query attention): each key head then serves
    ``q_heads // k_heads`` query heads, the same result as ``q @ repeat_kv(k).T`` without the copy.
    """
    b, h, tq, d = q.shape
    scores = (_by_key_head(q, k.shape[1]) @ k.transpose(-1, -2)).view(b, h, tq, k.shape[-2]) / math.sqrt(d)
    if tq == 1:  # one query, the newest position: every key is in its past, nothing to hide
        return scores
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    return scores.masked_fill(mask, float("-inf"))


def attention_mix(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs @ v``: each query's weighted average of the values, ``(b, h, tq, d)``; like
    :func:`attention_scores`, ``v`` may have fewer heads than ``probs`` (grouped-query attention)."""
    b, h, tq, _ = probs.shape
    return (_by_key_head(probs, v.shape[1]) @ v).view(b, h, tq, v.shape[-1])


class KVCache:
    """The engine's memory: keys and values of every past position, per layer.

    Storage is allocated once for ``capacity`` positions and filled in place, so a
    decode step writes one column instead of copying the whole cache.
    """

    def __init__(self, n_layers: int, capacity: int):
        if capacity < 1:
            raise ValueError("KV cache capacity must be at least 1 position")
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values for ``layer``; return all keys/values so far."""
        start, new = self.lengths[layer], k.shape[-2]
        if start + new > self.capacity:
            raise ValueError(f"KV cache is full: {start} + {new} positions > capacity {self.capacity}")
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            shape = (*k.shape[:-2], self.capacity, k.shape[-1])
            keys = self.keys[layer] = k.new_zeros(shape)
            values = self.values[layer] = v.new_zeros(shape)
        keys[..., start : start + new, :] = k
        values[..., start : start + new, :] = v
        end = self.lengths[layer] = start + new
        return keys[..., :end, :], values[..., :end, :]

    def __len__(self) -> int:
        """Number of positions stored (in layer 0)."""
        return self.lengths[0] if self.lengths else 0

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (used to step back or branch)."""
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot truncate a cache of {len(self)} positions to {length}")
        self.lengths = [length] * len(self.lengths)

    def layer_bytes(self, layer: int) -> int:
        """Bytes of keys and values held for ``layer`` (the filled part)."""
        k = self.keys[layer]
        if k is None:
            return 0
        per_position = k[..., :1, :].numel() * k.element_size()
        return 2 * per_position * self.lengths[layer]

    def nbytes(self) -> int:
        """Bytes of keys and values held in all layers."""
        return sum(self.layer_bytes(i) for i in range(len(self.lengths)))


# --- attention built step by step ------------------------------------------------------------
