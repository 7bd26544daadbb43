"""The debugger's views: small pure functions from plain data to HTML pictures.

Widget mode puts each HTML string in an ``ipywidgets.HTML``, the replay page
(:mod:`cyclelab.debugger.replay`) in a ``div``, and text mode turns the same string into plain
text with :func:`to_text`. The pictures are plain HTML and CSS (:data:`STYLE`), coloured
from JupyterLab's theme variables (``--jp-…``) so they read in light and dark themes;
labels drawn only in the picture sit in ``data-t`` attributes, out of the text. Nothing
here touches the model.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from cyclelab.core.events import Cost, CycleRecord, Stage, show_token
from cyclelab.debugger.shading import STAGE_COLOURS
from cyclelab.debugger.style import STAGE_TEXT, shade
from cyclelab.debugger.style import STYLE as STYLE  # re-exported: the views and their stylesheet


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
class Chosen:
    """The token of the last choice shown: the one fact the output, sampler, text and status agree on.

    ``p`` is the token's probability after the sampler's settings of its cycle (penalty, temperature,
    top-k, top-p, min-p: the distribution it was drawn from); ``model_p`` its softmax under the plain
    logits. Greedy decoding without a penalty has the two equal."""

    cycle: int  # the cycle that chose it, counted from 1 (cycle 1 reads the prompt)
    token_id: int
    token: str
    p: float
    model_p: float
    how: str  # "greedy", "sampled" or "forced"
    instead: str | None = None  # when forced: the token the sampler had picked
    written: bool = True  # appended to the text (False at the choose op, before the append)


def p_text(p: float) -> str:
    """A probability as every panel writes it (the same digits everywhere)."""
    return f"{p:.3f}"


@dataclass(frozen=True)
class SamplerStage:
    """One stage of the sampler pipeline: how many tokens survive and the leaders."""

    name: str
    kept: int
    top: list[tuple[str, float]]
    mass: float | None = None  # probability the kept tokens had before this stage (renormalised to 1 after)
    cells: list[tuple[str, float | None]] = field(default_factory=list)  # fixed candidates: p here, None = removed


@dataclass(frozen=True)
class Draw:
    """The random draw against the cumulative distribution (token ids in order)."""

    u: float | None  # None: greedy (argmax)
    token: str  # the sampler's pick (a forced token replaces it: see Chosen)
    low: float  # the picked token's slice [low, high) of [0, 1)
    high: float
    n_kept: int
    p: float | None = None  # the pick's probability after the sampler's settings


@dataclass(frozen=True)
class State:
    """Everything the views show at one position of the debugger."""

    model: str
    cycle: int  # the cycle shown, counted from 1: in progress, or just written back (0 before the first)
    max_cycles: int
    stage: Stage | None
    layer: int | None
    op: str | None
    n_layers: int
    n_inputs: int | None  # tokens fed in this cycle (many: prefill, 1: decode)
    this_op: Cost
    this_cycle: Cost
    total: Cost
    prefill: Cost  # the part of ``total`` spent reading the prompt (cycle 1)
    reread: Cost = field(default_factory=Cost)  # the part spent reading the context again after a branch (a restart)
    done: int | None = None  # tokens written back (None: ``cycle``)
    chosen: Chosen | None = None  # the last choice shown
    preview: str = ""  # new sampler settings not yet used by any choice shown, and what they would keep
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
    timeline: list[CycleRecord] = field(default_factory=list)  # every cycle computed on this timeline
    branches: list[list[CycleRecord]] = field(default_factory=list)  # the cycles of each earlier branch
    max_positions: int = 0  # prompt + max_cycles: the KV cache's size when full
    encoder_memory: list[CacheRow] = field(default_factory=list)  # encoder-decoder: the encoder's keys/values per layer
    cross: Attention | None = None  # encoder-decoder: where one cross-attention head of the current token looks
    changed: frozenset[str] = frozenset()  # views (names as in render_all) that differ from before the last command

    @property
    def written(self) -> int:
        """Tokens written back so far."""
        return self.cycle if self.done is None else self.done


# ------------------------------------------------------------------ look (the stylesheet: style.py)


def _pct(x: float) -> str:
    return f"{100 * max(0.0, min(1.0, x)):.1f}%"


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


def _esc(token: str) -> str:
    return html.escape(show_token(token))


def _panel(title: str, body: str, key: str = "", cls: str = "") -> str:
    """A panel: its title as a heading, a one-line key to its notation (if any), then ``body``."""
    key = f"<p class='cld-key' title='{html.escape(key)}'>{key}</p>" if key else ""
    return f"<div class='cld{cls}'><h3 class='cld-h'>{html.escape(title)}</h3>{key}{body}</div>"


# One-line keys to each panel's notation (shown under its title).
KEYS = {
    "registers": "‖x‖ = length (norm) of the layer's output vector · top-k = the tokens it would predict now, "
    "stronger blue = likelier · ↻ = top-1 changed from the layer below",
    "memory": "each layer keeps a key and a value per position · chips: how much the current token reads each "
    "earlier one, stronger orange = more weight",
    "output": "model p = softmax of the raw scores (grey bar) · p = after the sampler's settings (blue bar), "
    "what the token is drawn from",
    "sampler": "each row: the tokens a step keeps (struck through: removed) · T = temperature · u = the random "
    "number the draw compares with the running total of p",
    "text": "stronger blue = likelier when chosen (log scale: 1% none, 10% half, 100% full) · dotted underline = "
    "part of a UTF-8 character",
    "cost": "ms = milliseconds on this machine · FLOP = arithmetic operations counted · B = bytes of weights "
    "and cache read and written",
    "branches": "the row 'now' is this timeline · red outline = the first token that differs",
}


def _note(text: str) -> str:
    return f"<div class='cld-dim'>{text}</div>"


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='cld-t'><tr>{head}</tr>{body}</table>"


def _tokens(pairs: list[tuple[str, float]]) -> str:
    return " ".join(f"{_esc(t)} {p:.3f}" for t, p in pairs)


def _bar(p: float, width: int = 70, raw: bool = False) -> str:
    """A probability bar ``p`` of ``width`` px, then the number."""
    kind = " cld-raw" if raw else ""
    return f"<span class='cld-bar{kind}' style='width:{max(1.0, p * width):.0f}px'></span>{p:.3f}"


# ------------------------------------------------------------------ the views


def render_pipeline(state: State) -> str:
    """The strip FETCH → READ → EXECUTE → WRITEBACK (never wrapping) with the current stage and op lit,
    one line of where the run is, and a stacked bar of the time spent in prefill, re-reads (after a branch)
    and decode."""
    boxes = []
    for stage in Stage:
        if stage == state.stage:
            where = f" L{state.layer}" if state.layer is not None else ""
            op = f" · {html.escape(state.op)}" if state.op else ""
            boxes.append(
                f"<span class='cld-box cld-on' style='background:{STAGE_COLOURS[stage]};color:{STAGE_TEXT[stage]}'>"
                f"▶ {stage.value}{where}{op}</span>"
            )
        else:
            boxes.append(f"<span class='cld-box'>{stage.value}</span>")
    op = html.escape(state.op) if state.op else "(not started)"
    kind = ""
    if state.n_inputs is not None:
        kind = " · decode: 1 token in"
        if state.n_inputs > 1:
            kind = f" · {'prefill' if state.cycle <= 1 else 're-read'}: {state.n_inputs} tokens in"
    total = state.total.seconds or 1.0
    segments = "".join(
        f"<span class='cld-seg' style='width:{_pct(cost.seconds / total)};background:{colour}'></span>"
        for _, cost, colour in _cost_parts(state)
    )
    stack = (
        f"<div class='cld-stack' style='width:160px;height:10px;display:inline-flex;margin:0 0 0 8px' "
        f"title='time so far: prefill (blue), re-read after a branch (purple), decode (green)'>{segments}</div>"
    )
    return (
        f"<div class='cld'><div class='cld-strip'>{'<span> → </span>'.join(boxes)}</div>"
        f"<div class='cld-line'>cycle {state.cycle} of {state.max_cycles} · {state.written} tokens written{kind} · "
        f"op <b>{op}</b>{stack}</div></div>"
    )


def _cost_parts(state: State) -> list[tuple[str, Cost, str]]:
    """The total split into prefill, re-reads (after a branch; only when there were any) and decode."""
    decode = Cost(
        state.total.seconds - state.prefill.seconds - state.reread.seconds,
        state.total.flops - state.prefill.flops - state.reread.flops,
        state.total.bytes - state.prefill.bytes - state.reread.bytes,
    )
    parts = [("prefill (cycle 1 reads the prompt at once)", state.prefill, "#4C72B0")]
    if state.reread.flops or state.reread.seconds:
        parts.append(("re-read (a branch restarts: prompt and tokens so far read again)", state.reread, "#8172B3"))
    parts.append(("decode (one token per cycle)", decode, "#55A868"))
    return parts


def render_cost(state: State) -> str:
    """The cost counters: this op, this cycle, the total, and the total split into prefill, re-read and decode."""
    op = html.escape(state.op) if state.op else "(not started)"
    lines = "".join(
        f"<div><span style='color:{colour}'>■</span> {name}: {cost_text(cost)}</div>"
        for name, cost, colour in _cost_parts(state)
    )
    return _panel(
        "Cost: time, arithmetic and memory traffic",
        f"<div>op <b>{op}</b>: {cost_text(state.this_op)}</div>"
        f"<div>this cycle so far: {cost_text(state.this_cycle)}</div>"
        f"<div>total: {cost_text(state.total)}</div>{lines}",
        KEYS["cost"],
    )


def render_registers(registers: list[Register]) -> str:
    """The logit lens as a layers × top-tokens grid, each cell shaded by its probability; ↻ marks a
    layer whose top-1 differs from the layer below (where the model changes its mind)."""
    title = "Registers: logit lens of the residual stream after each layer"
    if not registers:
        return _panel(title, _note("(no layer has run yet in this cycle)"), KEYS["registers"])
    rows, below = [], None
    for r in registers:
        cells = [f"L{r.layer}", f"{r.norm:.1f}"]
        for k, (token, p) in enumerate(r.lens):
            mark = "↻ " if k == 0 and below is not None and token != below else ""
            cells.append(
                f"<span class='cld-chip cld-tok cld-sh' style='{shade(p)}'>{mark}{_esc(token)}</span>"
                f" <span class='cld-dim'>{p:.3f}</span>"
            )
        below = r.lens[0][0] if r.lens else None
        rows.append(cells)
    header = ["layer", "‖x‖"] + [f"top-{k + 1}" for k in range(len(registers[0].lens))]
    return _panel(title, _table(rows, header), KEYS["registers"])


def _layer_groups(memory: list[CacheRow]) -> list[tuple[int, int, CacheRow]]:
    """Runs of consecutive layers holding the same number of positions."""
    groups: list[tuple[int, int, CacheRow]] = []
    for row in memory:
        if groups and groups[-1][2].length == row.length and groups[-1][2].nbytes == row.nbytes:
            groups[-1] = (groups[-1][0], row.layer, row)
        else:
            groups.append((row.layer, row.layer, row))
    return groups


def _cache_blocks(memory: list[CacheRow], max_positions: int) -> str:
    """One block per layer, as wide as its bytes against the cache when full (``max_positions``)."""
    per_position = max((r.nbytes / r.length for r in memory if r.length), default=0.0)
    full = per_position * max(max_positions, max((r.length for r in memory), default=0))
    return "".join(
        f"<div class='cld-kv' data-t='L{r.layer}'><span style='width:{_pct(r.nbytes / full if full else 0)}'>"
        "</span></div>"
        for r in memory
    )


def render_memory(
    memory: list[CacheRow],
    attention: Attention | None,
    max_positions: int = 0,
    encoder_memory: list[CacheRow] | None = None,
    cross: Attention | None = None,
) -> str:
    """The KV cache (one block per layer, sized by bytes) and what one head of the current query reads; for an
    encoder-decoder also the encoder memory (written once) and where one cross-attention head reads it."""
    if encoder_memory:
        return _two_memories(memory, attention, max_positions, encoder_memory, cross)
    total = sum(r.nbytes for r in memory)
    rows = [
        [f"L{a}" if a == b else f"L{a}–L{b}", str(r.length), f"{human(r.nbytes, 'B')} each"]
        for a, b, r in _layer_groups(memory)
    ]
    parts = [_table(rows, ["layers", "positions", "bytes"]), _cache_blocks(memory, max_positions)]
    parts.append(_reads(attention, "what the current token reads"))
    return _panel(f"Memory: KV cache {human(total, 'B')} in {len(memory)} layers", "".join(parts), KEYS["memory"])


def _reads(attention: Attention | None, what: str) -> str:
    """One head's weights over the tokens it reads, as shaded chips."""
    if attention is None:
        return _note("(no attention read yet)")
    chips = "".join(
        f"<span class='cld-chip cld-tok cld-sh' style='{shade(w, 'orange')}' title='weight {w:.4f}'>{_esc(token)}"
        f" <sub>{w:.2f}</sub></span> "
        for token, w in zip(attention.tokens, attention.weights)
    )
    return f"<div style='margin-top:6px'>layer {attention.layer}, head {attention.head}: {what}</div><div>{chips}</div>"


