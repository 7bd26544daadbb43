"""Chapter 04/05 exercise checks: correct answers pass, typical mistakes get a hint naming the symptom."""

import math

import pytest
import torch

from cyclelab.checks import check_block, check_masked_prediction, check_top_p_filter
from cyclelab.core.sampling import top_p_filter
from cyclelab.lab.forward_by_hand import gelu_mlp, layer_norm, self_attention

# --- check_block --------------------------------------------------------------------------------


def ln(x, norm):
    return layer_norm(x, norm.weight, norm.bias, norm.eps)


def good_block(x, layer):
    x = x + self_attention(ln(x, layer.ln_1), layer.attn)
    return x + gelu_mlp(ln(x, layer.ln_2), layer.mlp)


def test_block_solution_passes_on_random_and_tiny(tiny):
    assert check_block(good_block)
    result = check_block(good_block, tiny.model)
    assert result and str(result).startswith("✓")


def transformers_block(x, layer):
    """transformers' own GPT2Block, given the additive causal mask (-inf above the diagonal) its model builds."""
    n = x.shape[1]
    return layer(x, attention_mask=torch.full((n, n), float("-inf")).triu(1)[None, None])


def layer_inputs_and_outputs(model, ids):
    """(input, output) of every GPT-2 block as the full transformers model ran them (forward hooks)."""
    seen = []

    def record(module, args, kwargs, out):
        seen.append((args[0] if args else kwargs["hidden_states"], out))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.transformer.h]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_block_solution_equals_transformers_layer_outputs(tiny):
    """The reference is transformers itself: each block's output in the model's own forward pass,
    not a block assembled from cyclelab's pieces (as check_block's expected answer is)."""
    seen = layer_inputs_and_outputs(tiny.model, tiny.tokenizer("ROMEO: But soft, what light")["input_ids"])
    assert len(seen) == len(tiny.model.transformer.h)
    with torch.no_grad():
        for layer, (given, out) in zip(tiny.model.transformer.h, seen):
            torch.testing.assert_close(good_block(given, layer), out, atol=1e-4, rtol=0)


def test_check_block_accepts_transformers_own_block(tiny):
    """check_block's expected answer agrees with transformers' GPT2Block on the random model and tiny."""
    result = check_block(transformers_block, tiny.model)
    assert result and str(result).startswith("✓"), result.message


# --- check_top_p_filter -------------------------------------------------------------------------


def good_top_p(logits, p):
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    before = probs[order].cumsum(-1) - probs[order]  # mass of the more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def test_top_p_solutions_pass():
    assert check_top_p_filter(good_top_p)
    assert check_top_p_filter(top_p_filter)  # the package's own, transformers-style


# --- check_masked_prediction ----------------------------------------------------------------------


def good_masked(model, ids, position, mask_id):
    masked = list(ids)
    masked[position] = mask_id
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([masked])).logits[0, position], -1)
    return int(probs.argmax()), float(probs.max())


@pytest.fixture(scope="module")
def tiny_mlm():
    from cyclelab import load

    return load("tiny-mlm")


def test_masked_solution_passes(tiny_mlm):
    assert check_masked_prediction(good_masked)
    assert check_masked_prediction(good_masked, tiny_mlm)


def test_the_checks_name_a_non_causal_block_on_tiny(tiny):
    """On the chapter's real model (eager attention), transformers' modules called without a mask are named."""

    def maskless(x, layer):
        x = x + layer.attn(layer.ln_1(x))[0]
        return x + layer.mlp(layer.ln_2(x))

    result = check_block(maskless, tiny.model)
    assert not result and "not causal" in result.message, result.message
