"""Chapter 06's tasks: their data, baselines and metrics.

Whether each trained model beats its baselines on held-out data is checked where the training
runs: the stored outputs of `06_fine_tuning` and `06_fine_tuning_tasks` (their `takeaway:` lines, read
by nbval and by tests/test_course.py), so the test command trains each model once, not twice.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cyclelab.train.finetune import TrainConfig, add_lora, lm_loss, train
from cyclelab.train.tasks.sonnets import lm_windows, sonnet_perplexity, sonnets
from cyclelab.train.tasks.which_play import classification_data, play_lines


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
    train(
        model,
        lm_windows(tiny.tokenizer, poems[:30], 64),
        lm_loss,
        TrainConfig(steps=15, batch_size=8, lr=3e-3, warmup=2),
    )
    after = sonnet_perplexity(model, tiny.tokenizer, held_out)
    assert after < 0.95 * before


def test_classification_bad_input(minilm) -> None:
    with pytest.raises(ValueError, match="single class"):
        classification_data(minilm.tokenizer, ["a line", "another line"], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        classification_data(minilm.tokenizer, [], [])
    with pytest.raises(ValueError, match="usable lines"):
        play_lines(["tempest"], 10**6)


# --- task 3: who speaks this line? -----------------------------------------------------------------


def test_speaker_questions_point_at_the_speaker(minilm) -> None:
    from cyclelab.train.tasks.who_speaks import span_data, speaker_questions

    examples = speaker_questions(["tempest"], 20, k=3, seed=1, lines_per_speech=2)
    for ex in examples:
        assert ex["context"][ex["answer_start"] : ex["answer_start"] + len(ex["answer"]) + 1] == ex["answer"] + ":"
        assert ex["question"] in ex["context"]
        assert len({line.split(":")[0] for line in ex["context"].splitlines()}) >= 2
    encoded, kept = span_data(minilm.tokenizer, examples, max_len=128)
    assert len(encoded) == len(kept) == len(examples)
    for enc, ex in zip(encoded, kept):
        first, last = int(enc["offsets"][enc["start"]][0]), int(enc["offsets"][enc["end"]][1])
        assert ex["context"][first:last] == ex["answer"]
    short, kept = span_data(minilm.tokenizer, examples, max_len=24)  # answers cut off are left out of both
    assert len(short) == len(kept) < len(examples)


def test_question_blind_baselines() -> None:
    from cyclelab.train.tasks.who_speaks import baseline_answers

    ex = [
        {"context": "BRUTUS: Peace, ho!\nCASSIUS: Good night.\nBRUTUS: Farewell.\n"},
        {"context": "FIRST CITIZEN: You are all resolved?\nALL: Resolved.\nSECOND CITIZEN: One word.\n"},
    ]
    assert baseline_answers(ex, "first") == ["BRUTUS", "FIRST CITIZEN"]
    assert baseline_answers(ex, "last") == ["BRUTUS", "SECOND CITIZEN"]
    assert baseline_answers(ex, "most") == ["BRUTUS", "FIRST CITIZEN"]  # a tie goes to the earliest
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_answers(ex, "random")


def test_speaker_questions_bad_input() -> None:
    from cyclelab.train.tasks.who_speaks import speaker_questions

    with pytest.raises(ValueError, match="k >= 2"):
        speaker_questions(["tempest"], 5, k=1)
    with pytest.raises(ValueError, match="no work named"):
        speaker_questions(["no_such_play"], 5)


def test_exact_match_and_f1() -> None:
    from cyclelab.train.tasks.who_speaks import exact_match_f1

    assert exact_match_f1(["Brutus", "first citizen"], ["BRUTUS", "second citizen"]) == pytest.approx((50.0, 75.0))
    with pytest.raises(ValueError):
        exact_match_f1([], [])


# --- task 4: First Folio -> modern spelling, by edit tagging -------------------------------------------


def test_align_words_pairs_one_to_one_and_leaves_uneven_changes_out() -> None:
    from cyclelab.train.tasks.folio import align_words

    assert align_words("Fly further off my Lord: flye further off,", "Fly further off, my lord, fly further off;") == [
        ("Fly", "Fly"),
        ("further", "further"),
        ("off", "off,"),
        ("my", "my"),
        ("Lord:", "lord,"),
        ("flye", "fly"),
        ("further", "further"),
        ("off,", "off;"),
    ]
    # "to morrow," became one word: neither Folio word has a single modern counterpart
    assert align_words("Come to morrow, good Sir", "Come to-morrow, good sir.") == [
        ("Come", "Come"),
        ("to", None),
        ("morrow,", None),
        ("good", "good"),
        ("Sir", "sir."),
    ]


@pytest.mark.parametrize(
    "old, new, edit",
    [
        ("haue", "have", "ue→ve"),
        ("giue", "give", "ue→ve"),
        ("Lord", "lord,", "lower →,"),
        ("Noble", "noble", "lower"),
        ("vpon", "upon", "vpon→upon"),
        ("me,", "me", ",→"),
        ("speake", "speak", "e→"),
        ("rome", "Rome", "upper"),
        ("heart", "heart", "KEEP"),
    ],
)
def test_word_edit_by_hand(old, new, edit) -> None:
    from cyclelab.train.tasks.folio import apply_edit, word_edit

    assert word_edit(old, new) == edit
    assert apply_edit(old, edit) == new


def test_edits_are_shared_and_never_misapplied() -> None:
    from cyclelab.train.tasks.folio import apply_edit

    assert apply_edit("loue", "ue→ve") == "love" and apply_edit("Liue,", "ue→ve") == "Liue,"  # ending does not fit
    assert apply_edit("Lord:", "lower :→,") == "lord,"
    assert apply_edit("thee", "KEEP") == "thee"


def test_every_aligned_word_of_a_play_is_rebuilt_by_its_edit() -> None:
    from cyclelab.train.tasks.folio import align_words, apply_edit, folio_pairs, word_edit

    pairs = folio_pairs("julius_caesar")
    words = [(o, n) for old, new in pairs[:300] for o, n in align_words(old, new) if n is not None]
    assert len(words) > 1500
    assert all(apply_edit(o, word_edit(o, n)) == n for o, n in words)


def test_edit_bad_input(tiny) -> None:
    from cyclelab.train.tasks.folio import apply_edit, edit_vocabulary, tagging_data, word_edit

    with pytest.raises(ValueError, match="single words"):
        word_edit("to morrow", "to-morrow")
    with pytest.raises(ValueError, match="not an edit tag"):
        apply_edit("word", "sideways ue→ve")
    with pytest.raises(ValueError, match="not an edit tag"):
        apply_edit("word", "uevve")
    with pytest.raises(ValueError, match="no .folio, modern. pairs"):
        edit_vocabulary([])
    with pytest.raises(ValueError, match="no .folio, modern. pairs"):
        tagging_data(tiny.tokenizer, [], ["KEEP"])


def test_tagging_data_labels_each_words_last_token(tiny) -> None:
    from cyclelab.train.tasks.folio import tagging_data

    edits = ["KEEP", "e→", "lower", "lower →.", "→,"]
    (example,) = tagging_data(tiny.tokenizer, [("Heere my Lord", "Here, my lord.")], edits, max_len=12)
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    marked = [(tiny.tokenizer.decode(ids[: i + 1]), edits[label]) for i, label in enumerate(labels) if label != -100]
    # "Heere" -> "Here," rewrites the ending after the common "He": "ere→re,", not in this vocabulary,
    # so that word is unlabelled; "my" is kept; "Lord" -> "lord." is "lower →."
    assert marked == [("Heere my", "KEEP"), ("Heere my Lord", "lower →.")]
    assert int(example["attention_mask"].sum()) == len(tiny.tokenizer("Heere my Lord")["input_ids"])


def test_lookup_table_keeps_the_most_frequent_form() -> None:
    from cyclelab.train.tasks.folio import lookup_table, modernise_by_lookup

    table = lookup_table(
        [
            ("I haue it", "I have it"),
            ("Then haue at thee", "Then have at thee"),
            ("No more then this", "No more than this"),
            ("and then", "and then"),
            ("then go", "then go"),
        ]
    )
    assert table["haue"] == "have" and table["I"] == "I"
    assert modernise_by_lookup(table, ["haue you then"]) == ["have you then"]


def test_folio_pairs_copy_is_a_strong_baseline() -> None:
    from cyclelab.train.metrics import bleu
    from cyclelab.train.tasks.folio import folio_pairs

    pairs = folio_pairs("julius_caesar")
    assert len(pairs) > 1000 and all(old != new for old, new in pairs)
    assert 20 < bleu([o for o, _ in pairs], [n for _, n in pairs]) < 80


def test_the_edit_vocabulary_starts_with_the_common_edits() -> None:
    from cyclelab.train.tasks.folio import edit_vocabulary, folio_pairs

    edits = edit_vocabulary(folio_pairs("hamlet") + folio_pairs("othello"))
    assert edits[0] == "KEEP" and {"lower", "ue→ve", "e→"} <= set(edits[:20])


# --- task 5: instruction tuning, the prompt masked out of the loss ------------------------------------

import math  # noqa: E402

from cyclelab.train.tasks.instructions import (  # noqa: E402
    answer_logprob,
    answer_scores,
    best_answer,
    instruction_examples,
    instruction_pairs,
    title,
)

PAIRS = [
    ("Which play is this line from?\nO, pardon me, thou bleeding piece of earth,\nAnswer:", " Julius Caesar\n"),
    (
        "Which play is this line from?\nThe course of true love never did run smooth.\nAnswer:",
        " Midsummer Nights Dream\n",
    ),
]


def test_instruction_labels_score_the_answer_only(tiny) -> None:
    tok = tiny.tokenizer
    examples = instruction_examples(tok, PAIRS, max_len=40)
    for (prompt, answer), ex in zip(PAIRS, examples):
        n_prompt = len(tok(prompt)["input_ids"])
        scored = (ex["labels"] != -100).nonzero().flatten().tolist()
        assert scored == list(range(n_prompt, n_prompt + len(tok(answer)["input_ids"])))  # right after the prompt
        assert tok.decode(ex["input_ids"][scored]) == answer  # the labels are the answer's own tokens
        assert tok.decode(ex["input_ids"][:n_prompt]) == prompt and ex["input_ids"].shape == (40,)


def test_the_masked_loss_is_the_answers_cross_entropy(tiny) -> None:
    """Reference: the answer tokens' log-probabilities gathered by hand from a plain forward pass."""
    from cyclelab.train.finetune import lm_loss

    tok, model = tiny.tokenizer, tiny.model
    examples = instruction_examples(tok, PAIRS, max_len=40)
    batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "labels")}
    nll, n = 0.0, 0
    with torch.no_grad():
        got = float(lm_loss(model, batch))
        for prompt, answer in PAIRS:
            p, a = tok(prompt)["input_ids"], tok(answer)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].double(), -1)
            nll -= sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
            n += len(a)
            assert answer_logprob(model, tok, prompt, answer) == pytest.approx(
                sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a)), abs=1e-3
            )
    assert got == pytest.approx(nll / n, abs=1e-4)


