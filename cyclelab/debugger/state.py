"""What the debugger's views show at its position, built from the history without recomputing the model.

:class:`StateViews` is the half of :class:`~cyclelab.debugger.session.Debugger` that reads: registers
(the logit lens of each layer), memory (the KV cache), attention, the output, the sampler
pipeline and the cost counters, gathered into one :class:`~cyclelab.debugger.views.State`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from cyclelab.core.events import Cost, Event
from cyclelab.core.sampling import Sampling, pipeline, slice_of
from cyclelab.debugger.narrate import ablation_words, changed_views, view_keys
from cyclelab.debugger.timeline import sampler_probs
from cyclelab.debugger.views import (
    Attention,
    CacheRow,
    Chosen,
    Draw,
    Output,
    Register,
    SamplerStage,
    State,
    p_text,
    render_all,
    show_token,
)

SAMPLER_CANDIDATES = 8  # tokens drawn in each row of the sampler pipeline's picture


def _pairs(pairs: list[tuple[str, float]]) -> str:
    return " ".join(f"{show_token(t)} {p_text(p)}" for t, p in pairs)


def lens_tops(engine, residuals: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    """The logit lens's top-``k`` tokens, with probabilities, for each residual vector of ``residuals``
    ``(n, d)``: what the model would say if the stream went straight to WRITEBACK (``engine.read_out``)."""
    top = torch.topk(torch.softmax(engine.read_out(residuals).float(), -1), k)
    return [
        [(engine.token_text(int(i)), float(p)) for p, i in zip(ps, ids)] for ps, ids in zip(top.values, top.indices)
    ]


def lens_registers(engine, here: list[Event], kept_in: str = "tensors") -> list[Register]:
    """The registers panel: each event of ``here`` that kept the residual stream ``x`` (in its ``tensors``, or
    its ``info`` for the encoder–decoder), with its norm and logit lens (computed once, then kept on the event)."""
    events = [e for e in here if "x" in getattr(e, kept_in)]
    missing = [e for e in events if "lens" not in e.info]
    if missing:
        for e, lens in zip(missing, lens_tops(engine, torch.stack([getattr(e, kept_in)["x"] for e in missing]))):
            e.info["lens"] = lens
    return [Register(e.layer, float(getattr(e, kept_in)["x"].float().norm()), e.info["lens"]) for e in events]


def describe(sampling: Sampling) -> str:
    """'greedy' or 'sample, temperature 0.8, top-k 40, …': the sampler settings in plain words."""
    parts = ["sample", f"temperature {sampling.temperature:g}"] if sampling.do_sample else ["greedy"]
    if sampling.do_sample:
        parts += [f"top-k {sampling.top_k}"] if sampling.top_k else []
        parts += [f"top-p {sampling.top_p:g}"] if sampling.top_p is not None else []
        parts += [f"min-p {sampling.min_p:g}"] if sampling.min_p is not None else []
        parts += [f"seed {sampling.seed}"] if sampling.seed is not None else ["seed random"]
    parts += [f"repetition penalty {sampling.repetition_penalty:g}"] if sampling.repetition_penalty != 1 else []
    return ", ".join(parts)


def _read_costs(events: list[Event]) -> tuple[Cost, Cost]:
    """(prefill, re-read): the cost of the cycles that fed more than one token: the prompt (cycle 1),
    and the context read again when a branch restarts the run at a later cycle."""
    prefill, reread, many = Cost(), Cost(), False
    for e in events:
        if e.op == "embed":
            many = e.info.get("n_inputs", 1) > 1
        if many:
            (prefill if e.cycle == 0 else reread).add(e)
    return prefill, reread


class StateViews:
    """The views' state, read from the debugger's history (a mixin of the Debugger)."""

    def candidates(self) -> list[tuple[int, str, float]]:
        """(rank, token, model p) of the best tokens at the last choice shown, by the plain logits."""
        output = self._choice_views(self._last_index("choose"))[0]
        return [] if output is None else [(rank, t, p) for rank, (_, t, p) in enumerate(output.raw_top)]

    def state(self) -> State:
        """Everything the views show at the current position; ``changed`` names the views that differ
        from the state built before the last command."""
        event = self.current_event
        here = self.history[self.now.start_of(event.cycle if event else 0) : self.position + 1]
        output, stages, draw, chosen, preview = self._choice_views(self._last_index("choose"))
        prefill, reread = _read_costs(self.history[: self.position + 1])
        state = State(
            model=self.engine.loaded.name,
            cycle=self.cycle + (event is not None and event.op != "append"),
            done=self.cycle,
            max_cycles=self.max_new_tokens,
            stage=event.stage if event else None,
            layer=event.layer if event else None,
            op=event.op if event else None,
            n_layers=self.engine.arch.n_layers,
            n_inputs=next((e.info["n_inputs"] for e in here if "n_inputs" in e.info), None),
            this_op=Cost.of([event] if event else []),
            this_cycle=Cost.of(here),
            total=Cost.of(self.history[: self.position + 1]),
            prefill=prefill,
            reread=reread,
            registers=self._registers(here),
            memory=self._memory(),
            attention=self._attention(),
            output=output,
            sampler=stages,
            draw=draw,
            chosen=chosen,
            preview=preview,
            sampling=describe(self._sampling_of(self._last_index("choose"))),
            prompt=self.prompt_text,
            records=self.records,
            message=self.message,
            error=self.error,
            notes=self._notes(),
            timeline=self.now.records(),
            branches=[b.records() for b in self._branches],
            max_positions=len(self.prompt_ids) + self.max_new_tokens,
        )
        keys = view_keys(state)
        before, self._shown = self._before, keys
        return replace(state, changed=frozenset() if before is None else changed_views(before, keys))

    def frames(self) -> list[dict[str, str]]:
        """Every view's HTML at the end of each cycle done so far (0: before the first), from the history;
        the position, message and error are left as they were."""
        kept = self.position, self.message, self.error, self._shown
        self.message = self.error = ""
        try:
            frames = []
            for k in range(self.cycle + 1):
                self.position = self.now.start_of(k) - 1
                frames.append(render_all(self.state()))
            return frames
        finally:
            self.position, self.message, self.error, self._shown = kept

    def _backwards(self) -> Iterator[tuple[int, Event]]:
        """(index, event) from the current position back to the first event."""
        for i in range(self.position, -1, -1):
            yield i, self.history[i]

    def _last_index(self, op: str, layer: int | None = None) -> int | None:
        return next((i for i, e in self._backwards() if e.op == op and (layer is None or e.layer == layer)), None)

    def _registers(self, here: list[Event]) -> list[Register]:
        return lens_registers(self.engine, here, "tensors")

    def _memory(self) -> list[CacheRow]:
        n, found = self.engine.arch.n_layers, {}
        for _, e in self._backwards():
            if e.op == "kv_cache" and e.layer not in found:
                found[e.layer] = e
                if len(found) == n:
                    break
        return [
            CacheRow(i, found[i].info.get("length", 0), found[i].bytes) if i in found else CacheRow(i, 0, 0)
            for i in range(n)
        ]

    def _attention(self) -> Attention | None:
        index = self._last_index("softmax", self.watch_layer)
        if index is None or "probs" not in self.history[index].tensors:
            return None
        weights = self.history[index].tensors["probs"][self.watch_head].tolist()
        ids = (self.prompt_ids + self.token_ids)[: len(weights)]
        return Attention(self.watch_layer, self.watch_head, [self.engine.token_text(i) for i in ids], weights)

    def _sampling_of(self, index: int | None) -> Sampling:
        """The sampler settings that made the choice at ``index`` (the current ones when there is none)."""
        return self.now.sampling if index is None else self.history[index].info.get("sampling", self.now.sampling)

    def _choice_views(
        self, index: int | None
    ) -> tuple[Output | None, list[SamplerStage], Draw | None, Chosen | None, str]:
        """The output, the sampler's stages and draw, and the chosen token of the choice at ``index``, all
        from its logits run through the settings that made it (no model recompute); and a preview of
        newer settings on the same logits."""
        if index is None:
            return None, [], None, None, ""
        event, text = self.history[index], self.engine.token_text
        sampling, choice, token = self._sampling_of(index), event.info["choice"], event.info["token_id"]
        previous = self.prompt_ids + self.token_ids[: event.cycle]
        steps = pipeline(event.tensors["logits"], previous, sampling)
        final, raw = sampler_probs(steps), torch.softmax(event.tensors["logits"].float(), -1)
        top, raw_top = torch.topk(final, self.top), torch.topk(raw, self.top)
        output = Output(
            event.cycle,
            text(token),
            token,
            event.info["forced"],
            [(int(i), text(int(i)), float(p)) for p, i in zip(raw_top.values, raw_top.indices)],
            [(int(i), text(int(i)), float(p)) for p, i in zip(top.values, top.indices) if p > 0],
        )
        how = "forced" if event.info["forced"] else ("sampled" if sampling.do_sample else "greedy")
        chosen = Chosen(
            event.cycle + 1,
            token,
            text(token),
            float(final[token]),
            float(raw[token]),
            how,
            text(choice.token_id) if how == "forced" else None,
            written=self.position > index,
        )
        preview = ""
        if self.now.sampling != sampling:
            new = pipeline(event.tensors["logits"], previous, self.now.sampling)
            kept = ", ".join(f"{name} keeps {int(torch.isfinite(x).sum())}" for name, x in new[1:])
            preview = (
                f"new settings from cycle {event.cycle + 2} on: {describe(self.now.sampling)}. Preview on cycle "
                f"{event.cycle + 1}'s logits (not what chose its token): {kept or 'no filter'}; "
                f"top {_pairs(self._top(sampler_probs(new), 3))}"
            )
        return output, *self._sampler(steps, final, choice, sampling), chosen, preview

    def _sampler(self, steps, final: torch.Tensor, choice, sampling: Sampling) -> tuple[list[SamplerStage], Draw]:
        """The stages of ``steps`` (one picture row each) and where the sampler's pick fell."""
        watched = torch.topk(steps[0][1], SAMPLER_CANDIDATES).indices.tolist()  # the same tokens in every row
        stages, before = [], None
        for name, logits in steps:
            probs = torch.softmax(logits, -1)
            kept = torch.isfinite(logits)
            mass = None if before is None else float(before[kept].sum())
            cells = [(self.engine.token_text(i), float(probs[i]) if kept[i] else None) for i in watched]
            stages.append(SamplerStage(name, int(kept.sum()), self._top(probs, 3), mass, cells))
            before = probs
        last = stages[-1]
        stages.append(SamplerStage("renormalise", last.kept, self._top(final, 3), cells=last.cells))
        exact = torch.softmax(steps[-1][1].double(), -1)
        n_kept, pick = int((exact > 0).sum()), choice.token_id
        if choice.draw is None or not sampling.do_sample:
            draw = Draw(None, self.engine.token_text(pick), 0.0, 0.0, n_kept, float(final[pick]))
        else:
            token, low, high = slice_of(exact, choice.draw)
            draw = Draw(choice.draw, self.engine.token_text(token), low, high, n_kept, float(final[token]))
        return stages, draw

    def _top(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        top = torch.topk(probs, k)
        return [(self.engine.token_text(int(i)), float(p)) for p, i in zip(top.values, top.indices) if p > 0]

    def _notes(self) -> list[str]:
        notes = [str(b) for b in self.breakpoints] or ["no breakpoint set: Continue runs to the end"]
        if self.now.ablation.heads:
            notes.append("ablated heads: " + ablation_words(self.now.ablation.heads))
        if self._branches:
            notes.append(
                f"{len(self._branches)} earlier branch(es): "
                + " | ".join(repr(show_token(b.text[:30])) for b in self.branches)
            )
        notes += [f"intervention: {line}" for line in self.now.log]
        return notes
