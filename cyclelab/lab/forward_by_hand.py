"""The EXECUTE stage taken apart: norms, MLPs, residual adds, the logit lens, and what a cycle costs.

Chapter 04 builds a transformer block from these pieces and checks it against the engine and
against ``transformers``:

* :func:`layer_norm` (GPT-2) and :func:`rms_norm` (Llama), written out;
* :func:`gelu` and :func:`silu`, and the two MLPs, :func:`gelu_mlp` (GPT-2) and :func:`swiglu_mlp` (Llama);
* :func:`self_attention` for a GPT-2 layer (chapter 03 in one call): with the norm and the MLP, the
  pieces of the chapter's exercise, a whole block;
* :func:`sublayer` in its pre-LN, post-LN and residual-free orders, and :func:`stack_gradients`: why the
  residual path keeps a deep stack trainable;
* :func:`residual_stream` and :func:`logit_lens`: the *registers* of the processor, layer by layer, and
  what the model would say if it stopped after each layer;
* :func:`cost_table`, :func:`per_token_costs` and :func:`matmul_parameters`: FLOPs, bytes and time per
  op and per token, from the engine's own event costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cyclelab.core.events import Trace, show_token
from cyclelab.core.norms import layer_norm, rms_norm  # noqa: F401 (the norms the engine runs, re-exported for the chapter)
from cyclelab.lab.attention_heads import merge_heads, scaled_dot_product_attention, split_heads
from cyclelab.loading.schema import is_int

# ------------------------------------------------------------------ activations and MLPs


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU, ``x · Φ(x)``: exactly with the error function (``"none"``) or GPT-2's tanh approximation."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU (swish), ``x · sigmoid(x)``: the gate of Llama's SwiGLU MLP."""
    return x * torch.sigmoid(x)


def conv1d(x: torch.Tensor, conv) -> torch.Tensor:
    """GPT-2's ``Conv1D`` is a linear layer whose weight is stored as (in, out): ``x @ W + b``."""
    return x @ conv.weight + conv.bias


def gelu_mlp(h: torch.Tensor, mlp, approximate: str = "tanh") -> torch.Tensor:
    """GPT-2's MLP on normalised input ``h``: widen 4× (``c_fc``), GELU, narrow back (``c_proj``)."""
    return conv1d(gelu(conv1d(h, mlp.c_fc), approximate), mlp.c_proj)


def swiglu_mlp(h: torch.Tensor, mlp) -> torch.Tensor:
    """Llama's SwiGLU MLP: ``down(silu(gate(h)) * up(h))`` — a gated product instead of one activation."""
    gate = h @ mlp.gate_proj.weight.T
    up = h @ mlp.up_proj.weight.T
    return (silu(gate) * up) @ mlp.down_proj.weight.T


def self_attention(h: torch.Tensor, attn, causal: bool = True) -> torch.Tensor:
    """A GPT-2 layer's self-attention on normalised input ``h`` ``(batch, T, width)``.

    The Q/K/V projection (``c_attn``), the heads split, scaled dot-product attention (chapter 03;
    causal unless ``causal=False``, as an encoder's is), the heads merged, the output projection
    (``c_proj``).
    """
    out, _ = scaled_dot_product_attention(*project_qkv(h, attn), causal=causal)
    return project_out(out, attn)


