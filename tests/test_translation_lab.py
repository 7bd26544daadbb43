"""The translation chapter's helpers, against sacrebleu, transformers and the test file itself."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch

from cyclelab import Engine, Seq2SeqEngine, load
from cyclelab.lab.translation import (
    TEST_FILE,
    complete_line,
    corpus_score,
    cross_attention_map,
    few_shot_prompt,
    sentence_chrf,
)
from cyclelab.lab.translation import test_pairs as held_out  # renamed: pytest would collect test_*

HYPS = ["I have curs'd them without cause.", "To be the same in thine own act", "Under the blossom", "x y z"]
REFS = ["I have curs'd them without cause.", "To be the same in thine own act and valor", "Under the bough.", "a b"]


@pytest.fixture(scope="module")
def mt() -> Seq2SeqEngine:
    return Seq2SeqEngine(load("folio-mt"))


def test_test_pairs_are_the_files_lines_in_order():
    rows = [json.loads(line) for line in TEST_FILE.read_text().splitlines()]
    pairs = held_out()
    assert len(pairs) == 200 == len(rows)
    assert pairs[7] == (rows[7]["folio"], rows[7]["modern"])
    assert held_out(3) == pairs[:3]


@pytest.mark.parametrize("bad", [0, 201, -1, 2.0, True, "3"])
def test_test_pairs_refuses_a_bad_count(bad):
    with pytest.raises(ValueError, match="n must be an integer"):
        held_out(bad)


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_corpus_score_is_sacrebleus_corpus_score_with_an_interval(metric):
    want = (sacrebleu.corpus_bleu if metric == "bleu" else sacrebleu.corpus_chrf)(HYPS, [REFS]).score
    got = corpus_score(HYPS, REFS, metric)
    assert got.estimate == pytest.approx(want, abs=1e-9)  # the same sums of the same counts
    assert got.low <= got.estimate <= got.high and got.n == len(HYPS)


def test_corpus_score_refuses_bad_input():
    with pytest.raises(ValueError, match="'bleu' or 'chrf'"):
        corpus_score(HYPS, REFS, "ter")
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        corpus_score(HYPS, REFS[:2])


def test_sentence_chrf_is_sacrebleus_per_line():
    assert sentence_chrf(HYPS, REFS) == [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(HYPS, REFS)]
    assert sentence_chrf(HYPS[:1], REFS[:1]) == [100.0]


def test_few_shot_prompt_ends_where_the_model_writes_and_refuses_multiline_input():
    prompt = few_shot_prompt([("Long liue the King", "Long live the king!")], "I haue curs'd them")
    assert prompt.endswith(
        "Folio: Long liue the King\nModern: Long live the king!\n\nFolio: I haue curs'd them\nModern:"
    )
    with pytest.raises(ValueError, match="one non-empty line"):
        few_shot_prompt([], "two\nlines")
    with pytest.raises(ValueError, match="one non-empty line"):
        few_shot_prompt([("a", " ")], "b")


def test_complete_line_is_the_greedy_text_cut_at_its_first_newline():
    engine = Engine(load("tiny"))
    prompt = "ROMEO:\nBut soft, what light"
    full = engine.generate(prompt, max_new_tokens=40)  # greedy, not stopped at a newline
    assert "\n" in full.text  # tiny's line ends within 40 tokens, so the cut is exercised
    text, n = complete_line(engine, prompt, max_new_tokens=40)
    assert text == full.text.split("\n")[0].strip()
    assert n < len(full.records)
    assert "\n" in engine.tokenizer.decode(full.token_ids[:n]) and "\n" not in engine.tokenizer.decode(
        full.token_ids[: n - 1]
    )


def test_cross_attention_map_is_transformers_cross_attention_mean_over_heads(mt):
    source = held_out(3)[2][0]
    trace = mt.generate(source, max_new_tokens=20)
    got = cross_attention_map(mt, source, trace.token_ids, layer=1)
    src = torch.tensor([mt.encode(source)])
    dec = torch.tensor([[mt.start_id, *trace.token_ids[:-1]]])
    with torch.no_grad():
        out = mt.loaded.model(input_ids=src, decoder_input_ids=dec, output_attentions=True)
    want = out.cross_attentions[1][0].float().mean(0)
    assert got.shape == (len(trace.token_ids), src.shape[1])
    # float32 both ways, the same products summed in another order: 1e-5 bounds the rounding of weights in [0, 1]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(len(got)), atol=1e-5)
