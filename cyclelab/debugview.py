"""The debugger's views: small pure functions from plain data to HTML.

Widget mode puts each HTML string in an ``ipywidgets.HTML``; text mode turns the same
string into plain text with :func:`to_text`. Nothing here touches the model.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from .cycle import Cost, CycleRecord, Stage, show_token
from .viz import STAGE_COLOURS

SMALL = "font-size:12px"


@dataclass(frozen=True)
class Register:
    """One layer's output in the residual stream at the current position."""

    layer: int
    norm: float
    lens: list[tuple[str, float]]  # logit-lens top tokens with probabilities


@dataclass(frozen=True)
class CacheRow:
    """The KV cache of one layer: positions stored and bytes held."""

    layer: int
    length: int
    nbytes: int


@dataclass(frozen=True)
class Attention:
    """Where the current query of one head looks: a weight per earlier token."""

    layer: int
    head: int
    tokens: list[str]
    weights: list[float]


@dataclass(frozen=True)
class Output:
    """One cycle's choice: candidates before and after the logits processors."""

    cycle: int
    token: str
    token_id: int
    forced: bool
    raw_top: list[tuple[int, str, float]]  # softmax of the plain logits
    top: list[tuple[int, str, float]]  # after the processors


@dataclass(frozen=True)
class SamplerStage:
    """One stage of the sampler pipeline: how many tokens survive and the leaders."""

    name: str
    kept: int
    top: list[tuple[str, float]]
    mass: float | None = None  # probability the kept tokens had before this stage (renormalised to 1 after)


@dataclass(frozen=True)
class Draw:
    """The random draw against the cumulative distribution (token ids in order)."""

    u: float | None  # None: greedy (argmax)
    token: str
    low: float  # the picked token's slice [low, high) of [0, 1)
    high: float
    n_kept: int


@dataclass(frozen=True)
class State:
    """Everything the views show at one position of the debugger."""

    model: str
    cycle: int  # cycles completed
    max_cycles: int
    stage: Stage | None
    layer: int | None
    op: str | None
    n_layers: int
    n_inputs: int | None  # tokens fed in this cycle (many: prefill, 1: decode)
    this_op: Cost
    this_cycle: Cost
    total: Cost
    prefill: Cost  # the part of ``total`` spent in cycles that read many tokens at once
    registers: list[Register] = field(default_factory=list)
    memory: list[CacheRow] = field(default_factory=list)
    attention: Attention | None = None
    output: Output | None = None
    sampler: list[SamplerStage] = field(default_factory=list)
    draw: Draw | None = None
    sampling: str = ""
    prompt: str = ""
    records: list[CycleRecord] = field(default_factory=list)
    message: str = ""
    error: str = ""
    notes: list[str] = field(default_factory=list)  # breakpoints, ablation, branches


# ------------------------------------------------------------------ formatting


