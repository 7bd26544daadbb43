"""The encoder–decoder forward pass, op by op, for the Marian family (core).

An encoder–decoder runs in two phases. The **encoder pass** runs once per source sentence: it reads
the source tokens (FETCH), each layer reads its weights (READ) and attends over the whole source,
with no causal mask (EXECUTE), and it ends by writing the **encoder memory** (WRITEBACK, op
``cross_kv``): for every decoder layer, the keys and values of the source that its cross-attention
will read, computed once. Then every decoder cycle is a decoder-only cycle plus one more read per
layer: ``cross_read`` (READ) fetches that layer's encoder memory, and cross-attention mixes it in.

The cycle's memory has two parts: the decoder's :class:`~cyclelab.core.attention.KVCache` (grows by
one position a cycle) and the :class:`EncoderMemory` (fixed, written once). Op names follow the
decoder-only engine's (:mod:`cyclelab.core.ops`); encoder ops carry the prefix ``enc_``, cross-attention
ops the prefix ``cross_``. :data:`OPS` gives each op's stage, tensors and activation names.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from time import perf_counter

import torch
import torch.nn.functional as F

from cyclelab.core.attention import KVCache, attention_mix, merge_heads, split_heads
from cyclelab.core.blocks import Architecture, Ops, RunContext, parts, softmax
from cyclelab.core.events import Event
from cyclelab.core.ops import Stage

SUPPORTED_SEQ2SEQ = {"marian": "Marian (MarianMTModel)"}
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
}

_F, _R, _E, _W = Stage.FETCH, Stage.READ, Stage.EXECUTE, Stage.WRITEBACK


def _layer_ops(prefix: str, names: str) -> dict[str, tuple[Stage, bool, dict[str, str]]]:
    """The ops of one encoder or decoder layer, named ``<prefix><op>``, activation names under ``<names>.blocks.{L}``."""
    b = f"{names}.blocks.{{L}}"
    return {
        f"{prefix}qkv": (_R, True, {k: f"{b}.attn.hook_{k}" for k in "qkv"}),
        f"{prefix}scores": (_E, True, {"scores": f"{b}.attn.hook_attn_scores"}),
        f"{prefix}softmax": (_E, True, {"probs": f"{b}.attn.hook_pattern"}),
        f"{prefix}mix": (_E, True, {"out": f"{b}.attn.hook_z"}),
        f"{prefix}attn_out": (_E, True, {"out": f"{b}.hook_attn_out"}),
        f"{prefix}residual_attn": (_E, True, {"out": f"{b}.hook_resid_mid_prenorm"}),
        f"{prefix}norm_attn": (_E, True, {"out": f"{b}.hook_resid_mid"}),
        f"{prefix}mlp_in": (_E, True, {"out": f"{b}.mlp.hook_pre"}),
        f"{prefix}act": (_E, True, {"out": f"{b}.mlp.hook_post"}),
        f"{prefix}mlp_out": (_E, True, {"out": f"{b}.hook_mlp_out"}),
        f"{prefix}residual_mlp": (_E, True, {"out": f"{b}.hook_resid_post_prenorm"}),
        f"{prefix}norm_mlp": (_E, True, {"out": f"{b}.hook_resid_post"}),
    }


#: op -> (stage, per layer, {tensor key: activation name with {L} for the layer}), in the order they run
OPS: dict[str, tuple[Stage, bool, dict[str, str]]] = {
    "enc_embed": (_F, False, {"out": "encoder.hook_embed"}),
    "enc_positions": (_F, False, {"out": "encoder.blocks.0.hook_resid_pre"}),
    **_layer_ops("enc_", "encoder"),
    "cross_kv": (_W, True, {"keys": "encoder_memory.{L}.keys", "values": "encoder_memory.{L}.values"}),
    "embed": (_F, False, {"out": "decoder.hook_embed"}),
    "positions": (_F, False, {"out": "decoder.blocks.0.hook_resid_pre"}),
    **{k: v for k, v in _layer_ops("", "decoder").items() if not k.startswith("mlp") and k != "act"},
    "kv_cache": (
        _R,
        True,
        {"keys": "decoder.blocks.{L}.kv_cache.keys", "values": "decoder.blocks.{L}.kv_cache.values"},
    ),
    "cross_q": (_R, True, {"q": "decoder.blocks.{L}.cross_attn.hook_q"}),
    "cross_read": (
        _R,
        True,
        {"keys": "decoder.blocks.{L}.cross_attn.hook_k", "values": "decoder.blocks.{L}.cross_attn.hook_v"},
    ),
    "cross_scores": (_E, True, {"scores": "decoder.blocks.{L}.cross_attn.hook_attn_scores"}),
    "cross_softmax": (_E, True, {"probs": "decoder.blocks.{L}.cross_attn.hook_pattern"}),
    "cross_mix": (_E, True, {"out": "decoder.blocks.{L}.cross_attn.hook_z"}),
    "cross_out": (_E, True, {"out": "decoder.blocks.{L}.hook_cross_out"}),
    "residual_cross": (_E, True, {"out": "decoder.blocks.{L}.hook_resid_cross_prenorm"}),
    "norm_cross": (_E, True, {"out": "decoder.blocks.{L}.hook_resid_cross"}),
    **{k: v for k, v in _layer_ops("", "decoder").items() if k.startswith(("mlp", "act", "residual_mlp", "norm_mlp"))},
    "logits": (_W, False, {"out": "logits.out"}),
    "choose": (_W, False, {"logits": "choose.logits"}),
    "append": (_W, False, {}),
}
ENCODER_OPS = frozenset(op for op in OPS if op.startswith("enc_") or op == "cross_kv")  #: the encoder pass's ops


def stage_of(op: str) -> Stage:
    """The stage of an encoder–decoder op (ValueError naming the known ops)."""
    if op not in OPS:
        raise ValueError(f"unknown encoder-decoder op {op!r}; ops are {', '.join(OPS)}")
    return OPS[op][0]


def check_capture(capture) -> None:
    """TypeError/ValueError unless ``capture`` is None, "all", a function, or a collection of the ops of :data:`OPS`."""
    if capture is None or callable(capture) or (isinstance(capture, str) and capture == "all"):
        return
    if isinstance(capture, (list, tuple, set, frozenset)) and all(isinstance(op, str) for op in capture):
        unknown = sorted(set(capture) - set(OPS))
        if unknown:
            raise ValueError(f"capture names unknown encoder-decoder op(s) {unknown}; ops are {', '.join(OPS)}")
        return
    raise TypeError(
        f'capture must be None, "all", a set of op names or a function (op, layer) -> bool, got {capture!r}'
    )


def activation_names(n_encoder: int, n_decoder: int) -> dict[str, tuple[str, int | None, str]]:
    """Every activation name of an encoder–decoder run mapped to ``(op, layer, tensor key)``
    (``cross_kv`` and the decoder ops count decoder layers, ``enc_`` ops encoder layers)."""
    names = {}
    for op, (_, per_layer, tensors) in OPS.items():
        if op in ("choose", "append"):
            continue
        layers = range(n_encoder if op.startswith("enc_") else n_decoder) if per_layer else [None]
        for layer in layers:
            names.update({name.format(L=layer): (op, layer, key) for key, name in tensors.items()})
    return names


def event(
    run: RunContext, op: str, layer: int | None, start: float, flops: int = 0, nbytes: int = 0, **tensors
) -> Event:
    """An event of an encoder–decoder op (its stage from :data:`OPS`), tensors kept only if captured."""
    keep = tensors if run.capture(op, layer) else {}
    return Event(run.cycle, stage_of(op), layer, op, perf_counter() - start, flops, nbytes, keep)


@dataclass
class EncoderMemory:
    """What the encoder pass writes once and every decoder cycle reads: the encoder's output
    ``states`` ``(batch, source, width)`` and, per decoder layer, the cross-attention ``keys`` and
    ``values`` ``(batch, heads, source, head_dim)``."""

    source_ids: list[int]
    states: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        """Source positions held."""
        return self.states.shape[1]

    def layer_bytes(self, layer: int) -> int:
        """Bytes of the keys and values held for decoder ``layer``."""
        k = self.keys[layer]
        return 2 * k.numel() * k.element_size()

    def nbytes(self) -> int:
        """Bytes of keys and values held for all decoder layers."""
        return sum(self.layer_bytes(i) for i in range(len(self.keys)))

    def expand(self, rows: int) -> "EncoderMemory":
        """The same memory seen by ``rows`` decoder rows (beam search): views, no copies."""
        grow = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
        return EncoderMemory(
            self.source_ids, grow(self.states), list(map(grow, self.keys)), list(map(grow, self.values))
        )


class Marian(Architecture):
    """Marian: sinusoidal positions, scaled embeddings, post-LayerNorm blocks, a final logits bias."""

    family = "marian"

    def __init__(self, model):
        super().__init__(model)
        cfg, self.body = self.config, model.model
        self.encoder_layers, self.layers = self.body.encoder.layers, self.body.decoder.layers
        self.n_encoder_layers, self.n_layers = cfg.encoder_layers, cfg.decoder_layers
        self.n_heads = self.n_kv_heads = cfg.decoder_attention_heads
        self.n_encoder_heads = cfg.encoder_attention_heads
        self.context_window = cfg.max_position_embeddings
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        if cfg.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Marian activation {cfg.activation_function!r} is not supported (use one of {', '.join(ACTIVATIONS)})"
            )
        self.act = ACTIVATIONS[cfg.activation_function]

    @staticmethod
    def norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
        """LayerNorm with the layer's own gain, bias and epsilon."""
        weight, bias = parts(ln, "weight", "bias")
        return F.layer_norm(x, (x.shape[-1],), weight, bias, ln.eps)

    # --- the encoder pass (once) --------------------------------------------------------
    def encode(self, run: RunContext, ids: torch.Tensor) -> Ops:
        """Source ids ``(batch, source)`` -> the encoder's output ``(batch, source, width)``."""
        enc = self.body.encoder
        x = yield from self.embed_at(run, "enc_", enc, ids, torch.arange(ids.shape[1], device=ids.device))
        for i, layer in enumerate(self.encoder_layers):
            (attn,) = parts(layer, "self_attn")
            q, k, v = yield from self.project(run, "enc_qkv", i, x, x, attn, self.n_encoder_heads)
            mixed = yield from self.attend_all(run, "enc_", i, q, k, v)
            ops = ("enc_attn_out", "enc_residual_attn", "enc_norm_attn")
            x = yield from self.sublayer_out(run, ops, i, x, mixed, attn.out_proj, layer.self_attn_layer_norm)
            x = yield from self.mlp(run, "enc_", i, layer, x)
        return x

    def memory(
        self, run: RunContext, source_ids: list[int], states: torch.Tensor
    ) -> Generator[Event, None, EncoderMemory]:
        """WRITEBACK of the encoder pass: each decoder layer's cross-attention keys and values of the source."""
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            t = perf_counter()
            (attn,) = parts(layer, "encoder_attn")
            k, v = (split_heads(p, self.n_heads) for p in self.linears(states, attn.k_proj, attn.v_proj))
            cost = self.linear_cost(states, 2 * states.shape[-1], attn.k_proj, attn.v_proj)
            yield event(run, "cross_kv", i, t, *cost, keys=k, values=v)
            keys.append(k)
            values.append(v)
        return EncoderMemory(list(source_ids), states, keys, values)

    # --- one decoder pass (a cycle) --------------------------------------------------------
    def decode(self, run: RunContext, ids: torch.Tensor, cache: KVCache, memory: EncoderMemory) -> Ops:
        """Decoder ids ``(batch, positions)`` after ``len(cache)`` cached ones -> logits ``(batch, positions, vocab)``."""
        start = len(cache)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = yield from self.embed_at(run, "", self.body.decoder, ids, positions)
        for i, layer in enumerate(self.layers):
            (attn,) = parts(layer, "self_attn")
            q, k, v = yield from self.project(run, "qkv", i, x, x, attn, self.n_heads)
            mixed = yield from self.attend(run, i, q, k, v, cache)  # causal, through the KV cache
            ops = ("attn_out", "residual_attn", "norm_attn")
            x = yield from self.sublayer_out(run, ops, i, x, mixed, attn.out_proj, layer.self_attn_layer_norm)
            x = yield from self.cross_attend(run, i, layer, x, memory)
            x = yield from self.mlp(run, "", i, layer, x)
        return (yield from self.unembed(x, run))

    def cross_attend(self, run: RunContext, i: int, layer, x: torch.Tensor, memory: EncoderMemory) -> Ops:
        """Cross-attention: queries from the decoder's stream, keys and values READ from the encoder memory."""
        (attn,) = parts(layer, "encoder_attn")
        t = perf_counter()
        q = split_heads(self.linear(x, attn.q_proj), self.n_heads)
        yield event(run, "cross_q", i, t, *self.linear_cost(x, x.shape[-1], attn.q_proj), q=q)
        t = perf_counter()
        keys, values = memory.keys[i], memory.values[i]
        yield event(run, "cross_read", i, t, 0, memory.layer_bytes(i), keys=keys, values=values)
        mixed = yield from self.attend_all(run, "cross_", i, q, keys, values)
        ops = ("cross_out", "residual_cross", "norm_cross")
        return (yield from self.sublayer_out(run, ops, i, x, mixed, attn.out_proj, layer.encoder_attn_layer_norm))

    # --- pieces shared by the two passes ------------------------------------------------
    def embed_at(self, run: RunContext, prefix: str, part, ids: torch.Tensor, positions: torch.Tensor) -> Ops:
        """FETCH: token vectors (scaled by sqrt(width) when the model says so), then the sinusoidal positions added."""
        t = perf_counter()
        tokens = part.embed_tokens.weight[ids] * self.scale
        yield event(run, f"{prefix}embed", None, t, tokens.numel(), tokens.numel() * tokens.element_size(), out=tokens)
        t = perf_counter()
        x = tokens + part.embed_positions.weight[positions]
        yield event(run, f"{prefix}positions", None, t, x.numel(), tokens.numel() * tokens.element_size(), out=x)
        return x

    def project(self, run: RunContext, op: str, i: int, x, source, attn, n_heads: int) -> Generator[Event, None, tuple]:
        """READ: the Q, K, V projections, split into heads ``(batch, heads, positions, head_dim)``."""
        t = perf_counter()
        q, k, v = (split_heads(p, n_heads) for p in self.linears(x, attn.q_proj, attn.k_proj, attn.v_proj))
        yield event(
            run, op, i, t, *self.linear_cost(x, 3 * x.shape[-1], attn.q_proj, attn.k_proj, attn.v_proj), q=q, k=k, v=v
        )
        return q, k, v

    def attend_all(self, run: RunContext, prefix: str, i: int, q, k, v) -> Ops:
        """Attention with no mask (the encoder over the source, cross-attention over the encoder memory)."""
        b, h, tq, d = q.shape
        tk = k.shape[-2]
        t = perf_counter()
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        yield event(run, f"{prefix}scores", i, t, 2 * b * h * tq * tk * d, 0, scores=scores)
        t = perf_counter()
        probs = softmax(scores)
        yield event(run, f"{prefix}softmax", i, t, 5 * b * h * tq * tk, 0, probs=probs)
        t = perf_counter()
        mixed = attention_mix(probs, v)
        for lay, head in run.ablation.heads if prefix == "cross_" else ():  # decoder heads only
            if lay == i:
                mixed[:, head] = 0
        yield event(run, f"{prefix}mix", i, t, 2 * b * h * tq * tk * d, 0, out=mixed)
        return merge_heads(mixed)

    def sublayer_out(self, run: RunContext, ops: tuple[str, str, str], i: int, x, mixed, out_proj, ln) -> Ops:
        """The output projection, the residual add, then the LayerNorm after it (post-LN); ``ops`` names the three."""
        out_op, add_op, norm_op = ops
        t = perf_counter()
        out = self.linear(mixed, out_proj)
        yield event(run, out_op, i, t, *self.linear_cost(mixed, out.shape[-1], out_proj), out=out)
        t = perf_counter()
        x = x + out
        yield event(run, add_op, i, t, x.numel(), 0, out=x)
        t = perf_counter()
        x = self.norm(x, ln)
        yield event(run, norm_op, i, t, 5 * x.numel(), 0, out=x)
        return x

    def mlp(self, run: RunContext, prefix: str, i: int, layer, x: torch.Tensor) -> Ops:
        """The MLP (fc1, activation, fc2), the residual add and the LayerNorm after it."""
        t = perf_counter()
        up = self.linear(x, layer.fc1)
        yield event(run, f"{prefix}mlp_in", i, t, *self.linear_cost(x, up.shape[-1], layer.fc1), out=up)
        t = perf_counter()
        act = self.act(up)
        yield event(run, f"{prefix}act", i, t, 8 * act.numel(), 0, out=act)
        t = perf_counter()
        down = self.linear(act, layer.fc2)
        if prefix == "" and i in run.ablation.mlps:
            down = torch.zeros_like(down)
        yield event(run, f"{prefix}mlp_out", i, t, *self.linear_cost(act, down.shape[-1], layer.fc2), out=down)
        t = perf_counter()
        x = x + down
        yield event(run, f"{prefix}residual_mlp", i, t, x.numel(), 0, out=x)
        t = perf_counter()
        x = self.norm(x, layer.final_layer_norm)
        yield event(run, f"{prefix}norm_mlp", i, t, 5 * x.numel(), 0, out=x)
        return x

    def unembed(self, x: torch.Tensor, run: RunContext | None = None) -> Ops:
        """WRITEBACK: the logits, ``lm_head(x) + final_logits_bias`` (Marian has no final norm)."""
        run = run or RunContext()
        t = perf_counter()
        head = self.model.lm_head
        logits = self.linear(x, head) + self.model.final_logits_bias
        yield event(run, "logits", None, t, *self.linear_cost(x, logits.shape[-1], head), out=logits)
        return logits


def seq2seq_architecture_for(model: torch.nn.Module) -> Marian:
    """The op-by-op encoder–decoder for ``model``, or a clear error naming the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "marian" and hasattr(model, "lm_head"):
        return Marian(model)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"the encoder-decoder engine supports the {', '.join(SUPPORTED_SEQ2SEQ.values())} family only; "
            f"got {type(model).__name__} with model_type {model_type!r}"
        )
    raise ValueError(
        f"{type(model).__name__} (model_type {model_type!r}) is not an encoder-decoder model: "
        "run it with cyclelab.Engine, or give a MarianMTModel here (e.g. cyclelab.load('folio-mt'))"
    )


__all__ = [
    "ENCODER_OPS",
    "check_capture",
    "EncoderMemory",
    "Marian",
    "OPS",
    "activation_names",
    "seq2seq_architecture_for",
    "stage_of",
]
