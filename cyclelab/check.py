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


# --- chapter 02: the embedding lookup and RoPE -----------------------------------------------------


def _call(fn, *args):
    """Run a learner's function; return (value, None) or (None, Result naming the exception)."""
    try:
        return fn(*args), None
    except Exception as err:  # a learner's bug, reported instead of raised
        return None, Result(False, f"your function raised {type(err).__name__}: {err}")


def check_embed_lookup(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(weight, ids) -> vectors``: the rows of ``weight`` (vocab, width) for ``ids``,
    shaped ``ids.shape + (width,)``."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 6, generator=gen)
    cases = [torch.tensor([3, 1, 3]), torch.tensor([[0, 5, 2], [39, 7, 7]]), torch.tensor([39])]
    for ids in cases:
        out, error = _call(fn, weight.clone(), ids.clone())
        if error is not None:
            if "out of bounds" in error.message or "out of range" in error.message:
                error.message += " — a token's vector is a ROW of the (vocab, width) matrix: index rows, not columns"
            return error
        want = weight[ids]
        if not isinstance(out, torch.Tensor):
            return Result(False, f"return a tensor, not {type(out).__name__}")
        if out.shape == (*ids.shape, weight.shape[0]):
            return Result(False, "you returned one-hot vectors (one entry per vocabulary item): "
                                 "multiply them by the matrix, or index its rows directly")
        if out.shape == (weight.shape[0], *ids.shape) and out.shape != want.shape:
            return Result(False, "you took COLUMNS of the matrix: a token's vector is a ROW, weight[ids]")
        if out.shape != want.shape:
            return Result(False, f"for ids of shape {tuple(ids.shape)} the result should have shape "
                                 f"{tuple(want.shape)} (ids.shape + (width,)), got {tuple(out.shape)}")
        if torch.allclose(out.float(), want, atol=1e-6):
            continue
        for shift in (-1, 1):
            shifted = weight[(ids + shift).clamp(0, weight.shape[0] - 1)]
            if torch.allclose(out.float(), shifted, atol=1e-6):
                return Result(False, f"every vector is one row {'too early' if shift < 0 else 'too late'}: "
                                     "token i is row i (ids count from 0)")
        if torch.count_nonzero(out) == 0:
            return Result(False, "the vectors are all zeros: read the rows of the matrix")
        return Result(False, f"for ids {ids.tolist()} the vectors are not the matrix rows weight[ids]")
    return Result(True, "correct: the lookup reads one row per token — a memory read, no arithmetic")


def check_rope_pair(fn: Callable[[float, float, int, float], tuple[float, float]]) -> Result:
    """Check ``fn(x, y, position, freq) -> (x', y')``: the pair (x, y) rotated counter-clockwise
    by the angle ``position × freq`` radians, as RoPE rotates pair i of a query or key."""
    import math

    cases = [(1.0, 0.0, 1, 0.5), (0.3, -1.2, 7, 0.25), (2.0, 1.0, 0, 1.0), (-0.7, 0.4, 100, 0.01), (1.5, 2.5, 3, 1.3)]
    for x, y, pos, freq in cases:
        out, error = _call(fn, x, y, pos, freq)
        if error is not None:
            return error
        try:
            xr, yr = (float(v) for v in out)
        except (TypeError, ValueError):
            return Result(False, f"return a pair (x', y') of two numbers, got {out!r}")

        def rot(a):
            return x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)

        def close(p):
            return abs(xr - p[0]) < 1e-5 and abs(yr - p[1]) < 1e-5

        angle = pos * freq
        if close(rot(angle)):
            continue
        if close(rot(-angle)):
            return Result(False, "you rotated the wrong way (clockwise): x' = x·cos − y·sin, y' = x·sin + y·cos")
        if pos not in (0, 1) and close(rot(freq)):
            return Result(False, "the angle must grow with the position: angle = position × freq")
        if close(rot(math.radians(angle))) or close(rot(math.degrees(angle))):
            return Result(False, "the angle is already in radians: pass position × freq to cos and sin as it is")
        if close(rot(angle)[::-1]):
            return Result(False, "x' and y' are swapped: return (x·cos − y·sin, x·sin + y·cos)")
        if abs(math.hypot(xr, yr) - math.hypot(x, y)) > 1e-4:
            return Result(False, f"the length of the pair changed ({math.hypot(x, y):.3f} → {math.hypot(xr, yr):.3f}): "
                                 "a rotation keeps the length — use cos and sin of the SAME angle")
        return Result(False, f"rotating ({x}, {y}) at position {pos} with freq {freq} should give "
                             f"({rot(angle)[0]:.4f}, {rot(angle)[1]:.4f}), got ({xr:.4f}, {yr:.4f})")
    return Result(True, "correct: RoPE turns each pair by position × freq; the length is unchanged")


