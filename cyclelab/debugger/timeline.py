"""The debugger's record of a run: slimmed events, the live engine run, breakpoints and timelines.

A :class:`Timeline` is one history of events (with its sampling, ablation, forced tokens and
interventions); the debugger keeps the current one and the branches it cut away. Events are
slimmed to what the views read (:func:`slim`), so a long run stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cyclelab.core.blocks import Ablation
from cyclelab.core.events import CycleRecord, Event
from cyclelab.core.sampling import Sampling

VIEW_OPS = frozenset({"embed", "kv_cache", "softmax", "residual_mlp", "choose"})


def sampler_probs(steps: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The distribution a token is drawn from: the softmax of the sampler pipeline's last stage, computed
    as ``sampling.choose`` does (every view and record reads its ``p`` from here)."""
    return torch.softmax(steps[-1][1].float(), dim=-1)


def capture_for_views(op: str, layer: int | None) -> bool:
    """The capture rule of the debugger's runs: only the ops its views read."""
    return op in VIEW_OPS


def slim(event: Event, offset: int = 0) -> Event:
    """A copy of ``event`` keeping only what the views need (last position only), its cycle shifted by ``offset``."""
    t, info, keep = event.tensors, dict(event.info), {}
    if event.op == "residual_mlp" and "out" in t:
        keep["x"] = t["out"][0, -1].detach().clone()
    elif event.op == "softmax" and "probs" in t:
        keep["probs"] = t["probs"][0, :, -1].detach().float().clone()  # (heads, keys): the last query row
    elif event.op == "choose" and "logits" in t:
        keep["logits"] = t["logits"].detach().float().clone()
    elif event.op == "kv_cache" and "keys" in t:
        info["length"] = t["keys"].shape[-2]
    elif event.op == "embed" and "out" in t:
        info["n_inputs"] = t["out"].shape[1]
    if offset and "record" in info:
        info["record"] = replace(info["record"], cycle=info["record"].cycle + offset)
    return replace(event, cycle=event.cycle + offset, tensors=keep, info=info)


class LiveRun:
    """An ``engine.run`` generator feeding the end of the debugger's history.

    The engine computes each step without gradients and restores the caller's autograd mode
    while paused, so the learner's own cells (a training cell, say) run as they expect.
    """

    def __init__(self):
        self.steps = None
        self.offset = 0  # cycle number of the run's first cycle on the timeline

    def start(self, steps, offset: int) -> None:
        """Feed from ``steps`` (an ``engine.run`` generator) whose cycle 0 is ``offset`` on the timeline."""
        self.close()
        self.steps, self.offset = steps, offset

    def next(self) -> Event:
        """The run's next event (StopIteration at its end)."""
        return next(self.steps)

    def close(self) -> None:
        """Stop the run (its generator is closed: a later start begins afresh)."""
        if self.steps is not None:
            self.steps.close()
        self.steps = None


# ------------------------------------------------------------------ breakpoints and timelines


@dataclass(frozen=True)
class Breakpoint:
    """A condition checked at every new position: an op, or a property of the token just written back."""

    kind: str  # "op", "token", "prob", "entropy", "not_greedy", "lens" (checked by the Debugger)
    value: int | float | str | None = None
    layer: int | None = None
    op: str | None = None

    def hit(self, event: Event) -> bool:
        """True when ``event`` meets the condition (value conditions fire at the ``append`` of a cycle)."""
        if self.kind == "op":
            return (self.layer is None or event.layer == self.layer) and (self.op is None or event.op == self.op)
        record: CycleRecord | None = event.info.get("record") if event.op == "append" else None
        if record is None or self.kind == "lens":
            return False
        if self.kind == "token":
            return _same_token(record, self.value)
        if self.kind == "prob":
            return record.prob < self.value
        if self.kind == "entropy":
            return record.entropy > self.value
        return record.token_id != record.greedy_id

    def __str__(self) -> str:
        if self.kind == "op":
            where = "any layer" if self.layer is None else f"layer {self.layer}"
            return f"break at {where}, op {self.op or 'any'}"
        return {
            "token": f"break when token {self.value!r} is chosen",
            "prob": f"break when p(chosen) < {self.value}",
            "entropy": f"break when entropy > {self.value} nats",
            "not_greedy": "break when the sampled token is not the greedy one",
            "lens": f"break when layer {self.layer} changes the logit-lens top-1",
        }[self.kind]


def check_one_token(engine, text: str) -> None:
    """``ValueError`` unless ``text`` (spaces around it ignored, as a token breakpoint matches) is one token
    of ``engine``'s vocabulary: a breakpoint on a text the model never writes as one token cannot fire."""
    for variant in dict.fromkeys((text, text.strip(), " " + text.strip())):
        ids = engine.tokenizer.encode(variant, add_special_tokens=False) if variant else []
        if len(ids) == 1 and engine.token_text(ids[0]).strip() == text.strip():
            return
    pieces = engine.tokenizer.encode(text, add_special_tokens=False)
    reads = ", ".join(repr(engine.token_text(i)) for i in pieces)
    raise ValueError(
        f"{text!r} is not one token of {engine.loaded.name}'s vocabulary (it reads as {len(pieces)} tokens: "
        f"{reads}), so a breakpoint on it could never fire; break on one token: a candidate the Output panel "
        "lists, or a token id (engine.token_text(id) shows its text)"
    )


def _same_token(record: CycleRecord, token: int | str) -> bool:
    if isinstance(token, int):
        return record.token_id == token
    return record.token == token or (bool(token.strip()) and record.token.strip() == token.strip())


@dataclass
class Timeline:
    """One line of history: the events seen, the settings that made them, the interventions."""

    sampling: Sampling
    ablation: Ablation
    history: list[Event] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # history index of each cycle's "append"
    forced: dict[int, int] = field(default_factory=dict)  # cycle -> token imposed there
    log: list[str] = field(default_factory=list)
    finished: bool = False  # the engine has nothing more to give

    def records(self, upto: int | None = None) -> list[CycleRecord]:
        """The cycles completed at history index ``upto`` (all by default)."""
        return [self.history[i].info["record"] for i in self.ends if upto is None or i <= upto]

    def start_of(self, cycle: int) -> int:
        """History index where ``cycle`` begins (the end of the history if it is not reached)."""
        if cycle == 0:
            return 0
        return self.ends[cycle - 1] + 1 if cycle - 1 < len(self.ends) else len(self.history)

    def cut(self, index: int) -> Timeline:
        """Forget the events from ``index`` on; return the timeline as it was before."""
        old = replace(self)
        self.history = self.history[:index]
        self.ends = [i for i in self.ends if i < index]
        self.forced = {c: t for c, t in self.forced.items() if c < len(self.ends)}
        self.log = list(self.log)
        self.finished = False
        return old
