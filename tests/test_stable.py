"""cyclelab.lab.rounding: rounding for checked notebook outputs (hand-computed cases)."""

import pytest
import torch

from cyclelab.lab.rounding import round_sig, sig, signed


@pytest.mark.parametrize(
    "value, digits, expected",
    [
        (22712.3, 2, 23000.0),
        (22712.3, 3, 22700.0),
        (619.4, 2, 620.0),
        (3.2, 2, 3.2),
        (0.012345, 2, 0.012),
        (-487.0, 2, -490.0),
        (0.0, 2, 0.0),
        (95.0, 1, 100.0),
    ],
)
def test_round_sig_keeps_the_leading_digits(value, digits, expected):
    assert round_sig(value, digits) == expected


@pytest.mark.parametrize("value, text", [(22712.3, "23000"), (73.4, "73"), (3.04, "3"), (0.5, "0.5"), (120.2, "120")])
def test_sig_prints_without_noise_digits(value, text):
    assert sig(value) == text


def test_sig_is_the_same_for_values_that_differ_only_by_float_noise():
    base = torch.tensor(22712.3)
    assert sig(base) == sig(base * (1 + 1e-6)) == sig(base * (1 - 1e-6))


@pytest.mark.parametrize("value", [-1e-9, 1e-9, -0.0, 0.0, -0.0004, 0.0004])
def test_signed_never_prints_minus_zero(value):
    assert signed(value) == "+0.000"


def test_signed_keeps_real_signs():
    assert (signed(-0.032), signed(0.002, 3), signed(-1.5, 1)) == ("-0.032", "+0.002", "-1.5")


@pytest.mark.parametrize("digits", [0, -1, 1.5, None])
def test_round_sig_refuses_a_bad_digit_count(digits):
    with pytest.raises(ValueError, match="digits"):
        round_sig(1.0, digits)
