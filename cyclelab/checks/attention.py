"""Chapter 03's checks: causal attention, and one decode step with a KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, checker, close, name_the_mistake, tensor_answer


def _attention_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The right answer (``"ok"``) and the typical wrong ones, each named by its symptom."""
    import math

    d, t = q.shape[-1], q.shape[-2]
    raw = q @ k.transpose(-1, -2)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    neg = float("-inf")

    def mix(scores, dim=-1):
        return torch.softmax(scores, dim=dim) @ v

    scaled = raw / math.sqrt(d)
    probs = torch.softmax(scaled, -1).masked_fill(future, 0.0)
    return {
        "ok": mix(scaled.masked_fill(future, neg)),
        "row 0 attends to future tokens: set the scores of keys j > i to -inf before the softmax (a causal mask)": mix(
            scaled
        ),
        "scores are not divided by sqrt(d): the softmax is too sharp": mix(raw.masked_fill(future, neg)),
        "scores are divided by d instead of sqrt(d)": mix((raw / d).masked_fill(future, neg)),
        "softmax over the wrong axis: each query's weights over the KEYS (the last axis, dim=-1) must sum to 1": mix(
            scaled.masked_fill(future, neg), dim=-2
        ),
        "the mask is flipped: a token reads itself and the PAST (keys j <= i), not the future": mix(
            scaled.masked_fill(future.T, neg)
        ),
        "a row's weights do not sum to 1: mask with -inf BEFORE the softmax instead of zeroing after it": probs @ v,
        "scores are not divided by sqrt(d), and the future is not masked": mix(raw),
        "you mixed the KEYS: the output is the weights times the VALUES, probs @ v": torch.softmax(
            scaled.masked_fill(future, neg), -1
        )
        @ k,
        "the scores are transposed (k @ qᵀ): row i must hold query i's scores against every key, q @ kᵀ": mix(
            (k @ q.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, neg)
        ),
    }


def _qkv_cases(seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) of several shapes (heads and batch of different sizes), one set in float64 and one
    set of non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)
    cases = [
        tuple(torch.randn(*shape, generator=gen) * 2 for _ in range(3))
        for shape in [(1, 1, 5, 8), (2, 3, 7, 16), (6, 4), (1, 2, 1, 4)]
    ]
    cases.append(tuple(torch.randn(3, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3)))
    cases.append(tuple(torch.randn(2, 4, 8, 5, generator=gen).transpose(-1, -2) for _ in range(3)))
    return cases


@checker
def check_causal_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """Check ``fn(q, k, v) -> output``: causal scaled dot-product attention over ``(…, T, d)``
    tensors, returning ``softmax(mask(q kᵀ / sqrt(d))) @ v`` of shape ``(…, T, d)``."""
    for q, k, v in _qkv_cases():
        shape, t = tuple(q.shape), q.shape[-2]
        out = tensor_answer(fn, q, k, v, noun="the output tensor probs @ v")
        if out.shape != q.shape:
            if out.shape == (*shape[:-1], t):
                raise Failed("you returned the attention weights: multiply them by v (probs @ v)")
            raise Failed(f"for q, k, v of shape {shape} the output should have shape {shape}, got {tuple(out.shape)}")
        if torch.isnan(out).any():
            raise Failed(
                "NaN in the output: a row is fully masked — a token must be allowed to attend to "
                "itself (mask keys j > i, not j >= i)"
            )
        variants = _attention_variants(q.double(), k.double(), v.double())
        want = variants.pop("ok")
        if close(out, want):
            continue
        name_the_mistake(out, variants)
        if not close(out[..., 0, :], v[..., 0, :]):
            raise Failed("row 0 of the output should equal v[..., 0, :]: the first token can only read itself")
        raise Failed(
            f"for shape {shape} the output differs from causal attention "
            f"(largest difference {float((out - want).abs().max()):.3g})"
        )
    return "correct: scores, / sqrt(d), causal mask, softmax over the keys, mix of values"


# --- chapter 03: one cached decode step ----------------------------------------------------------------


