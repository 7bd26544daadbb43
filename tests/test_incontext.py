"""In-context learning helpers: prompts written out by hand, draws of shots, a count by hand, and the batched
shared-prefix scorer against one plain ``transformers`` forward per prompt."""

from __future__ import annotations

import pytest
import torch

from cyclelab.lab.in_context import (
    LABELS,
    accuracy,
    few_shot_prefix,
    first_tokens,
    instruction,
    label_probs,
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


def test_batched_prefix_scores_match_one_plain_forward_per_prompt(tiny_engine):
    labels = ["Macbeth", "Othello", "Romeo"]
    prefix = "KING:\nWhich play?\n\nCharacter: Banquo\nPlay: Macbeth\n\n"
    queries = [query(c) for c in ("SEYTON", "DESDEMONA", "TYBALT OF VERONA")]  # different lengths: right padding
    got = label_probs(tiny_engine, prefix, queries, labels)
    firsts = [tiny_engine.tokenizer.encode(" " + label)[0] for label in labels]
    model = tiny_engine.loaded.model
    with torch.no_grad():
        want = torch.stack(
            [
                torch.softmax(model(torch.tensor([tiny_engine.encode(prefix + q)])).logits[0, -1], -1)[firsts]
                for q in queries
            ]
        )
    assert got.shape == (3, 3)
    assert torch.allclose(got, want, atol=1e-5)


def test_no_shared_prefix_and_one_query(tiny_engine):
    model = tiny_engine.loaded.model
    for prompts in (["ROMEO:", "JULIET:"], ["KING:\nThe"]):
        got = label_probs(tiny_engine, "", prompts, ["lord", "king"])
        with torch.no_grad():
            firsts = first_tokens(tiny_engine, ["lord", "king"])
            want = torch.stack(
                [torch.softmax(model(torch.tensor([tiny_engine.encode(p)])).logits[0, -1], -1)[firsts] for p in prompts]
            )
        assert torch.allclose(got, want, atol=1e-5)


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
    ("no queries", lambda e: label_probs(e, "x", [], ["a", "b"]), ValueError, r"non-empty list of queries"),
    (
        "one query as a string",
        lambda e: label_probs(e, "x", "Character: A\nPlay:", ["a", "b"]),
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
