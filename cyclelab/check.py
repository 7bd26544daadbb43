"""Exercise checks that hint: a learner's function is tried on random and edge cases, and a
failure names the symptom ("probabilities do not sum to 1") rather than just failing.

Each checker returns a :class:`Result`; displaying it in a notebook prints ✓ or ✗ and the hint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Result:
    """Outcome of a check: whether it passed and what to tell the learner."""

    passed: bool
    message: str

    def __str__(self) -> str:
        return f"{'✓' if self.passed else '✗'} {self.message}"

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython display
        printer.text(str(self))

    def __bool__(self) -> bool:
        return self.passed


# --- shared: calling the learner's function ----------------------------------------------------------


def _call(fn, *args, case: str = "", hint: str = ""):
    """Run a learner's function; return (value, None) or (None, Result naming the exception,
    prefixed by the ``case`` it was tried on and followed by a ``hint`` when given)."""
    try:
        return fn(*args), None
    except Exception as err:  # a learner's bug, reported instead of raised
        where = f"{case}: " if case else ""
        return None, Result(False, f"{where}your function raised {type(err).__name__}: {hint or err}")


def _tensor_answer(fn, given: torch.Tensor, *rest, original: torch.Tensor, noun: str, in_place: str):
    """Run ``fn(given, *rest)``; return (tensor, None), or (None, Result) when it raised, returned
    something other than a tensor, or changed ``given`` (a copy of ``original``) in place."""
    out, error = _call(fn, given, *rest)
    if error is not None:
        return None, error
    if not isinstance(out, torch.Tensor):
        return None, Result(False, f"return {noun} as a tensor, not {type(out).__name__}")
    if not torch.equal(given, original):
        return None, Result(False, in_place)
    return out, None


# --- chapter 00: the greedy WRITEBACK decision ------------------------------------------------------


def _cases(seed: int = 0) -> list[torch.Tensor]:
    """Logits to try: random sizes and scales, a tie-free spike, large values (overflow), negatives."""
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(n, generator=gen) * s for n, s in [(5, 1.0), (50, 3.0), (1000, 10.0)]]
    spike = torch.full((10,), -2.0)
    spike[7] = 4.0
    return cases + [spike, torch.tensor([1000.0, 999.0, -1000.0]), -torch.rand(8, generator=gen) - 5]


def check_greedy_step(fn: Callable[[torch.Tensor], tuple[int, float]]) -> Result:
    """Check ``fn(logits) -> (token_id, probability)``: the greedy choice and its softmax probability."""
    for logits in _cases():
        answer, error = _call(fn, logits.clone())
        if error is not None:
            return error
        try:
            token, prob = int(answer[0]), float(answer[1])
        except (TypeError, ValueError, IndexError, RuntimeError):
            return Result(False, f"return (token_id, probability), got {answer!r}")
        want_token = int(torch.argmax(logits))
        want_prob = float(torch.softmax(logits, -1)[want_token])
        if token != want_token:
            if token == int(torch.argmin(logits)):
                return Result(False, "you picked the least likely token: greedy takes the largest logit (argmax)")
            return Result(False, f"on {len(logits)} logits you chose token {token}, greedy picks {want_token} (the argmax)")
        if prob != prob:  # NaN
            return Result(False, "the probability is NaN: exp() of large logits overflows — subtract the maximum first")
        if abs(prob - float(logits[want_token])) < 1e-6 and abs(prob - want_prob) > 1e-4:
            return Result(False, "you returned the logit itself: turn logits into probabilities with softmax")
        if abs(prob - want_prob) > 1e-4:
            return Result(False, f"the probability should be {want_prob:.4f}, got {prob:.4f}: "
                                 "softmax divides exp(logit) by the sum over ALL tokens")
    return Result(True, "correct: greedy decoding takes the argmax, and softmax gives its probability")


# --- chapter 01: BPE merge step and pair counts -----------------------------------------------------


def _ref_merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Reference BPE merge step: every occurrence of ``pair``, left to right, without overlaps
    (the trainer's own merge, which is checked against the ``tokenizers`` library)."""
    from .tokenize import _merge_word

    merged = list(ids)
    _merge_word(merged, pair, new_id)
    return merged


def _merge_pair_cases(seed: int = 0) -> list[tuple[list[int], tuple[int, int], int]]:
    """Hand-picked cases (plain, overlapping, at the end, absent, reversed, tiny) then random ones."""
    import random

    cases = [([1, 2, 3, 1, 2, 4], (1, 2), 99), ([7, 5, 5, 5, 8], (5, 5), 9), ([5, 5, 5, 5], (5, 5), 9),
             ([3, 1, 2], (1, 2), 7), ([2, 1, 2, 1], (1, 2), 7), ([1, 3, 4], (1, 2), 7), ([], (1, 2), 7), ([1], (1, 2), 7)]
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.randrange(3) for _ in range(rng.randint(2, 30))]
        k = rng.randrange(len(ids) - 1)
        cases.append((ids, (ids[k], ids[k + 1]), 100 + rng.randrange(50)))
    return cases


