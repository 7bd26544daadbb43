"""The bug hunt (cyclelab.workshop.bughunt): the fixed GPT equals transformers, each planted bug shows its symptom
(measured here against transformers or by hand) and the check of its piece names that symptom."""

from __future__ import annotations

import re

import pytest
import torch

from cyclelab.checks import Result
from cyclelab.core.rope import rotate_half
from cyclelab.workshop import bughunt as bh

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def ids(tiny):
    return torch.tensor([tiny.tokenizer.encode(PROMPT)])


@pytest.fixture(scope="module")
def llama():
    return bh.random_llama()


def hf_attentions(model, ids) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(ids, output_attentions=True).attentions)


# ------------------------------------------------------------------ the fixed GPT against transformers


def test_the_fixed_gpt2_equals_transformers(tiny, ids):
    with torch.no_grad():
        mine, maps = bh.forward(tiny.model, ids)
        want = tiny.model(ids).logits
    assert torch.allclose(mine, want, atol=1e-4)
    assert all(torch.allclose(m, a, atol=1e-5) for m, a in zip(maps, hf_attentions(tiny.model, ids)))


def test_the_fixed_llama_equals_transformers(llama):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, _ = bh.forward(llama, ids)
        want = llama(ids).logits
    assert want.abs().max() > 1.0  # unit-gain weights: logits large enough for a bug to show
    assert torch.allclose(mine, want, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_cached_run_equals_the_full_recompute(family, tiny, ids, llama):
    model, seq = (tiny.model, ids[0]) if family == "gpt2" else (llama, torch.arange(10) % 64)
    with torch.no_grad():
        want = model(seq[None]).logits[0, 3:]
    assert torch.allclose(bh.cached_logits(model, seq, 4), want, atol=1e-4)


def test_lm_loss_equals_transformers_loss_with_padding_ignored(tiny):
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(1, 4096, (3, 10), generator=gen)
    mask = (torch.arange(10) < torch.tensor([[10], [6], [3]])).long()
    batch = batch.masked_fill(mask == 0, 0)
    with torch.no_grad():
        logits = tiny.model(batch).logits
        want = tiny.model(batch, labels=batch.masked_fill(mask == 0, -100)).loss  # transformers shifts and ignores -100
    assert float(bh.lm_loss(logits, batch, mask)) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("on_tiny", [False, True], ids=["random-model", "tiny"])
@pytest.mark.parametrize("piece", sorted(bh.CHECKS))
def test_every_check_passes_the_correct_piece(piece, on_tiny, tiny):
    check, fn = bh.CHECKS[piece], getattr(bh.Pieces(), piece)
    result = check(fn, tiny.model) if on_tiny and piece in ("attend", "append_kv") else check(fn)
    assert result.passed, result.message
    assert str(result).startswith("✓ correct")


# ------------------------------------------------------------------ each bug: its symptom, and the hint


def _looks_ahead(tiny, ids, llama, fn):
    with torch.no_grad():
        _, maps = bh.forward(tiny.model, ids, bh.with_piece("attend", fn))
    upper = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
    assert all(float(a[..., upper].max()) == 0.0 for a in hf_attentions(tiny.model, ids))  # transformers is causal
    assert float(maps[1][0, :, 0, 1:].sum(-1).max()) > 0.1  # but position 0 reads later tokens


def _copier_scores_zero(tiny, ids, llama, fn):
    copier_ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    copier = 20.0 * torch.nn.functional.one_hot(copier_ids, 10).float()  # each position says its own token
    # by hand: no token is followed by itself, so every next-token target has logit 0: loss log(e^20 + 9) ≈ 20;
    # scored on its own token instead, the copier is right everywhere: log(1 + 9 e^-20) ≈ 0
    assert float(fn(copier, copier_ids, torch.ones_like(copier_ids))) < 1e-3
    assert float(bh.lm_loss(copier, copier_ids, torch.ones_like(copier_ids))) > 19.0


def _entropy_collapses(tiny, ids, llama, fn):
    with torch.no_grad():
        _, maps = bh.forward(tiny.model, ids, bh.with_piece("attend", fn))
    reference = float(
        torch.stack([-(a * a.clamp_min(1e-30).log()).sum(-1).mean() for a in hf_attentions(tiny.model, ids)]).mean()
    )
    assert bh.mean_entropy(maps) < 0.7 * reference


def _drifts_after_position_0(tiny, ids, llama, fn):
    seq = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mine, _ = bh.forward(llama, seq, bh.with_piece("apply_rope", fn))
        gap = (mine - llama(seq).logits)[0].abs().amax(-1)
    assert gap[0] < 1e-4 and gap[1:].min() > 1e-2


def _loss_moves_with_padding(tiny, ids, llama, fn):
    logits = torch.randn(2, 14, 10, generator=torch.Generator().manual_seed(3))
    batch = torch.tensor([[1, 2, 3, 4, 5, 6] + [0] * 8, [7, 8, 9] + [0] * 11])
    mask = (batch > 0).long()
    # the same two lines padded to 6 and to 14 positions: the real targets and their logits are the same
    assert abs(float(fn(logits[:, :6], batch[:, :6], mask[:, :6])) - float(fn(logits, batch, mask))) > 0.01
    right = float(bh.lm_loss(logits[:, :6], batch[:, :6], mask[:, :6]))
    assert right == pytest.approx(float(bh.lm_loss(logits, batch, mask)))


def _cache_drifts_after_prefill(tiny, ids, llama, fn):
    seq = ids[0]
    with torch.no_grad():
        want = tiny.model(ids).logits[0, 4:]
    cache: dict = {}
    mine = bh.cached_logits(tiny.model, seq, 5, bh.with_piece("append_kv", fn))
    gap = (mine - want).abs().amax(-1)
    assert gap[0] < 1e-4 and gap[1:].min() > 1e-3
    with torch.no_grad():
        bh.forward(tiny.model, seq[None, :5], bh.with_piece("append_kv", fn), cache)
    assert cache[0][0].shape[-2] == 10  # 5 tokens, stored twice


SYMPTOMS = [
    pytest.param("no_causal_mask", _looks_ahead, r"attention looks ahead.*upper triangle", id="no_causal_mask"),
    pytest.param(
        "unshifted_targets",
        _copier_scores_zero,
        r"loss is too good.*copies its input.*not shifted",
        id="unshifted_targets",
    ),
    pytest.param("no_scale", _entropy_collapses, r"attention entropy collapses.*saturates.*sqrt\(d\)", id="no_scale"),
    pytest.param(
        "rope_pairing",
        _drifts_after_position_0,
        r"match the reference at position 0 and drift after it",
        id="rope_pairing",
    ),
    pytest.param(
        "padding_in_loss", _loss_moves_with_padding, r"loss changes with the amount of padding", id="padding_in_loss"
    ),
    pytest.param(
        "kv_cache_twice",
        _cache_drifts_after_prefill,
        r"cached run drifts from a full recompute after its first cycle \(faithfulness",
        id="kv_cache_twice",
    ),
]


@pytest.mark.parametrize("bug, symptom, hint", SYMPTOMS)
def test_a_planted_bug_shows_its_symptom_and_the_check_names_it(bug, symptom, hint, tiny, ids, llama):
    piece = bh.BUGS[bug].piece
    planted = getattr(bh.pieces(bug), piece)
    assert planted is bh.BUGS[bug].planted and getattr(bh.Pieces(), piece) is not planted
    symptom(tiny, ids, llama, planted)
    for model in (None, tiny.model) if piece in ("attend", "append_kv") else (None,):
        result = bh.CHECKS[piece](planted) if model is None else bh.CHECKS[piece](planted, model)
        assert not result.passed and re.search(hint, result.message), result.message


def test_the_bugs_table_covers_the_six_bugs_of_the_issue():
    assert set(bh.BUGS) == {
        "no_causal_mask",
        "unshifted_targets",
        "no_scale",
        "rope_pairing",
        "padding_in_loss",
        "kv_cache_twice",
    }
    assert {b.piece for b in bh.BUGS.values()} == set(bh.CHECKS)


# ------------------------------------------------------------------ the loss curve that is too good


@pytest.fixture(scope="module")
def characters():
    from cyclelab.loading.corpus import read_work

    return bh.char_tokens(read_work("romeo_and_juliet")[5000:25000])


@pytest.mark.parametrize("bug", ["no_causal_mask", "unshifted_targets"])
def test_a_peeking_model_trains_to_a_loss_below_what_text_allows(bug, characters):
    # English text carries about 1 bit (0.7 nats) per character (Shannon): far below that, the model saw the answer
    curve = bh.training_curve(bh.pieces(bug), *characters, steps=60)
    assert curve[0] > 2.5 and curve[-1] < 0.5


def test_the_correct_model_stays_above_it(characters):
    assert bh.training_curve(bh.Pieces(), *characters, steps=60)[-1] > 1.0


# ------------------------------------------------------------------ bad input and bad answers

BAD_INPUT = [
    pytest.param(
        lambda m: bh.pieces("no_such_bug"),
        ValueError,
        r"unknown bug 'no_such_bug'; the bugs are: no_causal_mask",
        id="unknown-bug",
    ),
    pytest.param(lambda m: bh.pieces(3), TypeError, r"a bug is named by a string, got int", id="bug-not-a-string"),
    pytest.param(
        lambda m: bh.pieces("no_causal_mask", "no_scale"),
        ValueError,
        r"two bugs in the piece 'attend' \(no_causal_mask, no_scale\): plant one bug per piece",
        id="two-bugs-one-piece",
    ),
    pytest.param(
        lambda m: bh.with_piece("attention", bh.append_kv),
        ValueError,
        r"unknown piece 'attention'; the pieces are: attend, apply_rope, append_kv, lm_loss",
        id="unknown-piece",
    ),
    pytest.param(
        lambda m: bh.with_piece("attend", "q @ k"),
        TypeError,
        r"the piece 'attend' must be a function, got str",
        id="piece-not-callable",
    ),
    pytest.param(
        lambda m: bh.forward(m, [[1, 2, 3]]),
        ValueError,
        r"ids must be an integer tensor \(batch, positions\)",
        id="ids-a-list",
    ),
    pytest.param(
        lambda m: bh.forward(m, torch.tensor([1, 2, 3])), ValueError, r"ids must be an integer tensor", id="ids-1d"
    ),
    pytest.param(
        lambda m: bh.forward(m, torch.ones(1, 3)), ValueError, r"ids must be an integer tensor", id="ids-float"
    ),
    pytest.param(
        lambda m: bh.forward(torch.nn.Linear(2, 2), torch.ones(1, 3, dtype=torch.long)),
        TypeError,
        r"forward runs a transformers GPT2LMHeadModel or LlamaForCausalLM, got Linear",
        id="not-a-gpt",
    ),
    pytest.param(
        lambda m: bh.cached_logits(m, torch.tensor([[1, 2, 3]]), 1),
        ValueError,
        r"ids must be a 1-D tensor of token ids",
        id="cached-ids-2d",
    ),
    pytest.param(
        lambda m: bh.cached_logits(m, torch.tensor([1, 2, 3]), 0),
        ValueError,
        r"n_prompt must be an integer from 1 to len\(ids\) = 3, got 0",
        id="n-prompt-zero",
    ),
    pytest.param(
        lambda m: bh.faithfulness(m, torch.tensor([1, 2, 3]), 4),
        ValueError,
        r"n_prompt must be an integer from 1 to len\(ids\) = 3, got 4",
        id="n-prompt-too-long",
    ),
    pytest.param(
        lambda m: bh.char_tokens("aaaa"), ValueError, r"at least two different characters", id="text-one-char"
    ),
    pytest.param(
        lambda m: bh.training_curve(bh.Pieces(), torch.arange(5), 5),
        ValueError,
        r"need more than length=8 tokens to train on, got 5",
        id="text-too-short",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUT)
def test_bad_input_gets_a_clear_error(call, error, message, tiny):
    with pytest.raises(error, match=message):
        call(tiny.model)


def _raises(*args):
    raise RuntimeError("boom")


BAD_ANSWERS = [
    pytest.param(bh.check_attend, "attend", r"pass your function itself", id="attend-not-a-function"),
    pytest.param(
        bh.check_attend,
        lambda q, k, v: q,
        r"return the pair \(out, probs\) as two tensors, got Tensor",
        id="attend-one-tensor",
    ),
    pytest.param(bh.check_attend, _raises, r"your function raised RuntimeError: boom", id="attend-raises"),
    pytest.param(
        bh.check_lm_loss,
        lambda logits, ids, mask: [1.0],
        r"return the loss as a one-number tensor, got list",
        id="loss-a-list",
    ),
    pytest.param(
        bh.check_lm_loss,
        lambda logits, ids, mask: logits.sum() * 0 + 1.0,
        r"the loss should be \d",
        id="loss-a-constant",
    ),
    pytest.param(
        bh.check_apply_rope,
        lambda x, cos, sin: x[..., :2],
        r"return the rotated x, a tensor of x's shape",
        id="rope-wrong-shape",
    ),
    pytest.param(
        bh.check_apply_rope,
        lambda x, cos, sin: x * cos - rotate_half(x) * sin,
        r"drift after it .*turns the wrong way",
        id="rope-backwards",
    ),
    pytest.param(
        bh.check_apply_rope,
        lambda x, cos, sin: x * float("nan"),
        r"differ from the reference at every position",
        id="rope-nan",
    ),
    pytest.param(
        bh.check_append_kv,
        lambda cache, layer, k, v: (k, v),
        r"cached run drifts from a full recompute after",
        id="cache-forgets",
    ),
    pytest.param(bh.check_append_kv, _raises, r"your function raised RuntimeError: boom", id="cache-raises"),
]


@pytest.mark.parametrize("check, answer, message", BAD_ANSWERS)
def test_a_bad_answer_gets_a_cross_and_a_hint_not_a_traceback(check, answer, message):
    result = check(answer)
    assert isinstance(result, Result) and not result.passed
    assert re.search(message, result.message), result.message