def human(value: float, unit: str) -> str:
    """1234567 -> '1.23 M' + unit."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def cost_text(cost: Cost) -> str:
    """'12.3 ms · 1.20 GFLOP · 540.00 MB'."""
    return f"{cost.seconds * 1e3:.1f} ms · {human(cost.flops, 'FLOP')} · {human(cost.bytes, 'B')}"


def _box(text: str, background: str = "#eee", colour: str = "#222", title: str = "") -> str:
    tip = f' title="{html.escape(title)}"' if title else ""
    return (f'<span{tip} style="display:inline-block;padding:2px 6px;margin:1px;border-radius:4px;'
            f'background:{background};color:{colour};{SMALL}">{text}</span>')


def _heading(text: str) -> str:
    return f"<div><b>{html.escape(text)}</b></div>"


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th style='text-align:left;padding:0 6px'>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:0 6px'>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table style='{SMALL};border-collapse:collapse'><tr>{head}</tr>{body}</table>"


def _tokens(pairs: list[tuple[str, float]]) -> str:
    return " ".join(f"{html.escape(show_token(t))} {p:.3f}" for t, p in pairs)


# ------------------------------------------------------------------ the views


def render_pipeline(state: State) -> str:
    """The strip FETCH → READ → EXECUTE → WRITEBACK with the current stage lit, and the cost counters."""
    boxes = []
    for stage in Stage:
        if stage == state.stage:
            where = f" L{state.layer}" if state.layer is not None else ""
            boxes.append(_box(f"▶ {stage.value}{where}", STAGE_COLOURS[stage], "white"))
        else:
            boxes.append(_box(stage.value))
    op = html.escape(state.op) if state.op else "(not started)"
    kind = "" if state.n_inputs is None else (
        f" · prefill: {state.n_inputs} tokens in" if state.n_inputs > 1 else " · decode: 1 token in")
    decode = Cost(state.total.seconds - state.prefill.seconds, state.total.flops - state.prefill.flops,
                  state.total.bytes - state.prefill.bytes)
    return (f"<div>{' → '.join(boxes)}</div>"
            f"<div style='{SMALL}'>op <b>{op}</b>: {cost_text(state.this_op)}<br>"
            f"done {state.cycle} of {state.max_cycles} tokens{kind}</div>"
            f"<div style='{SMALL}'>this cycle so far: {cost_text(state.this_cycle)}<br>"
            f"total: {cost_text(state.total)}<br>"
            f"&nbsp;&nbsp;prefill (prompt read at once): {cost_text(state.prefill)}<br>"
            f"&nbsp;&nbsp;decode (one token per cycle): {cost_text(decode)}</div>")


def render_registers(registers: list[Register]) -> str:
    """Residual-stream norm per layer at the current position, and the logit-lens top tokens."""
    title = _heading("Registers: residual stream after each layer (logit lens)")
    if not registers:
        return title + f"<div style='{SMALL}'>(no layer has run yet in this cycle)</div>"
    rows = [[f"L{r.layer}", f"{r.norm:.1f}", _tokens(r.lens)] for r in registers]
    return title + _table(rows, ["layer", "‖x‖", "logit lens top-3"])


def _layer_groups(memory: list[CacheRow]) -> list[tuple[int, int, CacheRow]]:
    """Runs of consecutive layers holding the same number of positions."""
    groups: list[tuple[int, int, CacheRow]] = []
    for row in memory:
        if groups and groups[-1][2].length == row.length and groups[-1][2].nbytes == row.nbytes:
            groups[-1] = (groups[-1][0], row.layer, row)
        else:
            groups.append((row.layer, row.layer, row))
    return groups


def render_memory(memory: list[CacheRow], attention: Attention | None) -> str:
    """The KV cache per layer (positions, bytes) and what one head of the current query reads."""
    total = sum(r.nbytes for r in memory)
    parts = [_heading(f"Memory: KV cache {human(total, 'B')} in {len(memory)} layers")]
    rows = [[f"L{a}" if a == b else f"L{a}–L{b}", str(r.length), f"{human(r.nbytes, 'B')} each"]
            for a, b, r in _layer_groups(memory)]
    parts.append(_table(rows, ["layers", "positions", "bytes"]))
    if attention is None:
        return "".join(parts) + f"<div style='{SMALL}'>(no attention read yet)</div>"
    parts.append(f"<div style='{SMALL}'>layer {attention.layer}, head {attention.head}: "
                 "what the current token reads (darker = more weight)</div><div>")
    boxes = [_box(f"{html.escape(show_token(token))} <sub>{w:.2f}</sub>",
                  f"rgba(221,132,82,{min(1.0, w) * 0.9 + 0.05:.2f})", title=f"{w:.4f}")
             for token, w in zip(attention.tokens, attention.weights)]
    return "".join(parts) + " ".join(boxes) + "</div>"


def render_output(output: Output | None) -> str:
    """The top candidates before and after the logits processors, and the token chosen."""
    title = _heading("Output: next-token candidates")
    if output is None:
        return title + f"<div style='{SMALL}'>(no token chosen yet)</div>"
    after = {i: p for i, _, p in output.top}
    rows = []
    for rank, (i, text, p) in enumerate(output.raw_top):
        mark = "✔" if i == output.token_id else ""
        q = f"{after[i]:.3f}" if i in after else "0 (filtered)"
        rows.append([str(rank), f"{mark}{html.escape(show_token(text))}", f"{p:.3f}", q])
    how = "forced" if output.forced else "chosen"
    chosen = (f"<div style='{SMALL}'>#{output.cycle}: {how} <b>{html.escape(show_token(output.token))}</b> "
              f"(id {output.token_id})</div>")
    return title + _table(rows, ["rank", "token", "p before", "p after"]) + chosen


def render_sampler(stages: list[SamplerStage], draw: Draw | None, sampling: str = "") -> str:
    """logits → penalties → temperature → top-k → top-p → renormalise → the draw, on this cycle's logits."""
    title = _heading(f"Sampler pipeline ({sampling})" if sampling else "Sampler pipeline")
    if not stages:
        return title + f"<div style='{SMALL}'>(no logits yet)</div>"
    rows = [[html.escape(s.name), str(s.kept) + (f" (had p={s.mass:.3f})" if s.mass is not None and s.mass < 0.9995 else ""),
             _tokens(s.top)] for s in stages]
    body = _table(rows, ["stage", "tokens kept", "top (softmax of this stage)"])
    if draw is None:
        return title + body
    if draw.u is None:
        pick = f"greedy: argmax → <b>{html.escape(show_token(draw.token))}</b>"
    else:
        pick = (f"draw u = {draw.u:.4f} falls in the slice [{draw.low:.4f}, {draw.high:.4f}) of "
                f"<b>{html.escape(show_token(draw.token))}</b> (cumulative over {draw.n_kept} tokens, in id order)")
    return title + body + f"<div style='{SMALL}'>{pick}</div>"


