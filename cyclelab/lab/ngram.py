"""The baseline: an n-gram language model over token ids, with add-k smoothing.

An n-gram model predicts the next token from the previous ``n - 1`` tokens only, by
counting: P(token | context) = (count(context, token) + k) / (count(context) + k * V),
where V is the vocabulary size. Adding ``k`` to every count (Laplace smoothing for
``k = 1``) gives unseen tokens a small probability instead of zero.

Scoring convention, shared by :meth:`NGramLM.logprob_sequence` and
:meth:`NGramLM.perplexity`: the first ``n - 1`` tokens of a sequence only serve as
context; every later token ``ids[i]`` (``i >= n - 1``) is scored given
``ids[i - n + 1 : i]``. A unigram (``n = 1``) scores every token.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from cyclelab.core.sampling import sample as sample_token
from cyclelab.loading.schema import is_int
from cyclelab.train.metrics import perplexity


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Token ids as a plain list of ints (accepts lists, tuples, tensors, numpy arrays)."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class NGramLM:
    """An add-k smoothed n-gram model: ``NGramLM(2, vocab_size).fit(ids)`` is a bigram model."""

    def __init__(self, n: int, vocab_size: int, k: float = 1.0) -> None:
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be an integer >= 1 (1 = unigram, 2 = bigram, ...), got {n!r}")
        if not is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise ValueError(f"k (the add-k smoothing constant) must be a finite number > 0, got {k!r}")
        self.n, self.vocab_size, self.k = n, vocab_size, float(k)
        #: context (tuple of n-1 ids) -> {token: how many times it followed the context}
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}
        #: context -> how many times it was followed by a token
        self.totals: dict[tuple[int, ...], int] = {}

    def __repr__(self) -> str:
        return f"NGramLM(n={self.n}, vocab_size={self.vocab_size}, k={self.k}, contexts={len(self.counts)})"

    def _check_ids(self, ids: list[int], what: str) -> None:
        """Raise ValueError if any id is not an integer in [0, vocab_size)."""
        if any(not isinstance(i, int) for i in ids):
            raise ValueError(f"{what} must be integer token ids")
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"{what} must be token ids in [0, {self.vocab_size})")

    def _context(self, context: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
        """The last ``n - 1`` ids of ``context``, checked."""
        ids = _as_list(context)
        self._check_ids(ids, "context")
        if len(ids) < self.n - 1:
            raise ValueError(f"a {self.n}-gram model needs at least {self.n - 1} context tokens, got {len(ids)}")
        return tuple(ids[len(ids) - (self.n - 1) :])

    def fit(self, ids: Sequence[int] | torch.Tensor) -> NGramLM:
        """Count every n-gram in ``ids`` (replacing earlier counts); returns the model itself."""
        ids = _as_list(ids)
        self._check_ids(ids, "training ids")
        if len(ids) < self.n:
            raise ValueError(f"need at least {self.n} training tokens for a {self.n}-gram model, got {len(ids)}")
        ngrams = Counter(zip(*(ids[i:] for i in range(self.n))))
        counts: defaultdict[tuple[int, ...], dict[int, int]] = defaultdict(dict)
        for gram, count in ngrams.items():
            counts[gram[:-1]][gram[-1]] = count
        self.counts = dict(counts)
        self.totals = {context: sum(after.values()) for context, after in self.counts.items()}
        return self

    def _check_fitted(self) -> None:
        """Raise ValueError if :meth:`fit` has not been called."""
        if not self.totals:
            raise ValueError("the model has not been fitted yet: call .fit(ids) first")

    def prob(self, context: Sequence[int] | torch.Tensor, token: int) -> float:
        """P(token | last n-1 tokens of context), add-k smoothed."""
        self._check_fitted()
        ctx = self._context(context)
        self._check_ids([token], "token")
        return self._prob(ctx, token)

    def _prob(self, context: tuple[int, ...], token: int) -> float:
        """The add-k formula itself, for an already checked context tuple and token."""
        seen = self.counts.get(context, {}).get(token, 0)
        return (seen + self.k) / (self.totals.get(context, 0) + self.k * self.vocab_size)

    def distribution(self, context: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The whole next-token distribution after ``context``, as a float64 tensor of shape (vocab,)."""
        self._check_fitted()
        ctx = self._context(context)
        probs = torch.full((self.vocab_size,), self.k, dtype=torch.float64)
        for token, count in self.counts.get(ctx, {}).items():
            probs[token] += count
        return probs / (self.totals.get(ctx, 0) + self.k * self.vocab_size)

    def _scored(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """Checked ids with at least one scored position (see the module docstring)."""
        ids = _as_list(ids)
        self._check_ids(ids, "ids")
        if len(ids) < self.n:
            raise ValueError(f"need at least {self.n} tokens to score one with a {self.n}-gram model")
        return ids

    def token_logprobs(self, ids: Sequence[int] | torch.Tensor) -> list[float]:
        """The natural-log probability of each of ``ids[n-1:]``, given the n-1 tokens before it."""
        self._check_fitted()
        ids = self._scored(ids)
        c = self.n - 1
        return [math.log(self._prob(tuple(ids[i - c : i]), ids[i])) for i in range(c, len(ids))]

    def logprob_sequence(self, ids: Sequence[int] | torch.Tensor) -> float:
        """Sum of natural-log probabilities of ``ids[n-1:]``, each given the n-1 tokens before it."""
        return sum(self.token_logprobs(ids))

    def perplexity(self, ids: Sequence[int] | torch.Tensor) -> float:
        """exp(mean negative log-probability) over the same positions as :meth:`logprob_sequence`."""
        ids = _as_list(ids)
        return perplexity(-self.logprob_sequence(ids), len(ids) - (self.n - 1))

    def sample(self, context: Sequence[int] | torch.Tensor, length: int, generator: torch.Generator) -> list[int]:
        """Generate ``length`` new tokens after ``context`` (which must hold >= n-1 tokens)."""
        if not is_int(length) or length < 0:
            raise ValueError(f"length must be an integer >= 0, got {length!r}")
        ids = list(self._context(context))
        for _ in range(length):
            token, _ = sample_token(torch.log(self.distribution(ids)), generator)
            ids.append(token)
        return ids[len(ids) - length :] if length else []
