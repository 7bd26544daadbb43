"""Checks for translation (an encoder–decoder): one cross-attention step, and one beam-search step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, close, name_the_mistake, tensor_answer

# --- one cross-attention step ------------------------------------------------------------------------


def _cross_variants(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The right answer (``"ok"``) and the typical wrong ones, each named by its symptom (float64)."""
    d, s = q.shape[-1], keys.shape[-2]
    raw = q @ keys.transpose(-1, -2)
    scaled = raw / math.sqrt(d)
    causal = torch.ones(q.shape[-2], s, dtype=torch.bool).triu(1)  # as if the source had a future
    return {
        "ok": torch.softmax(scaled, -1) @ values,
        "you masked the source as if it had a future: cross-attention reads EVERY source position (no causal "
        "mask; the encoder ran over the whole source before the first decoder cycle)": torch.softmax(
            scaled.masked_fill(causal, float("-inf")), -1
        )
        @ values,
        "scores are not divided by sqrt(d): the softmax is too sharp": torch.softmax(raw, -1) @ values,
        "softmax over the wrong axis: each query's weights over the SOURCE positions (dim=-1) must sum to 1": torch.softmax(
            scaled, -2
        )
        @ values,
        "you mixed the KEYS: the output is the weights times the encoder memory's VALUES": torch.softmax(scaled, -1)
        @ keys,
    }


def _cross_cases(seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, keys, values): one or two decoder positions against sources of several lengths, float64 too."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [((1, 1, 8), (1, 5, 8)), ((4, 1, 16), (4, 9, 16)), ((2, 3, 4), (2, 6, 4)), ((3, 1, 8), (3, 1, 8))]
    cases = [
        (torch.randn(*qs, generator=gen) * 2, torch.randn(*ks, generator=gen) * 2, torch.randn(*ks, generator=gen))
        for qs, ks in shapes
    ]
    cases.append(tuple(torch.randn(2, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3)))
    return cases


@checker
def check_cross_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """Check ``fn(q, keys, values) -> output``: queries ``(heads, positions, d)`` from the decoder, keys and
    values ``(heads, source, d)`` read from the encoder memory; ``softmax(q keysᵀ / sqrt(d)) @ values``."""
    for q, keys, values in _cross_cases():
        out = tensor_answer(fn, q, keys, values, noun="the output tensor (weights @ values)")
        want_shape = (*q.shape[:-1], values.shape[-1])
        if tuple(out.shape) != want_shape:
            if tuple(out.shape) == (*q.shape[:-1], keys.shape[-2]):
                raise Failed("you returned the attention weights: multiply them by the values (weights @ values)")
            raise Failed(f"for q {tuple(q.shape)} and keys {tuple(keys.shape)} the output has shape {want_shape}")
        variants = _cross_variants(q.double(), keys.double(), values.double())
        want = variants.pop("ok")
        if close(out, want):
            continue
        name_the_mistake(out, variants)
        raise Failed(
            f"the output differs from cross-attention (largest difference {float((out - want).abs().max()):.3g})"
        )
    return "correct: the decoder's query against every source key, / sqrt(d), softmax, mix of the memory's values"


# --- one beam-search step ----------------------------------------------------------------------------


def beam_step_reference(scores: torch.Tensor, log_probs: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` best continuations ``(beam, token, summed log-probability)`` over every beam and token."""
    total = (scores[:, None] + log_probs).reshape(-1)
    top = torch.topk(total, k)
    vocab = log_probs.shape[-1]
    return [(int(i) // vocab, int(i) % vocab, float(s)) for s, i in zip(top.values, top.indices)]


def _beam_cases(seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Running scores and next-token log-probabilities for 2 to 4 beams, vocabularies of 6 to 40."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for beams, vocab, k in [(2, 6, 2), (3, 10, 3), (4, 40, 4), (3, 12, 6)]:
        log_probs = torch.log_softmax(torch.randn(beams, vocab, generator=gen) * 2, -1)
        scores = -torch.rand(beams, generator=gen) * 4
        cases.append((scores, log_probs, k))
    lopsided = torch.log_softmax(torch.randn(2, 8, generator=gen), -1)
    cases.append((torch.tensor([0.0, -6.0]), lopsided, 3))  # the first beam's continuations should win
    return cases


def _read(answer, k: int) -> list[tuple[int, int, float]]:
    """The learner's answer as ``k`` triples of Python numbers, or a Failed saying what came back."""
    try:
        triples = [(int(b), int(t), float(s)) for b, t, s in answer]
    except (TypeError, ValueError):
        raise Failed(f"return a list of (beam, token, score) triples, got {type(answer).__name__}") from None
    if len(triples) != k:
        raise Failed(f"return the {k} best continuations (k={k}), got {len(triples)}")
    return triples


@checker
def check_beam_step(fn: Callable[[torch.Tensor, torch.Tensor, int], list]) -> str:
    """Check ``fn(scores, log_probs, k) -> [(beam, token, score), ...]``: the ``k`` best continuations, best
    first, scored by the beam's running log-probability plus the token's."""
    for scores, log_probs, k in _beam_cases():
        got = _read(call(fn, scores.clone(), log_probs.clone(), k), k)
        want = beam_step_reference(scores, log_probs, k)
        if [(b, t) for b, t, _ in got] == [(b, t) for b, t, _ in want]:
            if not all(abs(s - w) < 1e-4 for (_, _, s), (_, _, w) in zip(got, want)):
                if all(abs(s - float(log_probs[b, t])) < 1e-4 for b, t, s in got):
                    raise Failed("your scores are the tokens' own log-probs: add each beam's running score first")
                raise Failed(
                    "the right continuations, wrong scores: a score is the beam's score + the token's log-prob"
                )
            continue
        alone = beam_step_reference(torch.zeros_like(scores), log_probs, k)
        if [(b, t) for b, t, _ in got] == [(b, t) for b, t, _ in alone]:
            raise Failed("you ranked tokens by their own log-prob: add each beam's running score first")
        if sorted((b, t) for b, t, _ in got) == sorted((b, t) for b, t, _ in want):
            raise Failed("the right continuations in the wrong order: best (highest score) first")
        per_beam = [(b, int(log_probs[b].argmax())) for b in range(len(scores))]
        if {(b, t) for b, t, _ in got} <= set(per_beam):
            raise Failed(
                "you kept each beam's best token: rank ALL beams × tokens together (one beam may keep several)"
            )
        swapped = [(t % len(scores), b) for b, t, _ in want]
        if [(b, t) for b, t, _ in got] == swapped:
            raise Failed("beam and token are mixed up: on the flat index i, beam = i // vocab, token = i % vocab")
        raise Failed(f"on {len(scores)} beams the best {k} continuations are {[(b, t) for b, t, _ in want]}")
    return "correct: every beam × token scored by its summed log-probability, the best k kept, best first"


__all__ = ["beam_step_reference", "check_beam_step", "check_cross_attention"]
