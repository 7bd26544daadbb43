"""The bug hunt: a small GPT built from four replaceable pieces, six bugs to plant in them, and the
symptom that gives each bug away.

:func:`forward` runs the weights of a ``transformers`` GPT-2 (``tiny``) or Llama model with the course's
own parts (norms, MLPs, heads split and merged, the RoPE tables) and four pieces a learner can replace:

* ``attend(q, k, v) -> (out, probs)``: scaled dot-product attention with the causal mask;
* ``apply_rope(x, cos, sin) -> x``: the rotary position embedding (Llama only);
* ``append_kv(cache, layer, k, v) -> (keys, values)``: the KV cache of a cached (cycle by cycle) run;
* ``lm_loss(logits, ids, mask) -> loss``: next-token cross-entropy over the real (unpadded) tokens.

:data:`BUGS` names six bugs, one piece each; ``pieces("no_causal_mask")`` plants one. The detectors
(:func:`lookahead`, :func:`mean_entropy`, :func:`training_curve`, :func:`copy_loss`,
:func:`padding_shift`, :func:`drift_by_position`, :func:`faithfulness`) measure what a learner sees;
the checks (:func:`check_attend`, :func:`check_lm_loss`, :func:`check_apply_rope`,
:func:`check_append_kv`) plug a learner's piece into the GPT and name the symptom when it is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from cyclelab.checks.harness import Failed, Result, call, checker
from cyclelab.checks.models import random_gpt2
from cyclelab.core.norms import layer_norm, rms_norm
from cyclelab.core.rope import apply_rope, rope_cos_sin
from cyclelab.lab.attention_heads import (
    attention_entropy,
    causal_mask,
    merge_heads,
    repeat_kv,
    scaled_dot_product_attention,
    split_heads,
)
from cyclelab.lab.forward_by_hand import gelu_mlp, project_out, project_qkv, swiglu_mlp
from cyclelab.loading.schema import is_int

# ------------------------------------------------------------------ the correct pieces


def append_kv(cache: dict, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store this cycle's keys and values for ``layer`` in ``cache``; return all of them so far."""
    past_k, past_v = cache.get(layer, (k[..., :0, :], v[..., :0, :]))  # nothing stored yet: empty
    cache[layer] = (torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2))
    return cache[layer]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position i predicts token i + 1; padded targets (mask 0) left out."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    keep = mask[:, 1:].flatten().to(losses.dtype)
    return (losses * keep).sum() / keep.sum()


@dataclass(frozen=True)
class Pieces:
    """The four replaceable pieces of the GPT; the correct ones by default."""

    attend: Callable = scaled_dot_product_attention
    apply_rope: Callable = apply_rope
    append_kv: Callable = append_kv
    lm_loss: Callable = lm_loss


# ------------------------------------------------------------------ the planted bugs


def attend_without_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """BUG ``no_causal_mask``: every query also reads the keys after it."""
    return scaled_dot_product_attention(q, k, v, causal=False)


def attend_without_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """BUG ``no_scale``: the scores are not divided by sqrt(d)."""
    return scaled_dot_product_attention(q, k, v, scale=1.0)