def project_qkv(h: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GPT-2 layer's queries, keys and values ``(batch, heads, T, head_dim)`` of normalised ``h``
    ``(batch, T, width)``: one projection (``c_attn``), cut in three, each split into heads."""
    q, k, v = conv1d(h, attn.c_attn).split(h.shape[-1], dim=-1)
    return split_heads(q, attn.num_heads), split_heads(k, attn.num_heads), split_heads(v, attn.num_heads)


def project_out(out: torch.Tensor, attn) -> torch.Tensor:
    """The heads' outputs ``(batch, heads, T, head_dim)`` merged and projected back (``c_proj``): the
    GPT-2 layer's attention result ``(batch, T, width)``, to add to the stream."""
    return conv1d(merge_heads(out), attn.c_proj)


ORDERS = ("pre", "post", "none")  #: where a sublayer's norm sits, and whether it has a residual path


def sublayer(x: torch.Tensor, f, norm, order: str = "pre") -> torch.Tensor:
    """One sublayer ``f`` (attention or the MLP) with its norm, in one of three orders:

    * ``"pre"`` (pre-LN: GPT-2, Llama): ``x + f(norm(x))`` — the residual path carries x untouched;
    * ``"post"`` (post-LN: the 2017 transformer, BERT): ``norm(x + f(x))`` — every norm sits on the path;
    * ``"none"``: ``f(norm(x))`` — no residual path at all.
    """
    if order == "pre":
        return x + f(norm(x))
    if order == "post":
        return norm(x + f(x))
    if order == "none":
        return f(norm(x))
    raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")


def stack_gradients(order: str, depth: int, width: int = 64, batch: int = 16, seed: int = 0) -> list[float]:
    """Gradient norm reaching each layer's weight matrix in a random stack of ``depth`` sublayers
    (each ``gelu(h @ W.T)``, weights of unit gain, with a LayerNorm) put together in ``order``
    (:func:`sublayer`); the loss is a fixed random projection of the output. Entry 0 is the first layer."""
    if not is_int(depth) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(width, width, generator=gen) / math.sqrt(width)).requires_grad_() for _ in range(depth)]
    x = torch.randn(batch, width, generator=gen)
    target = torch.randn(batch, width, generator=gen)

    def norm(h):
        return torch.nn.functional.layer_norm(h, (width,))

    for w in weights:
        x = sublayer(x, lambda h, w=w: torch.nn.functional.gelu(h @ w.T), norm, order)
    ((x * target).sum() / batch).backward()
    return [float(w.grad.norm()) for w in weights]


# ------------------------------------------------------------------ the residual stream and the logit lens


def residual_stream(engine, prompt) -> torch.Tensor:
    """The residual stream of one prefill: ``(n_layers + 1, positions, width)``.

    Row 0 is what enters the first block (the FETCH output: token embedding, plus learned positions
    for GPT-2); row ``i + 1`` is the stream after block ``i`` (the engine's ``residual_mlp``).
    """
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(engine.arch.n_layers)]
    _, cache = engine.run_with_cache(prompt, names=names)
    return torch.stack([cache[name][0] for name in names])


@dataclass
class LensRow:
    """The logit lens at one (layer, position): the top tokens if the model stopped there.

    ``layer`` is the block after which the stream is read; -1 is the embedding (before any block).
    """

    layer: int
    position: int
    token_ids: list[int]
    tokens: list[str]
    probs: list[float]


def logit_lens(engine, prompt, k: int = 3, embedding: bool = True) -> list[LensRow]:
    """Apply the final norm and the unembedding to the residual stream after every layer.

    Returns one :class:`LensRow` per (layer, position), layers in order (the embedding first, as
    layer -1, when ``embedding``). The rows of the last layer are the model's real output.
    """
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    stream = residual_stream(engine, prompt)
    if not embedding:
        stream = stream[1:]
    first = -1 if embedding else 0
    logits = engine.read_out(stream)  # (layers, positions, vocab)
    top = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    rows = []
    for li in range(stream.shape[0]):
        for pos in range(stream.shape[1]):
            ids = [int(i) for i in top.indices[li, pos]]
            rows.append(
                LensRow(
                    li + first, pos, ids, [engine.token_text(i) for i in ids], [float(p) for p in top.values[li, pos]]
                )
            )
    return rows


