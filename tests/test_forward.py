"""Chapter 04 helpers against independent references: torch and transformers modules, hand arithmetic."""

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F

from cyclelab.core.engine import drain
from cyclelab.lab.forward_by_hand import (
    cost_table,
    format_cost_table,
    gelu,
    gelu_mlp,
    layer_norm,
    logit_lens,
    matmul_parameters,
    per_token_costs,
    plot_cost_breakdown,
    plot_logit_lens,
    plot_residual_norms,
    residual_stream,
    rms_norm,
    self_attention,
    silu,
    stack_gradients,
    sublayer,
    swiglu_mlp,
)

matplotlib.use("Agg")
PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


def test_layer_norm_by_hand():
    out = layer_norm(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), torch.zeros(3), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([-math.sqrt(1.5), 0.0, math.sqrt(1.5)]))


def test_layer_norm_matches_torch_module():
    gen = torch.Generator().manual_seed(0)
    ln = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(16, generator=gen))
        ln.bias.copy_(torch.randn(16, generator=gen))
    x = torch.randn(2, 5, 16, generator=gen) * 3 + 1
    torch.testing.assert_close(layer_norm(x, ln.weight, ln.bias, ln.eps), ln(x))


def test_layer_norm_matches_a_gpt2_norm(tiny):
    ln = tiny.model.transformer.h[2].ln_2
    x = torch.randn(1, 4, 192)
    torch.testing.assert_close(layer_norm(x, ln.weight, ln.bias, ln.eps), ln(x))


def test_rms_norm_by_hand():
    out = rms_norm(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]), eps=0.0)
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(out, torch.tensor([3 / rms, 2 * 4 / rms]))


def test_rms_norm_matches_llama_module():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(3, 24) * 5
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


def test_rms_norm_does_not_centre():
    x = torch.tensor([[10.0, 11.0, 12.0]])
    assert rms_norm(x, torch.ones(3)).mean() > 0.9  # LayerNorm would give mean 0
    assert abs(float(layer_norm(x, torch.ones(3), torch.zeros(3)).mean())) < 1e-6


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(gelu(x, approximate), F.gelu(x, approximate=approximate))


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        gelu(torch.zeros(2), "sigmoid")


def test_silu_matches_torch():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(silu(x), F.silu(x))


def test_gelu_mlp_matches_gpt2_module(tiny):
    mlp = tiny.model.transformer.h[1].mlp
    h = torch.randn(2, 3, 192)
    with torch.no_grad():
        torch.testing.assert_close(gelu_mlp(h, mlp), mlp(h), atol=1e-5, rtol=1e-5)


def test_swiglu_mlp_matches_llama_module():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(
        LlamaConfig(
            hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu"
        )
    )
    h = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(swiglu_mlp(h, mlp), mlp(h), atol=1e-6, rtol=1e-5)


