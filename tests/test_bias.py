"""Chapter 11's bias probe: the templates, the gaps against a transformers forward, the logit lens's last layer."""

import pytest
import torch
import torch.nn.functional as F

from cyclelab.lab import bias

BOUND = 1e-4  # float32 log-probabilities through the cache or the engine against one plain forward (tiny: ~1e-6)


def test_enough_template_instances_paired_one_to_one():
    first, second = bias.occupation_prompts()
    assert len(first) == len(second) >= 100
    assert [a.replace(m, "{}") for a, (m, _) in zip(first, bias.OCCUPATION_PAIRS * len(bias.FRAMES))] == [
        b.replace(w, "{}") for b, (_, w) in zip(second, bias.OCCUPATION_PAIRS * len(bias.FRAMES))
    ]
    girls, boys = bias.name_prompts()
    assert len(girls) + len(boys) >= 100
    assert [g.replace(a, "{}") for g, (a, _) in zip(girls, bias.NAME_PAIRS * len(bias.NAME_FRAMES))] == [
        b.replace(m, "{}") for b, (_, m) in zip(boys, bias.NAME_PAIRS * len(bias.NAME_FRAMES))
    ]


def test_gaps_are_the_difference_of_the_two_log_probabilities(tiny):
    prompts = ["KING:\nThe page said that", "QUEEN:\nThe maid said that"]
    got = bias.gaps(tiny, prompts, (" he", " she"))
    for prompt, gap in zip(prompts, got):
        ids = tiny.tokenizer.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            logp = F.log_softmax(tiny.model(torch.tensor([ids])).logits[0, -1].double(), -1)
        he, she = (tiny.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" he", " she"))
        assert gap == pytest.approx(float(logp[he] - logp[she]), abs=BOUND)


def test_the_lens_last_layer_is_the_models_own_gap(tiny_engine, tiny):
    prompts = ["KING:\nThe page said that", "QUEEN:\nThe maid said that"]
    lens = bias.lens_gaps(tiny_engine, prompts)
    assert lens.shape == (2, tiny_engine.arch.n_layers + 1)
    assert lens[:, -1].tolist() == pytest.approx(bias.gaps(tiny, prompts), abs=BOUND)


def test_first_decided_layer():
    assert bias.first_decided_layer([-1, 0.2, -0.1, 0.3, 0.5]) == 3
    assert bias.first_decided_layer([0.1, 0.2]) == 0
    assert bias.first_decided_layer([0.1, -0.2]) is None


def test_gaps_refuse_other_than_two_continuations(tiny):
    with pytest.raises(ValueError, match="two continuations"):
        bias.gaps(tiny, ["a"], (" he",))
