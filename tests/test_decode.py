"""Tests for cyclelab.core.sampling, against transformers' own processors and beam search."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cyclelab.core import sampling as decode
from cyclelab.core.sampling import Sampling

CASES = [(seed, vocab) for seed, vocab in zip(range(6), (50, 97, 200, 333, 640, 1000))]


def random_case(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (1, vocab), spread like a real model's, and 20 previous ids."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, vocab, generator=g) * 3
    previous = torch.randint(0, vocab, (1, 20), generator=g)
    return logits, previous


def assert_same(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same -inf pattern and the same finite values."""
    assert torch.equal(torch.isneginf(mine), torch.isneginf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(mine[finite], theirs[finite], rtol=0, atol=0)


# ---------------------------------------------------------------- processors vs transformers


@pytest.mark.parametrize("seed,vocab", CASES)
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed, vocab, penalty):
    logits, previous = random_case(seed, vocab)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(previous, logits.clone())
    assert_same(decode.apply_repetition_penalty(logits, previous, penalty), theirs)
    assert_same(decode.apply_repetition_penalty(logits[0], previous[0], penalty), theirs[0])


@pytest.mark.parametrize("seed,vocab", CASES)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(seed, vocab, temperature):
    logits, previous = random_case(seed, vocab)
    theirs = TemperatureLogitsWarper(temperature)(previous, logits.clone())
    assert_same(decode.apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("seed,vocab", CASES)
@pytest.mark.parametrize("k", [1, 5, 40, 2000])
def test_top_k_matches_transformers(seed, vocab, k):
    logits, previous = random_case(seed, vocab)
    theirs = TopKLogitsWarper(k)(previous, logits.clone())
    assert_same(decode.top_k_filter(logits, k), theirs)
    assert_same(decode.top_k_filter(logits[0], k), theirs[0])


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]])
    theirs = TopKLogitsWarper(3)(None, logits.clone())
    mine = decode.top_k_filter(logits, 3)
    assert_same(mine, theirs)
    assert torch.isfinite(mine).sum() == 4  # 3, 3, 2, 2: the tie at the 3rd place is kept


FILTERS = [
    (decode.top_p_filter, TopPLogitsWarper, (0.05, 0.5, 0.9, 0.99, 1.0)),
    (decode.min_p_filter, MinPLogitsWarper, (0.0, 0.01, 0.1, 0.5, 1.0)),
]


@pytest.mark.parametrize("seed,vocab", CASES)
@pytest.mark.parametrize(
    "mine,warper,value", [pytest.param(f, w, v, id=f"{f.__name__}-{v}") for f, w, values in FILTERS for v in values]
)
def test_top_p_and_min_p_match_transformers(seed, vocab, mine, warper, value):
    logits, previous = random_case(seed, vocab)
    theirs = warper(value)(previous, logits.clone())
    assert_same(mine(logits, value), theirs)
    assert_same(mine(logits[0], value), theirs[0])
    # also after temperature and top-k, the way generate() chains them, when -inf entries are already there
    filtered = TopKLogitsWarper(30)(previous, TemperatureLogitsWarper(0.7)(previous, logits.clone()))
    assert_same(mine(filtered, value), warper(value)(previous, filtered.clone()))


def test_min_p_hand_computed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # threshold 0.2 × 0.5 = 0.1: 0.05 goes; 0.5 × 0.5 = 0.25: 0.15 goes too
    assert torch.isfinite(decode.min_p_filter(logits, 0.2)).tolist() == [True, True, True, False]
    assert torch.isfinite(decode.min_p_filter(logits, 0.5)).tolist() == [True, True, False, False]
    assert torch.isfinite(decode.min_p_filter(logits, 1.0)).tolist() == [True, False, False, False]
    flat = torch.zeros(4)  # a flat distribution keeps every token at any min_p
    assert torch.isfinite(decode.min_p_filter(flat, 0.9)).all()


def test_top_p_hand_computed():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert torch.isfinite(decode.top_p_filter(logits, 0.75)).tolist() == [False, True, True]
    assert torch.isfinite(decode.top_p_filter(logits, 0.4)).tolist() == [False, True, False]
    assert torch.isfinite(decode.top_p_filter(logits, 0.9)).tolist() == [True, True, True]
    # a tiny p still keeps the single most likely token
    assert torch.isfinite(decode.top_p_filter(logits, 1e-6)).tolist() == [False, True, False]


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    out = decode.apply_repetition_penalty(logits, [0, 1, 1], 2.0)  # token 1 counted once
    assert out.tolist() == [1.0, -2.0, 0.5, -3.0]
    assert decode.apply_repetition_penalty(logits, [], 2.0).tolist() == logits.tolist()


