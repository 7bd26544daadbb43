"""Chapter 09's long-text helpers: overlapping spans, scenes, chunk vectors, nearest centroid, a sliding window.

References: spans and centroids worked out by hand; chunk vectors against ``sentence_embeddings`` of the
same text (one chunk) and against the encoder run on each chunk by hand; the sliding window's
negative log-likelihood against ``transformers``' own loss with ``labels`` on the same windows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cyclelab.lab.embedding import sentence_embeddings
from cyclelab.lab.long_text import (
    block_losses,
    chunk_embeddings,
    chunk_spans,
    context_length,
    loss_by_position,
    nearest_centroid,
    play_scenes,
    window_nll,
)


@pytest.mark.parametrize(
    "n, size, overlap, spans",
    [
        (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
        (10, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10)]),
        (11, 4, 1, [(0, 4), (3, 7), (6, 10), (9, 11)]),
        (8, 4, 0, [(0, 4), (4, 8)]),
        (9, 4, 0, [(0, 4), (4, 8), (8, 9)]),
        (3, 4, 1, [(0, 3)]),
        (4, 4, 3, [(0, 4)]),
        (1, 1, 0, [(0, 1)]),
    ],
)
def test_chunk_spans_by_hand(n, size, overlap, spans) -> None:
    assert chunk_spans(n, size, overlap) == spans


def test_scenes_of_macbeth() -> None:
    found = play_scenes("macbeth")
    # counted by hand in the text's headings: acts of 7, 2, 6, 3 and 8 scenes (this edition cuts Act II in two)
    assert len(found) == 7 + 2 + 6 + 3 + 8
    assert found[0].startswith("When shall we three meet again")
    assert "SCENE" not in found[0] and "WITCH" not in found[0]


def test_one_chunk_is_the_sentence_embedding(minilm) -> None:
    text = "Is this a dagger which I see before me, the handle toward my hand?"
    vectors = chunk_embeddings(minilm, text, size=128, overlap=16)
    assert vectors.shape == (1, 384)
    assert torch.allclose(vectors[0], sentence_embeddings(minilm, [text])[0], atol=1e-5)


def test_chunks_are_the_encoder_on_each_window(minilm) -> None:
    tok = minilm.tokenizer
    text = " ".join(["Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day."] * 6)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    vectors = chunk_embeddings(minilm, text, size=40, overlap=10, batch=2)
    starts = list(range(0, len(ids), 28))
    starts = starts[: next(i for i, s in enumerate(starts) if s + 38 >= len(ids)) + 1]
    assert len(vectors) == len(starts)
    for row, start in zip(vectors, starts):
        window = torch.tensor([[tok.cls_token_id, *ids[start : start + 38], tok.sep_token_id]])
        with torch.no_grad():
            want = minilm.model(input_ids=window).last_hidden_state.mean(1)[0]
        assert torch.allclose(row, F.normalize(want, dim=-1), atol=1e-5)


def test_nearest_centroid_by_hand() -> None:
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.3]])
    # row 4 (class 1) sits among class 0's rows: left out, class 1's centroid is (0.05, 0.95)
    assert nearest_centroid(vectors, [0, 0, 1, 1, 1]) == [0, 0, 1, 1, 0]


def _hf_nll(model, ids: torch.Tensor, spans_and_firsts) -> tuple[float, int]:
    """transformers' loss with labels: the earlier tokens of each window are set to -100."""
    total, count = 0.0, 0
    for (start, end), first in spans_and_firsts:
        labels = ids[start:end].clone()
        labels[: first - start] = -100
        with torch.no_grad():
            loss = model(ids[start:end][None], labels=labels[None]).loss
        total += float(loss) * (end - first)
        count += end - first
    return total, count


def test_sliding_window_matches_transformers_loss(tiny) -> None:
    ids = torch.tensor(
        tiny.tokenizer("Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace " * 30)["input_ids"][:300]
    )
    # window 100, stride 40: spans (0,100) (40,140) ... (200,300); each scores what the last did not
    spans = [(s, min(s + 100, 300)) for s in range(0, 201, 40)]
    firsts = [1] + [e for _, e in spans[:-1]]
    want, count = _hf_nll(tiny.model, ids, list(zip(spans, firsts)))
    got = window_nll(tiny.model, ids, 100, 40)
    assert got.scored == count == 299 and got.computed == sum(e - s for s, e in spans)
    assert got.nll == pytest.approx(want, rel=1e-5)
    blocks = window_nll(tiny.model, ids, 100, 100)  # independent blocks: each block's first token is not scored
    want_blocks, count_blocks = _hf_nll(tiny.model, ids, [((0, 100), 1), ((100, 200), 101), ((200, 300), 201)])
    assert blocks.scored == count_blocks == 297 and blocks.nll == pytest.approx(want_blocks, rel=1e-5)


def test_whole_passage_in_one_window_is_the_plain_loss(tiny) -> None:
    ids = torch.tensor(tiny.tokenizer("Out, out, brief candle! Life's but a walking shadow")["input_ids"])
    with torch.no_grad():
        loss = float(tiny.model(ids[None], labels=ids[None]).loss)
    score = window_nll(tiny.model, ids, 256, 64)
    assert score.perplexity == pytest.approx(torch.exp(torch.tensor(loss)).item(), rel=1e-5)


