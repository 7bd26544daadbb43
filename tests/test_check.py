"""Every exercise check, tried the way learners answer: typical wrong answers are rejected with
the hint that names their mistake, equivalent correct answers are accepted, and no answer at all
(wrong types, shapes, dtypes, exceptions) makes a checker raise.

Each table row is (id, the learner's function, a keyword the hint must contain). Correct answers
are written independently of the package where possible (loops, other formulas, float64,
``torch.nn.functional``), so a checker that compares against itself would not pass them.
"""

from __future__ import annotations

import cmath
import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from cyclelab import checks as check
from cyclelab.checks import Result
from cyclelab.checks.robustness import swap_reference
from cyclelab.core.sampling import top_p_filter
from cyclelab.lab.attention_heads import scaled_dot_product_attention
from cyclelab.lab.forward_by_hand import gelu_mlp, layer_norm, rms_norm, self_attention

# --- chapter 00: greedy step -------------------------------------------------------------------------


def greedy(z):
    p = torch.softmax(z, -1)
    return int(p.argmax()), float(p.max())


def greedy_by_hand(z):
    values = [float(v) for v in z]
    best = max(range(len(values)), key=values.__getitem__)
    total = sum(math.exp(v - values[best]) for v in values)
    return best, 1 / total


def greedy_naive(z):
    e = torch.exp(z)
    return int(z.argmax()), float((e / e.sum())[z.argmax()])


def greedy_in_place(z):
    z -= z.max()
    return greedy(z)


GREEDY_RIGHT = [greedy, greedy_by_hand, lambda z: greedy(z.double())]
GREEDY_WRONG = [
    ("argmin", lambda z: (int(z.argmin()), 0.5), "argmax"),
    ("the logit", lambda z: (int(z.argmax()), float(z.max())), "softmax"),
    ("overflow", greedy_naive, "maximum"),
    ("log-softmax", lambda z: (int(z.argmax()), float(torch.log_softmax(z, -1).max())), "LOG-probability"),
    ("swapped pair", lambda z: greedy(z)[::-1], "wrong way round"),
    ("probability vector", lambda z: (int(z.argmax()), torch.softmax(z, -1)), "ONE number"),
    ("not normalised", lambda z: (int(z.argmax()), float(torch.exp(z.max()))), "normalis"),
    ("two tokens only", lambda z: (int(z.argmax()), float(torch.softmax(z.topk(2).values, -1)[0])), "ALL tokens"),
    ("in place", greedy_in_place, "in place"),
    ("raises", lambda z: z.nope, "AttributeError"),
]

# --- chapter 01: BPE merge step and pair counts -----------------------------------------------------


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_recursive(ids, pair, new_id):
    if len(ids) < 2:
        return list(ids)
    if tuple(ids[:2]) == pair:
        return [new_id] + merge_recursive(ids[2:], pair, new_id)
    return [ids[0]] + merge_recursive(ids[1:], pair, new_id)


def merge_no_skip(ids, pair, new_id):
    return [new_id if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair else x for i, x in enumerate(ids)]


def merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2 :]
    return list(ids)


def merge_as_string(ids, pair, new_id):
    return [int(t) for t in " ".join(map(str, ids)).replace(f"{pair[0]} {pair[1]}", str(new_id)).split()]


def merge_overlap(ids, pair, new_id):  # finds all positions first, then merges each
    out, i = [], 0
    found = {i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) == pair}
    while i < len(ids):
        if i in found:
            out.append(new_id)
            i += 1 if i + 1 in found else 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_drops_last(ids, pair, new_id):
    out, skip = [], False
    for a, b in zip(ids, ids[1:]):
        if skip:
            skip = False
        elif (a, b) == pair:
            out.append(new_id)
            skip = True
        else:
            out.append(a)
    return out


def merge_in_place(ids, pair, new_id):
    ids[:] = merge(ids, pair, new_id)
    return ids


MERGE_RIGHT = [merge, merge_recursive]
MERGE_WRONG = [
    ("no skip", merge_no_skip, "second token"),
    ("first only", merge_first_only, "only the first"),
    ("reversed", lambda ids, pair, new_id: merge(ids, pair[::-1], new_id), "wrong way round"),
    ("digits of a string", merge_as_string, "digits of a string"),
    ("nothing merged", lambda ids, pair, new_id: list(ids), "nothing was merged"),
    ("overlapping merges", merge_overlap, "one token was used by two merges"),
    ("from the right", lambda ids, pair, new_id: merge(ids[::-1], pair[::-1], new_id)[::-1], "merged from the right"),
    ("drops the last token", merge_drops_last, "last token went missing"),
    ("in place", merge_in_place, "input list"),
    ("returns None", lambda ids, pair, new_id: None, "None"),
    ("raises", lambda ids, pair, new_id: ids[len(ids)], "IndexError"),
]


def pairs_by_hand(ids):
    counts = {}
    for a, b in zip(ids, ids[1:]):
        counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def pairs_first_raises(ids):
    if len(ids) < 2:
        raise ValueError("too short")
    return pairs_by_hand(ids)


COUNT_RIGHT = [lambda ids: dict(Counter(zip(ids, ids[1:]))), pairs_by_hand]
COUNT_WRONG = [
    ("nothing counted", lambda ids: {}, "nothing was counted"),
    (
        "one pair too few",
        lambda ids: dict(Counter((ids[i], ids[i + 1]) for i in range(max(1, len(ids) - 1)))),
        "no pairs",
    ),
    ("every other pair", lambda ids: dict(Counter(zip(ids[::2], ids[1::2]))), "every other"),
    ("last pair missing", lambda ids: dict(Counter(zip(ids[:-1], ids[1:-1]))), "last pair"),
    ("counted once", lambda ids: {p: 1 for p in zip(ids, ids[1:])}, "counted once"),
    ("unordered", lambda ids: dict(Counter(tuple(sorted(p)) for p in zip(ids, ids[1:]))), "ordered"),
    ("raises on short lists", pairs_first_raises, "fewer than two"),
    ("a list", lambda ids: list(zip(ids, ids[1:])), "dict"),
    ("string keys", lambda ids: {f"{a},{b}": 1 for a, b in zip(ids, ids[1:])}, "keys must be pairs"),
]


def encode_gpt2(word, ranks):  # GPT-2's encoder.py: the lowest-ranked pair, every occurrence at once
    word = list(word)
    while len(word) > 1:
        best = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        word = merge(word, best, best[0] + best[1])
    return word


def encode_merge_by_merge(word, ranks):  # every merge in the order learned, each applied everywhere
    for pair in sorted(ranks, key=ranks.get):
        word = merge(list(word), pair, pair[0] + pair[1])
    return list(word)


def encode_greedy(word, ranks, pick=min, glue=lambda a, b: a + b, once=False):
    parts = list(word)
    while True:
        known = [i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) in ranks]
        if not known:
            return parts
        i = pick(known, key=lambda i: ranks[parts[i], parts[i + 1]])
        parts[i : i + 2] = [glue(parts[i], parts[i + 1])]
        if once:
            return parts


def encode_longest_match(word, ranks):
    known, pieces, i = set(word) | {a + b for a, b in ranks}, [], 0
    while i < len(word):
        j = next(j for j in range(len(word), i, -1) if "".join(word[i:j]) in known or j == i + 1)
        pieces.append("".join(word[i:j]))
        i = j
    return pieces


def encode_first_occurrence(word, ranks):
    parts = list(word)
    for a, b in sorted(ranks, key=ranks.get):
        for i in range(len(parts) - 1):
            if (parts[i], parts[i + 1]) == (a, b):
                parts[i : i + 2] = [a + b]
                break
    return parts


def encode_in_place(word, ranks):
    word[:] = encode_gpt2(word, ranks)
    return word


