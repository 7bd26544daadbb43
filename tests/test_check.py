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

from cyclelab import check
from cyclelab.check import Result
from cyclelab.decode import top_p_filter
from cyclelab.forward import gelu_mlp, layer_norm, self_attention

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
            return ids[:i] + [new_id] + ids[i + 2:]
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
    ("one pair too few", lambda ids: dict(Counter((ids[i], ids[i + 1]) for i in range(max(1, len(ids) - 1)))), "no pairs"),
    ("every other pair", lambda ids: dict(Counter(zip(ids[::2], ids[1::2]))), "every other"),
    ("last pair missing", lambda ids: dict(Counter(zip(ids[:-1], ids[1:-1]))), "last pair"),
    ("counted once", lambda ids: {p: 1 for p in zip(ids, ids[1:])}, "counted once"),
    ("unordered", lambda ids: dict(Counter(tuple(sorted(p)) for p in zip(ids, ids[1:]))), "ordered"),
    ("raises on short lists", pairs_first_raises, "fewer than two"),
    ("a list", lambda ids: list(zip(ids, ids[1:])), "dict"),
    ("string keys", lambda ids: {f"{a},{b}": 1 for a, b in zip(ids, ids[1:])}, "keys must be pairs"),
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
    ("sign", lambda x, y, p, f: (x * math.cos(p * f) + y * math.sin(p * f), x * math.sin(p * f) + y * math.cos(p * f)),
     "sign"),
    ("two angles", lambda x, y, p, f: (x * math.cos(p * f) - y * math.sin(p * f), x * math.sin(p) + y * math.cos(p)),
     "length"),
    ("raises", lambda x, y, p, f: 1 / 0, "ZeroDivisionError"),
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
        w = torch.softmax(q[..., i:i + 1, :] @ k[..., :i + 1, :].transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        rows.append(w @ v[..., :i + 1, :])
    return torch.cat(rows, -2)


def attention_in_place(q, k, v):
    q /= math.sqrt(q.shape[-1])
    return attention(q, k, v, scale=False)


def attention_zeroed_after(q, k, v):
    t = q.shape[-2]
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return w.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v


ATTENTION_RIGHT = [attention, attention_by_rows, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)]
ATTENTION_WRONG = [
    ("no mask", lambda q, k, v: attention(q, k, v, causal=False), "future"),
    ("no scale", lambda q, k, v: attention(q, k, v, scale=False), "sqrt(d)"),
    ("divided by d", lambda q, k, v: attention(q / math.sqrt(q.shape[-1]), k, v), "instead of sqrt(d)"),
    ("wrong axis", lambda q, k, v: attention(q, k, v, axis=-2), "wrong axis"),
    ("zeroed after softmax", attention_zeroed_after, "sum to 1"),
    ("mixes keys", lambda q, k, v: attention(q, k, k), "KEYS"),
    ("transposed scores", lambda q, k, v: attention(k, q, v), "transposed"),
    ("in place", attention_in_place, "in place"),
    ("the weights", lambda q, k, v: attention(q, k, torch.eye(q.shape[-2]).expand(*q.shape[:-1], q.shape[-2])),
     "attention weights"),
    ("a tuple", lambda q, k, v: (attention(q, k, v), None), "tuple"),
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
    ("no attention residual", lambda x, L: (lambda a: a + gelu_mlp(ln(a, L.ln_2), L.mlp))(
        self_attention(ln(x, L.ln_1), L.attn)), "attention result replaced the stream"),
    ("no MLP residual", lambda x, L: gelu_mlp(ln(x + self_attention(ln(x, L.ln_1), L.attn), L.ln_2), L.mlp),
     "MLP result replaced the stream"),
    ("post-norm", lambda x, L: (lambda a: ln(a + gelu_mlp(a, L.mlp), L.ln_2))(ln(x + self_attention(x, L.attn), L.ln_1)),
     "after the residual add"),
    ("swapped norms", lambda x, L: (lambda a: a + gelu_mlp(ln(a, L.ln_1), L.mlp))(x + self_attention(ln(x, L.ln_2), L.attn)),
     "swapped"),
    ("parallel", lambda x, L: x + self_attention(ln(x, L.ln_1), L.attn) + gelu_mlp(ln(x, L.ln_2), L.mlp),
     "BEFORE attention wrote"),
    ("no MLP", lambda x, L: x + self_attention(ln(x, L.ln_1), L.attn), "MLP sublayer is missing"),
    ("not causal", block_maskless, "not causal"),
    ("in place", block_in_place, "in place"),
    ("identity", lambda x, L: x, "unchanged"),
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
    ("one too many", lambda z, p: top_p_keep(z, p, lambda c, r: torch.cat([torch.tensor([True, True]), (c < p)[:-2]])),
     "after the cumulative probability passed p"),
    ("crossing token dropped", lambda z, p: top_p_keep(z, p, lambda c, r: (c <= p) | (torch.arange(len(c)) == 0)),
     "the token that crosses p"),
    ("best dropped", lambda z, p: top_p(z, p) if float(torch.softmax(z, -1).max()) <= p else torch.full_like(z, -math.inf),
     "most likely token was dropped"),
    ("probabilities", lambda z, p: torch.softmax(z, -1).masked_fill(top_p(z, p).isinf(), -math.inf), "probabilities"),
    ("zeros", lambda z, p: torch.where(top_p(z, p).isinf(), torch.zeros_like(z), z), "-inf"),
    ("sorted order", lambda z, p: top_p(z, p).sort(descending=True).values, "sorted order"),
    ("gather", top_p_gather, "gather"),
    ("ascending", lambda z, p: (lambda pr, o: z.masked_fill(torch.zeros_like(pr, dtype=torch.bool).scatter(
        -1, o, pr[o].cumsum(-1) > p), -math.inf))(torch.softmax(z, -1), torch.argsort(torch.softmax(z, -1))),
     "DESCENDING"),
    ("in place", top_p_in_place, "in place"),
]


