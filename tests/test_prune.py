"""Magnitude pruning against torch's own ``l1_unstructured`` pruning and hand-made matrices."""

import pytest
import torch
from torch.nn.utils import prune

from cyclelab.lab.prune import magnitude_mask, mlp_matrices, prune_mlp, sparsity_of


def test_mask_by_hand():
    w = torch.tensor([[0.5, -0.1, 2.0], [-3.0, 0.2, 0.05]])
    assert magnitude_mask(w, 0.5).tolist() == [[True, False, True], [True, False, False]]
    assert magnitude_mask(w, 0.0).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_mask_equals_torch_l1_unstructured(sparsity):
    layer = torch.nn.Linear(48, 32)
    torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(3))
    prune.l1_unstructured(layer, "weight", amount=sparsity)
    assert torch.equal(magnitude_mask(layer.weight_orig, sparsity), layer.weight_mask.bool())


def test_tiny_mlp_names(tiny):
    names = list(mlp_matrices(tiny.model))
    assert len(names) == 2 * tiny.model.config.n_layer
    assert all(".mlp.c_fc." in n or ".mlp.c_proj." in n for n in names)


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_pruned_tiny_reaches_the_target_and_keeps_the_largest(tiny, sparsity):
    pruned = prune_mlp(tiny.model, sparsity)
    before, after = mlp_matrices(tiny.model), mlp_matrices(pruned)
    for name, w in before.items():
        p = after[name]
        assert sparsity_of(p) == pytest.approx(round(sparsity * w.numel()) / w.numel())
        kept, dropped = w[p != 0].abs(), w[p == 0].abs()
        assert kept.min() >= dropped.max()  # every kept weight outweighs every dropped one
        assert torch.equal(p[p != 0], w[p != 0])  # kept weights unchanged
    other = dict(pruned.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(other, dict(tiny.model.named_parameters())["transformer.h.0.attn.c_attn.weight"])
    assert sparsity_of(before[next(iter(before))]) < 0.01  # the original model is untouched


@pytest.mark.parametrize(
    "model, sparsity, error, message",
    [
        ("tiny", 1.0, ValueError, r"sparsity .* in \[0, 1\)"),
        ("tiny", -0.1, ValueError, r"sparsity .* in \[0, 1\)"),
        ("tiny", "half", ValueError, r"sparsity .* got 'half'"),
        ("tiny", True, ValueError, r"sparsity .* got True"),
        ("no-mlp", 0.5, ValueError, r"no Linear/Conv1D layer inside a module named 'mlp'"),
    ],
    ids=["all-pruned", "negative", "string", "bool", "model-without-mlp"],
)
def test_bad_input(tiny, model, sparsity, error, message):
    target = tiny.model if model == "tiny" else torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(error, match=message):
        prune_mlp(target, sparsity)