APPLY_RIGHT = [encode_gpt2, encode_merge_by_merge, encode_greedy]
APPLY_WRONG = [
    ("nothing merged", lambda word, ranks: list(word), "nothing was merged"),
    ("one merge only", lambda word, ranks: encode_greedy(word, ranks, once=True), "stopped after one merge"),
    ("leftmost first", lambda word, ranks: encode_greedy(word, ranks, pick=lambda known, key: known[0]), "leftmost"),
    ("highest rank first", lambda word, ranks: encode_greedy(word, ranks, pick=max), "HIGHEST rank"),
    ("glued backwards", lambda word, ranks: encode_greedy(word, ranks, glue=lambda a, b: b + a), "wrong way round"),
    ("first occurrence only", encode_first_occurrence, "only the first occurrence"),
    ("WordPiece's longest match", encode_longest_match, "WordPiece"),
    ("one string", lambda word, ranks: "".join(encode_gpt2(word, ranks)), "not one string"),
    ("in place", encode_in_place, "input list"),
    ("raises", lambda word, ranks: ranks[word[0]], "KeyError"),
]

# --- chapter 02: embedding lookup and RoPE -----------------------------------------------------------


def lookup_in_place(w, ids):
    w[0] = 0
    return w[ids]


EMBED_RIGHT = [
    lambda w, ids: w[ids],
    lambda w, ids: F.one_hot(ids, w.shape[0]).to(w.dtype) @ w,
    lambda w, ids: F.embedding(ids, w),
    lambda w, ids: w.index_select(0, ids.reshape(-1)).reshape(*ids.shape, w.shape[1]),
]
EMBED_WRONG = [
    ("columns", lambda w, ids: w[:, ids], "COLUMNS"),
    ("transposed", lambda w, ids: w.T[ids], "weight.T"),
    ("one row early", lambda w, ids: w[(ids - 1).clamp(min=0)], "too early"),
    ("one-hot", lambda w, ids: F.one_hot(ids, w.shape[0]).float(), "one-hot"),
    ("flattened", lambda w, ids: w[ids.flatten()], "ids.shape"),
    ("zeros", lambda w, ids: torch.zeros(*ids.shape, w.shape[1]), "zeros"),
    ("in place", lookup_in_place, "in place"),
]


def rope(x, y, position, freq):
    a = position * freq
    return x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)


def rope_complex(x, y, position, freq):
    z = complex(x, y) * cmath.exp(1j * position * freq)
    return z.real, z.imag


ROPE_RIGHT = [rope, rope_complex]
ROPE_WRONG = [
    ("clockwise", lambda x, y, p, f: rope(x, y, -p, f), "wrong way"),
    ("no position", lambda x, y, p, f: rope(x, y, 1, f), "grow with the position"),
    ("degrees", lambda x, y, p, f: rope(x, y, 1, math.radians(p * f)), "radians"),
    ("swapped", lambda x, y, p, f: rope(x, y, p, f)[::-1], "swapped"),
    ("unchanged", lambda x, y, p, f: (x, y), "unchanged"),
    (
        "sign",
        lambda x, y, p, f: (x * math.cos(p * f) + y * math.sin(p * f), x * math.sin(p * f) + y * math.cos(p * f)),
        "sign",
    ),
    (
        "two angles",
        lambda x, y, p, f: (x * math.cos(p * f) - y * math.sin(p * f), x * math.sin(p) + y * math.cos(p)),
        "length",
    ),
    ("raises", lambda x, y, p, f: 1 / 0, "ZeroDivisionError"),
]


def pool_loop(hidden, mask):
    return torch.stack([h[row.bool()].mean(0) for h, row in zip(hidden, mask)])


def pool_einsum(hidden, mask):
    m = mask.to(hidden.dtype)
    return torch.einsum("bt,btw->bw", m, hidden) / m.sum(1, keepdim=True)


def pool_in_place(hidden, mask):
    hidden *= mask.unsqueeze(-1)
    return hidden.sum(1) / mask.sum(1, keepdim=True)


def pool_sum(hidden, mask):
    return (hidden * mask.unsqueeze(-1)).sum(1)


POOL_RIGHT = [pool_loop, pool_einsum, lambda h, m: (h * m[..., None]).sum(1) / m.sum(-1, keepdim=True)]
POOL_WRONG = [
    ("padding included", lambda h, m: h.mean(1), "padding was averaged in"),
    ("sum", pool_sum, "returned the sum"),
    ("padded length", lambda h, m: pool_sum(h, m) / h.shape[1], "padded length"),
    ("batch count", lambda h, m: pool_sum(h, m) / m.sum(), "whole batch"),
    ("normalized", lambda h, m: F.normalize(pool_loop(h, m), dim=-1), "length 1"),
    ("first token", lambda h, m: h[:, 0], "[CLS]"),
    ("batch axis", lambda h, m: h.mean(0), "dim 0"),
    ("width axis", lambda h, m: (h * m.unsqueeze(-1)).mean(-1), "width"),
    ("in place", pool_in_place, "in place"),
    ("mask not broadcast", lambda h, m: (h * m).sum(1), "broadcast"),
]

# --- chapter 03: causal attention --------------------------------------------------------------------


def attention(q, k, v, scale=True, causal=True, axis=-1):
    scores = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) if scale else 1)
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, axis) @ v


def attention_by_rows(q, k, v):
    rows = []
    for i in range(q.shape[-2]):  # query i reads keys 0..i
        w = torch.softmax(q[..., i : i + 1, :] @ k[..., : i + 1, :].transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        rows.append(w @ v[..., : i + 1, :])
    return torch.cat(rows, -2)


def attention_in_place(q, k, v):
    q /= math.sqrt(q.shape[-1])
    return attention(q, k, v, scale=False)


def attention_zeroed_after(q, k, v):
    t = q.shape[-2]
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return w.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v


ATTENTION_RIGHT = [
    attention,
    attention_by_rows,
    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
]
ATTENTION_WRONG = [
    ("no mask", lambda q, k, v: attention(q, k, v, causal=False), "future"),
    ("no scale", lambda q, k, v: attention(q, k, v, scale=False), "sqrt(d)"),
    ("divided by d", lambda q, k, v: attention(q / math.sqrt(q.shape[-1]), k, v), "instead of sqrt(d)"),
    ("wrong axis", lambda q, k, v: attention(q, k, v, axis=-2), "wrong axis"),
    ("zeroed after softmax", attention_zeroed_after, "sum to 1"),
    ("mixes keys", lambda q, k, v: attention(q, k, k), "KEYS"),
    ("transposed scores", lambda q, k, v: attention(k, q, v), "transposed"),
    ("in place", attention_in_place, "in place"),
    (
        "the weights",
        lambda q, k, v: attention(q, k, torch.eye(q.shape[-2]).expand(*q.shape[:-1], q.shape[-2])),
        "attention weights",
    ),
    ("a tuple", lambda q, k, v: (attention(q, k, v), None), "tuple"),
]


def decode_step(q, k, v, k_cache, v_cache):
    keys, values = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ values


def decode_step_by_loop(q, k, v, k_cache, v_cache):
    """Key by key in float64: exp(score) / total, then the weighted sum of the values."""
    keys = [k_cache[..., j, :] for j in range(k_cache.shape[-2])] + [k[..., 0, :]]
    values = [v_cache[..., j, :] for j in range(v_cache.shape[-2])] + [v[..., 0, :]]
    scores = torch.stack([(q[..., 0, :].double() * key.double()).sum(-1) / q.shape[-1] ** 0.5 for key in keys])
    weights = torch.exp(scores - scores.max(0).values)
    weights = weights / weights.sum(0)
    return sum(w[..., None] * val.double() for w, val in zip(weights, values))[..., None, :]


def decode_step_by_recomputation(q, k, v, k_cache, v_cache):
    """The engine's helper on the whole sequence's keys and values: one query, no mask needed."""
    return scaled_dot_product_attention(q, torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2))[0]


def decode_step_in_place(q, k, v, k_cache, v_cache):
    q *= 1.0 / math.sqrt(q.shape[-1])
    keys, values = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return torch.softmax(q @ keys.transpose(-1, -2), -1) @ values


