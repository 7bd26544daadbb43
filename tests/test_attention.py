"""READ/EXECUTE helpers (cyclelab.lab.attention_heads) against independent references: torch's fused attention,
the engine's captured tensors, transformers' output_attentions and repeat_kv, hand-computed cases;
and the chapter-03 checker."""

import math

import pytest
import torch
import torch.nn.functional as F

from cyclelab.checks import check_causal_attention
from cyclelab.core.engine import Engine
from cyclelab.lab.attention_heads import (
    KVCache,
    attention_entropy,
    attention_maps,
    attention_mix,
    attention_scores,
    entropy_vs_scale,
    find_heads,
    first_token_score,
    kv_bytes_per_token,
    kv_cache_growth,
    kv_head_of,
    previous_token_score,
    repeat_kv,
    scaled_dot_product_attention,
    split_heads,
)

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


# --- attention step by step ------------------------------------------------------------------------


def test_a_two_token_case_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    v = torch.tensor([[10.0], [20.0]])
    out, probs = scaled_dot_product_attention(q, k, v)
    # row 0 reads only itself; row 1: scores (2, 4) / sqrt(2) -> softmax
    p1 = 1 / (1 + math.exp((4 - 2) / math.sqrt(2)))
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0], [p1, 1 - p1]]))
    torch.testing.assert_close(out, torch.tensor([[10.0], [10 * p1 + 20 * (1 - p1)]]))


@pytest.mark.parametrize("shape", [(1, 1, 5, 8), (2, 6, 9, 32), (3, 1, 16)])
def test_matches_torch_fused_attention(shape):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    out, probs = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1]))
    out, _ = scaled_dot_product_attention(q, k, v, causal=False, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_queries_after_a_cache_see_every_earlier_key():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 2, 3, 8, generator=gen),
        torch.randn(1, 2, 7, 8, generator=gen),
        torch.randn(1, 2, 7, 8, generator=gen),
    )
    allowed = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)
    out, _ = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "q,k,v,message",
    [
        (torch.zeros(1, 4, 8), torch.zeros(1, 4, 6), torch.zeros(1, 4, 6), "same head_dim"),
        (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.zeros(1, 5, 8), "same number of positions"),
        (torch.zeros(1, 0, 8), torch.zeros(1, 0, 8), torch.zeros(1, 0, 8), "empty"),
        (torch.zeros(8), torch.zeros(8), torch.zeros(8), r"\(\.\.\., positions, head_dim\)"),
        (torch.zeros(1, 9, 4, 8), torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), "repeat_kv"),
    ],
)
def test_bad_shapes_get_clear_errors(q, k, v, message):
    with pytest.raises(ValueError, match=message):
        scaled_dot_product_attention(q, k, v)


def captured(engine, ids, layer):
    events = [
        e for e in engine.run(ids, max_new_tokens=1, capture={"norm_attn", "qkv", "softmax", "mix"}) if e.layer == layer
    ]
    return {e.op: e.tensors for e in events}


def test_hand_built_attention_equals_the_engine_and_transformers_on_tiny(tiny):
    engine, layer = Engine(tiny), 2
    ids = engine.encode(PROMPT)
    got = captured(engine, ids, layer)
    attn = tiny.model.transformer.h[layer].attn
    h = got["norm_attn"]["out"]
    qkv = h @ attn.c_attn.weight + attn.c_attn.bias  # the READ: one matrix product with the layer's weights
    q, k, v = (split_heads(part, 6) for part in qkv.split(192, dim=-1))
    torch.testing.assert_close(q, got["qkv"]["q"])
    out, probs = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(probs, got["softmax"]["probs"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, got["mix"]["out"], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids]), output_attentions=True).attentions[layer]
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(attention_maps(engine, ids))[layer], ref[0], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_transformers_on_smollm2(smollm2):
    engine, layer = Engine(smollm2), 5
    ids = engine.encode("The quick brown fox jumps over the lazy dog.")
    events = [e for e in engine.run(ids, max_new_tokens=1, capture={"rope", "softmax"}) if e.layer == layer]
    rope = next(e for e in events if e.op == "rope").tensors
    assert rope["q"].shape[1] == 9 and rope["k"].shape[1] == 3
    k, v = repeat_kv(rope["k"], 3), repeat_kv(rope["k"], 3)
    _, probs = scaled_dot_product_attention(rope["q"], k, v)
    with torch.no_grad():
        ref = smollm2.model(torch.tensor([ids]), output_attentions=True).attentions[layer]
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, next(e for e in events if e.op == "softmax").tensors["probs"])


def test_kv_head_of_agrees_with_repeat_kv_and_transformers():
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    x = torch.randn(1, 3, 4, 8)
    ours = repeat_kv(x, 3)
    torch.testing.assert_close(ours, hf_repeat_kv(x, 3))
    for head in range(9):
        torch.testing.assert_close(ours[:, head], x[:, kv_head_of(head, 9, 3)])
    assert [kv_head_of(h, 9, 3) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="evenly"):
        kv_head_of(0, 9, 4)
    with pytest.raises(ValueError, match="0..8"):
        kv_head_of(9, 9, 3)