def figure_token(token: str) -> str:
    """A token made visible for a figure: ␣ for spaces, ⏎ for newlines, control bytes as \\xNN."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in show_token(token))


def plot_logit_lens(rows: list[LensRow], tokens: list[str], ax=None, title: str = "", fontsize: float = 7):
    """A layer × position grid: each cell shows the lens's top-1 token, coloured by its probability.

    ``tokens`` are the input tokens (the x axis: the cell at position i predicts token i + 1);
    a cell is outlined when its top-1 token is the one that actually comes next in the input.
    """
    import matplotlib.pyplot as plt

    layers = sorted({r.layer for r in rows})
    n_pos = max(r.position for r in rows) + 1
    grid = torch.zeros(len(layers), n_pos)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.75 * n_pos, 0.8 + 0.32 * len(layers)))
    for r in rows:
        grid[layers.index(r.layer), r.position] = r.probs[0]
    image = ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto", origin="lower")
    for r in rows:
        y = layers.index(r.layer)
        ax.text(
            r.position,
            y,
            figure_token(r.tokens[0])[:8],
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if r.probs[0] > 0.6 else "black",
        )
        if r.position + 1 < len(tokens) and r.tokens[0] == tokens[r.position + 1]:
            ax.add_patch(plt.Rectangle((r.position - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#C44E52", lw=1.2))
    ax.set_xticks(range(n_pos), [figure_token(t) for t in tokens[:n_pos]], rotation=60, fontsize=fontsize)
    ax.set_yticks(range(len(layers)), ["embed" if lay == -1 else f"L{lay}" for lay in layers], fontsize=fontsize)
    ax.set(xlabel="input token (the cell predicts what comes after it)", ylabel="stream read after")
    ax.set_title(title, fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="top-1 probability")
    return ax


def plot_residual_norms(norms: dict[str, torch.Tensor], ax=None):
    """Norm of the residual stream after each layer: one line per model (median over positions),
    and a dashed line for position 0, which many models use as an attention sink.

    ``norms[name]`` is ``(n_layers + 1, positions)``, e.g. ``residual_stream(...).norm(dim=-1)``.
    The x axis is the fraction of the depth, so models of different depths line up.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for (name, norm), colour in zip(norms.items(), ("#4C72B0", "#DD8452", "#55A868", "#C44E52")):
        depth = torch.linspace(0, 1, norm.shape[0])
        median = norm[:, 1:].median(dim=1).values if norm.shape[1] > 1 else norm[:, 0]
        ax.plot(depth, median, "o-", color=colour, ms=3, label=f"{name} ({norm.shape[0] - 1} layers): median position")
        ax.plot(depth, norm[:, 0], "--", color=colour, label=f"{name}: position 0")
    ax.set_yscale("log")
    ax.set(
        xlabel="depth (0 = embedding, 1 = after the last block)",
        ylabel="‖x‖ (log scale)",
        title="The residual stream grows as the layers write into it",
    )
    ax.legend(fontsize=7)
    return ax


# ------------------------------------------------------------------ counting the work


@dataclass
class CostRow:
    """The summed cost of one op (at one layer, or over all layers when ``layer`` is None)."""

    op: str
    layer: int | None
    stage: str
    calls: int
    flops: int
    bytes: int
    seconds: float


def _cycles_of(trace: Trace, cycles: slice | None) -> range:
    """The cycle numbers selected by ``cycles`` (all when None); raises if none or no events were kept."""
    if not trace.events:
        raise ValueError("the trace kept no events: run the engine with keep_events=True")
    chosen = range(len(trace.records))[cycles if cycles is not None else slice(None)]
    if not chosen:
        raise ValueError("no cycles selected")
    return chosen


def cost_table(trace: Trace, cycles: slice | None = None, by_layer: bool = True) -> list[CostRow]:
    """Events of ``trace`` summed by (op, layer) — or by op over all layers with ``by_layer=False`` —
    over the chosen cycles (all by default; ``slice(0, 1)`` is the prefill, ``slice(1, None)`` decoding).

    Rows come in the order the ops first ran.
    """
    chosen = set(_cycles_of(trace, cycles))
    sums: dict[tuple, CostRow] = {}
    for e in trace.events:
        if e.cycle not in chosen:
            continue
        key = (e.op, e.layer if by_layer else None)
        row = sums.setdefault(key, CostRow(e.op, key[1], e.stage.value, 0, 0, 0, 0.0))
        row.calls += 1
        row.flops += e.flops
        row.bytes += e.bytes
        row.seconds += e.seconds
    return list(sums.values())


