"""The forward pass, op by op, for the GPT-2 and Llama families.

Each architecture reads the Hugging Face model's weights in place (no copies) and
runs its forward pass as a *generator*: every micro-op yields an :class:`Event`,
so a consumer can pause between any two ops. The value a generator returns (via
``yield from``) is the op's result.

Each op's stage, its tensors and their TransformerLens names are defined once, in
:mod:`cyclelab.core.ops` (``print(cyclelab.core.ops.alias_table())``); an op here names itself and the
registry supplies the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import torch
import torch.nn.functional as F

from cyclelab.core.attention import KVCache, attention_mix, attention_scores, merge_heads, split_heads
from cyclelab.core.events import Event
from cyclelab.core.norms import rms_norm
from cyclelab.core.ops import REGISTRY
from cyclelab.core.rope import apply_rope, rope_cos_sin
from cyclelab.kernels import (
    f32_conv1d,
    f32_linears,
    fused_mix,
    fused_rms_norm,
    fused_rope,
    fused_scores,
    fused_softmax,
    int8_linears,
    is_int8,
)
from cyclelab.loading.schema import is_int

SUPPORTED = {"gpt2": "GPT-2", "llama": "Llama"}
Ops = Generator[Event, None, torch.Tensor]


@dataclass(frozen=True)
class Ablation:
    """Parts of the model switched off: attention heads as (layer, head), MLPs by layer."""

    heads: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    mlps: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        """Any collections of ints become frozensets; anything else is a TypeError.
        (Whether a layer or head exists is checked by the engine, which knows the model.)"""
        heads, mlps = _int_collection(self.heads, "heads", pairs=True), _int_collection(self.mlps, "mlps")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "mlps", mlps)

    def __bool__(self) -> bool:
        return bool(self.heads or self.mlps)


def _int_collection(items, name: str, pairs: bool = False) -> frozenset:
    """``items`` as a frozenset of ints (of (int, int) tuples if ``pairs``); else a TypeError naming ``name``."""

    def valid(item) -> bool:
        return isinstance(item, (tuple, list)) and len(item) == 2 and all(map(is_int, item)) if pairs else is_int(item)

    given = items
    items = list(items) if isinstance(items, Iterable) and not isinstance(items, (str, bytes, dict)) else None
    if items is None or not all(map(valid, items)):
        what = "(layer, head) pairs of integers" if pairs else "layer numbers (integers)"
        raise TypeError(f"ablation {name} must be a collection of {what}, got {given!r}")
    return frozenset(tuple(i) for i in items) if pairs else frozenset(items)


Capture = Callable[[str, int | None], bool]


def capture_rule(spec) -> Capture:
    """Turn a capture spec into a predicate ``(op, layer) -> bool``.

    ``None`` captures nothing, ``"all"`` everything, a collection of op names those
    ops, and a callable is used as it is.
    """
    if spec is None:
        return lambda op, layer: False
    if spec == "all":
        return lambda op, layer: True
    if callable(spec):
        return spec
    names = frozenset(spec)
    return lambda op, layer: op in names


@dataclass
class RunContext:
    """The state of one forward pass: its cycle, what to capture, what is ablated, and (Llama)
    the rotary tables of its positions.

    It travels through ``forward``, ``embed``, ``block`` and ``unembed``; nothing of a run is
    stored on the shared :class:`Architecture`, so two runs on one engine can interleave.
    """

    cycle: int = 0
    capture: Capture = field(default_factory=lambda: capture_rule(None))
    ablation: Ablation = field(default_factory=Ablation)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), set by Llama's embed

    def event(
        self, op: str, layer: int | None, start: float, flops: int = 0, nbytes: int = 0, **tensors: torch.Tensor
    ) -> Event:
        """An event for ``op`` (its stage from the op registry) that began at ``start``;
        tensors kept only if captured."""
        keep = tensors if self.capture(op, layer) else {}
        return Event(self.cycle, REGISTRY[op].stage, layer, op, perf_counter() - start, flops, nbytes, keep)


class Architecture:
    """What GPT-2 and Llama share: the clock, the event bookkeeping and attention itself."""

    family = ""
    n_layers: int
    n_heads: int
    n_kv_heads: int

    def __init__(self, model: Any):  # a transformers PreTrainedModel (its config and methods are read)
        self.model = model
        self.config = model.config
        # int8 Linears (cyclelab.lab.quantize.to_int8) are called as modules: their weights are packed for the kernel
        self.int8 = any(is_int8(m) for m in model.modules())
        self._weight_bytes: dict[torch.nn.Module, int] = {}

    def linear(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """``x @ W.T + b`` for a Linear, float32 or int8 (decode's few rows by the engine's own C kernels)."""
        return self.linears(x, module)[0]

    def linears(self, x: torch.Tensor, *modules: torch.nn.Module) -> list[torch.Tensor]:
        """:meth:`linear` of ``x`` with each of ``modules``: for decode, one C call reads all their weights."""
        if self.int8:
            return int8_linears(x, [parts(m, "q", "scale", "bias") for m in modules])
        return f32_linears(x, [parts(m, "weight", "bias") for m in modules])

    # --- bookkeeping -------------------------------------------------------------
    def linear_cost(self, x: torch.Tensor, n_out: int, *modules: torch.nn.Module) -> tuple[int, int]:
        """FLOPs and bytes of ``x @ W.T`` into ``n_out`` outputs for the Linears or Conv1Ds ``modules``
        (each weight read once, the input read, the output written)."""
        rows = x.numel() // x.shape[-1]
        flops = 2 * rows * x.shape[-1] * n_out
        return flops, sum(map(self.weight_bytes, modules)) + (x.numel() + rows * n_out) * x.element_size()

    def weight_bytes(self, module: torch.nn.Module) -> int:
        """:func:`matrix_bytes` of ``module``, looked up once per module (decode asks every cycle)."""
        nbytes = self._weight_bytes.get(module)
        if nbytes is None:
            nbytes = self._weight_bytes[module] = matrix_bytes(module)
        return nbytes

    # --- shared attention ---------------------------------------------------------
    def attend(
        self, run: RunContext, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache
    ) -> Ops:
        """KV-cache read, scores, softmax and the weighted mix of values; returns merged heads."""
        t = perf_counter()
        keys, values = cache.append(layer, k, v)  # (b, kv_h, t_past + t, hd): all positions so far
        yield run.event("kv_cache", layer, t, 0, 2 * keys.numel() * keys.element_size(), keys=keys, values=values)
        b, h, tq, d = q.shape
        tk = keys.shape[-2]

        t = perf_counter()
        scores = fused(fused_scores, attention_scores, q, keys)  # (b, h, t, t_past + t)
        yield run.event("scores", layer, t, 2 * b * h * tq * tk * d, 0, scores=scores)
        t = perf_counter()
        probs = fused(fused_softmax, softmax, scores)  # (b, h, t, t_past + t)
        yield run.event("softmax", layer, t, 5 * b * h * tq * tk, 0, probs=probs)
        t = perf_counter()
        mixed = fused(fused_mix, attention_mix, probs, values)  # (b, h, t, hd)
        for lay, head in run.ablation.heads:
            if lay == layer:
                mixed[:, head] = 0
        yield run.event("mix", layer, t, 2 * b * h * tq * tk * d, 0, out=mixed)
        return merge_heads(mixed)

    def residual(self, run: RunContext, layer: int, op: str, x: torch.Tensor, delta: torch.Tensor) -> Ops:
        """The residual add: a layer writes its result back into the stream (the registers)."""
        t = perf_counter()
        out = x + delta
        yield run.event(op, layer, t, out.numel(), 0, out=out)
        return out

    def forward(self, ids: torch.Tensor, cache: KVCache, run: RunContext) -> Ops:
        """Token ids ``(batch, positions)`` after ``len(cache)`` cached ones -> logits ``(batch, positions, vocab)``."""
        start = len(cache)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)  # (t,)
        x = yield from self.embed(run, ids, positions)  # (b, t, d)
        for i, layer in enumerate(self.layers):
            x = yield from self.block(run, i, layer, x, positions, cache)  # (b, t, d)
        return (yield from self.unembed(x, run))  # (b, t, vocab)

    # --- per family ---------------------------------------------------------------
    context_window: int
    layers: torch.nn.ModuleList  # the model's blocks

    def embed(self, run: RunContext, ids: torch.Tensor, positions: torch.Tensor) -> Ops:  # pragma: no cover
        raise NotImplementedError

    def block(
        self, run: RunContext, i: int, layer: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, cache: KVCache
    ) -> Ops:  # pragma: no cover - abstract
        raise NotImplementedError

    def unembed(self, x: torch.Tensor, run: RunContext | None = None) -> Ops:  # pragma: no cover - abstract
        raise NotImplementedError


class GPT2(Architecture):
    """GPT-2: learned positions, LayerNorm, fused QKV projection, GELU MLP, tied unembedding."""

    family = "gpt2"

    def __init__(self, model):
        super().__init__(model)
        self.body = model.transformer
        self.layers = self.body.h
        self.n_layers = self.config.n_layer
        self.n_heads = self.n_kv_heads = self.config.n_head
        self.context_window = self.config.n_positions
        self.eps = self.config.layer_norm_epsilon
        act = self.config.activation_function
        if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {act!r} is not supported (use gelu_new or gelu)")
        self.approximate = "none" if act == "gelu" else "tanh"

    def norm(self, x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
        """LayerNorm: centre, scale to unit variance, then the learned gain and bias."""
        weight, bias = parts(ln, "weight", "bias")
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def conv1d(self, x: torch.Tensor, conv) -> torch.Tensor:
        """GPT-2's ``Conv1D`` is a linear layer with its weight stored as (in, out) (an int8 Linear once quantized)."""
        return self.linear(x, conv) if self.int8 else f32_conv1d(x, *parts(conv, "weight", "bias"))

    def embed(self, run, ids, positions):
        t = perf_counter()
        tokens = self.body.wte.weight[ids]  # (b, t, d)
        yield run.event("embed", None, t, 0, tokens.numel() * tokens.element_size(), out=tokens)
        t = perf_counter()
        x = tokens + self.body.wpe.weight[positions]  # (b, t, d) + (t, d)
        yield run.event("positions", None, t, x.numel(), tokens.numel() * tokens.element_size(), out=x)
        return x

    def block(self, run, i, layer, x, positions, cache):
        ln_1, attn, ln_2, mlp = parts(layer, "ln_1", "attn", "ln_2", "mlp")
        (c_attn, c_proj), (c_fc, mlp_proj) = parts(attn, "c_attn", "c_proj"), parts(mlp, "c_fc", "c_proj")
        t = perf_counter()
        h = self.norm(x, ln_1)  # (b, t, d)
        yield run.event("norm_attn", i, t, 5 * h.numel(), 0, out=h)

        t = perf_counter()
        qkv = self.conv1d(h, c_attn)  # (b, t, 3d)
        b, t_, _ = qkv.shape  # [q | k | v], each the heads side by side: one view splits all three
        q, k, v = qkv.view(b, t_, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4).unbind()  # (b, h, t, hd) each
        yield run.event("qkv", i, t, *self.linear_cost(h, qkv.shape[-1], c_attn), q=q, k=k, v=v)

        mixed = yield from self.attend(run, i, q, k, v, cache)  # (b, t, d): the heads merged
        t = perf_counter()
        out = self.conv1d(mixed, c_proj)  # (b, t, d)
        yield run.event("attn_out", i, t, *self.linear_cost(mixed, out.shape[-1], c_proj), out=out)
        x = yield from self.residual(run, i, "residual_attn", x, out)

        t = perf_counter()
        h = self.norm(x, ln_2)  # (b, t, d)
        yield run.event("norm_mlp", i, t, 5 * h.numel(), 0, out=h)
        t = perf_counter()
        up = self.conv1d(h, c_fc)  # (b, t, 4d)
        yield run.event("mlp_in", i, t, *self.linear_cost(h, up.shape[-1], c_fc), out=up)
        t = perf_counter()
        act = F.gelu(up, approximate=self.approximate)  # (b, t, 4d)
        yield run.event("act", i, t, 8 * act.numel(), 0, out=act)
        t = perf_counter()
        down = self.conv1d(act, mlp_proj)  # (b, t, d)
        if i in run.ablation.mlps:
            down = torch.zeros_like(down)
        yield run.event("mlp_out", i, t, *self.linear_cost(act, down.shape[-1], mlp_proj), out=down)
        return (yield from self.residual(run, i, "residual_mlp", x, down))

    def unembed(self, x, run=None):
        run = run or RunContext()
        t = perf_counter()
        h = self.norm(x, self.body.ln_f)
        yield run.event("norm_final", None, t, 5 * h.numel(), 0, out=h)
        t = perf_counter()
        head = self.model.lm_head
        logits = self.linear(h, head)  # (b, t, vocab)
        yield run.event("logits", None, t, *self.linear_cost(h, logits.shape[-1], head), out=logits)
        return logits