# --- softmax temperature ------------------------------------------------------------------------------


def test_entropy_by_hand():
    torch.testing.assert_close(
        attention_entropy(torch.full((2, 4), 0.25)), torch.full((2,), math.log(4), dtype=torch.float64)
    )
    torch.testing.assert_close(attention_entropy(torch.tensor([1.0, 0.0, 0.0])), torch.tensor(0.0, dtype=torch.float64))
    with pytest.raises(ValueError):
        attention_entropy(torch.zeros(3, 0))


def test_entropy_falls_as_the_scale_grows():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(20, 64, generator=gen), torch.randn(20, 64, generator=gen)
    values = entropy_vs_scale(q, k, [0.0, 0.01, 1 / 8, 1.0, 10.0], causal=False)
    assert values[0] == pytest.approx(math.log(20))
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] < 0.05
    causal = entropy_vs_scale(q, k, [0.0], causal=True)[0]
    assert causal == pytest.approx(sum(math.log(n) for n in range(1, 21)) / 20)


# --- the KV cache ---------------------------------------------------------------------------------------


def test_kv_bytes_per_token_by_hand():
    assert kv_bytes_per_token(32, 32, 128, 2) == 524_288  # Llama-2-7B in fp16: 0.5 MiB per token
    assert kv_bytes_per_token(32, 8, 128, 2) == 131_072  # Llama-3-8B (GQA): 128 KiB per token
    assert kv_bytes_per_token(30, 3, 64, 4) == 46_080  # smollm2 in fp32


@pytest.mark.parametrize("args", [(0, 3, 64, 4), (30, 3.0, 64, 4), (30, 3, 64, 0), (True, 3, 64, 2)])
def test_kv_bytes_rejects_bad_input(args):
    with pytest.raises(ValueError):
        kv_bytes_per_token(*args)


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_kv_bytes_per_token_equals_the_measured_cache(name, tiny, smollm2):
    loaded = {"tiny": tiny, "smollm2": smollm2}[name]
    engine = Engine(loaded)
    rows = kv_cache_growth(engine, "To be, or not to be", max_new_tokens=4)
    arch = engine.arch
    head_dim = getattr(arch, "head_dim", None) or loaded.model.config.n_embd // arch.n_heads
    per_token = kv_bytes_per_token(arch.n_layers, arch.n_kv_heads, head_dim, 4)
    n_prompt = len(engine.encode("To be, or not to be"))
    assert [r["positions"] for r in rows] == [n_prompt + c for c in range(4)]
    assert [r["fed"] for r in rows] == [n_prompt, 1, 1, 1]
    assert all(r["bytes"] == r["positions"] * per_token for r in rows)
    assert engine.cache.nbytes() == len(engine.cache) * per_token


def test_cache_stores_the_keys_the_model_computed(tiny):
    engine = Engine(tiny)
    ids = engine.encode(PROMPT)
    kv_cache_growth(engine, ids, max_new_tokens=1)
    with torch.no_grad():
        past = tiny.model(torch.tensor([ids]), use_cache=True).past_key_values
    keys = past.layers[1].keys if hasattr(past, "layers") else past[1][0]
    n = len(ids)
    torch.testing.assert_close(engine.cache.keys[1][..., :n, :], keys, atol=1e-5, rtol=1e-5)


# --- head scores -----------------------------------------------------------------------------------------


def test_head_scores_by_hand():
    shift = torch.zeros(5, 5)
    shift[0, 0] = 1
    shift[torch.arange(1, 5), torch.arange(0, 4)] = 1  # every row reads the previous token
    first = torch.zeros(5, 5)
    first[:, 0] = 1
    uniform = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]
    assert float(previous_token_score(shift)) == 1.0 and float(first_token_score(shift)) == 0.25
    assert float(first_token_score(first)) == 1.0 and float(previous_token_score(first)) == 0.25
    assert float(first_token_score(uniform)) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    both = torch.stack([shift, first])
    torch.testing.assert_close(previous_token_score(both), torch.tensor([1.0, 0.25]))


@pytest.mark.parametrize(
    "probs,message", [(torch.zeros(3, 4), "T, T"), (torch.ones(1, 1), "at least 2"), (torch.zeros(3), "T, T")]
)
def test_head_scores_reject_bad_shapes(probs, message):
    with pytest.raises(ValueError, match=message):
        previous_token_score(probs)
    with pytest.raises(ValueError, match=message):
        first_token_score(probs)