def _decode_with(keys_of, values_of, scale=None, dim=-1):
    def fn(q, k, v, k_cache, v_cache):
        keys, values = keys_of(k, v, k_cache, v_cache), values_of(k, v, k_cache, v_cache)
        s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale(q.shape[-1])
        return torch.softmax(q @ keys.transpose(-1, -2) * s, dim) @ values

    return fn


def _all_keys(k, v, kc, vc):
    return torch.cat([kc, k], -2)


def _all_values(k, v, kc, vc):
    return torch.cat([vc, v], -2)


DECODE_RIGHT = [
    decode_step,
    decode_step_by_loop,
    decode_step_by_recomputation,
    lambda q, k, v, kc, vc: F.scaled_dot_product_attention(q, torch.cat([k, kc], -2), torch.cat([v, vc], -2)),
]
DECODE_WRONG = [
    ("cache only", _decode_with(lambda k, v, kc, vc: kc, lambda k, v, kc, vc: vc), "did not read itself"),
    ("new position only", _decode_with(lambda k, v, kc, vc: k, lambda k, v, kc, vc: v), "only its own value"),
    (
        "mask of position 0",
        lambda q, k, v, kc, vc: F.scaled_dot_product_attention(
            q, torch.cat([kc, k], -2), torch.cat([vc, v], -2), is_causal=True
        ),
        "mask of position 0",
    ),
    ("no scale", _decode_with(_all_keys, _all_values, scale=lambda d: 1.0), "sqrt(d)"),
    ("divided by d", _decode_with(_all_keys, _all_values, scale=lambda d: 1 / d), "instead of sqrt(d)"),
    ("wrong axis", _decode_with(_all_keys, _all_values, dim=-2), "wrong axis"),
    ("mixes keys", _decode_with(_all_keys, _all_keys), "KEYS"),
    ("scores against values", _decode_with(_all_values, _all_values), "against the VALUES"),
    (
        "keys and values out of step",
        _decode_with(_all_keys, lambda k, v, kc, vc: torch.cat([v, vc], -2)),
        "out of step",
    ),
    ("the weights", lambda q, k, v, kc, vc: torch.softmax(q @ torch.cat([kc, k], -2).transpose(-1, -2), -1), "weights"),
    ("squeezed", lambda q, k, v, kc, vc: decode_step(q, k, v, kc, vc)[..., 0, :], "one new position"),
    ("in place", decode_step_in_place, "in place"),
]


# --- chapter 04: a transformer block ------------------------------------------------------------------


def ln(x, norm):
    return layer_norm(x, norm.weight, norm.bias, norm.eps)


def block(x, layer):
    x = x + self_attention(ln(x, layer.ln_1), layer.attn)
    return x + gelu_mlp(ln(x, layer.ln_2), layer.mlp)


def block_by_torch(x, layer):
    """The same block from torch's own layer_norm and transformers' modules, given a causal mask."""
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    h = F.layer_norm(x, x.shape[-1:], layer.ln_1.weight, layer.ln_1.bias, layer.ln_1.eps)
    x = x + layer.attn(h, attention_mask=mask)[0]
    return x + layer.mlp(F.layer_norm(x, x.shape[-1:], layer.ln_2.weight, layer.ln_2.bias, layer.ln_2.eps))


def block_maskless(x, layer):
    """transformers' modules called without the causal mask their model would build."""
    x = x + layer.attn(layer.ln_1(x))[0]
    return x + layer.mlp(layer.ln_2(x))


def block_in_place(x, layer):
    x += self_attention(ln(x, layer.ln_1), layer.attn)
    return x + gelu_mlp(ln(x, layer.ln_2), layer.mlp)


BLOCK_RIGHT = [block, block_by_torch]
BLOCK_WRONG = [
    (
        "no attention residual",
        lambda x, L: (lambda a: a + gelu_mlp(ln(a, L.ln_2), L.mlp))(self_attention(ln(x, L.ln_1), L.attn)),
        "attention result replaced the stream",
    ),
    (
        "no MLP residual",
        lambda x, L: gelu_mlp(ln(x + self_attention(ln(x, L.ln_1), L.attn), L.ln_2), L.mlp),
        "MLP result replaced the stream",
    ),
    (
        "post-norm",
        lambda x, L: (lambda a: ln(a + gelu_mlp(a, L.mlp), L.ln_2))(ln(x + self_attention(x, L.attn), L.ln_1)),
        "after the residual add",
    ),
    (
        "swapped norms",
        lambda x, L: (lambda a: a + gelu_mlp(ln(a, L.ln_1), L.mlp))(x + self_attention(ln(x, L.ln_2), L.attn)),
        "swapped",
    ),
    (
        "parallel",
        lambda x, L: x + self_attention(ln(x, L.ln_1), L.attn) + gelu_mlp(ln(x, L.ln_2), L.mlp),
        "BEFORE attention wrote",
    ),
    ("no MLP", lambda x, L: x + self_attention(ln(x, L.ln_1), L.attn), "MLP sublayer is missing"),
    ("not causal", block_maskless, "not causal"),
    ("in place", block_in_place, "in place"),
    ("identity", lambda x, L: x, "unchanged"),
]


def layer_norm_two_lines(x, weight, bias, eps):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def layer_norm_by_loop(x, weight, bias, eps):
    """One vector at a time, in float64 Python arithmetic."""
    rows = x.reshape(-1, x.shape[-1]).double().tolist()
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        var = sum((a - mean) ** 2 for a in row) / len(row)
        out.append([(a - mean) / math.sqrt(var + eps) * float(w) + float(b) for a, w, b in zip(row, weight, bias)])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def layer_norm_in_place(x, weight, bias, eps):
    x -= x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


def _ln(x, weight, bias, eps, unbiased=False, eps_out=False, centre=True):
    c = x - x.mean(-1, keepdim=True) if centre else x
    sd = x.var(-1, unbiased=unbiased, keepdim=True)
    return c / (torch.sqrt(sd) + eps if eps_out else torch.sqrt(sd + eps)) * weight + bias


def layer_norm_module(x, weight, bias, eps):
    """torch's own LayerNorm module, given the weight and bias."""
    norm = torch.nn.LayerNorm(x.shape[-1], eps=eps, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        return norm(x)


LAYER_NORM_RIGHT = [layer_norm_two_lines, layer_norm_by_loop, layer_norm, layer_norm_module]
LAYER_NORM_WRONG = [
    ("unbiased variance", lambda x, w, b, eps: _ln(x, w, b, eps, unbiased=True), "n − 1"),
    ("no eps", lambda x, w, b, eps: _ln(x, w, b, 0.0), "eps is missing"),
    ("eps outside the root", lambda x, w, b, eps: _ln(x, w, b, eps, eps_out=True), "inside the square root"),
    ("not centred", lambda x, w, b, eps: _ln(x, w, b, eps, centre=False), "RMSNorm"),
    ("no gain, no bias", lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], eps=eps), "gain and bias are missing"),
    ("no bias", lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, None, eps), "bias is missing"),
    ("bias before gain", lambda x, w, b, eps: (F.layer_norm(x, x.shape[-1:], eps=eps) + b) * w, "before the gain"),
    (
        "wrong axis",
        lambda x, w, b, eps: (
            _ln(x.transpose(-1, -2), 1.0, 0.0, eps).transpose(-1, -2) * w + b if x.dim() > 1 else _ln(x, w, b, eps)
        ),
        "wrong axis",
    ),
    ("reduced", lambda x, w, b, eps: x.mean(-1), "keeps the shape"),
    ("in place", layer_norm_in_place, "in place"),
]


