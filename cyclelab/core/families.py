"""Decoder families as data: each family is a table of switches and a map of weight names (core).

The engine's one set of blocks (:class:`cyclelab.core.blocks.Decoder`) runs every family in :data:`FAMILIES`;
what differs between GPT-2, Llama, Qwen, Gemma, Phi-3, GPT-NeoX or OLMo-2 is declared here, not coded there.
A new family is one :class:`Family` entry: its switches and where its weights live in the ``transformers`` model.

Some switches are read from the model's config when the engine starts (:func:`settings`): the activation, the
parallel residual of GPT-NeoX, sliding windows per layer, how much of each head RoPE turns. Biases need no switch:
a projection adds the bias its checkpoint holds, or none. Tied embeddings need none either: ``lm_head`` is then
the embedding matrix itself. A config option of a supported family that the engine does not implement (a rope
scaling that changes with the sequence length, logit softcapping, another attention pattern) is refused by
:func:`settings` with a ValueError naming it, never run wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Weights:
    """Where a family's tensors live: the decoder's attribute of the causal LM, then paths inside it and inside
    each layer (dotted, as in ``model.named_modules()``); None where the family has no such part."""

    body: str = "model"
    layers: str = "layers"
    embed: str = "embed_tokens"
    positions: str | None = None  # learned position embeddings (GPT-2)
    final_norm: str = "norm"
    norm_attn: str | None = "input_layernorm"
    norm_mlp: str | None = "post_attention_layernorm"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None  # one fused projection, split after it
    q_norm: str | None = None
    k_norm: str | None = None
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None  # one fused projection [gate | up]
    down: str = "mlp.down_proj"


@dataclass(frozen=True)
class Family:
    """The switches of one decoder family (see the module docstring for what each changes)."""

    name: str  # as the course writes it
    weights: Weights = field(default_factory=Weights)
    positions: str = "rope"  # "learned" (added to the embedding) or "rope" (q and k turned)
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    embed_scale: bool = False  # Gemma multiplies the embedding by sqrt(hidden size)
    qkv_layout: str = "blocks"  # a fused qkv's columns: "blocks" [q | k | v] or "heads" (per head [q k v], NeoX)
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "head" (over each head, Qwen3), "width" (OLMo-2)
    mlp: str = "gated"  # "gated" (act(gate) * up: SwiGLU, GeGLU) or "plain" (up, act, down: GPT-2, NeoX)
    norm_place: str = "pre"  # "pre" (norm, sublayer, add) or "post" (sublayer, norm, add: OLMo-2)
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    act_key: str = "hidden_act"  # the config entry naming the activation
    window_key: str | None = None  # a config entry giving every layer one sliding window (Mistral, Phi-3)

    @property
    def gated(self) -> bool:
        return self.mlp == "gated"

    @property
    def rope(self) -> bool:
        return self.positions == "rope"


_GPT2 = Weights(
    body="transformer",
    layers="h",
    embed="wte",
    positions="wpe",
    final_norm="ln_f",
    norm_attn="ln_1",
    norm_mlp="ln_2",
    q=None,
    k=None,
    v=None,
    qkv="attn.c_attn",
    o="attn.c_proj",
    gate=None,
    up="mlp.c_fc",
    down="mlp.c_proj",
)
_NEOX = Weights(
    body="gpt_neox",
    embed="embed_in",
    final_norm="final_layer_norm",
    q=None,
    k=None,
    v=None,
    qkv="attention.query_key_value",
    o="attention.dense",
    gate=None,
    up="mlp.dense_h_to_4h",
    down="mlp.dense_4h_to_h",
)
_QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "GPT-2", _GPT2, positions="learned", norm="layer", mlp="plain", conv1d=True, act_key="activation_function"
    ),
    "llama": Family("Llama"),
    "mistral": Family("Mistral", window_key="sliding_window"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3", Weights(**_QK_NORMS), qk_norm="head"),
    "gemma": Family("Gemma", norm_offset=1.0, embed_scale=True),
    "phi3": Family(
        "Phi-3",
        Weights(q=None, k=None, v=None, qkv="self_attn.qkv_proj", gate=None, up=None, gate_up="mlp.gate_up_proj"),
        window_key="sliding_window",
    ),
    "gpt_neox": Family("GPT-NeoX (Pythia)", _NEOX, norm="layer", qkv_layout="heads", mlp="plain"),
    "olmo2": Family(
        "OLMo-2",
        Weights(norm_attn="post_attention_layernorm", norm_mlp="post_feedforward_layernorm", **_QK_NORMS),
        qk_norm="width",
        norm_place="post",
    ),
}

#: model types near a supported family, and what the engine lacks to run them
NEAR = {
    "gemma2": "Gemma 2's logit softcapping, extra norms around each sublayer and alternating sliding windows",
    "gemma3_text": "Gemma 3's extra norms, q/k norms and two rotary tables (local and global layers)",
    "gemma3": "Gemma 3's extra norms, q/k norms and two rotary tables (local and global layers)",
    "olmo": "OLMo (1)'s LayerNorm without weights",
    "phi": "Phi-1/2's one LayerNorm shared by the parallel attention and MLP",
    "mixtral": "a mixture-of-experts MLP",
    "qwen2_moe": "a mixture-of-experts MLP",
    "qwen3_moe": "a mixture-of-experts MLP",
}

ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "silu": "silu", "swish": "silu"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # fixed tables: computed once by transformers, read as they are


def supported_text() -> str:
    """The supported families, for error messages."""
    return ", ".join(f"{f.name} ({key!r})" for key, f in FAMILIES.items())


def family_of(model: Any) -> Family:
    """The :class:`Family` of a ``transformers`` causal LM, or a ValueError listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES and hasattr(model, "lm_head"):
        return FAMILIES[model_type]
    near = f": it needs {NEAR[model_type]}, which the engine does not implement" if model_type in NEAR else ""
    raise ValueError(
        f"the engine runs causal language models of the families {supported_text()}; got "
        f"{type(model).__name__} with model_type {model_type!r}{near}"
    )


