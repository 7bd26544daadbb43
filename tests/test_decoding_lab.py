"""Chapter 05 helpers against independent references: transformers' fill-mask pipeline, hand cases."""

import math

import matplotlib
import numpy as np
import pytest
import torch

from cyclelab.core.sampling import Sampling, pipeline
from cyclelab.lab.decoding_by_hand import (
    bits_per_token,
    block_losses,
    causal_nll,
    encode_split,
    entropy_nats,
    fill_mask,
    ngram_nll,
    pick_k,
    plot_pipeline,
    plot_visibility,
    repeated_ngrams,
    sample_ngram_text,
)
from cyclelab.lab.ngram import NGramLM

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def tiny_mlm():
    from cyclelab import load

    return load("tiny-mlm")


@pytest.mark.parametrize(
    "text", ["To be, or not to<|mask|>, that is the question.", "<|mask|>:\nO Romeo, Romeo! wherefore art thou Romeo?"]
)
def test_fill_mask_matches_the_transformers_pipeline(tiny_mlm, text):
    from transformers import pipeline as hf_pipeline

    reference = hf_pipeline("fill-mask", model=tiny_mlm.model, tokenizer=tiny_mlm.tokenizer)(text, top_k=5)
    ours = fill_mask(tiny_mlm, text, k=5)
    assert len(ours) == 1
    assert [t for t, _ in ours[0]] == [r["token_str"] for r in reference]
    np.testing.assert_allclose([p for _, p in ours[0]], [r["score"] for r in reference], atol=1e-5)


def test_fill_mask_absorbs_the_space_before_the_mask(tiny_mlm):
    assert fill_mask(tiny_mlm, "not to <|mask|>, that", 3) == fill_mask(tiny_mlm, "not to<|mask|>, that", 3)
    assert fill_mask(tiny_mlm, "not to <|mask|>, that", 3, absorb_space=False) != fill_mask(
        tiny_mlm, "not to<|mask|>, that", 3
    )


def test_fill_mask_several_masks_in_one_pass(tiny_mlm):
    tok = tiny_mlm.tokenizer
    text = "My<|mask|> lord, I pray<|mask|>."
    out = fill_mask(tiny_mlm, text, k=2)
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = tiny_mlm.model(torch.tensor([ids])).logits[0]
    for guesses, pos in zip(out, [i for i, t in enumerate(ids) if t == tok.mask_token_id]):
        probs = torch.softmax(logits[pos], -1)
        assert guesses[0][0] == tok.decode([int(probs.argmax())])
        assert abs(guesses[0][1] - float(probs.max())) < 1e-6
        assert guesses[0][1] >= guesses[1][1]
    assert len(out) == 2


def test_fill_mask_errors(tiny_mlm, tiny):
    with pytest.raises(ValueError, match="no <\\|mask\\|>"):
        fill_mask(tiny_mlm, "no mask here", 3)
    with pytest.raises(ValueError, match="no mask token"):
        fill_mask(tiny, "ROMEO:", 3)
    with pytest.raises(ValueError, match="k must be"):
        fill_mask(tiny_mlm, "a<|mask|>", 0)


def test_pick_k_uses_a_slice_of_training_data_only():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 20, 3000).tolist()
    best, scores = pick_k(2, train, 20, [1.0, 0.1, 0.001])
    assert set(scores) == {1.0, 0.1, 0.001} and best == min(scores, key=scores.get)
    cut = int(len(train) * 0.9)
    for k, ppl in scores.items():  # the same as fitting on the first 90% and scoring the last 10%
        assert ppl == pytest.approx(NGramLM(2, 20, k).fit(train[:cut]).perplexity(train[cut:]))
    # random uniform tokens: heavy smoothing wins (the counts are mostly noise)
    assert best == 1.0
    with pytest.raises(ValueError):
        pick_k(2, train, 20, [])


def test_pick_k_prefers_little_smoothing_on_repetitive_data():
    train = [1, 2, 3, 4] * 500
    best, _ = pick_k(2, train, 50, [1.0, 0.01])
    assert best == 0.01


