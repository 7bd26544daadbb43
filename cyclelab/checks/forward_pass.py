"""Chapter 04's checks: a GPT-2 block from its pieces, LayerNorm and RMSNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, checker, close, name_the_mistake, tensor_answer
from cyclelab.checks.models import random_gpt2
from cyclelab.checks.recipes import float64_copy, made


def _block_variants(x: torch.Tensor, layer) -> dict[str, torch.Tensor]:
    """The right block (``"ok"``) and the typical wrong ones, each named by its symptom."""
    from cyclelab.lab.forward_by_hand import gelu_mlp, layer_norm, self_attention

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
        "the MLP result replaced the stream instead of being added to it: x = x + mlp(ln_2(x)) (the residual add)": mlp(
            ln2(a)
        ),
        "no residual adds at all: each sublayer must ADD its result to x (x = x + ...), not replace it": mlp(
            ln2(attn(ln1(x)))
        ),
        "the norm comes after the residual add (post-norm, as in the 2017 transformer); GPT-2 normalises each "
        "sublayer's INPUT: x + attn(ln_1(x))": ln2(post + mlp(post)),
        "you normalised the sublayer's output; GPT-2 normalises its input: x + attn(ln_1(x)), not x + ln_1(attn(x))": (
            lambda y: y + ln2(mlp(y))
        )(x + ln1(attn(x))),
        "the residual add starts from the normalised x; add the sublayer's result to the raw stream x": (
            lambda y: ln2(y) + mlp(ln2(y))
        )(h + attn(h)),
        "ln_1 and ln_2 are swapped: ln_1 goes before attention, ln_2 before the MLP": (lambda y: y + mlp(ln1(y)))(
            x + attn(ln2(x))
        ),
        "both sublayers used ln_1: the MLP has its own norm, ln_2": a + mlp(ln1(a)),
        "the MLP read the stream from BEFORE attention wrote into it (a parallel block): run the MLP on the "
        "updated x": a + mlp(ln2(x)),
        "the MLP ran before attention: attention first, then the MLP": (lambda y: y + attn(ln1(y)))(x + mlp(ln2(x))),
        "the attention sublayer is missing: the block is attention, then the MLP": x + mlp(ln2(x)),
        "the MLP sublayer is missing: after attention comes x = x + mlp(ln_2(x))": a,
        "the attention is not causal: each position also read the positions after it — give the layer's "
        "attention a causal mask (keys j > i set to -inf)": (lambda y: y + mlp(ln2(y)))(
            x + self_attention(ln1(x), layer.attn, causal=False)
        ),
    }


def _block_cases(model: torch.nn.Module | None, seed: int = 5):
    """(layer index, layer, x) to try: every layer of the random GPT-2, of its float64 copy, and of
    ``model`` when given, on three shapes each."""

    gen = torch.Generator().manual_seed(seed)
    random_model = made(random_gpt2(), "cyclelab.checks.models:random_gpt2")
    double = made(float64_copy(random_model), "cyclelab.checks.recipes:float64_copy", random_model)
    for m in [random_model, double] + ([model] if model is not None else []):
        dtype, width = next(m.parameters()).dtype, m.config.n_embd
        for i, layer in enumerate(m.transformer.h):
            for shape in ((1, 6, width), (2, 1, width), (1, 9, width)):
                yield i, layer, (torch.randn(*shape, generator=gen) * (1 + 2 * i)).to(dtype)


@checker
def check_block(fn: Callable, model: torch.nn.Module | None = None) -> str:
    """Check ``fn(x, layer) -> x``: one GPT-2 block (``layer`` is a ``transformers`` GPT-2 block with
    ``ln_1``, ``attn``, ``ln_2``, ``mlp``) on ``x`` of shape ``(batch, positions, width)``: pre-norm
    attention and MLP, each added to the residual stream.

    Tried on every layer of a small random GPT-2 with random norm gains (in float32 and float64), and
    of ``model`` (e.g. ``tiny.model``) when given.
    """
    for i, layer, x in _block_cases(model):
        shape = tuple(x.shape)
        with torch.no_grad():
            out = tensor_answer(
                fn,
                x.clone(),
                layer,
                noun="the new stream x",
                case=f"layer {i}, x of shape {shape}",
                in_place="your block changed its input (x += ... or the layer's weights) in place: "
                "write x = x + ... so the caller's tensor is left alone",
            )
            if out.shape != x.shape:
                raise Failed(f"the block must keep the shape {shape} (batch, positions, width); got {tuple(out.shape)}")
            variants = {hint: wrong.double() for hint, wrong in _block_variants(x, layer).items()}
            want = variants.pop("ok")
            if torch.equal(out, x.double()):
                raise Failed(
                    "the block returned its input unchanged: add the attention result, then the MLP result, to x"
                )
            if close(out, want):
                continue
            name_the_mistake(out, variants)
            if shape[1] > 1 and close(out[:, :1], want[:, :1]):
                raise Failed(
                    "position 0 is right but later ones are not: is the attention causal, "
                    "and does each position keep its own residual?"
                )
            raise Failed(
                f"on layer {i} with x of shape {shape} the result differs from the block "
                f"(largest difference {float((out - want).abs().max()):.3g})"
            )
    return "correct: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) — norm before, residual add after"


# --- chapter 04: LayerNorm and RMSNorm ------------------------------------------------------------------


def _norm_cases(seed: int = 14):
    """(x, weight, bias, eps) to normalise over the last axis: offset means (so a missing centring
    shows), a large eps (so a misplaced eps shows), float64, a non-contiguous view and, last, a
    constant vector (variance 0: only eps keeps it finite)."""
    gen = torch.Generator().manual_seed(seed)

    def case(shape, eps, dtype=torch.float32, offset=3.0):
        x = torch.randn(*shape, generator=gen, dtype=dtype) * 2 + offset
        d = shape[-1]
        weight = 1 + 0.5 * torch.randn(d, generator=gen, dtype=dtype)
        return x, weight, 0.3 * torch.randn(d, generator=gen, dtype=dtype), eps

    yield case((3, 16), 0.5)
    yield case((2, 5, 8), 1e-5)
    yield case((12,), 0.1, offset=-4.0)
    yield case((2, 3, 32), 1e-6, torch.float64)
    x, w, b, eps = case((6, 10), 0.2)
    yield x.T.contiguous().T, w, b, eps  # the same values as a non-contiguous view
    x, w, b, eps = case((2, 8), 1e-5)
    yield torch.cat([x[:1], torch.full((1, 8), 1.5)]), w, b, eps


def _layer_norm_variants(x, weight, bias, eps) -> dict[str, torch.Tensor]:
    """Typical wrong LayerNorms, each named by its symptom (float64)."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    centred = x - mean
    variants = {
        "you used the unbiased variance (divide by n − 1): LayerNorm divides by n — x.var(dim=-1, unbiased=False)": centred
        / torch.sqrt(x.var(-1, keepdim=True) + eps)
        * weight
        + bias,
        "eps is missing: add it to the variance inside the square root, sqrt(var + eps)": centred
        / torch.sqrt(var)
        * weight
        + bias,
        "eps was added to the standard deviation: it goes inside the square root, sqrt(var + eps)": centred
        / (torch.sqrt(var) + eps)
        * weight
        + bias,
        "you did not subtract the mean: that is RMSNorm — LayerNorm centres first, x − mean": x
        / torch.sqrt(var + eps)
        * weight
        + bias,
        "you divided by the variance: divide by its square root, the standard deviation": centred / (var + eps) * weight
        + bias,
        "the learned gain and bias are missing: y = x̂ · weight + bias": centred / torch.sqrt(var + eps),
        "the bias is missing: y = x̂ · weight + bias": centred / torch.sqrt(var + eps) * weight,
        "the bias was added before the gain: multiply by weight first, then add bias": (
            centred / torch.sqrt(var + eps) + bias
        )
        * weight,
    }
    if x.dim() >= 2 and x.shape[-2] > 1:
        m0, v0 = x.mean(-2, keepdim=True), x.var(-2, unbiased=False, keepdim=True)
        variants["normalised over the wrong axis: each vector (the LAST axis, dim=-1) is normalised on its own"] = (
            x - m0
        ) / torch.sqrt(v0 + eps) * weight + bias
    return variants