# ---------------------------------------------------------------- pipeline and choose


def test_pipeline_stages_in_transformers_order():
    logits, previous = random_case(0, 300)
    s = Sampling(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2, min_p=0.05)
    names = [name for name, _ in decode.pipeline(logits[0], previous[0], s)]
    assert names == ["logits", "repetition_penalty", "temperature", "top_k", "top_p", "min_p"]
    expected = logits.clone()
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(50),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.05),
    ):
        expected = processor(previous, expected)
    assert_same(decode.pipeline(logits[0], previous[0], s)[-1][1], expected[0])


def test_pipeline_only_active_stages():
    logits = torch.randn(20)
    assert [n for n, _ in decode.pipeline(logits, [], Sampling())] == ["logits"]
    greedy_settings = Sampling(temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.5)
    assert [n for n, _ in decode.pipeline(logits, [1], greedy_settings)] == ["logits", "repetition_penalty"]
    assert [n for n, _ in decode.pipeline(logits, [], Sampling(do_sample=True, top_p=1.0))] == ["logits"]
    assert [n for n, _ in decode.pipeline(logits, [], Sampling(do_sample=True, min_p=0.0))] == ["logits"]
    assert [n for n, _ in decode.pipeline(logits, [], Sampling(min_p=0.3))] == ["logits"]  # greedy ignores it


def test_choose_greedy_and_sampled():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    c = decode.choose(logits, [1], Sampling())
    assert (c.token_id, c.greedy_id, c.draw) == (1, 1, None)
    assert c.prob == pytest.approx(0.6) and c.raw_prob == pytest.approx(0.6)
    assert c.entropy == pytest.approx(-sum(p * math.log(p) for p in (0.1, 0.6, 0.3)), rel=1e-5)
    assert [t for t, _ in c.top] == [1, 2, 0]
    # a strong penalty on token 1 makes greedy pick token 2, while greedy_id still says 1
    c = decode.choose(logits, [1], Sampling(repetition_penalty=10.0))
    assert (c.token_id, c.greedy_id) == (2, 1)
    assert c.raw_prob == pytest.approx(0.3)
    c = decode.choose(logits, [], Sampling(do_sample=True, top_k=2, seed=3))
    assert c.token_id in (1, 2) and 0 <= c.draw < 1
    assert c.prob == pytest.approx({1: 2 / 3, 2: 1 / 3}[c.token_id], rel=1e-5)
    assert [t for t, _ in c.top] == [1, 2]  # filtered tokens are not listed


# ---------------------------------------------------------------- sampling