def test_loss_by_position_is_the_blocks_loss_per_position(tiny) -> None:
    ids = torch.tensor(tiny.tokenizer("Is this a dagger which I see before me " * 20)["input_ids"][:60])
    got = loss_by_position(tiny.model, ids, 20)
    assert got.shape == (19,)
    with torch.no_grad():
        per_block = [
            F.cross_entropy(tiny.model(ids[s : s + 20][None]).logits[0, :-1], ids[s + 1 : s + 20], reduction="none")
            for s in (0, 20, 40)
        ]
    assert torch.allclose(got, torch.stack(per_block).mean(0), atol=1e-5)
    rows = block_losses(tiny.model, ids, 20, batch=2)  # two batches: the split must not change a row
    assert rows.shape == (3, 19) and torch.allclose(rows, torch.stack(per_block), atol=1e-5)  # float32 sums of 19


def test_window_nll_keeps_each_tokens_loss(tiny) -> None:
    ids = torch.tensor(
        tiny.tokenizer("Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace " * 8)["input_ids"][:90]
    )
    blocks = window_nll(tiny.model, ids, 30, 30)
    unscored = torch.nonzero(blocks.losses.isnan()).flatten().tolist()
    assert unscored == [0, 30, 60]  # each independent block's first token
    assert float(blocks.losses.nansum()) == pytest.approx(blocks.nll, rel=1e-6)
    with torch.no_grad():
        first = F.cross_entropy(tiny.model(ids[None, :30]).logits[0, :-1], ids[1:30], reduction="none")
    assert torch.allclose(blocks.losses[1:30], first, atol=1e-5)
    sliding = window_nll(tiny.model, ids, 30, 10)
    assert not sliding.losses[1:].isnan().any() and sliding.losses[0].isnan()


BAD = [
    pytest.param(
        lambda m: chunk_spans(0, 4, 1),
        ValueError,
        r"n \(the number of tokens\) must be a positive int, not 0",
        id="spans-no-tokens",
    ),
    pytest.param(lambda m: chunk_spans(10, 0, 0), ValueError, r"size must be a positive int", id="spans-size-0"),
    pytest.param(
        lambda m: chunk_spans(10, 4, 4),
        ValueError,
        r"overlap must be an int in \[0, size\) = \[0, 4\)",
        id="spans-full-overlap",
    ),
    pytest.param(lambda m: chunk_spans(10, 4, -1), ValueError, r"overlap must be", id="spans-negative-overlap"),
    pytest.param(lambda m: chunk_spans(10.0, 4, 1), ValueError, r"must be a positive int", id="spans-float-n"),
    pytest.param(lambda m: nearest_centroid(torch.zeros(3, 2), [0, 1]), ValueError, r"n labels", id="centroid-lengths"),
    pytest.param(
        lambda m: nearest_centroid(torch.zeros(3, 2), [0, 0, 1]),
        ValueError,
        r"at least two rows",
        id="centroid-lonely-class",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD)
def test_bad_input_is_named(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"window": 300}, r"window must be an int in \[stride, 256\]", id="window-past-context"),
        pytest.param({"window": 32, "stride": 64}, r"window must be an int in \[stride", id="window-below-stride"),
        pytest.param({"stride": 0}, r"stride must be a positive int, not 0", id="window-stride-0"),
        pytest.param({"ids": torch.tensor([5])}, r"at least 2 tokens", id="window-one-token"),
        pytest.param({"ids": torch.zeros(2, 5, dtype=torch.long)}, r"one sequence", id="window-2d-ids"),
    ],
)
def test_bad_window_arguments(tiny, kwargs, message) -> None:
    args = {"ids": torch.arange(50), "window": 64, "stride": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        window_nll(tiny.model, **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(
            {"size": 600}, r"size must be in \[3, 512\]: minilm reads at most 512 tokens", id="chunk-past-limit"
        ),
        pytest.param({"text": ""}, r"text has no tokens", id="chunk-empty-text"),
        pytest.param(
            {"size": 64, "overlap": 62}, r"overlap must be an int in \[0, size\) = \[0, 62\)", id="chunk-overlap"
        ),
    ],
)
def test_bad_chunk_arguments(minilm, kwargs, message) -> None:
    args = {"text": "a short text", "size": 128, "overlap": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        chunk_embeddings(minilm, **args)


def test_loss_by_position_needs_a_block(tiny) -> None:
    with pytest.raises(ValueError, match=r"at least one block of window >= 2 tokens, got 10 tokens and window 20"):
        loss_by_position(tiny.model, torch.arange(10), 20)


def test_window_nll_reads_a_llama_config(smollm2) -> None:
    """SmolLM2's config calls its context ``max_position_embeddings`` (8192), not ``n_positions``."""
    ids = torch.tensor(smollm2.tokenizer("To be, or not to be, that is the question.")["input_ids"])
    with torch.no_grad():
        loss = float(smollm2.model(ids[None], labels=ids[None]).loss)
    score = window_nll(smollm2.model, ids, len(ids), len(ids))
    assert score.scored == len(ids) - 1 and score.nll / score.scored == pytest.approx(loss, rel=1e-4)
    assert context_length(smollm2.model.config) == smollm2.model.config.max_position_embeddings == 8192
    with pytest.raises(
        ValueError, match=r"window must be an int in \[stride, 8192\] \(the model's context\), not 9000"
    ):
        window_nll(smollm2.model, ids, 9000, 4)
