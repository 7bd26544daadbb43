"""Why did it say that? Attribution of one output token to the input tokens.

All three methods work in embedding space on one differentiable function, ``f(embeddings) ->
P(target)`` (:func:`target_prob`): the model's own forward pass from ``inputs_embeds``, so gradients flow
(the engine runs without them). Each returns a score per input position (integrated gradients: per
position and embedding dimension; sum the last axis for a score per token).

* :func:`occlusion` — zero one token's embedding and measure how far P(target) falls (a LIME-like
  perturbation, one position at a time);
* :func:`gradient_x_input` — the first-order guess of that fall: gradient times input, summed per token;
* :func:`integrated_gradients` — the gradient averaged along the straight path from a baseline (zeros)
  to the input, times (input - baseline): its scores add up to ``f(input) - f(baseline)``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

import torch

from cyclelab.loading.loader import Loaded
from cyclelab.loading.schema import is_int

ProbFn = Callable[[torch.Tensor], torch.Tensor]


def embeddings_of(loaded: Loaded, ids: Sequence[int]) -> torch.Tensor:
    """The input embeddings of ``ids``, ``(1, positions, width)``: the rows the model's first op reads."""
    if not isinstance(loaded, Loaded):
        raise TypeError(f"give a Loaded model (cyclelab.load(...)), got {type(loaded).__name__}")
    table = loaded.model.get_input_embeddings().weight
    if not ids or not all(isinstance(i, int) and 0 <= i < table.shape[0] for i in ids):
        raise ValueError(f"ids must be a non-empty list of token ids in 0..{table.shape[0] - 1}, got {list(ids)[:8]}")
    return table[torch.tensor([list(ids)])].detach()


def target_prob(loaded: Loaded, target: int) -> ProbFn:
    """``f(embeddings (batch, positions, width)) -> (batch,)``: P(``target``) at the last position."""
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if not is_int(target) or not 0 <= target < vocab:
        raise ValueError(f"target must be one token id in 0..{vocab - 1}, got {target!r}")

    def f(embeddings: torch.Tensor) -> torch.Tensor:
        logits = loaded.model(inputs_embeds=embeddings).logits[:, -1]
        return torch.softmax(logits.float(), -1)[:, target]

    return f


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 1 or not x.is_floating_point():
        raise ValueError(
            f"the input must be ONE sequence of embeddings, a float tensor (1, positions, width); got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )


def occlusion(f: ProbFn, x: torch.Tensor) -> torch.Tensor:
    """``f(x) - f(x with position i zeroed)`` for each position ``i``, ``(positions,)``; one batched call."""
    _check_input(x)
    n = x.shape[1]
    occluded = x.repeat(n, 1, 1)
    occluded[torch.arange(n), torch.arange(n)] = 0
    with torch.no_grad():
        return f(x)[0] - f(occluded)


def _gradient(f: ProbFn, points: torch.Tensor) -> torch.Tensor:
    """d f / d points for a batch of points (each row's output depends on its row only)."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(f(points).sum(), points)
    return grad


def gradient_x_input(f: ProbFn, x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``f`` at ``x`` times ``x``, summed over the width: ``(positions,)``."""
    _check_input(x)
    return (_gradient(f, x) * x)[0].sum(-1)


def integrated_gradients(
    f: ProbFn, x: torch.Tensor, baseline: torch.Tensor | None = None, steps: int = 16
) -> torch.Tensor:
    """``(x - baseline) ×`` the mean gradient at the midpoints ``baseline + (k + ½)/steps · (x - baseline)``,
    ``(positions, width)`` (captum's ``riemann_middle``). Baseline: zeros."""
    _check_input(x)
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    baseline = torch.zeros_like(x) if baseline is None else baseline
    if baseline.shape != x.shape:
        raise ValueError(f"the baseline's shape {tuple(baseline.shape)} must equal the input's {tuple(x.shape)}")
    alphas = (torch.arange(steps, dtype=x.dtype) + 0.5) / steps
    path = baseline + alphas[:, None, None] * (x - baseline)  # (steps, positions, width)
    return ((x - baseline) * _gradient(f, path).mean(0))[0]


def shaded_text(tokens: Sequence[str], scores: torch.Tensor | Sequence[float], label: str = "") -> str:
    """HTML of ``tokens`` on backgrounds shaded by ``scores`` (red: pushes the target up, blue: down;
    strongest = full colour); the score in each token's tooltip. Plain HTML, no scripts."""
    scores = [float(s) for s in scores]
    if len(scores) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores: give one score per token")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(
            f"score {bad[0]} is {scores[bad[0]]}: shading needs finite scores (a NaN or infinity "
            "usually means the attribution overflowed; check the model and the target)"
        )
    top = max(map(abs, scores), default=0.0) or 1.0
    spans = []
    for token, s in zip(tokens, scores):
        rgb = "214,39,40" if s >= 0 else "31,119,180"
        spans.append(
            f'<span title="{s:+.4g}" style="background:rgba({rgb},{abs(s) / top:.2f});white-space:pre;'
            f'padding:1px 0;border-radius:2px">{html.escape(token)}</span>'
        )
    head = f'<b style="display:inline-block;min-width:11em">{html.escape(label)}</b>' if label else ""
    return f'<div style="font-family:monospace;line-height:1.9">{head}{"".join(spans)}</div>'


__all__ = ["embeddings_of", "gradient_x_input", "integrated_gradients", "occlusion", "shaded_text", "target_prob"]
