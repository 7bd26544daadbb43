"""What the debugger's views show at its position, built from the history without recomputing the model.

:class:`StateViews` is the half of :class:`~cyclelab.debugger.session.Debugger` that reads: registers
(the logit lens of each layer), memory (the KV cache), attention, the output, the sampler
pipeline and the cost counters, gathered into one :class:`~cyclelab.debugger.views.State`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cyclelab.core.events import Cost, Event
from cyclelab.core.sampling import Sampling, pipeline, slice_of
from cyclelab.debugger.views import (
    Attention,
    CacheRow,
    Draw,
    Output,
    Register,
    SamplerStage,
    State,
    render_all,
    show_token,
)

SAMPLER_CANDIDATES = 8  # tokens drawn in each row of the sampler pipeline's picture


def lens_tops(engine, residuals: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    """The logit lens's top-``k`` tokens, with probabilities, for each residual vector of ``residuals``
    ``(n, d)``: what the model would say if the stream went straight to WRITEBACK (``engine.read_out``)."""
    top = torch.topk(torch.softmax(engine.read_out(residuals).float(), -1), k)
    return [
        [(engine.token_text(int(i)), float(p)) for p, i in zip(ps, ids)] for ps, ids in zip(top.values, top.indices)
    ]


def describe(sampling: Sampling) -> str:
    """'greedy' or 'sample T=0.8 top-k 40 …': the sampler settings in a few words."""
    parts = [f"sample T={sampling.temperature:g}"] if sampling.do_sample else ["greedy"]
    if sampling.do_sample:
        parts += [f"top-k {sampling.top_k}"] if sampling.top_k else []
        parts += [f"top-p {sampling.top_p:g}"] if sampling.top_p is not None else []
        parts += [f"min-p {sampling.min_p:g}"] if sampling.min_p is not None else []
        parts += [f"seed {sampling.seed}"] if sampling.seed is not None else ["seed random"]
    parts += [f"repetition penalty {sampling.repetition_penalty:g}"] if sampling.repetition_penalty != 1 else []
    return " ".join(parts)


def _prefill_events(events: list[Event]) -> list[Event]:
    """The events of cycles that fed more than one token (the prompt, or the context after a restart)."""
    kept, prefill = [], False
    for e in events:
        if e.op == "embed":
            prefill = e.info.get("n_inputs", 1) > 1
        if prefill:
            kept.append(e)
    return kept


class StateViews:
    """The views' state, read from the debugger's history (a mixin of the Debugger)."""

    def candidates(self) -> list[tuple[int, str, float]]:
        """(rank, token, probability) of the best tokens at the last choice shown, by the plain logits."""
        output = self._output()
        return [] if output is None else [(rank, t, p) for rank, (_, t, p) in enumerate(output.raw_top)]

    def state(self) -> State:
        """Everything the views show at the current position."""
        event = self.current_event
        here = self.history[self.now.start_of(event.cycle if event else 0) : self.position + 1]
        choice_index = self._last_index("choose")
        stages, draw = self._sampler(choice_index)
        return State(
            model=self.engine.loaded.name,
            cycle=self.cycle,
            max_cycles=self.max_new_tokens,
            stage=event.stage if event else None,
            layer=event.layer if event else None,
            op=event.op if event else None,
            n_layers=self.engine.arch.n_layers,
            n_inputs=next((e.info["n_inputs"] for e in here if "n_inputs" in e.info), None),
            this_op=Cost.of([event] if event else []),
            this_cycle=Cost.of(here),
            total=Cost.of(self.history[: self.position + 1]),
            prefill=Cost.of(_prefill_events(self.history[: self.position + 1])),
            registers=self._registers(here),
            memory=self._memory(),
            attention=self._attention(),
            output=self._output(),
            sampler=stages,
            draw=draw,
            sampling=describe(self.now.sampling),
            prompt=self.prompt_text,
            records=self.records,
            message=self.message,
            error=self.error,
            notes=self._notes(),
            timeline=self.now.records(),
            branches=[b.records() for b in self._branches],
            max_positions=len(self.prompt_ids) + self.max_new_tokens,
        )

    def frames(self) -> list[dict[str, str]]:
        """Every view's HTML at the end of each cycle done so far (0: before the first), from the history;
        the position, message and error are left as they were."""
        kept = self.position, self.message, self.error
        self.message = self.error = ""
        try:
            frames = []
            for k in range(self.cycle + 1):
                self.position = self.now.start_of(k) - 1
                frames.append(render_all(self.state()))
            return frames
        finally:
            self.position, self.message, self.error = kept

    def _backwards(self) -> Iterator[tuple[int, Event]]:
        """(index, event) from the current position back to the first event."""
        for i in range(self.position, -1, -1):
            yield i, self.history[i]

    def _last_index(self, op: str, layer: int | None = None) -> int | None:
        return next((i for i, e in self._backwards() if e.op == op and (layer is None or e.layer == layer)), None)

    def _registers(self, here: list[Event]) -> list[Register]:
        events = [e for e in here if "x" in e.tensors]
        missing = [e for e in events if "lens" not in e.info]
        if missing:
            for e, lens in zip(missing, lens_tops(self.engine, torch.stack([e.tensors["x"] for e in missing]))):
                e.info["lens"] = lens
        return [Register(e.layer, float(e.tensors["x"].float().norm()), e.info["lens"]) for e in events]

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

    def _output(self) -> Output | None:
        index = self._last_index("choose")
        if index is None:
            return None
        event = self.history[index]
        top = torch.topk(torch.softmax(event.tensors["logits"], -1), self.top)
        raw = [(int(i), self.engine.token_text(int(i)), float(p)) for p, i in zip(top.values, top.indices)]
        after = [(i, self.engine.token_text(i), p) for i, p in event.info["choice"].top]
        token = event.info["token_id"]
        return Output(event.cycle, self.engine.token_text(token), token, event.info["forced"], raw, after)

    def _sampler(self, index: int | None) -> tuple[list[SamplerStage], Draw | None]:
        """The current sampler settings run on the logits of the last choice (no model recompute)."""
        if index is None:
            return [], None
        event = self.history[index]
        previous = self.prompt_ids + self.token_ids[: event.cycle]
        steps = pipeline(event.tensors["logits"], previous, self.now.sampling)
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
        stages.append(SamplerStage("renormalise", last.kept, last.top, cells=last.cells))
        return stages, self._draw(steps[-1][1], event.info["choice"].draw)

    def _draw(self, logits: torch.Tensor, u: float | None) -> Draw:
        """Where the draw ``u`` falls on the cumulative distribution (token ids in order), as ``decode.sample`` does."""
        probs = torch.softmax(logits.double(), -1)
        kept = int((probs > 0).sum())
        if u is None or not self.now.sampling.do_sample:
            return Draw(None, self.engine.token_text(int(probs.argmax())), 0.0, 0.0, kept)
        token, low, high = slice_of(probs, u)
        return Draw(u, self.engine.token_text(token), low, high, kept)

    def _top(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        top = torch.topk(probs, k)
        return [(self.engine.token_text(int(i)), float(p)) for p, i in zip(top.values, top.indices) if p > 0]

    def _notes(self) -> list[str]:
        notes = [str(b) for b in self.breakpoints]
        if self.now.ablation.heads:
            notes.append("ablated heads: " + ", ".join(f"{a}.{b}" for a, b in sorted(self.now.ablation.heads)))
        if self._branches:
            notes.append(
                f"{len(self._branches)} earlier branch(es): "
                + " | ".join(repr(show_token(b.text[:30])) for b in self.branches)
            )
        notes += [f"intervention {line}" for line in self.now.log]
        return notes
