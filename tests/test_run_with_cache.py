"""run_with_cache and the op registry against transformers' own activations and TransformerLens's names."""

import pytest
import torch

from cyclelab.core.ops import REGISTRY, alias_table, hook_names, stage_of

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


def hf(loaded, ids):
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_run_with_cache_equals_transformers_activations(which, tiny, smollm2, tiny_engine, smollm2_engine):
    loaded, engine = (tiny, tiny_engine) if which == "tiny" else (smollm2, smollm2_engine)
    ids = engine.encode(PROMPT)
    logits, cache = engine.run_with_cache(ids)
    ref = hf(loaded, ids)
    n = engine.arch.n_layers
    torch.testing.assert_close(logits[0], ref.logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"][0], ref.hidden_states[0][0], atol=1e-5, rtol=0)
    for layer in range(n - 1):  # transformers' last hidden state has the final norm applied
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_post"][0], ref.hidden_states[layer + 1][0], atol=1e-4, rtol=1e-4
        )
    for layer in range(n):
        torch.testing.assert_close(
            cache[f"blocks.{layer}.attn.hook_pattern"][0], ref.attentions[layer][0], atol=1e-5, rtol=0
        )
    final = cache[f"blocks.{n - 1}.hook_resid_post"]
    torch.testing.assert_close(cache["ln_final.hook_normalized"][0], ref.hidden_states[n][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.read_out(final)[0], ref.logits[0], atol=1e-4, rtol=0)


def test_run_with_cache_keeps_only_what_is_asked(tiny_engine):
    names = ["blocks.1.attn.hook_pattern", "blocks.3.hook_resid_post"]
    _, cache = tiny_engine.run_with_cache(PROMPT, names=names)
    assert sorted(cache) == sorted(names)
    _, cache = tiny_engine.run_with_cache(PROMPT, names=lambda name: name.endswith("hook_z"))
    assert sorted(cache) == [f"blocks.{i}.attn.hook_z" for i in range(4)]
    assert cache["blocks.0.attn.hook_z"].shape[:2] == (1, 6)  # (batch, heads, positions, head_dim)


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["blocks.9.attn.hook_pattern"], ValueError, "unknown activation name"),
        (["blocks.0.attn.hook_rot_q"], ValueError, "unknown activation name"),  # GPT-2 has no RoPE
        ("blocks.0.attn.hook_pattern", TypeError, "collection of activation names"),
        (3, TypeError, "collection of activation names"),
    ],
)
def test_run_with_cache_names_a_bad_request(tiny_engine, names, error, match):
    with pytest.raises(error, match=match):
        tiny_engine.run_with_cache(PROMPT, names=names)


def test_llama_names_include_rope_and_the_gated_mlp(smollm2_engine):
    _, cache = smollm2_engine.run_with_cache(
        "The capital of France is",
        names=[
            "blocks.2.attn.hook_rot_q",
            "blocks.2.mlp.hook_pre",
            "blocks.2.mlp.hook_pre_linear",
            "hook_embed",
            "blocks.0.hook_resid_pre",
        ],
    )
    torch.testing.assert_close(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])  # no positions added
    mlp = smollm2_engine.loaded.model.model.layers[2].mlp
    x = torch.nn.functional.silu(cache["blocks.2.mlp.hook_pre"]) * cache["blocks.2.mlp.hook_pre_linear"]
    assert x.shape[-1] == mlp.down_proj.in_features


@pytest.mark.parametrize("family, engine_fixture", [("gpt2", "tiny_engine"), ("llama", "smollm2_engine")])
def test_every_event_is_in_the_registry_with_its_stage_and_tensors(family, engine_fixture, request):
    engine = request.getfixturevalue(engine_fixture)
    seen = set()
    for event in engine.run("To be", max_new_tokens=1, capture="all"):
        op = REGISTRY[event.op]
        assert event.stage is op.stage
        assert set(event.tensors) <= set(op.tensors_for(family)), (event.op, set(event.tensors))
        seen.add(event.op)
    assert seen == {name for name, op in REGISTRY.items() if op.tensors_for(family) or name == "append"}


def test_the_alias_table_has_transformerlens_names_and_the_false_friends():
    gpt2, llama = hook_names("gpt2"), hook_names("llama")
    assert gpt2["blocks.{L}.attn.hook_pattern"] == ("softmax", "probs")
    assert gpt2["blocks.{L}.attn.hook_z"] == ("mix", "out")
    assert gpt2["blocks.{L}.hook_resid_mid"] == ("residual_attn", "out")
    assert gpt2["blocks.{L}.hook_resid_post"] == ("residual_mlp", "out")
    assert gpt2["blocks.{L}.mlp.hook_pre"] == ("mlp_in", "out")  # false friend: the pre-activation
    assert gpt2["blocks.0.hook_resid_pre"] == ("positions", "out")  # false friend: embedding + positions
    assert llama["blocks.0.hook_resid_pre"] == ("embed", "out")
    assert "blocks.{L}.attn.hook_rot_q" in llama and "blocks.{L}.attn.hook_rot_q" not in gpt2
    assert "hook_pattern" in alias_table() and stage_of("qkv").value == "READ"
    with pytest.raises(ValueError, match="unknown op"):
        stage_of("attention")
    with pytest.raises(ValueError, match="unknown model family"):
        hook_names("bert")