def _visible(text: str) -> str:
    """HTML for running text: escaped, newlines shown as ⏎ and broken."""
    return html.escape(text).replace("\n", "⏎<br>")


def render_text_so_far(records: list[CycleRecord], prompt: str = "") -> str:
    """The prompt, then each generated token shaded by the probability it had when chosen."""
    spans = [f"<span style='color:#888'>{_visible(prompt)}</span>"] if prompt else []
    for r in records:
        partial = "\ufffd" in r.token
        border = "border-bottom:2px dotted #c00;" if partial else ""
        tip = f"#{r.cycle} p={r.prob:.3f}" + (" (partial UTF-8 character)" if partial else "") + (" forced" if r.forced else "")
        text = _visible(r.token)
        spans.append(f"<span title='{tip}' style='background:rgba(76,114,176,{0.1 + 0.6 * r.prob:.2f});{border}'>"
                     f"{text}</span>")
    legend = f"<div style='{SMALL};color:#666'>shade = probability of the token when chosen; dotted = partial UTF-8</div>"
    return _heading("Text so far") + f"<div style='white-space:pre-wrap;font-family:monospace'>{''.join(spans)}</div>" + legend


def render_status(message: str, error: str, notes: list[str]) -> str:
    """What just happened, the last error, and the active breakpoints, ablations and branches."""
    parts = []
    if error:
        parts.append(f"<div style='color:#c00'>⚠ {html.escape(error)}</div>")
    if message:
        parts.append(f"<div>{html.escape(message)}</div>")
    parts += [f"<div style='{SMALL}'>{html.escape(n)}</div>" for n in notes]
    return "".join(parts)


# ------------------------------------------------------------------ text mode

_BREAKS = re.compile(r"<br\s*/?>|</div>|</tr>|</table>", re.I)
_CELLS = re.compile(r"</t[dh]>", re.I)
_TAGS = re.compile(r"<[^>]+>")


def to_text(markup: str) -> str:
    """The plain text of a view's HTML: rows and blocks on their own lines."""
    text = _CELLS.sub("  ", _BREAKS.sub("\n", markup.replace("\n", "")))
    text = html.unescape(_TAGS.sub("", text))
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line.strip())


def render_all(state: State) -> dict[str, str]:
    """Every view of ``state`` as HTML, by name."""
    return {
        "pipeline": render_pipeline(state),
        "registers": render_registers(state.registers),
        "memory": render_memory(state.memory, state.attention),
        "output": render_output(state.output),
        "sampler": render_sampler(state.sampler, state.draw, state.sampling),
        "text": render_text_so_far(state.records, state.prompt),
        "status": render_status(state.message, state.error, state.notes),
    }


def render_text(state: State) -> str:
    """The whole debugger as plain text (text mode)."""
    views = render_all(state)
    order = ["pipeline", "status", "text", "output", "sampler", "registers", "memory"]
    return "\n\n".join([f"cycle {state.cycle}"] + [to_text(views[k]) for k in order if to_text(views[k])])
