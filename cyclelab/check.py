"""Exercise checks that hint: a learner's function is tried on random and edge cases, and a
failure names the symptom ("probabilities do not sum to 1") rather than just failing.

Each checker returns a :class:`Result`; displaying it in a notebook prints ✓ or ✗ and the hint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Result:
    """Outcome of a check: whether it passed and what to tell the learner."""

    passed: bool
    message: str

    def __str__(self) -> str:
        return f"{'✓' if self.passed else '✗'} {self.message}"

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython display
        printer.text(str(self))

    def __bool__(self) -> bool:
        return self.passed


def _cases(seed: int = 0) -> list[torch.Tensor]:
    """Logits to try: random sizes and scales, a tie-free spike, large values (overflow), negatives."""
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(n, generator=gen) * s for n, s in [(5, 1.0), (50, 3.0), (1000, 10.0)]]
    spike = torch.full((10,), -2.0)
    spike[7] = 4.0
    return cases + [spike, torch.tensor([1000.0, 999.0, -1000.0]), -torch.rand(8, generator=gen) - 5]


def check_greedy_step(fn: Callable[[torch.Tensor], tuple[int, float]]) -> Result:
    """Check ``fn(logits) -> (token_id, probability)``: the greedy choice and its softmax probability."""
    for logits in _cases():
        try:
            token, prob = fn(logits.clone())
        except Exception as err:  # a learner's bug, reported instead of raised
            return Result(False, f"your function raised {type(err).__name__}: {err}")
        token, prob = int(token), float(prob)
        want_token = int(torch.argmax(logits))
        want_prob = float(torch.softmax(logits, -1)[want_token])
        if token != want_token:
            if token == int(torch.argmin(logits)):
                return Result(False, "you picked the least likely token: greedy takes the largest logit (argmax)")
            return Result(False, f"on {len(logits)} logits you chose token {token}, greedy picks {want_token} (the argmax)")
        if prob != prob:  # NaN
            return Result(False, "the probability is NaN: exp() of large logits overflows — subtract the maximum first")
        if abs(prob - float(logits[want_token])) < 1e-6 and abs(prob - want_prob) > 1e-4:
            return Result(False, "you returned the logit itself: turn logits into probabilities with softmax")
        if abs(prob - want_prob) > 1e-4:
            return Result(False, f"the probability should be {want_prob:.4f}, got {prob:.4f}: "
                                 "softmax divides exp(logit) by the sum over ALL tokens")
    return Result(True, "correct: greedy decoding takes the argmax, and softmax gives its probability")
