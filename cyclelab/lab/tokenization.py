"""FETCH, part one: text → bytes → tokens. A byte-level BPE tokenizer written from scratch.

Byte-level BPE (byte-pair encoding), as in GPT-2, Llama 3 and the course's ``tiny`` model:

1. **Bytes.** Text is encoded as UTF-8, so every string is a sequence of values 0–255 and
   no character is ever unknown. Each byte is shown as one printable character
   (:func:`bytes_to_unicode`): most look like themselves, a space becomes ``Ġ`` and a
   newline ``Ċ``.
2. **Pre-tokenization.** A regular expression (:data:`GPT2_PATTERN`) cuts the text into
   words, numbers, punctuation runs and whitespace (:func:`pretokenize`); a space stays
   glued to the front of the word after it. Merges never cross these boundaries. It runs
   in ``tokenizers``' regex engine, so every character of Unicode is cut the same way.
3. **Merges.** Training starts from the 256 bytes and repeatedly fuses the most frequent
   adjacent pair of symbols into a new symbol (:meth:`BPE.train`). Encoding replays the
   learned merges, earliest first (:meth:`BPE.encode`).

:class:`BPE` reproduces the Hugging Face ``tokenizers`` trainer exactly — the same merges
in the same order, the same ids, the same encodings — as
``ByteLevelBPETokenizer(add_prefix_space=False).train_from_iterator(...)`` with the same
``vocab_size``, ``min_frequency`` and ``special_tokens``. Two details make that so: ties
between pairs of equal count go to the pair whose ids are smallest (left id first), and
the pair counts are updated incrementally after each merge, exactly as the Rust trainer
does (see :meth:`BPE.train`).

:mod:`cyclelab.lab.tokenizer_compare` sets it beside ``tokenizers``' trainer and the real models' tokenizers.
"""

from __future__ import annotations

import heapq
import itertools
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from tokenizers import Regex
from tokenizers.pre_tokenizers import Split

#: GPT-2's pre-tokenizer, part by part: each alternative of the regular expression and what it
#: cuts. At each position the first alternative that matches wins (see :func:`explain_pretokens`).
GPT2_PATTERN_PARTS: tuple[tuple[str, str], ...] = (
    (r"'s|'t|'re|'ve|'m|'ll|'d", "an English contraction, cut off the word before it (lowercase only)"),
    (r" ?\p{L}+", "a run of letters (any script), with at most one space in front"),
    (r" ?\p{N}+", "a run of digits, with at most one space in front"),
    (r" ?[^\s\p{L}\p{N}]+", "a run of other symbols (punctuation, emoji), with at most one space in front"),
    (
        r"\s+(?!\S)",
        "whitespace not followed by a non-space: a run that ends the text, or a run before a word "
        "less its last character",
    ),
    (r"\s+", "the whitespace character left right before a word that cannot take it (a newline, a tab)"),
)
#: The whole pattern, the same as ``tokenizers``' ``ByteLevel`` pre-tokenizer's.
GPT2_PATTERN = "|".join(part for part, _ in GPT2_PATTERN_PARTS)
#: The pattern run by ``tokenizers``' own regex engine (Oniguruma), so that which characters
#: count as letters (``\p{L}``) or numbers (``\p{N}``) comes from the same Unicode tables.
_SPLIT = Split(Regex(GPT2_PATTERN), behavior="isolated")

