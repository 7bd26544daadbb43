"""The debugger's breakpoints: the commands that set them, and how each fires on an event.

:class:`Breakpoints` is the half of :class:`~cyclelab.debugger.session.Debugger` that sets and checks
breakpoints (a mixin). Value breakpoints (token, probability, entropy, not greedy) fire at the
``append`` event of a cycle, when the chosen token is written back; op breakpoints fire on that op;
a logit-lens breakpoint compares one layer's top-1 token with the layer below. There are none at
the start: **Continue** then runs to the end and says so.
"""

from __future__ import annotations

from cyclelab.core.events import Event
from cyclelab.core.ops import OPS
from cyclelab.debugger.commands import check_int, command
from cyclelab.debugger.state import lens_tops
from cyclelab.debugger.timeline import Breakpoint, check_one_token


class Breakpoints:
    """Setting and checking breakpoints (a mixin of the Debugger: ``self.breakpoints`` is its list)."""

    @command
    def break_on_token(self, token: str | int) -> Breakpoint:
        """Stop when this token (its text, spaces around it ignored, or its id) is chosen. A text must be
        exactly one token of the vocabulary (else ``ValueError``: it could never fire)."""
        if isinstance(token, int):
            check_int(token, 0, self.engine.vocab_size - 1, "token id")
        elif not isinstance(token, str) or not token:
            raise ValueError(f"give a token's text or id, got {token!r}")
        else:
            check_one_token(self.engine, token)
        return self._add(Breakpoint("token", token))

    @command
    def break_below(self, p: float) -> Breakpoint:
        """Stop when the chosen token's probability (after the processors) is below ``p``."""
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a probability (a number in (0, 1]), got {p!r} ({type(p).__name__})")
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        return self._add(Breakpoint("prob", float(p)))

    @command
    def break_entropy_above(self, h: float) -> Breakpoint:
        """Stop when the entropy of the distribution the token was chosen from exceeds ``h`` nats."""
        if isinstance(h, bool) or not isinstance(h, (int, float)):
            raise TypeError(f"entropy threshold must be a number of nats, got {h!r} ({type(h).__name__})")
        if not (h >= 0 and h != float("inf")):  # NaN fails every comparison: it would never fire
            raise ValueError(f"entropy threshold must be a finite number >= 0 nats, got {h!r}")
        return self._add(Breakpoint("entropy", float(h)))

    @command
    def break_when_not_greedy(self) -> Breakpoint:
        """Stop when the token written back is not the most likely one."""
        return self._add(Breakpoint("not_greedy"))

    @command
    def break_at(self, layer: int | None = None, op: str | None = None) -> Breakpoint:
        """Stop at an op (any layer), at a layer (any op), or at one op of one layer."""
        if layer is None and op is None:
            raise ValueError("give a layer, an op, or both")
        if layer is not None:
            check_int(layer, 0, self.engine.arch.n_layers - 1, "layer")
        if op is not None and op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
        return self._add(Breakpoint("op", layer=layer, op=op))

    @command
    def break_on_lens_change(self, layer: int) -> Breakpoint:
        """Stop after ``layer`` when it changes the logit-lens top-1 token (what the model would say
        if it stopped there) from the one after ``layer - 1``: where the model changes its mind."""
        check_int(layer, 1, self.engine.arch.n_layers - 1, "layer (from 1: it is compared with the one below)")
        return self._add(Breakpoint("lens", layer=layer))

    @command
    def clear_breakpoints(self) -> None:
        """Remove every breakpoint."""
        self.breakpoints.clear()
        self.message = "breakpoints cleared"

    def _add(self, breakpoint: Breakpoint) -> Breakpoint:
        if breakpoint not in self.breakpoints:
            self.breakpoints.append(breakpoint)
        self.message = f"set: {breakpoint}"
        return breakpoint

    def _hits(self, breakpoint: Breakpoint, event: Event) -> bool:
        """``breakpoint.hit(event)``; a logit-lens breakpoint also compares with the layer below."""
        if breakpoint.kind != "lens":
            return breakpoint.hit(event)
        if event.op != "residual_mlp" or event.layer != breakpoint.layer or "x" not in event.tensors:
            return False
        below = next(
            (
                e
                for _, e in self._backwards()
                if e.op == "residual_mlp" and e.cycle == event.cycle and e.layer == breakpoint.layer - 1
            ),
            None,
        )
        return below is not None and self._lens_top1(below) != self._lens_top1(event)

    def _lens_top1(self, event: Event) -> str:
        if "lens" not in event.info:
            event.info["lens"] = lens_tops(self.engine, event.tensors["x"][None])[0]
        return event.info["lens"][0][0]
