"""Attention and the KV cache: the pieces the engine is built from.

Shapes follow one convention everywhere: ``(batch, heads, positions, head_dim)``.
"""

from __future__ import annotations

import math

import torch


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(batch, positions, n_heads * d)`` -> ``(batch, n_heads, positions, d)``."""
    b, t, width = x.shape
    if width % n_heads:
        raise ValueError(f"width {width} is not divisible by {n_heads} heads")
    return x.view(b, t, n_heads, width // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, positions, d)`` -> ``(batch, positions, heads * d)``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: share each key/value head among ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


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


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot products ``q · k / sqrt(d)`` with the causal mask applied (-inf)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    return scores.masked_fill(mask, float("-inf"))


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
        if self.keys[layer] is None:
            shape = (*k.shape[:-2], self.capacity, k.shape[-1])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        self.keys[layer][..., start : start + new, :] = k
        self.values[layer][..., start : start + new, :] = v
        self.lengths[layer] = start + new
        end = self.lengths[layer]
        return self.keys[layer][..., :end, :], self.values[layer][..., :end, :]

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
