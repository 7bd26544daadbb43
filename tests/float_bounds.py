"""Tolerances between two code paths, derived from float32 rounding instead of fixed epsilons (imported by tests).

A dot product of length k summed in float32, in any order, is within ``k * eps32 * sum_i |x_i w_i|`` of the exact
sum (each of the k additions rounds by at most eps32 relative to a partial sum, itself at most ``sum |x_i w_i|``).
The own int8 kernel also holds each input row in 16 bits: an input moves by at most half a step of
``max|x| / 32767``, an output by that times ``sum_i |q_i scale|``.
"""

from __future__ import annotations

import pytest
import torch

EPS32 = torch.finfo(torch.float32).eps


def dot_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``k * eps32 * sum_i |x_i w_ji|`` for ``x @ w.T`` (float64), ``x`` ``(..., k)``, ``w`` ``(n, k)``."""
    return x.shape[-1] * EPS32 * (x.abs().double() @ w.abs().double().T)


def int8_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the own int8 kernel's 16-bit input rows add: ``max|x| / 32767 / 2 * sum_i |w_ji|`` per output."""
    step = x.abs().double().amax(dim=-1, keepdim=True) / 32767
    return step / 2 * w.abs().double().sum(dim=-1)


def unembedding(model: torch.nn.Module) -> torch.Tensor:
    """The output matrix ``(vocab, d)`` as the product uses it (an int8 one dequantized)."""
    head = model.get_output_embeddings()
    return head.weight.detach() if hasattr(head, "weight") else head.q.float() * head.scale[:, None]


def logit_bound(loaded, ids: list[int], int8: bool = False) -> torch.Tensor:
    """How far two float32 runs of the same model (their sums in other orders) may put each logit apart.

    The unembedding alone, ``logits = h @ W.T`` over d inputs, rounds each logit by at most :func:`dot_bound`.
    Every layer before it rounds its own products as much relative to its inputs, and each norm rescales the
    residual stream to the same O(1) size, so each layer adds at most about one such step: we allow
    ``(n_layers + 1)`` of them, for each of the two runs (hence the 2). With int8 weights, each layer's 16-bit
    input rounding (:func:`int8_rounding_bound`) is added the same way.
    """
    model = loaded.model
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # after the final norm
    w, layers = unembedding(model), model.config.num_hidden_layers
    bound = dot_bound(h, w) + (int8_rounding_bound(h, w) if int8 else 0)
    return 2 * (layers + 1) * bound.float()


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float) -> None:
    """Every element of ``got`` within ``bound`` of ``want`` (shapes equal); else the worst excess is reported."""
    assert got.shape == want.shape, (got.shape, want.shape)
    excess = (got.double() - want.double()).abs() - torch.as_tensor(bound, dtype=torch.float64)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} values past the bound, by up to {excess.max().item():.3g}"


@pytest.fixture(params=["own kernels", "torch kernels"])
def own_kernels(request, monkeypatch):
    """Runs a test twice: with the own kernels forced on (``CYCLELAB_KERNELS=own``), and with none compiled."""
    from cyclelab.kernels import build, choice

    if request.param == "own kernels":
        monkeypatch.setattr(choice, "_MODE", ["own"])  # CYCLELAB_KERNELS=own, as read at the first product
        if build.compiled() is None:
            pytest.skip("the own kernels are not built here")
    else:
        monkeypatch.setattr(build, "compiled", lambda: None)
    return request.param == "own kernels"
