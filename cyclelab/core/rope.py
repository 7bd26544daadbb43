"""Rotary position embedding as the engine runs it (core): angles, and the rotation of each pair.

Chapter 02 (:mod:`cyclelab.lab.embedding`) teaches RoPE and imports these from here. (For a decode step's one
position the engine turns the pairs in one C call, to the same bits: :func:`cyclelab.kernels.fused_rope`.)
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
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
