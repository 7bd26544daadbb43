"""Attribution against captum (IntegratedGradients, InputXGradient, Occlusion) on tiny, and by hand."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Occlusion

from cyclelab.lab.attribution import (
    embeddings_of,
    gradient_x_input,
    integrated_gradients,
    occlusion,
    shaded_text,
    target_prob,
)

PROMPT = "KING RICHARD:\nNow, my lord of"


@pytest.fixture(scope="module")
def setup(tiny):
    ids = tiny.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        target = int(tiny.model(torch.tensor([ids])).logits[0, -1].argmax())
    return target_prob(tiny, target), embeddings_of(tiny, ids)


@pytest.mark.parametrize("steps", [8, 16])
def test_integrated_gradients_match_captum(setup, steps):
    f, x = setup
    theirs = IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method="riemann_middle")
    assert torch.allclose(integrated_gradients(f, x, steps=steps), theirs[0], atol=1e-6, rtol=1e-4)


def test_integrated_gradients_add_up_to_the_change_of_the_output(setup):
    f, x = setup  # completeness: the attributions sum to f(x) - f(baseline) as the steps grow
    with torch.no_grad():
        change = float(f(x)[0] - f(torch.zeros_like(x))[0])
    assert float(integrated_gradients(f, x, steps=64).sum()) == pytest.approx(change, rel=0.05, abs=1e-4)


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_gradient_x_input_matches_captum(setup):
    f, x = setup
    assert torch.allclose(gradient_x_input(f, x), InputXGradient(f).attribute(x)[0].sum(-1), atol=1e-7, rtol=1e-5)


def test_occlusion_matches_captum(setup):
    f, x = setup  # a window of one whole token; captum gives each of its values the output's fall
    theirs = Occlusion(f).attribute(x, sliding_window_shapes=(1, x.shape[-1]), baselines=0)
    assert torch.allclose(occlusion(f, x), theirs[0, :, 0], atol=1e-6)


def test_a_linear_function_is_attributed_exactly():
    w = torch.tensor([[[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]]])

    def f(e):
        return (e * w).sum((1, 2))  # f(x) = w . x: every method gives w_i . x_i per position

    x = torch.tensor([[[1.0, 1.0], [2.0, -4.0], [0.0, 1.0]]])
    by_hand = torch.tensor([-1.0, 1.0, 1.0])
    assert torch.allclose(occlusion(f, x), by_hand)
    assert torch.allclose(gradient_x_input(f, x), by_hand)
    assert torch.allclose(integrated_gradients(f, x, steps=3).sum(-1), by_hand)


def test_shaded_text_escapes_tokens_and_shades_by_size():
    out = shaded_text(["<b>", " a"], [2.0, -1.0])
    assert "&lt;b&gt;" in out and "<b>" not in out.replace("<b style", "")
    assert "rgba(214,39,40,1.00)" in out and "rgba(31,119,180,0.50)" in out and "<script" not in out


BAD = [
    ("2-d input", lambda f, x: integrated_gradients(f, x[0]), ValueError, r"ONE sequence of embeddings"),
    ("a batch of two", lambda f, x: occlusion(f, x.repeat(2, 1, 1)), ValueError, r"\(1, positions, width\)"),
    ("integer input", lambda f, x: gradient_x_input(f, x.long()), ValueError, r"float tensor"),
    ("zero steps", lambda f, x: integrated_gradients(f, x, steps=0), ValueError, r"steps must be a positive integer"),
    (
        "baseline of another shape",
        lambda f, x: integrated_gradients(f, x, torch.zeros(1, 2, x.shape[-1])),
        ValueError,
        r"baseline's shape .* must equal the input's",
    ),
    ("scores and tokens differ", lambda f, x: shaded_text(["a", "b"], [1.0]), ValueError, r"2 tokens but 1 scores"),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_explained(setup, call, error, message):
    with pytest.raises(error, match=message):
        call(*setup)


LOADED_BAD = [
    (
        "target out of range",
        lambda tiny: target_prob(tiny, 10**6),
        ValueError,
        r"target must be one token id in 0\.\.4095",
    ),
    ("target a string", lambda tiny: target_prob(tiny, " York"), ValueError, r"one token id"),
    ("no ids", lambda tiny: embeddings_of(tiny, []), ValueError, r"non-empty list of token ids"),
    ("id out of range", lambda tiny: embeddings_of(tiny, [1, 5000]), ValueError, r"token ids in 0\.\.4095"),
    ("not a Loaded", lambda tiny: embeddings_of(tiny.model, [1]), TypeError, r"give a Loaded model"),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in LOADED_BAD], ids=[row[0] for row in LOADED_BAD])
def test_bad_model_arguments_are_explained(tiny, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny)
