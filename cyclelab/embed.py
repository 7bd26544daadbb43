"""Embeddings and positions: the FETCH stage turns token ids into vectors.

Two ways a model knows where a token is: GPT-2 adds a *learned* position vector;
Llama-family models *rotate* queries and keys by an angle that grows with the
position (rotary position embedding, RoPE).
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE frequencies: pair ``i`` of a head turns by ``theta ** (-2i / head_dim)`` per position."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, not {head_dim}")
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotation angles, shape ``(len(positions), head_dim)``."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of the last dimension and negate the new first half."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + d/2) pair of ``x`` (…, positions, head_dim) by its angle."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def sentence_embeddings(loaded, sentences: list[str]) -> torch.Tensor:
    """Unit-length sentence vectors from an encoder (e.g. ``minilm``): the mean of its
    last hidden states over real (non-padding) tokens, as all-MiniLM-L6-v2 was trained."""
    if isinstance(sentences, str) or not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError("give a non-empty list of non-empty sentences")
    batch = loaded.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)
