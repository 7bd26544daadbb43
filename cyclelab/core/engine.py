"""The engine: drives the clock, one cycle per generated token.

>>> engine = Engine(load("tiny"))
>>> trace = engine.generate("ROMEO:", max_new_tokens=20)          # run to the end
>>> for event in engine.run("ROMEO:", max_new_tokens=2): ...       # or op by op

:meth:`Engine.run` is a generator of :class:`~cyclelab.core.events.Event`: one per micro-op,
plus ``choose`` and ``append`` in the WRITEBACK stage of every cycle. Its return value
(``StopIteration.value``, or what :meth:`Engine.generate` gives back) is the
:class:`~cyclelab.core.events.Trace`. Everything else here is a consumer of that stream.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from time import perf_counter
from typing import TypeVar

import torch

from cyclelab.core.attention import KVCache
from cyclelab.core.blocks import Ablation, RunContext, architecture_for, capture_rule
from cyclelab.core.events import Cost, CycleRecord, Event, Stage, Trace
from cyclelab.core.fingerprint import fingerprint, legacy_weights_digest
from cyclelab.core.inputs import check_capture, check_flag, id_tensor, ids_of
from cyclelab.core.ops import hook_names, registry_entry
from cyclelab.core.sampling import Sampling, as_sampling, check_int, choose, make_generator
from cyclelab.kernels import settle_step
from cyclelab.loading.loader import Loaded, load


class Engine:
    """A transparent re-implementation of a model's forward pass, driven cycle by cycle.

    ``Engine(load("tiny"))``, or ``Engine("tiny")`` with a name :func:`~cyclelab.load` knows.
    It reads the weights of ``loaded.model`` in place; its logits agree with the
    model's own forward pass (see the tests).
    """

    def __init__(self, loaded: Loaded | str | Path):
        loaded = as_loaded(loaded, "Engine")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.arch = architecture_for(loaded.model)
        self.device = loaded.device
        # the KV cache of the run started last, for learners to inspect; each run keeps its own
        self.cache: KVCache | None = None
        self._token_texts: dict[int, str] = {}
        self._settled = False  # whether this engine's decode steps decided its kernels (see settle_kernels)

    @property
    def context_window(self) -> int:
        """Most positions the model can attend over (prompt plus generated tokens)."""
        return self.arch.context_window

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding: token ids run from 0 to ``vocab_size - 1``."""
        return self.arch.model.get_input_embeddings().weight.shape[0]

    @property
    def fingerprint(self) -> dict[str, str]:
        """The model's :func:`fingerprint`, recorded in every trace."""
        return fingerprint(self.loaded)

    # --- input ----------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | torch.Tensor, chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat=True`` wraps a question (text) in the model's chat template.

        ``prompt`` is a str, a list or tuple of ints, or a 1-D integer tensor; anything else
        (floats, bools, bytes, None, a 2-D tensor…) raises ``TypeError``, never a silent conversion.
        """
        check_flag(chat, "chat")
        if isinstance(prompt, str):
            ids = self._encode_text(prompt, chat)
        elif chat:
            raise ValueError(
                "chat=True wraps a question in the chat template: give the question as text, not token ids"
            )
        else:
            ids = ids_of(prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        self._check_ids(ids, "prompt token ids")
        return ids

    def _encode_text(self, prompt: str, chat: bool) -> list[int]:
        if not prompt.strip():
            raise ValueError("the prompt is empty: give at least one character of text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"the prompt is not valid Unicode text: character {err.start} is {prompt[err.start]!r} "
                f"({err.reason}); remove it"
            ) from None
        if not chat:
            return list(self.tokenizer(prompt)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.loaded.name!r} has no chat template; use chat=False")
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        """ValueError unless every id is in the vocabulary."""
        vocab = self.vocab_size  # once, not once per id
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{what}: {bad[:5]} outside the vocabulary (ids 0..{vocab - 1})")

    def token_text(self, token_id: int) -> str:
        """The text of one token (a partial UTF-8 character shows as �); each id decoded once per engine."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    # --- the forward pass ---------------------------------------------------------
    def forward(
        self, ids: torch.Tensor, cache: KVCache, cycle: int = 0, capture=None, ablation: Ablation | None = None
    ) -> Generator[Event, None, torch.Tensor]:
        """One forward pass as events; returns logits ``(batch, positions, vocab)``.

        Its cycle, capture rule and ablation live in a :class:`RunContext` of its own, so
        forward passes of different runs may interleave on one engine."""
        run = RunContext(cycle, capture_rule(capture), ablation or Ablation())
        return (yield from _without_grad(self.arch.forward(ids, cache, run)))

    def logits(self, input_ids: torch.Tensor | Sequence[int], ablation: Ablation | None = None) -> torch.Tensor:
        """Logits at every position from the re-implemented forward pass (no events kept)."""
        ids = id_tensor(input_ids)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, positions) with at least one position, got {tuple(ids.shape)}")
        if ids.shape[1] > self.context_window:
            raise ValueError(f"{ids.shape[1]} positions exceed the context window of {self.context_window}")
        self._check_ids(ids.flatten().tolist(), "input_ids")
        cache = KVCache(self.arch.n_layers, ids.shape[1])
        return drain(self.forward(ids.to(self.device), cache, ablation=self._check_ablation(ablation)))

    def run_with_cache(
        self, prompt, names=None, ablation: Ablation | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass over ``prompt`` (text or token ids), keeping the activations asked for.

        Returns the logits ``(1, positions, vocab)`` and a dict of tensors keyed by
        TransformerLens-style names (``"blocks.0.attn.hook_pattern"``, ``"blocks.3.hook_resid_post"``;
        see :func:`cyclelab.core.ops.alias_table`). ``names`` is a collection of such names, a predicate
        on a name, or None for all of them. Per-head tensors keep the engine's layout
        ``(batch, heads, positions, head_dim)``.
        """
        ids = self.encode(prompt)
        if len(ids) > self.context_window:
            raise ValueError(f"{len(ids)} tokens exceed the context window of {self.context_window}")
        wanted = self._hooks_wanted(names)
        rule = {(op, layer) for op, layer, _ in wanted}
        steps = self.forward(
            torch.tensor([ids], device=self.device),
            KVCache(self.arch.n_layers, len(ids)),
            capture=lambda op, layer: (op, layer) in rule,
            ablation=self._check_ablation(ablation),
        )
        found: dict[str, torch.Tensor] = {}

        def keep(event: Event) -> None:
            for key, tensor in event.tensors.items():
                for name in wanted.get((event.op, event.layer, key), ()):
                    found[name] = tensor.detach()

        return drain(steps, keep), found

    def _hooks_wanted(self, names) -> dict[tuple[str, int | None, str], list[str]]:
        """``(op, layer, tensor key) -> names`` of the activations ``names`` asks for."""
        every = {}
        for template, (op, key) in hook_names(self.arch.family).items():
            layers = range(self.arch.n_layers) if registry_entry(op).per_layer else [None]
            every.update({template.format(L=layer): (op, layer, key) for layer in layers})
        if names is None:
            chosen = list(every)
        elif callable(names):
            chosen = [n for n in every if names(n)]
        elif isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(
                f"names must be a collection of activation names, a predicate or None, got {type(names).__name__}"
            )
        else:
            chosen = list(names)
            unknown = [n for n in chosen if n not in every]
            if unknown:
                raise ValueError(
                    f"unknown activation name(s) {unknown[:3]} for {self.loaded.name!r}; names look "
                    f"like {', '.join(list(every)[:2])} (cyclelab.core.ops.alias_table() lists them)"
                )
        wanted: dict[tuple[str, int | None, str], list[str]] = {}
        for name in chosen:
            wanted.setdefault(every[name], []).append(name)
        return wanted

    def read_out(self, x: torch.Tensor) -> torch.Tensor:
        """WRITEBACK for any residual-stream vectors ``(..., width)``: the final norm and the
        unembedding, giving logits ``(..., vocab)``. On a middle layer's stream: the logit lens."""
        flat = x.reshape(1, -1, x.shape[-1])
        return drain(self.arch.unembed(flat)).reshape(*x.shape[:-1], -1)

    # --- cycles ---------------------------------------------------------------------
    def run(
        self,
        prompt,
        max_new_tokens: int = 32,
        sampling: Sampling | None = None,
        *,
        chat: bool = False,
        use_cache: bool = True,
        capture=None,
        keep_events: bool = False,
        force: Sequence[int | None] = (),
        ablation: Ablation | None = None,
        stop_at_eos: bool = True,
        draws: int = 0,
    ) -> Generator[Event, None, Trace]:
        """Generate token by token, yielding every event; returns the :class:`Trace`.

        ``force[c]``, when given and not None, imposes the token of cycle ``c``.
        ``draws`` advances the sampler's random stream first (used to resume a run).
        ``sampling`` is a :class:`Sampling` or a dict of its settings. Every argument is checked
        when the run starts (at the first ``next``): a wrong type is a ``TypeError``, a value out
        of range a ``ValueError``.
        """
        sampling = as_sampling(sampling)
        prompt_ids = self.encode(prompt, chat=chat)
        self.check_lengths(len(prompt_ids), max_new_tokens)
        ablation = self._check_run_options(use_cache, capture, keep_events, force, ablation, stop_at_eos, draws)
        trace = Trace(
            self.loaded.name,
            prompt_ids,
            settings=trace_settings(sampling, ablation, use_cache, chat),
            fingerprint=self.fingerprint,
        )
        self.settle_kernels()
        generator = make_generator(sampling.seed)
        for _ in range(draws):
            torch.rand(1, generator=generator)
        ids = list(prompt_ids)
        memory = KVCache(self.arch.n_layers, len(ids) + max_new_tokens) if use_cache else None
        self.cache = memory
        for cycle in range(max_new_tokens):
            start, totals = perf_counter(), Cost()
            fed = ids[len(memory) :] if memory is not None else ids
            cache = memory if memory is not None else KVCache(self.arch.n_layers, len(ids))
            step = self.forward(torch.tensor([fed], device=self.device), cache, cycle, capture, ablation)
            while True:
                try:
                    event = next(step)
                except StopIteration as done:
                    logits = done.value[0, -1]
                    break
                totals.add(event)
                if keep_events:
                    trace.events.append(event)
                yield event
            forced = force[cycle] if cycle < len(force) else None
            record = yield from write_back(
                self.token_text,
                cycle,
                logits,
                ids,
                sampling,
                generator,
                forced,
                len(fed),
                len(cache),
                start,
                totals,
                capture,
            )
            trace.records.append(record)
            ids.append(record.token_id)
            if stop_at_eos and record.token_id == self.tokenizer.eos_token_id and forced is None:
                break
        trace.text = self.tokenizer.decode(trace.token_ids, skip_special_tokens=True)  # once: the run is over
        return trace

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
        unknown = set(options) - set(inspect.signature(self.run).parameters)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; sampling settings are {sorted(names)}")
        return drain(self.run(prompt, max_new_tokens, **options))

    def replay(self, trace: Trace, capture=None, keep_events: bool = True) -> Trace:
        """Re-run a trace with its own tokens forced, e.g. to capture tensors afterwards.

        The engine's model may differ from the trace's in its weights (a fine-tuned copy: that is
        how :func:`~cyclelab.lab.compare.before_after` sees what fine-tuning changed), not in its
        tokenizer: the trace's token ids must mean the same text (``ValueError`` otherwise).
        """
        self.check_trace(trace, "tokenizer")
        return drain(
            self.run(
                trace.prompt_ids,
                len(trace.records),
                self._sampling_of(trace),
                use_cache=trace.settings.get("use_cache", True),
                capture=capture,
                keep_events=keep_events,
                force=trace.token_ids,
                ablation=_ablation_of(trace),
            )
        )

    def branch(
        self,
        trace: Trace,
        at_cycle: int,
        token: int | None = None,
        sampling: Sampling | dict | None = None,
        ablation: Ablation | None = None,
        max_new_tokens: int | None = None,
    ) -> Trace:
        """A new timeline: cycles before ``at_cycle`` as in ``trace``, then ``token`` forced there
        (if given) and the model free to continue, with other sampling or an ablation if given,
        up to ``max_new_tokens`` cycles in all (the trace's length by default).

        The trace must come from this engine's model (same weights fingerprint; for a trace file
        saved before fingerprints, the same model name): ``ValueError`` otherwise.
        """
        self.check_trace(trace, "weights")
        if not 0 <= check_int(at_cycle, "at_cycle") <= len(trace.records):
            raise ValueError(f"at_cycle must be between 0 and {len(trace.records)}, got {at_cycle}")
        if token is not None:
            self._check_ids([check_int(token, "token")], "token")
        sampling = self._sampling_of(trace) if sampling is None else as_sampling(sampling)
        n = len(trace.records) if max_new_tokens is None else check_int(max_new_tokens, "max_new_tokens")
        if n <= at_cycle:
            raise ValueError(
                f"max_new_tokens ({n}) must exceed at_cycle ({at_cycle}): "
                "the branch generates the cycles from at_cycle up to max_new_tokens"
            )
        force: list[int | None] = [*trace.token_ids[:at_cycle], token]
        draws = (
            0
            if sampling.seed != self._sampling_of(trace).seed
            else sum(1 for r in trace.records[:at_cycle] if r.draw is not None)
        )
        force_prefix = trace.token_ids[:at_cycle]
        result = drain(
            self.run(
                trace.prompt_ids + force_prefix,
                n - at_cycle,
                sampling,
                force=force[at_cycle:],
                ablation=ablation if ablation is not None else _ablation_of(trace),
                use_cache=trace.settings.get("use_cache", True),
                draws=draws,
            )
        )
        result.prompt_ids = trace.prompt_ids
        result.records = trace.records[:at_cycle] + [replace(r, cycle=r.cycle + at_cycle) for r in result.records]
        result.text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        result.settings["branched_from"] = {"at_cycle": at_cycle, "token": token}
        return result

    # --- helpers ----------------------------------------------------------------------
    def settle_kernels(self) -> None:
        """Once per engine: under ``CYCLELAB_KERNELS=auto``, whole decode steps of this model decide which kernels
        run (:func:`cyclelab.kernels.settle_step`: timed once per machine, on a scratch KV cache of 8 positions)."""
        if self._settled or self.device.type != "cpu" or self.context_window < 9:
            return
        arch, cache = self.arch, KVCache(self.arch.n_layers, 9)
        prompt, token = torch.arange(8)[None] % self.vocab_size, torch.tensor([[1 % self.vocab_size]])

        def step() -> None:  # the first call (never timed) reads the prompt: nothing is run unless a step is timed
            if not len(cache):
                drain(self.forward(prompt, cache))
            cache.truncate(8)
            drain(self.forward(token, cache))

        width = arch.model.get_input_embeddings().weight.shape[1]
        name = f"step {arch.family} {arch.n_layers}x{width} vocab {self.vocab_size}{' int8' if arch.int8 else ''}"
        self._settled = settle_step(name, step)  # not yet where nothing was decided (torch_float32, own mode)

    def check_lengths(self, n_prompt: int, max_new_tokens: int) -> None:
        """ValueError unless ``max_new_tokens >= 1`` and the prompt plus the new tokens fit the context window."""
        if check_int(max_new_tokens, "max_new_tokens") < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if n_prompt + max_new_tokens > self.context_window:
            raise ValueError(
                f"the prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                f"{self.loaded.name!r}'s context window of {self.context_window} tokens; shorten one of them"
            )

    def _check_run_options(self, use_cache, capture, keep_events, force, ablation, stop_at_eos, draws) -> Ablation:
        """Check :meth:`run`'s options (TypeError or ValueError naming the argument); return the ablation."""
        for value, name in ((use_cache, "use_cache"), (keep_events, "keep_events"), (stop_at_eos, "stop_at_eos")):
            check_flag(value, name)
        if check_int(draws, "draws") < 0:
            raise ValueError(f"draws must be >= 0, got {draws}")
        check_capture(capture)
        if not isinstance(force, (list, tuple)):
            raise TypeError(
                f"force must be a list of token ids (None where the model chooses), got {type(force).__name__}"
            )
        self._check_ids([check_int(t, "force[...]") for t in force if t is not None], "forced token ids")
        return self._check_ablation(ablation)

    def _check_ablation(self, ablation: Ablation | None) -> Ablation:
        """``ablation`` (None: nothing off) if every head and MLP it names exists; else ValueError."""
        if ablation is None:
            return Ablation()
        if not isinstance(ablation, Ablation):
            raise TypeError(
                f"ablation must be an Ablation, e.g. ablation(heads=[(0, 3)], mlps=[1]), got {type(ablation).__name__}"
            )
        n_layers, n_heads = self.arch.n_layers, self.arch.n_heads
        for layer, head in sorted(ablation.heads):
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ValueError(
                    f"ablation head ({layer}, {head}) does not exist in {self.loaded.name!r}: "
                    f"layers are 0..{n_layers - 1}, heads 0..{n_heads - 1}"
                )
        bad = [m for m in sorted(ablation.mlps) if not 0 <= m < n_layers]
        if bad:
            raise ValueError(
                f"ablation MLP layer {bad[0]} does not exist in {self.loaded.name!r}: layers are 0..{n_layers - 1}"
            )
        return ablation

    def check_trace(self, trace: Trace, part: str) -> None:
        """ValueError unless ``trace`` came from a model with this engine's ``part`` ("weights" or "tokenizer")."""
        if not isinstance(trace, Trace):
            raise TypeError(f"expected a Trace (from generate or Trace.load), got {type(trace).__name__}")
        if not trace.fingerprint:  # a file saved before traces recorded fingerprints
            if trace.model != self.loaded.name:
                raise ValueError(
                    f"this trace was made by {trace.model!r}, not by this engine's model "
                    f"{self.loaded.name!r}: use an engine of {trace.model!r}"
                )
            return
        if trace.fingerprint.get(part) != self.fingerprint[part] and not (
            part == "weights" and trace.fingerprint.get(part) == legacy_weights_digest(self.loaded.model)
        ):
            use = (
                "branch on an engine of the model that made it"
                if part == "weights"
                else "replay it on a model with the same tokenizer"
            )
            raise ValueError(
                f"this trace was made by {trace.model!r}; its {part} fingerprint differs from that of "
                f"this engine's model {self.loaded.name!r}: {use}"
            )
        self._check_texts(trace)

    def _check_texts(self, trace: Trace) -> None:
        """ValueError unless the trace's token texts and ``text`` are what this tokenizer makes of its ids."""
        vocab = self.vocab_size
        for r in trace.records:
            for token_id, text, where in [(r.token_id, r.token, "token"), *((c[0], c[1], "top") for c in r.top)]:
                if token_id < vocab and text != self.token_text(token_id):
                    raise ValueError(
                        f"this trace's cycle {r.cycle} gives token {token_id} ({where}) the text "
                        f"{text!r}, "
                        f"but the tokenizer decodes it as {self.token_text(token_id)!r}: the trace was "
                        "edited or damaged; make it again with generate"
                    )
        if all(i < vocab for i in trace.token_ids):
            text = self.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
            if trace.text != text:
                raise ValueError(
                    f"this trace's text {trace.text[:40]!r} is not what its token ids decode to "
                    f"({text[:40]!r}): the trace was edited or damaged; make it again with generate"
                )

    @staticmethod
    def _sampling_of(trace: Trace) -> Sampling:
        return Sampling(**trace.settings.get("sampling", {}))


def as_loaded(model: Loaded | str | Path, who: str) -> Loaded:
    """A :class:`Loaded` model, or the name (or folder) of one, loaded; else a TypeError saying what to pass."""
    if isinstance(model, Loaded):
        return model
    if isinstance(model, (str, Path)):
        return load(model)
    raise TypeError(
        f"{who} needs a model: a Loaded from cyclelab.load(...) or a model name such as 'tiny', "
        f"got {type(model).__name__}"
    )


def trace_settings(sampling: Sampling, ablation: Ablation, use_cache: bool, chat: bool) -> dict:
    """How a run was made, as a trace records it (plain data for JSON)."""
    return {
        "sampling": asdict(sampling),
        "use_cache": use_cache,
        "chat": chat,
        "ablation": {"heads": sorted(map(list, ablation.heads)), "mlps": sorted(ablation.mlps)},
    }


def drain(steps: Generator[Event, None, object], on_event: Callable[[Event], None] | None = None):
    """Run an event generator to the end (without gradients: nothing pauses it) and return its value;
    ``on_event`` sees each event on the way."""
    with torch.no_grad():
        while True:
            try:
                event = next(steps)
            except StopIteration as done:
                return done.value
            if on_event is not None:
                on_event(event)


R = TypeVar("R")  # what a generator of events returns


def _without_grad(steps: Generator[Event, None, R]) -> Generator[Event, None, R]:
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


def write_back(
    token_text: Callable[[int], str],
    cycle: int,
    logits: torch.Tensor,
    ids: Sequence[int],
    sampling: Sampling,
    generator: torch.Generator | None,
    forced: int | None,
    n_inputs: int,
    cache_len: int,
    start: float,
    totals: Cost,
    capture,
) -> Generator[Event, None, CycleRecord]:
    """WRITEBACK of one cycle, for every engine: the logits processors and the choice (or the ``forced``
    token), then the append; yields their two events and returns the cycle's record."""
    t = perf_counter()
    choice = choose(logits, ids, sampling, generator if sampling.do_sample else None)
    token = choice.token_id if forced is None else int(forced)
    keep = {"logits": logits} if capture_rule(capture)("choose", None) else {}
    info = {"choice": choice, "token_id": token, "forced": forced is not None}
    event = Event(cycle, Stage.WRITEBACK, None, "choose", perf_counter() - t, 5 * logits.numel(), 0, keep, info)
    totals.add(event)
    yield event
    raw_prob = choice.raw_prob if token == choice.token_id else float(torch.softmax(logits.float(), -1)[token])
    record = CycleRecord(
        cycle=cycle,
        token_id=token,
        token=token_text(token),
        prob=choice.prob if forced is None else _prob_after(choice, token, raw_prob),
        raw_prob=raw_prob,
        entropy=choice.entropy,
        top=[(i, token_text(i), round(p, 6)) for i, p in choice.top],
        greedy_id=choice.greedy_id,
        draw=choice.draw,
        forced=forced is not None,
        n_inputs=n_inputs,
        cache_len=cache_len,
        seconds=perf_counter() - start,
        flops=totals.flops,
        bytes=totals.bytes,
    )
    yield Event(cycle, Stage.WRITEBACK, None, "append", 0.0, 0, 0, {}, {"record": record})
    return record


def _prob_after(choice, token: int, raw_prob: float) -> float:
    """Probability of a forced token: from the processed top list if there, else the raw one."""
    for i, p in choice.top:
        if i == token:
            return p
    return raw_prob


def _ablation_of(trace: Trace) -> Ablation:
    spec = trace.settings.get("ablation", {})
    return Ablation(frozenset(tuple(h) for h in spec.get("heads", [])), frozenset(spec.get("mlps", [])))


def ablation(heads: Iterable[tuple[int, int]] = (), mlps: Iterable[int] = ()) -> Ablation:
    """Convenience constructor: ``ablation(heads=[(0, 3)])`` switches off head 3 of layer 0."""
    return Ablation(heads, mlps)  # type: ignore[arg-type]  # __post_init__ checks them and makes frozensets