def test_answer_scores_pick_the_likelier_answer(tiny) -> None:
    answers = [a for _, a in PAIRS]
    by_one = [[answer_logprob(tiny.model, tiny.tokenizer, p, a) for a in answers] for p, _ in PAIRS]
    assert [best_answer(tiny.model, tiny.tokenizer, p, answers) for p, _ in PAIRS] == [
        max(range(2), key=s.__getitem__) for s in by_one
    ]  # batched candidates = one at a time
    prob, acc = answer_scores(tiny.model, tiny.tokenizer, PAIRS, answers)
    assert acc == sum(max(range(2), key=s.__getitem__) == k for k, s in enumerate(by_one)) / 2
    assert prob == pytest.approx(sum(math.exp(s[k]) for k, s in enumerate(by_one)) / 2, rel=1e-4)


def test_instruction_pairs_ask_about_the_plays() -> None:
    pairs = instruction_pairs(["tempest", "julius_caesar"], 5, seed=0)
    assert len(pairs) == 10 and {a for _, a in pairs} == {" Tempest\n", " Julius Caesar\n"}
    assert all(p.startswith("Which play") and p.endswith("\nAnswer:") for p, _ in pairs)
    assert title("merry_wives_of_windsor") == "Merry Wives Of Windsor"


@pytest.mark.parametrize(
    "pairs, max_len, error, message",
    [
        pytest.param([], 40, ValueError, "no \\(prompt, answer\\) pairs", id="no pairs"),
        pytest.param(PAIRS, 8, ValueError, "more than max_len=8", id="prompt longer than max_len"),
    ],
)
def test_instruction_examples_bad_input(tiny, pairs, max_len, error, message) -> None:
    with pytest.raises(error, match=message):
        instruction_examples(tiny.tokenizer, pairs, max_len=max_len)


