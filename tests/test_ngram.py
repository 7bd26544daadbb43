"""Tests for cyclelab.lab.ngram: counts checked against hand computation with fractions."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from cyclelab.core.sampling import make_generator
from cyclelab.lab.ngram import NGramLM

CORPUS = [0, 1, 0, 1, 1, 2]  # bigrams: 0>1, 1>0, 0>1, 1>1, 1>2


def test_bigram_probabilities_by_hand():
    lm = NGramLM(2, vocab_size=3, k=1.0).fit(CORPUS)
    # after 0: token 1 seen twice, 2 transitions in all: (count + 1) / (2 + 3)
    by_hand = {
        (0, 0): Fraction(1, 5),
        (0, 1): Fraction(3, 5),
        (0, 2): Fraction(1, 5),
        (1, 0): Fraction(2, 6),
        (1, 1): Fraction(2, 6),
        (1, 2): Fraction(2, 6),
        (2, 0): Fraction(1, 3),
        (2, 1): Fraction(1, 3),
        (2, 2): Fraction(1, 3),  # 2 is never followed
    }
    for (context, token), p in by_hand.items():
        assert lm.prob([context], token) == pytest.approx(float(p))
        assert lm.prob([5 % 3, 0, context], token) == pytest.approx(float(p))  # only the last token counts
    for context in range(3):
        assert float(lm.distribution([context]).sum()) == pytest.approx(1.0)


def test_bigram_perplexity_by_hand():
    lm = NGramLM(2, vocab_size=3).fit(CORPUS)
    # scored: 1|0, 2|1, 0|2  (the first token is context only)
    p = Fraction(3, 5) * Fraction(2, 6) * Fraction(1, 3)
    assert lm.logprob_sequence([0, 1, 2, 0]) == pytest.approx(math.log(p))
    assert lm.perplexity([0, 1, 2, 0]) == pytest.approx(float(p) ** (-1 / 3))


def test_unigram_with_k():
    k = Fraction(1, 2)
    lm = NGramLM(1, vocab_size=4, k=float(k)).fit(CORPUS)
    counts = {0: 2, 1: 3, 2: 1, 3: 0}
    for token, c in counts.items():
        assert lm.prob([], token) == pytest.approx(float((c + k) / (6 + 4 * k)))
    # a unigram scores every token
    p = (counts[3] + k) / (6 + 4 * k) * (counts[1] + k) / (6 + 4 * k)
    assert lm.perplexity([3, 1]) == pytest.approx(float(p) ** -0.5)


def test_trigram_by_hand():
    lm = NGramLM(3, vocab_size=3, k=2.0).fit(CORPUS)  # trigrams: 010, 101, 011, 112
    assert lm.prob([0, 1], 1) == pytest.approx(float(Fraction(1 + 2, 2 + 6)))
    assert lm.prob([1, 1], 0) == pytest.approx(float(Fraction(0 + 2, 1 + 6)))
    assert lm.logprob_sequence([0, 1, 1]) == pytest.approx(math.log(3 / 8))


def test_uniform_model_has_perplexity_vocab_size():
    lm = NGramLM(2, vocab_size=7).fit([0, 1])
    assert lm.perplexity([3, 4, 5, 6, 2]) == pytest.approx(7.0)


def test_sample_follows_the_counts():
    lm = NGramLM(2, vocab_size=3, k=1e-9).fit([0, 1, 2, 0, 1, 2, 0])  # a deterministic cycle
    assert lm.sample([5 % 3, 0], 7, make_generator(0)) == [1, 2, 0, 1, 2, 0, 1]
    a = lm.sample(torch.tensor([1]), 5, make_generator(1))
    assert a == [2, 0, 1, 2, 0] and lm.sample([1], 0, make_generator(1)) == []
    loose = NGramLM(1, vocab_size=10).fit(list(range(10)))
    assert loose.sample([], 20, make_generator(3)) == loose.sample([], 20, make_generator(3))


def test_validation():
    for bad in (
        dict(n=0, vocab_size=3),
        dict(n=2, vocab_size=0),
        dict(n=2, vocab_size=3, k=0),
        dict(n=2, vocab_size=3, k=-1.0),
        dict(n=1.5, vocab_size=3),
    ):
        with pytest.raises(ValueError):
            NGramLM(**bad)
    lm = NGramLM(2, vocab_size=3)
    with pytest.raises(ValueError, match="fit"):
        lm.prob([0], 1)
    with pytest.raises(ValueError, match="at least 2"):
        lm.fit([])
    with pytest.raises(ValueError, match="range|\\[0, 3\\)"):
        lm.fit([0, 1, 3])
    with pytest.raises(ValueError):
        lm.fit([0, -1, 2])
    lm.fit(CORPUS)
    with pytest.raises(ValueError):
        lm.prob([0], 3)
    with pytest.raises(ValueError):
        lm.prob([7], 1)
    with pytest.raises(ValueError, match="context"):
        lm.prob([], 1)
    with pytest.raises(ValueError):
        lm.perplexity([1])  # nothing to score
    with pytest.raises(ValueError):
        lm.perplexity([1, 9])


def test_fits_a_large_corpus_counting_every_context():
    ids = torch.randint(0, 2000, (200_000,), generator=torch.Generator().manual_seed(0))
    for n in (2, 3):
        lm = NGramLM(n, vocab_size=2000).fit(ids)
        assert sum(lm.totals.values()) == 200_000 - (n - 1)
