"""Prompt-lookup speculative decoding: the same tokens as plain greedy, in fewer forward passes."""

import pytest
import torch

from cyclelab.lab.speculative import copy_question, greedy_with_lookup, lookup_draft, plain_greedy, transformers_greedy

ECHO = "ROMEO:\nO, she doth teach the torches to burn bright!\nROMEO:\nO, she doth"
PLAIN = "JULIET:\nWhat light"


@pytest.mark.parametrize(
    "ids, ngram, k, expected",
    [
        ([1, 2, 3, 4, 1, 2], 2, 3, [3, 4, 1]),  # bigram (1, 2) seen at 0: what followed it
        ([1, 2, 3, 1, 2, 9, 1, 2], 2, 2, [9, 1]),  # the latest earlier match wins
        ([5, 6], 3, 2, []),  # nothing repeats
        ([7, 8, 7], 3, 5, [8, 7]),  # falls back to a unigram match
        ([1, 2, 3, 4], 1, 2, []),
    ],
    ids=["bigram", "latest", "none", "unigram-fallback", "no-repeat"],
)
def test_lookup_draft_by_hand(ids, ngram, k, expected):
    assert lookup_draft(ids, ngram, k) == expected


@pytest.mark.parametrize("prompt", [ECHO, PLAIN], ids=["copies-its-input", "free-text"])
def test_same_tokens_as_plain_greedy_tiny(tiny_engine, prompt):
    run = greedy_with_lookup(tiny_engine, prompt, 40)
    assert run.token_ids == tiny_engine.generate(prompt, max_new_tokens=40).token_ids
    assert run.forward_passes <= 40 and run.accepted <= run.drafted


def test_copying_prompt_needs_fewer_passes(tiny_engine):
    run = greedy_with_lookup(tiny_engine, ECHO, 40)
    assert run.accepted > 0 and run.forward_passes < 40 and run.tokens_per_pass > 1


def test_same_tokens_as_plain_greedy_smollm2(smollm2_engine):
    question = "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox"
    run = greedy_with_lookup(smollm2_engine, question, 16, chat=True)
    assert run.token_ids == smollm2_engine.generate(question, max_new_tokens=16, chat=True).token_ids


def test_matches_transformers_prompt_lookup(tiny_engine):
    ids = tiny_engine.encode(ECHO)
    model = tiny_engine.loaded.model
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=30,
        do_sample=False,
        prompt_lookup_num_tokens=5,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pad_token_id=0,
    )
    assert greedy_with_lookup(tiny_engine, ECHO, 30, stop_at_eos=False).token_ids == out[0, len(ids) :].tolist()


@pytest.mark.parametrize("lookup", [None, 4], ids=["plain", "prompt-lookup"])
def test_transformers_greedy_matches_the_engine(tiny_engine, lookup):
    run = transformers_greedy(tiny_engine, ECHO, 20, prompt_lookup_num_tokens=lookup)
    plain = plain_greedy(tiny_engine, ECHO, 20)
    assert run.token_ids == plain.token_ids and len(plain.token_ids) == plain.forward_passes
    assert run.seconds > 0 and plain.seconds > 0
    if lookup is None:  # one pass per token (the prefill makes the first)
        assert run.forward_passes == len(run.token_ids)
    else:  # the echoed line is drafted from the prompt: fewer passes than tokens
        assert run.forward_passes < len(run.token_ids)


def test_copy_question_holds_folio_lines():
    question = copy_question(2)
    assert question.splitlines()[1:] == [
        "In Thunder, Lightning, or in Raine?",
        "When the Battaile's lost, and wonne",
        "Modern spelling:",
    ]  # the Folio's spelling, read in the text itself


class _WithEos:
    """The tokenizer with another end-of-sequence id."""

    def __init__(self, tokenizer, eos: int):
        self._tokenizer, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_stops_at_end_of_sequence_like_plain_greedy(tiny_engine, monkeypatch):
    tokens = tiny_engine.generate(ECHO, max_new_tokens=30, stop_at_eos=False).token_ids
    monkeypatch.setattr(tiny_engine, "tokenizer", _WithEos(tiny_engine.tokenizer, tokens[12]))
    expected = tiny_engine.generate(ECHO, max_new_tokens=30).token_ids
    assert greedy_with_lookup(tiny_engine, ECHO, 30).token_ids == expected == tokens[: tokens.index(tokens[12]) + 1]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be at least 1"),
        ({"ngram": 0}, ValueError, "ngram must be at least 1"),
        ({"draft_len": -2}, ValueError, "draft_len must be at least 1"),
        ({"draft_len": "3"}, TypeError, "draft_len"),
        ({"prompt": ""}, ValueError, "empty"),
        ({"prompt": "to be " * 400}, ValueError, "context window"),
    ],
    ids=["no-tokens", "ngram-0", "negative-draft", "draft-as-string", "empty-prompt", "prompt-too-long"],
)
def test_bad_settings_are_refused(tiny_engine, kwargs, error, message):
    args = {"prompt": PLAIN, "max_new_tokens": 8, **kwargs}
    with pytest.raises(error, match=message):
        greedy_with_lookup(tiny_engine, args.pop("prompt"), **args)
