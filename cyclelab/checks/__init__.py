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


# --- shared: calling the learner's function, guarding the check ------------------------------------

# Exception texts a learner's bug typically raises, and what to do about each.
_CAUSES = [
    (("did not match", "expected scalar type", "expected m1 and m2 to have the same dtype", "dtype"),
     "two tensors of different dtypes met (float32 and float64?): convert one with .to(other.dtype)"),
    (("cannot be multiplied",), "the matrix shapes do not fit (a, b) @ (b, c): print the .shape of each side"),
    (("must match the size of tensor", "size of tensor a"),
     "two shapes do not broadcast: print the .shape of each tensor on that line"),
    (("view size is not compatible",), "the tensor is not contiguous: use .reshape(...) instead of .view(...)"),
    (("out of bounds", "out of range"), "an index runs past the end of an axis: check which axis you index"),
    (("only one element tensors",), "a whole tensor was used where one number belongs: pick the element first"),
    (("'NoneType'",), "a value is None: does every function on the way return its result?"),
]


def _likely_cause(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    return next((cause for keys, cause in _CAUSES if any(k in text for k in keys)), "")


def _is_library(filename: str) -> bool:
    """True for frames of Python itself, installed packages and cyclelab: not the learner's code."""
    import sysconfig
    from pathlib import Path

    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")} | {str(Path(__file__).parents[1])}
    return any(filename.startswith(root) for root in roots)


def _learner_line(err: Exception) -> str:
    """`` (line N: `code`)`` of the deepest frame of the learner's own code in ``err``'s traceback."""
    import traceback

    mine = [f for f in traceback.extract_tb(err.__traceback__) if not _is_library(f.filename)]
    if not mine:
        return ""
    code = (mine[-1].line or "").strip()
    return f" (line {mine[-1].lineno}: `{code}`)" if code else f" (line {mine[-1].lineno})"


def _raised(err: Exception, case: str = "", hint: str = "") -> Result:
    """The ✗ line for an exception from the learner's function: where, what, and a likely cause."""
    where = f"{case}: " if case else ""
    cause = hint or _likely_cause(err)
    return Result(False, f"{where}your function raised {type(err).__name__}: {err}{_learner_line(err)}"
                         + (f" — {cause}" if cause else ""))


def _snapshot(value):
    """A copy of an argument to compare after the call, or None for what is not checked."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)
    if isinstance(value, torch.nn.Module):
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    return None


def _unchanged(value, before) -> bool:
    if isinstance(value, torch.Tensor):
        return value.shape == before.shape and value.dtype == before.dtype and bool(torch.equal(value, before))
    if isinstance(value, torch.nn.Module):
        now = value.state_dict()
        return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
    return value == before


def _argument_name(fn, index: int) -> str:
    import inspect

    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    return names[index] if index < len(names) else f"argument {index + 1}"


def _call(fn, *args, case: str = "", hint: str = "", in_place: str = ""):
    """Run a learner's function on ``args``; return (value, None), or (None, Result) when it raised
    (naming the ``case``, the learner's line and a likely cause, or ``hint``) or changed an argument
    in place (``in_place`` overrides the generic message)."""
    before = [_snapshot(a) for a in args]
    try:
        value = fn(*args)
    except Exception as err:  # a learner's bug, reported instead of raised
        return None, _raised(err, case, hint)
    for i, (arg, copy) in enumerate(zip(args, before)):
        if copy is not None and not _unchanged(arg, copy):
            where = f"{case}: " if case else ""
            return None, Result(False, where + (in_place or f"you changed `{_argument_name(fn, i)}` in place "
                                                "(x += …, x /= …, x[...] = …): the caller still uses it, so "
                                                "work on a new tensor (x = x + …)"))
    return value, None


def _tensor_answer(fn, *args, noun: str, case: str = "", in_place: str = ""):
    """Run ``fn(*args)``; return (the answer as a float64 tensor, None), or (None, Result) when it
    raised, changed an argument in place, or returned something other than a tensor."""
    out, error = _call(fn, *args, case=case, in_place=in_place)
    if error is not None:
        return None, error
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return None, Result(False, f"return only {noun}, not a tuple of {len(out)}")
    if not isinstance(out, torch.Tensor):
        return None, Result(False, f"return {noun} as a tensor, not {type(out).__name__}")
    if out.is_complex() or out.dtype == torch.bool:
        return None, Result(False, f"return {noun} as a float tensor, not {out.dtype}")
    return out.detach().to("cpu", torch.float64), None


def _pair(answer, names: str = "(token_id, probability)") -> tuple[int, float] | Result:
    """An answer ``(int, float)`` read as Python numbers, or a ✗ Result saying what came back."""
    try:
        first, second = answer
        if isinstance(second, torch.Tensor) and second.numel() != 1:
            return Result(False, f"return {names}: the second item should be ONE number, got a tensor of shape "
                                 f"{tuple(second.shape)} (pick the element, e.g. probs[token])")
        return int(first), float(second)
    except (TypeError, ValueError, IndexError, RuntimeError):
        return Result(False, f"return a pair {names}, got {answer!r:.80}")


def _guarded(check: Callable[..., Result]) -> Callable[..., Result]:
    """A checker that never raises: a non-callable answer, or anything the check's own reading of
    the answer trips on, becomes a ✗ line instead of a traceback."""
    import functools

    @functools.wraps(check)
    def run(fn, *args, **kwargs) -> Result:
        if not callable(fn):
            return Result(False, f"pass your function itself, e.g. {check.__name__}(my_function), "
                                 f"not a {type(fn).__name__}")
        try:
            return check(fn, *args, **kwargs)
        except Exception as err:  # the answer's shape or type tripped the comparison
            return Result(False, f"your answer could not be compared ({type(err).__name__}: {err}): return what "
                                 "the exercise asks, with the shape and type of its example")

    return run


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Same shape and equal within ``tol`` (absolute and relative), compared in float64."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=False)


# --- chapter 00: the greedy WRITEBACK decision ------------------------------------------------------


def _cases(seed: int = 0) -> list[torch.Tensor]:
    """Logits to try: random sizes and scales, a spike, large values (overflow), negatives, a tie,
    float64, and a non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(n, generator=gen) * s for n, s in [(5, 1.0), (50, 3.0), (1000, 10.0)]]
    spike = torch.full((10,), -2.0)
    spike[7] = 4.0
    strided = torch.randn(12, 2, generator=gen)[:, 1]
    return cases + [spike, torch.tensor([1000.0, 999.0, -1000.0]), -torch.rand(8, generator=gen) - 5,
                    torch.tensor([0.5, 2.0, 2.0, -1.0]), torch.randn(30, generator=gen, dtype=torch.float64), strided]


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
    return (f"the probability should be {want_prob:.4f}, got {prob:.4f}: softmax divides exp(logit) by the sum "
            "over ALL tokens")


@_guarded
def check_greedy_step(fn: Callable[[torch.Tensor], tuple[int, float]]) -> Result:
    """Check ``fn(logits) -> (token_id, probability)``: the greedy choice and its softmax probability."""
    for logits in _cases():
        answer, error = _call(fn, logits.clone() if logits.is_contiguous() else logits)
        if error is not None:
            return error
        got = _pair(answer)
        if isinstance(got, Result):
            return got
        token, prob = got
        if _greedy_hint(logits, token, prob) is None:
            continue
        flipped = _pair(answer[::-1]) if isinstance(answer, (tuple, list)) else None
        if isinstance(flipped, tuple) and float(answer[1]) == flipped[0] and _greedy_hint(logits, *flipped) is None:
            return Result(False, "the pair is the wrong way round: return (token_id, probability)")
        return Result(False, _greedy_hint(logits, token, prob))
    return Result(True, "correct: greedy decoding takes the argmax, and softmax gives its probability")


# --- chapter 01: BPE merge step and pair counts -----------------------------------------------------


def _ref_merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Reference BPE merge step: every occurrence of ``pair``, left to right, without overlaps
    (the trainer's own merge, which is checked against the ``tokenizers`` library)."""
    from cyclelab.lab.tokenization import _merge_word

    merged = list(ids)
    _merge_word(merged, pair, new_id)
    return merged


def _merge_pair_cases(seed: int = 0) -> list[tuple[list[int], tuple[int, int], int]]:
    """Hand-picked cases (plain, overlapping, at the end, absent, reversed, tiny) then random ones."""
    import random

    cases = [([1, 2, 3, 2, 1, 2, 4], (1, 2), 99), ([7, 5, 5, 5, 8], (5, 5), 9), ([5, 5, 5, 5], (5, 5), 9),
             ([3, 1, 2], (1, 2), 7), ([2, 1, 2, 1], (1, 2), 7), ([1, 3, 4], (1, 2), 7), ([], (1, 2), 7), ([1], (1, 2), 7),
             ([11, 2], (1, 2), 7), ([1, 21, 2], (1, 2), 9), ([12, 1, 2, 3], (1, 2), 40), ([10, 11, 2, 1, 2], (1, 2), 5)]
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.choice((0, 1, 2, 11, 12, 21, 120)) for _ in range(rng.randint(2, 30))]
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
    strangers = sorted(set(got) - set(ids) - {new_id})
    if strangers:
        return (f"your result holds ids that were in neither the input nor the merge ({strangers}; {case}): "
                "did you merge digits of a string? Compare whole ids, ids[i] == a and ids[i + 1] == b")
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


@_guarded
def check_merge_pair(fn: Callable[[list[int], tuple[int, int], int], list[int]]) -> Result:
    """Check ``fn(ids, pair, new_id) -> list``: one BPE merge step (left to right, no overlaps)."""
    for ids, pair, new_id in _merge_pair_cases():
        got, error = _call(fn, list(ids), pair, new_id, case=f"merging {pair} in {ids}",
                           in_place="your function changed its input list: build and return a new list")
        if error is not None:
            return error
        if got is None:
            return Result(False, "your function returned None: build and return the new list of ids")
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
    cases = [[1, 2, 1, 2, 3], [5, 5, 5], [1, 2, 2, 1], [4, 2], [], [7], [10, 1, 0, 1], [12, 1, 2, 12]]
    cases += [[rng.choice((0, 1, 2, 3, 10, 12)) for _ in range(rng.randint(2, 40))] for _ in range(100)]
    return cases


@_guarded
def check_count_pairs(fn: Callable[[list[int]], dict]) -> Result:
    """Check ``fn(ids) -> {(a, b): count}``: how often each adjacent pair occurs (overlaps included)."""
    from collections import Counter

    for ids in _count_pairs_cases():
        want = dict(Counter(zip(ids, ids[1:])))
        short = "a list of fewer than two ids has no pairs, return {}" if len(ids) < 2 else ""
        got, error = _call(fn, list(ids), case=f"on {ids}", hint=short)
        if error is not None:
            return error
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


def _ref_apply_merges(word: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """The reference encoding of one pre-token: ``tokenizers``' own BPE model, built from ``merges``."""
    from tokenizers.models import BPE as HFBPE

    vocab: dict[str, int] = {}
    for token in [*word, *(c for m in merges for c in m), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    return [t.value for t in HFBPE(vocab, merges).tokenize("".join(word))] if word else []


def _merge_variants(word: list[str], ranks: dict[tuple[str, str], int]) -> dict[str, list[str]]:
    """Typical wrong encodings of ``word``, keyed by the hint that names each symptom."""

    def replay(pick, glue=lambda a, b: a + b, once=False) -> list[str]:
        parts = list(word)
        while True:
            known = [i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) in ranks]
            if not known:
                return parts
            i = pick(known, parts)
            parts[i : i + 2] = [glue(parts[i], parts[i + 1])]
            if once:
                return parts

    def rank(parts, i):
        return ranks[parts[i], parts[i + 1]]

    def longest_first() -> list[str]:  # WordPiece's rule: the longest known piece from the left
        pieces, known, i = [], set(word) | {a + b for a, b in ranks}, 0
        while i < len(word):
            j = max(j for j in range(i + 1, len(word) + 1) if "".join(word[i:j]) in known or j == i + 1)
            pieces.append("".join(word[i:j]))
            i = j
        return pieces

    def first_occurrence_each() -> list[str]:
        parts = list(word)
        for pair in sorted(ranks, key=ranks.get):
            i = next((i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) == pair), None)
            if i is not None:
                parts[i : i + 2] = [pair[0] + pair[1]]
        return parts

    return {
        "nothing was merged: while some neighbour pair (parts[i], parts[i + 1]) is in ranks, merge one": list(word),
        "you stopped after one merge: keep merging until no neighbour pair is in ranks":
            replay(lambda known, parts: min(known, key=lambda i: rank(parts, i)), once=True),
        "you merged the leftmost pair that has a rank; BPE merges the pair with the LOWEST rank first, "
        "wherever it is in the word": replay(lambda known, parts: known[0]),
        "you merged the pair with the HIGHEST rank first: rank 0 is the merge learned first, and it goes first":
            replay(lambda known, parts: max(known, key=lambda i: rank(parts, i))),
        "you glued a pair the wrong way round: the new token is left + right":
            replay(lambda known, parts: min(known, key=lambda i: rank(parts, i)), glue=lambda a, b: b + a),
        "only the first occurrence of each pair was merged: a pair can occur twice in a word (an in banana)":
            first_occurrence_each(),
        "you matched the longest known piece from the left, WordPiece's rule: BPE replays its merges by rank":
            longest_first(),
    }


#: Merges (earliest first) and words for :func:`check_apply_merges`, in byte characters (Ġ is a space).
_MERGE_RULES = [("e", "r"), ("h", "e"), ("a", "n"), ("Ġ", "t"), ("Ġt", "he"), ("an", "a"), ("b", "an"), ("Ġthe", "r"),
                ("Ġ", "b"), ("n", "a"), ("Ġb", "ana"), ("o", "u"), ("e", "e"), ("ee", "r"), ("o", "n"), ("i", "on"),
                ("t", "i"), ("t", "ion")]
_MERGE_WORDS = ["her", "Ġthe", "banana", "Ġbanana", "Ġthere", "Ġbeer", "Ġyou", "eee", "x", "", "ĠROMEO", "nanana", "tion"]


@_guarded
def check_apply_merges(fn: Callable[[list[str], dict[tuple[str, str], int]], list[str]]) -> Result:
    """Check ``fn(word, ranks) -> tokens``: encode one pre-token (a list of byte characters) by
    repeatedly merging the neighbour pair of lowest rank, against ``tokenizers``' BPE model.
    A wrong answer is named by the typical mistake that gives the same tokens on every word."""
    ranks = {pair: rank for rank, pair in enumerate(_MERGE_RULES)}
    answers = {}
    for word in _MERGE_WORDS:
        got, error = _call(fn, list(word), dict(ranks), case=f"encoding {list(word)}",
                           in_place="your function changed its input list: work on a copy, list(word)")
        if error is not None:
            return error
        if isinstance(got, str):
            return Result(False, f"return a list of token strings, not one string ({got!r})")
        if not isinstance(got, (list, tuple)) or not all(isinstance(t, str) for t in got):
            return Result(False, f"return a list of token strings, got {got!r:.80}")
        answers[word] = list(got)
    wrong = [w for w in _MERGE_WORDS if answers[w] != _ref_apply_merges(list(w), _MERGE_RULES)]
    if not wrong:
        return Result(True, "correct: the merges replay by rank, lowest first, until none applies — BPE encoding")
    variants = {w: _merge_variants(list(w), ranks) for w in _MERGE_WORDS}
    hints = [h for h in variants[wrong[0]] if all(variants[w][h] == answers[w] for w in _MERGE_WORDS)]
    hints = hints or [h for h, tokens in variants[wrong[0]].items() if tokens == answers[wrong[0]]]
    case = (f"encoding {list(wrong[0])} with the merges {_MERGE_RULES[:3]}…: expected "
            f"{_ref_apply_merges(list(wrong[0]), _MERGE_RULES)}, got {answers[wrong[0]]}")
    return Result(False, f"{hints[0]} ({case})" if hints else case)


# --- chapter 02: the embedding lookup and RoPE -----------------------------------------------------


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


@_guarded
def check_embed_lookup(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(weight, ids) -> vectors``: the rows of ``weight`` (vocab, width) for ``ids``,
    shaped ``ids.shape + (width,)``; tried in float32 and float64, on a non-contiguous matrix too."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(40, 6, generator=gen), torch.randn(6, 40, generator=gen, dtype=torch.float64).T]
    cases = [(weights[0], torch.tensor([3, 1, 3])), (weights[0], torch.tensor([[0, 5, 2], [39, 7, 7]])),
             (weights[1], torch.tensor([39])), (weights[1], torch.tensor([[12, 0], [4, 4]]))]
    for weight, ids in cases:
        out, error = _tensor_answer(fn, weight, ids.clone(), noun="the vectors")
        if error is not None:
            if "out of bounds" in error.message or "out of range" in error.message:
                error.message += " (a token's vector is a ROW of the (vocab, width) matrix: index rows, not columns)"
            return error
        variants = _embed_variants(weight, ids)
        want = variants.pop("ok")
        if _close(out, want, 1e-6):
            continue
        for hint, wrong in variants.items():
            if _close(out, wrong, 1e-6):
                return Result(False, hint)
        if out.shape != want.shape:
            return Result(False, f"for ids of shape {tuple(ids.shape)} the result should have shape "
                                 f"{tuple(want.shape)} (ids.shape + (width,)), got {tuple(out.shape)}")
        return Result(False, f"for ids {ids.tolist()} the vectors are not the matrix rows weight[ids]")
    return Result(True, "correct: the lookup reads one row per token — a memory read, no arithmetic")


@_guarded
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
        if angle and close((x, y)):
            return Result(False, "the pair came back unchanged: rotate it by the angle position × freq")
        if close((x * math.cos(angle) + y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle))):
            return Result(False, "a sign is wrong: x' = x·cos − y·sin (minus), y' = x·sin + y·cos (plus)")
        if abs(math.hypot(xr, yr) - math.hypot(x, y)) > 1e-4:
            return Result(False, f"the length of the pair changed ({math.hypot(x, y):.3f} → {math.hypot(xr, yr):.3f}): "
                                 "a rotation keeps the length — use cos and sin of the SAME angle")
        return Result(False, f"rotating ({x}, {y}) at position {pos} with freq {freq} should give "
                             f"({rot(angle)[0]:.4f}, {rot(angle)[1]:.4f}), got ({xr:.4f}, {yr:.4f})")
    return Result(True, "correct: RoPE turns each pair by position × freq; the length is unchanged")


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
        "you divided by the padded length: divide each sentence by ITS number of real tokens, mask.sum(1)":
            total / hidden.shape[1],
        "you divided by the real tokens of the whole batch: each sentence by its own count, mask.sum(1)":
            total / mask.sum(),
        "your vectors have length 1: return the plain average (the package normalizes afterwards)":
            torch.nn.functional.normalize(right, dim=-1),
        "you took the first token's vector ([CLS] pooling): average over all real tokens": hidden[:, 0],
        "you averaged over the batch (dim 0): average over the tokens of each sentence, dim 1": hidden.mean(0),
        "you averaged over the width (the last dim): average over the tokens, dim 1": (hidden * m).mean(-1),
    }


