"""A single-step debugger for generation: a thin view over the engine's event stream.

>>> dbg = Debugger(Engine(load("tiny")), "ROMEO:", max_new_tokens=20)
>>> dbg.next(); dbg.next()            # two cycles (tokens)
>>> dbg.back_cycle()                  # time travel: from the recorded history, no recompute
>>> dbg.break_below(0.2); dbg.cont()  # run until a token is chosen with p < 0.2
>>> print(dbg)                        # text mode
>>> dbg.widget()                      # the same commands as buttons (ipywidgets)
>>> dbg.export_html("run.html")       # a page replaying the run in any browser, offline

The debugger keeps a *history* of the events it has seen, slimmed to what its views
read (the last position only), and a *position* in it. Stepping forward inside the
history replays it; past its end the next event comes from a live ``engine.run``.
Changing the sampler, forcing a token or ablating a head cuts the history at the first
cycle it affects (the old timeline stays in :attr:`Debugger.branches`), and the engine
restarts there, lazily, with the prompt and the tokens so far as its input.
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import torch

from cyclelab.core.blocks import Ablation
from cyclelab.core.engine import Engine, as_loaded, trace_settings
from cyclelab.core.events import CycleRecord, Event, Trace
from cyclelab.core.sampling import Sampling, as_sampling, pipeline
from cyclelab.debugger.breakpoints import Breakpoints
from cyclelab.debugger.commands import check_int, command
from cyclelab.debugger.narrate import HINT, cycle_words, op_words, plural, start_words
from cyclelab.debugger.replay import replay_page
from cyclelab.debugger.state import StateViews, describe, lens_tops
from cyclelab.debugger.text import render_text
from cyclelab.debugger.timeline import (
    Breakpoint,
    LiveRun,
    Timeline,
    capture_for_views,
    sampler_probs,
    slim,
)
from cyclelab.debugger.views import chosen_words, show_token
from cyclelab.loading.atomic import write_atomic
from cyclelab.loading.loader import Loaded

UNIT_ENDS = frozenset({"positions", "residual_mlp", "logits", "choose", "append"})  # where "Step layer" stops


# ------------------------------------------------------------------ the debugger


class Debugger(Breakpoints, StateViews):
    """Step through generation micro-op by micro-op; break on conditions; go back; branch; intervene.

    Moving: :meth:`step`, :meth:`step_layer`, :meth:`next`, :meth:`cont`, :meth:`run_to`,
    :meth:`back`, :meth:`back_cycle`, :meth:`reset`. ``step``, ``step_layer`` and ``next`` ignore
    breakpoints; ``cont`` and ``run_to`` stop at them.
    Value breakpoints (token, probability, entropy, not greedy) fire at the ``append`` event of
    the cycle, when the chosen token is written back; op breakpoints fire on that op.
    """

    _variants: list[Callable[[object], type | None]] = []  # engine -> a Debugger subclass for it, or None

    def __new__(cls, engine=None, *args, **kwargs):
        """``Debugger(...)`` makes the subclass a registered variant names for ``engine`` (an encoder-decoder
        gets :class:`~cyclelab.debugger.seq2seq.Seq2SeqDebugger`), else a Debugger."""
        for pick in Debugger._variants if cls is Debugger else []:
            cls = pick(engine) or cls
        return super().__new__(cls)

    def __init__(
        self,
        engine: Engine | Loaded | str,
        prompt,
        max_new_tokens: int = 20,
        sampling: Sampling | dict | None = None,
        *,
        chat: bool = False,
        ablation: Ablation | None = None,
        top: int = 5,
    ):
        """``engine`` is an :class:`Engine`, a :class:`Loaded` model (wrapped in an Engine) or a model
        name (loaded); ``sampling`` a :class:`Sampling` or a dict of its settings. Each is checked here."""
        self.engine = engine = engine if isinstance(engine, Engine) else Engine(as_loaded(engine, "Debugger"))
        self.prompt_ids = engine.encode(prompt, chat=chat)
        self.prompt_text = engine.tokenizer.decode(self.prompt_ids)
        engine.check_lengths(len(self.prompt_ids), max_new_tokens)
        self.max_new_tokens, self.chat, self.top = max_new_tokens, chat, check_int(top, 1, 100, "top")
        self.now = Timeline(as_sampling(sampling), engine._check_ablation(ablation))
        self._branches: list[Timeline] = []
        self.breakpoints: list[Breakpoint] = []
        self.position = -1  # index of the current event in the history; -1 before the first
        self.watch_layer, self.watch_head = 0, 0  # the head whose attention the memory view shows
        self.message, self.error = start_words(engine.loaded.name, self.prompt_text), ""
        self._before = self._shown = None  # what the views showed (narrate.view_keys) before and after a command
        self.faith: float | None = None
        self._live = LiveRun()  # the engine run feeding the end of the history
        weakref.finalize(self, self._live.close)  # a paused run must not outlive the debugger
        self._ui = None  # the DebuggerUI, once built
        self._listeners: list[Callable[[], None]] = []  # called after every command

    # --- where we are ---------------------------------------------------------------
    @property
    def history(self) -> list[Event]:
        """Every event seen on the current timeline (slimmed), possibly beyond the position."""
        return self.now.history

    @property
    def cycle(self) -> int:
        """Cycles (tokens) completed at the current position."""
        return bisect_right(self.now.ends, self.position)

    @property
    def current_event(self) -> Event | None:
        """The event at the current position (None before the first step)."""
        return self.history[self.position] if self.position >= 0 else None

    @property
    def records(self) -> list[CycleRecord]:
        """One record per completed cycle at the current position."""
        return self.now.records(self.position)

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far."""
        return [r.token_id for r in self.records]

    @property
    def tokens(self) -> list[str]:
        """The generated tokens so far, as text."""
        return [r.token for r in self.records]

    @property
    def trace(self) -> Trace:
        """The current timeline up to the position, as a :class:`Trace` (text so far, records, settings)."""
        return self._trace(self.now, self.records)

    @property
    def branches(self) -> list[Trace]:
        """The timelines left behind by interventions, each as a full :class:`Trace`."""
        return [self._trace(t, t.records()) for t in self._branches]

    @property
    def sampling(self) -> Sampling:
        """The sampler settings of the cycles to come."""
        return self.now.sampling

    @property
    def ablation(self) -> Ablation:
        """The heads and MLPs switched off for the cycles to come."""
        return self.now.ablation

    def __repr__(self) -> str:
        return f"<Debugger {self.engine.loaded.name}: cycle {self.cycle} of {self.max_new_tokens}, at {self.current_event!r}>"

    def __str__(self) -> str:
        return render_text(self.state())

    # --- moving -----------------------------------------------------------------------
    @command
    def step(self) -> Event | None:
        """One micro-op forward."""
        return self._advance(lambda e: True)

    @command
    def step_layer(self) -> Event | None:
        """Forward to the end of the current unit: FETCH, a layer, the unembedding, the choice or the append."""
        return self._advance(lambda e: e.op in UNIT_ENDS)

    @command
    def next(self) -> Event | None:
        """Forward to the end of the cycle: one more token."""
        return self._advance(lambda e: e.op == "append")

    @command
    def cont(self) -> Event | None:
        """Forward to the next breakpoint, or to the end of generation (which the message says when none is set)."""
        event = self._advance(lambda e: False, breakpoints=True)
        if not self.breakpoints:
            self.message = f"no breakpoint is set, so Continue ran to the end (set one in Breakpoints). {self.message}"
        return event

    @command
    def run_to(self, n: int, stop_at_breakpoints: bool = True) -> Event | None:
        """To the end of cycle ``n`` (``n`` tokens done): back through the history, or forward."""
        check_int(n, 0, self.max_new_tokens, "cycle")
        if n <= self.cycle:
            self.position, self.message = self.now.start_of(n) - 1, f"back to cycle {n}"
            return self.current_event
        return self._advance(lambda e: self.cycle >= n, breakpoints=stop_at_breakpoints)

    @command
    def back(self) -> Event | None:
        """One micro-op back, from the history (no recompute)."""
        if self.position < 0:
            self.message = "already at the start"
        else:
            self.position -= 1
            self.message = "back one op: " + (self._where() if self.position >= 0 else "at the start")
        return self.current_event

    @command
    def back_cycle(self) -> Event | None:
        """Back to the start of this cycle, or of the previous one when at a cycle's end (no recompute)."""
        target = self.cycle - 1 if self._at_boundary() else self.cycle
        if target < 0:
            self.message = "already at the start"
        else:
            self.position, self.message = self.now.start_of(target) - 1, f"back to cycle {target}"
        return self.current_event

    @command
    def reset(self) -> None:
        """Back to the start; the history is kept, so stepping forward replays it."""
        self.position, self.message = -1, f"back at the start: {HINT}"

    def _at_boundary(self) -> bool:
        return self.position < 0 or self.history[self.position].op == "append"

    def _advance(self, done: Callable[[Event], bool], breakpoints: bool = False) -> Event | None:
        """Step forward until ``done(event)`` (at least one step), a breakpoint, or the end; the message
        says where it stopped and why."""
        start = self.position
        while self._forward():
            event = self.current_event
            hit = next((b for b in self.breakpoints if self._hits(b, event)), None) if breakpoints else None
            if hit is not None:
                self.message = f"stopped: {hit}. {self._where()}"
                return event
            if done(event):
                self.message = self._where()
                return event
        end = f"end of generation: {plural(self.cycle, 'token')}"
        self.message = end if self.position == start else f"{end}. {self._where()}"
        return self.current_event

    def _where(self) -> str:
        """The status line for the current position, in words (see :mod:`cyclelab.debugger.narrate`)."""
        event, index = self.current_event, self._last_index("choose")
        if event is None:
            return f"at the start: {HINT}"
        chosen = self._choice_views(index)[3]
        if event.op == "append" and chosen is not None:
            return cycle_words(chosen, self.records)
        return op_words(self.cycle + 1, event, chosen)

    def _forward(self) -> bool:
        if not self._ensure(self.position + 1):
            return False
        self.position += 1
        return True

    # --- the live engine ------------------------------------------------------------------
    def _ensure(self, index: int) -> bool:
        """Pull events from the engine until the history reaches ``index``; False if it ends first."""
        while len(self.history) <= index:
            if not self._pull():
                return False
        return True

    def _pull(self) -> bool:
        """Append the engine's next event to the history (a choice always with its append)."""
        if self._live.steps is None and not self._start():
            return False
        while True:
            try:
                event = slim(self._live.next(), self._live.offset)
            except StopIteration:
                self._live.close()
                self.now.finished = True
                return False
            except Exception:  # the run is dead; the next pull restarts it
                self._live.close()
                raise
            if event.op == "choose":
                event.info["sampling"] = self.now.sampling  # the settings this run chooses with
            if event.op == "append":
                self._fix_forced_p(event)
                self.now.ends.append(len(self.history))
            self.history.append(event)
            if event.op != "choose":
                return True

    def _start(self) -> bool:
        """Start the engine at the first cycle not completed in the history (a partial one is recomputed)."""
        self._live.close()
        tl = self.now
        if tl.finished:
            return False
        k = len(tl.ends)
        del tl.history[tl.start_of(k) :]
        records = tl.records()
        eos = bool(records) and records[-1].token_id == self._eos_id() and not records[-1].forced
        if eos or k >= self.max_new_tokens:
            tl.finished = True
            return False
        remaining = self.max_new_tokens - k
        self._live.start(self._run_from(records, remaining, [tl.forced.get(k + i) for i in range(remaining)]), offset=k)
        return True

    def _eos_id(self) -> int | None:
        """The token that ends a run when the model chooses it."""
        return self.engine.tokenizer.eos_token_id

    def _run_from(self, records: list, remaining: int, force: list):
        """The engine's run that continues the current timeline after its ``records``, as the views read it."""
        tl = self.now
        return self.engine.run(
            self.prompt_ids + [r.token_id for r in records],
            remaining,
            tl.sampling,
            capture=capture_for_views,
            force=force,
            ablation=tl.ablation,
            draws=sum(r.draw is not None for r in records),
        )

    def _fix_forced_p(self, append: Event) -> None:
        """A forced token's record gets its ``p`` after the sampler's settings (0 if they filtered it out),
        computed as the views compute it (the engine keeps the model's p for a token outside its top 5)."""
        record, choice = append.info["record"], self.history[-1]
        if record.forced and choice.op == "choose" and "logits" in choice.tensors:
            steps = pipeline(
                choice.tensors["logits"],
                self.prompt_ids + [r.token_id for r in self.now.records()],
                choice.info["sampling"],
            )
            append.info["record"] = replace(record, prob=float(sampler_probs(steps)[record.token_id]))

    # --- interventions ----------------------------------------------------------------------
    def _cut(self, index: int) -> None:
        """Forget the history from ``index`` on, keeping the old timeline as a branch if it loses a token."""
        self._live.close()
        lost = any(e.op in ("choose", "append") for e in self.history[index:])
        old = self.now.cut(index)
        if lost:
            self._branches.append(old)

    def _invalidate(self, cycle: int) -> None:
        """The future from ``cycle`` on no longer holds; recomputed when stepped into (nothing before the position)."""
        self._cut(max(self.position + 1, self.now.start_of(cycle)))

    @command
    def set_sampling(self, sampling: Sampling | None = None, **changes) -> Sampling:
        """New sampler settings (a :class:`Sampling`, or some of its fields) for the tokens not yet chosen."""
        unknown = set(changes) - {f.name for f in fields(Sampling)}
        if unknown:
            raise ValueError(
                f"unknown sampling setting(s) {sorted(unknown)}; the settings are {sorted(f.name for f in fields(Sampling))}"
            )
        new = replace(self.now.sampling if sampling is None else as_sampling(sampling), **changes)  # validates
        if new != self.now.sampling:
            k = self.cycle + (self.current_event is not None and self.current_event.op == "choose")
            self._invalidate(k)
            self.now.sampling = new
            self.now.log.append(f"from cycle {k + 1}: sampler {describe(new)}")
            self.message = f"sampler from cycle {k + 1} on: {describe(new)}"
        return new

    @command
    def choose(self, rank: int | None = None, *, token_id: int | None = None) -> Event | None:
        """Impose another token at the last choice shown: the ``rank``-th best of the logits, or ``token_id``.

        The run branches there; the old timeline stays in :attr:`branches`. The debugger stops at the end
        of that cycle, the forced token written back (the counter does not step back).
        """
        index = self._last_index("choose")
        if index is None:
            raise ValueError("no token has been chosen yet: press Next token first")
        event = self.history[index]
        vocab = event.tensors["logits"].numel()
        if token_id is None:
            rank = check_int(rank if rank is not None else 1, 0, vocab - 1, "rank")
            token_id = int(torch.topk(event.tensors["logits"], rank + 1).indices[rank])
        check_int(token_id, 0, vocab - 1, "token_id")
        if token_id == event.info["token_id"]:
            self.message = f"cycle {event.cycle + 1} already chose {show_token(self.engine.token_text(token_id))}"
            return self.current_event
        start = self.now.start_of(event.cycle)
        self._cut(start)
        self.now.forced[event.cycle] = token_id
        self.now.log.append(f"cycle {event.cycle + 1}: forced {show_token(self.engine.token_text(token_id))}")
        self.position = start - 1
        self._advance(lambda e: e.op == "append")
        chosen = self._choice_views(self._last_index("choose"))[3]
        if chosen is not None and chosen.how == "forced":
            self.message = (
                f"cycle {chosen.cycle}: {chosen_words(chosen)}; the old timeline is branch {len(self._branches) - 1}"
            )
        return self.current_event

    @command
    def ablate_head(self, layer: int, head: int) -> Ablation:
        """Switch off one attention head from the cycle in progress on (the context is recomputed with it)."""
        check_int(layer, 0, self.engine.arch.n_layers - 1, "layer")
        check_int(head, 0, self.engine.arch.n_heads - 1, "head")
        return self._set_ablation(
            Ablation(self.now.ablation.heads | {(layer, head)}, self.now.ablation.mlps), f"ablated L{layer} H{head}"
        )

    @command
    def clear_ablation(self) -> Ablation:
        """Switch every head and MLP back on, from the cycle in progress on."""
        return self._set_ablation(Ablation(), "ablation cleared")

    def _set_ablation(self, new: Ablation, what: str) -> Ablation:
        if new != self.now.ablation:
            self._invalidate(self.cycle)
            self.now.ablation = new
            self.now.log.append(f"from cycle {self.cycle + 1}: {what}")
            self.message = f"{what} from cycle {self.cycle + 1} on"
        return new

    @command
    def switch_branch(self, index: int) -> None:
        """Make branch ``index`` the current timeline (the current one becomes that branch)."""
        check_int(index, 0, len(self._branches) - 1, "branch")
        self._live.close()
        self._branches[index], self.now = self.now, self._branches[index]
        self.position = min(self.position, len(self.history) - 1)
        self.message = f"switched to branch {index}"

    # --- views, export, faithfulness -------------------------------------------------------------
    @command
    def watch(self, layer: int, head: int) -> None:
        """Choose the layer and head whose attention the memory view shows."""
        self.watch_layer = check_int(layer, 0, self.engine.arch.n_layers - 1, "layer")
        self.watch_head = check_int(head, 0, self.engine.arch.n_heads - 1, "head")

    @command
    def export(self, path: str | Path) -> Path:
        """Save the trace so far as JSON (read it back with ``Trace.load``)."""
        path = Path(path)
        self.trace.save(path)
        self.message = f"saved {len(self.records)} cycles to {path}"
        return path

    @command
    def export_html(self, path: str | Path) -> Path:
        """Save one self-contained HTML page that replays the run so far token by token, with the same
        panels and Back/Next controls: it needs no kernel, network or CDN (mail it, open it on a phone)."""
        path = Path(path)
        frames = self.frames()
        title = f"cyclelab debugger: {self.engine.loaded.name}, {len(frames) - 1} tokens"
        write_atomic(path, replay_page(frames, title))
        self.message = f"saved a replay of {len(frames) - 1} tokens to {path}"
        return path

    @command
    def faithfulness(self) -> float:
        """Largest |logit difference| between the logits shown so far and a plain ``transformers`` forward."""
        chooses = [e for e in self.history[: self.position + 1] if e.op == "choose" and "logits" in e.tensors]
        if not chooses:
            raise ValueError("no logits yet: run at least one cycle (Next token) first")
        ids = self.prompt_ids + self.token_ids[: chooses[-1].cycle]
        with torch.no_grad():
            ref = self.engine.loaded.model(torch.tensor([ids], device=self.engine.device)).logits[0].float()
        start = len(self.prompt_ids) - 1
        self.faith = max(float((e.tensors["logits"] - ref[start + e.cycle]).abs().max()) for e in chooses)
        note = " (an ablation is active: a difference is expected)" if self.now.ablation else ""
        self.message = (
            f"max |engine − transformers| logit difference over {len(chooses)} tokens: {self.faith:.2e}{note}"
        )
        return self.faith

    def _trace(self, timeline: Timeline, records: list[CycleRecord]) -> Trace:
        ids = [r.token_id for r in records]
        settings = {
            **trace_settings(timeline.sampling, timeline.ablation, use_cache=True, chat=self.chat),
            "interventions": list(timeline.log),
        }
        return Trace(
            self.engine.loaded.name,
            list(self.prompt_ids),
            list(records),
            settings,
            self.engine.tokenizer.decode(ids, skip_special_tokens=True),
            fingerprint=self.engine.fingerprint,
        )

    # --- widget ------------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every command (the widget redraws itself so)."""
        self._listeners.append(listener)

    def widget(self):
        """The ipywidgets UI (built once): buttons call the same commands as text mode."""
        if self._ui is None:
            from cyclelab.debugger.widget import DebuggerUI

            self._ui = DebuggerUI(self)
        return self._ui.box

    @property
    def controls(self) -> dict:
        """The widget's controls by name (buttons by their description)."""
        self.widget()
        return self._ui.controls

    @property
    def views(self) -> dict:
        """The widget's view widgets by name: HTML views, plus the ``counter``, ``message`` and ``error`` labels."""
        self.widget()
        return self._ui.views

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())


__all__ = ["Breakpoint", "Debugger", "Timeline", "lens_tops"]
