"""Small random models the checks run a learner's function on: no download, the same weights every time."""

from __future__ import annotations

import torch


def random_gpt2(seed: int = 4):
    """A small random GPT-2 with random norm gains and biases (so a misplaced norm shows) and eager
    attention (so attention called without a causal mask is not causal)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=24,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    # eager attention, as tiny's: a fused kernel would make a maskless call causal on its own
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif type(module).__name__ == "Conv1D":  # weights (in, out) of unit gain: every sublayer counts
                fan_in = module.weight.shape[0]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def random_bert(seed: int = 6):
    """A small random BERT masked LM and its mask id (the last vocabulary entry)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).eval()
    return model, 59
