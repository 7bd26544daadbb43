"""In-context learning helpers: prompts written out by hand, draws of shots, a count by hand, and the batched
shared-prefix scorer against one plain ``transformers`` forward per prompt."""

from __future__ import annotations

import pytest
import torch

from cyclelab.lab.in_context import (
    LABELS,
    accuracy,
    correct,
    few_shot_prefix,
    first_tokens,
    instruction,
    label_logprobs,
    query,
    sample_shots,
)

POOL = [
    ("BANQUO", "macbeth"),
    ("IAGO", "othello"),
    ("ARIEL", "tempest"),
    ("CASSIUS", "julius_caesar"),
    ("MALVOLIO", "twelfth_night"),
    ("MERCUTIO", "romeo_and_juliet"),
]


def test_a_two_shot_prompt_by_hand():
    prompt = few_shot_prefix([("BANQUO", "macbeth"), ("IAGO", "othello")], LABELS["title"]) + query("SEYTON")
    assert prompt == (
        "Which play is each character from? Macbeth, Othello, The Tempest, Julius Caesar, Twelfth Night, "
        "Romeo and Juliet?\n\n"
        "Character: Banquo\nPlay: Macbeth\n\n"
        "Character: Iago\nPlay: Othello\n\n"
        "Character: Seyton\nPlay:"
    )


def test_zero_shots_is_the_instruction_alone():
    assert few_shot_prefix([], LABELS["letter"]) == instruction(LABELS["letter"])


def test_letters_and_abbreviations_say_which_play_they_stand_for():
    assert instruction(LABELS["letter"]).startswith("Which play is each character from? A (Macbeth), B (Othello), ")
    assert "JC (Julius Caesar)" in instruction(LABELS["abbreviation"])
    assert few_shot_prefix([("ARIEL", "tempest")], LABELS["letter"]).endswith("Character: Ariel\nPlay: C\n\n")


def test_shots_are_a_reproducible_draw_without_repeats():
    shots = sample_shots(POOL, 4, seed=3)
    assert len(shots) == 4 and len(set(shots)) == 4 and set(shots) <= set(POOL)
    assert sample_shots(POOL, 4, seed=3) == shots
    assert sample_shots(POOL, 0, seed=3) == []
    orders = {tuple(sample_shots(POOL, 6, seed)) for seed in range(6)}
    assert len(orders) > 1 and all(sorted(o) == sorted(POOL) for o in orders)  # k = all: only the order changes


def test_accuracy_counts_by_hand():
    probs = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(probs, [1, 0, 0]) == 2  # rows 0 and 1 right, row 2 picks label 1
    assert accuracy(probs, [0, 1, 0]) == 0


def _by_hand(engine, prompt: str, label: str) -> float:
    """A label's log-probability after ``prompt`` from one plain ``transformers`` forward over prompt + label:
    the log-softmax at each position before a label token, read at that token, summed."""
    ids = engine.encode(prompt)
    label_ids = engine.tokenizer.encode(" " + label, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(engine.loaded.model(torch.tensor([ids + label_ids])).logits[0].float(), -1)
    return sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(label_ids))


def test_whole_label_log_probs_match_one_plain_forward_per_prompt_and_label(tiny_engine):
    labels = ["Macbeth", "Romeo and Juliet", "The Tempest"]  # one, three and two tokens or more on tiny
    assert [len(tiny_engine.tokenizer.encode(" " + x)) > 1 for x in labels[1:]] == [True, True]
    prefix = "KING:\nWhich play?\n\nCharacter: Banquo\nPlay: Macbeth\n\n"
    queries = [query(c) for c in ("SEYTON", "DESDEMONA", "TYBALT OF VERONA")]  # different lengths: right padding
    want = torch.tensor([[_by_hand(tiny_engine, prefix + q, x) for x in labels] for q in queries])
    for batch in (1, 2, 32):  # a batch boundary inside the queries, and all in one
        got = label_logprobs(tiny_engine, prefix, queries, labels, batch=batch)
        assert got.shape == (3, 3)
        assert torch.allclose(got, want, atol=1e-4)  # float32 sums of a few log-softmaxes, other batch shapes


def test_the_sum_is_not_the_first_token(tiny_engine):
    prompt = "KING:\nThe"
    got = label_logprobs(tiny_engine, "", [prompt], ["Romeo and Juliet"])
    first = tiny_engine.tokenizer.encode(" Romeo")[0]
    with torch.no_grad():
        logp_first = torch.log_softmax(
            tiny_engine.loaded.model(torch.tensor([tiny_engine.encode(prompt)])).logits[0, -1], -1
        )
    assert float(got[0, 0]) < float(logp_first[first]) - 1e-3  # the later tokens' log-probabilities count too


def test_no_shared_prefix_and_one_query(tiny_engine):
    for prompts in (["ROMEO:", "JULIET:"], ["KING:\nThe"]):
        got = label_logprobs(tiny_engine, "", prompts, ["lord", "king of men"])
        want = torch.tensor([[_by_hand(tiny_engine, p, x) for x in ["lord", "king of men"]] for p in prompts])
        assert torch.allclose(got, want, atol=1e-4)


def test_correct_marks_each_query():
    scores = torch.tensor([[-1.0, -0.5], [-0.2, -3.0], [-2.0, -1.0]])
    assert correct(scores, [1, 0, 0]) == [True, True, False]


BAD = [
    (
        "label missing",
        lambda e: few_shot_prefix([("IAGO", "othello")], {"macbeth": "Macbeth"}),
        ValueError,
        r"no label for play\(s\) \['othello'\]",
    ),
    (
        "k too large",
        lambda e: sample_shots(POOL, 7, 0),
        ValueError,
        r"k must be an integer from 0 to the pool's size 6",
    ),
    ("k negative", lambda e: sample_shots(POOL, -1, 0), ValueError, r"k must be an integer"),
    ("k a bool", lambda e: sample_shots(POOL, True, 0), ValueError, r"k must be an integer"),
    (
        "labels share a first token",
        lambda e: first_tokens(e, ["The Tempest", "The Tempest"]),
        ValueError,
        r"start with the same token",
    ),
    ("no queries", lambda e: label_logprobs(e, "x", [], ["a", "b"]), ValueError, r"non-empty list of queries"),
    ("an empty label", lambda e: label_logprobs(e, "x", ["y"], ["a", ""]), ValueError, r"non-empty label strings"),
    ("batch of zero", lambda e: label_logprobs(e, "x", ["y"], ["a"], batch=0), ValueError, r"batch must be"),
    ("truth too short", lambda e: correct(torch.zeros(3, 2), [0]), ValueError, r"one right label per query"),
    (
        "one query as a string",
        lambda e: label_logprobs(e, "x", "Character: A\nPlay:", ["a", "b"]),
        ValueError,
        r"non-empty list of queries",
    ),
    (
        "truth of the wrong length",
        lambda e: accuracy(torch.zeros(3, 2), [0, 1]),
        ValueError,
        r"one right label per query",
    ),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_explained(tiny_engine, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_engine)