def _two_memories(
    memory: list[CacheRow], attention: Attention | None, max_positions: int, encoder: list[CacheRow], cross
) -> str:
    """The encoder-decoder's memory panel: the decoder KV cache (grows a position a cycle) and the encoder
    memory (the source's keys and values for each decoder layer's cross-attention, written once)."""
    dec, enc = sum(r.nbytes for r in memory), sum(r.nbytes for r in encoder)
    rows = [
        [f"L{r.layer}", str(r.length), human(r.nbytes, "B"), str(e.length), human(e.nbytes, "B")]
        for r, e in zip(memory, encoder)
    ]
    header = ["layer", "KV cache positions", "bytes", "encoder memory positions", "bytes"]
    parts = [_table(rows, header), _cache_blocks(memory, max_positions)]
    parts += [_reads(attention, "what the current token reads in the KV cache (self-attention)")]
    parts += [_reads(cross, "what it reads in the encoder memory (cross-attention, over the source)")]
    title = f"Memory: KV cache {human(dec, 'B')} + encoder memory {human(enc, 'B')} in {len(memory)} layers"
    return _panel(title, "".join(parts), KEYS["memory"])


def chosen_words(chosen: Chosen) -> str:
    """'chose ␣art (p 0.074, greedy)', 'forced ␣hast (p 0.021) instead of ␣art': one choice, as every view says it."""
    token = show_token(chosen.token)
    if chosen.how == "forced":
        return f"forced {token} (p {p_text(chosen.p)}) instead of {show_token(chosen.instead or '')}"
    verb = "sampled" if chosen.how == "sampled" else "chose"
    return f"{verb} {token} (p {p_text(chosen.p)}{', greedy' if chosen.how == 'greedy' else ''})"