def rms_norm_two_lines(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_norm_llama_module(x, weight, eps):
    """transformers' own LlamaRMSNorm, given the weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _rms(x, weight, eps, root=True, total=False, eps_out=False):
    ms = x.pow(2).sum(-1, keepdim=True) if total else x.pow(2).mean(-1, keepdim=True)
    if eps_out:
        return x / (torch.sqrt(ms) + eps) * weight
    return x / (torch.sqrt(ms + eps) if root else ms + eps) * weight


RMS_NORM_RIGHT = [
    rms_norm_two_lines,
    rms_norm,
    rms_norm_llama_module,
    lambda x, w, eps: x * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w,
]
RMS_NORM_WRONG = [
    ("centred", lambda x, w, eps: F.layer_norm(x, x.shape[-1:], eps=eps) * w, "subtracted the mean"),
    ("sum of squares", lambda x, w, eps: _rms(x, w, eps, total=True), "SUM of squares"),
    ("no square root", lambda x, w, eps: _rms(x, w, eps, root=False), "mean square"),
    ("no eps", lambda x, w, eps: _rms(x, w, 0.0), "eps is missing"),
    ("eps after the root", lambda x, w, eps: _rms(x, w, eps, eps_out=True), "inside"),
    ("no gain", lambda x, w, eps: _rms(x, 1.0, eps), "gain is missing"),
    ("Gemma's 1 + weight", lambda x, w, eps: _rms(x, 1 + w, eps), "Gemma"),
    ("mean absolute value", lambda x, w, eps: x / (x.abs().mean(-1, keepdim=True) + eps) * w, "ABSOLUTE"),
    (
        "wrong axis",
        lambda x, w, eps: (
            (x.transpose(-1, -2) / torch.sqrt(x.transpose(-1, -2).pow(2).mean(-1, keepdim=True) + eps)).transpose(
                -1, -2
            )
            * w
            if x.dim() > 1
            else _rms(x, w, eps)
        ),
        "wrong axis",
    ),
]


# --- chapter 05: top-p and masked prediction ------------------------------------------------------------


def top_p(z, p):
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    before = probs[order].cumsum(-1) - probs[order]
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= p)
    return z.masked_fill(drop, -math.inf)


def top_p_by_loop(z, p):
    probs = torch.softmax(z.double(), -1).tolist()
    out, mass = torch.full_like(z, -math.inf), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= p:
            break
        out[i], mass = z[i], mass + probs[i]
    return out


def top_p_gather(z, p):
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    ranked = z[order]
    before = probs[order].cumsum(-1) - probs[order]
    return ranked.masked_fill(before >= p, -math.inf).gather(-1, order)


def top_p_in_place(z, p):
    kept = top_p(z, p)
    z.copy_(kept)
    return kept


def top_p_keep(z, p, rule):
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, rule(probs[order].cumsum(-1), probs[order]))
    return z.masked_fill(~keep, -math.inf)


TOP_P_RIGHT = [top_p, top_p_by_loop, top_p_filter]
TOP_P_WRONG = [
    (
        "one too many",
        lambda z, p: top_p_keep(z, p, lambda c, r: torch.cat([torch.tensor([True, True]), (c < p)[:-2]])),
        "after the cumulative probability passed p",
    ),
    (
        "crossing token dropped",
        lambda z, p: top_p_keep(z, p, lambda c, r: (c <= p) | (torch.arange(len(c)) == 0)),
        "the token that crosses p",
    ),
    (
        "best dropped",
        lambda z, p: top_p(z, p) if float(torch.softmax(z, -1).max()) <= p else torch.full_like(z, -math.inf),
        "most likely token was dropped",
    ),
    ("probabilities", lambda z, p: torch.softmax(z, -1).masked_fill(top_p(z, p).isinf(), -math.inf), "probabilities"),
    ("zeros", lambda z, p: torch.where(top_p(z, p).isinf(), torch.zeros_like(z), z), "-inf"),
    ("sorted order", lambda z, p: top_p(z, p).sort(descending=True).values, "sorted order"),
    ("gather", top_p_gather, "gather"),
    (
        "ascending",
        lambda z, p: (
            lambda pr, o: z.masked_fill(
                torch.zeros_like(pr, dtype=torch.bool).scatter(-1, o, pr[o].cumsum(-1) > p), -math.inf
            )
        )(torch.softmax(z, -1), torch.argsort(torch.softmax(z, -1))),
        "DESCENDING",
    ),
    ("in place", top_p_in_place, "in place"),
]


def masked(model, ids, position, mask_id):
    ids = list(ids)
    ids[position] = mask_id
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, position], -1)
    return int(probs.argmax()), float(probs.max())


def masked_by_log(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1 :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits.double(), -1)[0, position]
    return int(logp.argmax()), math.exp(float(logp.max()))


def masked_mutating(model, ids, position, mask_id):
    ids[position] = mask_id
    return masked(model, ids, position, mask_id)


def masked_flat_argmax(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1 :]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return int(logits.argmax()), float(torch.softmax(logits[position], -1).max())


def masked_logits_of(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1 :]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, position]


MASKED_RIGHT = [masked, masked_by_log]
MASKED_WRONG = [
    ("unmasked", lambda m, ids, pos, mid: masked(m, ids, pos, ids[pos]), "saw the answer"),
    (
        "one early",
        lambda m, ids, pos, mid: (lambda z: (int(z[max(pos - 1, 0)].argmax()), 0.5))(
            masked_logits_all(m, ids, pos, mid)
        ),
        "one position",
    ),
    (
        "the logit",
        lambda m, ids, pos, mid: (lambda z: (int(z.argmax()), float(z.max())))(masked_logits_of(m, ids, pos, mid)),
        "logit",
    ),
    (
        "log-probability",
        lambda m, ids, pos, mid: (lambda z: (int(z.argmax()), float(torch.log_softmax(z, -1).max())))(
            masked_logits_of(m, ids, pos, mid)
        ),
        "LOG-probability",
    ),
    ("mutates ids", masked_mutating, "caller's list"),
    ("flat argmax", masked_flat_argmax, "you returned the argmax index of the whole sequence"),
    (
        "probability vector",
        lambda m, ids, pos, mid: (lambda z: (int(z.argmax()), torch.softmax(z, -1)))(
            masked_logits_of(m, ids, pos, mid)
        ),
        "ONE number",
    ),
]


def masked_logits_all(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1 :]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def ppl_cross_entropy(logits, ids):
    return F.cross_entropy(logits[:-1], ids[1:]).exp().item()


def ppl_by_loop(logits, ids):
    total = 0.0
    for i in range(len(ids) - 1):
        row = [float(v) for v in logits[i]]
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        total += log_z - row[int(ids[i + 1])]
    return math.exp(total / (len(ids) - 1))


def ppl_tensor(logits, ids):  # a 0-d tensor is one number too
    logp = torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None])
    return torch.exp(-logp.mean())


def ppl_nlls(logits, ids, shift=1):
    """Per-token NLLs with logits[i] against ids[i + shift] (shift 0: no shift, -1: the wrong way)."""
    logp = torch.log_softmax(logits.double(), -1)
    rows, targets = (logp[:-1], ids[1:]) if shift == 1 else (logp, ids) if shift == 0 else (logp[1:], ids[:-1])
    return -rows.gather(-1, targets[:, None])[:, 0]


PERPLEXITY_RIGHT = [ppl_cross_entropy, ppl_by_loop, ppl_tensor]
PERPLEXITY_WRONG = [
    ("no exp", lambda z, ids: float(ppl_nlls(z, ids).mean()), "exp of it"),
    ("no shift", lambda z, ids: math.exp(float(ppl_nlls(z, ids, shift=0).mean())), "NEXT token"),
    ("shift the wrong way", lambda z, ids: math.exp(float(ppl_nlls(z, ids, shift=-1).mean())), "other way"),
    ("sum", lambda z, ids: math.exp(min(float(ppl_nlls(z, ids).sum()), 700)), "MEAN"),
    ("all positions", lambda z, ids: math.exp(float(ppl_nlls(z, ids).sum()) / len(ids)), "n - 1"),
    (
        "raw logits",
        lambda z, ids: math.exp(min(-float(z[:-1].double().gather(-1, ids[1:, None]).mean()), 700)),
        "log_softmax",
    ),
    (
        "probabilities",
        lambda z, ids: math.exp(-float(torch.softmax(z.double(), -1)[:-1].gather(-1, ids[1:, None]).mean())),
        "LOG-probabilities",
    ),
    ("no minus", lambda z, ids: math.exp(-float(ppl_nlls(z, ids).mean())), "minus sign"),
    ("mean of exp", lambda z, ids: float(ppl_nlls(z, ids).exp().mean()), "geometric mean"),
    ("base 2", lambda z, ids: 2 ** float(ppl_nlls(z, ids).mean()), "bits"),
    (
        "argmax",
        lambda z, ids: math.exp(-float(torch.log_softmax(z.double(), -1)[:-1].max(-1).values.mean())),
        "actually comes next",
    ),
    ("a vector", lambda z, ids: ppl_nlls(z, ids).exp(), "ONE number"),
]


def test_perplexity_check_uses_transformers_loss_on_tiny(tiny):
    assert check.check_perplexity(ppl_cross_entropy, tiny)
    result = check.check_perplexity(lambda z, ids: ppl_cross_entropy(z, ids) * 1.01, tiny)
    assert not result and "perplexity is" in result.message


# --- chapter 06: LoRA's forward ------------------------------------------------------------------------


def lora_in_place(x, W, A, B, alpha, r):
    W += A @ B * alpha / r
    return x @ W


LORA_RIGHT = [
    lambda x, W, A, B, alpha, r: x @ W + (x @ A) @ B * alpha / r,
    lambda x, W, A, B, alpha, r: x @ (W + A @ B * (alpha / r)),  # merged: the same map
    lambda x, W, A, B, alpha, r: x.double() @ W.double() + x.double() @ A.double() @ B.double() * alpha / r,
]
LORA_WRONG = [
    ("frozen only", lambda x, W, A, B, alpha, r: x @ W, "frozen layer alone"),
    ("update only", lambda x, W, A, B, alpha, r: x @ A @ B * alpha / r, "only the low-rank"),
    ("unscaled", lambda x, W, A, B, alpha, r: x @ W + x @ A @ B, "not scaled"),
    ("upside down", lambda x, W, A, B, alpha, r: x @ W + x @ A @ B * r / alpha, "upside down"),
    ("floor division", lambda x, W, A, B, alpha, r: x @ W + x @ A @ B * (alpha // r), "floor division"),
    ("alpha alone", lambda x, W, A, B, alpha, r: x @ W + x @ A @ B * alpha, "alpha alone"),
    ("subtracted", lambda x, W, A, B, alpha, r: x @ W - x @ A @ B * alpha / r, "subtracted"),
    ("in place", lora_in_place, "in place"),
    ("raises", lambda x, W, A, B, alpha, r: x @ B, "matrix shapes do not fit"),
]


def step_by_hand(model, ids, optimizer, scheduler, clip):
    logits = model(ids).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def step_with_labels(model, ids, optimizer, scheduler, clip):
    loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def step_log_softmax(model, ids, optimizer, scheduler, clip):
    logp = torch.log_softmax(model(ids).logits.double(), -1)[:, :-1]
    loss = -logp.gather(-1, ids[:, 1:, None]).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def step_variant(
    *,
    shift=(slice(None, -1), slice(1, None)),
    reduction="mean",
    zero=True,
    clip_it=True,
    step_it=True,
    schedule="after",
    give=lambda loss: loss.item(),
):
    """A training step with one thing changed, the way a learner might get it wrong."""

    def step(model, ids, optimizer, scheduler, clip):
        logits = model(ids).logits[:, shift[0]]
        target = ids[:, shift[1]]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction=reduction)
        if zero:
            optimizer.zero_grad()
        loss.backward()
        if clip_it:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with warnings.catch_warnings():  # torch warns about a schedule step before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            if schedule == "before":
                scheduler.step()
            if step_it:
                optimizer.step()
            if schedule == "after":
                scheduler.step()
        return give(loss)

    return step


STEP_RIGHT = [step_by_hand, step_with_labels, step_log_softmax]
STEP_WRONG = [
    ("no shift", step_variant(shift=(slice(None), slice(None))), "NEXT token"),
    ("shift backwards", step_variant(shift=(slice(1, None), slice(None, -1))), "wrong way"),
    ("summed loss", step_variant(reduction="sum"), "mean"),
    ("no zero_grad", step_variant(zero=False), "zero_grad"),
    ("no clipping", step_variant(clip_it=False), "clip_grad_norm_"),
    ("no optimizer step", step_variant(step_it=False), "optimizer.step()"),
    ("no schedule step", step_variant(schedule="never"), "learning rate never changes"),
    ("schedule before the step", step_variant(schedule="before"), "AFTER optimizer.step()"),
    ("loss after the step", step_variant(give=lambda loss: 0.0), "before the weights change"),
    ("returns the logits", step_variant(give=lambda loss: torch.zeros(3, 4)), "loss as a number"),
    ("raises", lambda model, ids, optimizer, scheduler, clip: model(ids).nope, "AttributeError"),
]


# --- chapter 07: an int8 row and the roofline ------------------------------------------------------------


def int8(x):
    scale = x.abs().max() / 127
    if scale == 0:
        return torch.zeros_like(x, dtype=torch.int8), 1.0
    return torch.round(x / scale).to(torch.int8), float(scale)


def int8_float_codes(x):
    m = x.abs().max()
    scale = m / 127 if m > 0 else torch.tensor(1.0)
    return torch.round(x / scale), scale


def int8_with_scale(scale_of, codes=torch.round):
    """int8 codes from a (possibly wrong) scale; a zero row gets codes 0 and scale 1."""

    def fn(x):
        scale = float(scale_of(x))
        return (codes(x / scale), scale) if scale else (torch.zeros_like(x), 1.0)

    return fn


INT8_RIGHT = [int8, int8_float_codes]
INT8_WRONG = [
    ("scale over 128", int8_with_scale(lambda x: x.abs().max() / 128), "127"),
    ("max, not max abs", int8_with_scale(lambda x: x.max() / 127 if x.max() > 0 else -x.abs().max() / 127), "ABSOLUTE"),
    (
        "upside down",
        lambda x: (
            (torch.round(x * (127 / x.abs().max())), float(127 / x.abs().max()))
            if x.abs().max() > 0
            else (torch.zeros_like(x), 1.0)
        ),
        "upside down",
    ),
    ("truncates", int8_with_scale(lambda x: x.abs().max() / 127, torch.trunc), "ROUND"),
    ("dequantized values", lambda x: (lambda q, s: (q * s, s))(*int8(x)), "whole numbers"),
    (
        "zero row divided by zero",
        lambda x: (torch.round(x / (x.abs().max() / 127)), float(x.abs().max() / 127)),
        "zeros",
    ),
    ("the row itself", lambda x: (x, 1.0), "whole numbers"),
    ("flattened to 2-d", lambda x: (int8(x)[0].reshape(1, -1), int8(x)[1]), "shape"),
]


def attainable(flops, nbytes, peak, bandwidth):
    return min(peak, flops / nbytes * bandwidth)


def attainable_by_ridge(flops, nbytes, peak, bandwidth):
    ridge = peak / bandwidth  # FLOPs per byte where the two roofs meet
    return peak if flops / nbytes >= ridge else flops / nbytes * bandwidth


ATTAINABLE_RIGHT = [attainable, attainable_by_ridge]
ATTAINABLE_WRONG = [
    ("no cap at the peak", lambda f, b, p, w: f / b * w, "peak"),
    ("always the peak", lambda f, b, p, w: p, "memory"),
    ("max instead of min", lambda f, b, p, w: max(p, f / b * w), "min"),
    ("bytes per FLOP", lambda f, b, p, w: min(p, b / f * w), "FLOPs per byte"),
    ("intensity only", lambda f, b, p, w: f / b, "bandwidth"),
    ("not a number", lambda f, b, p, w: "fast", "number"),
    ("raises", lambda f, b, p, w: 1 / 0, "ZeroDivisionError"),
]


def test_the_roofline_reference_by_hand():
    # 2 MFLOP over 4 MB is 0.5 FLOP/byte: 0.5 × 20 GB/s = 10 GFLOP/s, under a 50 GFLOP/s peak
    assert attainable(2e6, 4e6, 50e9, 20e9) == pytest.approx(10e9)


# --- chapter 08: a patched cell and an integrated-gradients sum -------------------------------------------


def stream_patch(
    op="residual_mlp",
    at=lambda layer: layer,
    where=lambda position: position,
    read=-1,
    score=lambda logits, target: float(torch.softmax(logits, -1)[target]),
    copy=False,
):
    """A learner's patched_prob built on the event stream, with one thing possibly changed."""
    from cyclelab.core.attention import KVCache
    from cyclelab.core.engine import drain

    def fn(engine, ids, layer, position, vector, target):
        def write(event):
            if event.op == op and event.layer == at(layer):
                out = event.tensors["out"].clone() if copy else event.tensors["out"]
                out[0, where(position)] = vector

        steps = engine.forward(torch.tensor([ids]), KVCache(engine.arch.n_layers, len(ids)), capture={op})
        logits = drain(steps, write)
        return score(logits[0, read if read == -1 else position], target)

    return fn


def patched_by_hand_loop(engine, ids, layer, position, vector, target):
    from cyclelab.core.attention import KVCache

    steps = engine.forward(torch.tensor([ids]), KVCache(engine.arch.n_layers, len(ids)), capture="all")
    with torch.no_grad():
        while True:
            try:
                event = next(steps)
            except StopIteration as done:
                return torch.softmax(done.value[0, -1].double(), -1)[target]
            if (event.op, event.layer) == ("residual_mlp", layer):
                event.tensors["out"][:, position, :] = vector


def patched_with_the_package(engine, ids, layer, position, vector, target):
    from cyclelab.lab.patching import patch_layer

    logits = patch_layer(engine, ids, layer, vector.expand(len(ids), -1), [position])
    return float(F.softmax(logits[0], -1)[target])


PATCH_RIGHT = [stream_patch(), patched_by_hand_loop, patched_with_the_package]
PATCH_WRONG = [
    ("the logit", stream_patch(score=lambda z, t: float(z[t])), "LOGIT"),
    ("log-probability", stream_patch(score=lambda z, t: float(torch.log_softmax(z, -1)[t])), "LOG-probability"),
    ("read at the patched position", stream_patch(read=0), "LAST position"),
    ("wrote into a copy", stream_patch(copy=True), "nothing changed"),
    ("after attention", stream_patch(op="residual_attn"), "residual_attn"),
    ("every position", stream_patch(where=lambda position: slice(None)), "EVERY position"),
    ("layer + 1", stream_patch(at=lambda layer: layer + 1), "off by one"),
    ("not a number", lambda *a: "Paris", "one number"),
]


def ig_sum(grad_fn, x, baseline, steps):
    alphas = (torch.arange(steps, dtype=x.dtype) + 0.5) / steps
    grads = torch.stack([grad_fn(baseline + a * (x - baseline)) for a in alphas])
    return (x - baseline) * grads.mean(0)


def ig_trapezoid_free(grad_fn, x, baseline, steps):
    total = torch.zeros_like(x)
    for k in range(steps):  # the same midpoints, walked from the input back to the baseline
        total = total + grad_fn(x - (k + 0.5) / steps * (x - baseline)) / steps
    return total * (x - baseline)


def ig_with(alpha=lambda k, n: (k + 0.5) / n, reduce=lambda g: g.mean(0), times=True, start=lambda b: b):
    def fn(grad_fn, x, baseline, steps):
        b = start(baseline)
        grads = reduce(torch.stack([grad_fn(b + alpha(k, steps) * (x - b)) for k in range(steps)]))
        return (x - baseline) * grads if times else grads

    return fn


IG_RIGHT = [ig_sum, ig_trapezoid_free, lambda g, x, b, n: ig_sum(g, x.float(), b.float(), n)]
IG_WRONG = [
    ("left ends", ig_with(alpha=lambda k, n: k / n), "LEFT end"),
    ("right ends", ig_with(alpha=lambda k, n: (k + 1) / n), "RIGHT end"),
    ("summed", ig_with(reduce=lambda g: g.sum(0)), "MEAN"),
    ("no (x - baseline)", ig_with(times=False), "multiply it by (x - baseline)"),
    ("gradient x input", lambda g, x, b, n: g(x) * x, "ALONG THE PATH"),
    ("baseline ignored", ig_with(start=torch.zeros_like), "ignores the baseline"),
    ("stacked steps", lambda g, x, b, n: torch.stack([g(b + (k + 0.5) / n * (x - b)) for k in range(n)]), "shape"),
    ("in place", lambda g, x, b, n: x.sub_(b).mul_(g(x)), "in place"),
]


def lookup_loop(edges, name):
    key, found = name.strip().upper(), []
    for head, relation, tail in edges:
        if head == key or tail == key:
            found.append((head, relation, tail))
    return found


def lookup_with(
    match=lambda key, edge: key in (edge[0], edge[2]), key=lambda name: name.strip().upper(), out=lambda found: found
):
    return lambda edges, name: out([edge for edge in edges if match(key(name), edge)])


LOOKUP_RIGHT = [
    lookup_loop,
    lookup_with(),
    lookup_with(key=lambda name: name.upper().strip(), out=lambda found: [list(edge) for edge in found]),
]
LOOKUP_WRONG = [
    ("head only", lookup_with(match=lambda key, edge: edge[0] == key), "TAIL too"),
    ("tail only", lookup_with(match=lambda key, edge: edge[2] == key), "HEAD counts too"),
    ("case-sensitive", lookup_with(key=lambda name: name.strip()), "upper case"),
    ("spaces kept", lookup_with(key=lambda name: name.upper()), "strip"),
    ("substring", lookup_with(match=lambda key, edge: key in edge[0] or key in edge[2]), "whole names"),
    (
        "lower case both sides",
        lookup_with(match=lambda key, edge: key.lower() in (edge[0].lower(), edge[2].lower())),
        "play 'macbeth' matched",
    ),
    ("names only", lookup_with(out=lambda found: [edge[0] for edge in found]), "whole facts"),
    ("sorted", lookup_with(out=sorted), "order"),
    ("first only", lookup_with(out=lambda found: found[:1]), "EVERY edge"),
    ("a dict", lambda edges, name: {name: edges}, "list of facts"),
    ("removed from the edges", lambda edges, name: [edges.pop()], "changed the list of edges"),
]


# --- chapter 09: HotFlip's swap scores and overlapping spans ----------------------------------------------


def swap_scores(grad, embeddings, ids):
    return grad @ embeddings.T - (grad * embeddings[ids]).sum(-1, keepdim=True)


def swap_scores_by_rows(grad, embeddings, ids):
    rows = [(embeddings - embeddings[i]) @ g for g, i in zip(grad, ids.tolist())]  # one position at a time
    return torch.stack(rows)


SWAP_RIGHT = [swap_scores, swap_scores_by_rows, lambda g, e, i: swap_scores(g.float(), e.float(), i)]
SWAP_WRONG = [
    ("sign flipped", lambda g, e, i: -swap_scores(g, e, i), "sign is flipped"),
    ("no current token", lambda g, e, i: g @ e.T, "left out the current token"),
    ("whole input subtracted", lambda g, e, i: g @ e.T - (g * e[i]).sum(), "whole input's term"),
    ("distances", lambda g, e, i: -torch.cdist(e[i], e), "gradient is missing"),
    (
        "lengths, not vectors",
        lambda g, e, i: (e.norm(dim=-1)[None] - e[i].norm(dim=-1)[:, None]) * g.norm(dim=-1, keepdim=True),
        "dot product",
    ),
    ("transposed", lambda g, e, i: swap_scores(g, e, i).T, "transposed"),
    (
        "the best swap only",
        lambda g, e, i: torch.tensor(divmod(int(swap_scores(g, e, i).argmax()), len(e))),
        "not the best swap",
    ),
    ("in place", lambda g, e, i: g.mul_(2) @ e.T, "in place"),
]


def test_the_swap_reference_by_hand():
    # one position holding token 0, E = [[1, 0], [0, 2]], grad = [3, 1]: swapping to token 1 moves x by (-1, 2)
    grad, emb = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert swap_reference(grad, emb, torch.tensor([0])).tolist() == [[0.0, -1.0]]


def overlapping_spans(n, size, overlap):
    starts = [0]
    while starts[-1] + size < n:  # the last span does not reach the end yet
        starts.append(starts[-1] + size - overlap)
    return [(s, min(s + size, n)) for s in starts]


def overlapping_spans_by_count(n, size, overlap):
    step = size - overlap
    count = 1 if n <= size else 1 + -(-(n - size) // step)  # ceil((n - size) / step) more spans
    return [[k * step, min(k * step + size, n)] for k in range(count)]  # lists, not tuples: also fine


def spans_with(
    step=lambda size, overlap: size - overlap,
    stop=lambda start, size, n: start + size >= n,
    end=lambda start, size, n: min(start + size, n),
):
    def fn(n, size, overlap):
        spans, start = [], 0
        while start < n:
            spans.append((start, end(start, size, n)))
            if stop(start, size, n):
                break
            start += step(size, overlap)
        return spans

    return fn


SPANS_RIGHT = [overlapping_spans, overlapping_spans_by_count, spans_with()]
SPANS_WRONG = [
    ("no overlap", spans_with(step=lambda size, overlap: size), "do not overlap"),
    ("step is the overlap", spans_with(step=lambda size, overlap: max(1, overlap)), "not overlap"),
    (
        "tail missing",
        lambda n, size, overlap: [(s, s + size) for s in range(0, n - size + 1, size - overlap)],
        "end of the text is missing",
    ),
    ("a span too many", spans_with(stop=lambda start, size, n: False), "a span too many"),
    ("end not clipped", spans_with(end=lambda start, size, n: start + size), "runs past the end"),
    ("inclusive ends", spans_with(end=lambda start, size, n: min(start + size, n) - 1), "half-open"),
    ("not pairs", lambda n, size, overlap: list(range(0, n, size - overlap)), "(start, end) pairs"),
    ("raises", lambda n, size, overlap: 1 / 0, "ZeroDivisionError"),
]


def _labels(prompt_masked=True, pad_masked=True, answer=True, shift=0, pad_label=None):
    def fn(p, a, max_len, pad):
        fill = max_len - len(p) - len(a)
        ids = p + a + [pad] * fill
        labels = ([-100] * len(p) if prompt_masked else list(p)) + (list(a) if answer else [-100] * len(a))
        labels += [-100 if pad_masked else (pad if pad_label is None else pad_label)] * fill
        return ids, (labels[shift:] + [-100] * shift)

    return fn


LABELS_RIGHT = [
    _labels(),
    lambda p, a, n, pad: (
        torch.tensor(p + a + [pad] * (n - len(p) - len(a))),
        torch.tensor([-100] * len(p) + a + [-100] * (n - len(p) - len(a))),
    ),
]
LABELS_WRONG = [
    ("prompt scored", _labels(prompt_masked=False), "the prompt is scored too"),
    ("padding scored", _labels(pad_masked=False), "the padding is scored"),
    ("shifted", _labels(shift=1), "shifted by one"),
    (
        "answer masked",
        lambda p, a, n, pad: (p + a + [pad] * (n - len(p) - len(a)), p + [-100] * (n - len(p))),
        "other way round",
    ),
    ("ids everywhere", lambda p, a, n, pad: (p + a + [pad] * (n - len(p) - len(a)),) * 2, "input ids everywhere"),
    ("not padded", lambda p, a, n, pad: (p + a, [-100] * len(p) + a), "max_len"),
    ("one list", lambda p, a, n, pad: p + a, "return a pair"),
    ("raises", lambda p, a, n, pad: p[len(p) + 5], "IndexError"),
]


# --- chapter 11: a label's whole log-probability --------------------------------------------------------


def label_token_logprobs(loaded, prompt, label, shift=0):
    p = loaded.tokenizer.encode(prompt, add_special_tokens=False)
    lab = loaded.tokenizer.encode(label, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([p + lab])).logits[0].double(), -1)
    return torch.stack(
        [logp[len(p) - 1 + j + shift, t] for j, t in enumerate(lab) if len(p) - 1 + j + shift < len(p + lab)]
    )


def label_one_token_at_a_time(loaded, prompt, label):
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
    total = 0.0
    for t in loaded.tokenizer.encode(label, add_special_tokens=False):
        with torch.no_grad():
            total += float(torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0, -1].double(), -1)[t])
        ids = ids + [t]
    return total