def per_token_costs(trace: Trace) -> dict[str, dict[str, float]]:
    """FLOPs, bytes and seconds per token for the prefill (cycle 0: every prompt token) and for decoding
    (the later cycles: one token each), and their arithmetic intensity (FLOPs per byte)."""
    out = {}
    n_prompt = len(trace.prompt_ids)
    for name, cycles, tokens in (
        ("prefill", slice(0, 1), n_prompt),
        ("decode", slice(1, None), len(trace.records) - 1),
    ):
        if tokens < 1:
            continue
        rows = cost_table(trace, cycles, by_layer=False)
        flops, nbytes = sum(r.flops for r in rows), sum(r.bytes for r in rows)
        out[name] = {
            "tokens": tokens,
            "flops": flops / tokens,
            "bytes": nbytes / tokens,
            "seconds": sum(r.seconds for r in rows) / tokens,
            "flops_per_byte": flops / max(nbytes, 1),
        }
    return out


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix multiply for every token: the weights of all linear
    layers (GPT-2's ``Conv1D`` included) and of the unembedding. Embedding lookups, norms and biases
    are not counted. Each such weight costs one multiply and one add per token: about 2 FLOPs."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            total += module.weight.numel()
    return total


def format_cost_table(rows: list[CostRow], per: int = 1, times: bool = True) -> str:
    """A text table of cost rows (divided by ``per``, e.g. the number of tokens), with each op's share."""
    total_f = sum(r.flops for r in rows) or 1
    total_s = sum(r.seconds for r in rows) or 1.0
    head = f"{'op':<14} {'layer':>5} {'stage':<9} {'MFLOP':>9} {'share':>6} {'kB':>9}"
    lines = [head + (f" {'ms':>7} {'share':>6}" if times else "")]
    for r in rows:
        layer = "all" if r.layer is None else str(r.layer)
        line = (
            f"{r.op:<14} {layer:>5} {r.stage:<9} {r.flops / per / 1e6:>9.3f} {r.flops / total_f:>6.1%} "
            f"{r.bytes / per / 1e3:>9.1f}"
        )
        if times:
            line += f" {r.seconds / per * 1e3:>7.3f} {r.seconds / total_s:>6.1%}"
        lines.append(line)
    return "\n".join(lines)


def plot_cost_breakdown(trace: Trace, axes=None):
    """Where a cycle's work and time go, op by op (summed over layers): share of FLOPs and share of
    measured time, for the prefill and for the decode cycles."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    phases = [("prefill", slice(0, 1))] + ([("decode", slice(1, None))] if len(trace.records) > 1 else [])
    ops = [r.op for r in cost_table(trace, slice(0, 1), by_layer=False) if r.op != "append"]
    width = 0.8 / len(phases)
    for ax, (what, label) in zip(axes, (("flops", "share of FLOPs"), ("seconds", "share of measured time"))):
        for j, (phase, cycles) in enumerate(phases):
            rows = {r.op: r for r in cost_table(trace, cycles, by_layer=False)}
            total = sum(getattr(rows[o], what) for o in ops if o in rows) or 1
            shares = [getattr(rows[o], what) / total if o in rows else 0 for o in ops]
            ax.barh(
                [i + (j - (len(phases) - 1) / 2) * width for i in range(len(ops))],
                shares,
                height=width,
                label=phase,
                color=("#4C72B0", "#C44E52")[j],
            )
        ax.set_yticks(range(len(ops)), ops, fontsize=8)
        ax.set(xlabel=label)
        ax.xaxis.set_major_locator(plt.matplotlib.ticker.MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    axes[0].set_ylim(len(ops) - 0.5, -0.5)  # the first op at the top (the axes share y)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{trace.model}: work per op", fontsize=9)
    axes[1].set_title(f"{trace.model}: time per op", fontsize=9)
    return axes


__all__ = [
    "CostRow",
    "LensRow",
    "conv1d",
    "cost_table",
    "figure_token",
    "format_cost_table",
    "gelu",
    "gelu_mlp",
    "layer_norm",
    "logit_lens",
    "matmul_parameters",
    "per_token_costs",
    "plot_cost_breakdown",
    "plot_logit_lens",
    "plot_residual_norms",
    "project_out",
    "project_qkv",
    "residual_stream",
    "rms_norm",
    "self_attention",
    "silu",
    "stack_gradients",
    "sublayer",
    "swiglu_mlp",
]