@_guarded
def check_mean_pool(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(hidden, mask) -> (batch, width)``: each sentence's mean over its real tokens,
    against a loop over the sentences, on right and left padding and in float64."""
    for hidden, mask in _pool_cases():
        out, error = _tensor_answer(fn, hidden.clone(), mask.clone(), noun="the pooled vectors",
                                    in_place="you changed hidden or mask in place: work on new tensors (x = x * m)")
        if error is not None:
            return error
        want = torch.stack([h[row.bool()].mean(0) for h, row in zip(hidden.double(), mask)])
        if _close(out, want, 1e-5):
            continue
        hint = next((h for h, wrong in _pool_variants(hidden, mask).items() if _close(out, wrong.double(), 1e-5)), "")
        if not hint and out.shape != want.shape:
            hint = (f"for hidden of shape {tuple(hidden.shape)} the result should have shape {tuple(want.shape)} "
                    f"(batch, width), got {tuple(out.shape)}")
        return Result(False, hint or f"for the mask {mask.tolist()} the result is not each sentence's mean over its "
                                     "real tokens")
    return Result(True, "correct: each sentence is the mean of its real tokens, padding ignored")


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
        "you mixed the KEYS: the output is the weights times the VALUES, probs @ v":
            torch.softmax(scaled.masked_fill(future, neg), -1) @ k,
        "the scores are transposed (k @ qᵀ): row i must hold query i's scores against every key, q @ kᵀ":
            mix((k @ q.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, neg)),
    }


def _qkv_cases(seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) of several shapes (heads and batch of different sizes), one set in float64 and one
    set of non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)
    cases = [tuple(torch.randn(*shape, generator=gen) * 2 for _ in range(3))
             for shape in [(1, 1, 5, 8), (2, 3, 7, 16), (6, 4), (1, 2, 1, 4)]]
    cases.append(tuple(torch.randn(3, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3)))
    cases.append(tuple(torch.randn(2, 4, 8, 5, generator=gen).transpose(-1, -2) for _ in range(3)))
    return cases


@_guarded
def check_causal_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(q, k, v) -> output``: causal scaled dot-product attention over ``(…, T, d)``
    tensors, returning ``softmax(mask(q kᵀ / sqrt(d))) @ v`` of shape ``(…, T, d)``."""
    for q, k, v in _qkv_cases():
        shape, t = tuple(q.shape), q.shape[-2]
        out, error = _tensor_answer(fn, q, k, v, noun="the output tensor probs @ v")
        if error is not None:
            return error
        if out.shape != q.shape:
            if out.shape == (*shape[:-1], t):
                return Result(False, "you returned the attention weights: multiply them by v (probs @ v)")
            return Result(False, f"for q, k, v of shape {shape} the output should have shape {shape}, "
                                 f"got {tuple(out.shape)}")
        if torch.isnan(out).any():
            return Result(False, "NaN in the output: a row is fully masked — a token must be allowed to attend to "
                                 "itself (mask keys j > i, not j >= i)")
        variants = _attention_variants(q.double(), k.double(), v.double())
        want = variants.pop("ok")
        if _close(out, want):
            continue
        for hint, wrong in variants.items():
            if _close(out, wrong):
                return Result(False, hint)
        if not _close(out[..., 0, :], v[..., 0, :]):
            return Result(False, "row 0 of the output should equal v[..., 0, :]: the first token can only "
                                 "read itself")
        return Result(False, f"for shape {shape} the output differs from causal attention "
                             f"(largest difference {float((out - want).abs().max()):.3g})")
    return Result(True, "correct: scores, / sqrt(d), causal mask, softmax over the keys, mix of values")


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
        "softmax over the wrong axis: the ONE query's weights over the KEYS (the last axis, dim=-1) must sum to 1":
            attend(keys, values, dim=-2),
        "you mixed the KEYS: the output is the weights times the VALUES": attend(keys, keys),
        "you scored the query against the VALUES: the scores are q · k, the values are only mixed":
            attend(values, values, scores_of=values),
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

    for lead, t, d, dtype in [((1, 1), 4, 8, torch.float32), ((2, 3), 6, 16, torch.float32), ((), 9, 4, torch.float32),
                              ((1, 2), 1, 8, torch.float32), ((3, 2), 5, 8, torch.float64)]:
        yield split(*(torch.randn(*lead, t + 1, d, generator=gen, dtype=dtype) * 2 for _ in range(3)))
    yield split(*(torch.randn(2, 4, 8, 7, generator=gen).transpose(-1, -2) for _ in range(3)))  # strided views


@_guarded
def check_decode_step(fn: Callable[..., torch.Tensor]) -> Result:
    """Check ``fn(q, k, v, k_cache, v_cache) -> out``: one decode step with a KV cache. ``q, k, v`` are the
    new position's ``(…, 1, d)``, the cache holds the ``T`` earlier positions ``(…, T, d)``; the output
    ``(…, 1, d)`` must equal the LAST row of causal attention recomputed over all ``T + 1`` positions."""
    for q, k, v, k_cache, v_cache, q_past in _decode_step_cases():
        shape = tuple(q.shape)
        out, error = _tensor_answer(fn, q, k, v, k_cache, v_cache, noun="the new position's output (…, 1, d)")
        if error is not None:
            return error
        full = [torch.cat(p, -2).double() for p in ((q_past, q), (k_cache, k), (v_cache, v))]
        want = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)[..., -1:, :]
        if out.shape != want.shape:
            if out.shape == (*shape[:-1], k_cache.shape[-2] + 1):
                return Result(False, "you returned the attention weights: multiply them by the values")
            return Result(False, f"for q of shape {shape} the output should have shape {shape} (one new position), "
                                 f"got {tuple(out.shape)}")
        if _close(out, want):
            continue
        for hint, wrong in _decode_step_variants(*(t.double() for t in (q, k, v, k_cache, v_cache))).items():
            if _close(out, wrong):
                return Result(False, hint)
        return Result(False, f"with a cache of {k_cache.shape[-2]} positions (q of shape {shape}) the output is not "
                             "the last row of full causal attention (largest difference "
                             f"{float((out - want).abs().max()):.3g})")
    return Result(True, "correct: one query against the cached keys and values plus its own equals the last row "
                        "of full recomputation — the KV cache's whole trick")


