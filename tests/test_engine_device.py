"""The engine on whatever device pick_device() chooses ($CYCLELAB_DEVICE, a GPU if present, else CPU),
with small random GPT-2 and Llama (grouped-query) models built here, and with the tiny model."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cyclelab import Engine, Loaded, load, pick_device

if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class NoTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def random_model(family: str) -> Loaded:
    torch.manual_seed(0)  # weights made on the CPU after seeding, then moved
    if family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64, bos_token_id=None, eos_token_id=None
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=97,
                max_position_embeddings=64,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=None,
            )
        )
    model.config._attn_implementation = "eager"
    return Loaded(family, model.to(pick_device()).eval(), NoTokenizer(), "random")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_random_models_agree_with_transformers_on_the_device(family):
    loaded = random_model(family)
    engine = Engine(loaded)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = loaded.model(ids.to(loaded.device)).logits
    torch.testing.assert_close(engine.logits(ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_random_models_generate_like_transformers_on_the_device(family):
    loaded = random_model(family)
    trace = Engine(loaded).generate([5, 6, 7], max_new_tokens=20, stop_at_eos=False)
    with torch.no_grad():
        ref = loaded.model.generate(
            torch.tensor([[5, 6, 7]], device=loaded.device), max_new_tokens=20, do_sample=False, pad_token_id=0
        )
    assert trace.token_ids == ref[0, 3:].tolist()


def test_tiny_runs_on_the_device():
    tiny = load("tiny")
    engine = Engine(tiny)
    ids = engine.encode("ROMEO: What light through yonder window breaks?")
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids], device=tiny.device)).logits[0]
    torch.testing.assert_close(engine.logits(ids)[0], ref, atol=1e-4, rtol=0)
    assert engine.generate("ROMEO:", 8).records[-1].cache_len > 0
