"""The float32 C kernels (decode's matrix-vector products) against a float64 product, and the cases
they hand back to torch: the same numbers as torch's own op there, exactly."""

import math

import pytest
import torch
import torch.nn.functional as F
from float_bounds import EPS32, assert_within, dot_bound, logit_bound
from torch.utils.flop_counter import FlopCounterMode

from cyclelab import Engine, kernels
from cyclelab.kernels import MANY_ROWS, f32_conv1d, f32_linear, torch_float32
from cyclelab.show import show_kernel


@pytest.fixture(autouse=True)
def _own_kernels_forced(monkeypatch):
    """These tests are about the own kernels: force them on (``auto`` would time each shape and might keep torch's)."""
    monkeypatch.setattr(kernels.choice, "_MODE", ["own"])  # CYCLELAB_KERNELS=own, as read at the first product


SHAPES = [
    ((1, 576), 1536),
    ((1, 1, 192), 576),
    ((3, 37), 45),
    ((2, 1, 1536), 576),
    ((MANY_ROWS - 1, 64), 9),
    ((1, 5), 3),
    ((1, 49152 // 64), 70),
]
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
    return {
        "many rows (prefill)": (x.expand(MANY_ROWS, -1).contiguous(), w, b),
        "float64": (x.double(), w.double(), b.double()),
        "a transposed (non-contiguous) weight": (x, w.T.contiguous().T, b),
        "a non-contiguous input": (torch.cat([x, x], -1)[:, ::2], w, b),
    }


@pytest.mark.parametrize(
    "case", ["many rows (prefill)", "float64", "a transposed (non-contiguous) weight", "a non-contiguous input"]
)
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


def test_a_wrong_width_names_x_and_the_weight():
    """(torch's own error said only "mat1 and mat2 shapes cannot be multiplied (1x39 and 40x24)")"""
    x, w, b = _case((1, 40), 24, seed=6)
    with torch.no_grad(), pytest.raises(ValueError, match=r"x's last dimension must be the weight's input width 40"):
        f32_linear(x[:, :39], w, b)


class _Recorder:
    """Stands in for the compiled library: records which kernels are called (and computes nothing)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append(name)


def test_torch_float32_switches_the_kernels_off_inside_the_block_only(monkeypatch):
    library = _Recorder()
    monkeypatch.setattr(kernels.build, "compiled", lambda: library)
    x, w, b = _case((1, 40), 24, seed=7)
    with torch.no_grad():
        with torch_float32():
            assert torch.equal(f32_linear(x, w, b), F.linear(x, w, b))
        f32_linear(x, w, b)
    assert library.calls == ["f32_linear"]


def _layers(seed: int, k: int = 64, ns=(576, 192, 192)):
    """Weights of q, k and v sizes (out, in), the second without a bias."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, k, generator=g), None if i == 1 else torch.randn(n, generator=g)) for i, n in enumerate(ns)]


@pytest.mark.parametrize("x_shape", [(1, 1, 64), (3, 64)], ids=["decode-vector", "three-rows"])
def test_several_matrices_in_one_call_give_each_matrix_its_own_product(x_shape, monkeypatch):
    x, layers = torch.randn(*x_shape), _layers(10)
    with torch.no_grad():
        one_by_one = [f32_linear(x, w, b) for w, b in layers]
        library, calls = kernels.compiled(), []
        monkeypatch.setattr(kernels.build, "compiled", lambda: calls.append(1) or library)
        together = kernels.f32_linears(x, layers)
    assert len(calls) == 2  # the check that the kernels are there, then the one call for all three
    assert [t.shape for t in together] == [(*x_shape[:-1], w.shape[0]) for w, _ in layers]
    assert all(torch.equal(a, b) for a, b in zip(together, one_by_one))  # each output: the same dot product


def test_several_matrices_go_to_torch_together_when_one_does_not_fit():
    x, layers = torch.randn(1, 64), _layers(11)
    layers[2] = (layers[2][0].T.contiguous().T, None)  # a transposed view: not contiguous
    with torch.no_grad():
        outs = kernels.f32_linears(x, layers)
    assert all(torch.equal(o, F.linear(x, w, b)) for o, (w, b) in zip(outs, layers))


def _int8_layers(seed: int):
    """:func:`_layers` quantized to int8: ``(codes, scale per row, bias)`` each."""
    from cyclelab.lab.quantize import int8_linear_of

    return [(m.q, m.scale, m.bias) for m in (int8_linear_of(w, b) for w, b in _layers(seed))]


def test_int8_matrices_in_one_call_give_each_matrix_its_own_product():
    x, packed = torch.randn(1, 1, 64), _int8_layers(12)
    together = kernels.int8_linears(x, packed)
    assert all(torch.equal(t, kernels.int8_linear(x, q, s, b)) for t, (q, s, b) in zip(together, packed))


def test_threads_do_not_change_several_matrices_or_int8():
    x, layers, packed = torch.randn(2, 64), _layers(13), _int8_layers(13)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(kernels.f32_linears(x, layers) + kernels.int8_linears(x, packed))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run in outs[1:] for a, b in zip(run, outs[0]))


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_the_engine_with_its_kernels_matches_the_engine_on_torchs(name, request):
    engine: Engine = request.getfixturevalue(f"{name}_engine")
    ids = engine.encode("ROMEO:\nBut soft, what light")
    fast = engine.generate(ids, 12, stop_at_eos=False)
    with torch_float32():
        slow = engine.generate(ids, 12, stop_at_eos=False)
    assert fast.token_ids == slow.token_ids
    # a probability is a softmax of logits that are within float_bounds.logit_bound B of each other: it moves by a
    # factor of at most exp(2 B) (its own logit and the normalizer's each by B)
    slack = math.expm1(2 * logit_bound(engine.loaded, ids).max().item())
    assert all(abs(a.raw_prob - b.raw_prob) <= slack * b.raw_prob for a, b in zip(fast.records, slow.records))


@pytest.mark.parametrize(
    "name",
    ["f32_linear", "f32_conv1d", "f32_rms_norm", "f32_rope", "int8_linear", "f32_scores", "f32_softmax", "f32_mix"],
)
def test_show_kernel_shows_one_whole_kernel_with_its_comment(name):
    code = show_kernel(name).code
    assert code.startswith("/*") and f"void {name}(" in code and code in kernels.SOURCE
    assert code.count("{") == code.count("}") and code.rstrip().endswith("}")
    assert code.count("void ") == 1  # one kernel, not the next one too
    assert "<span" in show_kernel(name)._repr_html_()  # highlighted


def test_show_kernel_of_an_unknown_kernel_names_the_known_ones():
    with pytest.raises(
        ValueError, match="no kernel 'f16_linear'; the kernels are f32_linear, f32_conv1d, .*int8_linear"
    ):
        show_kernel("f16_linear")


@pytest.mark.parametrize(
    "shape", [(1, 1, 576), (1, 1, 37), (2, 1, 64), (1, 3, 16)], ids=["decode", "ragged", "batch", "rows"]
)
def test_rms_norm_kernel_is_the_formula_within_rounding(shape, own_kernels):
    """The own kernel (or, with it off, the engine's torch formula) against float64. Bound: the mean of d squares
    rounds by at most d * eps32 relative (positive terms), the square root halves that, and the rsqrt and the two
    products add a few eps32 each: (d + 4) * eps32 relative to each output."""
    from cyclelab.core.norms import rms_norm

    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    exact = w.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    with torch.no_grad():
        got = kernels.fused_rms_norm(x, w, 1e-5) if own_kernels else rms_norm(x, w, 1e-5)
        assert (kernels.fused_rms_norm(x, w, 1e-5) is None) is not own_kernels
    assert_within(got, exact, (shape[-1] + 4) * EPS32 * exact.abs())
    torch_ = torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5)
    assert_within(torch_, exact, (shape[-1] + 4) * EPS32 * exact.abs())


