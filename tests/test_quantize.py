"""Quantization helpers against hand computations, the round-trip bound, and the gguf library's own
Q4_1 dequantization."""

import numpy as np
import pytest
import torch

from cyclelab.lab.quantize import (
    decode_q4_1_block,
    dequantize_int4,
    dequantize_int8,
    gguf_block,
    quantize_int4,
    quantize_int8,
    round_trip,
    simulate,
    weight_bytes,
)
from cyclelab.loading.fetch import asset_path, is_fetched


def test_int8_by_hand():
    w = torch.tensor([[1.27, -0.5, 0.1], [0.0, 0.0, 0.0], [-2.54, 0.03, 1.0]])
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8
    assert scale.flatten().tolist() == pytest.approx([0.01, 1.0, 0.02])  # max|row| / 127; a zero row keeps scale 1
    assert q.tolist() == [[127, -50, 10], [0, 0, 0], [-127, 2, 50]]  # 0.03 / 0.02 = 1.5 rounds to the even 2


def test_int4_by_hand():
    w = torch.tensor([[0.7, -0.31, 0.12, 0.0, 1.4, 0.2, -0.59, 0.0]])
    q, scale = quantize_int4(w, group=4)
    assert q.shape == (1, 2, 4)
    assert scale.flatten().tolist() == pytest.approx([0.1, 0.2])  # max|group| / 7
    assert q.tolist() == [[[7, -3, 1, 0], [7, 1, -3, 0]]]
    assert dequantize_int4(q, scale)[0].tolist() == pytest.approx([0.7, -0.3, 0.1, 0.0, 1.4, 0.2, -0.6, 0.0])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_round_trip_error_is_at_most_half_a_step(method):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 24)[:, None]
    if method == "int8":
        q, scale = quantize_int8(w)
        error, bound = (w - dequantize_int8(q, scale)).abs(), scale / 2
    else:
        q, scale = quantize_int4(w, group=16)
        error, bound = (w - dequantize_int4(q, scale)).abs().reshape(24, 4, 16), scale / 2
    assert (error <= bound * (1 + 1e-5)).all()
    assert q.abs().max() == (127 if method == "int8" else 7)  # each row's (group's) largest value uses the top code


def test_bfloat16_round_trip_keeps_8_bits_of_mantissa():
    w = torch.tensor([[1.0 + 2**-7, 1.0 + 2**-9]])
    assert round_trip(w, "bfloat16").tolist() == [[1.0 + 2**-7, 1.0]]
    assert torch.equal(round_trip(w, "float32"), w)


def test_weight_bytes_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 8))
    # 64 weights: float32 256 B; int8 64 B + 2 B per output row (4 + 8 rows); int4 32 B + 2 B per group of 4
    assert weight_bytes(model, "float32") == 256 and weight_bytes(model, "bfloat16") == 128
    assert weight_bytes(model, "int8") == 64 + 2 * 12
    assert weight_bytes(model, "int4", group=4) == 32 + 2 * 16


def test_simulate_quantizes_conv1d_rows_of_a_copy(tiny):
    layer = tiny.model.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out), output channels are columns
    before = layer.weight.detach().clone()
    copy = simulate(tiny.model, "int8")
    got = copy.transformer.h[0].attn.c_attn.weight
    assert torch.equal(layer.weight, before)  # the original is untouched
    absmax = before.abs().amax(dim=0)  # one scale per output channel = per column of a Conv1D weight
    want = torch.round(before / (absmax / 127)) * (absmax / 127)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    assert copy.lm_head.weight.data_ptr() == copy.transformer.wte.weight.data_ptr()  # the tie survives


def _q4_1_block(d: float, m: float, codes: list[int]) -> bytes:
    packed = bytes((codes[i] & 0x0F) | (codes[i + 16] << 4) for i in range(16))
    return np.array([d, m], dtype="<f2").tobytes() + packed


def test_q4_1_block_by_hand():
    codes = list(range(16)) + [15 - i for i in range(16)]  # elements 16..31 live in the high nibbles
    values = decode_q4_1_block(_q4_1_block(0.5, -1.0, codes))
    assert values.tolist() == [0.5 * q - 1.0 for q in codes]


def test_q4_1_random_blocks_match_the_gguf_library():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    for _ in range(20):
        block = _q4_1_block(float(rng.normal()), float(rng.normal()), rng.integers(0, 16, 32).tolist())
        want = dequantize(np.frombuffer(block, dtype=np.uint8), GGMLQuantizationType.Q4_1).reshape(-1)
        assert np.array_equal(decode_q4_1_block(block).numpy(), want)


@pytest.mark.skipif(not is_fetched("smollm2"), reason="the smollm2 GGUF is not fetched")
def test_q4_1_blocks_of_smollm2_match_the_gguf_library():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for tensor, index in (("blk.0.attn_q.weight", 0), ("blk.5.ffn_down.weight", 123)):
        block = gguf_block(asset_path("smollm2"), tensor, index)
        want = dequantize(block, GGMLQuantizationType.Q4_1).reshape(-1)
        assert np.array_equal(decode_q4_1_block(block).numpy(), want)


GGUF_CASES = {
    "unknown tensor": (("no.such.tensor", 0), ValueError, r"no tensor 'no.such.tensor'"),
    "a float32 tensor": (("blk.0.attn_norm.weight", 0), ValueError, r"is F32, not Q4_1"),
    "block index past the end": (
        ("blk.0.attn_k.weight", 10**9),
        ValueError,
        r"block index must be an integer in \[0, ",
    ),
}


@pytest.mark.skipif(not is_fetched("smollm2"), reason="the smollm2 GGUF is not fetched")
@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_block_bad_input(name):
    args, error, message = GGUF_CASES[name]
    with pytest.raises(error, match=message):
        gguf_block(asset_path("smollm2"), *args)


BAD = {
    "int8 of a list": (lambda: quantize_int8([[1.0]]), TypeError, r"quantize_int8 quantizes a tensor, got list"),
    "int8 of a vector": (lambda: quantize_int8(torch.ones(4)), ValueError, r"2-D floating-point weight.*got 1-D"),
    "int8 of integers": (lambda: quantize_int8(torch.ones(2, 2, dtype=torch.long)), ValueError, r"floating-point"),
    "int8 of NaN": (lambda: quantize_int8(torch.tensor([[1.0, float("nan")]])), ValueError, r"inf or NaN"),
    "int4 group not dividing": (
        lambda: quantize_int4(torch.ones(2, 10), group=4),
        ValueError,
        r"group must be a positive integer dividing the row length 10, got 4",
    ),
    "int4 group zero": (lambda: quantize_int4(torch.ones(2, 8), group=0), ValueError, r"group must be"),
    "unknown round-trip method": (lambda: round_trip(torch.ones(2, 2), "int3"), ValueError, r"unknown method 'int3'"),
    "unknown bytes method": (lambda: weight_bytes(torch.nn.Linear(2, 2), "fp8"), ValueError, r"unknown method 'fp8'"),
    "short Q4_1 block": (lambda: decode_q4_1_block(bytes(19)), ValueError, r"a Q4_1 block is 20 bytes.*got 19"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error(name):
    call, error, message = BAD[name]
    with pytest.raises(error, match=message):
        call()