#: Shown by :func:`show_tokens` between tokens, and in place of invisible characters.
DIVIDER = "│"
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte (0–255) to one printable character.

    Printable Latin-1 bytes (``!``–``~``, ``¡``–``¬``, ``®``–``ÿ``: 188 of them) map to
    themselves; the other 68 (control characters, space, …) map to ``chr(256 + k)`` in
    order, so a space (byte 32) becomes ``Ġ`` (U+0120) and a newline (byte 10) ``Ċ``.
    Every token can then be stored and printed as an ordinary string.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`: printable character → byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


def require_text(text, what: str = "text") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, not {type(text).__name__}; decode bytes first (bytes.decode('utf-8'))")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # only a lone surrogate (U+D800..U+DFFF) has no UTF-8 bytes
        raise ValueError(
            f"{what} has a lone surrogate U+{ord(text[err.start]):04X} at position {err.start}: it is "
            "no character and has no UTF-8 bytes; decode the source with errors='replace' first"
        ) from None
    return text


def to_byte_chars(piece: str) -> str:
    """``piece`` as UTF-8 bytes, each byte written as its :func:`bytes_to_unicode` character."""
    # latin-1 turns byte b into chr(b); translate then looks up b in the table
    return piece.encode("utf-8").decode("latin-1").translate(bytes_to_unicode())


def pretokenize(text: str, byte_level: bool = True) -> list[str]:
    """Cut ``text`` into pre-tokens with GPT-2's regular expression (:data:`GPT2_PATTERN`).

    With ``byte_level=True`` (the default) each piece is returned in byte characters, as
    ``tokenizers``' ``ByteLevel(add_prefix_space=False)`` pre-tokenizer does: ``" king"``
    becomes ``"Ġking"``. With ``byte_level=False`` the raw pieces are returned.

    >>> pretokenize("ROMEO: I'll go.", byte_level=False)
    ['ROMEO', ':', ' I', "'ll", ' go', '.']
    """
    parts = [piece for piece, _ in _SPLIT.pre_tokenize_str(require_text(text))]
    return [to_byte_chars(p) for p in parts] if byte_level else parts


def explain_pretokens(text: str) -> list[tuple[str, str]]:
    """Each pre-token of ``text`` with the part of :data:`GPT2_PATTERN_PARTS` that cut it.

    Replays the regular expression by hand: at each position, try the parts in order and
    take the first that matches — which is how an alternation ``a|b|c`` chooses. Uses the
    ``regex`` module (Python's ``re`` has no ``\\p{L}``); the pieces equal :func:`pretokenize`'s.
    """
    import regex

    parts = [(regex.compile(p), p) for p, _ in GPT2_PATTERN_PARTS]
    text, out, pos = require_text(text), [], 0
    while pos < len(text):
        match, part = next((m, p) for c, p in parts if (m := c.match(text, pos)))
        out.append((match.group(), part))
        pos = match.end()
    return out


def visible(s: str, byte_chars: bool = False) -> str:
    """``s`` with spaces, newlines, tabs and carriage returns shown as ␣ ↵ ⇥ ␍.

    With ``byte_chars=True``, ``s`` is in byte characters: ``Ġ`` ``Ċ`` ``ĉ`` ``č`` are shown so.
    """
    table = bytes_to_unicode()
    marks = {table[ord(c)]: m for c, m in VISIBLE.items()} if byte_chars else VISIBLE
    return "".join(marks.get(c, c) for c in s)


@dataclass(frozen=True)
class MergeStep:
    """One merge learned in training: ``left + right → token`` (id ``id``), seen ``count`` times."""

    rank: int
    left: str
    right: str
    token: str
    id: int
    count: int

    def row(self) -> dict:
        """The merge as a table row, with spaces and newlines made visible."""
        return {
            "rank": self.rank,
            "left": visible(self.left, True),
            "right": visible(self.right, True),
            "token": visible(self.token, True),
            "id": self.id,
            "count": self.count,
        }


class BPE:
    """A byte-level BPE tokenizer: special tokens, the byte alphabet and an ordered merge list.

    Build one with :meth:`BPE.train`, or from a merge list (``BPE(merges)``). Attributes:

    * ``merges`` — the learned pairs ``(left, right)``, earliest (most important) first;
    * ``vocab`` — token string → id: special tokens first, then the 256 byte characters in
      code-point order, then the merged tokens in the order they were learned;
    * ``history`` — one :class:`MergeStep` per merge performed in training (with counts).
    """

    def __init__(
        self,
        merges: Sequence[tuple[str, str]],
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        vocab: dict[str, int] | None = None,
        history: Sequence[MergeStep] = (),
    ) -> None:
        self.special_tokens = tuple(special_tokens)
        self.merges = [tuple(m) for m in merges]
        self.vocab = dict(vocab) if vocab is not None else self._build_vocab()
        self.history = list(history)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._cache: dict[str, list[str]] = {}
        self._special_split = (
            re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")")
            if self.special_tokens
            else None
        )

    def _build_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for token in [*self.special_tokens, *sorted(bytes_to_unicode().values()), *(a + b for a, b in self.merges)]:
            vocab.setdefault(token, len(vocab))
        return vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"BPE({len(self.vocab)} tokens, {len(self.merges)} merges, special={list(self.special_tokens)})"

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        text_or_iterable: str | Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        on_merge: Callable[[MergeStep], None] | None = None,
    ) -> BPE:
        """Learn merges from text until the vocabulary holds ``vocab_size`` tokens.

        ``text_or_iterable`` is one string or an iterable of strings (each pre-tokenized on
        its own, like the items given to ``tokenizers``' ``train_from_iterator``). Special
        tokens are reserved ids, never split out of the training text. Training stops early
        when the most frequent pair occurs fewer than ``min_frequency`` times.
        ``on_merge(step)`` is called after every merge with a :class:`MergeStep`.

        The algorithm, as in ``tokenizers`` (Rust, ``models/bpe/trainer.rs``):

        1. count the pre-tokens ("words") of the text; each becomes a list of byte ids;
        2. count every adjacent pair of ids, weighted by word count, and note which words
           hold it; put all pairs in a priority queue ordered by (count, then smallest ids);
        3. pop the best pair; if its count is out of date, push it back with the current
           count and pop again; stop when the best count is below ``min_frequency``;
        4. merge it in the words that hold it (left to right, non-overlapping), adjust the
           counts of the neighbouring pairs it destroyed and created, and push the created
           ones — no full recount, which keeps each merge cheap;
        5. repeat until the vocabulary is full.
        """
        if isinstance(text_or_iterable, str):
            texts = [text_or_iterable]
        elif isinstance(text_or_iterable, Iterable):
            texts = list(text_or_iterable)
        else:
            raise ValueError(
                f"training text must be a str or an iterable of str, not {type(text_or_iterable).__name__}"
            )
        for t in texts:
            require_text(t, "each training text")
        if not any(texts):
            raise ValueError("the training text is empty: give BPE.train some text to learn merges from")
        special_tokens = tuple(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size <= 256 + len(special_tokens):
            raise ValueError(
                f"vocab_size must be an int above {256 + len(special_tokens)}: byte-level BPE starts with "
                f"the 256 bytes and {len(special_tokens)} special token(s), got {vocab_size!r}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")

        # 1. vocabulary: special tokens, then the byte alphabet in code-point order
        vocab: dict[str, int] = {}
        for token in [*special_tokens, *sorted(bytes_to_unicode().values())]:
            vocab.setdefault(token, len(vocab))
        id_to_token = list(vocab)  # position = id (setdefault keeps it dense)

        # 2. words and their counts; each word is spelt in byte characters, as a list of symbol ids
        word_counts: Counter[str] = Counter()
        for t in texts:
            word_counts.update(pretokenize(t, byte_level=False))
        words = [[vocab[c] for c in to_byte_chars(w)] for w in word_counts]
        counts = list(word_counts.values())

        # 3. pair counts, where each pair occurs, and the priority queue
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_counts[pair] += counts[i]
                where[pair].add(i)
        queue: list = []  # entries (-count, pair, tie, positions): heapq pops the smallest
        tie = itertools.count()
        for pair, pos in where.items():
            heapq.heappush(queue, (-pair_counts[pair], pair, next(tie), pos))

        merges: list[tuple[str, str]] = []
        history: list[MergeStep] = []
        while len(vocab) < vocab_size and queue:
            neg, pair, _, pos = heapq.heappop(queue)
            if -neg != pair_counts[pair]:  # stale: requeue with the current count
                heapq.heappush(queue, (-pair_counts[pair], pair, next(tie), pos))
                continue
            count = -neg
            if count < 1 or count < min_frequency:
                break
            left, right = id_to_token[pair[0]], id_to_token[pair[1]]
            token = left + right
            if token not in vocab:  # the same string can arise from two different pairs
                vocab[token] = len(id_to_token)
                id_to_token.append(token)
            new_id = vocab[token]
            merges.append((left, right))
            step = MergeStep(len(merges) - 1, left, right, token, new_id, count)
            history.append(step)

            # 4. merge in every word that holds the pair; update neighbouring pair counts
            created: dict[tuple[int, int], set[int]] = defaultdict(set)
            for i in pos:
                for changed, delta in merge_word(words[i], pair, new_id):
                    pair_counts[changed] += delta * counts[i]
                    if delta > 0:
                        created[changed].add(i)
            for changed, where_now in created.items():
                if pair_counts[changed] > 0:
                    heapq.heappush(queue, (-pair_counts[changed], changed, next(tie), where_now))
            if on_merge is not None:
                on_merge(step)

        # a pair learned twice keeps its last rank, as in tokenizers' merge map
        last_rank = {m: r for r, m in enumerate(merges)}
        ordered = sorted(last_rank, key=last_rank.get)
        return cls(ordered, special_tokens, vocab=vocab, history=history)

    def truncated(self, n_merges: int) -> BPE:
        """The tokenizer as it was after its first ``n_merges`` merges (to watch compression grow)."""
        if not 0 <= n_merges <= len(self.merges):
            raise ValueError(f"n_merges must be between 0 and {len(self.merges)}, got {n_merges}")
        return BPE(self.merges[:n_merges], self.special_tokens)

    # ------------------------------------------------------------------ encoding
    def _bpe(self, word: str) -> list[str]:
        """Apply the merges to one pre-token: repeatedly fuse the adjacent pair learned earliest."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((self._ranks.get(pair, len(self._ranks)), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == len(self._ranks):  # no learned pair left
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        self._cache[word] = parts
        return parts

    def tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` as strings, in byte characters (``"Ġking"`` is ``" king"``)."""
        require_text(text)
        out: list[str] = []
        chunks = self._special_split.split(text) if self._special_split else [text]
        for k, chunk in enumerate(chunks):
            if k % 2 == 1:  # a special token, matched whole
                out.append(chunk)
            else:
                for word in pretokenize(chunk):
                    out.extend(self._bpe(word))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text map to their ids."""
        return [self.vocab[t] for t in self.tokens(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids. Bytes that do not form valid UTF-8 (a cut character) become �."""
        out = bytearray()
        table = unicode_to_bytes()
        for i in ids:
            try:
                token = self.id_to_token[int(i)]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"unknown token id {i!r}: ids run from 0 to {len(self.vocab) - 1}") from None
            if token in self.special_tokens:
                out += token.encode("utf-8")
            else:
                out += bytes(table[c] for c in token)
        return out.decode("utf-8", errors="replace")


def merge_word(symbols: list[int], pair: tuple[int, int], new_id: int) -> list[tuple[tuple[int, int], int]]:
    """Merge ``pair`` in ``symbols`` in place, left to right; return the pair-count changes.

    Mirrors ``Word::merge`` in ``tokenizers``: for each merge, the pairs with the left and
    right neighbours lose one occurrence and the pairs with the new symbol gain one.
    """
    a, b = pair
    changes: list[tuple[tuple[int, int], int]] = []
    i = 0
    while i < len(symbols):
        if symbols[i] == a and i + 1 < len(symbols) and symbols[i + 1] == b:
            if i > 0:
                changes += [((symbols[i - 1], a), -1), ((symbols[i - 1], new_id), 1)]
            symbols[i : i + 2] = [new_id]
            if i < len(symbols) - 1:
                changes += [((b, symbols[i + 1]), -1), ((new_id, symbols[i + 1]), 1)]
        i += 1
    return changes


def train_timed(text: str, vocab_size: int, **kwargs) -> tuple[BPE, float]:
    """:meth:`BPE.train` and the seconds it took."""
    start = time.perf_counter()
    bpe = BPE.train(text, vocab_size, **kwargs)
    return bpe, time.perf_counter() - start