def test_a_weight_moved_or_changed_in_place_is_read_where_it_is_now():
    """The C arrays of weight addresses are kept between calls: a weight replaced by a copy elsewhere, or
    changed in place, must give the product with its values of now."""
    x, w, b = _case((1, 64), 48, seed=11)
    with torch.no_grad():
        f32_linear(x, w, b)  # the C arrays of these addresses are built and kept
        w.mul_(2)  # in place: same address, new values
        exact = x.double() @ w.double().T + b.double()  # the doubled weight, exactly
        assert_within(f32_linear(x, w, b), exact, dot_bound(x, w) + 1e-6)  # k * eps32 * sum|x||w| (float_bounds)
        moved = w.clone()  # another address
        w.zero_()
        assert_within(f32_linear(x, moved, b), exact, dot_bound(x, moved) + 1e-6)
        assert torch.equal(f32_linear(x, w, b), b.expand(1, 48))  # the zeroed original, not a stale copy
        q, scale = kernels.quantize_symmetric(moved, 127)
        before = kernels.int8_linear(x, q, scale.flatten(), None)
        assert torch.equal(kernels.int8_linear(x, q, scale.flatten() * 2, None), 2 * before)  # new scales, new arrays


def test_rope_kernel_gives_torchs_values_to_the_last_bit():
    from cyclelab.core.rope import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(9)
    cos, sin = rope_cos_sin(torch.tensor([37]), 1 / 10000 ** (torch.arange(0, 64, 2) / 64))
    for heads in (9, 3):
        x = torch.randn(1, heads * 64, generator=g).view(1, 1, heads, 64).transpose(1, 2)  # split_heads' view
        with torch.no_grad():
            assert torch.equal(kernels.fused_rope(x, cos, sin), apply_rope(x, cos, sin))


