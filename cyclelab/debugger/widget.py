"""The debugger's ipywidgets face: buttons call the :class:`~cyclelab.debugger.session.Debugger`'s commands.

Every view is the ``value`` of a widget (HTML or Label), so tests and a browser read the
same strings; nothing relies on ``Output`` capture, which needs a front end. Only standard
ipywidgets and the views' own stylesheet (:data:`~cyclelab.debugger.views.STYLE`, in an HTML widget)
are used, so the same widget works in JupyterLab 4 and Jupyter Notebook 7, offline. The panels
sit in a grid that reflows from one to three columns (about 800 to 1600 px), the settings in tabs,
and every control keeps its whole label (rows wrap instead of squeezing them).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import ipywidgets as w
import torch

from cyclelab.core.events import show_token
from cyclelab.core.ops import OPS
from cyclelab.debugger.views import STYLE, render_all, render_status

if TYPE_CHECKING:  # for the annotation only: the debugger imports this module, never the reverse
    from cyclelab.debugger.session import Debugger


class DebuggerUI:
    """The ipywidgets face of a :class:`Debugger`: buttons call its commands; every view is a widget trait."""

    MOVES = ("Step", "Step layer", "Next token", "Continue", "Back", "Back cycle", "Reset")

    def __init__(self, dbg: Debugger):
        self.dbg, self.busy, self._syncing = dbg, False, False
        dbg.subscribe(self._changed)
        arch = dbg.engine.arch
        c = self.controls = {}
        for name, method in zip(
            self.MOVES, (dbg.step, dbg.step_layer, dbg.next, dbg.cont, dbg.back, dbg.back_cycle, dbg.reset)
        ):
            c[name] = self._button(name, method)
        c["cycle n"] = w.IntText(value=dbg.max_new_tokens, description="n", **_fixed(110))
        c["Run to cycle"] = self._button("Run to cycle", lambda: dbg.run_to(c["cycle n"].value))
        # sampler
        c["sample"] = w.Checkbox(description="sample (off: greedy)", indent=False, **_fixed(170))
        c["temperature"] = w.FloatSlider(
            value=1.0, min=0.0, max=2.0, step=0.05, description="temperature", continuous_update=False, **_fixed(330)
        )
        c["top-k"] = w.IntText(value=0, description="top-k (0: off)", **_fixed(200))
        c["top-p"] = w.FloatSlider(
            value=1.0, min=0.0, max=1.0, step=0.01, description="top-p", continuous_update=False, **_fixed(300)
        )
        c["min-p"] = w.FloatSlider(
            value=0.0, min=0.0, max=1.0, step=0.01, description="min-p (0: off)", continuous_update=False, **_fixed(330)
        )
        c["seed"] = w.IntText(value=-1, description="seed (-1: random)", **_fixed(220))
        c["repetition penalty"] = w.FloatText(value=1.0, description="repetition penalty", **_fixed(230))
        for name in ("sample", "temperature", "top-k", "top-p", "min-p", "seed", "repetition penalty"):
            c[name].observe(self._on_sampling, names="value")
        # breakpoints
        c["break token"] = w.Text(placeholder="token text, or an id", description="token", **_fixed(240))
        c["Break on token"] = self._button(
            "Break on token", lambda: dbg.break_on_token(_token_arg(c["break token"].value))
        )
        c["break p"] = w.FloatText(value=0.01, description="p <", **_fixed(140))
        c["Break below p"] = self._button("Break below p", lambda: dbg.break_below(c["break p"].value))
        c["break entropy"] = w.FloatText(value=3.0, description="entropy >", **_fixed(170))
        c["Break above entropy"] = self._button(
            "Break above entropy", lambda: dbg.break_entropy_above(c["break entropy"].value)
        )
        c["break layer"] = w.IntText(value=-1, description="layer (-1: any)", **_fixed(190))
        c["break op"] = w.Dropdown(options=["(any)"] + OPS, value="(any)", description="op", **_fixed(200))
        c["Break at op"] = self._button(
            "Break at op",
            lambda: dbg.break_at(
                None if c["break layer"].value < 0 else c["break layer"].value,
                None if c["break op"].value == "(any)" else c["break op"].value,
            ),
        )
        c["Break on lens change"] = self._button(
            "Break on lens change", lambda: dbg.break_on_lens_change(c["break layer"].value)
        )
        c["Break if not greedy"] = self._button("Break if not greedy", dbg.break_when_not_greedy)
        c["Clear breakpoints"] = self._button("Clear breakpoints", dbg.clear_breakpoints)
        # interventions
        c["candidates"] = w.Dropdown(options=[], description="candidate", **_fixed(260))
        c["Choose"] = self._button("Choose", lambda: dbg.choose(c["candidates"].value))
        c["ablate layer"] = w.IntText(value=0, description="layer", **_fixed(120))
        c["ablate head"] = w.IntText(value=0, description="head", **_fixed(120))
        c["Ablate head"] = self._button(
            "Ablate head", lambda: dbg.ablate_head(c["ablate layer"].value, c["ablate head"].value)
        )
        c["Clear ablation"] = self._button("Clear ablation", dbg.clear_ablation)
        c["branch"] = w.Dropdown(options=[], description="branch", **_fixed(260))
        c["Switch to branch"] = self._button("Switch to branch", lambda: dbg.switch_branch(c["branch"].value))
        # views' own controls: the head selector of the attention strip, the jump list, export
        c["watch layer"] = w.Dropdown(options=list(range(arch.n_layers)), description="watch layer", **_fixed(160))
        c["watch head"] = w.Dropdown(options=list(range(arch.n_heads)), description="head", **_fixed(110))
        for name in ("watch layer", "watch head"):
            c[name].observe(self._on_watch, names="value")
        c["jump"] = w.Dropdown(options=[("jump to…", -1)], value=-1, description="after token", **_fixed(230))
        c["jump"].observe(self._on_jump, names="value")
        c["export path"] = w.Text(value="trace.json", description="file", **_fixed(240))
        c["Export"] = self._button("Export", lambda: dbg.export(c["export path"].value))
        c["Export HTML"] = self._button("Export HTML", lambda: dbg.export_html(_html_path(c["export path"].value)))
        c["Check vs transformers"] = self._button("Check vs transformers", dbg.faithfulness)

        v = self.views = {name: w.HTML(layout=w.Layout(min_width="0")) for name in VIEWS}
        v["counter"] = w.Label("cycle 0", style={"font_weight": "bold"})
        v["message"] = w.HTML(layout=w.Layout(min_width="0", flex="1 1 300px"))  # role=status, aria-live
        v["error"] = w.Label("", style={"text_color": "var(--jp-error-color1, #c00)"})
        for name in ("message", "error"):
            v[name].add_class("cld-wrap")  # long messages wrap instead of being cut
        v["message"].add_class("cld-msg")  # two lines, always: a longer message scrolls, the panels stay put
        c["Next token"].button_style = "primary"  # the one a learner presses most
        if (dbg.watch_layer, dbg.watch_head) == (0, 0) and dbg.position < 0:
            dbg.watch_layer, dbg.watch_head = previous_token_head(dbg.engine)
        self._flash = 0  # alternates 0/1 so a panel changed twice in a row flashes twice
        self.box = self._layout()
        self.refresh()

    def _layout(self) -> w.VBox:
        """The loop a learner repeats on top (pipeline, moves, status, candidates, text so far); the other
        panels behind one row of tabs and the settings behind another, each of a fixed height."""
        c, v = self.controls, self.views
        row = lambda *names: _row([c[n] for n in names])  # noqa: E731
        main = w.GridBox(
            [
                _panel(v["output"], row("candidates", "Choose"), cls="cld-out"),
                _panel(v["text"], cls="cld-text"),
            ],
            layout=w.Layout(grid_template_columns="repeat(auto-fit, minmax(min(420px, 100%), 1fr))", grid_gap="8px"),
        )
        main.add_class("cld-main")
        self.inspect = w.Tab(
            [
                _panel(v["sampler"], cls="cld-tab"),
                _panel(v["registers"], cls="cld-tab"),
                _panel(v["memory"], row("watch layer", "watch head"), cls="cld-tab"),
                _panel(v["branches"], row("branch", "Switch to branch"), cls="cld-tab"),
                _panel(v["cost"], cls="cld-tab"),
            ],
            titles=INSPECT,
        )
        settings = w.Tab(
            [
                row("sample", "temperature", "top-k", "top-p", "min-p", "seed", "repetition penalty"),
                w.VBox(
                    [
                        row("break token", "Break on token", "break p", "Break below p"),
                        row("break entropy", "Break above entropy", "Break if not greedy", "Clear breakpoints"),
                        row("break layer", "break op", "Break at op", "Break on lens change"),
                    ]
                ),
                row("ablate layer", "ablate head", "Ablate head", "Clear ablation"),
                row("cycle n", "Run to cycle", "jump"),
                row("export path", "Export", "Export HTML", "Check vs transformers"),
            ],
            titles=("Sampling", "Breakpoints", "Ablation", "Go to", "Save & check"),
        )
        moves = _row([c[n] for n in ("Next token", "Step", "Step layer", "Continue", "Back cycle", "Back", "Reset")])
        box = DebuggerBox(
            [
                w.HTML(STYLE),
                v["pipeline"],
                _row([*moves.children, v["counter"]]),
                _row([v["message"], v["error"]]),
                main,
                self.inspect,
                settings,
                v["status"],
            ],
            layout=w.Layout(min_width="0"),
        )
        box.ui = self
        box.add_class("cld-root")
        return box

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The widget's view, a line of text and a still picture of the panels (no controls), so that a
        notebook saved without its widget state shows what the debugger showed instead of a ``VBox(…)``."""
        return self.box._repr_mimebundle_(**kwargs)

    def picture(self) -> str:
        """The panels of the current state as static HTML (with their stylesheet): no controls."""
        try:
            views = render_all(self.dbg.state())
        except Exception as exc:  # the picture is a courtesy: never let it break the display
            return f"<pre>{type(exc).__name__}: {exc}</pre>"
        panels = "".join(
            f"<div class='cld-panel'>{views[name]}</div>" for name in ("output", "text", "sampler") if views[name]
        )
        return (
            f"{STYLE}<div class='cld-root cld-auto'><p><b>A still picture of the debugger: run this cell to "
            f"start it.</b></p>{views['pipeline']}{views['status']}"
            f"<div style='display:grid;grid-template-columns:repeat(auto-fit,minmax(min(420px,100%),1fr));gap:8px'>"
            f"{panels}</div></div>"
        )

    def _button(self, name: str, action: Callable) -> w.Button:
        button = w.Button(description=name, layout=w.Layout(width="auto", flex="0 0 auto"))
        button.on_click(lambda _: self._call(action))
        return button

    def _call(self, action: Callable) -> None:
        """Run a command; an error goes to the error label (commands record it), never to the kernel."""
        self.busy = True
        try:
            action()
        except Exception as exc:  # shown in the error label instead of a traceback
            self.dbg.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.busy = False
            self.refresh()

    def _on_sampling(self, change) -> None:
        if self._syncing:
            return
        c = self.controls
        self._call(
            lambda: self.dbg.set_sampling(
                do_sample=c["sample"].value,
                temperature=c["temperature"].value,
                top_k=c["top-k"].value or None,
                top_p=None if c["top-p"].value >= 1 else c["top-p"].value,
                min_p=c["min-p"].value or None,
                seed=None if c["seed"].value < 0 else c["seed"].value,
                repetition_penalty=c["repetition penalty"].value,
            )
        )

    def _on_watch(self, change) -> None:
        if not self._syncing:
            self._call(lambda: self.dbg.watch(self.controls["watch layer"].value, self.controls["watch head"].value))

    def _on_jump(self, change) -> None:
        if not self._syncing and change["new"] is not None and change["new"] >= 0:
            self._call(lambda: self.dbg.run_to(change["new"], stop_at_breakpoints=False))

    def _changed(self) -> None:
        """The debugger ran a command: redraw, unless a button of ours is still running it."""
        if not self.busy:
            self.refresh()

    def refresh(self) -> None:
        """Write the debugger's state into the views and bring the controls in line with it."""
        dbg, c, v = self.dbg, self.controls, self.views
        try:
            state = dbg.state()
        except Exception as exc:  # a view that cannot be drawn must not take the controls down with it
            v["error"].value = f"⚠ cannot draw the views: {type(exc).__name__}: {exc}"
            return
        changed = set(getattr(state, "changed", ()))
        self._flash = 1 - self._flash
        for name, markup in render_all(state).items():
            v[name].value = _flashing(markup, self._flash) if name in changed else markup
        v["status"].value = render_status("", "", state.notes)
        v["counter"].value = f"cycle {state.cycle}"
        v["message"].value = render_status(state.message, "", [])
        titles = tuple(f"{t} •" if n in changed else t for n, t in zip(INSPECT_VIEWS, INSPECT))
        if titles != self.inspect.titles:  # one message fewer per click when nothing new is marked
            self.inspect.titles = titles
        v["error"].value = f"⚠ {state.error}" if state.error else ""
        self._syncing = True
        try:
            s = dbg.sampling
            for name, value in (
                ("sample", s.do_sample),
                ("temperature", s.temperature),
                ("top-k", s.top_k or 0),
                ("top-p", 1.0 if s.top_p is None else s.top_p),
                ("min-p", s.min_p or 0.0),
                ("seed", -1 if s.seed is None else s.seed),
                ("repetition penalty", s.repetition_penalty),
            ):
                c[name].value = value
            options = [(f"{r}: {show_token(t)} ({p:.3f})", r) for r, t, p in dbg.candidates()]
            c["candidates"].options = options
            c["candidates"].value = options[min(1, len(options) - 1)][1] if options else None  # the runner-up
            c["Choose"].disabled = not options
            c["jump"].options = [("jump to…", -1), ("start", 0)] + [
                (f"{r.cycle + 1}: {show_token(r.token)}", r.cycle + 1) for r in dbg.now.records()
            ]
            c["jump"].value = -1
            branches = [(f"{i}: {show_token(b.text[:40])}", i) for i, b in enumerate(dbg.branches)]
            c["branch"].options = branches
            c["branch"].value = branches[-1][1] if branches else None  # the latest
            c["Switch to branch"].disabled = not branches
            c["watch layer"].value, c["watch head"].value = dbg.watch_layer, dbg.watch_head
        finally:
            self._syncing = False