def render_output(output: Output | None, chosen: Chosen | None = None) -> str:
    """The top candidates as probability bars: the model's (grey) and after the sampler's settings (blue)."""
    title = "Output: next-token candidates"
    if output is None:
        return _panel(title, _note("(no token chosen yet)"), KEYS["output"])
    after = {i: p for i, _, p in output.top}
    rows = []
    for rank, (i, text, p) in enumerate(output.raw_top):
        mark = "✔" if i == output.token_id else ""
        q = _bar(after[i]) if i in after else "0 (filtered)"
        rows.append([str(rank), f"{mark}<span class='cld-tok'>{_esc(text)}</span>", _bar(p, raw=True), q])
    if chosen is None:
        how = "forced" if output.forced else "chosen"
        line = f"cycle {output.cycle + 1}: {how} <b class='cld-tok'>{_esc(output.token)}</b> (id {output.token_id})"
    else:
        if all(i != chosen.token_id for i, _, _ in output.raw_top):  # a forced token from further down
            q = _bar(chosen.p) if chosen.p > 0 else "0 (filtered)"
            rows.append(["…", f"✔<span class='cld-tok'>{_esc(chosen.token)}</span>", _bar(chosen.model_p, raw=True), q])
        pending = "" if chosen.written else " (not yet written back)"
        line = (
            f"cycle {chosen.cycle}: {html.escape(chosen_words(chosen))}{pending} · id {chosen.token_id}"
            f" · model p {p_text(chosen.model_p)}"
        )
    return _panel(title, _table(rows, ["rank", "token", "model p", "p"]) + f"<div>{line}</div>", KEYS["output"])


