"""Chapter 11's screening: the block list bans exactly the listed token sequences (transformers'
NoBadWordsLogitsProcessor is the reference), multi-token words included; the flag; generation with it."""

import math

import pytest
import torch
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

from cyclelab.lab.screening import BlockList, flagged, generate

WORDS = ["poison", "dagger", "Verona", "hemlockish"]


def test_the_listed_words_include_multi_token_sequences(tiny):
    block = BlockList(tiny.tokenizer, WORDS)
    assert any(len(seq) >= 2 for seq in block.sequences)
    assert len(block.sequences) == len({s for w in WORDS for s in (w, " " + w)})


def test_bans_exactly_what_transformers_bans(tiny):
    block = BlockList(tiny.tokenizer, WORDS)
    reference = NoBadWordsLogitsProcessor([list(s) for s in block.sequences], eos_token_id=None)
    gen = torch.Generator().manual_seed(0)
    histories = [torch.randint(0, 2000, (6,), generator=gen).tolist() for _ in range(20)]
    for seq in block.sequences:  # histories that end with each multi-token word's prefix
        if len(seq) > 1:
            histories.append([5, 7, *seq[:-1]])
    ids = torch.tensor([h[-6:] if len(h) >= 6 else [0] * (6 - len(h)) + h for h in histories])
    scores = torch.randn(len(ids), tiny.tokenizer.vocab_size, generator=gen)
    mine, theirs = block(ids, scores), reference(ids, scores.clone())
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
    assert torch.equal(mine[~torch.isinf(mine)], scores[~torch.isinf(mine)])


def test_a_multi_token_word_is_stopped_at_its_last_token_only_after_its_prefix(tiny):
    block = BlockList(tiny.tokenizer, ["hemlockish"])
    seq = max(block.sequences, key=len)
    assert len(seq) >= 2
    vocab = tiny.tokenizer.vocab_size
    after_prefix = block(torch.tensor([[3, *seq[:-1]]]), torch.zeros(1, vocab))
    elsewhere = block(torch.tensor([[3, 4]]), torch.zeros(1, vocab))
    assert after_prefix[0, seq[-1]] == -math.inf
    assert elsewhere[0, seq[-1]] == 0 or seq[-1] in {s[0] for s in block.sequences if len(s) == 1}


def test_generation_with_the_block_never_writes_the_word(tiny):
    prompt = "ROMEO:\n"
    free = generate(tiny, prompt, 8)
    word = free.split()[0].strip(",.:;!?")
    blocked = generate(tiny, prompt, 8, BlockList(tiny.tokenizer, [word]))
    assert blocked != free
    assert blocked.split()[0].strip(",.:;!?") != word  # the first cycle could not write it


def test_flag_finds_whole_words_or_stems_ignoring_case():
    text = "He drank the Poisoned cup and drew his dagger."
    assert flagged(text, ["poison", "dagger", "sword"]) == ["dagger"]
    assert flagged(text, ["poison", "dagger", "sword"], stems=True) == ["poison", "dagger"]


def test_block_list_refuses_bad_input(tiny):
    with pytest.raises(ValueError, match="non-empty list"):
        BlockList(tiny.tokenizer, "poison")
    with pytest.raises(ValueError, match="batch"):
        BlockList(tiny.tokenizer, ["poison"])(torch.zeros(3, dtype=torch.long), torch.zeros(1, 10))