def _rms_norm_variants(x, weight, eps) -> dict[str, torch.Tensor]:
    """Typical wrong RMSNorms, each named by its symptom (float64)."""
    ms = x.pow(2).mean(-1, keepdim=True)
    variants = {
        "you subtracted the mean: RMSNorm does not centre, it divides x itself by sqrt(mean(x²) + eps)": (
            x - x.mean(-1, keepdim=True)
        )
        / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        * weight,
        "you divided by the vector's length (the square root of the SUM of squares): RMS is sqrt(MEAN(x²))": x
        / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps)
        * weight,
        "you divided by the mean square: take its square root, sqrt(mean(x²) + eps) (or torch.rsqrt)": x
        / (ms + eps)
        * weight,
        "eps is missing: add it to the mean square inside the square root": x / torch.sqrt(ms) * weight,
        "eps was added after the square root: it goes inside, sqrt(mean(x²) + eps)": x
        / (torch.sqrt(ms) + eps)
        * weight,
        "the learned gain is missing: multiply by weight": x / torch.sqrt(ms + eps),
        "you multiplied by (1 + weight), Gemma's convention: Llama multiplies by weight itself": x
        / torch.sqrt(ms + eps)
        * (1 + weight),
        "you divided by the mean ABSOLUTE value: RMS is the root of the mean of the squares, sqrt(mean(x²))": x
        / (x.abs().mean(-1, keepdim=True) + eps)
        * weight,
    }
    if x.dim() >= 2 and x.shape[-2] > 1:
        variants["normalised over the wrong axis: each vector (the LAST axis, dim=-1) is normalised on its own"] = (
            x / torch.sqrt(x.pow(2).mean(-2, keepdim=True) + eps) * weight
        )
    return variants


