"""The clock cycle: stages, events and traces.

Every generated token is one *cycle*, and every cycle passes four stages:

* ``FETCH`` — token ids become vectors (embedding lookup, positions);
* ``READ`` — each layer reads its weights (Q/K/V projections) and its memory (KV cache);
* ``EXECUTE`` — attention, MLP, norms and residual adds: the arithmetic;
* ``WRITEBACK`` — final norm, logits, the choice of a token, appended to the sequence.

The engine yields one :class:`Event` per micro-op; a :class:`Trace` keeps one
:class:`CycleRecord` per generated token (and the events a consumer chose to keep).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cyclelab.core.ops import Stage  # the op registry: each op's stage, tensors and TransformerLens names
from cyclelab.core.sampling import as_sampling
from cyclelab.loading.atomic import read_text, strict_json, strict_loads, write_atomic
from cyclelab.loading.schema import problem, shown, validator


@dataclass(slots=True)
class Event:
    """One micro-op of one cycle: what ran, where, what it produced and what it cost.

    ``tensors`` holds only what the consumer asked to capture (often nothing).
    ``flops`` and ``bytes`` follow from the shapes: multiply-adds count as 2 FLOPs;
    bytes are the weights read plus the activations read and written.
    """

    cycle: int
    stage: Stage
    layer: int | None
    op: str
    seconds: float = 0.0
    flops: int = 0
    bytes: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        where = f"L{self.layer}" if self.layer is not None else "--"
        return f"<cycle {self.cycle} {self.stage.value:<9} {where:>4} {self.op:<14} {self.seconds * 1e3:7.3f} ms>"


@dataclass(slots=True)
class Cost:
    """Wall time, FLOPs and bytes moved, summed over events."""

    seconds: float = 0.0
    flops: int = 0
    bytes: int = 0

    def add(self, event: Event) -> None:
        """Count ``event``'s cost in."""
        self.seconds += event.seconds
        self.flops += event.flops
        self.bytes += event.bytes

    @classmethod
    def of(cls, events) -> "Cost":
        """The summed cost of ``events``."""
        total = cls()
        for event in events:
            total.add(event)
        return total


@dataclass
class CycleRecord:
    """What one cycle produced: the chosen token, its rivals, and the cost of the cycle."""

    cycle: int
    token_id: int
    token: str  # the token's own text (may be a partial UTF-8 character, shown with �)
    prob: float  # probability of the chosen token after the logits processors
    raw_prob: float  # its probability under the plain softmax of the logits
    entropy: float  # of the processed distribution, in nats
    top: list[tuple[int, str, float]]  # (id, text, probability) of the leading candidates
    greedy_id: int
    draw: float | None  # the uniform number drawn when sampling; None for greedy
    forced: bool  # True when the token was imposed (replay, branch) rather than chosen
    n_inputs: int  # tokens fed this cycle: the whole prompt at cycle 0 (prefill), then 1
    cache_len: int  # KV cache length after the cycle
    seconds: float
    flops: int
    bytes: int

    @property
    def prefill(self) -> bool:
        """True for the cycle that read the whole prompt."""
        return self.n_inputs > 1


