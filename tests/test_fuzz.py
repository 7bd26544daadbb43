"""Arbitrary input through the public API (hypothesis): either a valid result (token ids in the
vocabulary, probabilities finite and in [0, 1]) or a ValueError/TypeError whose message names the
argument at fault. Never another exception, never NaN.

The examples are derandomized (the same on every run and machine) and few, so the file runs in
well under a minute on tiny.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyclelab import Sampling

FUZZ = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
VOCAB = 4096  # tiny's vocabulary

any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates included
ids = st.lists(st.integers(-3, VOCAB + 3) | st.integers(-(2**70), 2**70), max_size=8)
anything = (
    any_text
    | ids
    | st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.binary(max_size=8)
    | st.lists(st.floats() | st.booleans() | st.text(max_size=3), min_size=1, max_size=3)
    | st.lists(ids, min_size=1, max_size=2).map(lambda rows: torch.tensor([r[:1] or [0] for r in rows]))
)


def refused(error: Exception, *names: str) -> None:
    """Fail unless ``error`` is a ValueError or TypeError whose message names one of ``names``."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    assert re.search("|".join(names), str(error)), f"the message names none of {names}: {error}"


def check_trace(trace, n_max: int) -> None:
    """Token ids in the vocabulary; every probability finite and in [0, 1]; no NaN anywhere."""
    assert 1 <= len(trace.records) <= n_max
    for r in trace.records:
        assert 0 <= r.token_id < VOCAB and 0 <= r.greedy_id < VOCAB
        for p in (r.prob, r.raw_prob, *(q for _, _, q in r.top)):
            assert math.isfinite(p) and 0 <= p <= 1, r
        assert math.isfinite(r.entropy) and r.entropy >= 0
        assert r.draw is None or 0 <= r.draw < 1


@FUZZ
@given(prompt=any_text)
def test_any_unicode_text_encodes_or_is_refused(tiny_engine, prompt):
    try:
        encoded = tiny_engine.encode(prompt)
    except Exception as error:  # noqa: BLE001 - the property is about which exceptions
        refused(error, "prompt")
        return
    assert encoded and all(0 <= i < VOCAB for i in encoded)


@FUZZ
@given(prompt=any_text, n=st.integers(-1, 3) | st.booleans() | st.floats(0, 3))
def test_any_unicode_text_generates_or_is_refused(tiny_engine, prompt, n):
    try:
        trace = tiny_engine.generate(prompt, n)
    except Exception as error:  # noqa: BLE001
        refused(error, "prompt", "max_new_tokens")
        return
    check_trace(trace, n)


@FUZZ
@given(prompt=anything)
def test_any_python_value_as_a_prompt_is_ids_or_refused(tiny_engine, prompt):
    try:
        encoded = tiny_engine.encode(prompt)
    except Exception as error:  # noqa: BLE001
        refused(error, "prompt")
        return
    assert all(type(i) is int and 0 <= i < VOCAB for i in encoded)
    if isinstance(prompt, list):
        assert encoded == prompt  # ids pass through unchanged, never coerced


@FUZZ
@given(
    temperature=st.floats(allow_nan=True) | st.sampled_from([1e-300, 1e-45, 1e-8, 1e300]),
    top_p=st.none() | st.floats(0, 1) | st.floats(),
    top_k=st.none() | st.integers(-2, 10**7),
    repetition_penalty=st.floats(-2, 3) | st.sampled_from([0.0, 1e-300, 1e300]),
    seed=st.integers(-5, 2**65),
    min_p=st.none() | st.floats(0, 1) | st.floats(),
)
def test_sampling_at_its_edges_gives_valid_tokens_or_names_the_setting(
    tiny_engine, temperature, top_p, top_k, repetition_penalty, seed, min_p
):
    try:
        trace = tiny_engine.generate(
            "ROMEO:",
            2,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            min_p=min_p,
            stop_at_eos=False,
        )
    except Exception as error:  # noqa: BLE001
        refused(error, "temperature", "top_p", "top_k", "repetition_penalty", "seed", "min_p")
        return
    check_trace(trace, 2)


@FUZZ
@given(penalty=st.floats(1e-300, 1e300), greedy=st.booleans())
def test_any_positive_repetition_penalty_keeps_probabilities_valid(tiny_engine, penalty, greedy):
    try:
        trace = tiny_engine.generate(
            "ROMEO: O Romeo, Romeo",
            2,
            sampling=Sampling(do_sample=not greedy, seed=0, repetition_penalty=penalty),
            stop_at_eos=False,
        )
    except ValueError as error:  # a penalty so small that the penalised logits overflow
        assert penalty < 1e-30 and "repetition_penalty" in str(error) and "overflows" in str(error)
        return
    check_trace(trace, 2)


@pytest.fixture(scope="module")
def base(tiny_engine):
    return tiny_engine.generate("ROMEO:", 4, stop_at_eos=False)


@FUZZ
@given(
    at=st.integers(-2, 6) | st.floats(-1, 5) | st.booleans(),
    token=st.none() | st.integers(-3, VOCAB + 3) | st.integers(-(2**64), 2**64) | st.floats(0, VOCAB),
    n=st.none() | st.integers(-1, 6),
)
def test_branching_anywhere_with_any_token_is_valid_or_refused(tiny_engine, base, at, token, n):
    try:
        branch = tiny_engine.branch(base, at, token=token, max_new_tokens=n)
    except Exception as error:  # noqa: BLE001
        refused(error, "at_cycle", "token", "max_new_tokens")
        return
    check_trace(branch, n or 4)
    assert branch.token_ids[:at] == base.token_ids[:at]
    if token is not None:
        assert branch.token_ids[at] == token


@FUZZ
@given(force=st.lists(st.none() | st.integers(-3, VOCAB + 3) | st.floats(0, 10) | st.booleans(), max_size=4))
def test_forcing_any_tokens_is_valid_or_refused(tiny_engine, force):
    try:
        trace = tiny_engine.generate("ROMEO:", 3, force=force, stop_at_eos=False)
    except Exception as error:  # noqa: BLE001
        refused(error, "force")
        return
    check_trace(trace, 3)
    assert all(t is None or trace.token_ids[i] == t for i, t in enumerate(force[:3]))
