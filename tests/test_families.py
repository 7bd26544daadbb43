"""Every decoder family the engine runs, against transformers on a random tiny model of that family.

Each model is built from the installed transformers' own config class (``AutoConfig.for_model``, tiny sizes),
seeded, saved as safetensors with a byte-level tokenizer of 257 tokens, and loaded through ``cyclelab.load`` like
any local folder. The sizes switch on what distinguishes each family: grouped-query attention, a sliding window
shorter than the prompt (Mistral, and Qwen2 on its second layer only), head sizes other than width / heads,
GPT-NeoX's partial rotary and parallel residual, tied embeddings (GPT-2, Gemma).
"""

from __future__ import annotations

import json

import pytest
import torch
from float_bounds import assert_within, logit_bound
from test_engine import MATMUL_OPS, counted_flops

from cyclelab import Engine, load
from cyclelab.core.attention import KVCache
from cyclelab.core.blocks import architecture_for
from cyclelab.core.engine import drain
from cyclelab.core.families import FAMILIES
from cyclelab.core.ops import hook_names
from cyclelab.loading.checksums import ModelFileError

EOS = 256  # the tokenizer's end of text: 256 byte tokens, then this one
SIZES = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,  # larger than the default 0.02: decisive logits, so greedy choices are no near-ties
    eos_token_id=EOS,
    bos_token_id=EOS,
    pad_token_id=None,
)
CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=260, initializer_range=0.3),
    "llama": {},
    "mistral": dict(sliding_window=5, head_dim=24),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),  # layer 1 slides, layer 0 not
    "qwen3": dict(head_dim=16, attention_bias=True),
    "gemma": dict(num_key_value_heads=1, head_dim=16),  # multi-query attention, tied embeddings, GeGLU
    "phi3": {},
    "gpt_neox": dict(num_key_value_heads=None),  # rotary on a quarter of each head, parallel residual
    "olmo2": {},
}
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 111, 32, 98, 101]  # 19 bytes


def byte_tokenizer():
    """A byte-level BPE with no merges: token i is byte i, then the end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"<|endoftext|>": EOS}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def tiny_config(model_type: str):
    from transformers import AutoConfig

    extra = CONFIGS[model_type]
    kwargs = extra if model_type == "gpt2" else {**SIZES, **extra}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "pad_token_id"}
    if model_type == "gpt2":
        kwargs |= dict(eos_token_id=EOS, bos_token_id=EOS)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny(model_type: str, folder, config=None):
    """A seeded random float32 model of ``model_type`` and the byte tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config or tiny_config(model_type), attn_implementation="eager")
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    """(model_type, loaded, engine) for each family, loaded through the engine's ordinary path."""
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    loaded = load(str(folder), cache=False)
    return request.param, loaded, Engine(loaded)


def test_every_family_is_declared_and_tested():
    assert set(CONFIGS) == set(FAMILIES)


def test_the_tokenizer_is_one_token_per_byte():
    tokenizer = byte_tokenizer()
    assert tokenizer("Hello, world! To be")["input_ids"] == PROMPT
    assert tokenizer.decode([*PROMPT, EOS], skip_special_tokens=True) == "Hello, world! To be"


def test_the_tiny_models_switch_on_what_sets_their_family_apart(family):
    """What the module docstring promises of the sizes holds, so the comparisons below exercise each switch."""
    model_type, loaded, engine = family
    arch, model = engine.arch, loaded.model
    windows = {"mistral": (5, 5), "qwen2": (None, 4)}.get(model_type, (None, None))
    assert arch.settings.windows == windows and arch.settings.parallel == (model_type == "gpt_neox")
    if arch.spec.rope:
        rotated = 2 * arch.inv_freq.numel()
        assert rotated == (arch.head_dim // 4 if model_type == "gpt_neox" else arch.head_dim)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (model_type in ("gpt2", "gemma"))
    assert (arch.n_kv_heads < arch.n_heads) == (model_type not in ("gpt2", "gpt_neox"))
    assert next(model.parameters()).dtype == torch.float32


def test_logits_agree_with_transformers(family):
    """Within 1e-4: both sides compute in float32 and sum the same products in other orders (the engine's own
    kernels, fused ops); logits here are at most ~30, so their float32 rounding over a 64- or 96-wide dot product
    and two layers stays far below 1e-4 (observed: ~1e-6)."""
    model_type, loaded, engine = family
    with torch.no_grad():
        ref = loaded.model(torch.tensor([PROMPT])).logits[0]
    assert ref.abs().max() < 100
    assert_within(engine.logits(PROMPT)[0], ref, 1e-4)


def test_greedy_tokens_agree_with_and_without_the_kv_cache_and_with_transformers(family):
    model_type, loaded, engine = family
    n = 64 - len(PROMPT)  # to the end of the context window (or end of text): past every sliding window
    cached = engine.generate(PROMPT, max_new_tokens=n, use_cache=True)
    uncached = engine.generate(PROMPT, max_new_tokens=n, use_cache=False)
    assert cached.token_ids == uncached.token_ids
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = loaded.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    assert cached.token_ids == ref[0, len(PROMPT) :].tolist()
    assert len(set(cached.token_ids)) > 1  # not one token repeated: the comparison has something to compare


def test_run_with_cache_names_are_those_of_llama(family):
    """The same TransformerLens-style names in every family (GPT-2: learned positions instead of rotary tables;
    GPT-2 and GPT-NeoX: an MLP without a gate), and the last layer's stream read out gives the logits."""
    model_type, loaded, engine = family
    logits, cache = engine.run_with_cache(PROMPT)
    expected = {t.format(L=L) for t in hook_names(model_type) for L in range(engine.arch.n_layers)}
    assert set(cache) == expected
    llama = {t.format(L=L) for t in hook_names("llama") for L in range(engine.arch.n_layers)}
    spec, layers = FAMILIES[model_type], range(engine.arch.n_layers)
    no_rope = {"positions.cos", "positions.sin"} | {f"blocks.{L}.attn.hook_rot_{x}" for L in layers for x in "qk"}
    no_gate = {f"blocks.{L}.mlp.hook_pre_linear" for L in layers}
    assert expected == llama - (set() if spec.rope else no_rope) - (set() if spec.gated else no_gate)
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, engine.arch.n_heads, len(PROMPT), len(PROMPT))
    assert_within(engine.read_out(cache["blocks.1.hook_resid_post"]), logits, 1e-5)


