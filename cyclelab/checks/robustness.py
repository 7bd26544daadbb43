"""Chapter 09's checks: HotFlip's swap scores, and overlapping spans of a long text."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, close, tensor_answer


def _swap_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(grad, embeddings, ids): a few positions and a small vocabulary, a repeated token, a single position."""
    gen = torch.Generator().manual_seed(9)
    return [
        (
            torch.randn(4, 3, generator=gen, dtype=torch.float64),
            torch.randn(7, 3, generator=gen, dtype=torch.float64),
            torch.tensor([2, 5, 2, 0]),
        ),
        (torch.randn(1, 5, generator=gen), torch.randn(6, 5, generator=gen), torch.tensor([3])),
        (torch.randn(3, 2, generator=gen), torch.randn(4, 2, generator=gen), torch.tensor([1, 1, 3])),
    ]


def swap_reference(grad: torch.Tensor, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """By brute force: for every swap, the whole input's gradient dotted with the change of the input."""
    x = embeddings[ids].double()
    out = torch.zeros(len(ids), len(embeddings), dtype=torch.float64)
    for i in range(len(ids)):
        for v in range(len(embeddings)):
            swapped = x.clone()
            swapped[i] = embeddings[v].double()
            out[i, v] = (grad.double() * (swapped - x)).sum()
    return out


@checker
def check_swap_scores(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """Check ``fn(grad, embeddings, ids) -> scores``: HotFlip's first-order loss change of every swap,
    ``scores[i, v] = (E[v] − E[ids[i]]) · grad[i]``, shaped (tokens, vocab)."""
    for grad, emb, ids in _swap_cases():
        case = f"{len(ids)} positions, a vocabulary of {len(emb)}, width {emb.shape[1]}"
        got = tensor_answer(fn, grad.clone(), emb.clone(), ids.clone(), noun="the scores", case=case)
        want = swap_reference(grad, emb, ids)
        if got.numel() == 2 or got.dim() == 0:
            raise Failed(
                f"{case}: return the whole (tokens, vocab) matrix of scores, not the best swap "
                "(the attack picks it afterwards)"
            )
        if got.shape == want.T.shape and got.shape != want.shape:
            raise Failed(
                f"{case}: the scores are transposed: one row per POSITION, one column per token "
                f"of the vocabulary, shape {tuple(want.shape)}"
            )
        if got.shape != want.shape:
            raise Failed(
                f"{case}: return one score per (position, token): shape {tuple(want.shape)}, got {tuple(got.shape)}"
            )
        if close(got, want):
            continue
        g, e = grad.double(), emb.double()
        slips = [
            (-want, "the sign is flipped: the score is the RISE of the loss, (E[v] − E[ids[i]]) · grad[i]"),
            (
                g @ e.T,
                "you left out the current token: subtract grad[i] · E[ids[i]], so that keeping the token scores 0",
            ),
            (
                g @ e.T - (g * e[ids]).sum(),
                "you subtracted the whole input's term: row i subtracts only its own position's grad[i] · E[ids[i]]",
            ),
            (
                -torch.cdist(e[ids], e),
                "the gradient is missing: a swap scores its change E[v] − E[ids[i]] dotted "
                "with grad[i], not its distance",
            ),
            (
                (e.norm(dim=-1)[None] - e[ids].norm(dim=-1)[:, None]) * g.norm(dim=-1, keepdim=True),
                "multiply the vectors, not their lengths: a dot product (E[v] − E[ids[i]]) · grad[i]",
            ),
        ]
        for value, hint in slips:
            if value.shape == got.shape and close(got, value):
                raise Failed(f"{case}: {hint}")
        raise Failed(
            f"{case}: the scores differ from (E[v] − E[ids[i]]) · grad[i]; compare row 0 with "
            "grad[0] @ E.T − grad[0] @ E[ids[0]]"
        )
    return (
        "correct: one matrix product scores every swap at once, the first-order (HotFlip) "
        "estimate of how much each would raise the loss"
    )


_SPAN_CASES = {  # (n, size, overlap): the spans, written out by hand
    (10, 4, 1): [(0, 4), (3, 7), (6, 10)],
    (10, 4, 2): [(0, 4), (2, 6), (4, 8), (6, 10)],
    (11, 4, 1): [(0, 4), (3, 7), (6, 10), (9, 11)],
    (9, 4, 0): [(0, 4), (4, 8), (8, 9)],
    (8, 4, 0): [(0, 4), (4, 8)],
    (5, 2, 1): [(0, 2), (1, 3), (2, 4), (3, 5)],
    (3, 4, 1): [(0, 3)],
    (4, 4, 3): [(0, 4)],
}


def _spans_hint(got: list, want: list, n: int, size: int, overlap: int) -> str:
    """The symptom of wrong spans ``got`` for ``(n, size, overlap)`` whose right answer is ``want``."""
    starts = [s for s, _ in got]
    steps = {b - a for a, b in zip(starts, starts[1:])}
    if any(e - s == size - 1 for s, e in got if e < n) and not any(e - s == size for s, e in got):
        return "spans are half-open (start, end): end is one past the last token, so a full span has end − start = size"
    if any(e > n for _, e in got):
        return "a span runs past the end: clip its end with min(start + size, n)"
    if steps == {size} and overlap:
        return "the spans do not overlap: each starts size − overlap after the one before"
    if steps == {overlap} and overlap != size - overlap:
        return "the step between starts is size − overlap, not overlap"
    if not got or got[-1][1] < n:
        return "the end of the text is missing: keep going until a span reaches n"
    if len(got) > len(want) and got[: len(want)] == want:
        return "a span too many: stop at the first span that reaches n (the next would lie inside it)"
    return f"for n={n}, size={size}, overlap={overlap} the spans are {want}"


@checker
def check_overlapping_spans(fn: Callable[[int, int, int], list[tuple[int, int]]]) -> str:
    """Check ``fn(n, size, overlap) -> [(start, end), ...]``: half-open windows of at most ``size`` tokens,
    starts ``size − overlap`` apart, the last the first to reach ``n``."""
    for (n, size, overlap), want in _SPAN_CASES.items():
        answer = call(fn, n, size, overlap, case=f"n={n}, size={size}, overlap={overlap}")
        try:
            got = [(int(s), int(e)) for s, e in answer]
        except (TypeError, ValueError):
            raise Failed(f"return a list of (start, end) pairs, got {answer!r:.80}")
        if got != want:
            raise Failed(
                f"n={n}, size={size}, overlap={overlap}: you returned {got}; "
                + _spans_hint(got, want, n, size, overlap)
            )
    return (
        "correct: every token lies in a span, neighbours share `overlap` tokens, and no span "
        "is wasted — the same spans serve minilm's chunks and tiny's sliding window"
    )
