"""Chapter 00's check: the greedy WRITEBACK decision, a token and its softmax probability."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, pair


def _cases(seed: int = 0) -> list[torch.Tensor]:
    """Logits to try: random sizes and scales, a spike, large values (overflow), negatives, a tie,
    float64, and a non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(n, generator=gen) * s for n, s in [(5, 1.0), (50, 3.0), (1000, 10.0)]]
    spike = torch.full((10,), -2.0)
    spike[7] = 4.0
    strided = torch.randn(12, 2, generator=gen)[:, 1]
    return cases + [
        spike,
        torch.tensor([1000.0, 999.0, -1000.0]),
        -torch.rand(8, generator=gen) - 5,
        torch.tensor([0.5, 2.0, 2.0, -1.0]),
        torch.randn(30, generator=gen, dtype=torch.float64),
        strided,
    ]


def _greedy_hint(logits: torch.Tensor, token: int, prob: float) -> str | None:
    """None when ``(token, prob)`` is the greedy choice of ``logits``; else the symptom."""
    import math

    probs = torch.softmax(logits.double(), -1)
    best = float(logits.max())
    want_prob = float(probs.max())
    if not 0 <= token < len(logits) or float(logits[token]) != best:
        if 0 <= token < len(logits) and float(logits[token]) == float(logits.min()):
            return "you picked the least likely token: greedy takes the largest logit (argmax)"
        return f"on {len(logits)} logits you chose token {token}, greedy picks {int(logits.argmax())} (the argmax)"
    if prob != prob:  # NaN
        return "the probability is NaN: exp() of large logits overflows — subtract the maximum first"
    if abs(prob - want_prob) <= 1e-4:
        return None
    if abs(prob - best) < 1e-6:
        return "you returned the logit itself: turn logits into probabilities with softmax"
    if abs(prob - math.log(want_prob)) < 1e-4:
        return "you returned the LOG-probability (log_softmax): the probability is softmax(logits)[token]"
    if math.isfinite(best) and best < 700 and abs(prob - math.exp(best)) < 1e-4 * max(1.0, math.exp(best)):
        return "you returned exp(logit) without normalising: divide by the sum of exp over ALL tokens"
    if prob > 1 or prob < 0:
        return f"a probability lies between 0 and 1, got {prob:.4g}: softmax(logits)[token]"
    return (
        f"the probability should be {want_prob:.4f}, got {prob:.4f}: softmax divides exp(logit) by the sum "
        "over ALL tokens"
    )


def _flipped(answer) -> tuple[int, float] | None:
    """The answer read the other way round, ``(probability, token_id)``, or None when it cannot be."""
    if not isinstance(answer, (tuple, list)):
        return None
    try:
        return pair(answer[::-1])
    except Failed:
        return None


@checker
def check_greedy_step(fn: Callable[[torch.Tensor], tuple[int, float]]) -> str:
    """Check ``fn(logits) -> (token_id, probability)``: the greedy choice and its softmax probability."""
    for logits in _cases():
        answer = call(fn, logits.clone() if logits.is_contiguous() else logits)
        token, prob = pair(answer)
        if _greedy_hint(logits, token, prob) is None:
            continue
        flipped = _flipped(answer)
        if flipped is not None and float(answer[1]) == flipped[0] and _greedy_hint(logits, *flipped) is None:
            raise Failed("the pair is the wrong way round: return (token_id, probability)")
        raise Failed(_greedy_hint(logits, token, prob))
    return "correct: greedy decoding takes the argmax, and softmax gives its probability"