def test_encode_split_matches_encode_plays_and_caches(tiny, tmp_path, monkeypatch):
    from cyclelab.loading import corpus as data
    from cyclelab.train.tiny import encode_plays

    monkeypatch.setattr("cyclelab.lab.decoding_by_hand.token_cache", lambda: tmp_path / "tokens")
    want = encode_plays(tiny.tokenizer, data.plays("valid")).tolist()
    assert encode_split(tiny.tokenizer, "valid", cache=False) == want
    assert not (tmp_path / "tokens").exists()
    assert encode_split(tiny.tokenizer, "valid", limit=1000) == want[:1000]  # encodes and stores
    stored = list((tmp_path / "tokens").glob("valid-*.npy"))
    assert len(stored) == 1 and not list((tmp_path / "tokens").glob("*.partial.npy"))
    np.save(stored[0], np.arange(5))  # a planted file proves the second call reads the cache
    assert encode_split(tiny.tokenizer, "valid") == [0, 1, 2, 3, 4]


def test_encode_split_cache_is_keyed_by_the_tokenizer(tiny, tmp_path, monkeypatch):
    from cyclelab import load

    monkeypatch.setattr("cyclelab.lab.decoding_by_hand.token_cache", lambda: tmp_path / "tokens")
    encode_split(tiny.tokenizer, "valid", limit=10)
    encode_split(load("tiny-mlm").tokenizer, "valid", limit=10)  # one more (mask) token: another key
    assert len(list((tmp_path / "tokens").glob("valid-*.npy"))) == 2