def _stage_bar(cells: list[tuple[str, float | None]], before: list[tuple[str, float | None]] | None) -> str:
    """A stacked bar of the fixed candidates at one stage; those it removed greyed, as wide as they were,
    and listed struck through."""
    segs, removed = [], []
    for k, (token, p) in enumerate(cells):
        was = before[k][1] if before else None
        if p is None and was:
            removed.append(f"<s class='cld-tok'>{_esc(token)}</s>")
            segs.append(f"<span class='cld-seg cld-gone' style='width:{_pct(was)}' data-t='{_esc(token)}'></span>")
        elif p:
            segs.append(
                f"<span class='cld-seg cld-sh' style='width:{_pct(p)};{shade(p)}' data-t='{_esc(token)}' "
                f"title='{_esc(token)} p={p:.4f}'></span>"
            )
    gone = f"<div class='cld-dim'>removed here: {' '.join(removed)}</div>" if removed else ""
    return f"<div class='cld-stack'>{''.join(segs)}</div>{gone}"


def _draw_bar(draw: Draw) -> str:
    """The cumulative bar [0, 1) (token ids in order): the chosen token's slice, and where ``u`` fell."""
    return (
        f"<div class='cld-cum' title='cumulative probability, tokens in id order'>"
        f"<span class='cld-slice' style='left:{_pct(draw.low)};width:{_pct(draw.high - draw.low)}'></span>"
        f"<span class='cld-u' style='left:{_pct(draw.u)}' data-t='u'></span></div>"
    )