class Llama(Architecture):
    """Llama: RoPE, RMSNorm, separate Q/K/V with grouped-query attention, SwiGLU MLP."""

    family = "llama"

    def __init__(self, model):
        super().__init__(model)
        self.body = model.model
        self.layers = self.body.layers
        cfg = self.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.context_window = cfg.max_position_embeddings
        self.eps = cfg.rms_norm_eps
        if cfg.hidden_act != "silu":
            raise ValueError(f"Llama activation {cfg.hidden_act!r} is not supported (only silu)")
        rotary = self.body.rotary_emb  # frequencies as the model computed them (incl. any scaling)
        self.inv_freq, self.rope_scaling = rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm: divide by the root-mean-square (in float32), then the learned gain
        (:func:`cyclelab.core.norms.rms_norm`; decode's few rows in one C call of the same formula)."""
        return fused(fused_rms_norm, rms_norm, x, weight, self.eps)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (:func:`cyclelab.core.rope.apply_rope`; one decode position in one C call, to the same bits)."""
        return fused(fused_rope, apply_rope, x, cos, sin)

    def embed(self, run, ids, positions):
        t = perf_counter()
        x = self.body.embed_tokens.weight[ids]  # (b, t, d)
        yield run.event("embed", None, t, 0, x.numel() * x.element_size(), out=x)
        t = perf_counter()
        cos, sin = run.rope = rope_cos_sin(positions, self.inv_freq, self.rope_scaling)  # (t, head_dim) each
        yield run.event("positions", None, t, 2 * cos.numel(), 0, cos=cos, sin=sin)
        return x

    def block(self, run, i, layer, x, positions, cache):
        attn, mlp, norm_attn, norm_mlp = parts(layer, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
        q_proj, k_proj, v_proj, o_proj = parts(attn, "q_proj", "k_proj", "v_proj", "o_proj")
        gate_proj, up_proj, down_proj = parts(mlp, "gate_proj", "up_proj", "down_proj")
        t = perf_counter()
        h = self.norm(x, *parts(norm_attn, "weight"))  # (b, t, d)
        yield run.event("norm_attn", i, t, 4 * h.numel(), 0, out=h)

        t = perf_counter()
        q, k, v = self.linears(h, q_proj, k_proj, v_proj)  # decode: one C call reads all three
        q = split_heads(q, self.n_heads)  # (b, h, t, hd)
        k, v = split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)  # (b, kv_h, t, hd) each
        n_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        yield run.event("qkv", i, t, *self.linear_cost(h, n_out, q_proj, k_proj, v_proj), q=q, k=k, v=v)

        t = perf_counter()
        cos, sin = run.rope
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)  # (b, h, t, d), (b, kv_h, t, d)
        yield run.event("rope", i, t, 3 * (q.numel() + k.numel()), 0, q=q, k=k)

        mixed = yield from self.attend(run, i, q, k, v, cache)  # (b, t, d): the heads merged
        t = perf_counter()
        out = self.linear(mixed, o_proj)
        yield run.event("attn_out", i, t, *self.linear_cost(mixed, out.shape[-1], o_proj), out=out)
        x = yield from self.residual(run, i, "residual_attn", x, out)

        t = perf_counter()
        h = self.norm(x, *parts(norm_mlp, "weight"))  # (b, t, d)
        yield run.event("norm_mlp", i, t, 4 * h.numel(), 0, out=h)
        t = perf_counter()
        gate, up = self.linears(h, gate_proj, up_proj)  # (b, t, d_mlp) each
        cost = self.linear_cost(h, 2 * gate.shape[-1], gate_proj, up_proj)
        yield run.event("mlp_in", i, t, *cost, gate=gate, up=up)
        t = perf_counter()
        act = F.silu(gate) * up  # (b, t, d_mlp)
        yield run.event("act", i, t, 6 * act.numel(), 0, out=act)
        t = perf_counter()
        down = self.linear(act, down_proj)  # (b, t, d)
        if i in run.ablation.mlps:
            down = torch.zeros_like(down)
        yield run.event("mlp_out", i, t, *self.linear_cost(act, down.shape[-1], down_proj), out=down)
        return (yield from self.residual(run, i, "residual_mlp", x, down))

    def unembed(self, x, run=None):
        run = run or RunContext()
        t = perf_counter()
        h = self.norm(x, self.body.norm.weight)
        yield run.event("norm_final", None, t, 4 * h.numel(), 0, out=h)
        t = perf_counter()
        head = self.model.lm_head
        logits = self.linear(h, head)  # (b, t, vocab)
        yield run.event("logits", None, t, *self.linear_cost(h, logits.shape[-1], head), out=logits)
        return logits


def parts(module: torch.nn.Module, *names: str) -> tuple:
    """``module``'s submodules, parameters or buffers ``names``, read from its own tables: ``module.weight`` goes
    through ``nn.Module.__getattr__``'s slow path (a failed lookup first), microseconds that decode would pay
    hundreds of times a token. Any other attribute is read as usual."""
    return tuple(_part(module, name) for name in names)


def _part(module: torch.nn.Module, name: str):
    for table in (module._modules, module._parameters, module._buffers):
        if name in table:
            return table[name]
    return getattr(module, name)


def fused(kernel: Callable[..., torch.Tensor | None], formula: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``kernel(*args)``, one of the engine's C kernels for decode (:mod:`cyclelab.kernels`), or ``formula(*args)``
    where the kernel does not apply (prompts, gradients, other dtypes and devices): the same formula in torch."""
    out = kernel(*args, formula=formula)  # the kernel runs only where it is faster than the formula on this machine
    return formula(*args) if out is None else out


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Attention's softmax over the keys, computed in float32."""
    return torch.softmax(scores.float(), dim=-1).to(scores.dtype)


def matrix_bytes(module: torch.nn.Module) -> int:
    """Bytes of a Linear's or Conv1D's weight as stored: float elements, or int8 codes plus a float32 scale per row."""
    if is_int8(module):
        rows, columns = getattr(module, "out_features"), getattr(module, "in_features")  # plain ints
        return rows * columns + 4 * rows
    weight = module.get_parameter("weight")
    return weight.numel() * weight.element_size()


def architecture_for(model: torch.nn.Module) -> Architecture:
    """The op-by-op forward for ``model``, or a clear error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        raise ValueError(
            "the model holds LoRA layers (a frozen weight plus A @ B): the engine reads plain weight "
            "matrices, so fold them in first with cyclelab.train.finetune.merge_lora(model)"
        )
    if model_type == "gpt2" and hasattr(model, "lm_head"):
        return GPT2(model)
    if model_type == "llama" and hasattr(model, "lm_head"):
        return Llama(model)
    raise ValueError(
        f"the engine supports causal language models of the {' and '.join(SUPPORTED.values())} families "
        f"(model_type {', '.join(map(repr, SUPPORTED))}); got {type(model).__name__} with model_type {model_type!r}"
    )


__all__ = ["Ablation", "Architecture", "GPT2", "Llama", "RunContext", "architecture_for", "capture_rule", "SUPPORTED"]
