"""The translation chapter's checks: right answers pass, each typical mistake gets its own hint."""

from __future__ import annotations

import math

import torch

from cyclelab.checks.translation import check_beam_step, check_cross_attention


def cross_right(q, keys, values):
    return torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ values


def test_cross_attention_right_answers_pass():
    assert check_cross_attention(cross_right)
    assert check_cross_attention(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_cross_attention_mistakes_get_their_hints():
    d = math.sqrt
    cases = {
        "no causal": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        "not divided by sqrt(d)": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
        "wrong axis": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / d(q.shape[-1]), -2) @ v,
        "mixed the KEYS": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / d(q.shape[-1]), -1) @ k,
        "returned the attention weights": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1),
    }
    for words, wrong in cases.items():
        result = check_cross_attention(wrong)
        assert not result and words in result.message, (words, result.message)


def beam_right(scores, log_probs, k):
    total = (scores[:, None] + log_probs).flatten()
    top = torch.topk(total, k)
    vocab = log_probs.shape[1]
    return [(int(i) // vocab, int(i) % vocab, float(s)) for s, i in zip(top.values, top.indices)]


def test_beam_step_right_answer_passes_and_agrees_with_the_engine_search():
    assert check_beam_step(beam_right)
    from cyclelab.core.beam import beam_search

    torch.manual_seed(0)
    table = torch.log_softmax(torch.randn(6, 9) * 3, -1)  # next-token log-probs by last token: a tiny "model"

    def step(rows, tokens):
        return table[tokens % 6]

    result = beam_search(step, 0, 1, num_beams=3, length_penalty=1.0, max_new_tokens=4)
    first = result.steps[0].running  # after one step: the 3 best first tokens of the start beam
    want = beam_right(torch.tensor([0.0, -1e9, -1e9]), table[torch.zeros(3, dtype=torch.long)], 6)
    going = [(t, s) for _, t, s in want if t != 1][:3]
    assert [(ids[0], round(s, 4)) for ids, s in first] == [(t, round(s, 4)) for t, s in going]


def test_beam_step_mistakes_get_their_hints():
    def alone(scores, log_probs, k):
        return beam_right(torch.zeros_like(scores), log_probs, k)

    def per_beam(scores, log_probs, k):
        best = [(b, int(log_probs[b].argmax()), float(scores[b] + log_probs[b].max())) for b in range(len(scores))]
        return sorted(best, key=lambda x: -x[2])[:k] + [best[0]] * max(0, k - len(best))

    def worst_first(scores, log_probs, k):
        return beam_right(scores, log_probs, k)[::-1]

    def no_scores(scores, log_probs, k):
        return [(b, t, 0.0) for b, t, _ in beam_right(scores, log_probs, k)]

    cases = {
        "add each beam's running score": alone,
        "wrong order": worst_first,
        "wrong scores": no_scores,
        "return the": lambda s, lp, k: beam_right(s, lp, k)[:-1],
        "list of (beam, token, score)": lambda s, lp, k: 3,
    }
    for words, wrong in cases.items():
        result = check_beam_step(wrong)
        assert not result and words in result.message, (words, result.message)
    assert not check_beam_step(per_beam)