# --- chapter 03: causal attention -------------------------------------------------------------------


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
        "row 0 attends to future tokens: set the scores of keys j > i to -inf before the softmax (a causal mask)":
            mix(scaled),
        "scores are not divided by sqrt(d): the softmax is too sharp": mix(raw.masked_fill(future, neg)),
        "scores are divided by d instead of sqrt(d)": mix((raw / d).masked_fill(future, neg)),
        "softmax over the wrong axis: each query's weights over the KEYS (the last axis, dim=-1) must sum to 1":
            mix(scaled.masked_fill(future, neg), dim=-2),
        "the mask is flipped: a token reads itself and the PAST (keys j <= i), not the future":
            mix(scaled.masked_fill(future.T, neg)),
        "a row's weights do not sum to 1: mask with -inf BEFORE the softmax instead of zeroing after it":
            probs @ v,
        "scores are not divided by sqrt(d), and the future is not masked": mix(raw),
    }


def check_causal_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(q, k, v) -> output``: causal scaled dot-product attention over ``(…, T, d)``
    tensors, returning ``softmax(mask(q kᵀ / sqrt(d))) @ v`` of shape ``(…, T, d)``."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 1, 5, 8), (2, 3, 7, 16), (6, 4), (1, 2, 1, 4)]
    for shape in shapes:
        q, k, v = (torch.randn(*shape, generator=gen) * 2 for _ in range(3))
        out, error = _call(fn, q.clone(), k.clone(), v.clone())
        if error is not None:
            return error
        if isinstance(out, tuple):
            return Result(False, "return only the output tensor probs @ v, not a tuple")
        if not isinstance(out, torch.Tensor):
            return Result(False, f"return a tensor, not {type(out).__name__}")
        t = shape[-2]
        if out.shape != q.shape:
            if out.shape == (*shape[:-1], t) and out.shape != q.shape:
                return Result(False, "you returned the attention weights: multiply them by v (probs @ v)")
            return Result(False, f"for q, k, v of shape {shape} the output should have shape {shape}, got {tuple(out.shape)}")
        out = out.float()
        if torch.isnan(out).any():
            return Result(False, "NaN in the output: a row is fully masked — a token must be allowed to attend to "
                                 "itself (mask keys j > i, not j >= i)")
        variants = _attention_variants(q, k, v)
        if torch.allclose(out, variants.pop("ok"), atol=1e-4, rtol=1e-4):
            continue
        for hint, wrong in variants.items():
            if torch.allclose(out, wrong, atol=1e-4, rtol=1e-4):
                return Result(False, hint)
        if not torch.allclose(out[..., 0, :], v[..., 0, :], atol=1e-4):
            return Result(False, "row 0 of the output should equal v[..., 0, :]: the first token can only "
                                 "read itself")
        return Result(False, f"for shape {shape} the output differs from causal attention "
                             f"(largest difference {float((out - _attention_variants(q, k, v)['ok']).abs().max()):.3g})")
    return Result(True, "correct: scores, / sqrt(d), causal mask, softmax over the keys, mix of values")


# --- chapter 01: BPE merge step and pair counts -----------------------------------------------------
def _ref_merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Reference BPE merge step: every occurrence of ``pair``, left to right, without overlaps."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_pair_cases(seed: int = 0) -> list[tuple[list[int], tuple[int, int], int]]:
    """Hand-picked cases (plain, overlapping, at the end, absent, reversed, tiny) then random ones."""
    import random

    cases = [([1, 2, 3, 1, 2, 4], (1, 2), 99), ([7, 5, 5, 5, 8], (5, 5), 9), ([5, 5, 5, 5], (5, 5), 9),
             ([3, 1, 2], (1, 2), 7), ([2, 1, 2, 1], (1, 2), 7), ([1, 3, 4], (1, 2), 7), ([], (1, 2), 7), ([1], (1, 2), 7)]
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.randrange(3) for _ in range(rng.randint(2, 30))]
        k = rng.randrange(len(ids) - 1)
        cases.append((ids, (ids[k], ids[k + 1]), 100 + rng.randrange(50)))
    return cases


