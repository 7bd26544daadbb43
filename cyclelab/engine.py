"""The engine: drives the clock, one cycle per generated token.

>>> engine = Engine(load("tiny"))
>>> trace = engine.generate("ROMEO:", max_new_tokens=20)          # run to the end
>>> for event in engine.run("ROMEO:", max_new_tokens=2): ...       # or op by op

:meth:`Engine.run` is a generator of :class:`~cyclelab.cycle.Event`: one per micro-op,
plus ``choose`` and ``append`` in the WRITEBACK stage of every cycle. Its return value
(``StopIteration.value``, or what :meth:`Engine.generate` gives back) is the
:class:`~cyclelab.cycle.Trace`. Everything else here is a consumer of that stream.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import asdict, replace
from time import perf_counter

import torch

from .attention import KVCache
from .cycle import CycleRecord, Event, Stage, Trace
from .decode import Sampling, choose, make_generator
from .models import Loaded
from .transformer import Ablation, architecture_for, capture_rule


class Engine:
    """A transparent re-implementation of a model's forward pass, driven cycle by cycle.

    It reads the weights of ``loaded.model`` in place; its logits agree with the
    model's own forward pass (see the tests).
    """

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.arch = architecture_for(loaded.model)
        self.device = loaded.device
        self.cache: KVCache | None = None  # the memory of the run in progress

    @property
    def context_window(self) -> int:
        """Most positions the model can attend over (prompt plus generated tokens)."""
        return self.arch.context_window

    # --- input ----------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | torch.Tensor, chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat=True`` wraps a question in the model's chat template."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty: give at least one character of text")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError(f"{self.loaded.name!r} has no chat template; use chat=False")
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if not isinstance(ids, list) else ids
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        vocab = self.arch.model.get_input_embeddings().weight.shape[0]
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return [int(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """The text of one token (a partial UTF-8 character shows as �)."""
        return self.tokenizer.decode([token_id])

    # --- the forward pass ---------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: KVCache, cycle: int = 0, capture=None,
                ablation: Ablation | None = None) -> Generator[Event, None, torch.Tensor]:
        """One forward pass as events; returns logits ``(batch, positions, vocab)``."""
        self.arch.cycle, self.arch.capture = cycle, capture_rule(capture)
        self.arch.ablation = ablation or Ablation()
        return (yield from _without_grad(self.arch.forward(ids, cache)))

    def logits(self, input_ids: torch.Tensor | Sequence[int], ablation: Ablation | None = None) -> torch.Tensor:
        """Logits at every position from the re-implemented forward pass (no events kept)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, positions) with at least one position, got {tuple(ids.shape)}")
        if ids.shape[1] > self.context_window:
            raise ValueError(f"{ids.shape[1]} positions exceed the context window of {self.context_window}")
        cache = KVCache(self.arch.n_layers, ids.shape[1])
        return drain(self.forward(ids.to(self.device), cache, ablation=ablation))

    # --- cycles ---------------------------------------------------------------------
    def run(self, prompt, max_new_tokens: int = 32, sampling: Sampling | None = None, *, chat: bool = False,
            use_cache: bool = True, capture=None, keep_events: bool = False, force: Sequence[int | None] = (),
            ablation: Ablation | None = None, stop_at_eos: bool = True, draws: int = 0) -> Generator[Event, None, Trace]:
        """Generate token by token, yielding every event; returns the :class:`Trace`.

        ``force[c]``, when given and not None, imposes the token of cycle ``c``.
        ``draws`` advances the sampler's random stream first (used to resume a run).
        """
        sampling = sampling or Sampling()
        prompt_ids = self.encode(prompt, chat=chat)
        self._check_lengths(len(prompt_ids), max_new_tokens)
        trace = Trace(self.loaded.name, prompt_ids, settings={
            "sampling": asdict(sampling), "use_cache": use_cache, "chat": chat,
            "ablation": {"heads": sorted(map(list, (ablation or Ablation()).heads)), "mlps": sorted((ablation or Ablation()).mlps)}})
        generator = make_generator(sampling.seed)
        for _ in range(draws):
            torch.rand(1, generator=generator)
        ids = list(prompt_ids)
        self.cache = KVCache(self.arch.n_layers, len(ids) + max_new_tokens) if use_cache else None
        for cycle in range(max_new_tokens):
            start, totals = perf_counter(), [0.0, 0, 0]
            fed = ids[len(self.cache):] if use_cache else ids
            cache = self.cache if use_cache else KVCache(self.arch.n_layers, len(ids))
            step = self.forward(torch.tensor([fed], device=self.device), cache, cycle, capture, ablation)
            while True:
                try:
                    event = next(step)
                except StopIteration as done:
                    logits = done.value[0, -1]
                    break
                _add_cost(totals, event)
                if keep_events:
                    trace.events.append(event)
                yield event
            forced = force[cycle] if cycle < len(force) else None
            record = yield from self._write_back(cycle, logits, ids, sampling, generator, forced, len(fed),
                                                 len(cache), start, totals, capture)
            trace.records.append(record)
            ids.append(record.token_id)
            trace.text = self.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
            if stop_at_eos and record.token_id == self.tokenizer.eos_token_id and forced is None:
                break
        return trace

    def _write_back(self, cycle, logits, ids, sampling, generator, forced, n_inputs, cache_len, start, totals, capture):
        """WRITEBACK: logits processors and the choice, then the append; returns the record."""
        t = perf_counter()
        previous = torch.tensor(ids, device=logits.device)
        choice = choose(logits, previous, sampling, generator if sampling.do_sample else None)
        token = choice.token_id if forced is None else int(forced)
        keep = {"logits": logits} if capture_rule(capture)("choose", None) else {}
        event = Event(cycle, Stage.WRITEBACK, None, "choose", perf_counter() - t, 5 * logits.numel(), 0, keep,
                      {"choice": choice, "token_id": token, "forced": forced is not None})
        _add_cost(totals, event)
        yield event
        probs = torch.softmax(logits.float(), -1)
        record = CycleRecord(
            cycle=cycle, token_id=token, token=self.token_text(token),
            prob=choice.prob if forced is None else _prob_after(choice, token, probs),
            raw_prob=float(probs[token]), entropy=choice.entropy,
            top=[(i, self.token_text(i), round(p, 6)) for i, p in choice.top],
            greedy_id=choice.greedy_id, draw=choice.draw, forced=forced is not None,
            n_inputs=n_inputs, cache_len=cache_len, seconds=perf_counter() - start, flops=totals[1], bytes=totals[2])
        yield Event(cycle, Stage.WRITEBACK, None, "append", 0.0, 0, 0, {}, {"record": record})
        return record

    def generate(self, prompt, max_new_tokens: int = 32, **options) -> Trace:
        """Run to the end and return the :class:`Trace`.

        Sampling settings (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``seed``) may be given as keywords or as ``sampling=``.
        """
        names = set(Sampling.__dataclass_fields__)
        settings = {k: options.pop(k) for k in list(options) if k in names}
        if settings:
            if options.get("sampling") is not None:
                raise ValueError("give sampling settings either as keywords or as sampling=, not both")
            options["sampling"] = Sampling(**settings)
        unknown = set(options) - set(self.run.__code__.co_varnames)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; sampling settings are {sorted(names)}")
        return drain(self.run(prompt, max_new_tokens, **options))

    def replay(self, trace: Trace, capture=None, keep_events: bool = True) -> Trace:
        """Re-run a trace with its own tokens forced, e.g. to capture tensors afterwards."""
        return drain(self.run(trace.prompt_ids, len(trace.records), self._sampling_of(trace),
                              use_cache=trace.settings.get("use_cache", True), capture=capture,
                              keep_events=keep_events, force=trace.token_ids, ablation=_ablation_of(trace)))

    def branch(self, trace: Trace, at_cycle: int, token: int | None = None, sampling: Sampling | None = None,
               ablation: Ablation | None = None, max_new_tokens: int | None = None) -> Trace:
        """A new timeline: cycles before ``at_cycle`` as in ``trace``, then ``token`` forced there
        (if given) and the model free to continue, with other sampling or an ablation if given."""
        if not 0 <= at_cycle <= len(trace.records):
            raise ValueError(f"at_cycle must be between 0 and {len(trace.records)}, got {at_cycle}")
        sampling = sampling or self._sampling_of(trace)
        n = max_new_tokens or len(trace.records)
        force: list[int | None] = list(trace.token_ids[:at_cycle]) + [token]
        draws = 0 if sampling.seed != self._sampling_of(trace).seed else sum(1 for r in trace.records[:at_cycle] if r.draw is not None)
        force_prefix = trace.token_ids[:at_cycle]
        result = drain(self.run(trace.prompt_ids + force_prefix, n - at_cycle, sampling, force=force[at_cycle:],
                                ablation=ablation if ablation is not None else _ablation_of(trace),
                                use_cache=trace.settings.get("use_cache", True), draws=draws))
        result.prompt_ids = trace.prompt_ids
        result.records = trace.records[:at_cycle] + [replace(r, cycle=r.cycle + at_cycle) for r in result.records]
        result.text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        result.settings["branched_from"] = {"at_cycle": at_cycle, "token": token}
        return result

    # --- helpers ----------------------------------------------------------------------
    def _check_lengths(self, n_prompt: int, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if n_prompt + max_new_tokens > self.context_window:
            raise ValueError(
                f"the prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                f"{self.loaded.name!r}'s context window of {self.context_window} tokens; shorten one of them")

    @staticmethod
    def _sampling_of(trace: Trace) -> Sampling:
        return Sampling(**trace.settings.get("sampling", {}))


def drain(steps: Generator[Event, None, object]):
    """Run an event generator to the end (without gradients: nothing pauses it) and return its value."""
    with torch.no_grad():
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value


def _without_grad(steps: Generator[Event, None, object]) -> Generator[Event, None, object]:
    """Drive ``steps`` with autograd off while it computes, and on again while it is paused,
    so a half-finished run never leaves the caller's code without gradients."""
    if not torch.is_grad_enabled():  # run to the end by drain(), or the caller turned them off
        return (yield from steps)
    while True:
        with torch.no_grad():
            try:
                event = next(steps)
            except StopIteration as done:
                return done.value
        yield event


def _add_cost(totals: list, event: Event) -> None:
    totals[0] += event.seconds
    totals[1] += event.flops
    totals[2] += event.bytes


def _prob_after(choice, token: int, raw: torch.Tensor) -> float:
    """Probability of a forced token: from the processed top list if there, else the raw one."""
    for i, p in choice.top:
        if i == token:
            return p
    return float(raw[token])


def _ablation_of(trace: Trace) -> Ablation:
    spec = trace.settings.get("ablation", {})
    return Ablation(frozenset(tuple(h) for h in spec.get("heads", [])), frozenset(spec.get("mlps", [])))


def ablation(heads: Iterable[tuple[int, int]] = (), mlps: Iterable[int] = ()) -> Ablation:
    """Convenience constructor: ``ablation(heads=[(0, 3)])`` switches off head 3 of layer 0."""
    return Ablation(frozenset((int(a), int(b)) for a, b in heads), frozenset(int(m) for m in mlps))
