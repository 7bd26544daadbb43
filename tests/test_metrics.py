"""Tests for cyclelab.train.metrics, against transformers' own loss computation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cyclelab.train.metrics import block_nll, perplexity, perplexity_of_model, windows


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def ids_of(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(seed))


def reference(model, ids: torch.Tensor, context: int, stride: int) -> float:
    """The transformers perplexity recipe: labels=-100 where a window must not score."""
    nll, count, scored_until = 0.0, 0, 0
    for start in range(0, len(ids), stride):
        end = min(start + context, len(ids))
        window = ids[start:end][None]
        labels = window.clone()
        labels[0, : max(0, scored_until - start)] = -100  # already scored by an earlier window
        n = int((labels[0, 1:] != -100).sum())  # transformers shifts: position 0 is never a target
        if n:
            with torch.no_grad():
                nll += float(model(window, labels=labels).loss) * n
            count += n
        scored_until = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize(
    "length,context,stride,batch_size",
    [
        (200, 32, None, 8),  # 6 full windows and a shorter last one
        (192, 32, None, 4),  # windows fit exactly
        (150, 64, 16, 3),  # overlapping windows
        (41, 40, None, 8),  # the last window has a single token: nothing to score there
        (10, 64, None, 8),  # shorter than one window
    ],
)
def test_matches_transformers_loss(model, length, context, stride, batch_size):
    ids = ids_of(length)
    mine = perplexity_of_model(model, ids, context, stride=stride, batch_size=batch_size)
    assert mine == pytest.approx(reference(model, ids, context, stride or context), rel=1e-5)


def test_default_stride_scores_all_but_window_starts(model):
    ids = ids_of(64, seed=1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0], dim=-1)  # one window of 64
        halves = [torch.log_softmax(model(ids[None, a : a + 32]).logits[0], dim=-1) for a in (0, 32)]
    nll = -sum(float(logprobs[i - 1, ids[i]]) for i in range(1, 64))
    assert perplexity_of_model(model, ids.tolist(), 64) == pytest.approx(math.exp(nll / 63), rel=1e-5)
    # two windows of 32: token 32 starts the second window and is not scored
    nll = -sum(float(halves[a // 32][i - 1, ids[a + i]]) for a in (0, 32) for i in range(1, 32))
    assert perplexity_of_model(model, ids, 32) == pytest.approx(math.exp(nll / 62), rel=1e-5)
    # batch size and (1, seq) input do not change the result
    a = perplexity_of_model(model, ids, 20, batch_size=1)
    assert perplexity_of_model(model, ids[None], 20, batch_size=5) == pytest.approx(a, rel=1e-6)


def test_windows_score_each_token_at_most_once():
    for length, context, stride in ((200, 32, 32), (150, 64, 16), (7, 3, 1), (41, 40, 40)):
        scored = [i for _, end, first in windows(length, context, stride) for i in range(first, end)]
        starts = set(range(0, length, stride)) if stride == context else {0}
        assert sorted(scored) == sorted(set(range(length)) - starts)
    assert list(windows(10, 5, 5)) == [(0, 5, 1), (5, 10, 6)]
    assert list(windows(11, 5, 5)) == [(0, 5, 1), (5, 10, 6)]  # token 10 alone: nothing to score
    assert list(windows(10, 5, 2)) == [(0, 5, 1), (2, 7, 5), (4, 9, 7), (6, 10, 9)]


def test_restores_training_mode(model):
    model.train()
    try:
        perplexity_of_model(model, ids_of(50), 16)
        assert model.training
    finally:
        model.eval()


def test_perplexity_helper():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(7), 10) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="count"):
        perplexity(1.0, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ids=[1]), "ids"),
        (dict(ids=[]), "ids"),
        (dict(ids=[1, 2, 50]), "ids"),
        (dict(ids=[1, -2, 3]), "ids"),
        (dict(context=1), "context"),
        (dict(context=65), "context"),
        (dict(context=0), "context"),
        (dict(stride=0), "stride"),
        (dict(stride=33), "stride"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_inputs_raise(model, kwargs, match):
    args = dict(ids=list(range(40)), context=32) | kwargs
    with pytest.raises(ValueError, match=match):
        perplexity_of_model(model, **args)


def test_block_nll_is_each_blocks_transformers_loss(model):
    ids = ids_of(100, seed=2)  # three blocks of 32 and 4 tokens left out
    got = block_nll(model, ids, 32, batch_size=2)
    with torch.no_grad():  # transformers' own loss: the mean over a block's 31 predicted tokens
        want = [float(model(ids[None, a : a + 32], labels=ids[None, a : a + 32]).loss) for a in (0, 32, 64)]
    assert got.shape == (3,) and torch.allclose(got, torch.tensor(want), atol=1e-5)  # float32 means of 31 terms
    assert math.exp(float(got.mean())) == pytest.approx(perplexity_of_model(model, ids[:96], 32), rel=1e-5)


@pytest.mark.parametrize("context,length", [(1, 50), (32, 20), (4096, 5000)])
def test_block_nll_refuses_what_it_cannot_score(model, context, length):
    with pytest.raises(ValueError, match="context|fewer"):
        block_nll(model, ids_of(length), context)
