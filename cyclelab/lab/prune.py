"""Magnitude pruning: set the smallest weights of the MLP matrices to zero.

For a target ``sparsity`` s, each MLP matrix keeps its ``n - round(s × n)`` weights of largest
magnitude and the rest become exact zeros (unstructured pruning, one matrix at a time). The
matrices keep their dense shape: a dense kernel still reads and multiplies every zero
(chapter 07, section 6), so pruning alone saves no time; it tells how many weights the model
can lose before its perplexity notices.
"""

from __future__ import annotations

import copy

import torch

from cyclelab.lab.quantize import _matrices


def mlp_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every Linear/Conv1D inside an MLP block (``...mlp...`` in its name), by name."""
    mlp = {name for name, _ in model.named_modules() if name.split(".")[-1] == "mlp"}
    kinds = {id(m) for m, _ in _matrices(model)}
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if id(m) in kinds and name.rsplit(".", 1)[0] in mlp
    }


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where ``w`` keeps its weight: all but the ``round(sparsity × n)`` smallest by magnitude."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is the share of weights set to zero, a number in [0, 1), got {sparsity!r}")
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    drop = round(sparsity * w.numel())
    if drop:
        mask[torch.topk(w.detach().abs().flatten(), drop, largest=False).indices] = False
    return mask.reshape(w.shape)


def prune_mlp(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """A copy of ``model`` whose MLP matrices each have ``sparsity`` of their weights (the smallest) set to 0."""
    model = copy.deepcopy(model)
    matrices = mlp_matrices(model)
    if not matrices:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv1D layer inside a module named 'mlp' to prune")
    with torch.no_grad():
        for w in matrices.values():
            w.mul_(magnitude_mask(w, sparsity))
    return model


def sparsity_of(w: torch.Tensor) -> float:
    """Share of exact zeros in ``w``."""
    return float((w == 0).sum()) / w.numel()
