"""Premise probes against a plain transformers forward (hidden states, final norm, unembedding) on tiny."""

from __future__ import annotations

import pytest
import torch

from cyclelab.lab.patching import resid_post
from cyclelab.lab.premises import answer_probs, first_tokens, lens_probs, settles_at

PROMPT, ANSWERS = "KING RICHARD:\nNow, my lord of", [" York", " your grace"]


def test_answer_probs_match_transformers(tiny, tiny_engine):
    ids = tiny.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(tiny.model(torch.tensor([ids])).logits[0, -1], -1)
    firsts = [tiny.tokenizer(a)["input_ids"][0] for a in ANSWERS]  # " your grace" counts by " your"
    assert answer_probs(tiny_engine, PROMPT, ANSWERS) == pytest.approx([float(probs[i]) for i in firsts], abs=1e-6)


def test_the_lens_matches_transformers_hidden_states(tiny, tiny_engine):
    ids = tiny.tokenizer(PROMPT)["input_ids"]
    body = tiny.model.transformer
    with torch.no_grad():  # hidden_states[L + 1] is the stream after layer L (the last one already has ln_f)
        hidden = tiny.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        lens = [torch.softmax(tiny.model.lm_head(body.ln_f(h[0, -1])), -1) for h in hidden[1:-1]]
    firsts = first_tokens(tiny_engine, ANSWERS)
    want = torch.tensor([[float(p[i]) for i in firsts] for p in lens])
    got = lens_probs(tiny_engine, PROMPT, ANSWERS)
    assert torch.allclose(got[:-1], want, atol=1e-5)
    assert got[-1].tolist() == pytest.approx(answer_probs(tiny_engine, PROMPT, ANSWERS), abs=1e-5)
    stream = resid_post(tiny_engine, PROMPT)
    assert torch.equal(lens_probs(tiny_engine, PROMPT, ANSWERS, stream), got)


@pytest.mark.parametrize(
    "preferred, layer",
    [([0, 1, 1, 1], 1), ([1, 1, 1], 0), ([1, 0, 1, 0], 3), ([2], 0)],
    ids=["settles-at-1", "never-changes", "changes-at-the-end", "one-layer"],
)
def test_settles_at_by_hand(preferred, layer):
    assert settles_at(preferred) == layer


BAD = [
    ("no answers", lambda e: first_tokens(e, []), ValueError, r"answers must be a list of non-empty strings"),
    ("one string", lambda e: answer_probs(e, PROMPT, " York"), ValueError, r"list of non-empty strings"),
    ("blank answer", lambda e: lens_probs(e, PROMPT, [" York", " "]), ValueError, r"non-empty strings"),
    ("empty prompt", lambda e: answer_probs(e, "", [" York"]), ValueError, r"prompt is empty"),
    ("no layers", lambda e: settles_at([]), ValueError, r"no layers given"),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_explained(tiny_engine, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_engine)