def test_blocks_from_the_pieces_reproduce_transformers(tiny):
    """The chapter's exercise, solved with the pieces: the whole forward pass equals transformers'."""
    body = tiny.model.transformer
    ids = torch.tensor([tiny.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        x = body.wte.weight[ids] + body.wpe.weight[torch.arange(ids.shape[1])]
        for layer in body.h:
            x = x + self_attention(layer_norm(x, layer.ln_1.weight, layer.ln_1.bias, layer.ln_1.eps), layer.attn)
            x = x + gelu_mlp(layer_norm(x, layer.ln_2.weight, layer.ln_2.bias, layer.ln_2.eps), layer.mlp)
        logits = layer_norm(x, body.ln_f.weight, body.ln_f.bias, body.ln_f.eps) @ body.wte.weight.T
        torch.testing.assert_close(logits, tiny.model(ids).logits, atol=1e-4, rtol=0)


def test_residual_stream_matches_transformers_hidden_states(tiny, tiny_engine):
    ids = tiny_engine.encode(PROMPT)
    stream = residual_stream(tiny_engine, ids)
    assert stream.shape == (5, len(ids), 192)
    with torch.no_grad():
        out = tiny.model(torch.tensor([ids]), output_hidden_states=True)
    for i in range(4):  # transformers' last hidden state has the final norm applied; the stream does not
        torch.testing.assert_close(stream[i], out.hidden_states[i][0], atol=1e-4, rtol=0)
    logits = drain(tiny_engine.arch.unembed(stream[-1:]))[0]
    torch.testing.assert_close(logits, out.logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_logit_lens_last_layer_is_the_real_output(name, request):
    loaded = request.getfixturevalue(name)
    engine = request.getfixturevalue(f"{name}_engine")
    ids = engine.encode("The capital of France is" if name == "smollm2" else PROMPT)
    rows = logit_lens(engine, ids, k=4)
    n_layers = engine.arch.n_layers
    assert len(rows) == (n_layers + 1) * len(ids)
    assert [r.layer for r in rows[:: len(ids)]] == list(range(-1, n_layers))
    with torch.no_grad():
        probs = torch.softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    want = torch.topk(probs, 4)
    for row in [r for r in rows if r.layer == n_layers - 1]:
        assert row.token_ids == want.indices[row.position].tolist()
        torch.testing.assert_close(torch.tensor(row.probs), want.values[row.position], atol=1e-4, rtol=0)
        assert row.tokens == [engine.token_text(i) for i in row.token_ids]


def test_logit_lens_without_embedding_and_bad_k(tiny_engine):
    rows = logit_lens(tiny_engine, "ROMEO:", k=1, embedding=False)
    assert rows[0].layer == 0 and len(rows[0].tokens) == 1
    with pytest.raises(ValueError, match="k must be"):
        logit_lens(tiny_engine, "ROMEO:", k=0)


def test_matmul_parameters_by_hand(tiny):
    d, ff, vocab, layers = 192, 4 * 192, 4096, 4
    per_layer = d * 3 * d + d * d + d * ff + ff * d  # qkv, attention out, mlp in, mlp out
    assert matmul_parameters(tiny.model) == layers * per_layer + vocab * d == 2_555_904


def test_decode_flops_are_twice_the_matmul_parameters(tiny, tiny_engine):
    trace = tiny_engine.generate(PROMPT, max_new_tokens=6, keep_events=True)
    costs = per_token_costs(trace)
    ratio = costs["decode"]["flops"] / (2 * matmul_parameters(tiny.model))
    assert 1.0 < ratio < 1.05, ratio  # attention over ~20 positions and the elementwise ops add a little
    assert costs["prefill"]["tokens"] == len(trace.prompt_ids) and costs["decode"]["tokens"] == 5
    assert costs["decode"]["flops_per_byte"] < 1 < costs["prefill"]["flops_per_byte"]


def test_cost_table_sums_match_the_records(tiny_engine):
    trace = tiny_engine.generate("ROMEO:", max_new_tokens=3, keep_events=True)
    for cycle, record in enumerate(trace.records):
        rows = cost_table(trace, slice(cycle, cycle + 1))  # forward events only: the record adds the choice
        assert sum(r.flops for r in rows) + 5 * 4096 == record.flops
        assert sum(r.bytes for r in rows) == record.bytes
    by_layer = cost_table(trace)
    by_op = cost_table(trace, by_layer=False)
    assert {r.op for r in by_op} == {r.op for r in by_layer}
    assert sum(r.flops for r in by_op) == sum(r.flops for r in by_layer)
    qkv = [r for r in by_layer if r.op == "qkv"]
    assert [r.layer for r in qkv] == [0, 1, 2, 3] and all(r.calls == 3 for r in qkv)
    text = format_cost_table(by_op, per=3, times=False)
    assert text.splitlines()[0].startswith("op") and "qkv" in text and " ms" not in text


def test_cost_table_needs_events(tiny_engine):
    trace = tiny_engine.generate("ROMEO:", max_new_tokens=2)
    with pytest.raises(ValueError, match="keep_events"):
        cost_table(trace)
    trace = tiny_engine.generate("ROMEO:", max_new_tokens=2, keep_events=True)
    with pytest.raises(ValueError, match="no cycles"):
        cost_table(trace, slice(5, None))


def test_figures_draw(tiny_engine):
    import matplotlib.pyplot as plt

    ids = tiny_engine.encode("ROMEO: O")
    rows = logit_lens(tiny_engine, ids)
    ax = plot_logit_lens(rows, [tiny_engine.token_text(i) for i in ids], title="lens")
    assert len(ax.texts) == len(rows)
    plot_residual_norms({"tiny": residual_stream(tiny_engine, ids).norm(dim=-1)})
    trace = tiny_engine.generate("ROMEO:", max_new_tokens=3, keep_events=True)
    axes = plot_cost_breakdown(trace)
    assert len(axes) == 2
    plt.close("all")


# --- pre-LN, post-LN, no residual: the orders of a sublayer and what they do to gradients ---------------


def test_sublayer_orders_by_hand():
    x = torch.tensor([1.0, 2.0])

    def f(h):
        return 10 * h

    def norm(h):
        return h - 1

    assert torch.equal(sublayer(x, f, norm, "pre"), torch.tensor([1.0, 12.0]))  # x + f(norm(x))
    assert torch.equal(sublayer(x, f, norm, "post"), torch.tensor([10.0, 21.0]))  # norm(x + f(x))
    assert torch.equal(sublayer(x, f, norm), sublayer(x, f, norm, "pre"))  # GPT-2's order is the default
    assert torch.equal(sublayer(x, f, norm, "none"), torch.tensor([0.0, 10.0]))  # f(norm(x))


def test_pre_ln_sublayers_are_a_gpt2_block(tiny):
    layer = tiny.model.transformer.h[0]
    x = torch.randn(1, 5, tiny.model.config.n_embd)
    with torch.no_grad():
        mid = sublayer(x, lambda h: self_attention(h, layer.attn), layer.ln_1)
        out = sublayer(mid, layer.mlp, layer.ln_2)
        want = tiny.model.transformer(
            inputs_embeds=x - tiny.model.transformer.wpe.weight[:5], output_hidden_states=True
        ).hidden_states[1]
    assert torch.allclose(out, want, atol=1e-5)


def _gradients_by_modules(order, depth, width=64, batch=16, seed=0):
    """The same random stack from nn.Linear and nn.LayerNorm modules, written out per order."""
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(width, width, bias=False) for _ in range(depth)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(width, width, generator=gen) / math.sqrt(width))
    x, target = torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)
    norm = torch.nn.LayerNorm(width, elementwise_affine=False)
    for layer in layers:
        if order == "pre":
            x = x + F.gelu(layer(norm(x)))
        elif order == "post":
            x = norm(x + F.gelu(layer(x)))
        else:
            x = F.gelu(layer(norm(x)))
    ((x * target).sum() / batch).backward()
    return [float(layer.weight.grad.norm()) for layer in layers]


@pytest.mark.parametrize("order", ["pre", "post", "none"])
def test_stack_gradients_match_torch_modules(order):
    assert stack_gradients(order, 6) == pytest.approx(_gradients_by_modules(order, 6), rel=1e-4)


def test_one_layer_gets_the_same_gradient_with_or_without_the_residual():
    # x + f(norm(x)) and f(norm(x)) differ by x, which does not depend on the weights
    assert stack_gradients("pre", 1) == pytest.approx(stack_gradients("none", 1), rel=1e-6)


def test_without_the_residual_path_the_first_layer_gradient_drifts_with_depth():
    def drift(order):
        grads = stack_gradients(order, 48)
        return abs(math.log(grads[0] / grads[-1]))

    assert drift("none") > 3 * drift("pre")


@pytest.mark.parametrize(
    "call, message",
    [
        pytest.param(
            lambda: sublayer(torch.ones(2), abs, abs, "middle"),
            r"order must be one of 'pre', 'post', 'none'",
            id="sublayer-unknown-order",
        ),
        pytest.param(lambda: stack_gradients("sideways", 2), r"order must be one of", id="stack-unknown-order"),
        pytest.param(
            lambda: stack_gradients("pre", 0), r"depth must be a positive integer, got 0", id="stack-depth-zero"
        ),
        pytest.param(
            lambda: stack_gradients("pre", 2.5), r"depth must be a positive integer, got 2.5", id="stack-depth-float"
        ),
    ],
)
def test_bad_orders_and_depths_are_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()
