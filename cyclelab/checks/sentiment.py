"""Chapter 11's check: a label scored by its whole log-probability."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker
from cyclelab.checks.recipes import made

_LOADED: dict = {}

#: (prompt, label) cases on ``tiny``: labels of one, two and several tokens
CASES = (
    ("ROMEO:\nO my sweet", " love"),
    ("JULIET:\nWhat's in a", " name, that"),
    ("HAMLET:\nTo be, or not", " to be, that is the question"),
)


def _tiny():
    if "tiny" not in _LOADED:
        from cyclelab.loading.loader import load

        _LOADED["tiny"] = made(load("tiny"), "cyclelab.loading.loader:load", "tiny")
    return _LOADED["tiny"]


def _token_logprobs(loaded, prompt: str, label: str) -> torch.Tensor:
    """log P of each of the label's tokens after the prompt's tokens (one transformers forward)."""
    tok = loaded.tokenizer
    p, lab = tok.encode(prompt, add_special_tokens=False), tok.encode(label, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([p + lab])).logits[0].double(), -1)
    return logp[torch.arange(len(p) - 1, len(p) + len(lab) - 1), lab]


def _slips(loaded, prompt: str, label: str) -> list[tuple[str, float]]:
    tok = loaded.tokenizer
    p, lab = tok.encode(prompt, add_special_tokens=False), tok.encode(label, add_special_tokens=False)
    per = _token_logprobs(loaded, prompt, label)
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([p + lab])).logits[0].double(), -1)
    shifted = float(logp[torch.arange(len(p), len(p) + len(lab)), lab].sum())  # each token read at its own position
    return [
        ("you scored only the label's FIRST token: add the log-probabilities of all its tokens", float(per[0])),
        (
            "that is the MEAN over the label's tokens: the log-probability of the whole label is their SUM",
            float(per.mean()),
        ),
        (
            "that is a probability: return the log-probability (the sum of the tokens' log-probabilities)",
            float(per.sum().exp()),
        ),
        (
            "off by one position: the logits at position i predict token i + 1, so the label's token j is read at "
            "len(prompt_ids) - 1 + j",
            shifted,
        ),
    ]


def _near(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-4 + 1e-4 * abs(want)


@checker
def check_label_logprob(fn: Callable, loaded=None) -> str:
    """Check ``fn(loaded, prompt, label) -> float``: log P(label | prompt), the sum over the label's tokens
    (tokenized on its own, appended to the prompt's tokens) of each token's log-probability; tried on
    ``tiny`` (default) with labels of one to several tokens, against one ``transformers`` forward."""
    loaded = loaded if loaded is not None else _tiny()
    answers = []
    for prompt, label in CASES:
        answer = call(fn, loaded, prompt, label, case=f"label {label!r}")
        try:
            answers.append(float(answer))
        except (TypeError, ValueError, RuntimeError):
            raise Failed(f"return the log-probability as one number, got {answer!r:.80}")
    wants = [float(_token_logprobs(loaded, p, lab).sum()) for p, lab in CASES]
    if all(_near(g, w) for g, w in zip(answers, wants)):
        return "correct: the label's tokens each scored given the ones before them, and summed"
    slips = [_slips(loaded, p, lab) for p, lab in CASES]
    for i, (hint, _) in enumerate(slips[0]):
        if all(_near(g, s[i][1]) for g, s, (_, lab) in zip(answers, slips, CASES)):
            raise Failed(hint)
    bad = next(i for i, (g, w) in enumerate(zip(answers, wants)) if not _near(g, w))
    raise Failed(f"label {CASES[bad][1]!r}: log P should be {wants[bad]:.6g}, got {answers[bad]:.6g}")