def render_sampler(
    stages: list[SamplerStage],
    draw: Draw | None,
    sampling: str = "",
    chosen: Chosen | None = None,
    preview: str = "",
) -> str:
    """logits → penalties → temperature → top-k → top-p → renormalise → the draw: one bar row per stage
    (the tokens a stage removes greyed), and the draw ``u`` on the cumulative bar; a forced token is
    named beside the sampler's own pick, and new settings not yet used are a preview line."""
    title = f"Sampler pipeline ({sampling})" if sampling else "Sampler pipeline"
    after = f"<div class='cld-dim'>{html.escape(preview)}</div>" if preview else ""
    if not stages:
        return _panel(title, _note("(no logits yet)") + after, KEYS["sampler"])
    rows, before = [], None
    for s in stages:
        had = f" (had p={s.mass:.3f})" if s.mass is not None and s.mass < 0.9995 else ""
        rows.append(
            f"<div><b>{html.escape(s.name)}</b> <span class='cld-dim'>{s.kept} kept{had} · "
            f"top {_tokens(s.top)}</span></div>" + (_stage_bar(s.cells, before) if s.cells else "")
        )
        before = s.cells or before
    if draw is None:
        return _panel(title, "".join(rows) + after, KEYS["sampler"])
    p = "" if draw.p is None else f" (p {p_text(draw.p)})"
    if draw.u is None:
        pick = f"<div>greedy: argmax → <b class='cld-tok'>{_esc(draw.token)}</b>{p}</div>"
    else:
        pick = (
            f"<div>draw u = {draw.u:.4f} falls in the slice [{draw.low:.4f}, {draw.high:.4f}) of "
            f"<b class='cld-tok'>{_esc(draw.token)}</b>{p} (cumulative over {draw.n_kept} tokens, in id order)</div>"
            + _draw_bar(draw)
        )
    if chosen is not None and chosen.how == "forced":
        pick += (
            f"<div>but cycle {chosen.cycle} {html.escape(chosen_words(chosen))}: "
            "the sampler's pick was overridden</div>"
        )
    return _panel(title, "".join(rows) + pick + after, KEYS["sampler"])


def _visible(text: str) -> str:
    """HTML for running text: escaped, newlines shown as ⏎ and broken."""
    return html.escape(text).replace("\n", "⏎<br>")


def render_text_so_far(records: list[CycleRecord], prompt: str = "") -> str:
    """The prompt, then each generated token shaded by the probability it had when chosen."""
    spans = [f"<span class='cld-dim'>{_visible(prompt)}</span>"] if prompt else []
    for r in records:
        partial = "\ufffd" in r.token
        border = "border-bottom:2px dotted #c00;" if partial else ""
        tip = (
            f"#{r.cycle} p={r.prob:.3f}"
            + (" (partial UTF-8 character)" if partial else "")
            + (" forced" if r.forced else "")
        )
        spans.append(f"<span title='{tip}' class='cld-sh' style='{shade(r.prob)};{border}'>{_visible(r.token)}</span>")
    prose = f"<div class='cld-prose'><div style='white-space:pre-wrap'>{''.join(spans)}</div></div>"
    return _panel("Text so far", prose, KEYS["text"], " cld-fill")


