"""Chapter 04/05 exercise checks: correct answers pass, typical mistakes get a hint naming the symptom."""

import math

import pytest
import torch

from cyclelab.check import check_block, check_masked_prediction, check_top_p_filter
from cyclelab.decode import top_p_filter
from cyclelab.forward import gelu_mlp, layer_norm, self_attention


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


def test_block_stub_fails():
    assert not check_block(lambda x, layer: x)


WRONG_BLOCKS = {
    "no attention residual": (lambda x, L: (lambda a: a + gelu_mlp(ln(a, L.ln_2), L.mlp))(
        self_attention(ln(x, L.ln_1), L.attn)), "attention result replaced the stream"),
    "no mlp residual": (lambda x, L: (lambda a: gelu_mlp(ln(a, L.ln_2), L.mlp))(
        x + self_attention(ln(x, L.ln_1), L.attn)), "MLP result replaced the stream"),
    "post-norm": (lambda x, L: (lambda a: ln(a + gelu_mlp(a, L.mlp), L.ln_2))(
        ln(x + self_attention(x, L.attn), L.ln_1)), "after the residual add"),
    "swapped norms": (lambda x, L: (lambda a: a + gelu_mlp(ln(a, L.ln_1), L.mlp))(
        x + self_attention(ln(x, L.ln_2), L.attn)), "swapped"),
    "parallel": (lambda x, L: x + self_attention(ln(x, L.ln_1), L.attn) + gelu_mlp(ln(x, L.ln_2), L.mlp),
                 "BEFORE attention wrote"),
}


@pytest.mark.parametrize("name", WRONG_BLOCKS)
def test_block_mistakes_get_hints(name):
    fn, hint = WRONG_BLOCKS[name]
    result = check_block(fn)
    assert not result and hint in result.message, result.message


def test_block_in_place_update_is_caught():
    def in_place(x, layer):
        x += self_attention(ln(x, layer.ln_1), layer.attn)
        return x + gelu_mlp(ln(x, layer.ln_2), layer.mlp)

    result = check_block(in_place)
    assert not result and "in place" in result.message


def test_block_exception_is_reported():
    result = check_block(lambda x, layer: layer.nope)
    assert not result and "AttributeError" in result.message


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


def test_top_p_stub_fails():
    assert not check_top_p_filter(lambda logits, p: logits)


def _cut(logits, p, rule):
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    cum = probs[order].cumsum(-1)
    keep_sorted = rule(cum, probs[order])
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


WRONG_TOP_P = {
    "one too many": (lambda z, p: _cut(z, p, lambda cum, pr: torch.cat([torch.tensor([True, True]), (cum < p)[:-2]])),
                     "after the cumulative probability passed p"),
    "crossing token dropped": (lambda z, p: _cut(z, p, lambda cum, pr: cum <= p), "the token that makes the total reach p"),
    "probabilities returned": (lambda z, p: torch.softmax(good_top_p(z, p), -1).masked_fill(
        torch.isneginf(good_top_p(z, p)), -math.inf), "probabilities"),
    "zeros instead of -inf": (lambda z, p: torch.where(torch.isfinite(good_top_p(z, p)), z, torch.zeros_like(z)),
                              "-inf"),
    "sorted order": (lambda z, p: (lambda s: s.masked_fill(
        (torch.softmax(s, -1).cumsum(-1) - torch.softmax(s, -1)) >= p, -math.inf))(torch.sort(z, descending=True).values),
        "sorted order"),
    "ascending sort": (lambda z, p: (lambda pr: (lambda order: z.masked_fill(torch.zeros_like(pr, dtype=torch.bool).scatter(
        -1, order, pr[order].cumsum(-1) > p), -math.inf))(torch.argsort(pr)))(torch.softmax(z, -1)),
        "less likely token"),
}


@pytest.mark.parametrize("name", WRONG_TOP_P)
def test_top_p_mistakes_get_hints(name):
    fn, hint = WRONG_TOP_P[name]
    result = check_top_p_filter(fn)
    assert not result and hint in result.message, result.message


def test_top_p_dropping_the_best_token_is_named():
    def strict(z, p):  # keeps only tokens whose cumulative mass stays within p: nothing when the best is > p
        return _cut(z, p, lambda cum, pr: cum <= p) if float(torch.softmax(z, -1).max()) <= p else torch.full_like(z, -math.inf)

    result = check_top_p_filter(lambda z, p: good_top_p(z, p) if p != 0.5 else strict(z, p))
    assert not result and "most likely token was dropped" in result.message, result.message


def test_top_p_in_place_is_caught():
    def in_place(z, p):
        kept = good_top_p(z, p)
        z.copy_(kept)
        return kept

    result = check_top_p_filter(in_place)
    assert not result and "in place" in result.message


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


def test_masked_stub_fails():
    assert not check_masked_prediction(lambda model, ids, position, mask_id: (0, 0.0))


def test_masked_without_mask_is_named():
    def unmasked(model, ids, position, mask_id):
        return good_masked(model, ids, position, ids[position])

    result = check_masked_prediction(unmasked)
    assert not result and "saw the answer" in result.message, result.message


def test_masked_shifted_like_a_causal_lm_is_named():
    def shifted(model, ids, position, mask_id):
        masked = list(ids)
        masked[position] = mask_id
        at = max(position - 1, 0) if position else 1
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([masked])).logits[0, at], -1)
        return int(probs.argmax()), float(probs.max())

    result = check_masked_prediction(shifted)
    assert not result and "AT the mask" in result.message, result.message


def test_masked_logit_and_mutation_are_named():
    def logit(model, ids, position, mask_id):
        masked = list(ids)
        masked[position] = mask_id
        with torch.no_grad():
            z = model(torch.tensor([masked])).logits[0, position]
        return int(z.argmax()), float(z.max())

    result = check_masked_prediction(logit)
    assert not result and "logit" in result.message

    def mutate(model, ids, position, mask_id):
        ids[position] = mask_id
        return good_masked(model, ids, position, mask_id)

    result = check_masked_prediction(mutate)
    assert not result and "changed the caller" in result.message
