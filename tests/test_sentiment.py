"""Chapter 11's sentiment helpers: whole-label log-probabilities against a plain transformers forward,
the corpus loader's refusals, balanced splits, LoRA label examples."""

import csv
import hashlib

import pytest
import torch
import torch.nn.functional as F

from cyclelab.lab import sentiment as S

# float32 logits through the KV cache (label_scores) and through one full forward (the reference) add in a
# different order; on tiny's 4 layers they agree to ~1e-6 in a log-probability of size ~10.
BOUND = 1e-4


def by_hand(loaded, prompt_ids: list[int], label_ids: list[int]) -> float:
    """log P(label | prompt) from one transformers forward of the joined ids: the sum over the label's tokens."""
    with torch.no_grad():
        logp = F.log_softmax(loaded.model(torch.tensor([prompt_ids + label_ids])).logits[0].double(), -1)
    return float(sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(label_ids)))


def ids(loaded, text):
    return loaded.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("label", [" love", " to be, or not", " Verona's fair"])
def test_label_logprob_is_the_sum_over_the_labels_tokens(tiny, label):
    prompt = "ROMEO:\nO my sweet"
    want = by_hand(tiny, ids(tiny, prompt), ids(tiny, label))
    assert S.label_logprob(tiny, prompt, label) == pytest.approx(want, abs=BOUND)


def test_a_multi_token_label_is_not_scored_by_its_first_token(tiny):
    prompt, label = "ROMEO:\nO my sweet", " to be, or not"
    assert len(ids(tiny, label)) > 2
    first = by_hand(tiny, ids(tiny, prompt), ids(tiny, label)[:1])
    assert S.label_logprob(tiny, prompt, label) < first - 1  # the later tokens add their own (negative) terms


def test_label_scores_after_a_cached_prefix_match_one_forward_per_prompt(tiny):
    prefix, prompts, labels = (
        "JULIET:\nGood night, good night!\n\n",
        ["ROMEO:\nO", "NURSE:\nMadam"],
        [" love", " my lord"],
    )
    got = S.label_scores(tiny, prompts, labels, prefix=prefix)
    assert got.shape == (2, 2)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            want = by_hand(tiny, ids(tiny, prefix) + ids(tiny, p), ids(tiny, lab))
            assert float(got[i, j]) == pytest.approx(want, abs=BOUND)


def test_label_scores_refuses_bad_input(tiny):
    with pytest.raises(TypeError, match="lists of strings"):
        S.label_scores(tiny, "one prompt", [" a"])
    with pytest.raises(ValueError, match="non-empty"):
        S.label_scores(tiny, ["p"], [])


def write_corpus(path, rows):
    with open(path, "w", newline="", encoding="latin-1") as f:
        writer = csv.writer(f)
        writer.writerow(["sentiment", "confidence", "text"])
        writer.writerows(rows)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_tweets_keeps_the_labelled_rows_of_an_intact_file(tmp_path):
    path = tmp_path / "c.csv"
    sha = write_corpus(
        path, [("positive", "1", "great flight"), ("neutral", "1", "a flight"), ("negative", "0.6", "bad")]
    )
    assert S.read_tweets(path, sha) == [("great flight", 1, 1.0), ("bad", 0, 0.6)]


def test_read_tweets_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "c.csv"
    sha = write_corpus(path, [("positive", "1", "great flight")])
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged.*sha256.*cyclelab fetch tweets --force"):
        S.read_tweets(path, sha)


def test_read_tweets_refuses_a_file_without_the_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("label,text\npositive,great\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentiment', 'confidence'\]"):
        S.read_tweets(path, sha256=None)


def test_split_is_balanced_disjoint_and_agreed_on():
    rows = [(f"tweet number {i} about a flight", i % 2, 1.0 if i % 3 else 0.5) for i in range(200)]
    split = S.split_tweets(rows, 20, 30, seed=1)
    assert sum(split.train_labels) == 10 and sum(split.test_labels) == 15
    assert not set(split.train_texts) & set(split.test_texts)
    agreed = {t for t, _, c in rows if c == 1.0}
    assert set(split.train_texts + split.test_texts) <= agreed
    with pytest.raises(ValueError, match="even"):
        S.split_tweets(rows, 3, 4)


def test_label_examples_score_only_the_label(tiny):
    examples = S.label_examples(tiny.tokenizer, ["what a fine day", "no"], [1, 0])
    for ex, label in zip(examples, (" positive", " negative")):
        scored = ex["labels"][ex["labels"] != -100].tolist()
        assert scored == ids(tiny, label)
        start = (ex["labels"] != -100).nonzero()[0].item()
        assert ex["input_ids"][start : start + len(scored)].tolist() == scored


def test_balanced_shots_take_labels_in_turn():
    texts, labels = ["a", "b", "c", "d", "e"], [1, 1, 0, 1, 0]
    assert S.balanced_shots(texts, labels, 4) == [("c", 0), ("a", 1), ("e", 0), ("b", 1)]
    assert S.few_shot_prefix([("c", 0)]) == S.zero_shot_prompt("c") + " negative\n\n"
    with pytest.raises(ValueError, match="of each label"):
        S.balanced_shots(texts, labels, 6)
