"""The float32 C kernels (decode's matrix-vector products) against a float64 product, and the cases
they hand back to torch: the same numbers as torch's own op there, exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cyclelab import Engine, kernels
from cyclelab.kernels import MANY_ROWS, f32_conv1d, f32_linear, torch_float32
from cyclelab.show import show_kernel

SHAPES = [((1, 576), 1536), ((1, 1, 192), 576), ((3, 37), 45), ((2, 1, 1536), 576), ((MANY_ROWS - 1, 64), 9),
          ((1, 5), 3), ((1, 49152 // 64), 70)]
IDS = ["decode-vector", "gpt2-qkv", "ragged-tail", "batch-of-2", "most-rows", "narrower-than-a-block", "wide-k"]


def _case(x_shape, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g)
    return x, torch.randn(n, x_shape[-1], generator=g), torch.randn(n, generator=g)


def _bound(x, w):
    """float32 rounding of a sum of k products, in any order: at most k * eps * sum |x_i w_i| (plus the bias's)."""
    k = x.shape[-1]
    return k * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().T) + 1e-6


@pytest.mark.parametrize("x_shape,n", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_f32_linear_is_the_float64_product_within_float32_rounding(x_shape, n, with_bias):
    x, w, b = _case(x_shape, n)
    b = b if with_bias else None
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    with torch.no_grad():
        got = f32_linear(x, w, b)
    assert got.shape == (*x_shape[:-1], n) and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= _bound(x, w)).all()


@pytest.mark.parametrize("x_shape,n", SHAPES, ids=IDS)
def test_f32_conv1d_reads_the_in_out_layout(x_shape, n):
    x, w, b = _case(x_shape, n, seed=1)
    w_in_out = w.T.contiguous()  # GPT-2's Conv1D stores (in, out)
    exact = x.double() @ w_in_out.double() + b.double()
    with torch.no_grad():
        got = f32_conv1d(x, w_in_out, b)
    assert got.shape == (*x_shape[:-1], n)
    assert ((got.double() - exact).abs() <= _bound(x, w)).all()


def test_the_result_does_not_depend_on_the_number_of_threads():
    x, w, b = _case((2, 1000), 333, seed=2)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append((f32_linear(x, w, b), f32_conv1d(x, w.T.contiguous(), b)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, outs[0][0]) and torch.equal(c, outs[0][1]) for a, c in outs)


def _handed_back(x, w, b):
    return {"many rows (prefill)": (x.expand(MANY_ROWS, -1).contiguous(), w, b),
            "float64": (x.double(), w.double(), b.double()),
            "a transposed (non-contiguous) weight": (x, w.T.contiguous().T, b),
            "a non-contiguous input": (torch.cat([x, x], -1)[:, ::2], w, b)}


@pytest.mark.parametrize("case", ["many rows (prefill)", "float64", "a transposed (non-contiguous) weight",
                                  "a non-contiguous input"])
def test_what_the_kernel_does_not_take_is_torchs_own_linear(case):
    x, w, b = _handed_back(*_case((1, 40), 24, seed=3))[case]
    with torch.no_grad():
        assert torch.equal(f32_linear(x, w, b), F.linear(x, w, b))


def test_gradients_flow_through_torch_when_wanted():
    x, w, b = _case((1, 40), 24, seed=4)
    w.requires_grad_(True)
    f32_linear(x, w, b).sum().backward()
    torch.testing.assert_close(w.grad, x.expand(24, -1))  # d(sum_j x·w_j)/dw_j = x


def test_a_flop_counter_sees_the_products():
    x, w, b = _case((1, 64), 32, seed=5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        f32_linear(x, w, b)
        f32_conv1d(x, w.T.contiguous(), b)
    assert counter.get_total_flops() == 2 * (2 * 64 * 32)


def test_a_wrong_width_is_torchs_clear_shape_error():
    x, w, b = _case((1, 40), 24, seed=6)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):
        f32_linear(x[:, :39], w, b)


def test_torch_float32_switches_the_kernels_off_inside_the_block_only(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_run_f32", lambda *args: calls.append(args[0]))
    x, w, b = _case((1, 40), 24, seed=7)
    with torch.no_grad():
        with torch_float32():
            assert torch.equal(f32_linear(x, w, b), F.linear(x, w, b))
        f32_linear(x, w, b)
    assert calls == ["f32_linear"]


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_the_engine_with_its_kernels_matches_the_engine_on_torchs(name, request):
    engine: Engine = request.getfixturevalue(f"{name}_engine")
    ids = engine.encode("ROMEO:\nBut soft, what light")
    fast = engine.generate(ids, 12, stop_at_eos=False)
    with torch_float32():
        slow = engine.generate(ids, 12, stop_at_eos=False)
    assert fast.token_ids == slow.token_ids
    assert all(abs(a.raw_prob - b.raw_prob) < 1e-4 for a, b in zip(fast.records, slow.records))


@pytest.mark.parametrize("name", ["f32_linear", "f32_conv1d", "f32_rms_norm", "f32_rope", "int8_linear"])
def test_show_kernel_shows_one_whole_kernel_with_its_comment(name):
    code = show_kernel(name).code
    assert code.startswith("/*") and f"void {name}(" in code and code in kernels.SOURCE
    assert code.count("{") == code.count("}") and code.rstrip().endswith("}")
    assert code.count("void ") == 1  # one kernel, not the next one too
    assert "<span" in show_kernel(name)._repr_html_()  # highlighted


def test_show_kernel_of_an_unknown_kernel_names_the_known_ones():
    with pytest.raises(ValueError, match="no kernel 'f16_linear'; the kernels are f32_linear, f32_conv1d, .*int8_linear"):
        show_kernel("f16_linear")


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 1, 37), (2, 1, 64), (1, 3, 16)], ids=["decode", "ragged", "batch", "rows"])
def test_rms_norm_kernel_is_the_formula_within_rounding(shape):
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    exact = w.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    with torch.no_grad():
        got = kernels.fused_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5), atol=1e-5, rtol=1e-5)


def test_rope_kernel_gives_torchs_values_to_the_last_bit():
    from cyclelab.rope import apply_rope, rope_cos_sin
    g = torch.Generator().manual_seed(9)
    cos, sin = rope_cos_sin(torch.tensor([37]), 1 / 10000 ** (torch.arange(0, 64, 2) / 64))
    for heads in (9, 3):
        x = torch.randn(1, heads * 64, generator=g).view(1, 1, heads, 64).transpose(1, 2)  # split_heads' view
        with torch.no_grad():
            assert torch.equal(kernels.fused_rope(x, cos, sin), apply_rope(x, cos, sin))


def test_norm_and_rope_of_a_prompt_stay_with_torch(monkeypatch):
    monkeypatch.setattr(kernels, "compiled", lambda: pytest.fail("a prompt's rows went to the C kernel"))
    from cyclelab.rope import rope_cos_sin
    cos, sin = rope_cos_sin(torch.arange(5), torch.rand(8))
    with torch.no_grad():
        assert kernels.fused_rope(torch.randn(1, 2, 5, 16), cos, sin) is None
        assert kernels.fused_rms_norm(torch.randn(1, MANY_ROWS, 16), torch.ones(16), 1e-5) is None