def _merge_pair_hint(ids: list[int], pair: tuple[int, int], new_id: int, got: list[int]) -> str:
    """Name the symptom of a wrong merge."""
    want = _ref_merge_pair(ids, pair, new_id)
    case = f"merging {pair} → {new_id} in {ids}: expected {want}, got {got}"
    a, b = pair
    no_skip = [new_id if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b else x for i, x in enumerate(ids)]
    first_only = list(ids)
    for i in range(len(ids) - 1):
        if ids[i] == a and ids[i + 1] == b:
            first_only[i : i + 2] = [new_id]
            break
    if want != ids and got == list(ids):
        return f"nothing was merged ({case}): look for ids[i] == pair[0] and ids[i + 1] == pair[1]"
    if got == no_skip:
        return (f"the second token of each pair is still there ({case}): after a merge, jump over both "
                f"tokens (i += 2)")
    if got == _ref_merge_pair(ids, (b, a), new_id) and got != want:
        return f"you merged the pair the wrong way round ({case}): order matters, (a, b) is not (b, a)"
    if got == first_only and got != want:
        return f"only the first occurrence was merged ({case}): replace every occurrence"
    if a == b:
        if got.count(new_id) > want.count(new_id) or len(got) < len(want):
            return (f"overlapping pairs ({case}): one token was used by two merges. In [{a}, {a}, {a}] the "
                    f"pair ({a}, {a}) starts at 0 and at 1, but after merging at 0 the middle {a} is gone: "
                    "skip past both tokens and scan left to right")
        rev = _ref_merge_pair(ids[::-1], pair, new_id)[::-1]
        if got == rev:
            return f"overlapping pairs ({case}): you merged from the right; BPE merges left to right"
        return f"overlapping pairs ({case}): scan left to right, merge, then skip past both tokens"
    if len(got) == len(want) - 1 and got == want[:-1]:
        return f"the last token went missing ({case}): the final position needs handling too"
    if want and want[-1] == new_id and got[-2:] == [a, b]:
        return f"a pair at the very end was not merged ({case}): check your loop's last index"
    return case


def check_merge_pair(fn: Callable[[list[int], tuple[int, int], int], list[int]]) -> Result:
    """Check ``fn(ids, pair, new_id) -> list``: one BPE merge step (left to right, no overlaps)."""
    for ids, pair, new_id in _merge_pair_cases():
        given = list(ids)
        try:
            got = fn(given, pair, new_id)
        except Exception as err:  # a learner's bug, reported instead of raised
            return Result(False, f"merging {pair} in {ids}: your function raised {type(err).__name__}: {err}")
        if got is None:
            return Result(False, "your function returned None: build and return the new list of ids")
        if given != ids:
            return Result(False, f"your function changed its input list ({ids} became {given}): build a new list")
        try:
            got = [int(x) for x in got]
        except (TypeError, ValueError):
            return Result(False, f"return a list of ints, got {got!r}")
        if got != _ref_merge_pair(ids, pair, new_id):
            return Result(False, _merge_pair_hint(ids, pair, new_id, got))
    return Result(True, "correct: every occurrence merged, left to right, overlapping pairs handled")


def _count_pairs_cases(seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    cases = [[1, 2, 1, 2, 3], [5, 5, 5], [1, 2, 2, 1], [4, 2], [], [7]]
    cases += [[rng.randrange(4) for _ in range(rng.randint(2, 40))] for _ in range(100)]
    return cases


def check_count_pairs(fn: Callable[[list[int]], dict]) -> Result:
    """Check ``fn(ids) -> {(a, b): count}``: how often each adjacent pair occurs (overlaps included)."""
    from collections import Counter

    for ids in _count_pairs_cases():
        want = dict(Counter(zip(ids, ids[1:])))
        try:
            got = fn(list(ids))
        except Exception as err:
            if len(ids) < 2:
                return Result(False, f"on {ids} your function raised {type(err).__name__}: a list of fewer than "
                                     "two ids has no pairs, return {}")
            return Result(False, f"on {ids} your function raised {type(err).__name__}: {err}")
        if not isinstance(got, dict):
            return Result(False, f"return a dict {{(a, b): count}}, got {type(got).__name__}")
        if any(not (isinstance(k, tuple) and len(k) == 2) for k in got):
            return Result(False, f"keys must be pairs (a, b) as tuples, got keys like {next(iter(got))!r}")
        got = {k: v for k, v in got.items() if v}
        if got == want:
            continue
        case = f"on {ids}: expected {want}, got {got}"
        if not got and want:
            return Result(False, f"nothing was counted ({case}): look at every neighbour pair (ids[i], ids[i + 1])")
        if len(ids) > 2 and got == dict(Counter(zip(ids[:-1], ids[1:-1]))):
            return Result(False, f"the last pair is missing ({case}): n ids have n - 1 adjacent pairs")
        if got == dict(Counter(zip(ids[::2], ids[1::2]))):
            return Result(False, f"you skipped every other pair ({case}): pairs overlap — in [a, b, c] both "
                                 "(a, b) and (b, c) count")
        if set(got) == set(want) and all(v == 1 for v in got.values()):
            return Result(False, f"each pair was counted once ({case}): count every occurrence")
        if set(got) <= {tuple(sorted(k)) for k in want} and set(got) != set(want):
            return Result(False, f"(a, b) and (b, a) were counted together ({case}): pairs are ordered")
        return Result(False, case)
    return Result(True, "correct: every adjacent pair counted, overlapping ones included")