def test_sample_is_reproducible_and_seed_dependent():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))

    def draws(seed: int) -> list[int]:
        g = decode.make_generator(seed)
        return [decode.sample(logits, g)[0] for _ in range(50)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    token, u = decode.sample(logits, decode.make_generator(5))
    assert u == torch.rand(1, generator=torch.Generator().manual_seed(5)).item()


def test_sample_is_inverse_cdf():
    logits = torch.log(torch.tensor([0.25, 0.0, 0.5, 0.25]))  # token 1 is impossible
    for seed in range(200):
        token, u = decode.sample(logits, decode.make_generator(seed))
        assert token == (0 if u < 0.25 else 2 if u < 0.75 else 3)


@pytest.mark.parametrize(
    "u, expected",
    [
        (0.0, (0, 0.0, 0.25)),
        (0.2499, (0, 0.0, 0.25)),
        (0.25, (2, 0.25, 0.75)),
        (0.7, (2, 0.25, 0.75)),
        (0.75, (3, 0.75, 1.0)),
        (0.9999, (3, 0.75, 1.0)),
    ],
)
def test_slice_of_finds_the_slice_holding_u(u, expected):
    token, low, high = decode.slice_of(torch.tensor([0.25, 0.0, 0.5, 0.25]), u)  # token 1 has an empty slice
    assert (token, low, high) == (expected[0], pytest.approx(expected[1]), pytest.approx(expected[2]))


def test_sample_frequencies_match_softmax():
    probs = [0.05, 0.15, 0.3, 0.1, 0.4]
    logits = torch.log(torch.tensor(probs)) + 1.7  # a shift does not change the softmax
    g = decode.make_generator(1234)
    n = 20000
    counts = [0] * len(probs)
    for _ in range(n):
        counts[decode.sample(logits, g)[0]] += 1
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))
    assert chi2 < 18.47  # 99.9th percentile of chi-square with 4 degrees of freedom


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(do_sample=True, temperature=0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, temperature=float("inf")), "temperature"),
        (dict(do_sample=True, temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
    ],
)
def test_sampling_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sampling(**kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(top_k=2.5), "top_k"),
        (dict(do_sample="no"), "do_sample"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_sampling_rejects_wrong_types(kwargs, name):
    with pytest.raises(TypeError, match=name):
        Sampling(**kwargs)


def test_sampling_accepts_greedy_with_zero_temperature():
    assert Sampling(temperature=0).do_sample is False
    assert Sampling(do_sample=True, top_p=1.0, top_k=1).top_p == 1.0


@pytest.mark.parametrize(
    "bad", [torch.empty(0), torch.zeros(2, 3, 4), torch.tensor([1, 2, 3]), torch.tensor([0.0, float("nan")])]
)
def test_bad_logits_raise(bad):
    for call in (
        lambda: decode.top_k_filter(bad, 2),
        lambda: decode.top_p_filter(bad, 0.5),
        lambda: decode.apply_temperature(bad, 1.0),
        lambda: decode.greedy(bad),
        lambda: decode.pipeline(bad, [], Sampling()),
    ):
        with pytest.raises(ValueError, match="logits"):
            call()


def test_bad_processor_arguments_raise():
    logits = torch.randn(10)
    with pytest.raises(ValueError, match="previous_ids"):
        decode.apply_repetition_penalty(logits, [10], 1.2)
    with pytest.raises(ValueError, match="temperature"):
        decode.apply_temperature(logits, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        decode.top_k_filter(logits, 0)
    with pytest.raises(ValueError, match="top_p"):
        decode.top_p_filter(logits, 0.0)
    with pytest.raises(ValueError, match="logits"):
        decode.greedy(torch.randn(2, 10))  # one position only
    with pytest.raises(ValueError, match="-inf"):
        decode.sample(torch.full((4,), -math.inf), decode.make_generator(0))


# ---------------------------------------------------------------- beam search


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """A small random GPT-2 whose logits are spread enough to avoid near-ties."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=64,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return GPT2LMHeadModel(config).eval()


def logits_fn(model: GPT2LMHeadModel):
    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits[:, -1]

    return next_logits


def greedy_reference(next_logits, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Plain greedy decoding, with the log-probability of what it produced."""
    ids, total = list(prompt), 0.0
    for _ in range(steps):
        logprobs = torch.log_softmax(next_logits(torch.tensor([ids]))[0], dim=-1)
        token = int(logprobs.argmax())
        ids.append(token)
        total += float(logprobs[token])
    return ids[len(prompt) :], total


@pytest.mark.parametrize("seed", range(3))
def test_beam_width_one_is_greedy_and_wider_is_no_worse(seed):
    model = tiny_gpt2(seed)
    prompt = torch.randint(0, 50, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids, score = greedy_reference(logits_fn(model), prompt, 8)
    [(beam_ids, beam_score)] = decode.beam_search(logits_fn(model), prompt, 1, 8)
    assert beam_ids == ids and beam_score == pytest.approx(score, abs=1e-4)
    results = decode.beam_search(logits_fn(model), prompt, 3, 8)
    assert len(results) == 3 and all(len(r[0]) == 8 for r in results)
    assert [s for _, s in results] == sorted((s for _, s in results), reverse=True)
    assert results[0][1] >= score - 1e-5


def hf_beams(
    model, prompt: torch.Tensor, eos, num_beams: int, steps: int, length_penalty: float = 0.0
) -> list[tuple[list[int], float]]:
    """transformers' beam search, generated ids cut after the first end-of-sequence token."""
    config = GenerationConfig(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=False,
        max_new_tokens=steps,
        eos_token_id=eos,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model.generate(prompt[None], generation_config=config, attention_mask=torch.ones(1, len(prompt)))
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    results = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        ids = seq[len(prompt) :].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
        results.append((ids[:end], float(score)))
    return results


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_matches_transformers(seed):
    model = tiny_gpt2(seed)
    prompt = torch.randint(0, 50, (5,), generator=torch.Generator().manual_seed(100 + seed))
    greedy_ids, _ = greedy_reference(logits_fn(model), prompt.tolist(), 8)
    # no end token, one likely end token (greedy's 3rd), and two end tokens
    for eos in (None, greedy_ids[2], [greedy_ids[1], (greedy_ids[1] + 1) % 50]):
        mine = decode.beam_search(logits_fn(model), prompt, 3, 8, eos_token_id=eos)
        theirs = hf_beams(model, prompt, eos, 3, 8)
        assert [ids for ids, _ in mine] == [ids for ids, _ in theirs], f"eos={eos}"
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=1e-4)
        if eos is not None and isinstance(eos, int):
            assert any(len(ids) < 8 for ids, _ in mine)  # the end-of-sequence path was exercised


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length_penalty", [1.0, 2.0, -0.5])
def test_beam_search_length_penalty_matches_transformers(seed, length_penalty):
    model = tiny_gpt2(seed)
    prompt = torch.randint(0, 50, (5,), generator=torch.Generator().manual_seed(100 + seed))
    greedy_ids, _ = greedy_reference(logits_fn(model), prompt.tolist(), 8)
    for eos in (greedy_ids[2], [greedy_ids[1], (greedy_ids[1] + 1) % 50]):
        mine = decode.beam_search(logits_fn(model), prompt, 3, 8, eos_token_id=eos, length_penalty=length_penalty)
        theirs = hf_beams(model, prompt, eos, 3, 8, length_penalty)
        assert [ids for ids, _ in mine] == [ids for ids, _ in theirs], f"eos={eos}"
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=1e-4)


def test_beam_search_length_penalty_on_tiny_matches_transformers(tiny):
    """The real tiny model, a newline as the end token: the penalty changes which hypotheses win."""
    model = tiny.model
    prompt = torch.tensor(tiny.tokenizer("JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\nROMEO:\n")["input_ids"])
    newline = tiny.tokenizer("\n")["input_ids"][0]
    winners = {}
    for length_penalty in (0.0, 1.0, 2.0):
        mine = decode.beam_search(logits_fn(model), prompt, 4, 12, eos_token_id=newline, length_penalty=length_penalty)
        theirs = hf_beams(model, prompt, newline, 4, 12, length_penalty)
        assert [ids for ids, _ in mine] == [ids for ids, _ in theirs], length_penalty
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=1e-4)
        winners[length_penalty] = mine[0][0]
    assert len(set(map(tuple, winners.values()))) > 1  # the penalty made a difference here


def test_length_penalty_scores_by_hand():
    """Two steps over 4 tokens with fixed probabilities; token 2 ends a hypothesis."""
    table = torch.log(torch.tensor([[0.6, 0.1, 0.25, 0.05], [0.3, 0.3, 0.35, 0.05]]))

    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([table[len(row) - 1] for row in ids])  # the prompt is one token

    # ending at once has p = 0.25 (1 token); token 0 then the end has p = 0.6 × 0.35 = 0.21 (2 tokens)
    for lp, ids, score in ((0.0, [2], math.log(0.25)), (1.0, [0, 2], math.log(0.21) / 2)):
        best = decode.beam_search(next_logits, [0], 2, 2, eos_token_id=2, length_penalty=lp)[0]
        assert best[0] == ids and best[1] == pytest.approx(score, abs=1e-6), lp


def test_beam_search_scores_are_log_probabilities():
    model = tiny_gpt2(7)
    prompt = [3, 1, 4]
    for ids, score in decode.beam_search(logits_fn(model), prompt, 4, 5):
        seq = torch.tensor([prompt + ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(seq).logits[0, len(prompt) - 1 : -1], dim=-1)
        assert score == pytest.approx(float(logprobs.gather(1, torch.tensor(ids)[:, None]).sum()), abs=1e-4)


def test_beam_search_validation():
    fn = logits_fn(tiny_gpt2(0))
    with pytest.raises(ValueError, match="num_beams"):
        decode.beam_search(fn, [1, 2], 0, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.beam_search(fn, [1, 2], 2, 0)
    with pytest.raises(ValueError, match="input_ids"):
        decode.beam_search(fn, [], 2, 5)
    with pytest.raises(ValueError, match="eos_token_id"):
        decode.beam_search(fn, [1], 2, 5, eos_token_id=-1)
    with pytest.raises(ValueError, match="next_logits"):
        decode.beam_search(lambda ids: torch.zeros(50), [1], 2, 5)
    for bad in (math.nan, math.inf, True, "1.0"):
        with pytest.raises(ValueError, match="length_penalty must be a finite number"):
            decode.beam_search(fn, [1], 2, 5, length_penalty=bad)


def test_sampling_without_top_k_keeps_the_whole_vocabulary_unlike_transformers_default():
    """Documented in Sampling: transformers' generate() fills an unset top_k with 50, Sampling keeps no top-k."""
    from transformers import GenerationConfig

    defaults = getattr(
        GenerationConfig,
        "_get_default_generation_params",  # transformers 5: filled in by generate()
        lambda: {"top_k": GenerationConfig().top_k},
    )()  # transformers 4: the config's own default
    assert defaults["top_k"] == 50
    assert Sampling(do_sample=True).top_k is None
    logits = torch.linspace(-30.0, 5.0, 1000)
    final = decode.pipeline(logits, [], Sampling(do_sample=True))[-1][1]
    assert torch.isfinite(final).all()  # all 1000 tokens can be drawn, not just the best 50
    assert "top_k=50" in Sampling.__doc__