@dataclass
class Trace:
    """A generation, cycle by cycle: enough to show it, save it, replay it and branch from it."""

    model: str
    prompt_ids: list[int]
    records: list[CycleRecord] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # sampling, interventions, cache use
    text: str = ""  # the generated text, decoded
    events: list[Event] = field(default_factory=list)  # only those a consumer kept
    fingerprint: dict[str, str] = field(default_factory=dict)  # the model's: see engine.fingerprint

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids (without the prompt)."""
        return [r.token_id for r in self.records]

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_ids + self.token_ids

    def table(self, top: int = 3, digits: int = 3, times: bool = True) -> str:
        """The trace as a fixed-width text table: cycle, token, top candidates, time."""
        header = f"{'cycle':>5}  {'token':<14} {'top candidates':<{top * 20}}" + ("  ms" if times else "")
        lines = [header.rstrip()]
        for r in self.records:
            cands = "  ".join(f"{show_token(t)}:{p:.{digits}f}" for _, t, p in r.top[:top])
            row = f"{r.cycle:>5}  {show_token(r.token):<14} {cands:<{top * 20}}"
            lines.append((row + (f"  {r.seconds * 1e3:.1f}" if times else "")).rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data (no tensors, no events) for JSON."""
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "prompt_ids": self.prompt_ids,
            "settings": self.settings,
            "text": self.text,
            "records": [asdict(r) for r in self.records],
        }

    def save(self, path: str | Path) -> None:
        """Write the trace as standard JSON (never pickle), atomically: a failed save leaves the old file whole.

        A NaN or infinite number (e.g. ``temperature=nan`` on a greedy run) is a ``ValueError`` naming the field.
        """
        write_atomic(path, strict_json(self.to_dict(), f"the trace for {path}", indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a trace written by :meth:`save`, checking every field.

        A file that is not such a trace (empty, truncated, not JSON, nested too deeply, a field
        missing, unknown or of the wrong type or range) raises one ``ValueError`` naming the
        file and the field. Files saved before traces recorded their model's fingerprint load
        with an empty :attr:`fingerprint`; replaying them then only checks the model's name.
        """
        path = Path(path)
        try:
            raw = strict_loads(read_text(path, "trace file"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            problem = "nested too deeply" if isinstance(err, RecursionError) else f"not JSON ({err})"
            raise ValueError(
                f"{path} is not a trace file: {problem}; "
                "it may be empty or truncated: save the trace again with Trace.save"
            ) from None
        return _TraceFile(path).trace(raw)


class _TraceFile:
    """Checks the parsed JSON of a trace file against ``trace.schema.json``, then what a schema cannot say
    (cycles numbered in order, one text per token id, the sampling settings); the first problem raises a
    ValueError naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, problem: str) -> None:
        raise ValueError(f"{self.path} is not a valid trace file: {problem} (write traces with Trace.save)")

    def trace(self, raw) -> Trace:
        found = problem(validator("cyclelab.core", "trace.schema.json"), raw)
        if found:
            self.fail(found)
        records = [CycleRecord(**{**r, "top": [tuple(c) for c in r["top"]]}) for r in raw["records"]]
        for i, record in enumerate(records):
            if record.cycle != i:
                self.fail(f"records[{i}].cycle must be {i} (cycles are numbered from 0 in order), got {record.cycle}")
        self.texts_agree(records)
        if "sampling" in raw["settings"]:
            try:
                as_sampling(raw["settings"]["sampling"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self.path} is not a valid trace file: settings.sampling: {err}") from None
        return Trace(
            raw["model"],
            raw["prompt_ids"],
            records,
            raw["settings"],
            raw["text"],
            fingerprint=raw.get("fingerprint", {}),
        )

    def texts_agree(self, records: list[CycleRecord]) -> None:
        """Each token id has one text throughout the file (as a chosen token and as a candidate)."""
        seen: dict[int, tuple[str, str]] = {}
        for i, r in enumerate(records):
            pairs = [(r.token_id, r.token, f"records[{i}].token")]
            pairs += [(c[0], c[1], f"records[{i}].top[{j}]") for j, c in enumerate(r.top)]
            for token_id, text, where in pairs:
                first = seen.setdefault(token_id, (text, where))
                if first[0] != text:
                    self.fail(
                        f"{where} must be the text of token {token_id}, {first[0]!r} (as in {first[1]}), got {shown(text)}"
                    )


def show_token(token: str) -> str:
    """A token made visible: spaces as ␣, newlines as ⏎."""
    return token.replace(" ", "␣").replace("\n", "⏎")


def format_events(events: list[Event], times: bool = True) -> str:
    """A text table of events: cycle, stage, layer, op, the shapes of captured tensors, and ms."""
    lines = [f"{'cycle':>5} {'stage':<9} {'layer':>5}  {'op':<14} {'tensors':<40}" + ("  ms" if times else "")]
    for e in events:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in e.tensors.items())
        layer = "" if e.layer is None else str(e.layer)
        row = f"{e.cycle:>5} {e.stage.value:<9} {layer:>5}  {e.op:<14} {shapes:<40}"
        lines.append((row + (f"  {e.seconds * 1e3:.3f}" if times else "")).rstrip())
    return "\n".join(lines)
