"""LayerNorm and RMSNorm written out (core): the engine's Llama blocks run :func:`rms_norm`.

Chapter 04 (:mod:`cyclelab.lab.forward_by_hand`) teaches both and imports them from here. (For a decode step's one
row the engine runs the same RMSNorm formula in one C call: :func:`cyclelab.kernels.fused_rms_norm`.)
"""

from __future__ import annotations

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last axis: subtract the mean, divide by the standard deviation, then gain and bias.

    ``(x - mean) / sqrt(var + eps) * weight + bias`` with the *biased* variance (divide by n, not
    n - 1), as ``torch.nn.LayerNorm`` computes it.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last axis: divide by the root-mean-square, then the gain. No centring, no bias.

    ``x / sqrt(mean(x²) + eps) * weight``, computed in float32 as Llama does.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # rsqrt: 1 / sqrt
    return weight * normed.to(x.dtype)
