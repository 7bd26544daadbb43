"""Exercise checks accept correct answers and reject wrong ones with a hint naming the symptom."""

import torch

from cyclelab.check import Result, check_greedy_step


def correct(logits):
    probs = torch.softmax(logits, -1)
    return int(probs.argmax()), float(probs.max())


def test_a_correct_answer_passes():
    result = check_greedy_step(correct)
    assert result.passed and str(result).startswith("✓")


def test_the_notebook_stub_fails():
    assert not check_greedy_step(lambda logits: (0, 0.0))


def test_argmin_gets_the_argmax_hint():
    result = check_greedy_step(lambda z: (int(z.argmin()), 0.5))
    assert not result and "argmax" in result.message


def test_returning_the_logit_gets_the_softmax_hint():
    result = check_greedy_step(lambda z: (int(z.argmax()), float(z.max())))
    assert not result and "softmax" in result.message


def test_naive_softmax_overflows_and_gets_the_hint():
    def naive(z):
        e = torch.exp(z)
        p = e / e.sum()
        return int(z.argmax()), float(p[z.argmax()])

    result = check_greedy_step(naive)
    assert not result and "maximum" in result.message


def test_partial_normalisation_is_caught():
    def top_two_only(z):
        top = z.topk(2).values
        return int(z.argmax()), float(torch.softmax(top, -1)[0])

    result = check_greedy_step(top_two_only)
    assert not result and "ALL tokens" in result.message


def test_an_exception_is_reported_not_raised():
    def broken(z):
        raise KeyError("oops")

    result = check_greedy_step(broken)
    assert isinstance(result, Result) and not result and "KeyError" in result.message
