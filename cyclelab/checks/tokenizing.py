"""Chapter 01's checks: one BPE merge step, the pair counts, and encoding a pre-token by its merges."""

from __future__ import annotations

from collections.abc import Callable

from cyclelab.checks.harness import Failed, call, checker


def _ref_merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Reference BPE merge step: every occurrence of ``pair``, left to right, without overlaps
    (the trainer's own merge, which is checked against the ``tokenizers`` library)."""
    from cyclelab.lab.tokenization import merge_word

    merged = list(ids)
    merge_word(merged, pair, new_id)
    return merged


def _merge_pair_cases(seed: int = 0) -> list[tuple[list[int], tuple[int, int], int]]:
    """Hand-picked cases (plain, overlapping, at the end, absent, reversed, tiny) then random ones."""
    import random

    cases = [
        ([1, 2, 3, 2, 1, 2, 4], (1, 2), 99),
        ([7, 5, 5, 5, 8], (5, 5), 9),
        ([5, 5, 5, 5], (5, 5), 9),
        ([3, 1, 2], (1, 2), 7),
        ([2, 1, 2, 1], (1, 2), 7),
        ([1, 3, 4], (1, 2), 7),
        ([], (1, 2), 7),
        ([1], (1, 2), 7),
        ([11, 2], (1, 2), 7),
        ([1, 21, 2], (1, 2), 9),
        ([12, 1, 2, 3], (1, 2), 40),
        ([10, 11, 2, 1, 2], (1, 2), 5),
    ]
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
        return f"the second token of each pair is still there ({case}): after a merge, jump over both tokens (i += 2)"
    if got == _ref_merge_pair(ids, (b, a), new_id) and got != want:
        return f"you merged the pair the wrong way round ({case}): order matters, (a, b) is not (b, a)"
    if got == first_only and got != want:
        return f"only the first occurrence was merged ({case}): replace every occurrence"
    strangers = sorted(set(got) - set(ids) - {new_id})
    if strangers:
        return (
            f"your result holds ids that were in neither the input nor the merge ({strangers}; {case}): "
            "did you merge digits of a string? Compare whole ids, ids[i] == a and ids[i + 1] == b"
        )
    if a == b:
        if got.count(new_id) > want.count(new_id) or len(got) < len(want):
            return (
                f"overlapping pairs ({case}): one token was used by two merges. In [{a}, {a}, {a}] the "
                f"pair ({a}, {a}) starts at 0 and at 1, but after merging at 0 the middle {a} is gone: "
                "skip past both tokens and scan left to right"
            )
        rev = _ref_merge_pair(ids[::-1], pair, new_id)[::-1]
        if got == rev:
            return f"overlapping pairs ({case}): you merged from the right; BPE merges left to right"
        return f"overlapping pairs ({case}): scan left to right, merge, then skip past both tokens"
    if len(got) == len(want) - 1 and got == want[:-1]:
        return f"the last token went missing ({case}): the final position needs handling too"
    if want and want[-1] == new_id and got[-2:] == [a, b]:
        return f"a pair at the very end was not merged ({case}): check your loop's last index"
    return case


@checker
def check_merge_pair(fn: Callable[[list[int], tuple[int, int], int], list[int]]) -> str:
    """Check ``fn(ids, pair, new_id) -> list``: one BPE merge step (left to right, no overlaps)."""
    for ids, pair, new_id in _merge_pair_cases():
        got = call(
            fn,
            list(ids),
            pair,
            new_id,
            case=f"merging {pair} in {ids}",
            in_place="your function changed its input list: build and return a new list",
        )
        if got is None:
            raise Failed("your function returned None: build and return the new list of ids")
        try:
            got = [int(x) for x in got]
        except (TypeError, ValueError):
            raise Failed(f"return a list of ints, got {got!r}")
        if got != _ref_merge_pair(ids, pair, new_id):
            raise Failed(_merge_pair_hint(ids, pair, new_id, got))
    return "correct: every occurrence merged, left to right, overlapping pairs handled"


def _count_pairs_cases(seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    cases = [[1, 2, 1, 2, 3], [5, 5, 5], [1, 2, 2, 1], [4, 2], [], [7], [10, 1, 0, 1], [12, 1, 2, 12]]
    cases += [[rng.choice((0, 1, 2, 3, 10, 12)) for _ in range(rng.randint(2, 40))] for _ in range(100)]
    return cases


@checker
def check_count_pairs(fn: Callable[[list[int]], dict]) -> str:
    """Check ``fn(ids) -> {(a, b): count}``: how often each adjacent pair occurs (overlaps included)."""
    from collections import Counter

    for ids in _count_pairs_cases():
        want = dict(Counter(zip(ids, ids[1:])))
        short = "a list of fewer than two ids has no pairs, return {}" if len(ids) < 2 else ""
        got = call(fn, list(ids), case=f"on {ids}", hint=short)
        if not isinstance(got, dict):
            raise Failed(f"return a dict {{(a, b): count}}, got {type(got).__name__}")
        if any(not (isinstance(k, tuple) and len(k) == 2) for k in got):
            raise Failed(f"keys must be pairs (a, b) as tuples, got keys like {next(iter(got))!r}")
        got = {k: v for k, v in got.items() if v}
        if got == want:
            continue
        case = f"on {ids}: expected {want}, got {got}"
        if not got and want:
            raise Failed(f"nothing was counted ({case}): look at every neighbour pair (ids[i], ids[i + 1])")
        if len(ids) > 2 and got == dict(Counter(zip(ids[:-1], ids[1:-1]))):
            raise Failed(f"the last pair is missing ({case}): n ids have n - 1 adjacent pairs")
        if got == dict(Counter(zip(ids[::2], ids[1::2]))):
            raise Failed(
                f"you skipped every other pair ({case}): pairs overlap — in [a, b, c] both (a, b) and (b, c) count"
            )
        if set(got) == set(want) and all(v == 1 for v in got.values()):
            raise Failed(f"each pair was counted once ({case}): count every occurrence")
        if set(got) <= {tuple(sorted(k)) for k in want} and set(got) != set(want):
            raise Failed(f"(a, b) and (b, a) were counted together ({case}): pairs are ordered")
        raise Failed(case)
    return "correct: every adjacent pair counted, overlapping ones included"


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
        "you stopped after one merge: keep merging until no neighbour pair is in ranks": replay(
            lambda known, parts: min(known, key=lambda i: rank(parts, i)), once=True
        ),
        "you merged the leftmost pair that has a rank; BPE merges the pair with the LOWEST rank first, "
        "wherever it is in the word": replay(lambda known, parts: known[0]),
        "you merged the pair with the HIGHEST rank first: rank 0 is the merge learned first, and it goes first": replay(
            lambda known, parts: max(known, key=lambda i: rank(parts, i))
        ),
        "you glued a pair the wrong way round: the new token is left + right": replay(
            lambda known, parts: min(known, key=lambda i: rank(parts, i)), glue=lambda a, b: b + a
        ),
        "only the first occurrence of each pair was merged: a pair can occur twice in a word (an in banana)": first_occurrence_each(),
        "you matched the longest known piece from the left, WordPiece's rule: BPE replays its merges by rank": longest_first(),
    }


#: Merges (earliest first) and words for :func:`check_apply_merges`, in byte characters (Ġ is a space).
_MERGE_RULES = [
    ("e", "r"),
    ("h", "e"),
    ("a", "n"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("an", "a"),
    ("b", "an"),
    ("Ġthe", "r"),
    ("Ġ", "b"),
    ("n", "a"),
    ("Ġb", "ana"),
    ("o", "u"),
    ("e", "e"),
    ("ee", "r"),
    ("o", "n"),
    ("i", "on"),
    ("t", "i"),
    ("t", "ion"),
]
_MERGE_WORDS = [
    "her",
    "Ġthe",
    "banana",
    "Ġbanana",
    "Ġthere",
    "Ġbeer",
    "Ġyou",
    "eee",
    "x",
    "",
    "ĠROMEO",
    "nanana",
    "tion",
]


@checker
def check_apply_merges(fn: Callable[[list[str], dict[tuple[str, str], int]], list[str]]) -> str:
    """Check ``fn(word, ranks) -> tokens``: encode one pre-token (a list of byte characters) by
    repeatedly merging the neighbour pair of lowest rank, against ``tokenizers``' BPE model.
    A wrong answer is named by the typical mistake that gives the same tokens on every word."""
    ranks = {pair: rank for rank, pair in enumerate(_MERGE_RULES)}
    answers = {}
    for word in _MERGE_WORDS:
        got = call(
            fn,
            list(word),
            dict(ranks),
            case=f"encoding {list(word)}",
            in_place="your function changed its input list: work on a copy, list(word)",
        )
        if isinstance(got, str):
            raise Failed(f"return a list of token strings, not one string ({got!r})")
        if not isinstance(got, (list, tuple)) or not all(isinstance(t, str) for t in got):
            raise Failed(f"return a list of token strings, got {got!r:.80}")
        answers[word] = list(got)
    wrong = [w for w in _MERGE_WORDS if answers[w] != _ref_apply_merges(list(w), _MERGE_RULES)]
    if not wrong:
        return "correct: the merges replay by rank, lowest first, until none applies — BPE encoding"
    variants = {w: _merge_variants(list(w), ranks) for w in _MERGE_WORDS}
    hints = [h for h in variants[wrong[0]] if all(variants[w][h] == answers[w] for w in _MERGE_WORDS)]
    hints = hints or [h for h, tokens in variants[wrong[0]].items() if tokens == answers[wrong[0]]]
    case = (
        f"encoding {list(wrong[0])} with the merges {_MERGE_RULES[:3]}…: expected "
        f"{_ref_apply_merges(list(wrong[0]), _MERGE_RULES)}, got {answers[wrong[0]]}"
    )
    raise Failed(f"{hints[0]} ({case})" if hints else case)