def test_matmul_flops_per_op_agree_with_torch_flop_counter(family):
    """As tests/test_engine.py's test of the same name: each matrix-multiply op's Event.flops, for a prefill and
    a decode step, equal what torch.utils.flop_counter.FlopCounterMode counts while the engine computes it."""
    model_type, loaded, engine = family
    rows = counted_flops(engine, PROMPT, 2)
    matmuls = [(e.cycle, e.layer, e.op, e.flops, counted) for e, counted in rows if e.op in MATMUL_OPS]
    assert len(matmuls) == 2 * (6 * engine.arch.n_layers + 1)
    assert all(counted > 0 for *_, counted in matmuls)
    assert [row[:4] for row in matmuls] == [row[:3] + (row[4],) for row in matmuls]
    assert [(e.op, e.layer) for e, counted in rows if e.op not in MATMUL_OPS and counted] == []


def test_int8_weights_run_in_every_family(family, tmp_path_factory):
    """``load(..., quantize="int8")``: the engine against transformers running the same int8 model, for the prompt
    (many rows: torch's product) and for a decode step over the KV cache (one row: the own int8 kernel), within the
    bound of tests/test_int8.py (float32 rounding per layer plus the own kernel's 16-bit input rows)."""
    model_type, loaded, _ = family
    quantized = load(loaded.source, quantize="int8", cache=False)
    engine = Engine(quantized)
    assert engine.arch.int8
    with torch.no_grad():
        ref = quantized.model(torch.tensor([PROMPT])).logits[0]
    bound = logit_bound(quantized, PROMPT, int8=True)
    assert_within(engine.logits(PROMPT)[0], ref, bound)
    cache = KVCache(engine.arch.n_layers, len(PROMPT))
    drain(engine.forward(torch.tensor([PROMPT[:-1]]), cache))
    step = drain(engine.forward(torch.tensor([PROMPT[-1:]]), cache))[0, -1]
    assert_within(step, ref[-1], bound[-1])


# --- what the engine refuses ----------------------------------------------------------------------------------


def _built(model_type: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type) if model_type in CONFIGS else None
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type, **overrides)
    else:
        for key, value in overrides.items():
            setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "model_type,overrides,message",
    [
        ("bert", dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, is_decoder=True), r"families GPT-2 \('gpt2'\), Llama .*'bert'"),
        ("gemma2", dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=37), "softcapping"),
        ("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
         "rope scaling 'dynamic'"),
    ],
    ids=["bert", "gemma2", "llama-dynamic-rope"],
)  # fmt: skip
def test_an_unsupported_family_or_option_is_refused_clearly(model_type, overrides, message):
    model = _built(model_type, **overrides)
    with pytest.raises(ValueError, match=message) as refused:
        architecture_for(model)
    assert "qwen3" in str(refused.value) or "does not implement" in str(refused.value)


def test_a_pad_token_outside_the_vocabulary_is_a_clear_error(tmp_path):
    """Phi-3's default pad_token_id (32000) with a small vocabulary: transformers would fail on an assertion."""
    folder = save_tiny("phi3", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"pad_token_id": 32000}))
    with pytest.raises(ModelFileError, match="pad_token_id 32000 is outside the vocabulary"):
        load(str(folder), cache=False)