def masked(model, ids, position, mask_id):
    ids = list(ids)
    ids[position] = mask_id
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, position], -1)
    return int(probs.argmax()), float(probs.max())


def masked_by_log(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits.double(), -1)[0, position]
    return int(logp.argmax()), math.exp(float(logp.max()))


def masked_mutating(model, ids, position, mask_id):
    ids[position] = mask_id
    return masked(model, ids, position, mask_id)


def masked_flat_argmax(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1:]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return int(logits.argmax()), float(torch.softmax(logits[position], -1).max())


def masked_logits_of(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1:]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, position]


MASKED_RIGHT = [masked, masked_by_log]
MASKED_WRONG = [
    ("unmasked", lambda m, ids, pos, mid: masked(m, ids, pos, ids[pos]), "saw the answer"),
    ("one early", lambda m, ids, pos, mid: (lambda z: (int(z[max(pos - 1, 0)].argmax()), 0.5))(
        masked_logits_all(m, ids, pos, mid)), "one position"),
    ("the logit", lambda m, ids, pos, mid: (lambda z: (int(z.argmax()), float(z.max())))(masked_logits_of(m, ids, pos, mid)),
     "logit"),
    ("log-probability", lambda m, ids, pos, mid: (lambda z: (int(z.argmax()), float(torch.log_softmax(z, -1).max())))(
        masked_logits_of(m, ids, pos, mid)), "LOG-probability"),
    ("mutates ids", masked_mutating, "caller's list"),
    ("flat argmax", masked_flat_argmax, "whole"),
    ("probability vector", lambda m, ids, pos, mid: (lambda z: (int(z.argmax()), torch.softmax(z, -1)))(
        masked_logits_of(m, ids, pos, mid)), "ONE number"),
]


def masked_logits_all(model, ids, position, mask_id):
    ids = ids[:position] + [mask_id] + ids[position + 1:]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --- chapter 06: LoRA's forward ------------------------------------------------------------------------


def lora_in_place(x, W, A, B, alpha, r):
    W += A @ B * alpha / r
    return x @ W


LORA_RIGHT = [
    lambda x, W, A, B, alpha, r: x @ W + (x @ A) @ B * alpha / r,
    lambda x, W, A, B, alpha, r: x @ (W + A @ B * (alpha / r)),  # merged: the same map
    lambda x, W, A, B, alpha, r: (x.double() @ W.double() + x.double() @ A.double() @ B.double() * alpha / r),
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


def step_variant(*, shift=(slice(None, -1), slice(1, None)), reduction="mean", zero=True, clip_it=True,
                 step_it=True, schedule="after", give=lambda loss: loss.item()):
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
    ("upside down", lambda x: (torch.round(x * (127 / x.abs().max())), float(127 / x.abs().max()))
     if x.abs().max() > 0 else (torch.zeros_like(x), 1.0), "upside down"),
    ("truncates", int8_with_scale(lambda x: x.abs().max() / 127, torch.trunc), "ROUND"),
    ("dequantized values", lambda x: (lambda q, s: (q * s, s))(*int8(x)), "whole numbers"),
    ("zero row divided by zero", lambda x: (torch.round(x / (x.abs().max() / 127)), float(x.abs().max() / 127)),
     "zeros"),
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


# --- the tables ---------------------------------------------------------------------------------------

CHECKS = {
    "greedy_step": (check.check_greedy_step, GREEDY_RIGHT, GREEDY_WRONG),
    "merge_pair": (check.check_merge_pair, MERGE_RIGHT, MERGE_WRONG),
    "count_pairs": (check.check_count_pairs, COUNT_RIGHT, COUNT_WRONG),
    "embed_lookup": (check.check_embed_lookup, EMBED_RIGHT, EMBED_WRONG),
    "rope_pair": (check.check_rope_pair, ROPE_RIGHT, ROPE_WRONG),
    "causal_attention": (check.check_causal_attention, ATTENTION_RIGHT, ATTENTION_WRONG),
    "block": (check.check_block, BLOCK_RIGHT, BLOCK_WRONG),
    "top_p_filter": (check.check_top_p_filter, TOP_P_RIGHT, TOP_P_WRONG),
    "masked_prediction": (check.check_masked_prediction, MASKED_RIGHT, MASKED_WRONG),
    "lora_forward": (check.check_lora_forward, LORA_RIGHT, LORA_WRONG),
    "training_step": (check.check_training_step, STEP_RIGHT, STEP_WRONG),
    "int8_row": (check.check_int8_row, INT8_RIGHT, INT8_WRONG),
    "attainable": (check.check_attainable, ATTAINABLE_RIGHT, ATTAINABLE_WRONG),
}

RIGHT = [pytest.param(name, fn, id=f"{name}-{i}") for name, (_, right, _) in CHECKS.items() for i, fn in enumerate(right)]
WRONG = [pytest.param(name, fn, hint, id=f"{name}-{label}")
         for name, (_, _, wrong) in CHECKS.items() for label, fn, hint in wrong]


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