def _decode_step_variants(q, k, v, k_cache, v_cache) -> dict[str, torch.Tensor]:
    """The typical wrong answers of a cached step, each named by its symptom (float64)."""
    import math

    d = q.shape[-1]
    keys, values = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)

    def attend(keys_, values_, scale=1 / math.sqrt(d), dim=-1, scores_of=None):
        weights = torch.softmax((q @ (keys_ if scores_of is None else scores_of).transpose(-1, -2)) * scale, dim)
        return weights @ values_

    return {
        "the new token did not read itself: append its k and v to the cache (torch.cat([k_cache, k], dim=-2)) "
        "BEFORE attending": attend(k_cache, v_cache),
        "the query read only its own value: it must also read every cached position — attend over the cache "
        "and the new k, v together": v.clone(),
        "you applied the mask of position 0 (only the first key kept): the new query is the LAST position, every "
        "cached key is in its past, so one new query needs no mask": v_cache[..., :1, :].clone(),
        "scores are not divided by sqrt(d): the softmax is too sharp": attend(keys, values, scale=1.0),
        "scores are divided by d instead of sqrt(d)": attend(keys, values, scale=1 / d),
        "softmax over the wrong axis: the ONE query's weights over the KEYS (the last axis, dim=-1) must sum to 1": attend(
            keys, values, dim=-2
        ),
        "you mixed the KEYS: the output is the weights times the VALUES": attend(keys, keys),
        "you scored the query against the VALUES: the scores are q · k, the values are only mixed": attend(
            values, values, scores_of=values
        ),
        "keys and values are out of step: concatenate both in the same order (the cache first, then the new "
        "position), so key j and value j belong to the same token": attend(keys, torch.cat([v, v_cache], -2)),
    }


def _decode_step_cases(seed: int = 13):
    """(q, k, v, k_cache, v_cache, q_past): the new position's q, k, v ``(…, 1, d)``, a cache of T
    positions ``(…, T, d)`` and the past queries, for the full recomputation; several shapes, a cache of
    one position, float64 and non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)

    def split(q, k, v):
        t = q.shape[-2] - 1  # the last position is the new one
        return q[..., t:, :], k[..., t:, :], v[..., t:, :], k[..., :t, :], v[..., :t, :], q[..., :t, :]

    for lead, t, d, dtype in [
        ((1, 1), 4, 8, torch.float32),
        ((2, 3), 6, 16, torch.float32),
        ((), 9, 4, torch.float32),
        ((1, 2), 1, 8, torch.float32),
        ((3, 2), 5, 8, torch.float64),
    ]:
        yield split(*(torch.randn(*lead, t + 1, d, generator=gen, dtype=dtype) * 2 for _ in range(3)))
    yield split(*(torch.randn(2, 4, 8, 7, generator=gen).transpose(-1, -2) for _ in range(3)))  # strided views


@checker
def check_decode_step(fn: Callable[..., torch.Tensor]) -> str:
    """Check ``fn(q, k, v, k_cache, v_cache) -> out``: one decode step with a KV cache. ``q, k, v`` are the
    new position's ``(…, 1, d)``, the cache holds the ``T`` earlier positions ``(…, T, d)``; the output
    ``(…, 1, d)`` must equal the LAST row of causal attention recomputed over all ``T + 1`` positions."""
    for q, k, v, k_cache, v_cache, q_past in _decode_step_cases():
        shape = tuple(q.shape)
        out = tensor_answer(fn, q, k, v, k_cache, v_cache, noun="the new position's output (…, 1, d)")
        full = [torch.cat(p, -2).double() for p in ((q_past, q), (k_cache, k), (v_cache, v))]
        want = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)[..., -1:, :]
        if out.shape != want.shape:
            if out.shape == (*shape[:-1], k_cache.shape[-2] + 1):
                raise Failed("you returned the attention weights: multiply them by the values")
            raise Failed(
                f"for q of shape {shape} the output should have shape {shape} (one new position), "
                f"got {tuple(out.shape)}"
            )
        if close(out, want):
            continue
        name_the_mistake(out, _decode_step_variants(*(t.double() for t in (q, k, v, k_cache, v_cache))))
        raise Failed(
            f"with a cache of {k_cache.shape[-2]} positions (q of shape {shape}) the output is not "
            "the last row of full causal attention (largest difference "
            f"{float((out - want).abs().max()):.3g})"
        )
    return (
        "correct: one query against the cached keys and values plus its own equals the last row "
        "of full recomputation — the KV cache's whole trick"
    )