def _merge_pair_hint(ids: list[int], pair: tuple[int, int], new_id: int, got: list[int]) -> str:
    """Name the symptom of a wrong merge."""
    want = _ref_merge_pair(ids, pair, new_id)
    case = f"merging {pair} → {new_id} in {ids}: expected {want}, got {got}"
    a, b = pair
    no_skip = [new_id if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b else x for i, x in enumerate(ids)]
    first_only = list(ids)
    for i in range(len(ids) - 1):
        if ids[i] == a and ids[i + 1] == b:
            first_only[i : i + 2] = [new_id]
            break
    if want != ids and got == list(ids):
        return f"nothing was merged ({case}): look for ids[i] == pair[0] and ids[i + 1] == pair[1]"
    if got == no_skip:
        return (f"the second token of each pair is still there ({case}): after a merge, jump over both "
                f"tokens (i += 2)")
    if got == _ref_merge_pair(ids, (b, a), new_id) and got != want:
        return f"you merged the pair the wrong way round ({case}): order matters, (a, b) is not (b, a)"
    if got == first_only and got != want:
        return f"only the first occurrence was merged ({case}): replace every occurrence"
    if a == b:
        if got.count(new_id) > want.count(new_id) or len(got) < len(want):
            return (f"overlapping pairs ({case}): one token was used by two merges. In [{a}, {a}, {a}] the "
                    f"pair ({a}, {a}) starts at 0 and at 1, but after merging at 0 the middle {a} is gone: "
                    "skip past both tokens and scan left to right")
        rev = _ref_merge_pair(ids[::-1], pair, new_id)[::-1]
        if got == rev:
            return f"overlapping pairs ({case}): you merged from the right; BPE merges left to right"
        return f"overlapping pairs ({case}): scan left to right, merge, then skip past both tokens"
    if len(got) == len(want) - 1 and got == want[:-1]:
        return f"the last token went missing ({case}): the final position needs handling too"
    if want and want[-1] == new_id and got[-2:] == [a, b]:
        return f"a pair at the very end was not merged ({case}): check your loop's last index"
    return case


def check_merge_pair(fn: Callable[[list[int], tuple[int, int], int], list[int]]) -> Result:
    """Check ``fn(ids, pair, new_id) -> list``: one BPE merge step (left to right, no overlaps)."""
    for ids, pair, new_id in _merge_pair_cases():
        given = list(ids)
        got, error = _call(fn, given, pair, new_id, case=f"merging {pair} in {ids}")
        if error is not None:
            return error
        if got is None:
            return Result(False, "your function returned None: build and return the new list of ids")
        if given != ids:
            return Result(False, f"your function changed its input list ({ids} became {given}): build a new list")
        try:
            got = [int(x) for x in got]
        except (TypeError, ValueError):
            return Result(False, f"return a list of ints, got {got!r}")
        if got != _ref_merge_pair(ids, pair, new_id):
            return Result(False, _merge_pair_hint(ids, pair, new_id, got))
    return Result(True, "correct: every occurrence merged, left to right, overlapping pairs handled")


