"""Real int8 weights: the kernel against torch's own weight-only int8 op and a float64 product, the
converted model against ``transformers`` running the same int8 model, and the perplexity it costs."""

import pytest
import torch
from float_bounds import assert_within, logit_bound

from cyclelab import Engine, kernels, load
from cyclelab.core.fingerprint import fingerprint
from cyclelab.kernels import MANY_ROWS, Int8Linear, int8_linear, is_int8
from cyclelab.lab.decoding_by_hand import encode_split
from cyclelab.lab.quantize import int8_linear_of, quantize_int8, to_int8
from cyclelab.train.metrics import perplexity_of_model

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "KING HENRY:\nOnce more unto the breach"]


def _case(rows: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)  # columns of very different sizes
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    return x, q, scale.reshape(-1), torch.randn(n, generator=g)


def _exact(x, q, scale, bias):
    """The product in float64, from the dequantized weight: what the kernel approximates."""
    return (x.double() @ (q.double() * scale.double()[:, None]).T + bias.double()).float()


def _bound(x, q, scale, exact):
    """Each input row is held in 16 bits (step max|x| / 32767): an output moves by at most half a step
    times its row's absolute weights summed, plus float32 rounding."""
    step = x.abs().amax(dim=1, keepdim=True) / 32767
    return step / 2 * (q.abs().float() * scale[:, None]).sum(dim=1) + 1e-5 * exact.abs() + 1e-5


@pytest.mark.parametrize(
    "rows,k,n",
    [(1, 576, 1536), (1, 37, 5), (3, 2100, 7), (MANY_ROWS, 64, 9), (20, 40, 3)],
    ids=["decode-vector", "ragged-tail", "rows-past-2048", "many-rows", "prefill"],
)
def test_kernel_is_within_its_activation_rounding_of_the_exact_product(rows, k, n):
    x, q, scale, bias = _case(rows, k, n)
    exact = _exact(x, q, scale, bias)
    assert ((int8_linear(x, q, scale, bias) - exact).abs() <= _bound(x, q, scale, exact)).all()


def test_kernel_agrees_with_torchs_weight_only_int8_op():
    x, q, scale, _ = _case(1, 576, 1536, seed=3)
    torchs = torch._weight_int8pack_mm(x, q, scale)  # torch's own weight-only int8 matmul (float activations)
    assert ((int8_linear(x, q, scale, None) - torchs).abs() <= 2 * _bound(x, q, scale, torchs)).all()


def test_without_a_compiler_torchs_op_gives_the_answer(monkeypatch):
    x, q, scale, bias = _case(2, 96, 33, seed=4)
    monkeypatch.setattr(kernels.build, "compiled", lambda: None)
    torch.testing.assert_close(int8_linear(x, q, scale, bias), torch._weight_int8pack_mm(x, q, scale) + bias)


def test_the_compiled_kernel_is_used_here():
    assert kernels.compiled() is not None, "no C compiler or no AVX2: the int8 kernel falls back to torch's op"


@pytest.fixture(scope="module")
def tiny8():
    return load("tiny", quantize="int8")


def test_to_int8_replaces_every_matrix_in_place_by_hand_quantized_codes(tiny, tiny8):
    layer = tiny8.model.transformer.h[0].attn.c_attn
    w = tiny.model.transformer.h[0].attn.c_attn.weight.detach().t()  # Conv1D (in, out) -> rows are outputs
    scale = w.abs().amax(dim=1) / 127
    assert isinstance(layer, Int8Linear) and layer.q.dtype == torch.int8
    assert torch.equal(layer.q, torch.round(w / scale[:, None]).to(torch.int8))
    torch.testing.assert_close(layer.scale, scale)
    kinds = {type(m).__name__ for m in tiny8.model.modules()}
    assert not kinds & {"Linear", "Conv1D"}, "a float matrix is left"
    float_left = {name.split(".")[-2] for name, _ in tiny8.model.named_parameters()}
    assert float_left == {"wte", "wpe", "ln_1", "ln_2", "ln_f"}  # embeddings and norms stay float32
    assert fingerprint(tiny8)["weights"] != fingerprint(tiny)["weights"]
    assert load("tiny", quantize="int8") is tiny8 and load("tiny") is tiny  # cached apart; the float model untouched
    assert isinstance(tiny.model.transformer.h[0].attn.c_attn, type(tiny.model.transformer.h[0].mlp.c_fc))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_engine_matches_transformers_running_the_same_int8_model(tiny8, prompt, own_kernels):
    """Both run the same int8 layers, possibly on different kernels (the engine's batched q/k/v call and
    transformers' one-by-one calls may be timed apart and choose differently, and torch's own int8 op differs
    by CPU): equal within float32 rounding plus the own kernel's 16-bit input rounding (float_bounds)."""
    engine = Engine(tiny8)
    ids = engine.encode(prompt)
    with torch.no_grad():
        want = tiny8.model(torch.tensor([ids])).logits
        hf = tiny8.model.generate(
            torch.tensor([ids]),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=tiny8.tokenizer.eos_token_id,
        )[0, len(ids) :].tolist()
    assert_within(engine.logits(ids)[0], want[0], logit_bound(tiny8, ids, int8=True))
    assert engine.generate(ids, 20, stop_at_eos=False).token_ids == hf


def test_full_capture_sees_int8_bytes_and_the_same_tokens(tiny8):
    engine = Engine(tiny8)
    plain = engine.generate("ROMEO:", 4, stop_at_eos=False)
    full = engine.generate("ROMEO:", 4, stop_at_eos=False, capture="all", keep_events=True)
    assert full.token_ids == plain.token_ids
    qkv = next(e for e in full.events if e.op == "qkv" and e.cycle == 1)  # one new token: a (1, 192) input
    assert set(qkv.tensors) == {"q", "k", "v"}
    assert qkv.bytes == 192 * 576 + 4 * 576 + 4 * (192 + 576)  # int8 codes, float32 scales, input and output


def test_int8_perplexity_is_within_3_percent_of_float32(tiny, tiny8):
    ids = encode_split(tiny.tokenizer, "valid", limit=4096)
    ratio = perplexity_of_model(tiny8.model, ids, context=128) / perplexity_of_model(tiny.model, ids, context=128)
    assert abs(ratio - 1) < 0.03, ratio


@pytest.mark.slow
def test_smollm2_int8_perplexity_and_greedy_tokens(smollm2):
    quantized = load("smollm2", quantize="int8", cache=False)
    ids = encode_split(smollm2.tokenizer, "valid", limit=1024, cache=False)
    ratio = perplexity_of_model(quantized.model, ids, context=256) / perplexity_of_model(
        smollm2.model, ids, context=256
    )
    assert abs(ratio - 1) < 0.03, ratio
    engine = Engine(quantized)
    prompt = engine.encode("The history of the Roman Empire begins")
    with torch.no_grad():
        hf = quantized.model.generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert engine.generate(prompt, 16, stop_at_eos=False).token_ids == hf


def test_is_int8():
    assert is_int8(int8_linear_of(torch.ones(2, 3), None)) and not is_int8(torch.nn.Linear(3, 2))


def test_to_int8_returns_the_model_it_converted():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    assert to_int8(model) is model and is_int8(model[0])