@dataclass(frozen=True)
class Settings:
    """What a family's switches become for one model's config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_window: int
    eps: float
    act: str  # "silu", or F.gelu's approximate: "none" or "tanh"
    parallel: bool  # attention and MLP both read the block's input (GPT-NeoX's use_parallel_residual)
    windows: tuple[int | None, ...]  # each layer's sliding window (keys kept per query), None: all


def settings(family: Family, config: Any) -> Settings:
    """The family's switches for ``config``; a ValueError for an option the engine does not implement."""
    refuse_unsupported_options(family, config)
    n_heads = config.num_attention_heads
    act = getattr(config, family.act_key, None)
    if act not in ACTIVATIONS:
        raise ValueError(f"{family.name} activation {act!r} is not supported; the engine runs {', '.join(ACTIVATIONS)}")
    eps = next(
        getattr(config, k) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon") if hasattr(config, k)
    )
    return Settings(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        context_window=config.max_position_embeddings,
        eps=float(eps),
        act=ACTIVATIONS[act],
        parallel=bool(getattr(config, "use_parallel_residual", False)),
        windows=windows(family, config),
    )


def windows(family: Family, config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window: from ``layer_types`` where the config has them, else the family's one window."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"{family.name} layer types {unknown} are not supported (full and sliding attention are)")
        return tuple(window if kind == "sliding_attention" else None for kind in types)
    return (window if family.window_key else None,) * n


def refuse_unsupported_options(family: Family, config: Any) -> None:
    """ValueError naming a config option of ``family`` that the engine would otherwise run wrong."""
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    problems = []
    if family.rope and kind not in ROPE_TYPES:
        problems.append(f"rope scaling {kind!r} (its tables change with the sequence length; {ROPE_TYPES} run)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None) is not None:
            problems.append(f"{key}")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention (the engine's attention is causal)")
    if problems:
        raise ValueError(
            f"this {family.name} model uses {'; '.join(problems)}, which the engine does not implement: "
            "it refuses rather than compute other logits than the model's"
        )