def test_norm_and_rope_of_a_prompt_stay_with_torch(monkeypatch):
    monkeypatch.setattr(kernels.build, "compiled", lambda: pytest.fail("a prompt's rows went to the C kernel"))
    from cyclelab.core.rope import rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(5), torch.rand(8))
    with torch.no_grad():
        assert kernels.fused_rope(torch.randn(1, 2, 5, 16), cos, sin) is None
        assert kernels.fused_rms_norm(torch.randn(1, MANY_ROWS, 16), torch.ones(16), 1e-5) is None


def _attention_case(batch: int, heads: int, kv_heads: int, d: int, length: int, seed: int = 14):
    """A query for one new position and a KV cache of ``length`` positions (of a larger capacity)."""
    from cyclelab.core.attention import KVCache

    g = torch.Generator().manual_seed(seed)
    cache = KVCache(1, length + 5)
    keys, values = cache.append(0, *torch.randn(2, batch, kv_heads, length, d, generator=g))
    return torch.randn(batch, heads, 1, d, generator=g), keys, values


ATTENTION = [(1, 9, 3, 64, 40), (2, 4, 4, 20, 7), (1, 2, 1, 8, 1)]
ATTENTION_IDS = ["smollm2-gqa", "multi-head-ragged-d", "one-position"]