def test_entropy_and_bits_by_hand():
    assert entropy_nats(torch.zeros(8)) == pytest.approx(math.log(8))
    assert entropy_nats(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(0.0)
    assert bits_per_token(64.0) == pytest.approx(6.0)


def test_sample_ngram_text_is_seeded(tiny):
    ids = encode_split(tiny.tokenizer, "valid", limit=5000)
    model = NGramLM(2, len(tiny.tokenizer), 0.01).fit(ids)
    a = sample_ngram_text(model, tiny.tokenizer, ids[:1], 12, seed=3)
    assert a == sample_ngram_text(model, tiny.tokenizer, ids[:1], 12, seed=3)
    assert len(tiny.tokenizer(a)["input_ids"]) >= 6


def test_figures_draw(tiny_engine):
    import matplotlib.pyplot as plt

    logits = tiny_engine.logits(tiny_engine.encode("ROMEO:"))[0, -1]
    stages = pipeline(logits, [], Sampling(do_sample=True, temperature=0.7, top_k=5, top_p=0.9))
    axes = plot_pipeline(stages, tiny_engine.token_text, k=8)
    assert len(axes) == len(stages) == 4
    plot_visibility(["a", "b", "c"], causal=True, hidden=1)
    with pytest.raises(ValueError):
        plot_pipeline([], tiny_engine.token_text)
    plt.close("all")


def test_masked_vs_causal_matches_a_plain_loop(tiny, tiny_mlm):
    from cyclelab.lab.decoding_by_hand import masked_vs_causal

    ids = encode_split(tiny.tokenizer, "valid", limit=80)
    got = masked_vs_causal(tiny, tiny_mlm, ids, window=40, every=10)
    hits = {"causal": 0, "masked": 0}
    nll = {"causal": 0.0, "masked": 0.0}
    for start in (0, 40):
        chunk = ids[start : start + 40]
        with torch.no_grad():
            causal = torch.log_softmax(tiny.model(torch.tensor([chunk])).logits[0], -1)
        for pos in (10, 20, 30):
            hidden = list(chunk)
            hidden[pos] = tiny_mlm.tokenizer.mask_token_id
            with torch.no_grad():
                masked = torch.log_softmax(tiny_mlm.model(torch.tensor([hidden])).logits[0, pos], -1)
            for name, logp in (("causal", causal[pos - 1]), ("masked", masked)):
                hits[name] += int(logp.argmax()) == chunk[pos]
                nll[name] -= float(logp[chunk[pos]])
    for name in ("causal", "masked"):
        assert got[name]["tokens"] == 6
        assert got[name]["accuracy"] == pytest.approx(hits[name] / 6)
        assert got[name]["perplexity"] == pytest.approx(math.exp(nll[name] / 6), rel=1e-4)
        assert sum(got[name]["nlls"]) == pytest.approx(nll[name], rel=1e-4)  # one loss per scored token


def test_masked_vs_causal_errors(tiny, tiny_mlm):
    from cyclelab.lab.decoding_by_hand import masked_vs_causal

    with pytest.raises(ValueError, match="no mask token"):
        masked_vs_causal(tiny, tiny, list(range(100)))
    with pytest.raises(ValueError, match="every"):
        masked_vs_causal(tiny, tiny_mlm, list(range(100)), window=8, every=8)
    with pytest.raises(ValueError, match="at least one window"):
        masked_vs_causal(tiny, tiny_mlm, list(range(10)), window=64)


def test_causal_nll_matches_transformers_loss_window_by_window(tiny):
    from cyclelab.train.metrics import perplexity_of_model

    ids = encode_split(tiny.tokenizer, "valid", limit=70)
    got = causal_nll(tiny.model, ids, context=32, batch_size=1)  # windows 0-31, 32-63 and a ragged 64-69
    assert [i for i in range(70) if math.isnan(got[i])] == [0, 32, 64]  # each window's first is context only
    for start, end in ((0, 32), (32, 64), (64, 70)):
        window = torch.tensor([ids[start:end]])
        with torch.no_grad():
            loss = float(tiny.model(window, labels=window).loss)  # transformers' mean over the window's targets
        assert float(got[start + 1 : end].mean()) == pytest.approx(loss, rel=1e-4)  # float32 model, float64 sum
    assert math.exp(float(got.nanmean())) == pytest.approx(perplexity_of_model(tiny.model, ids, context=32), rel=1e-4)
    assert torch.equal(torch.isnan(causal_nll(tiny.model, ids, context=32, batch_size=8)), torch.isnan(got))


def test_ngram_nll_per_token_sums_to_the_sequence_log_prob():
    model = NGramLM(2, 5, k=0.5).fit([0, 1, 2, 1, 2, 3, 4, 1])
    ids = [1, 2, 3, 0, 1]
    got = ngram_nll(model, ids)
    assert math.isnan(got[0]) and not torch.isnan(got[1:]).any()
    assert float(got[1]) == pytest.approx(-math.log((2 + 0.5) / (2 + 0.5 * 5)))  # 1 is followed twice, both by 2
    assert float(got[1:].sum()) == pytest.approx(-model.logprob_sequence(ids))


def test_block_losses_by_hand():
    nan = float("nan")
    a = torch.tensor([nan, 1.0, 3.0, 2.0, 4.0, 6.0, 9.0], dtype=torch.float64)
    b = torch.tensor([nan, nan, 1.0, 1.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    got = block_losses({"a": a, "b": b}, block=3)  # blocks 0-2 and 3-5; position 6 is a ragged block
    assert got == {"a": [3.0, 4.0], "b": [1.0, 5.0 / 3]}  # block 0: only position 2 is scored by both
    with pytest.raises(ValueError, match="same length"):
        block_losses({"a": a, "b": b[:3]}, 3)
    with pytest.raises(ValueError, match="at least one block"):
        block_losses({"a": a}, 10)
    with pytest.raises(ValueError, match="block must be"):
        block_losses({"a": a}, 0)


def test_repeated_ngrams_by_hand():
    assert repeated_ngrams([1, 2, 3, 4, 5], n=2) == 0.0
    assert repeated_ngrams([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(3 / 5)  # (2,1) (1,2) (2,1)... 12 21 12 21 12
    assert repeated_ngrams([7, 7, 7, 7], n=1) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="at least 4 ids"):
        repeated_ngrams([1, 2, 3], n=4)
    with pytest.raises(ValueError, match="n must be"):
        repeated_ngrams([1, 2, 3], n=0)