def _check_norm(fn: Callable, name: str, with_bias: bool, reference: Callable, variants: Callable) -> None:
    """Run ``fn`` on every norm case; raise :class:`Failed` at the first that does not match ``reference``."""
    for x, weight, bias, eps in _norm_cases():
        args = (x, weight, bias, eps) if with_bias else (x, weight, eps)
        out = tensor_answer(fn, *args, noun="the normalised tensor (the shape of x)")
        want = reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        if out.shape != want.shape:
            raise Failed(
                f"{name} keeps the shape of x {tuple(x.shape)}, got {tuple(out.shape)}: normalise "
                "each vector (mean over dim=-1 with keepdim=True), do not reduce it away"
            )
        if close(out, want):
            continue
        if torch.isnan(out).any():
            raise Failed(
                "NaN in the output: a constant vector has variance 0 — eps inside the square root "
                "keeps the division finite"
            )
        name_the_mistake(out, variants(*(a.double() if isinstance(a, torch.Tensor) else a for a in args)))
        raise Failed(
            f"for x of shape {tuple(x.shape)} and eps {eps} the result differs from {name} "
            f"(largest difference {float((out - want).abs().max()):.3g})"
        )


@checker
def check_layer_norm(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]) -> str:
    """Check ``fn(x, weight, bias, eps) -> y``: LayerNorm over the last axis, against
    ``torch.nn.functional.layer_norm``."""

    def reference(x, weight, bias, eps):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)

    _check_norm(fn, "LayerNorm", True, reference, _layer_norm_variants)
    return "correct: centre, divide by sqrt(var + eps) with the variance over n, then gain and bias"


@checker
def check_rms_norm(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> str:
    """Check ``fn(x, weight, eps) -> y``: RMSNorm over the last axis (Llama's), against
    ``torch.nn.functional.rms_norm``."""

    def reference(x, weight, eps):
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)

    _check_norm(fn, "RMSNorm", False, reference, _rms_norm_variants)
    return "correct: divide by sqrt(mean(x²) + eps), then the gain — no centring, no bias"