@pytest.mark.parametrize("shape", ATTENTION, ids=ATTENTION_IDS)
def test_attention_kernels_are_the_attend_formulas_in_float64_within_rounding(shape, own_kernels):
    """The own kernels (or, with them off, the engine's torch formulas) against float64, each step from the
    previous step's float32 output. Bounds: scores and mix are dot products (k * eps32 * sum|a||b|, plus one
    eps32 for the scaling); a softmax output p_i rounds by at most (|s_i - max| + t + 4) * eps32 * p_i (the
    subtraction, moved through exp, the sum of t terms, exp and the division)."""
    from cyclelab.core.attention import attention_mix, attention_scores

    q, keys, values = _attention_case(*shape)
    group = shape[1] // shape[2]  # query heads per key head: each key head repeated for its group
    k64, v64 = (t.repeat_interleave(group, dim=1).double() for t in (keys, values))
    with torch.no_grad():
        if own_kernels:
            scores = kernels.fused_scores(q, keys)
            probs = kernels.fused_softmax(scores)
            mixed = kernels.fused_mix(probs, values)
        else:
            assert kernels.fused_scores(q, keys) is None
            scores = attention_scores(q, keys)
            probs = torch.softmax(scores, -1)
            mixed = attention_mix(probs, values)
    d, t = shape[3], shape[4]
    exact_scores = q.double() @ k64.transpose(-1, -2) / d**0.5
    assert_within(scores, exact_scores, (d + 1) * EPS32 * (q.double().abs() @ k64.abs().transpose(-1, -2)) / d**0.5)
    s64 = scores.double()
    exact_probs = torch.softmax(s64, -1)
    spread = (s64 - s64.amax(-1, keepdim=True)).abs()
    assert_within(probs, exact_probs, (spread + t + 4) * EPS32 * exact_probs + 1e-30)
    assert_within(mixed, probs.double() @ v64, t * EPS32 * (probs.double().abs() @ v64.abs()))


def test_attention_kernels_agree_with_the_engines_torch_attention():
    """Kernel against torch formula: each within its float64 bound (the test above), so within twice it."""
    from cyclelab.core.attention import attention_mix, attention_scores

    q, keys, values = _attention_case(1, 9, 3, 64, 40, seed=15)
    k64, v64 = (t.repeat_interleave(3, dim=1).double() for t in (keys, values))
    with torch.no_grad():
        scores = kernels.fused_scores(q, keys)
        products = q.double().abs() @ k64.abs().transpose(-1, -2)
        assert_within(scores, attention_scores(q, keys), 2 * 65 * EPS32 * products / 8)  # (d + 1) eps, d = 64
        probs = torch.softmax(scores, -1)
        spread = (scores.double() - scores.double().amax(-1, keepdim=True)).abs()
        assert_within(kernels.fused_softmax(scores), probs, 2 * (spread + 44) * EPS32 * probs.double() + 1e-30)
        assert_within(
            kernels.fused_mix(probs, values),
            attention_mix(probs, values),
            2 * 40 * EPS32 * (probs.double().abs() @ v64.abs()),
        )


def test_attention_of_a_prompt_or_with_gradients_stays_with_torch(monkeypatch):
    q, keys, values = _attention_case(1, 4, 2, 16, 6, seed=16)
    monkeypatch.setattr(kernels.build, "compiled", lambda: pytest.fail("the C kernel was called"))
    prompt = torch.randn(1, 4, 3, 16)  # three query positions: the causal mask is torch's
    probs = torch.softmax(torch.randn(1, 4, 1, 6), -1)
    assert kernels.fused_scores(prompt, keys) is None and kernels.fused_softmax(torch.randn(1, 4, 3, 6)) is None
    assert kernels.fused_scores(q.double(), keys.double()) is None
    assert kernels.fused_scores(q, keys.transpose(-1, -2).contiguous().transpose(-1, -2)) is None  # rows not packed
    assert kernels.fused_scores(q.requires_grad_(True), keys) is None
    assert kernels.fused_mix(probs, values[..., :5, :]) is None  # 6 weights, 5 values
    assert kernels.fused_scores(torch.randn(1, 3, 1, 16), keys) is None  # 3 heads cannot share 2 key heads


def test_one_position_splits_and_merges_heads_as_the_general_case():
    from cyclelab.core.attention import merge_heads, split_heads

    x = torch.randn(2, 1, 12)
    general = x.view(2, 1, 3, 4).transpose(1, 2)
    assert torch.equal(split_heads(x, 3), general) and split_heads(x, 3).shape == (2, 3, 1, 4)
    assert torch.equal(merge_heads(general.contiguous()), general.transpose(1, 2).reshape(2, 1, 12))