def test_find_heads_ranks_every_head_by_the_reference_attention(tiny):
    engine = Engine(tiny)
    ids = engine.encode(PROMPT)
    ranked = find_heads(engine, ids, previous_token_score)
    rounded = [round(s, 4) for *_, s in ranked]
    assert len(ranked) == 4 * 6 and rounded == sorted(rounded, reverse=True)
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids]), output_attentions=True).attentions
    layer, head, score = ranked[0]
    assert score == pytest.approx(float(previous_token_score(ref[layer][0, head])), abs=1e-5)
    best = max(
        ((l, h) for l in range(4) for h in range(6)), key=lambda lh: float(previous_token_score(ref[lh[0]][0, lh[1]]))
    )
    assert (layer, head) == best
    assert find_heads(engine, ids, first_token_score, top=3) == find_heads(engine, ids, first_token_score)[:3]
    with pytest.raises(ValueError, match="one score per head"):
        find_heads(engine, ids, lambda p: p.mean())


def test_find_heads_breaks_ties_by_layer_and_head_whatever_the_noise(tiny):
    engine = Engine(tiny)
    ids = engine.encode(PROMPT)
    heads = 6
    for sign in (1, -1):  # noise below the 4th decimal, in either direction, must not reorder
        noise = sign * 1e-7 * torch.arange(heads, dtype=torch.float64)
        ranked = find_heads(engine, ids, lambda probs: torch.full((heads,), 0.5, dtype=torch.float64) + noise)
        assert [(l, h) for l, h, _ in ranked] == [(l, h) for l in range(4) for h in range(heads)]


def test_find_heads_ties_at_the_decimals_asked_for(tiny):
    engine = Engine(tiny)
    scores = torch.tensor([0.996, 0.999, 0.2, 0.998, 0.1, 0.0])  # three heads print as 1.00
    ranked = find_heads(engine, engine.encode(PROMPT), lambda probs: scores, top=3, decimals=2)
    assert [(l, h) for l, h, _ in ranked] == [(0, 0), (0, 1), (0, 3)]
    ranked = find_heads(engine, engine.encode(PROMPT), lambda probs: scores, top=3)
    assert [(l, h) for l, h, _ in ranked] == [(0, 1), (1, 1), (2, 1)]  # 4 decimals: 0.999 first, every layer alike


def test_smollm2_has_a_first_token_head(smollm2):
    layer, head, score = find_heads(
        Engine(smollm2), "The quick brown fox jumps over the lazy dog.", first_token_score, top=1
    )[0]
    assert score > 0.8


def test_a_full_cache_is_a_clear_error():
    cache = KVCache(1, 2)
    cache.append(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="full"):
        cache.append(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


# --- the checker -------------------------------------------------------------------------------------------


def test_causal_attention_checker_accepts_correct_answers():
    assert check_causal_attention(lambda q, k, v: scaled_dot_product_attention(q, k, v)[0])
    assert check_causal_attention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _attention(q, k, v, scale=None, mask="causal", dim=-1):
    d, t = q.shape[-1], q.shape[-2]
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(d) if scale is None else scale)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    if mask == "causal":
        scores = scores.masked_fill(future, float("-inf"))
    elif mask == "strict":
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(0), float("-inf"))
    return torch.softmax(scores, dim=dim) @ v


@pytest.mark.parametrize(
    "wrong,hint",
    [
        (lambda q, k, v: _attention(q, k, v, mask=None), "row 0 attends to future tokens"),
        (lambda q, k, v: _attention(q, k, v, scale=1.0), "not divided by sqrt(d)"),
        (lambda q, k, v: _attention(q, k, v, dim=-2), "softmax over the wrong axis"),
        (lambda q, k, v: _attention(q, k, v, scale=1 / q.shape[-1]), "divided by d instead"),
        (lambda q, k, v: _attention(q, k, v, mask="strict"), "attend to itself"),
        (
            lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).tril() @ v,
            "BEFORE the softmax",
        ),
        (lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1), "attention weights"),
        (lambda q, k, v: (_attention(q, k, v), None), "not a tuple"),
        (lambda q, k, v: v * 0, "row 0 of the output should equal"),
        (lambda q, k, v: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_causal_attention_checker_names_the_symptom(wrong, hint):
    result = check_causal_attention(wrong)
    assert not result and hint in result.message, result.message


@pytest.mark.parametrize("tq, tk", [(5, 5), (1, 7)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (9, 3)])
def test_grouped_scores_and_mix_agree_with_torch_sdpa(heads, kv_heads, tq, tk):
    """The engine's attention without copying shared keys equals torch's own grouped-query SDPA."""
    gen = torch.Generator().manual_seed(heads * 10 + tq)
    q = torch.randn(2, heads, tq, 8, generator=gen)
    k, v = (torch.randn(2, kv_heads, tk, 8, generator=gen) for _ in range(2))
    mine = attention_mix(torch.softmax(attention_scores(q, k), -1), v)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=tq > 1, enable_gqa=True)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