def lm_loss_unshifted(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BUG ``unshifted_targets``: position i is scored on token i, the one it reads."""
    losses = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
    keep = mask.flatten().to(losses.dtype)
    return (losses * keep).sum() / keep.sum()


def lm_loss_with_padding(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BUG ``padding_in_loss``: the mean runs over every target, pad tokens included."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def rotate_adjacent(x: torch.Tensor) -> torch.Tensor:
    """Turn the adjacent pairs (0, 1), (2, 3), … of the last axis: (a, b) -> (-b, a)."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def apply_rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """BUG ``rope_pairing``: rotates adjacent pairs with tables laid out for (i, i + d/2) pairs."""
    return x * cos.to(x.dtype) + rotate_adjacent(x) * sin.to(x.dtype)


def append_kv_twice(cache: dict, layer: int, k: torch.Tensor, v: torch.Tensor):
    """BUG ``kv_cache_twice``: this cycle's keys and values are stored a second time."""
    keys, values = append_kv(cache, layer, k, v)
    append_kv(cache, layer, k, v)  # the bug: a second append, the next cycle reads every key twice
    return keys, values


@dataclass(frozen=True)
class Bug:
    """A planted bug: the piece it lives in, the buggy piece, the symptom that shows it and its detector."""

    piece: str
    planted: Callable
    symptom: str
    detector: str


BUGS: dict[str, Bug] = {
    "no_causal_mask": Bug(
        "attend", attend_without_mask, "training loss far too low; weight above the diagonal", "lookahead(maps) > 0"
    ),
    "unshifted_targets": Bug(
        "lm_loss", lm_loss_unshifted, "training loss near 0 within a few steps", "copy_loss(lm_loss) near 0"
    ),
    "no_scale": Bug(
        "attend",
        attend_without_scale,
        "attention entropy collapses: one key per query",
        "mean_entropy(maps) << reference",
    ),
    "rope_pairing": Bug(
        "apply_rope", apply_rope_adjacent, "right at position 0, drifts after it", "drift_by_position(...)"
    ),
    "padding_in_loss": Bug(
        "lm_loss", lm_loss_with_padding, "the loss changes with the amount of padding", "padding_shift(lm_loss, ...)"
    ),
    "kv_cache_twice": Bug("append_kv", append_kv_twice, "prefill right, every cached cycle wrong", "faithfulness(...)"),
}


def pieces(*bugs: str) -> Pieces:
    """The GPT's pieces with ``bugs`` planted, at most one per piece; none gives the correct GPT."""
    planted: dict[str, Callable] = {}
    for name in bugs:
        if not isinstance(name, str):
            raise TypeError(f"a bug is named by a string, got {type(name).__name__}; the bugs are: {', '.join(BUGS)}")
        if name not in BUGS:
            raise ValueError(f"unknown bug {name!r}; the bugs are: {', '.join(BUGS)}")
        bug = BUGS[name]
        if bug.piece in planted:
            both = ", ".join(b for b in bugs if BUGS[b].piece == bug.piece)
            raise ValueError(f"two bugs in the piece {bug.piece!r} ({both}): plant one bug per piece")
        planted[bug.piece] = bug.planted
    return replace(Pieces(), **planted)


def with_piece(name: str, fn: Callable) -> Pieces:
    """The correct pieces with one replaced by ``fn`` (a learner's version)."""
    names = [f.name for f in fields(Pieces)]
    if name not in names:
        raise ValueError(f"unknown piece {name!r}; the pieces are: {', '.join(names)}")
    if not callable(fn):
        raise TypeError(f"the piece {name!r} must be a function, got {type(fn).__name__}")
    return replace(Pieces(), **{name: fn})


# ------------------------------------------------------------------ the GPT


def forward(
    model: torch.nn.Module, ids: torch.Tensor, parts: Pieces = Pieces(), cache: dict | None = None, start: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``(batch, T, vocab)`` and each layer's attention map, for ``ids`` ``(batch, T)`` at positions
    ``start, start + 1, …`` of a GPT-2 or Llama ``model``'s weights, run with ``parts``.

    Without ``cache`` the keys are this call's own; with one (a dict, empty at first) ``append_kv``
    keeps every layer's keys and values, so the next call feeds the new tokens only.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an integer tensor (batch, positions), got {getattr(ids, 'shape', type(ids))}")
    kind = type(model).__name__
    if kind not in _LAYERS:
        raise TypeError(f"forward runs a transformers {' or '.join(_LAYERS)}, got {kind}")
    return _LAYERS[kind](model, ids, parts, cache, torch.arange(start, start + ids.shape[1], device=ids.device))


def _attention(parts: Pieces, cache: dict | None, layer: int, q, k, v):
    """The pieces' attention: through the cache when there is one; GQA heads lined up after it."""
    if cache is not None:
        k, v = parts.append_kv(cache, layer, k, v)
    groups = q.shape[1] // k.shape[1]
    return parts.attend(q, repeat_kv(k, groups), repeat_kv(v, groups))


def _gpt2_layers(model, ids, parts, cache, positions):
    gpt = model.transformer
    x = gpt.wte.weight[ids] + gpt.wpe.weight[positions]
    maps = []
    for i, layer in enumerate(gpt.h):
        h = layer_norm(x, layer.ln_1.weight, layer.ln_1.bias, layer.ln_1.eps)
        out, probs = _attention(parts, cache, i, *project_qkv(h, layer.attn))
        x = x + project_out(out, layer.attn)
        x = x + gelu_mlp(layer_norm(x, layer.ln_2.weight, layer.ln_2.bias, layer.ln_2.eps), layer.mlp)
        maps.append(probs)
    x = layer_norm(x, gpt.ln_f.weight, gpt.ln_f.bias, gpt.ln_f.eps)
    return x @ gpt.wte.weight.T, maps


def _llama_layers(model, ids, parts, cache, positions):
    llama, config = model.model, model.config
    cos, sin = rope_cos_sin(positions, llama.rotary_emb.inv_freq, llama.rotary_emb.attention_scaling)
    x = llama.embed_tokens.weight[ids]
    maps = []
    for i, layer in enumerate(llama.layers):
        a = layer.self_attn
        h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q = parts.apply_rope(split_heads(h @ a.q_proj.weight.T, config.num_attention_heads), cos, sin)
        k = parts.apply_rope(split_heads(h @ a.k_proj.weight.T, config.num_key_value_heads), cos, sin)
        out, probs = _attention(parts, cache, i, q, k, split_heads(h @ a.v_proj.weight.T, config.num_key_value_heads))
        x = x + merge_heads(out) @ a.o_proj.weight.T
        post = layer.post_attention_layernorm
        x = x + swiglu_mlp(rms_norm(x, post.weight, post.variance_epsilon), layer.mlp)
        maps.append(probs)
    return rms_norm(x, llama.norm.weight, llama.norm.variance_epsilon) @ model.lm_head.weight.T, maps


_LAYERS = {"GPT2LMHeadModel": _gpt2_layers, "LlamaForCausalLM": _llama_layers}


def cached_logits(model: torch.nn.Module, ids: torch.Tensor, n_prompt: int, parts: Pieces = Pieces()) -> torch.Tensor:
    """The logits of each cycle of a cached run over the 1-D ``ids``: the first ``n_prompt`` tokens in
    one prefill, then one token per cycle. Row ``c`` predicts the token after position ``n_prompt - 1 + c``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got {getattr(ids, 'shape', type(ids))}")
    if not is_int(n_prompt) or not 1 <= n_prompt <= len(ids):
        raise ValueError(f"n_prompt must be an integer from 1 to len(ids) = {len(ids)}, got {n_prompt!r}")
    cache: dict = {}
    logits, _ = forward(model, ids[None, :n_prompt], parts, cache)
    rows = [logits[0, -1]]
    for pos in range(n_prompt, len(ids)):
        logits, _ = forward(model, ids[None, pos : pos + 1], parts, cache, start=pos)
        rows.append(logits[0, -1])
    return torch.stack(rows)


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``transformers``' own forward pass over ``ids`` ``(batch, T)``: the independent reference."""
    with torch.no_grad():
        return model(ids).logits.float()


def random_llama(seed: int = 0, vocab: int = 64, width: int = 64, heads: int = 4, layers: int = 2):
    """A small random Llama-style model (RoPE, RMSNorm, SwiGLU) whose weights have unit gain, so
    that attention, and with it every position's rotation, changes the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                fan_in = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else 1
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
    return model


# ------------------------------------------------------------------ the symptoms


def lookahead(maps: list[torch.Tensor]) -> float:
    """The largest attention weight any query puts on a key after its own position (0 when causal)."""
    worst = 0.0
    for probs in maps:
        future = causal_mask(probs.shape[-2], probs.shape[-1], probs.device)
        worst = max(worst, float(probs.detach().masked_fill(~future, 0).max()))
    return worst


def mean_entropy(maps: list[torch.Tensor]) -> float:
    """Mean attention entropy (nats) over layers, heads and queries: near 0 when the softmax saturates."""
    return float(torch.stack([attention_entropy(p.detach()).mean() for p in maps]).mean())


def char_tokens(text: str) -> tuple[torch.Tensor, int]:
    """``text`` as one token per character (ids in sorted order of the characters), and the vocabulary size."""
    if not isinstance(text, str) or len(set(text)) < 2:
        raise ValueError("text must be a string with at least two different characters to train on")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


def small_gpt2(vocab: int, seed: int = 0, width: int = 64, layers: int = 1, heads: int = 4, positions: int = 64):
    """A fresh, randomly initialised GPT-2 to train in a few seconds."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="eager")


def training_curve(
    parts: Pieces,
    tokens: torch.Tensor,
    vocab: int,
    steps: int = 60,
    batch: int = 32,
    length: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
) -> list[float]:
    """Train a fresh :func:`small_gpt2` on windows of the 1-D ``tokens`` with ``parts``; the loss of each step."""
    if len(tokens) <= length:
        raise ValueError(f"need more than length={length} tokens to train on, got {len(tokens)}")
    model = small_gpt2(vocab, seed, positions=length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - length, (batch,), generator=gen)
        ids = torch.stack([tokens[s : s + length] for s in starts.tolist()])
        logits, _ = forward(model, ids, parts)
        loss = parts.lm_loss(logits, ids, torch.ones_like(ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(float(loss.detach()))
    return curve


def copy_loss(loss_fn: Callable, vocab: int = 50, seed: int = 0) -> float:
    """The loss ``loss_fn`` gives a model that only copies its input (each position says its own token):
    high for a next-token loss, near 0 when the targets are not shifted."""
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    return float(loss_fn(20.0 * F.one_hot(ids, vocab).float(), ids, torch.ones_like(ids)))


def padding_shift(
    loss_fn: Callable, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, extra: int = 8, pad_id: int = 0
) -> tuple[float, float]:
    """``loss_fn`` on a padded batch, and on the same batch with ``extra`` more pad columns (random logits
    there): a loss that leaves padding out gives the same number twice."""
    gen = torch.Generator().manual_seed(len(ids))
    more_logits = torch.cat([logits, torch.randn(*logits.shape[:-2], extra, logits.shape[-1], generator=gen)], dim=-2)
    more_ids = torch.cat([ids, torch.full((ids.shape[0], extra), pad_id, dtype=ids.dtype)], dim=1)
    more_mask = torch.cat([mask, torch.zeros(ids.shape[0], extra, dtype=mask.dtype)], dim=1)
    return float(loss_fn(logits, ids, mask)), float(loss_fn(more_logits, more_ids, more_mask))


def drift_by_position(model: torch.nn.Module, ids: torch.Tensor, parts: Pieces = Pieces()) -> list[float]:
    """Largest |logit − reference| at each position of ``ids`` ``(1, T)``, the reference being ``transformers``."""
    with torch.no_grad():
        mine, _ = forward(model, ids, parts)
    return (mine[0].float() - reference_logits(model, ids)[0]).abs().amax(-1).tolist()


def faithfulness(model: torch.nn.Module, ids: torch.Tensor, n_prompt: int, parts: Pieces = Pieces()) -> list[float]:
    """The debugger's faithfulness readout, cycle by cycle: largest |logit difference| between a cached run
    over the 1-D ``ids`` and ``transformers``' full recompute of the same positions."""
    with torch.no_grad():
        mine = cached_logits(model, ids, n_prompt, parts)
    return (mine.float() - reference_logits(model, ids[None])[0, n_prompt - 1 :]).abs().amax(-1).tolist()


# ------------------------------------------------------------------ the checks


def _tiny_case(model: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model a check runs on (``model``, or a small random GPT-2) and some token ids for it."""
    if model is None:
        model = random_gpt2()
    vocab = model.get_input_embeddings().weight.shape[0]
    return model, torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(11))


def _pair_of_tensors(value, names: str) -> None:
    """Raise :class:`Failed` unless ``value`` is a pair of tensors."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(t, torch.Tensor) for t in value):
        return
    got = f"a tuple of {len(value)}" if isinstance(value, tuple) else type(value).__name__
    raise Failed(f"return the pair {names} as two tensors, got {got}")


@checker
def check_attend(fn: Callable, model: torch.nn.Module | None = None) -> str:
    """Check ``fn(q, k, v) -> (out, probs)``, causal scaled dot-product attention, inside the GPT:
    on ``model`` (e.g. ``tiny.model``; a small random GPT-2 when None) against ``transformers``."""
    model, ids = _tiny_case(model)
    with torch.no_grad():
        qkv = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0)) for _ in "qkv")
        _pair_of_tensors(call(fn, *qkv), "(out, probs)")
        logits, maps = forward(model, ids, with_piece("attend", fn))
        _, right = forward(model, ids)
    if (ahead := lookahead(maps)) > 1e-6:
        raise Failed(
            f"attention looks ahead: a query puts up to {ahead:.2f} of its weight on LATER "
            "tokens (the upper triangle of the attention map is not zero), so training loss falls too "
            "low — set the scores of keys j > i to -inf before the softmax (a causal mask)"
        )
    mine, want = mean_entropy(maps), mean_entropy(right)
    if mine < 0.8 * want:
        raise Failed(
            f"attention entropy collapses: {mine:.2f} nats against {want:.2f} for the reference — "
            "the softmax saturates on one key; divide the scores by sqrt(d), the head size"
        )
    drift = float((logits - reference_logits(model, ids)).abs().max())
    if drift > 1e-4:
        raise Failed(
            f"the logits differ from transformers' by up to {drift:.3g}: "
            "out must be softmax(q kᵀ / sqrt(d), future masked) @ v"
        )
    return "correct: no look-ahead, the entropy of the reference, and transformers' logits"


@checker
def check_lm_loss(fn: Callable) -> str:
    """Check ``fn(logits, ids, mask) -> loss``: the mean cross-entropy of position i's logits against token
    i + 1, over the targets whose ``mask`` is 1 (padding left out)."""
    gen = torch.Generator().manual_seed(2)
    logits, ids = torch.randn(3, 10, 50, generator=gen), torch.randint(1, 50, (3, 10), generator=gen)
    mask = (torch.arange(10) < torch.tensor([[10], [7], [4]])).long()
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0 where the mask is 0
    value = call(fn, logits, ids, mask)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise Failed(
            f"return the loss as a one-number tensor, got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}"
        )
    if (copier := copy_loss(fn)) < 1.0:
        raise Failed(
            f"the loss is too good: a model that copies its input scores {copier:.2f} — "
            "the targets are not shifted; the logits at position i predict token i + 1"
        )
    before, after = padding_shift(fn, logits, ids, mask)
    if abs(before - after) > 1e-4:
        raise Failed(
            f"the loss changes with the amount of padding ({before:.3f} → {after:.3f} with 8 more "
            "pad tokens): pad targets count — average over the targets whose mask is 1"
        )
    want = float(lm_loss(logits, ids, mask))
    if abs(float(value) - want) > 1e-4:
        raise Failed(
            f"the loss should be {want:.4f}, got {float(value):.4f}: the mean cross-entropy "
            "of logits[:, :-1] against ids[:, 1:], over unpadded targets"
        )
    return "correct: next-token targets, padding left out, whatever its amount"


@checker
def check_apply_rope(fn: Callable, model: torch.nn.Module | None = None) -> str:
    """Check ``fn(x, cos, sin) -> x``, the rotary embedding of q or k, inside the GPT: on ``model`` (a
    small random Llama when None) against ``transformers``, position by position."""
    model = model if model is not None else random_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    cos, sin = rope_cos_sin(torch.arange(4), model.model.rotary_emb.inv_freq)
    x = torch.randn(1, 2, 4, cos.shape[-1], generator=torch.Generator().manual_seed(6))
    value = call(fn, x, cos, sin)
    if not isinstance(value, torch.Tensor) or value.shape != x.shape:
        raise Failed(f"return the rotated x, a tensor of x's shape {tuple(x.shape)}")
    drift = drift_by_position(model, ids, with_piece("apply_rope", fn))
    if max(drift) <= 1e-4:
        return "correct: every position matches transformers — pairs (i, i + d/2), turned by the table"
    if not drift[0] <= 1e-4:  # position 0 reads only itself: no rotation can move it, but NaN can
        raise Failed(
            f"the outputs differ from the reference at every position ({drift[0]:.3g} at position 0): "
            "x * cos + rotate_half(x) * sin"
        )
    worst = max(range(len(drift)), key=drift.__getitem__)
    symptom = (
        f"the outputs match the reference at position 0 and drift after it (up to {drift[worst]:.2f} at "
        f"position {worst})"
    )
    if torch.allclose(value, apply_rope(x, cos, -sin), atol=1e-5):
        raise Failed(f"{symptom}: the rotation turns the wrong way — x * cos + rotate_half(x) * sin")
    raise Failed(
        f"{symptom}: the rotation pairs the wrong dimensions — the cos/sin tables are laid out for "
        "pairs (i, i + d/2), the pairing of rotate_half"
    )


@checker
def check_append_kv(fn: Callable, model: torch.nn.Module | None = None) -> str:
    """Check ``fn(cache, layer, k, v) -> (keys, values)``, the KV cache, inside the GPT: a cached run on
    ``model`` (a small random GPT-2 when None) against ``transformers``' full recompute, cycle by cycle."""
    model, ids = _tiny_case(model)
    k = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(8))
    _pair_of_tensors(call(fn, {}, 0, k, k.clone()), "(keys, values)")
    readout = faithfulness(model, ids[0], 4, with_piece("append_kv", fn))
    if max(readout) <= 1e-4:
        return "correct: the cached run matches the full recompute at every cycle"
    first_bad = next(c for c, d in enumerate(readout) if d > 1e-4)
    where = "after its first cycle" if first_bad else "from its first cycle on"
    raise Failed(
        f"the cached run drifts from a full recompute {where} (faithfulness {max(readout):.2f}, "
        f"first at cycle {first_bad}): each cycle must store its keys and values in the cache "
        "exactly once and return all of them so far"
    )


#: The check of each piece, by piece name.
CHECKS: dict[str, Callable[..., Result]] = {
    "attend": check_attend,
    "lm_loss": check_lm_loss,
    "apply_rope": check_apply_rope,
    "append_kv": check_append_kv,
}

__all__ = [
    "BUGS",
    "Bug",
    "CHECKS",
    "Pieces",
    "append_kv",
    "cached_logits",
    "char_tokens",
    "check_append_kv",
    "check_apply_rope",
    "check_attend",
    "check_lm_loss",
    "copy_loss",
    "drift_by_position",
    "faithfulness",
    "forward",
    "lm_loss",
    "lookahead",
    "mean_entropy",
    "padding_shift",
    "pieces",
    "random_llama",
    "reference_logits",
    "small_gpt2",
    "training_curve",
    "with_piece",
]
