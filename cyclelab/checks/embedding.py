"""Chapter 02's checks: the embedding lookup, a RoPE rotation, and mean pooling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, close, name_the_mistake, tensor_answer


def _embed_variants(weight: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The right lookup (``"ok"``) and the typical wrong ones, each named by its symptom."""
    last = weight.shape[0] - 1
    variants = {
        "ok": weight[ids],
        "every vector is one row too early: token i is row i (ids count from 0)": weight[(ids - 1).clamp(0, last)],
        "every vector is one row too late: token i is row i (ids count from 0)": weight[(ids + 1).clamp(0, last)],
        "you returned one-hot vectors (one entry per vocabulary item): multiply them by the matrix "
        "(one_hot @ weight), or index its rows directly": torch.nn.functional.one_hot(ids, weight.shape[0]),
        "the ids were flattened: keep their shape, the result is ids.shape + (width,)": weight[ids.flatten()],
        "the vectors are all zeros: read the rows of the matrix": torch.zeros(*ids.shape, weight.shape[1]),
    }
    columns = "you took the matrix's COLUMNS: a token's vector is a ROW, weight[ids]"
    if int(ids.max()) < weight.shape[1]:  # indexing the columns only works for ids below the width
        variants[columns] = weight[:, ids]
        variants[columns + " (not weight.T[ids])"] = weight.T[ids]
    return variants


@checker
def check_embed_lookup(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """Check ``fn(weight, ids) -> vectors``: the rows of ``weight`` (vocab, width) for ``ids``,
    shaped ``ids.shape + (width,)``; tried in float32 and float64, on a non-contiguous matrix too."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(40, 6, generator=gen), torch.randn(6, 40, generator=gen, dtype=torch.float64).T]
    cases = [
        (weights[0], torch.tensor([3, 1, 3])),
        (weights[0], torch.tensor([[0, 5, 2], [39, 7, 7]])),
        (weights[1], torch.tensor([39])),
        (weights[1], torch.tensor([[12, 0], [4, 4]])),
    ]
    for weight, ids in cases:
        try:
            out = tensor_answer(fn, weight, ids.clone(), noun="the vectors")
        except Failed as failed:
            if "dtype" in failed.message or "Double" in failed.message:
                raise Failed(
                    failed.message + f" (this weight is {weight.dtype}: build anything you multiply it by in the "
                    "weight's own dtype, e.g. F.one_hot(ids, len(weight)).to(weight.dtype))"
                ) from None
            if "out of bounds" in failed.message or "out of range" in failed.message:
                raise Failed(
                    failed.message + " (a token's vector is a ROW of the (vocab, width) matrix: index rows, "
                    "not columns)"
                ) from None
            raise
        variants = _embed_variants(weight, ids)
        want = variants.pop("ok")
        if close(out, want, 1e-6):
            continue
        name_the_mistake(out, variants, lambda a, b: close(a, b, 1e-6))
        if out.shape != want.shape:
            raise Failed(
                f"for ids of shape {tuple(ids.shape)} the result should have shape "
                f"{tuple(want.shape)} (ids.shape + (width,)), got {tuple(out.shape)}"
            )
        raise Failed(f"for ids {ids.tolist()} the vectors are not the matrix rows weight[ids]")
    return "correct: the lookup reads one row per token — a memory read, no arithmetic"


@checker
def check_rope_pair(fn: Callable[[float, float, int, float], tuple[float, float]]) -> str:
    """Check ``fn(x, y, position, freq) -> (x', y')``: the pair (x, y) rotated counter-clockwise
    by the angle ``position × freq`` radians, as RoPE rotates pair i of a query or key."""
    import math

    cases = [(1.0, 0.0, 1, 0.5), (0.3, -1.2, 7, 0.25), (2.0, 1.0, 0, 1.0), (-0.7, 0.4, 100, 0.01), (1.5, 2.5, 3, 1.3)]
    for x, y, pos, freq in cases:
        out = call(fn, x, y, pos, freq)
        try:
            xr, yr = (float(v) for v in out)
        except (TypeError, ValueError):
            raise Failed(f"return a pair (x', y') of two numbers, got {out!r}")

        def rot(a):
            return x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)

        def close(p):
            return abs(xr - p[0]) < 1e-5 and abs(yr - p[1]) < 1e-5

        angle = pos * freq
        if close(rot(angle)):
            continue
        if close(rot(-angle)):
            raise Failed("you rotated the wrong way (clockwise): x' = x·cos − y·sin, y' = x·sin + y·cos")
        if pos not in (0, 1) and close(rot(freq)):
            raise Failed("the angle must grow with the position: angle = position × freq")
        if close(rot(math.radians(angle))) or close(rot(math.degrees(angle))):
            raise Failed("the angle is already in radians: pass position × freq to cos and sin as it is")
        if close(rot(angle)[::-1]):
            raise Failed("x' and y' are swapped: return (x·cos − y·sin, x·sin + y·cos)")
        if angle and close((x, y)):
            raise Failed("the pair came back unchanged: rotate it by the angle position × freq")
        if close((x * math.cos(angle) + y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle))):
            raise Failed("a sign is wrong: x' = x·cos − y·sin (minus), y' = x·sin + y·cos (plus)")
        if abs(math.hypot(xr, yr) - math.hypot(x, y)) > 1e-4:
            raise Failed(
                f"the length of the pair changed ({math.hypot(x, y):.3f} → {math.hypot(xr, yr):.3f}): "
                "a rotation keeps the length — use cos and sin of the SAME angle"
            )
        raise Failed(
            f"rotating ({x}, {y}) at position {pos} with freq {freq} should give "
            f"({rot(angle)[0]:.4f}, {rot(angle)[1]:.4f}), got ({xr:.4f}, {yr:.4f})"
        )
    return "correct: RoPE turns each pair by position × freq; the length is unchanged"


def _pool_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden, mask) pairs: right padding, left padding, no padding, one real token, float64."""
    gen = torch.Generator().manual_seed(5)
    masks = [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], [[1, 1, 1, 1]]]
    cases = [(torch.randn(len(m), len(m[0]), 6, generator=gen) + 1.0, torch.tensor(m)) for m in masks]
    return cases + [(torch.randn(2, 3, 4, generator=gen, dtype=torch.float64), torch.tensor([[1, 1, 0], [1, 0, 0]]))]