def label_with_the_package(loaded, prompt, label):
    from cyclelab.lab.sentiment import label_logprob

    return label_logprob(loaded, prompt, label)


LABEL_RIGHT = [
    lambda loaded, p, lab: float(label_token_logprobs(loaded, p, lab).sum()),
    label_one_token_at_a_time,
    label_with_the_package,
]
LABEL_WRONG = [
    ("first token", lambda loaded, p, lab: float(label_token_logprobs(loaded, p, lab)[0]), "FIRST token"),
    ("mean", lambda loaded, p, lab: float(label_token_logprobs(loaded, p, lab).mean()), "MEAN"),
    ("probability", lambda loaded, p, lab: float(label_token_logprobs(loaded, p, lab).sum().exp()), "a probability"),
    ("off by one", lambda loaded, p, lab: float(label_token_logprobs(loaded, p, lab, shift=1).sum()), "off by one"),
    ("not a number", lambda *a: "positive", "one number"),
    ("raises", lambda *a: 1 / 0, "ZeroDivisionError"),
]

# --- chapter 10: one cross-attention step and one beam-search step ------------------------------------------


def cross_attention(q, keys, values):
    return torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ values


def cross_attention_by_einsum(q, keys, values):
    scores = torch.einsum("hqd,hsd->hqs", q.double(), keys.double()) / q.shape[-1] ** 0.5
    return torch.einsum("hqs,hsd->hqd", scores.softmax(-1), values.double())