VIEWS = ("pipeline", "cost", "registers", "memory", "output", "sampler", "text", "branches", "status")
INSPECT_VIEWS = ("sampler", "registers", "memory", "branches", "cost")  # the panels behind tabs, in order
INSPECT = ("Sampler", "Registers", "Memory", "Branches", "Cost")  # their tab titles (• when the last click changed it)


class DebuggerBox(w.VBox):
    """The widget's outer box: its display adds a line of text and a still picture of the panels."""

    ui: DebuggerUI | None = None

    def _repr_mimebundle_(self, **kwargs) -> dict:
        data = super()._repr_mimebundle_(**kwargs) or {}
        if self.ui is not None:
            data["text/plain"] = f"Debugger for {self.ui.dbg.engine.loaded.name} — run this cell to start it"
            data["text/html"] = self.ui.picture()
        return data


def _flashing(markup: str, parity: int) -> str:
    """A view's HTML marked as changed by the last command (a brief highlight; two classes so it restarts)."""
    return markup.replace("<div class='cld", f"<div class='cld-changed{parity} cld", 1)


_PROBE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def previous_token_head(engine) -> tuple[int, int]:
    """The (layer, head) whose attention rests most on the token just before the query, measured once per
    engine on a short probe text (position 0, where many heads park their attention, left out)."""
    if engine not in _HEADS:
        ids = engine.encode(_PROBE)
        _, found = engine.run_with_cache(ids, names=lambda name: name.endswith("attn.hook_pattern"))
        q = torch.arange(2, len(ids))
        best = (-1.0, 0, 0)
        for layer in range(engine.arch.n_layers):
            scores = found[f"blocks.{layer}.attn.hook_pattern"][0][:, q, q - 1].mean(-1)
            head = int(scores.argmax())
            best = max(best, (float(scores[head]), layer, head))
        _HEADS[engine] = best[1:]
    return _HEADS[engine]


def _fixed(width: int) -> dict:
    """Keyword arguments for a labelled control ``width`` px wide that never shrinks (its label stays whole)."""
    return {"style": {"description_width": "initial"}, "layout": w.Layout(width=f"{width}px", flex="0 0 auto")}


def _row(children: list) -> w.HBox:
    """Controls side by side, wrapping onto the next line when the row is full."""
    return w.HBox(children, layout=w.Layout(flex_flow="row wrap", align_items="center"))


def _panel(*children, cls: str = "") -> w.VBox:
    """A bordered panel; ``cls`` one of the stylesheet's fixed heights (its content scrolls)."""
    box = w.VBox(list(children), layout=w.Layout(min_width="0"))
    for name in ("cld-panel", cls):
        if name:
            box.add_class(name)
    return box


def _html_path(path: str) -> str:
    """The replay page beside the JSON file: trace.json -> trace.html."""
    return path[:-5] + ".html" if path.endswith(".json") else path + ".html"


def _token_arg(text: str) -> int | str:
    """A breakpoint token from a text box: digits are a token id, anything else the token's text."""
    return int(text) if text.strip().isdigit() else text
