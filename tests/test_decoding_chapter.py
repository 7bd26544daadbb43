"""Chapter 05's central claim: the neural model beats the n-gram baseline on held-out plays."""

import pytest

from cyclelab.lab.decoding_by_hand import encode_split, pick_k
from cyclelab.lab.ngram import NGramLM
from cyclelab.train.metrics import perplexity_of_model

VALID_TOKENS = 8192  # the first held-out tokens (Macbeth): enough to separate the models, quick to score


@pytest.fixture(scope="module")
def splits(tiny):
    return encode_split(tiny.tokenizer, "train"), encode_split(tiny.tokenizer, "valid", limit=VALID_TOKENS)


def test_tiny_beats_the_trigram_and_the_bigram(tiny, splits):
    train, valid = splits
    vocab = len(tiny.tokenizer)
    ppl = {}
    for n in (2, 3):
        k, _ = pick_k(n, train, vocab, [1.0, 0.1, 0.01, 0.001])  # chosen on training data, never on valid
        ppl[n] = NGramLM(n, vocab, k).fit(train).perplexity(valid)
    ppl["tiny"] = perplexity_of_model(tiny.model, valid, context=256)
    assert ppl["tiny"] < ppl[3] and ppl["tiny"] < ppl[2]
    assert ppl["tiny"] < 0.7 * min(ppl[2], ppl[3])  # not a near tie
    assert 20 < ppl["tiny"] < 150