def _pool_variants(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Typical wrong poolings, keyed by the hint that names each symptom."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    total = (hidden * m).sum(1)
    right = total / m.sum(1)
    return {
        "the padding was averaged in: multiply by the mask (mask.unsqueeze(-1)) before summing, "
        "and divide by the number of REAL tokens": hidden.mean(1),
        "you returned the sum: divide by the number of real tokens, mask.sum(1)": total,
        "you divided by the padded length: divide each sentence by ITS number of real tokens, mask.sum(1)": total
        / hidden.shape[1],
        "you divided by the real tokens of the whole batch: each sentence by its own count, mask.sum(1)": total
        / mask.sum(),
        "your vectors have length 1: return the plain average (the package normalizes afterwards)": torch.nn.functional.normalize(
            right, dim=-1
        ),
        "you took the first token's vector ([CLS] pooling): average over all real tokens": hidden[:, 0],
        "you averaged over the batch (dim 0): average over the tokens of each sentence, dim 1": hidden.mean(0),
        "you averaged over the width (the last dim): average over the tokens, dim 1": (hidden * m).mean(-1),
    }


@checker
def check_mean_pool(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """Check ``fn(hidden, mask) -> (batch, width)``: each sentence's mean over its real tokens,
    against a loop over the sentences, on right and left padding and in float64."""
    for hidden, mask in _pool_cases():
        out = tensor_answer(
            fn,
            hidden.clone(),
            mask.clone(),
            noun="the pooled vectors",
            in_place="you changed hidden or mask in place: work on new tensors (x = x * m)",
        )
        want = torch.stack([h[row.bool()].mean(0) for h, row in zip(hidden.double(), mask)])
        if close(out, want, 1e-5):
            continue
        hint = next((h for h, wrong in _pool_variants(hidden, mask).items() if close(out, wrong.double(), 1e-5)), "")
        if not hint and out.shape != want.shape:
            hint = (
                f"for hidden of shape {tuple(hidden.shape)} the result should have shape {tuple(want.shape)} "
                f"(batch, width), got {tuple(out.shape)}"
            )
        raise Failed(
            hint or f"for the mask {mask.tolist()} the result is not each sentence's mean over its real tokens"
        )
    return "correct: each sentence is the mean of its real tokens, padding ignored"