@pytest.mark.parametrize(
    "pairs, answers, message",
    [
        pytest.param([], [" A\n"], "no \\(prompt, answer\\) pairs to score", id="no pairs to score"),
        pytest.param(PAIRS, [" Tempest\n"], "is not one of the candidates", id="answer not a candidate"),
    ],
)
def test_answer_scores_bad_input(tiny, pairs, answers, message) -> None:
    with pytest.raises(ValueError, match=message):
        answer_scores(tiny.model, tiny.tokenizer, pairs, answers)


def test_play_perplexity_reads_the_opening_of_the_held_out_plays(tiny) -> None:
    from cyclelab.loading import corpus as data
    from cyclelab.train.metrics import perplexity_of_model
    from cyclelab.train.tasks.sonnets import play_perplexity

    ids = tiny.tokenizer(data.corpus("valid"))["input_ids"][:512]  # reference: encode everything, then cut
    assert play_perplexity(tiny.model, tiny.tokenizer, 512) == pytest.approx(perplexity_of_model(tiny.model, ids, 128))
    with pytest.raises(ValueError, match="fewer than n_tokens"):
        play_perplexity(tiny.model, tiny.tokenizer, 10**8)


@pytest.mark.parametrize(
    "mask,width",
    [
        ([[1, 1, 0, 0], [1, 0, 0, 0]], 2),  # the longest row ends at column 2
        ([[1, 1, 1, 1], [1, 0, 0, 0]], 4),  # nothing to cut
        ([[0, 0, 0], [0, 0, 0]], 1),  # no real token: one column stays, never an empty batch
    ],
    ids=["cut-after-longest-row", "full-row", "all-padding"],
)
def test_unpadded_cuts_every_tensor_after_the_last_real_column(mask, width):
    from cyclelab.train.tasks import unpadded

    mask = torch.tensor(mask)
    ids = torch.arange(mask.numel()).view(mask.shape)
    cut_mask, cut_ids = unpadded(mask, ids)
    assert torch.equal(cut_mask, mask[:, :width]) and torch.equal(cut_ids, ids[:, :width])