def _fork(a: list[CycleRecord], b: list[CycleRecord]) -> tuple[int, int]:
    """(fork, divergence): the first cycle whose record differs at all, and the first whose token differs."""
    same = lambda x, y: x.token_id == y.token_id and abs(x.prob - y.prob) < 1e-6 and x.forced == y.forced  # noqa: E731
    fork = next((k for k, (x, y) in enumerate(zip(a, b)) if not same(x, y)), min(len(a), len(b)))
    split = next((k for k, (x, y) in enumerate(zip(a, b)) if x.token_id != y.token_id), min(len(a), len(b)))
    return fork, split


def _chip(r: CycleRecord | None, split: int) -> str:
    if r is None:
        return "<span class='cld-chip'>&nbsp;</span>"
    mark = " cld-fork" if r.cycle == split else ""
    tip = f"#{r.cycle} p={r.prob:.3f}" + (" forced" if r.forced else "") + (" first divergence" if mark else "")
    return f"<span class='cld-chip cld-tok cld-sh{mark}' style='{shade(r.prob)}' title='{tip}'>{_esc(r.token)}</span>"


def _lanes(timeline: list[CycleRecord], old: list[CycleRecord], index: int, cycles: range, split: int) -> str:
    """Two rows, now and branch ``index``, one column per cycle of ``cycles``."""
    rows = [
        [f"<span class='cld-dim'>{label}</span>"] + [_chip(recs[k] if k < len(recs) else None, split) for k in cycles]
        for label, recs in (("now", timeline), (f"branch {index}", old))
    ]
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table class='cld-t cld-lanes'>{body}</table>"


def render_branches(timeline: list[CycleRecord], branches: list[list[CycleRecord]], columns: int = 8) -> str:
    """Each earlier branch under the current timeline, aligned at their fork (in blocks of ``columns``
    cycles that wrap), tokens shaded by probability; the first token that differs is outlined in red."""
    title = "Branches side by side"
    if not branches:
        return _panel(title, _note("(no branch yet: Choose another token or Ablate a head)"), KEYS["branches"])
    parts = []
    for index, old in list(enumerate(branches))[-3:]:
        fork, split = _fork(timeline, old)
        shared = "".join(r.token for r in timeline[:fork])
        n = max(len(timeline), len(old))
        blocks = "".join(
            _lanes(timeline, old, index, range(start, min(n, start + columns)), split)
            for start in range(fork, n, columns)
        )
        where = f"first different token: cycle {split + 1}" if split < n else "same tokens so far"
        parts.append(
            f"<div class='cld-dim'>branch {index}: fork at cycle {fork + 1} after "
            f"<span class='cld-tok'>{html.escape(show_token(shared[-40:]))}</span> · {where}</div>"
            f"<div style='margin-bottom:6px'>{blocks}</div>"
        )
    return _panel(title, "".join(parts), KEYS["branches"])


def render_status(message: str, error: str, notes: list[str]) -> str:
    """What just happened, the last error, and the active breakpoints, ablations and branches."""
    parts = []
    if error:
        parts.append(f"<div class='cld-err'>⚠ {html.escape(error)}</div>")
    if message:
        parts.append(f"<div>{html.escape(message)}</div>")
    parts += [f"<div class='cld-dim'>{html.escape(n)}</div>" for n in notes]
    return f"<div class='cld' role='status' aria-live='polite'>{''.join(parts)}</div>"


# ------------------------------------------------------------------ text mode

_BREAKS = re.compile(r"<br\s*/?>|</div>|</tr>|</table>|</h3>|</p>", re.I)
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
        "cost": render_cost(state),
        "registers": render_registers(state.registers),
        "memory": render_memory(state.memory, state.attention, state.max_positions, state.encoder_memory, state.cross),
        "output": render_output(state.output, state.chosen),
        "sampler": render_sampler(state.sampler, state.draw, state.sampling, state.chosen, state.preview),
        "text": render_text_so_far(state.records, state.prompt),
        # only what is generated by this cycle: no token from after it (stepping back, or in a replay)
        "branches": render_branches(state.timeline[: state.written], [b[: state.written] for b in state.branches]),
        "status": render_status(state.message, state.error, state.notes),
    }
