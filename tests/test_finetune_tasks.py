"""Chapter 06's tasks beat their trivial baselines on held-out data (small, fast settings)."""

from __future__ import annotations

import copy

import pytest
import torch

from cyclelab.finetune import TrainConfig, add_lora, count_trainable, lm_loss, train
from cyclelab.finetune_tasks import (EncoderClassifier, classification_data, classification_loss, lm_windows,
                                     majority_baseline, play_lines, predict, sonnet_perplexity, sonnets)

PLAYS = ["julius_caesar", "midsummer_nights_dream", "merry_wives_of_windsor"]


def test_sonnets_are_154_poems() -> None:
    poems = sonnets()
    assert len(poems) == 154
    assert poems[0].startswith("From fairest creatures") and poems[-1].rstrip().endswith("water cools not love.")


def test_lora_toward_the_sonnets_lowers_held_out_perplexity(tiny) -> None:
    poems = sonnets()
    held_out = poems[-10:]
    before = sonnet_perplexity(tiny.model, tiny.tokenizer, held_out)
    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny.model), ["c_attn", "c_fc"], r=8, alpha=16)
    train(model, lm_windows(tiny.tokenizer, poems[:30], 64), lm_loss, TrainConfig(steps=15, batch_size=8, lr=3e-3, warmup=2))
    after = sonnet_perplexity(model, tiny.tokenizer, held_out)
    assert after < 0.95 * before


def test_play_classifier_beats_the_majority_class(minilm) -> None:
    texts, labels = play_lines(PLAYS, 200, seed=0)
    train_set = classification_data(minilm.tokenizer, texts[:480], labels[:480], max_len=24)
    test_set = classification_data(minilm.tokenizer, texts[480:], labels[480:], max_len=24)
    torch.manual_seed(0)
    model = EncoderClassifier(add_lora(copy.deepcopy(minilm.model), ["query", "value"], r=4, alpha=8), len(PLAYS))
    assert count_trainable(model)[0] == 6 * 2 * 4 * (384 + 384) + 384 * 3 + 3
    train(model, train_set, classification_loss, TrainConfig(steps=25, batch_size=16, lr=5e-3, warmup=2))
    accuracy = sum(p == y for p, y in zip(predict(model, test_set), labels[480:])) / len(test_set)
    assert accuracy > majority_baseline(labels[:480], labels[480:]) + 0.15


def test_classification_bad_input(minilm) -> None:
    with pytest.raises(ValueError, match="single class"):
        classification_data(minilm.tokenizer, ["a line", "another line"], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        classification_data(minilm.tokenizer, [], [])
    with pytest.raises(ValueError, match="usable lines"):
        play_lines(["tempest"], 10**6)


# --- tasks 3 and 4: data preparation and metrics (training them beats the baseline only with
# --- longer runs than a unit test affords; see the chapter's notes) ------------------------------


def test_speaker_questions_point_at_the_speaker(minilm) -> None:
    from cyclelab.finetune_tasks import span_data, speaker_questions

    examples = speaker_questions(["tempest"], 20, k=3, seed=1)
    for ex in examples:
        assert ex["context"][ex["answer_start"]:ex["answer_start"] + len(ex["answer"]) + 1] == ex["answer"] + ":"
        assert ex["question"] in ex["context"]
    encoded = span_data(minilm.tokenizer, examples, max_len=128)
    assert len(encoded) == len(examples)
    for enc, ex in zip(encoded, examples):
        first, last = int(enc["offsets"][enc["start"]][0]), int(enc["offsets"][enc["end"]][1])
        assert ex["context"][first:last] == ex["answer"]


def test_exact_match_and_f1() -> None:
    from cyclelab.finetune_tasks import exact_match_f1

    assert exact_match_f1(["Brutus", "first citizen"], ["BRUTUS", "second citizen"]) == pytest.approx((50.0, 75.0))
    with pytest.raises(ValueError):
        exact_match_f1([], [])


def test_folio_pairs_and_prompt_examples(tiny) -> None:
    from cyclelab.finetune_tasks import folio_pairs, seq2seq_examples
    from cyclelab.metrics import bleu

    pairs = folio_pairs("julius_caesar")
    assert len(pairs) > 1000 and all(old != new for old, new in pairs)
    assert 20 < bleu([o for o, _ in pairs], [n for _, n in pairs]) < 80  # copying is a strong baseline
    (example,) = seq2seq_examples(tiny.tokenizer, [("Heere my Lord", "Here, my lord.")], length=32)
    scored = example["labels"][example["labels"] != -100]
    assert tiny.tokenizer.decode(scored) == " Here, my lord.\n<|endoftext|>"