def test_unpadded_batch_gives_a_causal_model_the_same_logits_for_the_real_tokens(tiny):
    from cyclelab.train.tasks import unpadded

    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[3], [2]])).long()
    with torch.no_grad():
        full = tiny.model(input_ids=ids, attention_mask=mask).logits
        cut_mask, cut_ids = unpadded(mask, ids)
        cut = tiny.model(input_ids=cut_ids, attention_mask=cut_mask).logits
    assert cut.shape[1] == 3
    torch.testing.assert_close(cut[0], full[0, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(cut[1, :2], full[1, :2], atol=1e-5, rtol=0)


def test_line_losses_add_up_to_the_models_own_loss(tiny) -> None:
    from cyclelab.train.tasks.sonnets import line_losses, lines_perplexity

    poems = sonnets()[:2]
    losses = line_losses(tiny.model, tiny.tokenizer, poems)
    assert len(losses) == sum(len(p.splitlines()) for p in poems)
    for k, poem in enumerate(poems):  # reference: transformers' mean loss over the whole poem
        ids = torch.tensor([[tiny.tokenizer.eos_token_id] + tiny.tokenizer(poem)["input_ids"]])
        with torch.no_grad():
            want = float(tiny.model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        mine = losses[:14] if k == 0 else losses[len(poems[0].splitlines()) :]
        assert sum(c for _, c in mine) == ids.shape[1] - 1
        assert sum(n for n, _ in mine) == pytest.approx(want, rel=1e-4)  # float32 sums in another order
    assert lines_perplexity(losses) > 1
    with pytest.raises(ValueError, match="no texts"):
        line_losses(tiny.model, tiny.tokenizer, [])
    with pytest.raises(ValueError, match="longer than the model reads"):
        line_losses(tiny.model, tiny.tokenizer, ["thee " * 400])


def test_play_losses_are_the_windows_of_play_perplexity(tiny) -> None:
    import math

    from cyclelab.train.tasks.sonnets import play_losses, play_perplexity

    losses = play_losses(tiny.model, tiny.tokenizer, 512, context=128)
    assert len(losses) == 4
    assert math.exp(sum(losses) / len(losses)) == pytest.approx(
        play_perplexity(tiny.model, tiny.tokenizer, 512), rel=1e-5
    )
    with pytest.raises(ValueError, match="n_tokens"):
        play_losses(tiny.model, tiny.tokenizer, 10, context=64)


def test_compare_methods_runs_each_methods_own_grid(tiny) -> None:
    from cyclelab.train.tasks.sonnets import best_per_method, compare_methods

    poems = sonnets()
    grids = {"lora": [1e-3, 1e-2], "prompt": [3e-2]}
    rows = compare_methods(tiny.model, tiny.tokenizer, poems[:4], poems[4:6], grids, steps=2, methods=list(grids))
    assert [(r["method"], r["lr"]) for r in rows] == [("lora", 1e-3), ("lora", 1e-2), ("prompt", 3e-2)]
    assert [b["method"] for b in best_per_method(rows)] == ["lora", "prompt"]
    with pytest.raises(ValueError, match="none for prompt"):
        compare_methods(tiny.model, tiny.tokenizer, poems[:4], poems[4:6], {"lora": [1e-3]}, methods=["lora", "prompt"])


def test_string_matching_finds_the_speaker_of_the_question() -> None:
    from cyclelab.train.tasks.who_speaks import baseline_answers, exact_matches

    ex = [
        {"question": "O Cassius, I am sick", "context": "CASSIUS: Not so.\nBRUTUS: O Cassius, I am sick of griefs.\n"},
        {"question": "not in the passage", "context": "LUCIUS: Sir?\nBRUTUS: Go.\n"},
    ]
    assert baseline_answers(ex, "match") == ["BRUTUS", "LUCIUS"]  # no match: the first speaker
    assert exact_matches(["brutus.", "Lucius Junior"], ["BRUTUS", "LUCIUS"]) == [True, False]
    with pytest.raises(ValueError, match="one prediction per answer"):
        exact_matches(["a"], [])


def test_chance_is_one_over_the_classes() -> None:
    from cyclelab.train.tasks.which_play import chance

    assert chance([0, 1, 2, 2, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="non-empty"):
        chance([])