CROSS_RIGHT = [cross_attention, cross_attention_by_einsum, lambda q, k, v: F.scaled_dot_product_attention(q, k, v)]
CROSS_WRONG = [
    ("causal mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "EVERY source position"),
    ("no sqrt(d)", lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v, "not divided by sqrt(d)"),
    ("divided by d", lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], -1) @ v, "differs"),
    (
        "wrong axis",
        lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -2) @ v,
        "wrong axis",
    ),
    ("keys mixed", lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ k, "KEYS"),
    (
        "weights",
        lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1),
        "attention weights",
    ),
    ("no softmax", lambda q, k, v: (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])) @ v, "differs"),
]


def beam_step(scores, log_probs, k):
    total = (scores[:, None] + log_probs).flatten()
    top = torch.topk(total, k)
    vocab = log_probs.shape[1]
    return [(int(i) // vocab, int(i) % vocab, float(s)) for s, i in zip(top.values, top.indices)]


def beam_step_by_sorting(scores, log_probs, k):
    every = [
        (float(scores[b]) + float(log_probs[b, t]), b, t) for b in range(len(scores)) for t in range(log_probs.shape[1])
    ]
    every.sort(key=lambda x: -x[0])  # a stable sort: ties keep the lower flat index first, as topk does here
    return [[b, t, s] for s, b, t in every[:k]]  # lists, not tuples: also fine


BEAM_RIGHT = [beam_step, beam_step_by_sorting]
BEAM_WRONG = [
    ("token alone", lambda s, lp, k: beam_step(torch.zeros_like(s), lp, k), "add each beam's running score"),
    ("worst first", lambda s, lp, k: beam_step(s, lp, k)[::-1], "wrong order"),
    ("scores left out", lambda s, lp, k: [(b, t, 0.0) for b, t, _ in beam_step(s, lp, k)], "wrong scores"),
    ("token scores", lambda s, lp, k: [(b, t, float(lp[b, t])) for b, t, _ in beam_step(s, lp, k)], "own log-probs"),
    ("one short", lambda s, lp, k: beam_step(s, lp, k)[:-1], "return the"),
    ("a number", lambda s, lp, k: 3, "list of (beam, token, score)"),
    (
        "each beam's best",
        lambda s, lp, k: (
            [(b, int(lp[b].argmax()), float(s[b] + lp[b].max())) for b in range(len(s))][:k]
            + [(0, int(lp[0].argmax()), float(s[0] + lp[0].max()))] * max(0, k - len(s))
        ),
        "ALL beams",
    ),
]


# --- the tables ---------------------------------------------------------------------------------------

CHECKS = {
    "greedy_step": (check.check_greedy_step, GREEDY_RIGHT, GREEDY_WRONG),
    "merge_pair": (check.check_merge_pair, MERGE_RIGHT, MERGE_WRONG),
    "count_pairs": (check.check_count_pairs, COUNT_RIGHT, COUNT_WRONG),
    "apply_merges": (check.check_apply_merges, APPLY_RIGHT, APPLY_WRONG),
    "embed_lookup": (check.check_embed_lookup, EMBED_RIGHT, EMBED_WRONG),
    "rope_pair": (check.check_rope_pair, ROPE_RIGHT, ROPE_WRONG),
    "mean_pool": (check.check_mean_pool, POOL_RIGHT, POOL_WRONG),
    "causal_attention": (check.check_causal_attention, ATTENTION_RIGHT, ATTENTION_WRONG),
    "decode_step": (check.check_decode_step, DECODE_RIGHT, DECODE_WRONG),
    "block": (check.check_block, BLOCK_RIGHT, BLOCK_WRONG),
    "layer_norm": (check.check_layer_norm, LAYER_NORM_RIGHT, LAYER_NORM_WRONG),
    "rms_norm": (check.check_rms_norm, RMS_NORM_RIGHT, RMS_NORM_WRONG),
    "top_p_filter": (check.check_top_p_filter, TOP_P_RIGHT, TOP_P_WRONG),
    "masked_prediction": (check.check_masked_prediction, MASKED_RIGHT, MASKED_WRONG),
    "perplexity": (check.check_perplexity, PERPLEXITY_RIGHT, PERPLEXITY_WRONG),
    "lora_forward": (check.check_lora_forward, LORA_RIGHT, LORA_WRONG),
    "training_step": (check.check_training_step, STEP_RIGHT, STEP_WRONG),
    "masked_labels": (check.check_masked_labels, LABELS_RIGHT, LABELS_WRONG),
    "int8_row": (check.check_int8_row, INT8_RIGHT, INT8_WRONG),
    "attainable": (check.check_attainable, ATTAINABLE_RIGHT, ATTAINABLE_WRONG),
    "patched_prob": (check.check_patched_prob, PATCH_RIGHT, PATCH_WRONG),
    "ig_sum": (check.check_ig_sum, IG_RIGHT, IG_WRONG),
    "graph_lookup": (check.check_graph_lookup, LOOKUP_RIGHT, LOOKUP_WRONG),
    "swap_scores": (check.check_swap_scores, SWAP_RIGHT, SWAP_WRONG),
    "overlapping_spans": (check.check_overlapping_spans, SPANS_RIGHT, SPANS_WRONG),
    "label_logprob": (check.check_label_logprob, LABEL_RIGHT, LABEL_WRONG),
    "cross_attention": (check.check_cross_attention, CROSS_RIGHT, CROSS_WRONG),
    "beam_step": (check.check_beam_step, BEAM_RIGHT, BEAM_WRONG),
}

RIGHT = [
    pytest.param(name, fn, id=f"{name}-{i}") for name, (_, right, _) in CHECKS.items() for i, fn in enumerate(right)
]
WRONG = [
    pytest.param(name, fn, hint, id=f"{name}-{label}")
    for name, (_, _, wrong) in CHECKS.items()
    for label, fn, hint in wrong
]


def test_every_exercise_has_its_table():
    assert {name.removeprefix("check_") for name in dir(check) if name.startswith("check_")} == set(CHECKS)
    for name, (_, right, wrong) in CHECKS.items():
        assert len(right) >= 2 and len(wrong) >= 6, name


@pytest.mark.parametrize("name, fn", RIGHT)
def test_equivalent_correct_answers_pass(name, fn):
    result = CHECKS[name][0](fn)
    assert result and str(result).startswith("✓"), result.message


@pytest.mark.parametrize("name, fn, hint", WRONG)
def test_each_typical_mistake_gets_its_hint(name, fn, hint):
    result = CHECKS[name][0](fn)
    assert isinstance(result, Result) and not result, f"accepted: {result.message}"
    assert hint in result.message, result.message


# --- no answer makes a checker raise ---------------------------------------------------------------------


def _generator(*args):
    yield 1


def _raises(*args):
    raise RuntimeError("a learner's bug")


JUNK = {
    "None": lambda *a: None,
    "a string": lambda *a: "text",
    "a float": lambda *a: 3.5,
    "a 5-d tensor": lambda *a: torch.zeros(2, 2, 2, 2, 2),
    "a float64 scalar tensor": lambda *a: torch.tensor(0.25, dtype=torch.float64),
    "a bool tensor": lambda *a: torch.tensor([True]),
    "a complex tensor": lambda *a: torch.zeros(3, dtype=torch.complex64),
    "NaN": lambda *a: torch.full((4,), float("nan")),
    "a triple": lambda *a: (1, 2, 3),
    "a list": lambda *a: [1, 2],
    "a generator": _generator,
    "raises": _raises,
    "a dict": lambda *a: {"a": 1},
}


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("name", CHECKS)
def test_no_answer_makes_a_checker_raise(name, junk):
    result = CHECKS[name][0](JUNK[junk])
    assert isinstance(result, Result) and not result and result.message


@pytest.mark.parametrize("name", CHECKS)
def test_passing_something_that_is_not_a_function_is_explained(name):
    result = CHECKS[name][0](42)
    assert not result and "pass your function itself" in result.message


def test_an_exception_names_the_learners_line_and_a_likely_cause():
    def mixed_dtypes(x, W, A, B, alpha, r):
        update = (x.double() @ A.double()) @ B.double()
        return x @ W + update * alpha / r  # float32 + float64 is fine in torch: make it a matmul instead

    def mixed_matmul(x, W, A, B, alpha, r):
        return x @ W + (x.double() @ A) @ B * alpha / r

    assert check.check_lora_forward(mixed_dtypes)
    result = check.check_lora_forward(mixed_matmul)
    assert "RuntimeError" in result.message and "(x.double() @ A)" in result.message and "dtype" in result.message


def test_an_untouched_top_p_stub_is_told_nothing_was_filtered() -> None:
    result = check.check_top_p_filter(lambda logits, p: logits)
    assert not result and result.message.startswith("nothing was filtered")


def test_a_one_hot_lookup_in_the_wrong_dtype_is_told_to_use_the_weights_dtype() -> None:
    result = check.check_embed_lookup(lambda w, ids: F.one_hot(ids, len(w)).float() @ w)
    assert not result and "F.one_hot(ids, len(weight)).to(weight.dtype)" in result.message
    assert check.check_embed_lookup(lambda w, ids: F.one_hot(ids, len(w)).to(w.dtype) @ w)