# --- chapter 04: a transformer block from its pieces ---------------------------------------------------


def _random_gpt2(seed: int = 4):
    """A small random GPT-2 with random norm gains and biases (so a misplaced norm shows) and eager
    attention (so attention called without a causal mask is not causal)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # eager attention, as tiny's: a fused kernel would make a maskless call causal on its own
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif type(module).__name__ == "Conv1D":  # weights (in, out) of unit gain: every sublayer counts
                fan_in = module.weight.shape[0]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in ** 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def _block_variants(x: torch.Tensor, layer) -> dict[str, torch.Tensor]:
    """The right block (``"ok"``) and the typical wrong ones, each named by its symptom."""
    from cyclelab.lab.forward_by_hand import gelu_mlp, layer_norm, self_attention

    def ln1(t):
        return layer_norm(t, layer.ln_1.weight, layer.ln_1.bias, layer.ln_1.eps)

    def ln2(t):
        return layer_norm(t, layer.ln_2.weight, layer.ln_2.bias, layer.ln_2.eps)

    def attn(t):
        return self_attention(t, layer.attn)

    def mlp(t):
        return gelu_mlp(t, layer.mlp)

    a = x + attn(ln1(x))
    no_attn_res = attn(ln1(x))
    post = ln1(x + attn(x))
    h = ln1(x)
    return {
        "ok": a + mlp(ln2(a)),
        "the attention result replaced the stream instead of being added to it: x = x + attn(ln_1(x)) "
        "(the residual add)": no_attn_res + mlp(ln2(no_attn_res)),
        "the MLP result replaced the stream instead of being added to it: x = x + mlp(ln_2(x)) (the residual add)":
            mlp(ln2(a)),
        "no residual adds at all: each sublayer must ADD its result to x (x = x + ...), not replace it":
            mlp(ln2(attn(ln1(x)))),
        "the norm comes after the residual add (post-norm, as in the 2017 transformer); GPT-2 normalises each "
        "sublayer's INPUT: x + attn(ln_1(x))": ln2(post + mlp(post)),
        "you normalised the sublayer's output; GPT-2 normalises its input: x + attn(ln_1(x)), not x + ln_1(attn(x))":
            (lambda y: y + ln2(mlp(y)))(x + ln1(attn(x))),
        "the residual add starts from the normalised x; add the sublayer's result to the raw stream x":
            (lambda y: ln2(y) + mlp(ln2(y)))(h + attn(h)),
        "ln_1 and ln_2 are swapped: ln_1 goes before attention, ln_2 before the MLP":
            (lambda y: y + mlp(ln1(y)))(x + attn(ln2(x))),
        "both sublayers used ln_1: the MLP has its own norm, ln_2": a + mlp(ln1(a)),
        "the MLP read the stream from BEFORE attention wrote into it (a parallel block): run the MLP on the "
        "updated x": a + mlp(ln2(x)),
        "the MLP ran before attention: attention first, then the MLP":
            (lambda y: y + attn(ln1(y)))(x + mlp(ln2(x))),
        "the attention sublayer is missing: the block is attention, then the MLP": x + mlp(ln2(x)),
        "the MLP sublayer is missing: after attention comes x = x + mlp(ln_2(x))": a,
        "the attention is not causal: each position also read the positions after it — give the layer's "
        "attention a causal mask (keys j > i set to -inf)": (lambda y: y + mlp(ln2(y)))(
            x + self_attention(ln1(x), layer.attn, causal=False)),
    }


def _block_cases(model: torch.nn.Module | None, seed: int = 5):
    """(layer index, layer, x) to try: every layer of the random GPT-2, of its float64 copy, and of
    ``model`` when given, on three shapes each."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    random_model = _random_gpt2()
    for m in [random_model, copy.deepcopy(random_model).double()] + ([model] if model is not None else []):
        dtype, width = next(m.parameters()).dtype, m.config.n_embd
        for i, layer in enumerate(m.transformer.h):
            for shape in ((1, 6, width), (2, 1, width), (1, 9, width)):
                yield i, layer, (torch.randn(*shape, generator=gen) * (1 + 2 * i)).to(dtype)


@_guarded
def check_block(fn: Callable, model: torch.nn.Module | None = None) -> Result:
    """Check ``fn(x, layer) -> x``: one GPT-2 block (``layer`` is a ``transformers`` GPT-2 block with
    ``ln_1``, ``attn``, ``ln_2``, ``mlp``) on ``x`` of shape ``(batch, positions, width)``: pre-norm
    attention and MLP, each added to the residual stream.

    Tried on every layer of a small random GPT-2 with random norm gains (in float32 and float64), and
    of ``model`` (e.g. ``tiny.model``) when given.
    """
    for i, layer, x in _block_cases(model):
        shape = tuple(x.shape)
        with torch.no_grad():
            out, error = _tensor_answer(
                fn, x.clone(), layer, noun="the new stream x", case=f"layer {i}, x of shape {shape}",
                in_place="your block changed its input (x += ... or the layer's weights) in place: "
                         "write x = x + ... so the caller's tensor is left alone")
            if error is not None:
                return error
            if out.shape != x.shape:
                return Result(False, f"the block must keep the shape {shape} (batch, positions, width); "
                                     f"got {tuple(out.shape)}")
            variants = {hint: wrong.double() for hint, wrong in _block_variants(x, layer).items()}
            want = variants.pop("ok")
            if torch.equal(out, x.double()):
                return Result(False, "the block returned its input unchanged: add the attention result, "
                                     "then the MLP result, to x")
            if _close(out, want):
                continue
            for hint, wrong in variants.items():
                if _close(out, wrong):
                    return Result(False, hint)
            if shape[1] > 1 and _close(out[:, :1], want[:, :1]):
                return Result(False, "position 0 is right but later ones are not: is the attention causal, "
                                     "and does each position keep its own residual?")
            return Result(False, f"on layer {i} with x of shape {shape} the result differs from the block "
                                 f"(largest difference {float((out - want).abs().max()):.3g})")
    return Result(True, "correct: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) — norm before, residual add after")


# --- chapter 04: LayerNorm and RMSNorm ------------------------------------------------------------------


def _norm_cases(seed: int = 14):
    """(x, weight, bias, eps) to normalise over the last axis: offset means (so a missing centring
    shows), a large eps (so a misplaced eps shows), float64, a non-contiguous view and, last, a
    constant vector (variance 0: only eps keeps it finite)."""
    gen = torch.Generator().manual_seed(seed)

    def case(shape, eps, dtype=torch.float32, offset=3.0):
        x = torch.randn(*shape, generator=gen, dtype=dtype) * 2 + offset
        d = shape[-1]
        weight = 1 + 0.5 * torch.randn(d, generator=gen, dtype=dtype)
        return x, weight, 0.3 * torch.randn(d, generator=gen, dtype=dtype), eps

    yield case((3, 16), 0.5)
    yield case((2, 5, 8), 1e-5)
    yield case((12,), 0.1, offset=-4.0)
    yield case((2, 3, 32), 1e-6, torch.float64)
    x, w, b, eps = case((6, 10), 0.2)
    yield x.T.contiguous().T, w, b, eps  # the same values as a non-contiguous view
    x, w, b, eps = case((2, 8), 1e-5)
    yield torch.cat([x[:1], torch.full((1, 8), 1.5)]), w, b, eps