def _count_pairs_cases(seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    cases = [[1, 2, 1, 2, 3], [5, 5, 5], [1, 2, 2, 1], [4, 2], [], [7]]
    cases += [[rng.randrange(4) for _ in range(rng.randint(2, 40))] for _ in range(100)]
    return cases


def check_count_pairs(fn: Callable[[list[int]], dict]) -> Result:
    """Check ``fn(ids) -> {(a, b): count}``: how often each adjacent pair occurs (overlaps included)."""
    from collections import Counter

    for ids in _count_pairs_cases():
        want = dict(Counter(zip(ids, ids[1:])))
        short = "a list of fewer than two ids has no pairs, return {}" if len(ids) < 2 else ""
        got, error = _call(fn, list(ids), case=f"on {ids}", hint=short)
        if error is not None:
            return error
        if not isinstance(got, dict):
            return Result(False, f"return a dict {{(a, b): count}}, got {type(got).__name__}")
        if any(not (isinstance(k, tuple) and len(k) == 2) for k in got):
            return Result(False, f"keys must be pairs (a, b) as tuples, got keys like {next(iter(got))!r}")
        got = {k: v for k, v in got.items() if v}
        if got == want:
            continue
        case = f"on {ids}: expected {want}, got {got}"
        if not got and want:
            return Result(False, f"nothing was counted ({case}): look at every neighbour pair (ids[i], ids[i + 1])")
        if len(ids) > 2 and got == dict(Counter(zip(ids[:-1], ids[1:-1]))):
            return Result(False, f"the last pair is missing ({case}): n ids have n - 1 adjacent pairs")
        if got == dict(Counter(zip(ids[::2], ids[1::2]))):
            return Result(False, f"you skipped every other pair ({case}): pairs overlap — in [a, b, c] both "
                                 "(a, b) and (b, c) count")
        if set(got) == set(want) and all(v == 1 for v in got.values()):
            return Result(False, f"each pair was counted once ({case}): count every occurrence")
        if set(got) <= {tuple(sorted(k)) for k in want} and set(got) != set(want):
            return Result(False, f"(a, b) and (b, a) were counted together ({case}): pairs are ordered")
        return Result(False, case)
    return Result(True, "correct: every adjacent pair counted, overlapping ones included")


# --- chapter 02: the embedding lookup and RoPE -----------------------------------------------------


def check_embed_lookup(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(weight, ids) -> vectors``: the rows of ``weight`` (vocab, width) for ``ids``,
    shaped ``ids.shape + (width,)``."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 6, generator=gen)
    cases = [torch.tensor([3, 1, 3]), torch.tensor([[0, 5, 2], [39, 7, 7]]), torch.tensor([39])]
    for ids in cases:
        out, error = _call(fn, weight.clone(), ids.clone())
        if error is not None:
            if "out of bounds" in error.message or "out of range" in error.message:
                error.message += " — a token's vector is a ROW of the (vocab, width) matrix: index rows, not columns"
            return error
        want = weight[ids]
        if not isinstance(out, torch.Tensor):
            return Result(False, f"return a tensor, not {type(out).__name__}")
        if out.shape == (*ids.shape, weight.shape[0]):
            return Result(False, "you returned one-hot vectors (one entry per vocabulary item): "
                                 "multiply them by the matrix, or index its rows directly")
        if out.shape == (weight.shape[0], *ids.shape) and out.shape != want.shape:
            return Result(False, "you took COLUMNS of the matrix: a token's vector is a ROW, weight[ids]")
        if out.shape != want.shape:
            return Result(False, f"for ids of shape {tuple(ids.shape)} the result should have shape "
                                 f"{tuple(want.shape)} (ids.shape + (width,)), got {tuple(out.shape)}")
        if torch.allclose(out.float(), want, atol=1e-6):
            continue
        for shift in (-1, 1):
            shifted = weight[(ids + shift).clamp(0, weight.shape[0] - 1)]
            if torch.allclose(out.float(), shifted, atol=1e-6):
                return Result(False, f"every vector is one row {'too early' if shift < 0 else 'too late'}: "
                                     "token i is row i (ids count from 0)")
        if torch.count_nonzero(out) == 0:
            return Result(False, "the vectors are all zeros: read the rows of the matrix")
        return Result(False, f"for ids {ids.tolist()} the vectors are not the matrix rows weight[ids]")
    return Result(True, "correct: the lookup reads one row per token — a memory read, no arithmetic")


def check_rope_pair(fn: Callable[[float, float, int, float], tuple[float, float]]) -> Result:
    """Check ``fn(x, y, position, freq) -> (x', y')``: the pair (x, y) rotated counter-clockwise
    by the angle ``position × freq`` radians, as RoPE rotates pair i of a query or key."""
    import math

    cases = [(1.0, 0.0, 1, 0.5), (0.3, -1.2, 7, 0.25), (2.0, 1.0, 0, 1.0), (-0.7, 0.4, 100, 0.01), (1.5, 2.5, 3, 1.3)]
    for x, y, pos, freq in cases:
        out, error = _call(fn, x, y, pos, freq)
        if error is not None:
            return error
        try:
            xr, yr = (float(v) for v in out)
        except (TypeError, ValueError):
            return Result(False, f"return a pair (x', y') of two numbers, got {out!r}")

        def rot(a):
            return x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)

        def close(p):
            return abs(xr - p[0]) < 1e-5 and abs(yr - p[1]) < 1e-5

        angle = pos * freq
        if close(rot(angle)):
            continue
        if close(rot(-angle)):
            return Result(False, "you rotated the wrong way (clockwise): x' = x·cos − y·sin, y' = x·sin + y·cos")
        if pos not in (0, 1) and close(rot(freq)):
            return Result(False, "the angle must grow with the position: angle = position × freq")
        if close(rot(math.radians(angle))) or close(rot(math.degrees(angle))):
            return Result(False, "the angle is already in radians: pass position × freq to cos and sin as it is")
        if close(rot(angle)[::-1]):
            return Result(False, "x' and y' are swapped: return (x·cos − y·sin, x·sin + y·cos)")
        if abs(math.hypot(xr, yr) - math.hypot(x, y)) > 1e-4:
            return Result(False, f"the length of the pair changed ({math.hypot(x, y):.3f} → {math.hypot(xr, yr):.3f}): "
                                 "a rotation keeps the length — use cos and sin of the SAME angle")
        return Result(False, f"rotating ({x}, {y}) at position {pos} with freq {freq} should give "
                             f"({rot(angle)[0]:.4f}, {rot(angle)[1]:.4f}), got ({xr:.4f}, {yr:.4f})")
    return Result(True, "correct: RoPE turns each pair by position × freq; the length is unchanged")


# --- chapter 03: causal attention -------------------------------------------------------------------


def _attention_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The right answer (``"ok"``) and the typical wrong ones, each named by its symptom."""
    import math

    d, t = q.shape[-1], q.shape[-2]
    raw = q @ k.transpose(-1, -2)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    neg = float("-inf")

    def mix(scores, dim=-1):
        return torch.softmax(scores, dim=dim) @ v

    scaled = raw / math.sqrt(d)
    probs = torch.softmax(scaled, -1).masked_fill(future, 0.0)
    return {
        "ok": mix(scaled.masked_fill(future, neg)),
        "row 0 attends to future tokens: set the scores of keys j > i to -inf before the softmax (a causal mask)":
            mix(scaled),
        "scores are not divided by sqrt(d): the softmax is too sharp": mix(raw.masked_fill(future, neg)),
        "scores are divided by d instead of sqrt(d)": mix((raw / d).masked_fill(future, neg)),
        "softmax over the wrong axis: each query's weights over the KEYS (the last axis, dim=-1) must sum to 1":
            mix(scaled.masked_fill(future, neg), dim=-2),
        "the mask is flipped: a token reads itself and the PAST (keys j <= i), not the future":
            mix(scaled.masked_fill(future.T, neg)),
        "a row's weights do not sum to 1: mask with -inf BEFORE the softmax instead of zeroing after it":
            probs @ v,
        "scores are not divided by sqrt(d), and the future is not masked": mix(raw),
    }


def check_causal_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Result:
    """Check ``fn(q, k, v) -> output``: causal scaled dot-product attention over ``(…, T, d)``
    tensors, returning ``softmax(mask(q kᵀ / sqrt(d))) @ v`` of shape ``(…, T, d)``."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 1, 5, 8), (2, 3, 7, 16), (6, 4), (1, 2, 1, 4)]
    for shape in shapes:
        q, k, v = (torch.randn(*shape, generator=gen) * 2 for _ in range(3))
        out, error = _call(fn, q.clone(), k.clone(), v.clone())
        if error is not None:
            return error
        if isinstance(out, tuple):
            return Result(False, "return only the output tensor probs @ v, not a tuple")
        if not isinstance(out, torch.Tensor):
            return Result(False, f"return a tensor, not {type(out).__name__}")
        t = shape[-2]
        if out.shape != q.shape:
            if out.shape == (*shape[:-1], t) and out.shape != q.shape:
                return Result(False, "you returned the attention weights: multiply them by v (probs @ v)")
            return Result(False, f"for q, k, v of shape {shape} the output should have shape {shape}, got {tuple(out.shape)}")
        out = out.float()
        if torch.isnan(out).any():
            return Result(False, "NaN in the output: a row is fully masked — a token must be allowed to attend to "
                                 "itself (mask keys j > i, not j >= i)")
        variants = _attention_variants(q, k, v)
        if torch.allclose(out, variants.pop("ok"), atol=1e-4, rtol=1e-4):
            continue
        for hint, wrong in variants.items():
            if torch.allclose(out, wrong, atol=1e-4, rtol=1e-4):
                return Result(False, hint)
        if not torch.allclose(out[..., 0, :], v[..., 0, :], atol=1e-4):
            return Result(False, "row 0 of the output should equal v[..., 0, :]: the first token can only "
                                 "read itself")
        return Result(False, f"for shape {shape} the output differs from causal attention "
                             f"(largest difference {float((out - _attention_variants(q, k, v)['ok']).abs().max()):.3g})")
    return Result(True, "correct: scores, / sqrt(d), causal mask, softmax over the keys, mix of values")


# --- chapter 04: a transformer block from its pieces ---------------------------------------------------


def _random_gpt2(seed: int = 4):
    """A small random GPT-2 with random norm gains and biases (so a misplaced norm shows)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif type(module).__name__ == "Conv1D":  # weights (in, out) of unit gain: every sublayer counts
                fan_in = module.weight.shape[0]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in ** 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


def _block_variants(x: torch.Tensor, layer) -> dict[str, torch.Tensor]:
    """The right block (``"ok"``) and the typical wrong ones, each named by its symptom."""
    from .forward import gelu_mlp, layer_norm, self_attention

    def ln1(t):
        return layer_norm(t, layer.ln_1.weight, layer.ln_1.bias, layer.ln_1.eps)

    def ln2(t):
        return layer_norm(t, layer.ln_2.weight, layer.ln_2.bias, layer.ln_2.eps)

    def attn(t):
        return self_attention(t, layer.attn)

    def mlp(t):
        return gelu_mlp(t, layer.mlp)

    a = x + attn(ln1(x))
    no_attn_res = attn(ln1(x))
    post = ln1(x + attn(x))
    h = ln1(x)
    return {
        "ok": a + mlp(ln2(a)),
        "the attention result replaced the stream instead of being added to it: x = x + attn(ln_1(x)) "
        "(the residual add)": no_attn_res + mlp(ln2(no_attn_res)),
        "the MLP result replaced the stream instead of being added to it: x = x + mlp(ln_2(x)) (the residual add)":
            mlp(ln2(a)),
        "no residual adds at all: each sublayer must ADD its result to x (x = x + ...), not replace it":
            mlp(ln2(attn(ln1(x)))),
        "the norm comes after the residual add (post-norm, as in the 2017 transformer); GPT-2 normalises each "
        "sublayer's INPUT: x + attn(ln_1(x))": ln2(post + mlp(post)),
        "you normalised the sublayer's output; GPT-2 normalises its input: x + attn(ln_1(x)), not x + ln_1(attn(x))":
            (lambda y: y + ln2(mlp(y)))(x + ln1(attn(x))),
        "the residual add starts from the normalised x; add the sublayer's result to the raw stream x":
            (lambda y: ln2(y) + mlp(ln2(y)))(h + attn(h)),
        "ln_1 and ln_2 are swapped: ln_1 goes before attention, ln_2 before the MLP":
            (lambda y: y + mlp(ln1(y)))(x + attn(ln2(x))),
        "both sublayers used ln_1: the MLP has its own norm, ln_2": a + mlp(ln1(a)),
        "the MLP read the stream from BEFORE attention wrote into it (a parallel block): run the MLP on the "
        "updated x": a + mlp(ln2(x)),
        "the MLP ran before attention: attention first, then the MLP":
            (lambda y: y + attn(ln1(y)))(x + mlp(ln2(x))),
        "the attention sublayer is missing: the block is attention, then the MLP": x + mlp(ln2(x)),
        "the MLP sublayer is missing: after attention comes x = x + mlp(ln_2(x))": a,
    }


def check_block(fn: Callable, model: torch.nn.Module | None = None) -> Result:
    """Check ``fn(x, layer) -> x``: one GPT-2 block (``layer`` is a ``transformers`` GPT-2 block with
    ``ln_1``, ``attn``, ``ln_2``, ``mlp``) on ``x`` of shape ``(batch, positions, width)``: pre-norm
    attention and MLP, each added to the residual stream.

    Tried on every layer of a small random GPT-2 with random norm gains, and of ``model`` (e.g.
    ``tiny.model``) when given.
    """
    models = [_random_gpt2()] + ([model] if model is not None else [])
    gen = torch.Generator().manual_seed(5)
    for m in models:
        width = m.config.n_embd
        for i, layer in enumerate(m.transformer.h):
            for shape in ((1, 6, width), (2, 1, width), (1, 9, width)):
                x = torch.randn(*shape, generator=gen) * (1 + 2 * i)
                given = x.clone()
                with torch.no_grad():
                    out, error = _tensor_answer(
                        fn, given, layer, original=x, noun="the new stream x",
                        in_place="your block changed its input in place (x += ...): write x = x + ... "
                                 "so the caller's tensor is left alone")
                    if error is not None:
                        return error
                    if out.shape != x.shape:
                        return Result(False, f"the block must keep the shape {tuple(x.shape)} (batch, positions, width); "
                                             f"got {tuple(out.shape)}")
                    variants = _block_variants(x, layer)
                    want = variants.pop("ok")
                    if torch.equal(out, x):
                        return Result(False, "the block returned its input unchanged: add the attention result, "
                                             "then the MLP result, to x")
                    if torch.allclose(out, want, atol=1e-4, rtol=1e-4):
                        continue
                    for hint, wrong in variants.items():
                        if torch.allclose(out, wrong, atol=1e-4, rtol=1e-4):
                            return Result(False, hint)
                    if shape[1] > 1 and torch.allclose(out[:, :1], want[:, :1], atol=1e-4, rtol=1e-4):
                        return Result(False, "position 0 is right but later ones are not: is the attention causal, "
                                             "and does each position keep its own residual?")
                    return Result(False, f"on layer {i} with x of shape {shape} the result differs from the block "
                                         f"(largest difference {float((out - want).abs().max()):.3g})")
    return Result(True, "correct: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) — norm before, residual add after")


# --- chapter 05: decoding ---------------------------------------------------------------------------


def _ref_top_p_keep(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Reference nucleus set: sorted from most likely, keep tokens while the mass BEFORE them is < p."""
    probs = torch.softmax(logits.double(), -1)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    keep_sorted = before < p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def _top_p_cases(seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(seed)
    spike = torch.tensor([0.2, 6.0, 1.0, -1.0, 0.5])  # the best token alone holds ~0.98
    cases = [(torch.tensor([0.5, 2.0, -1.0, 1.0, 0.1, -3.0]), 0.8), (spike, 0.5), (spike, 0.9)]
    for n, scale, p in [(10, 1.0, 0.9), (50, 2.0, 0.5), (200, 3.0, 0.95), (30, 1.5, 0.1), (1000, 4.0, 0.7),
                        (8, 0.5, 0.99), (12, 2.0, 1.0)]:
        logits = torch.randn(n, generator=gen) * scale
        cases.append((logits[torch.randperm(n, generator=gen)], p))
    return cases


def check_top_p_filter(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Result:
    """Check ``fn(logits, p) -> logits``: nucleus (top-p) filtering of a ``(vocab,)`` logits vector.

    Keep the smallest set of most likely tokens whose probabilities add up to at least ``p`` (the token
    that crosses ``p`` is kept; the most likely token always is); the others get ``-inf``; kept logits
    are returned unchanged, each at its own position.
    """
    for logits, p in _top_p_cases():
        given = logits.clone()
        out, error = _tensor_answer(
            fn, given, p, original=logits, noun="the logits",
            in_place="your function changed the logits it was given (in place): work on a copy "
                     "(e.g. logits.masked_fill(...), which returns a new tensor)")
        if error is not None:
            return error
        if out.shape != logits.shape:
            return Result(False, f"return one logit per token, shape {tuple(logits.shape)}; got {tuple(out.shape)}")
        out = out.double()
        keep = _ref_top_p_keep(logits, p)
        kept = torch.isfinite(out)
        case = f"(p = {p}, {len(logits)} tokens)"
        if torch.equal(kept, keep):
            if not torch.allclose(out[kept], logits.double()[kept], atol=1e-5):
                renormalised = torch.softmax(logits.double()[kept], -1)
                if (torch.allclose(out[kept], torch.softmax(logits.double(), -1)[kept], atol=1e-6)
                        or torch.allclose(out[kept], renormalised, atol=1e-6)):
                    return Result(False, f"you returned probabilities {case}: return the LOGITS, with -inf for "
                                         "the dropped tokens")
                return Result(False, f"the kept tokens' logits changed {case}: leave them as they are "
                                     "(sampling renormalises anyway)")
            continue
        best = int(torch.argmax(logits))
        probs = torch.softmax(logits.double(), -1)
        if not torch.isneginf(out).any() and (out[~keep] == 0).all() and (logits[~keep] != 0).any():
            return Result(False, f"dropped tokens must get -inf (probability 0 after softmax), not 0 {case}: "
                                 "a logit of 0 is an ordinary score")
        sorted_desc = torch.sort(logits, descending=True).values.double()
        if kept.any() and torch.allclose(out[kept], sorted_desc[kept], atol=1e-6) and not torch.allclose(
                out[kept], logits.double()[kept], atol=1e-6):
            return Result(False, f"the result is in sorted order {case}: put each kept logit back at its "
                                 "token's position (scatter by the sort order)")
        if kept.any() and (~kept).any() and float(probs[kept].min()) < float(probs[~kept].max()) - 1e-12:
            return Result(False, f"you kept a less likely token while dropping a more likely one {case}: "
                                 "sort from the most to the least likely")
        if not bool(kept[best]):
            return Result(False, f"the most likely token was dropped {case}: it is always kept, even when "
                                 "its own probability is above p")
        if kept.sum() > keep.sum():
            return Result(False, f"you kept tokens after the cumulative probability passed p {case}: kept "
                                 f"{int(kept.sum())}, the nucleus has {int(keep.sum())}")
        return Result(False, f"you dropped the token that makes the total reach p {case}: keep the smallest set "
                             "whose probability is AT LEAST p — the token that crosses p stays")
    return Result(True, "correct: the nucleus is the smallest set of most likely tokens holding at least p")


def _random_bert(seed: int = 6):
    """A small random BERT masked LM and its mask id (the last vocabulary entry)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32, type_vocab_size=1,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    return model, 59


def check_masked_prediction(fn: Callable, loaded=None) -> Result:
    """Check ``fn(model, ids, position, mask_id) -> (token_id, probability)``: hide ``ids[position]``
    behind the mask token, run the masked LM, and return its most likely token AT that position and
    that token's probability.

    Tried on a small random BERT, and on ``loaded`` (e.g. ``load("tiny-mlm")``) when given.
    """
    gen = torch.Generator().manual_seed(7)
    model, mask_id = _random_bert()
    trials = []
    for n, pos in ((8, 3), (5, 0), (12, 11), (6, 2)):
        trials.append((model, mask_id, torch.randint(0, 58, (n,), generator=gen).tolist(), pos))
    if loaded is not None:
        tok = loaded.tokenizer
        for text in ("ROMEO:\nBut soft, what light through yonder window breaks?", "KING:\nMy lord, I pray you."):
            ids = tok(text)["input_ids"]
            trials += [(loaded.model, tok.mask_token_id, ids, pos) for pos in (1, len(ids) // 2, len(ids) - 1)]
    for model, mask_id, ids, pos in trials:
        given = list(ids)
        out, error = _call(fn, model, given, pos, mask_id)
        if error is not None:
            return error
        if given != ids:
            return Result(False, "your function changed the caller's list of ids: copy it before putting the "
                                 "mask in (masked = list(ids))")
        try:
            token, prob = int(out[0]), float(out[1])
        except (TypeError, ValueError, IndexError):
            return Result(False, f"return a pair (token_id, probability), got {out!r}")

        def predict(inputs, at):
            with torch.no_grad():
                logits = model(torch.tensor([inputs])).logits[0, at].double()
            probs = torch.softmax(logits, -1)
            return int(torch.argmax(probs)), float(probs.max()), float(logits.max())

        masked = list(ids)
        masked[pos] = mask_id
        want, want_p, want_logit = predict(masked, pos)
        if token == want and abs(prob - want_p) < 1e-4:
            continue
        case = f"(position {pos} of {len(ids)})"
        if token == want:
            if abs(prob - want_logit) < 1e-4:
                return Result(False, f"you returned the logit {case}: the probability is softmax(logits)[token]")
            return Result(False, f"the token is right but its probability should be {want_p:.4f}, got {prob:.4f} "
                                 f"{case}: softmax over the vocabulary (the last axis) at the masked position")
        unmasked, _, _ = predict(ids, pos)
        if token == unmasked and unmasked != want:
            return Result(False, f"the model saw the answer {case}: replace ids[position] by the mask token "
                                 "before running the model")
        for shift, where in ((-1, "one position early"), (1, "one position late")):
            if 0 <= pos + shift < len(ids) and token == predict(masked, pos + shift)[0] and token != want:
                return Result(False, f"you read the logits {where} {case}: a masked LM predicts the token AT "
                                     "the mask — no shift, unlike a causal LM's next token")
        return Result(False, f"at {case} the masked LM's top token is {want}, you returned {token}")
    return Result(True, "correct: mask the position, run the encoder once, read the prediction AT the mask")


# --- chapter 06: LoRA's forward pass -----------------------------------------------------------------


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> Result:
    """Check ``fn(x, W, A, B, alpha, r) -> y``: LoRA's output ``x @ W + (x @ A) @ B * alpha / r``
    for ``x`` (batch, in), ``W`` (in, out), ``A`` (in, r), ``B`` (r, out)."""
    gen = torch.Generator().manual_seed(6)
    for n_in, n_out, r, alpha in [(8, 5, 2, 4.0), (12, 12, 3, 1.0), (6, 10, 1, 16.0)]:
        x, W = torch.randn(4, n_in, generator=gen), torch.randn(n_in, n_out, generator=gen)
        A, B = torch.randn(n_in, r, generator=gen), torch.randn(r, n_out, generator=gen)
        y, failed = _call(fn, x.clone(), W.clone(), A.clone(), B.clone(), alpha, r)
        if failed is not None:  # a Result is falsy when it did not pass
            return failed
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (4, n_out):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            return Result(False, f"the output should have shape (batch, out) = (4, {n_out}), got {got}")
        base, update = x @ W, (x @ A) @ B
        want = base + update * alpha / r
        if torch.allclose(y, want, atol=1e-4, rtol=1e-4):
            continue
        if torch.allclose(y, base, atol=1e-4):
            return Result(False, "you returned the frozen layer alone: add the low-rank path (x @ A) @ B")
        if torch.allclose(y, update * alpha / r, atol=1e-4, rtol=1e-4):
            return Result(False, "you returned only the low-rank update: LoRA ADDS it to the frozen output x @ W")
        if torch.allclose(y, base + update, atol=1e-4, rtol=1e-4):
            return Result(False, f"the update is not scaled (alpha={alpha}, r={r}): multiply it by alpha / r")
        if torch.allclose(y, base + update * r / alpha, atol=1e-4, rtol=1e-4):
            return Result(False, "the scale is upside down: it is alpha / r, not r / alpha")
        return Result(False, f"for in={n_in}, out={n_out}, r={r} the output differs from x @ W + (x @ A) @ B * alpha / r")
    return Result(True, "correct: the frozen path plus a rank-r update scaled by alpha / r")


# --- chapter 07: efficiency — int8 quantization and the roofline --------------------------------------


def _int8_rows(seed: int = 7) -> list[torch.Tensor]:
    """Rows to quantize: random scales, one large outlier, all negative, a single value, all zeros."""
    gen = torch.Generator().manual_seed(seed)
    outlier = torch.randn(16, generator=gen) * 0.1
    outlier[5] = 3.0
    return [torch.randn(32, generator=gen), torch.randn(64, generator=gen) * 0.02, outlier,
            -torch.rand(8, generator=gen) - 0.5, torch.tensor([0.3]), torch.zeros(6)]


def _int8_hint(row: torch.Tensor, q: torch.Tensor, scale: float) -> str | None:
    """The symptom of a wrong (q, scale) for ``row``, or None when it is right."""
    absmax = float(row.abs().max())
    if absmax == 0:
        if scale != scale or not torch.isfinite(q).all() or q.abs().max() != 0:
            return "a row of zeros must give codes 0 (and a finite scale): do not divide by a scale of 0"
        return None
    want = absmax / 127
    if not torch.equal(q, torch.round(q)):
        return "the codes must be whole numbers: return round(x / scale), not the dequantized values"
    if abs(scale - 127 / absmax) < 1e-6 * max(1.0, 127 / absmax) and abs(scale - want) > 1e-9:
        return "the scale is upside down: scale = max|x| / 127, so that x / scale fills [-127, 127]"
    if abs(scale - absmax / 128) < 1e-9 or abs(scale - absmax / 255) < 1e-9:
        return "symmetric int8 uses [-127, 127]: scale = max|x| / 127"
    if abs(scale - want) > 1e-6 * want:
        if abs(scale - float(row.max()) / 127) < 1e-9:
            return "use the largest ABSOLUTE value, max|x|, or negative values fall outside [-127, 127]"
        return f"the scale should be max|x| / 127 = {want:.6g}, got {scale:.6g}"
    if q.abs().max() > 127:
        return "codes fall outside [-127, 127]: scale = max|x| / 127"
    if torch.equal(q, torch.trunc(row / scale)) and not torch.equal(q, torch.round(row / scale)):
        return "you cut off the fraction: ROUND x / scale to the nearest integer, so the error stays within scale / 2"
    if not torch.equal(q, torch.round(row / scale)):
        return "the codes should be round(x / scale) for every value of the row"
    return None


def check_int8_row(fn: Callable[[torch.Tensor], tuple[torch.Tensor, float]]) -> Result:
    """Check ``fn(row) -> (q, scale)``: symmetric int8 with ``scale = max|x| / 127`` and
    ``q = round(x / scale)``, so that ``|x - q × scale| <= scale / 2``."""
    for row in _int8_rows():
        answer, error = _call(fn, row.clone(), case=f"a row of {len(row)} values")
        if error is not None:
            return error
        try:
            q, scale = torch.as_tensor(answer[0]).float(), float(answer[1])
        except (TypeError, ValueError, IndexError, RuntimeError):
            return Result(False, f"return (q, scale): the codes as a tensor and the scale as a number, got {answer!r}")
        if q.shape != row.shape:
            return Result(False, f"q should have the row's shape {tuple(row.shape)}, got {tuple(q.shape)}")
        hint = _int8_hint(row, q, scale)
        if hint is not None:
            return Result(False, f"on a row of {len(row)} values: {hint}")
    return Result(True, "correct: one scale max|x| / 127 per row, codes round(x / scale); each value comes back "
                        "within scale / 2")


def _roofline_cases() -> list[tuple[float, float, float, float]]:
    """(flops, bytes, peak FLOP/s, bandwidth bytes/s): memory-bound, compute-bound, at the ridge, a GEMV."""
    return [(2e6, 4e6, 50e9, 20e9), (2e9, 3e6, 50e9, 20e9), (5e6, 2e6, 50e9, 20e9),
            (2 * 576 * 576, 4 * 576 * 576, 33e9, 12e9)]


def check_attainable(fn: Callable[[float, float, float, float], float]) -> Result:
    """Check ``fn(flops, nbytes, peak, bandwidth) -> FLOP/s``: the roofline's
    ``min(peak, flops / nbytes × bandwidth)``."""
    for flops, nbytes, peak, bw in _roofline_cases():
        case = f"an op of {flops:.3g} FLOPs and {nbytes:.3g} bytes on peak {peak:.3g} FLOP/s, bandwidth {bw:.3g} B/s"
        answer, error = _call(fn, flops, nbytes, peak, bw, case=case)
        if error is not None:
            return error
        try:
            got = float(answer)
        except (TypeError, ValueError, RuntimeError):
            return Result(False, f"return the attainable FLOP/s as a number, got {answer!r}")
        intensity = flops / nbytes
        want = min(peak, intensity * bw)

        def near(x: float) -> bool:
            return abs(got - x) <= 1e-6 * abs(x)

        if near(want):
            continue
        if near(intensity * bw):
            return Result(False, f"for {case} you exceed the peak: the roof is flat at peak FLOP/s — take min(peak, ...)")
        if near(peak):
            return Result(False, f"for {case} memory is the limit: intensity × bandwidth is below the peak "
                                 "— take min(peak, ...)")
        if near(max(peak, intensity * bw)):
            return Result(False, "the roof is the LOWER of the two limits: min, not max")
        if near(min(peak, nbytes / flops * bw)):
            return Result(False, "arithmetic intensity is FLOPs per byte (flops / nbytes), not bytes per FLOP")
        if near(intensity):
            return Result(False, "that is the intensity itself: multiply by the bandwidth to get FLOP/s")
        return Result(False, f"for {case} the roof is min(peak, flops / nbytes × bandwidth) = {want:.4g}, got {got:.4g}")
    return Result(True, "correct: below the ridge an op is held by memory (intensity × bandwidth), above it by the peak")
