"""Chapter 07 exercise checks: correct answers pass, typical mistakes get a hint naming the symptom,
and a learner's function that raises gives ✗, never an exception."""

import pytest
import torch

from cyclelab.check import check_attainable, check_int8_row


def good_int8(x):
    scale = x.abs().max() / 127
    if scale == 0:
        return torch.zeros_like(x, dtype=torch.int8), 1.0
    return torch.round(x / scale).to(torch.int8), float(scale)


def test_int8_solution_passes():
    result = check_int8_row(good_int8)
    assert result and str(result).startswith("✓")


def test_int8_solution_with_float_codes_and_tensor_scale_passes():
    def float_codes(x):
        m = x.abs().max()
        scale = m / 127 if m > 0 else torch.tensor(1.0)
        return torch.round(x / scale), scale
    assert check_int8_row(float_codes)


def _safe(scale_of):
    def fn(x):
        scale = scale_of(x)
        scale = scale if scale != 0 else 1.0
        return torch.round(x / scale), float(scale)
    return fn


WRONG_INT8 = {
    "scale over 128": (_safe(lambda x: x.abs().max() / 128), "127"),
    "scale from max, not max abs": (_safe(lambda x: x.max() / 127 if x.max() > 0 else x.abs().max() / 127 * -1), "ABSOLUTE"),
    "scale upside down": (lambda x: (torch.round(x * (127 / x.abs().max())), float(127 / x.abs().max()))
                          if x.abs().max() > 0 else (torch.zeros_like(x), 1.0), "upside down"),
    "truncates instead of rounding": (lambda x: (torch.trunc(x / (x.abs().max() / 127)), float(x.abs().max() / 127))
                                      if x.abs().max() > 0 else (torch.zeros_like(x), 1.0), "ROUND"),
    "returns dequantized values": (lambda x: (torch.round(x / (x.abs().max() / 127)) * (x.abs().max() / 127),
                                              float(x.abs().max() / 127)) if x.abs().max() > 0
                                   else (torch.zeros_like(x), 1.0), "whole numbers"),
    "divides a zero row by zero": (lambda x: (torch.round(x / (x.abs().max() / 127)), float(x.abs().max() / 127)),
                                   "zeros"),
    "stub": (lambda x: (x, 1.0), "whole numbers"),
}


def test_int8_wrong_shape_and_return_type_are_named():
    assert "shape" in check_int8_row(lambda x: (torch.round(x / (x.abs().max() / 127)).reshape(1, -1), 1.0)).message
    assert "return (q, scale)" in check_int8_row(lambda x: 3).message


def test_int8_raising_function_gives_a_cross():
    def broken(x):
        raise RuntimeError("boom")
    result = check_int8_row(broken)
    assert not result and "RuntimeError" in result.message and str(result).startswith("✗")


def good_attainable(flops, nbytes, peak, bandwidth):
    return min(peak, flops / nbytes * bandwidth)


def test_attainable_solution_passes():
    result = check_attainable(good_attainable)
    assert result and str(result).startswith("✓")


def test_attainable_reference_by_hand():
    # 2 MFLOP over 4 MB is 0.5 FLOP/byte: 0.5 × 20 GB/s = 10 GFLOP/s, under a 50 GFLOP/s peak
    assert good_attainable(2e6, 4e6, 50e9, 20e9) == pytest.approx(10e9)
    assert check_attainable(lambda f, b, p, w: 10e9 if f == 2e6 else good_attainable(f, b, p, w))


WRONG_ATTAINABLE = {
    "no cap at the peak": (lambda f, b, p, w: f / b * w, "peak"),
    "always the peak": (lambda f, b, p, w: p, "memory"),
    "max instead of min": (lambda f, b, p, w: max(p, f / b * w), "min"),
    "bytes per flop": (lambda f, b, p, w: min(p, b / f * w), "FLOPs per byte"),
    "intensity only": (lambda f, b, p, w: f / b, "bandwidth"),
    "not a number": (lambda f, b, p, w: "fast", "number"),
}


WRONG = {**{f"int8: {k}": (check_int8_row, *v) for k, v in WRONG_INT8.items()},
         **{f"roofline: {k}": (check_attainable, *v) for k, v in WRONG_ATTAINABLE.items()}}


@pytest.mark.parametrize("name", list(WRONG))
def test_wrong_answers_get_a_hint(name):
    checker, fn, keyword = WRONG[name]
    result = checker(fn)
    assert not result and str(result).startswith("✗")
    assert keyword in result.message, result.message


def test_attainable_raising_function_gives_a_cross():
    result = check_attainable(lambda f, b, p, w: 1 / 0)
    assert not result and "ZeroDivisionError" in result.message
