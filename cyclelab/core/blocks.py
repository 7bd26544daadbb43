"""The forward pass, op by op, for every decoder family the engine runs (:mod:`cyclelab.core.families`).

The blocks are written once (:class:`Decoder`); a family's declaration switches their parts. The engine reads
the Hugging Face model's weights in place (no copies) and runs its forward pass as a *generator*: every micro-op
yields an :class:`Event`, so a consumer can pause between any two ops. The value a generator returns (via
``yield from``) is the op's result. The state of one pass (:class:`RunContext`, :class:`Ablation`) lives in :mod:`cyclelab.core.run`.

Each op's stage, its tensors and their TransformerLens names are defined once, in
:mod:`cyclelab.core.ops` (``print(cyclelab.core.ops.alias_table())``); an op here names itself and the
registry supplies the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from time import perf_counter
from typing import Any

import torch
import torch.nn.functional as F

from cyclelab.core.attention import (
    KVCache,
    attention_mix,
    attention_scores,
    merge_heads,
    outside_window,
    split_heads,
)
from cyclelab.core.events import Event
from cyclelab.core.families import FAMILIES, Family, family_of, settings
from cyclelab.core.norms import rms_norm
from cyclelab.core.rope import apply_rope, rope_cos_sin
from cyclelab.core.run import Ablation, RunContext, capture_rule
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

SUPPORTED = {key: family.name for key, family in FAMILIES.items()}  #: model_type -> family name
Ops = Generator[Event, None, torch.Tensor]


class Architecture:
    """What every family shares: the clock, the event bookkeeping and attention itself."""

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
        self,
        run: RunContext,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: KVCache,
        window: int | None = None,
    ) -> Ops:
        """KV-cache read, scores, softmax and the weighted mix of values; returns merged heads.
        With a sliding ``window``, each query sees only the last ``window`` positions (itself included)."""
        t = perf_counter()
        keys, values = cache.append(layer, k, v)  # (b, kv_h, t_past + t, hd): all positions so far
        yield run.event("kv_cache", layer, t, 0, 2 * keys.numel() * keys.element_size(), keys=keys, values=values)
        b, h, tq, d = q.shape
        tk = keys.shape[-2]

        t = perf_counter()
        scores = fused(fused_scores, attention_scores, q, keys)  # (b, h, t, t_past + t)
        if window is not None and tk > window:
            scores = scores.masked_fill(outside_window(tq, tk, window, scores.device), float("-inf"))
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


class Decoder(Architecture):
    """Every decoder family of :data:`~cyclelab.core.families.FAMILIES` on the same blocks: embedding (learned
    positions or RoPE), attention (separate or fused Q/K/V, q/k norms, sliding windows), MLP (plain or gated),
    norms before or after each sublayer, sequential or parallel residuals; the family's declaration switches them."""

    def __init__(self, model, family: Family | None = None):
        super().__init__(model)
        self.spec = family or family_of(model)
        self.family = model.config.model_type
        self.settings = s = settings(self.spec, self.config)
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim
        self.context_window, self.eps = s.context_window, s.eps
        names = self.spec.weights
        self.paths = {k: tuple(v.split(".")) for k, v in vars(names).items() if isinstance(v, str)}
        self.body = _part(model, names.body)
        self.layers = _part(self.body, names.layers)
        if self.spec.rope:  # frequencies as the model computed them (incl. any fixed scaling)
            rotary = _part(self.body, "rotary_emb")
            self.inv_freq, self.rope_scaling = rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))

    def get(self, module: torch.nn.Module, role: str):
        """The part ``role`` of :class:`~cyclelab.core.families.Weights` under ``module`` (a layer or the body)."""
        for name in self.paths[role]:
            module = _part(module, name)
        return module

    def lin(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """A projection: GPT-2's ``Conv1D`` stores its weight as (in, out) (an int8 Linear once quantized)."""
        if self.spec.conv1d and not self.int8:
            return f32_conv1d(x, *parts(module, "weight", "bias"))
        return self.linear(x, module)

    def norm(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """LayerNorm (centre, unit variance, gain and bias) or RMSNorm (:func:`cyclelab.core.norms.rms_norm`;
        decode's few rows in one C call), with Gemma's gain ``1 + weight``."""
        if self.spec.norm == "layer":
            weight, bias = parts(module, "weight", "bias")
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        (weight,) = parts(module, "weight")
        if self.spec.norm_offset:
            weight = weight + self.spec.norm_offset
        return fused(fused_rms_norm, rms_norm, x, weight, self.eps)

    def normed(self, run: RunContext, op: str, i: int | None, x: torch.Tensor, module: torch.nn.Module) -> Ops:
        t = perf_counter()
        h = self.norm(x, module)
        yield run.event(op, i, t, (5 if self.spec.norm == "layer" else 4) * h.numel(), 0, out=h)
        return h

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (:func:`cyclelab.core.rope.apply_rope`; one decode position in one C call, to the same bits) on the
        first ``cos.shape[-1]`` dimensions of each head; partial rotary (GPT-NeoX) passes the rest unchanged."""
        n = cos.shape[-1]
        if n == x.shape[-1]:
            return fused(fused_rope, apply_rope, x, cos, sin)
        return torch.cat([apply_rope(x[..., :n], cos, sin), x[..., n:]], dim=-1)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        act = self.settings.act
        return F.silu(x) if act == "silu" else F.gelu(x, approximate=act)

    def embed(self, run, ids, positions):
        t = perf_counter()
        x = self.get(self.body, "embed").weight[ids]  # (b, t, d)
        if self.spec.embed_scale:  # Gemma: times sqrt(d), rounded to the weights' dtype first as transformers does
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        yield run.event("embed", None, t, x.numel() * self.spec.embed_scale, x.numel() * x.element_size(), out=x)
        t = perf_counter()
        if not self.spec.rope:
            x = x + self.get(self.body, "positions").weight[positions]  # (b, t, d) + (t, d)
            yield run.event("positions", None, t, x.numel(), x.numel() * x.element_size(), out=x)
            return x
        cos, sin = run.rope = rope_cos_sin(positions, self.inv_freq, self.rope_scaling)  # (t, rotated dims) each
        yield run.event("positions", None, t, 2 * cos.numel(), 0, cos=cos, sin=sin)
        return x

    def block(self, run, i, layer, x, positions, cache):
        pre = self.spec.norm_place == "pre"
        h = (yield from self.normed(run, "norm_attn", i, x, self.get(layer, "norm_attn"))) if pre else x
        q, k, v = yield from self.qkv(run, i, layer, h)
        if self.spec.rope:
            q, k = yield from self.rope(run, i, layer, q, k)
        mixed = yield from self.attend(run, i, q, k, v, cache, self.settings.windows[i])  # (b, t, d): heads merged
        t = perf_counter()
        o_proj = self.get(layer, "o")
        out = self.lin(mixed, o_proj)
        yield run.event("attn_out", i, t, *self.linear_cost(mixed, out.shape[-1], o_proj), out=out)
        if not pre:  # OLMo-2: the norm sits on the sublayer's output, before it is added
            out = yield from self.normed(run, "norm_attn", i, out, self.get(layer, "norm_attn"))
        mid = yield from self.residual(run, i, "residual_attn", x, out)

        h = x if self.settings.parallel else mid  # GPT-NeoX: the MLP reads the block's input too
        if pre:
            h = yield from self.normed(run, "norm_mlp", i, h, self.get(layer, "norm_mlp"))
        down = yield from self.mlp(run, i, layer, h)
        if not pre:
            down = yield from self.normed(run, "norm_mlp", i, down, self.get(layer, "norm_mlp"))
        return (yield from self.residual(run, i, "residual_mlp", mid, down))

    def qkv(self, run: RunContext, i: int, layer, h: torch.Tensor) -> Generator[Event, None, tuple]:
        """READ: queries, keys and values ``(b, heads, t, hd)``, from three projections or one fused."""
        t = perf_counter()
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if "qkv" in self.paths:
            modules: tuple = (self.get(layer, "qkv"),)
            fused_out = self.lin(h, modules[0])  # (b, t, (nh + 2 nkv) hd)
            if self.spec.qkv_layout == "heads":  # GPT-NeoX: per head [q k v]
                b, t_, _ = fused_out.shape
                q, k, v = fused_out.view(b, t_, nh, 3 * hd).transpose(1, 2).chunk(3, dim=-1)
            else:  # [q | k | v]
                q, k, v = fused_out.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                q, k, v = split_heads(q, nh), split_heads(k, nkv), split_heads(v, nkv)
        else:
            modules = (self.get(layer, "q"), self.get(layer, "k"), self.get(layer, "v"))
            q, k, v = self.linears(h, *modules)  # decode: one C call reads all three
            q, k, v = split_heads(q, nh), split_heads(k, nkv), split_heads(v, nkv)
        yield run.event("qkv", i, t, *self.linear_cost(h, (nh + 2 * nkv) * hd, *modules), q=q, k=k, v=v)
        return q, k, v

    def rope(self, run: RunContext, i: int, layer, q: torch.Tensor, k: torch.Tensor) -> Generator[Event, None, tuple]:
        """Positions into q and k: their RMSNorm first where the family has one (Qwen3, OLMo-2), then RoPE."""
        t = perf_counter()
        flops = 0
        if self.spec.qk_norm:
            q, k = self.qk_norm(q, self.get(layer, "q_norm")), self.qk_norm(k, self.get(layer, "k_norm"))
            flops += 4 * (q.numel() + k.numel())
        cos, sin = run.rope or (None, None)  # set by embed
        assert cos is not None and sin is not None, "embed sets the rotary tables before the blocks run"
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)  # (b, h, t, hd), (b, kv_h, t, hd)
        flops += 3 * (q.numel() + k.numel()) * cos.shape[-1] // q.shape[-1]
        yield run.event("rope", i, t, flops, 0, q=q, k=k)
        return q, k

    def qk_norm(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """RMSNorm of heads ``(b, h, t, hd)``: over each head (Qwen3) or over all heads together (OLMo-2)."""
        if self.spec.qk_norm == "head":
            return self.norm(x, module)
        return split_heads(self.norm(merge_heads(x), module), x.shape[1])

    def mlp(self, run: RunContext, i: int, layer, h: torch.Tensor) -> Ops:
        """The MLP: ``down(act(gate) * up)`` (gated) or ``down(act(up))`` (plain); returns what is added."""
        t = perf_counter()
        if not self.spec.gated:
            modules: tuple = (self.get(layer, "up"),)
            up = self.lin(h, modules[0])  # (b, t, d_mlp)
            yield run.event("mlp_in", i, t, *self.linear_cost(h, up.shape[-1], *modules), out=up)
            t = perf_counter()
            act = self.activation(up)
            yield run.event("act", i, t, 8 * act.numel(), 0, out=act)
        else:
            if "gate_up" in self.paths:  # Phi-3: one fused projection [gate | up]
                modules = (self.get(layer, "gate_up"),)
                gate, up = self.lin(h, modules[0]).chunk(2, dim=-1)
            else:
                modules = (self.get(layer, "gate"), self.get(layer, "up"))
                gate, up = self.linears(h, *modules)  # (b, t, d_mlp) each
            yield run.event("mlp_in", i, t, *self.linear_cost(h, 2 * gate.shape[-1], *modules), gate=gate, up=up)
            t = perf_counter()
            act = self.activation(gate) * up  # (b, t, d_mlp)
            yield run.event("act", i, t, 6 * act.numel(), 0, out=act)
        t = perf_counter()
        down_proj = self.get(layer, "down")
        down = self.lin(act, down_proj)  # (b, t, d)
        if i in run.ablation.mlps:
            down = torch.zeros_like(down)
        yield run.event("mlp_out", i, t, *self.linear_cost(act, down.shape[-1], down_proj), out=down)
        return down

    def unembed(self, x, run=None):
        run = run or RunContext()
        h = yield from self.normed(run, "norm_final", None, x, self.get(self.body, "final_norm"))
        t = perf_counter()
        head = self.model.lm_head
        logits = self.linear(h, head)  # (b, t, vocab)
        yield run.event("logits", None, t, *self.linear_cost(h, logits.shape[-1], head), out=logits)
        return logits


GPT2 = Llama = Decoder  # the names of the first two families; every family runs on the same blocks now


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
    if any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        raise ValueError(
            "the model holds LoRA layers (a frozen weight plus A @ B): the engine reads plain weight "
            "matrices, so fold them in first with cyclelab.train.finetune.merge_lora(model)"
        )
    return Decoder(model)  # family_of names the supported families if the model is of none of them


__all__ = [
    "Ablation",
    "Architecture",
    "Decoder",
    "GPT2",
    "Llama",
    "RunContext",
    "architecture_for",
    "capture_rule",
    "SUPPORTED",
]