def _layer_norm_variants(x, weight, bias, eps) -> dict[str, torch.Tensor]:
    """Typical wrong LayerNorms, each named by its symptom (float64)."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    centred = x - mean
    variants = {
        "you used the unbiased variance (divide by n − 1): LayerNorm divides by n — x.var(dim=-1, unbiased=False)":
            centred / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight + bias,
        "eps is missing: add it to the variance inside the square root, sqrt(var + eps)":
            centred / torch.sqrt(var) * weight + bias,
        "eps was added to the standard deviation: it goes inside the square root, sqrt(var + eps)":
            centred / (torch.sqrt(var) + eps) * weight + bias,
        "you did not subtract the mean: that is RMSNorm — LayerNorm centres first, x − mean":
            x / torch.sqrt(var + eps) * weight + bias,
        "you divided by the variance: divide by its square root, the standard deviation":
            centred / (var + eps) * weight + bias,
        "the learned gain and bias are missing: y = x̂ · weight + bias": centred / torch.sqrt(var + eps),
        "the bias is missing: y = x̂ · weight + bias": centred / torch.sqrt(var + eps) * weight,
        "the bias was added before the gain: multiply by weight first, then add bias":
            (centred / torch.sqrt(var + eps) + bias) * weight,
    }
    if x.dim() >= 2 and x.shape[-2] > 1:
        m0, v0 = x.mean(-2, keepdim=True), x.var(-2, unbiased=False, keepdim=True)
        variants["normalised over the wrong axis: each vector (the LAST axis, dim=-1) is normalised on its own"] = \
            (x - m0) / torch.sqrt(v0 + eps) * weight + bias
    return variants


def _rms_norm_variants(x, weight, eps) -> dict[str, torch.Tensor]:
    """Typical wrong RMSNorms, each named by its symptom (float64)."""
    ms = x.pow(2).mean(-1, keepdim=True)
    variants = {
        "you subtracted the mean: RMSNorm does not centre, it divides x itself by sqrt(mean(x²) + eps)":
            (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps) * weight,
        "you divided by the vector's length (the square root of the SUM of squares): RMS is sqrt(MEAN(x²))":
            x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight,
        "you divided by the mean square: take its square root, sqrt(mean(x²) + eps) (or torch.rsqrt)":
            x / (ms + eps) * weight,
        "eps is missing: add it to the mean square inside the square root": x / torch.sqrt(ms) * weight,
        "eps was added after the square root: it goes inside, sqrt(mean(x²) + eps)":
            x / (torch.sqrt(ms) + eps) * weight,
        "the learned gain is missing: multiply by weight": x / torch.sqrt(ms + eps),
        "you multiplied by (1 + weight), Gemma's convention: Llama multiplies by weight itself":
            x / torch.sqrt(ms + eps) * (1 + weight),
        "you divided by the mean ABSOLUTE value: RMS is the root of the mean of the squares, sqrt(mean(x²))":
            x / (x.abs().mean(-1, keepdim=True) + eps) * weight,
    }
    if x.dim() >= 2 and x.shape[-2] > 1:
        variants["normalised over the wrong axis: each vector (the LAST axis, dim=-1) is normalised on its own"] = \
            x / torch.sqrt(x.pow(2).mean(-2, keepdim=True) + eps) * weight
    return variants


def _check_norm(fn: Callable, name: str, with_bias: bool, reference: Callable, variants: Callable) -> Result | None:
    """Run ``fn`` on every norm case; None when all match ``reference``, else the ✗ Result."""
    for x, weight, bias, eps in _norm_cases():
        args = (x, weight, bias, eps) if with_bias else (x, weight, eps)
        out, error = _tensor_answer(fn, *args, noun="the normalised tensor (the shape of x)")
        if error is not None:
            return error
        want = reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        if out.shape != want.shape:
            return Result(False, f"{name} keeps the shape of x {tuple(x.shape)}, got {tuple(out.shape)}: normalise "
                                 "each vector (mean over dim=-1 with keepdim=True), do not reduce it away")
        if _close(out, want):
            continue
        if torch.isnan(out).any():
            return Result(False, "NaN in the output: a constant vector has variance 0 — eps inside the square root "
                                 "keeps the division finite")
        for hint, wrong in variants(*(a.double() if isinstance(a, torch.Tensor) else a for a in args)).items():
            if _close(out, wrong):
                return Result(False, hint)
        return Result(False, f"for x of shape {tuple(x.shape)} and eps {eps} the result differs from {name} "
                             f"(largest difference {float((out - want).abs().max()):.3g})")
    return None


@_guarded
def check_layer_norm(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Result:
    """Check ``fn(x, weight, bias, eps) -> y``: LayerNorm over the last axis, against
    ``torch.nn.functional.layer_norm``."""
    def reference(x, weight, bias, eps):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)

    failure = _check_norm(fn, "LayerNorm", True, reference, _layer_norm_variants)
    return Result(True, "correct: centre, divide by sqrt(var + eps) with the variance over n, then gain and bias") \
        if failure is None else failure


@_guarded
def check_rms_norm(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Result:
    """Check ``fn(x, weight, eps) -> y``: RMSNorm over the last axis (Llama's), against
    ``torch.nn.functional.rms_norm``."""
    def reference(x, weight, eps):
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)

    failure = _check_norm(fn, "RMSNorm", False, reference, _rms_norm_variants)
    return Result(True, "correct: divide by sqrt(mean(x²) + eps), then the gain — no centring, no bias") \
        if failure is None else failure


# --- chapter 05: decoding ---------------------------------------------------------------------------


def _top_p_variants(logits: torch.Tensor, p: float) -> dict[str, torch.Tensor]:
    """Nucleus filtering done right (``"ok"``: sorted from most likely, keep tokens while the mass
    BEFORE them is < p, the best always) and the typical wrong ways, each named by its symptom."""
    z = logits.double()
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    ranked = probs[order]
    before = torch.cumsum(ranked, 0) - ranked
    inf = torch.tensor(float("-inf"), dtype=torch.float64)

    def back(keep_ranked: torch.Tensor, values: torch.Tensor = z) -> torch.Tensor:
        keep = torch.zeros_like(keep_ranked)
        keep[order] = keep_ranked
        return torch.where(keep, values, inf)

    keep = (before < p) | (torch.arange(len(z)) == 0)
    up = torch.argsort(probs)
    keep_up = torch.zeros_like(keep)
    keep_up[up] = (torch.cumsum(probs[up], 0) - probs[up]) < p
    filtered_ranked = torch.where(keep, z[order], inf)
    return {
        "ok": back(keep),
        "the kept logits are in sorted order: put each back at its token's position (scatter by the sort "
        "order: out[order] = sorted_values)": filtered_ranked,
        "you put the kept logits back with gather (out = sorted[order]): the inverse of a sort is a scatter, "
        "out[order] = sorted_values": filtered_ranked[order],
        "you sorted from the least to the most likely: sort in DESCENDING order of probability":
            torch.where(keep_up, z, inf),
        "you dropped the token that makes the total reach p: keep the smallest set whose probability is AT "
        "LEAST p — the token that crosses p stays": back((torch.cumsum(ranked, 0) < p) | (torch.arange(len(z)) == 0)),
        "the most likely token was dropped: it is always kept, even when its own probability is above p":
            back(torch.cumsum(ranked, 0) < p),
        "you kept tokens after the cumulative probability passed p: a token is kept while the mass BEFORE "
        "it is below p": back(torch.cumsum(ranked, 0) - ranked <= p),
        "dropped tokens must get -inf (probability 0 after softmax), not 0: a logit of 0 is an ordinary score":
            torch.where(back(keep).isinf(), torch.zeros_like(z), z),
        "you returned probabilities: return the LOGITS, with -inf for the dropped tokens":
            torch.where(back(keep).isinf(), inf, probs),
        "you returned renormalised probabilities: return the LOGITS, with -inf for the dropped tokens":
            torch.where(back(keep).isinf(), inf, probs / probs[back(keep).isfinite()].sum()),
    }


def _top_p_symptom(logits: torch.Tensor, kept: torch.Tensor, nucleus: torch.Tensor) -> str:
    """What is wrong with keeping ``kept`` where ``nucleus`` is right, read from the two sets."""
    probs = torch.softmax(logits.double(), -1)
    if kept.any() and (~kept).any() and float(probs[kept].min()) < float(probs[~kept].max()):
        return ("you kept a less likely token while dropping a more likely one: sort in DESCENDING order of "
                "probability")
    if not bool(kept[int(probs.argmax())]):
        return "the most likely token was dropped: it is always kept, even when its own probability is above p"
    if int(kept.sum()) > int(nucleus.sum()):
        return (f"you kept tokens after the cumulative probability passed p: kept {int(kept.sum())}, the nucleus "
                f"has {int(nucleus.sum())}")
    if int(kept.sum()) < int(nucleus.sum()):
        return ("you dropped the token that makes the total reach p: keep the smallest set whose probability is "
                "AT LEAST p — the token that crosses p stays")
    return "the right tokens are kept but their logits changed: return the kept logits as they were"


def _same_filtered(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tokens dropped (-inf) and the same values kept."""
    kept = torch.isfinite(b)
    return (a.shape == b.shape and torch.equal(torch.isfinite(a), kept) and bool(torch.isneginf(a[~kept]).all())
            and torch.allclose(a[kept], b[kept], atol=1e-5))


def _top_p_cases(seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(seed)
    spike = torch.tensor([0.2, 6.0, 1.0, -1.0, 0.5])  # the best token alone holds ~0.98
    cases = [(torch.tensor([0.5, 2.0, -1.0, 1.0, 0.1, -3.0]), 0.8), (spike, 0.5), (spike, 0.9)]
    for n, scale, p in [(10, 1.0, 0.9), (50, 2.0, 0.5), (200, 3.0, 0.95), (30, 1.5, 0.1), (1000, 4.0, 0.7),
                        (8, 0.5, 0.99), (12, 2.0, 1.0)]:
        logits = torch.randn(n, generator=gen) * scale
        cases.append((logits[torch.randperm(n, generator=gen)], p))
    cases.append((torch.randn(40, generator=gen, dtype=torch.float64) * 2, 0.6))
    return cases


@_guarded
def check_top_p_filter(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Result:
    """Check ``fn(logits, p) -> logits``: nucleus (top-p) filtering of a ``(vocab,)`` logits vector.

    Keep the smallest set of most likely tokens whose probabilities add up to at least ``p`` (the token
    that crosses ``p`` is kept; the most likely token always is); the others get ``-inf``; kept logits
    are returned unchanged, each at its own position.
    """
    for logits, p in _top_p_cases():
        case = f"p = {p}, {len(logits)} tokens"
        out, error = _tensor_answer(
            fn, logits.clone(), p, noun="the logits", case=case,
            in_place="your function changed the logits it was given (in place): work on a copy "
                     "(e.g. logits.masked_fill(...), which returns a new tensor)")
        if error is not None:
            return error
        if out.shape != logits.shape:
            return Result(False, f"return one logit per token, shape {tuple(logits.shape)}; got {tuple(out.shape)}")
        variants = _top_p_variants(logits, p)
        want = variants.pop("ok")
        if _same_filtered(out, want):
            continue
        for hint, wrong in variants.items():
            if _same_filtered(out, wrong):
                return Result(False, f"{hint} ({case})")
        return Result(False, f"{_top_p_symptom(logits, torch.isfinite(out), torch.isfinite(want))} ({case})")
    return Result(True, "correct: the nucleus is the smallest set of most likely tokens holding at least p")


def _random_bert(seed: int = 6):
    """A small random BERT masked LM and its mask id (the last vocabulary entry)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32, type_vocab_size=1,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    return model, 59


@_guarded
def check_masked_prediction(fn: Callable, loaded=None) -> Result:
    """Check ``fn(model, ids, position, mask_id) -> (token_id, probability)``: hide ``ids[position]``
    behind the mask token, run the masked LM, and return its most likely token AT that position and
    that token's probability.

    Tried on a small random BERT, and on ``loaded`` (e.g. ``load("tiny-mlm")``) when given.
    """
    import math

    gen = torch.Generator().manual_seed(7)
    model, mask_id = _random_bert()
    trials = []
    for n, pos in ((8, 3), (5, 0), (12, 11), (6, 2)):
        trials.append((model, mask_id, torch.randint(0, 58, (n,), generator=gen).tolist(), pos))
    if loaded is not None:
        tok = loaded.tokenizer
        for text in ("ROMEO:\nBut soft, what light through yonder window breaks?", "KING:\nMy lord, I pray you."):
            ids = tok(text)["input_ids"]
            trials += [(loaded.model, tok.mask_token_id, ids, pos) for pos in (1, len(ids) // 2, len(ids) - 1)]
    for model, mask_id, ids, pos in trials:
        out, error = _call(fn, model, list(ids), pos, mask_id,
                           in_place="your function changed the caller's list of ids (or the model): copy the "
                                    "list before putting the mask in (masked = list(ids))")
        if error is not None:
            return error
        got = _pair(out)
        if isinstance(got, Result):
            return got
        token, prob = got

        def predict(inputs, at):
            with torch.no_grad():
                logits = model(torch.tensor([inputs])).logits[0, at].double()
            probs = torch.softmax(logits, -1)
            return int(torch.argmax(probs)), float(probs.max()), float(logits.max())

        masked = list(ids)
        masked[pos] = mask_id
        want, want_p, want_logit = predict(masked, pos)
        if token == want and abs(prob - want_p) < 1e-4:
            continue
        case = f"(position {pos} of {len(ids)})"
        with torch.no_grad():
            every = model(torch.tensor([masked])).logits[0].double()  # (positions, vocab)
        if token != want and token == int(every.argmax()):
            return Result(False, f"you returned the argmax index of the whole sequence {case}: argmax over the "
                                 "flattened (positions × vocab) logits counts across positions; take the logits AT "
                                 "the masked position first, logits[0, position], then its argmax")
        if token == want:
            if abs(prob - want_logit) < 1e-4:
                return Result(False, f"you returned the logit {case}: the probability is softmax(logits)[token]")
            if abs(prob - math.log(want_p)) < 1e-4:
                return Result(False, f"you returned the LOG-probability {case}: use softmax, not log_softmax")
            return Result(False, f"the token is right but its probability should be {want_p:.4f}, got {prob:.4f} "
                                 f"{case}: softmax over the vocabulary (the last axis) at the masked position")
        unmasked, _, _ = predict(ids, pos)
        if token == unmasked and unmasked != want:
            return Result(False, f"the model saw the answer {case}: replace ids[position] by the mask token "
                                 "before running the model")
        for shift, where in ((-1, "one position early"), (1, "one position late")):
            if 0 <= pos + shift < len(ids) and token == predict(masked, pos + shift)[0] and token != want:
                return Result(False, f"you read the logits {where} {case}: a masked LM predicts the token AT "
                                     "the mask — no shift, unlike a causal LM's next token")
        return Result(False, f"at {case} the masked LM's top token is {want}, you returned {token}")
    return Result(True, "correct: mask the position, run the encoder once, read the prediction AT the mask")


def _perplexity_variants(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity done right (``"ok"``: logits[i] scores ids[i + 1], exp of the mean negative
    log-likelihood) and the typical wrong ways, each named by its symptom."""
    import math

    z = logits.double()
    logp = torch.log_softmax(z, -1)

    def nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -rows.gather(-1, targets[:, None])[:, 0]

    right = nll(logp[:-1], ids[1:])
    n = len(right)
    return {
        "ok": math.exp(float(right.mean())),
        "you returned the mean negative log-likelihood (the loss): perplexity is exp of it": float(right.mean()),
        "you scored each position against its own token: logits[i] predicts the NEXT token, so compare "
        "logits[:-1] with ids[1:]": math.exp(float(nll(logp, ids).mean())),
        "you paired logits[i + 1] with ids[i]: the shift goes the other way, logits[:-1] against ids[1:]":
            math.exp(float(nll(logp[1:], ids[:-1]).mean())),
        "you summed the negative log-likelihoods: take the MEAN over the predicted tokens, then exp":
            math.exp(min(float(right.sum()), 700.0)),
        "you divided by all positions: only n - 1 tokens are predicted (the first has no prediction)":
            math.exp(float(right.sum()) / len(ids)),
        "you used the raw logits as log-probabilities: apply log_softmax over the vocabulary first":
            math.exp(min(float(nll(z[:-1], ids[1:]).mean()), 700.0)),
        "you averaged probabilities, not LOG-probabilities: the NLL of a token is -log p":
            math.exp(float(nll(logp[:-1].exp(), ids[1:]).mean())),
        "you dropped the minus sign: the NLL is -log p, so perplexity is at least 1":
            math.exp(-float(right.mean())),
        "you averaged exp(NLL) token by token: exponentiate the MEAN NLL once (a geometric mean of 1/p)":
            float(right.exp().mean()),
        "you raised 2 to an NLL in nats: use exp (2 ** goes with an NLL measured in bits, log2)":
            2.0 ** float(right.mean()),
        "you scored the most likely token at each position: score the token that actually comes next, ids[i + 1]":
            math.exp(float(-logp[:-1].amax(-1).mean())),
        f"you divided the NLL by the vocabulary size: the mean is over the {n} predicted tokens":
            math.exp(float(right.sum()) / z.shape[-1]),
    }


def _perplexity_cases(loaded=None):
    """``(what, logits, ids, transformers' exp(loss) or None)``: random logits, a random GPT-2 on a
    short sequence, and ``loaded``'s model on a line of the plays when given."""
    gen = torch.Generator().manual_seed(8)
    for seq, vocab, scale in ((6, 20, 2.0), (2, 7, 1.0), (12, 100, 4.0), (30, 50, 0.5)):
        yield f"{seq} positions, {vocab} tokens", torch.randn(seq, vocab, generator=gen) * scale, \
            torch.randint(0, vocab, (seq,), generator=gen), None
    models = [("a random GPT-2", _random_gpt2(), torch.randint(0, 50, (10,), generator=gen))]
    if loaded is not None:
        text = "ROMEO:\nBut soft, what light through yonder window breaks?"
        models.append((f"{loaded.name} on a line of the plays", loaded.model,
                       torch.tensor(loaded.tokenizer(text)["input_ids"])))
    for what, model, ids in models:
        with torch.no_grad():
            out = model(ids[None].to(model.device), labels=ids[None].to(model.device))
        yield what, out.logits[0].float().cpu(), ids, float(torch.exp(out.loss))


def _as_number(answer) -> float | Result:
    """A learner's one-number answer as a float, or a ✗ Result saying what came back."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_complex():
        return float(answer)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    return Result(False, f"return the perplexity as ONE number (a float), got {answer!r:.80}")


@_guarded
def check_perplexity(fn: Callable[[torch.Tensor, torch.Tensor], float], loaded=None) -> Result:
    """Check ``fn(logits, ids) -> float``: the perplexity of ``ids`` under a causal LM whose
    ``logits`` (``(positions, vocab)``) were computed on ``ids``: logits[i] predicts ids[i + 1],
    and perplexity = exp(mean negative log-likelihood of ids[1:]).

    Compared against a float64 computation, against the package's :func:`cyclelab.train.metrics.perplexity`
    of the same summed NLL, and, for a random GPT-2 (and ``loaded``, e.g. ``load("tiny")``, when
    given), against transformers' own ``exp(model(ids, labels=ids).loss)``.
    """
    import math

    from cyclelab.train.metrics import perplexity

    for what, logits, ids, hf in _perplexity_cases(loaded):
        out, error = _call(fn, logits.clone(), ids.clone(), case=what)
        if error is not None:
            return error
        got = _as_number(out)
        if isinstance(got, Result):
            return got
        variants = _perplexity_variants(logits, ids)
        want = variants.pop("ok")
        nll_sum = -float(torch.log_softmax(logits.double(), -1)[:-1].gather(-1, ids[1:, None]).sum())
        references = [want, perplexity(nll_sum, len(ids) - 1)] + ([hf] if hf is not None else [])
        if all(math.isclose(got, ref, rel_tol=1e-4) for ref in references):
            continue
        for hint, wrong in variants.items():
            if math.isclose(got, wrong, rel_tol=1e-4):
                return Result(False, f"{hint} ({what})")
        return Result(False, f"on {what} the perplexity is {want:.4f}, you returned {got:.4f}: exp of the mean "
                             "of -log_softmax(logits)[i, ids[i + 1]] over i = 0 .. n - 2")
    return Result(True, "correct: exp of the mean negative log-likelihood of each next token, as transformers' "
                        "exp(loss) computes it")


# --- chapter 06: LoRA's forward pass -----------------------------------------------------------------


def _lora_variants(x, W, A, B, alpha: float, r: int) -> dict[str, torch.Tensor]:
    """LoRA's output (``"ok"``) and the typical wrong ones, each named by its symptom."""
    base, update = x @ W, (x @ A) @ B
    return {
        "ok": base + update * alpha / r,
        f"the scale is alpha // r = {alpha // r:g} (floor division): use alpha / r = {alpha / r:g}":
            base + update * (alpha // r),
        "you returned the frozen layer alone: add the low-rank path (x @ A) @ B, scaled by alpha / r": base,
        "you returned only the low-rank update: LoRA ADDS it to the frozen output x @ W": update * alpha / r,
        f"the update is not scaled (alpha={alpha:g}, r={r}): multiply it by alpha / r": base + update,
        "the scale is upside down: it is alpha / r, not r / alpha": base + update * r / alpha,
        "the update is scaled by alpha alone: divide by the rank too, alpha / r": base + update * alpha,
        "the update is multiplied by alpha * r: the scale is alpha / r": base + update * alpha * r,
        "the update is divided by r alone: the scale is alpha / r": base + update / r,
        "the low-rank path is subtracted: LoRA ADDS (x @ A) @ B * alpha / r": base - update * alpha / r,
    }


@_guarded
def check_lora_forward(fn: Callable[..., torch.Tensor]) -> Result:
    """Check ``fn(x, W, A, B, alpha, r) -> y``: LoRA's output ``x @ W + (x @ A) @ B * alpha / r``
    for ``x`` (batch, in), ``W`` (in, out), ``A`` (in, r), ``B`` (r, out); in float32 and float64."""
    gen = torch.Generator().manual_seed(6)
    for n_in, n_out, r, alpha, dtype in [(8, 5, 2, 4.0, torch.float32), (12, 12, 3, 1.0, torch.float32),
                                         (6, 10, 1, 16.0, torch.float64), (16, 4, 4, 6.0, torch.float32)]:
        x, W = torch.randn(4, n_in, generator=gen), torch.randn(n_in, n_out, generator=gen)
        A, B = torch.randn(n_in, r, generator=gen), torch.randn(r, n_out, generator=gen)
        x, W, A, B = (t.to(dtype) for t in (x, W, A, B))
        y, error = _tensor_answer(fn, x, W, A, B, alpha, r, noun="y", case=f"in={n_in}, out={n_out}, r={r}")
        if error is not None:
            return error
        if tuple(y.shape) != (4, n_out):
            return Result(False, f"the output should have shape (batch, out) = (4, {n_out}), got {tuple(y.shape)}")
        variants = _lora_variants(*(t.double() for t in (x, W, A, B)), alpha, r)
        if _close(y, variants.pop("ok")):
            continue
        for hint, wrong in variants.items():
            if _close(y, wrong):
                return Result(False, hint)
        return Result(False, f"for in={n_in}, out={n_out}, r={r} the output differs from x @ W + (x @ A) @ B * alpha / r")
    return Result(True, "correct: the frozen path plus a rank-r update scaled by alpha / r")


# --- chapter 06: one training step -------------------------------------------------------------------


def _step_setup():
    """A small random GPT-2 (no dropout), token windows, and the run's settings: clipping active,
    the rate changing every step (warmup, then cosine)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cyclelab.train.finetune import TrainConfig

    torch.manual_seed(6)
    config = GPT2Config(vocab_size=48, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # GPT-2's class name names no loss: say which, or transformers warns
    data = list(torch.randint(0, 48, (12, 10), generator=torch.Generator().manual_seed(6)))
    cfg = TrainConfig(steps=4, batch_size=3, lr=2e-2, warmup=2, min_lr_ratio=0.1, clip=0.05, weight_decay=0.01,
                      seed=6, device="cpu")
    return model, data, cfg


def _step_loss(model, ids, how: str = "ok") -> torch.Tensor:
    logits = model(input_ids=ids).logits
    if how == "unshifted":
        pred, target = logits, ids
    elif how == "backwards":
        pred, target = logits[:, 1:], ids[:, :-1]
    else:
        pred, target = logits[:, :-1], ids[:, 1:]
    reduction = "sum" if how == "sum" else "mean"
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction=reduction)


def _mistaken_step(how: str):
    """A training step with one typical mistake ``how``, to tell which one a learner made."""
    def step(model, ids, opt, scheduler, clip):
        if how != "no zero_grad":
            opt.zero_grad()
        loss = _step_loss(model, ids, how)
        loss.backward()
        if how == "zero_grad before step":
            opt.zero_grad()
        if how != "no clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if how == "scheduler first":
            scheduler.step()
        if how != "no optimizer step":
            opt.step()
        if how not in ("no scheduler", "scheduler first"):
            scheduler.step()
        return loss.item()
    return step


_STEP_HINTS = {
    "unshifted": "the logits at position t were scored against token t itself: predict the NEXT token, "
                 "logits[:, :-1] against ids[:, 1:]",
    "backwards": "the shift goes the wrong way: logits[:, :-1] (every position but the last) predict ids[:, 1:]",
    "sum": "the loss is summed over tokens: take the mean (cross_entropy's default), or the step size depends "
           "on the batch",
    "no zero_grad": "gradients add up from one step to the next: call optimizer.zero_grad() in every step",
    "no clip": "the gradient norm is not clipped: torch.nn.utils.clip_grad_norm_(model.parameters(), clip) "
               "after backward, before optimizer.step()",
    "no optimizer step": "the weights never change: call optimizer.step() after loss.backward() (and do not "
                         "zero the gradients in between)",
    "no scheduler": "the learning rate never changes: call scheduler.step() after optimizer.step()",
    "scheduler first": "the schedule runs one step ahead: call scheduler.step() AFTER optimizer.step()",
}


def _run_steps(step_fn, model, data, cfg) -> tuple[list, Result | None]:
    """``cfg.steps`` calls of ``step_fn`` on the batches :func:`~cyclelab.train.finetune.train` draws;
    the returned losses, or a ✗ Result when the learner's function raised."""
    from cyclelab.train.finetune import batch_indices, make_optimizer, make_scheduler

    model.train()
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(opt, cfg)
    losses = []
    for step in range(cfg.steps):
        ids = torch.stack([data[i] for i in batch_indices(cfg.seed, step, len(data), cfg.batch_size)])
        try:
            losses.append(step_fn(model, ids, opt, scheduler, cfg.clip))
        except Exception as err:  # a learner's bug, reported instead of raised
            return losses, _raised(err, f"step {step}")
    return losses, None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, tol: float = 2e-4) -> bool:
    return all(_close(p.detach(), q.detach(), tol) for p, q in zip(a.parameters(), b.parameters()))


@_guarded
def check_training_step(fn: Callable[..., float]) -> Result:
    """Check ``fn(model, ids, optimizer, scheduler, clip) -> loss``: one step of causal LM training
    (forward, the shifted-label loss, backward, clip, optimizer step, schedule step). Its first loss
    must equal transformers' ``model(ids, labels=ids).loss``, and its weights after 4 steps those of
    :func:`cyclelab.train.finetune.train` on the same batches with the same seed."""
    import copy
    import warnings

    from cyclelab.train.finetune import batch_indices, lm_loss, train

    model, data, cfg = _step_setup()
    learner = copy.deepcopy(model)
    ids0 = torch.stack([data[i] for i in batch_indices(cfg.seed, 0, len(data), cfg.batch_size)])
    with torch.no_grad():
        want_loss = float(model(input_ids=ids0, labels=ids0).loss)  # transformers shifts the labels itself
    losses, error = _run_steps(fn, learner, data, cfg)
    if error is not None:
        return error
    first = losses[0]
    if first is None or isinstance(first, (str, bytes, tuple, list, dict)) or (
            isinstance(first, torch.Tensor) and first.numel() != 1):
        return Result(False, f"return the batch's loss as a number (loss.item()), got {first!r:.60}")
    first = float(first.detach() if isinstance(first, torch.Tensor) else first)
    if abs(first - want_loss) > 1e-4 * max(1.0, abs(want_loss)):
        with torch.no_grad():
            for how in ("unshifted", "backwards", "sum"):
                if abs(first - float(_step_loss(model, ids0, how))) <= 1e-4 * max(1.0, abs(first)):
                    return Result(False, _STEP_HINTS[how])
        return Result(False, f"the first step's loss is {first:.4f}, but the mean next-token cross-entropy of the "
                             f"batch is {want_loss:.4f}: return the loss computed before the weights change")
    reference = copy.deepcopy(model)
    train(reference, data, lm_loss, cfg)
    if _same_weights(learner, reference):
        return Result(True, "correct: the same weights as cyclelab.train.finetune.train after 4 steps, and the first loss "
                            "equals transformers' model(ids, labels=ids).loss")
    for how, hint in _STEP_HINTS.items():
        wrong = copy.deepcopy(model)
        with warnings.catch_warnings():  # torch warns about the mistake "scheduler first": that is the point
            warnings.simplefilter("ignore", UserWarning)
            _run_steps(_mistaken_step(how), wrong, data, cfg)
        if _same_weights(learner, wrong):
            return Result(False, hint)
    return Result(False, "the loss is right, but after 4 steps the weights differ from the package loop's: "
                         "zero_grad, backward, clip_grad_norm_(…, clip), optimizer.step(), scheduler.step()")


# --- chapter 07: efficiency — int8 quantization and the roofline --------------------------------------


def _int8_rows(seed: int = 7) -> list[torch.Tensor]:
    """Rows to quantize: random scales, one large outlier, all negative, a single value, all zeros."""
    gen = torch.Generator().manual_seed(seed)
    outlier = torch.randn(16, generator=gen) * 0.1
    outlier[5] = 3.0
    return [torch.randn(32, generator=gen), torch.randn(64, generator=gen) * 0.02, outlier,
            -torch.rand(8, generator=gen) - 0.5, torch.tensor([0.3]), torch.zeros(6)]


def _int8_hint(row: torch.Tensor, q: torch.Tensor, scale: float) -> str | None:
    """The symptom of a wrong (q, scale) for ``row``, or None when it is right."""
    absmax = float(row.abs().max())
    if absmax == 0:
        if scale != scale or not torch.isfinite(q).all() or q.abs().max() != 0:
            return "a row of zeros must give codes 0 (and a finite scale): do not divide by a scale of 0"
        return None
    want = absmax / 127
    if not torch.equal(q, torch.round(q)):
        return "the codes must be whole numbers: return round(x / scale), not the dequantized values"
    if abs(scale - 127 / absmax) < 1e-6 * max(1.0, 127 / absmax) and abs(scale - want) > 1e-9:
        return "the scale is upside down: scale = max|x| / 127, so that x / scale fills [-127, 127]"
    if abs(scale - absmax / 128) < 1e-9 or abs(scale - absmax / 255) < 1e-9:
        return "symmetric int8 uses [-127, 127]: scale = max|x| / 127"
    if abs(scale - want) > 1e-6 * want:
        if abs(scale - float(row.max()) / 127) < 1e-9:
            return "use the largest ABSOLUTE value, max|x|, or negative values fall outside [-127, 127]"
        return f"the scale should be max|x| / 127 = {want:.6g}, got {scale:.6g}"
    if q.abs().max() > 127:
        return "codes fall outside [-127, 127]: scale = max|x| / 127"
    if torch.equal(q, torch.trunc(row / scale)) and not torch.equal(q, torch.round(row / scale)):
        return "you cut off the fraction: ROUND x / scale to the nearest integer, so the error stays within scale / 2"
    if not torch.equal(q, torch.round(row / scale)):
        return "the codes should be round(x / scale) for every value of the row"
    return None


@_guarded
def check_int8_row(fn: Callable[[torch.Tensor], tuple[torch.Tensor, float]]) -> Result:
    """Check ``fn(row) -> (q, scale)``: symmetric int8 with ``scale = max|x| / 127`` and
    ``q = round(x / scale)``, so that ``|x - q × scale| <= scale / 2``."""
    for row in _int8_rows():
        answer, error = _call(fn, row.clone(), case=f"a row of {len(row)} values")
        if error is not None:
            return error
        try:
            q, scale = torch.as_tensor(answer[0]), float(answer[1])
            if q.is_complex() or q.dtype == torch.bool:
                raise TypeError(f"codes of dtype {q.dtype}")
            q = q.float()
        except (TypeError, ValueError, IndexError, RuntimeError):
            return Result(False, f"return (q, scale): the codes as a tensor and the scale as a number, "
                                 f"got {answer!r:.80}")
        if q.shape != row.shape:
            return Result(False, f"q should have the row's shape {tuple(row.shape)}, got {tuple(q.shape)}")
        hint = _int8_hint(row, q, scale)
        if hint is not None:
            return Result(False, f"on a row of {len(row)} values: {hint}")
    return Result(True, "correct: one scale max|x| / 127 per row, codes round(x / scale); each value comes back "
                        "within scale / 2")


def _roofline_cases() -> list[tuple[float, float, float, float]]:
    """(flops, bytes, peak FLOP/s, bandwidth bytes/s): memory-bound, compute-bound, at the ridge, a GEMV."""
    return [(2e6, 4e6, 50e9, 20e9), (2e9, 3e6, 50e9, 20e9), (5e6, 2e6, 50e9, 20e9),
            (2 * 576 * 576, 4 * 576 * 576, 33e9, 12e9)]


@_guarded
def check_attainable(fn: Callable[[float, float, float, float], float]) -> Result:
    """Check ``fn(flops, nbytes, peak, bandwidth) -> FLOP/s``: the roofline's
    ``min(peak, flops / nbytes × bandwidth)``."""
    for flops, nbytes, peak, bw in _roofline_cases():
        case = f"an op of {flops:.3g} FLOPs and {nbytes:.3g} bytes on peak {peak:.3g} FLOP/s, bandwidth {bw:.3g} B/s"
        answer, error = _call(fn, flops, nbytes, peak, bw, case=case)
        if error is not None:
            return error
        try:
            got = float(answer)
        except (TypeError, ValueError, RuntimeError):
            return Result(False, f"return the attainable FLOP/s as a number, got {answer!r}")
        intensity = flops / nbytes
        want = min(peak, intensity * bw)

        def near(x: float) -> bool:
            return abs(got - x) <= 1e-6 * abs(x)

        if near(want):
            continue
        if near(intensity * bw):
            return Result(False, f"for {case} you exceed the peak: the roof is flat at peak FLOP/s — take min(peak, ...)")
        if near(peak):
            return Result(False, f"for {case} memory is the limit: intensity × bandwidth is below the peak "
                                 "— take min(peak, ...)")
        if near(max(peak, intensity * bw)):
            return Result(False, "the roof is the LOWER of the two limits: min, not max")
        if near(min(peak, nbytes / flops * bw)):
            return Result(False, "arithmetic intensity is FLOPs per byte (flops / nbytes), not bytes per FLOP")
        if near(intensity):
            return Result(False, "that is the intensity itself: multiply by the bandwidth to get FLOP/s")
        return Result(False, f"for {case} the roof is min(peak, flops / nbytes × bandwidth) = {want:.4g}, got {got:.4g}")
    return Result(True, "correct: below the ridge an op is held by memory (intensity × bandwidth), above it by the peak")


# --- chapter 08: reasoning and knowledge — a patched cell, an integrated-gradients sum ----------------


def _engine_of(engine):
    """``engine``, or the course's ``tiny`` model in an engine (loaded once)."""
    if engine is not None:
        return engine
    if "tiny" not in _ENGINES:
        from cyclelab.core.engine import Engine

        _ENGINES["tiny"] = Engine("tiny")
    return _ENGINES["tiny"]


_ENGINES: dict = {}


def _hooked_patch(model, ids: list[int], layer: int, position, vector: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a plain ``transformers`` forward of ``ids`` with block ``layer``'s output
    at ``position`` (an index or a slice) replaced by ``vector``: forward hooks, no engine code."""
    body = getattr(model, "transformer", None) or model.model
    block = (body.h if hasattr(body, "h") else body.layers)[layer]

    def replace(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, position] = vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(replace)
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double()
    finally:
        handle.remove()


def _stream_patch(engine, ids: list[int], layer: int, op: str, position: int, vector: torch.Tensor) -> torch.Tensor:
    """Logits at every position of the engine's run with ``op``'s output at ``layer`` overwritten at ``position``
    (the wrong places a learner may patch: after attention instead of after the whole layer)."""
    from cyclelab.core.attention import KVCache
    from cyclelab.core.engine import drain

    def write(event) -> None:
        if event.op == op and event.layer == layer:
            event.tensors["out"][0, position] = vector

    steps = engine.forward(torch.tensor([ids]), KVCache(engine.arch.n_layers, len(ids)),
                           capture=lambda o, at: o == op and at == layer)
    return drain(steps, write)[0].double()


def _patch_cases(engine) -> list[tuple[list[int], int, int, torch.Tensor, int]]:
    """(corrupted ids, layer, position, clean vector, target) cells to try on ``engine``'s model."""
    from cyclelab.lab.patching import residual_stream

    pairs = {"gpt2": ("KING RICHARD:\nNow, my lord of", "KING HENRY:\nNow, my lord of"),
             "llama": ("The capital of France is", "The capital of Italy is")}[engine.arch.family]
    clean, corrupt = (engine.encode(p) for p in pairs)
    stream = residual_stream(engine, clean)
    last, diff = engine.arch.n_layers - 1, next(i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b)
    target = int(engine.logits(clean)[0, -1].argmax())
    return [(corrupt, layer, pos, stream[layer, pos], target)
            for layer, pos in ((1, diff), (last // 2, len(clean) - 1), (0, len(clean) - 1), (last, diff))]


def _patch_slips(engine, ids, layer, position, vector, target) -> list[tuple[str, Callable[[], float]]]:
    """(hint, the value that mistake gives, computed when asked) for the typical mistakes of one patched cell."""
    model, n = engine.loaded.model, engine.arch.n_layers

    def patched(other: int = layer, where=position) -> torch.Tensor:  # another layer: nothing written if none
        if not 0 <= other < n:
            with torch.no_grad():
                return engine.logits(ids)[0].double()
        return _hooked_patch(model, ids, other, where, vector)

    def prob(z: torch.Tensor) -> float:
        return float(torch.softmax(z, -1)[target])

    return [
        ("that is the target's LOGIT: take the softmax over the vocabulary first", lambda: float(patched()[-1, target])),
        ("that is a LOG-probability: softmax, not log_softmax",
         lambda: float(torch.log_softmax(patched()[-1], -1)[target])),
        ("you read the prediction at the patched position: the answer is read at the LAST position (logits[0, -1])",
         lambda: prob(patched()[position])),
        ("off by one layer: match event.layer to `layer` exactly (layers count from 0)", lambda: prob(patched(layer - 1)[-1])),
        ("off by one layer: match event.layer to `layer` exactly (layers count from 0)", lambda: prob(patched(layer + 1)[-1])),
        ("nothing changed: the patch never reached the run. Capture the op (capture={'residual_mlp'}) and write into "
         "event.tensors['out'] while the engine is paused at that event, before asking for the next one",
         lambda: prob(patched(n)[-1])),
        ("you patched the stream after ATTENTION (residual_attn): the stream after the whole layer is residual_mlp",
         lambda: prob(_stream_patch(engine, ids, layer, "residual_attn", position, vector)[-1])),
        ("you overwrote EVERY position with the vector: write only [0, position]",
         lambda: prob(patched(where=slice(None))[-1])),
    ]


def _near(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-7 + 1e-3 * abs(want)


@_guarded
def check_patched_prob(fn: Callable, engine=None) -> Result:
    """Check ``fn(engine, ids, layer, position, vector, target) -> probability``: run ``ids`` through the
    engine with the residual stream after ``layer`` (op ``residual_mlp``) at ``position`` overwritten by
    ``vector``, and return the probability of token ``target`` at the last position.

    Compared with a plain ``transformers`` forward whose block ``layer`` has a forward hook that does the
    same; tried on ``engine`` (default: the course's ``tiny``). A mistake is named when it explains the
    answers of every cell tried."""
    engine = _engine_of(engine)
    answers = []
    for ids, layer, position, vector, target in _patch_cases(engine):
        case = f"layer {layer}, position {position}"
        answer, error = _call(fn, engine, list(ids), layer, position, vector.clone(), target, case=case,
                              in_place="your function changed the clean vector or the ids it was given: "
                                       "write a copy of the vector into the run's tensor")
        if error is not None:
            return error
        try:
            answers.append((case, float(answer), (ids, layer, position, vector, target)))
        except (TypeError, ValueError, RuntimeError):
            return Result(False, f"return the target's probability as one number, got {answer!r:.80}")
    wrong = []
    for case, got, args in answers:
        want = float(torch.softmax(_hooked_patch(engine.loaded.model, *args[:4])[-1], -1)[args[4]])
        if not _near(got, want):
            wrong.append(f"{case}: the patched probability should be {want:.6g}, got {got:.6g}")
    if not wrong:
        return Result(True, "correct: the engine paused after the layer, you wrote the clean vector into its output, "
                            "and the rest of the run read it — the same probability as a transformers forward hook")
    slips = [_patch_slips(engine, *args) for _, _, args in answers]
    for i, (hint, _) in enumerate(slips[0]):  # all() stops at the first cell the mistake does not explain
        if all(_near(got, cell[i][1]()) for (_, got, _), cell in zip(answers, slips)):
            return Result(False, hint)
    return Result(False, wrong[0])


def _ig_cases() -> list[tuple[Callable, torch.Tensor, torch.Tensor, int]]:
    """(gradient function, input, baseline, steps): curved functions whose gradient is written out by hand."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 2
    return [(lambda p: torch.cos(p) * w, x, torch.zeros_like(x), 8),  # f = sum(w sin x)
            (lambda p: 3 * p ** 2, x[0], torch.full((4,), 0.5, dtype=torch.float64), 5),  # f = sum(x^3)
            (lambda p: torch.exp(p) * w[1:], x[1:], torch.zeros_like(x[1:]), 12)]  # f = sum(w e^x)


def _ig_reference(grad_fn, x, baseline, steps: int, alphas=None, scale: float = 1.0) -> torch.Tensor:
    """(x - baseline) × the mean gradient at ``alphas`` (default: the midpoints), by a plain loop."""
    alphas = [(k + 0.5) / steps for k in range(steps)] if alphas is None else alphas
    total = sum(grad_fn(baseline + a * (x - baseline)) for a in alphas)
    return (x - baseline) * total / len(alphas) * scale


@_guarded
def check_ig_sum(fn: Callable) -> Result:
    """Check ``fn(grad_fn, x, baseline, steps) -> attributions``: integrated gradients by the midpoint rule,
    ``(x - baseline) × mean_k grad_fn(baseline + (k + ½)/steps · (x - baseline))``, shaped like ``x``."""
    for grad_fn, x, baseline, steps in _ig_cases():
        case = f"an input of shape {tuple(x.shape)}, {steps} steps"
        got, error = _tensor_answer(fn, grad_fn, x.clone(), baseline.clone(), steps, noun="the attributions",
                                    case=case)
        if error is not None:
            return error
        if got.shape != x.shape:
            return Result(False, f"{case}: return one attribution per input value, shape {tuple(x.shape)}, "
                                 f"got {tuple(got.shape)} (average over the steps, do not stack them)")
        if _close(got, _ig_reference(grad_fn, x, baseline, steps)):
            continue
        slips = [
            (_ig_reference(grad_fn, x, baseline, steps, [k / steps for k in range(steps)]),
             "you used the LEFT end of each step (k / steps): use the midpoints (k + 0.5) / steps"),
            (_ig_reference(grad_fn, x, baseline, steps, [(k + 1) / steps for k in range(steps)]),
             "you used the RIGHT end of each step ((k + 1) / steps): use the midpoints (k + 0.5) / steps"),
            (_ig_reference(grad_fn, x, baseline, steps, scale=steps), "you summed the gradients: take their MEAN "
                                                                      "(divide by steps)"),
            (_ig_reference(grad_fn, x, baseline, steps) / (x - baseline), "that is the average gradient alone: "
                                                                          "multiply it by (x - baseline)"),
            (grad_fn(x) * x, "that is gradient × input: average the gradient ALONG THE PATH from the baseline to x"),
            ((x - baseline) * sum(grad_fn((k + 0.5) / steps * x) for k in range(steps)) / steps,
             "the path ignores the baseline: the points are baseline + alpha · (x - baseline)"),
        ]
        for value, hint in slips:
            if _close(got, value):
                return Result(False, f"{case}: {hint}")
        return Result(False, f"{case}: the attributions differ from (x - baseline) × the mean gradient at the "
                             "midpoints; print your alphas (they should be (k + 0.5) / steps)")
    return Result(True, "correct: the midpoint Riemann sum of the gradient along the straight path, times "
                        "(x - baseline) — captum's IntegratedGradients with method='riemann_middle'")


# --- chapter 08: the knowledge graph's lookup ----------------------------------------------------------------

#: A small graph written out by hand: upper-case characters, lower-case plays, "LADY MACBETH" beside "MACBETH".
_KG_EDGES = [("BANQUO", "character in", "macbeth"), ("MACBETH", "character in", "macbeth"),
             ("LADY MACBETH", "character in", "macbeth"), ("BANQUO", "appears in", "macbeth 1.3"),
             ("MACBETH", "appears in", "macbeth 1.3"), ("BANQUO", "speaks to", "MACBETH"),
             ("LADY MACBETH", "speaks to", "MACBETH"), ("MACBETH", "speaks to", "ROSS"), ("IAGO", "character in", "othello"),
             ("ANGUS", "speaks to", "BANQUO")]
#: Each question's facts, by hand: (name as asked, the indices into _KG_EDGES of the facts that name them).
_KG_CASES = [("Macbeth", [1, 4, 5, 6, 7]), (" banquo ", [0, 3, 5, 9]), ("ROSS", [7]), ("iago", [8]), ("Hamlet", [])]


def _lookup_slips(edges: list, name: str) -> list[tuple[str, object]]:
    """(hint, the answer that mistake gives) for the typical mistakes of a graph lookup."""
    key = name.strip().upper()
    return [
        ("a fact can name them as its TAIL too: ('BANQUO', 'speaks to', 'MACBETH') is a fact about Macbeth",
         [e for e in edges if e[0] == key]),
        ("you kept only the facts that name them as the TAIL: the HEAD counts too", [e for e in edges if e[2] == key]),
        ("strip the spaces around the name first (' banquo ' is Banquo)", [e for e in edges if name.upper() in (e[0], e[2])]),
        ("no facts came back: compare in upper case — the graph's names are upper case ('BANQUO'), the name asked "
         "may not be",
         [e for e in edges if name.strip() in (e[0], e[2])]),
        ("'MACBETH' is inside 'LADY MACBETH': compare whole names (==), not `in`",
         [e for e in edges if key in e[0] or key in e[2]]),
        ("you compared in lower case on both sides, so the play 'macbeth' matched too: upper-case the name and "
         "compare it with the names as the graph stores them", [e for e in edges if key.lower() in (e[0].lower(), e[2].lower())]),
        ("keep the edges' order (the play fact comes first, and the prompt keeps that order): do not sort",
         sorted(e for e in edges if key in (e[0], e[2]))),
        ("you stopped at the first fact: collect EVERY edge that names them", [e for e in edges if key in (e[0], e[2])][:1]),
    ]


def _as_facts(answer) -> list | None:
    """The answer as a list of facts (tuples; a fact given as a list is read as a tuple), or None if it is not a list."""
    if not isinstance(answer, (list, tuple)):
        return None
    return [tuple(a) if isinstance(a, list) else a for a in answer]


@_guarded
def check_graph_lookup(fn: Callable[[list, str], list]) -> Result:
    """Check ``fn(edges, name) -> facts``: every ``(head, relation, tail)`` edge whose head or tail is ``name``
    (the whole name, in any case, spaces around it ignored), in the edges' order. Compared with facts
    picked out by hand from a small graph."""
    for name, picked in _KG_CASES:
        edges = list(_KG_EDGES)
        case = f"the facts about {name!r}"
        answer, error = _call(fn, edges, name, case=case, in_place="your function changed the list of edges: "
                                                                   "build a new list of the facts it keeps")
        if error is not None:
            return error
        got, want = _as_facts(answer), [_KG_EDGES[i] for i in picked]
        if got is None:
            return Result(False, f"{case}: return a list of facts (head, relation, tail), got {type(answer).__name__}")
        if got == want:
            continue
        if got and all(isinstance(fact, str) for fact in got):
            return Result(False, f"{case}: return the whole facts (head, relation, tail), not just names")
        for hint, value in _lookup_slips(edges, name):
            if got == value:
                return Result(False, f"{case}: {hint}")
        return Result(False, f"{case}: expected {want}, got {got!r:.200}")
    return Result(True, "correct: every edge whose head or tail is the whole name, in the graph's order — "
                        "the facts the prompt will carry")


# --- chapter 09: robustness and long text — HotFlip's swap scores, overlapping spans ---------------------


def _swap_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(grad, embeddings, ids): a few positions and a small vocabulary, a repeated token, a single position."""
    gen = torch.Generator().manual_seed(9)
    return [(torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64),
             torch.tensor([2, 5, 2, 0])),
            (torch.randn(1, 5, generator=gen), torch.randn(6, 5, generator=gen), torch.tensor([3])),
            (torch.randn(3, 2, generator=gen), torch.randn(4, 2, generator=gen), torch.tensor([1, 1, 3]))]


def _swap_reference(grad: torch.Tensor, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """By brute force: for every swap, the whole input's gradient dotted with the change of the input."""
    x = embeddings[ids].double()
    out = torch.zeros(len(ids), len(embeddings), dtype=torch.float64)
    for i in range(len(ids)):
        for v in range(len(embeddings)):
            swapped = x.clone()
            swapped[i] = embeddings[v].double()
            out[i, v] = (grad.double() * (swapped - x)).sum()
    return out


@_guarded
def check_swap_scores(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(grad, embeddings, ids) -> scores``: HotFlip's first-order loss change of every swap,
    ``scores[i, v] = (E[v] − E[ids[i]]) · grad[i]``, shaped (tokens, vocab)."""
    for grad, emb, ids in _swap_cases():
        case = f"{len(ids)} positions, a vocabulary of {len(emb)}, width {emb.shape[1]}"
        got, error = _tensor_answer(fn, grad.clone(), emb.clone(), ids.clone(), noun="the scores", case=case)
        if error is not None:
            return error
        want = _swap_reference(grad, emb, ids)
        if got.numel() == 2 or got.dim() == 0:
            return Result(False, f"{case}: return the whole (tokens, vocab) matrix of scores, not the best swap "
                                 "(the attack picks it afterwards)")
        if got.shape == want.T.shape and got.shape != want.shape:
            return Result(False, f"{case}: the scores are transposed: one row per POSITION, one column per token "
                                 f"of the vocabulary, shape {tuple(want.shape)}")
        if got.shape != want.shape:
            return Result(False, f"{case}: return one score per (position, token): shape {tuple(want.shape)}, "
                                 f"got {tuple(got.shape)}")
        if _close(got, want):
            continue
        g, e = grad.double(), emb.double()
        slips = [
            (-want, "the sign is flipped: the score is the RISE of the loss, (E[v] − E[ids[i]]) · grad[i]"),
            (g @ e.T, "you left out the current token: subtract grad[i] · E[ids[i]], so that keeping the token "
                      "scores 0"),
            (g @ e.T - (g * e[ids]).sum(), "you subtracted the whole input's term: row i subtracts only its "
                                          "own position's grad[i] · E[ids[i]]"),
            (-torch.cdist(e[ids], e), "the gradient is missing: a swap scores its change E[v] − E[ids[i]] dotted "
                                      "with grad[i], not its distance"),
            ((e.norm(dim=-1)[None] - e[ids].norm(dim=-1)[:, None]) * g.norm(dim=-1, keepdim=True),
             "multiply the vectors, not their lengths: a dot product (E[v] − E[ids[i]]) · grad[i]"),
        ]
        for value, hint in slips:
            if value.shape == got.shape and _close(got, value):
                return Result(False, f"{case}: {hint}")
        return Result(False, f"{case}: the scores differ from (E[v] − E[ids[i]]) · grad[i]; compare row 0 with "
                             "grad[0] @ E.T − grad[0] @ E[ids[0]]")
    return Result(True, "correct: one matrix product scores every swap at once, the first-order (HotFlip) "
                        "estimate of how much each would raise the loss")


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
    if len(got) > len(want) and got[:len(want)] == want:
        return "a span too many: stop at the first span that reaches n (the next would lie inside it)"
    return f"for n={n}, size={size}, overlap={overlap} the spans are {want}"


@_guarded
def check_overlapping_spans(fn: Callable[[int, int, int], list[tuple[int, int]]]) -> Result:
    """Check ``fn(n, size, overlap) -> [(start, end), ...]``: half-open windows of at most ``size`` tokens,
    starts ``size − overlap`` apart, the last the first to reach ``n``."""
    for (n, size, overlap), want in _SPAN_CASES.items():
        answer, error = _call(fn, n, size, overlap, case=f"n={n}, size={size}, overlap={overlap}")
        if error is not None:
            return error
        try:
            got = [(int(s), int(e)) for s, e in answer]
        except (TypeError, ValueError):
            return Result(False, f"return a list of (start, end) pairs, got {answer!r:.80}")
        if got != want:
            return Result(False, f"n={n}, size={size}, overlap={overlap}: you returned {got}; "
                                 + _spans_hint(got, want, n, size, overlap))
    return Result(True, "correct: every token lies in a span, neighbours share `overlap` tokens, and no span "
                        "is wasted — the same spans serve minilm's chunks and tiny's sliding window")
