"""The encoder–decoder engine: the encoder pass once, then one decoder cycle per target token.

>>> engine = Seq2SeqEngine("folio-mt")
>>> trace = engine.generate("Wherein our Entertainment shall shame vs", max_new_tokens=30)   # greedy
>>> best = engine.beam_search("...", num_beams=4, length_penalty=1.0)                         # beam search

:meth:`Seq2SeqEngine.run` yields the encoder pass's events (ops ``enc_*`` and ``cross_kv``, which writes
the :class:`~cyclelab.core.seq2seq.EncoderMemory`), then each cycle's events, the decoder reading its
KV cache (``kv_cache``) and the encoder memory (``cross_read``). It returns a :class:`~cyclelab.core.events.Trace`
whose ``prompt_ids`` are the source's token ids. Without caches (``use_cache=False``) every cycle runs the
encoder again and the decoder over every target position: the same tokens, more work.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from cyclelab.core.attention import KVCache
from cyclelab.core.beam import BeamResult, beam_search, check_beam_options
from cyclelab.core.blocks import Ablation, RunContext, capture_rule
from cyclelab.core.engine import _without_grad, as_loaded, drain, write_back
from cyclelab.core.events import Cost, Event, Trace
from cyclelab.core.fingerprint import fingerprint
from cyclelab.core.inputs import check_flag, ids_of
from cyclelab.core.sampling import Sampling, check_int
from cyclelab.core.seq2seq import EncoderMemory, activation_names, check_capture, seq2seq_architecture_for
from cyclelab.loading.loader import Loaded


class Seq2SeqEngine:
    """A transparent re-implementation of an encoder–decoder's forward pass (Marian), cycle by cycle.

    ``Seq2SeqEngine(load("folio-mt"))`` or ``Seq2SeqEngine("folio-mt")``. Its logits agree with the
    model's own forward pass (see ``tests/test_seq2seq.py``).
    """

    def __init__(self, loaded: Loaded | str | Path):
        self.loaded = as_loaded(loaded, "Seq2SeqEngine")
        self.tokenizer = self.loaded.tokenizer
        self.arch = seq2seq_architecture_for(self.loaded.model)
        self.device = self.loaded.device
        config: Any = self.loaded.model.config
        self.start_id, self.eos_id = int(config.decoder_start_token_id), int(config.eos_token_id)
        self.cache: KVCache | None = None  # the decoder KV cache of the run started last
        self.memory: EncoderMemory | None = None  # the encoder memory of the run started last
        self._texts: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        """Rows of the (shared) embedding."""
        model: Any = self.loaded.model
        return model.get_input_embeddings().weight.shape[0]

    @property
    def context_window(self) -> int:
        """Most positions the encoder reads, and most the decoder writes (its start token included)."""
        return self.arch.context_window

    @property
    def fingerprint(self) -> dict[str, str]:
        """The model's :func:`~cyclelab.core.fingerprint.fingerprint`, recorded in every trace."""
        return fingerprint(self.loaded)

    def read_out(self, x: torch.Tensor) -> torch.Tensor:
        """WRITEBACK for any decoder stream vectors ``(..., width)``: logits ``(..., vocab)`` (the logit lens)."""
        flat = x.reshape(1, -1, x.shape[-1])
        return drain(self.arch.unembed(flat)).reshape(*x.shape[:-1], -1)

    def token_text(self, token_id: int) -> str:
        """The text of one token, decoded once per engine."""
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id])
        return self._texts[token_id]

    # --- input ----------------------------------------------------------------------
    def encode(self, source: str | Sequence[int] | torch.Tensor) -> list[int]:
        """Token ids of the source: text (the tokenizer appends ``</s>``) or token ids; checked."""
        if isinstance(source, str):
            if not source.strip():
                raise ValueError("the source is empty: give at least one character of text")
            ids = list(self.tokenizer(source)["input_ids"])
        else:
            ids = ids_of(source)
        if not ids:
            raise ValueError("the source has no tokens")
        self._check_ids(ids, "source token ids")
        if len(ids) > self.context_window:
            raise ValueError(f"the source has {len(ids)} tokens; the model reads at most {self.context_window}")
        return ids

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: {bad[:5]} outside the vocabulary (ids 0..{self.vocab_size - 1})")

    # --- the two passes -----------------------------------------------------------------
    def encoder_pass(
        self, source_ids: list[int], cycle: int = 0, capture=None, rows: int = 1
    ) -> Generator[Event, None, EncoderMemory]:
        """The encoder pass as events; returns the encoder memory (seen by ``rows`` decoder rows)."""
        run = RunContext(cycle, capture_rule(capture))
        ids = torch.tensor([source_ids], device=self.device)
        states = yield from _without_grad(self.arch.encode(run, ids))  # inference: no autograd graph
        memory = yield from _without_grad(self.arch.memory(run, source_ids, states))
        return memory.expand(rows) if rows > 1 else memory

    def decoder_pass(
        self, ids: torch.Tensor, cache: KVCache, memory: EncoderMemory, cycle: int = 0, capture=None, ablation=None
    ) -> Generator[Event, None, torch.Tensor]:
        """One decoder pass over ``ids`` ``(rows, positions)`` after the cached ones; returns the logits."""
        run = RunContext(cycle, capture_rule(capture), ablation or Ablation())
        return (yield from _without_grad(self.arch.decode(run, ids, cache, memory)))

    def logits(self, source, decoder_ids: Sequence[int]) -> torch.Tensor:
        """Logits ``(1, positions, vocab)`` at every decoder position (no events kept)."""
        return self.run_with_cache(source, decoder_ids, names=())[0]

    def run_with_cache(
        self, source, decoder_ids: Sequence[int] | None = None, names=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder pass and one decoder pass over ``decoder_ids`` (default: the start token alone),
        keeping the activations asked for: names such as ``"encoder.blocks.0.attn.hook_pattern"``,
        ``"decoder.blocks.1.cross_attn.hook_pattern"``, ``"encoder_memory.0.keys"`` or
        ``"decoder.blocks.0.kv_cache.keys"`` (:func:`~cyclelab.core.seq2seq.activation_names` lists them);
        ``names`` is a collection, a predicate, or None for all."""
        source_ids = self.encode(source)
        target = [self.start_id] if decoder_ids is None else ids_of(decoder_ids)
        if not target or len(target) > self.context_window:
            raise ValueError(f"decoder_ids must hold 1 to {self.context_window} token ids, got {len(target)}")
        self._check_ids(target, "decoder_ids")
        wanted = self._wanted(names)
        rule = {(op, layer) for op, layer, _ in wanted.values()}
        capture = lambda op, layer: (op, layer) in rule  # noqa: E731
        found: dict[str, torch.Tensor] = {}

        def keep(event: Event) -> None:
            for name, (op, layer, key) in wanted.items():
                if event.op == op and event.layer == layer and key in event.tensors:
                    found[name] = event.tensors[key].detach()

        memory = drain(self.encoder_pass(source_ids, capture=capture), keep)
        cache = KVCache(self.arch.n_layers, len(target))
        ids = torch.tensor([target], device=self.device)
        return drain(self.decoder_pass(ids, cache, memory, capture=capture), keep), found

    def _wanted(self, names) -> dict[str, tuple[str, int | None, str]]:
        every = activation_names(self.arch.n_encoder_layers, self.arch.n_layers)
        if names is None:
            return every
        if callable(names):
            return {n: v for n, v in every.items() if names(n)}
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(f"names must be a collection of activation names, a predicate or None, got {names!r}")
        unknown = [n for n in names if n not in every]
        if unknown:
            raise ValueError(f"unknown activation name(s) {unknown[:3]}; names look like {', '.join(list(every)[:2])}")
        return {n: every[n] for n in names}

    # --- cycles -----------------------------------------------------------------------------
    def run(
        self,
        source,
        max_new_tokens: int = 32,
        *,
        use_cache: bool = True,
        capture=None,
        keep_events: bool = False,
        force: Sequence[int | None] = (),
        stop_at_eos: bool = True,
        prefix: Sequence[int] = (),
        ablation: Ablation | None = None,
    ) -> Generator[Event, None, Trace]:
        """Greedy decoding, every event yielded; returns the :class:`Trace` (``force[c]`` imposes cycle c's token).

        ``prefix``: target tokens already chosen (after the start token), read by the first cycle (to resume
        a run); ``ablation`` switches off decoder heads (self- and cross-attention) or MLPs."""
        source_ids = self.encode(source)
        self._check_run(max_new_tokens, use_cache, capture, keep_events, force, stop_at_eos)
        prefix = ids_of(list(prefix)) if prefix else []
        self._check_ids(prefix, "prefix")
        ablation = self._check_ablation(ablation)
        sampling = Sampling()
        trace = Trace(
            self.loaded.name,
            source_ids,
            settings={"seq2seq": True, "use_cache": use_cache, "sampling": asdict(sampling), "prefix": list(prefix)},
            fingerprint=self.fingerprint,
        )
        target = [self.start_id, *prefix]
        if len(target) + max_new_tokens > self.context_window:
            raise ValueError(
                f"the prefix ({len(prefix)} tokens) plus max_new_tokens exceed {self.context_window} positions"
            )
        memory: EncoderMemory | None = None
        cache = KVCache(self.arch.n_layers, len(target) + max_new_tokens) if use_cache else None
        self.cache = cache
        for cycle in range(max_new_tokens):
            start, totals = perf_counter(), Cost()
            if memory is None or not use_cache:  # the encoder pass: once, or every cycle without caches
                memory = yield from self._counted(
                    self.encoder_pass(source_ids, cycle, capture), trace, totals, keep_events
                )
                self.memory = memory
            step_cache = cache if cache is not None else KVCache(self.arch.n_layers, len(target))
            fed = target[len(step_cache) :]
            logits = yield from self._counted(
                self.decoder_pass(
                    torch.tensor([fed], device=self.device), step_cache, memory, cycle, capture, ablation
                ),
                trace,
                totals,
                keep_events,
            )
            forced = force[cycle] if cycle < len(force) else None
            record = yield from write_back(
                self.token_text,
                cycle,
                logits[0, -1],
                target,
                Sampling(),
                None,
                forced,
                len(fed),
                len(step_cache),
                start,
                totals,
                capture,
            )
            trace.records.append(record)
            target.append(record.token_id)
            if stop_at_eos and record.token_id == self.eos_id and forced is None:
                break
        trace.text = self.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
        return trace

    @staticmethod
    def _counted(steps, trace: Trace, totals: Cost, keep: bool):
        """Pass ``steps``' events on, counting their cost and keeping them on the trace if asked; return its value."""
        while True:
            try:
                event = next(steps)
            except StopIteration as done:
                return done.value
            totals.add(event)
            if keep:
                trace.events.append(event)
            yield event

    def _check_run(self, max_new_tokens, use_cache, capture, keep_events, force, stop_at_eos) -> None:
        if check_int(max_new_tokens, "max_new_tokens") < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if max_new_tokens + 1 > self.context_window:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) plus the start token exceed {self.context_window} positions"
            )
        for value, name in ((use_cache, "use_cache"), (keep_events, "keep_events"), (stop_at_eos, "stop_at_eos")):
            check_flag(value, name)
        check_capture(capture)
        if not isinstance(force, (list, tuple)):
            raise TypeError(
                f"force must be a list of token ids (None where the model chooses), got {type(force).__name__}"
            )
        self._check_ids([check_int(t, "force[...]") for t in force if t is not None], "forced token ids")

    def _check_ablation(self, ablation: Ablation | None) -> Ablation:
        """``ablation`` (None: nothing off) if every decoder head and MLP it names exists; else ValueError."""
        if ablation is None:
            return Ablation()
        if not isinstance(ablation, Ablation):
            raise TypeError(
                f"ablation must be an Ablation, e.g. ablation(heads=[(0, 1)]), got {type(ablation).__name__}"
            )
        n_layers, n_heads = self.arch.n_layers, self.arch.n_heads
        bad: list = [h for h in ablation.heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
        bad += [m for m in ablation.mlps if not 0 <= m < n_layers]
        if bad:
            raise ValueError(
                f"ablation names {bad[0]}, which the decoder does not have: layers 0..{n_layers - 1}, heads 0..{n_heads - 1}"
            )
        return ablation

    def generate(self, source, max_new_tokens: int = 32, **options) -> Trace:
        """Greedy decoding to the end (options as :meth:`run`)."""
        return drain(self.run(source, max_new_tokens, **options))

    def replay(self, trace: Trace, capture=None, keep_events: bool = True) -> Trace:
        """Re-run a seq2seq trace with its own tokens forced (e.g. to capture tensors afterwards)."""
        if not isinstance(trace, Trace) or not trace.settings.get("seq2seq"):
            raise ValueError("replay needs a Trace made by a Seq2SeqEngine (its settings say seq2seq)")
        return drain(
            self.run(
                trace.prompt_ids,
                len(trace.records),
                use_cache=trace.settings.get("use_cache", True),
                capture=capture,
                keep_events=keep_events,
                force=trace.token_ids,
            )
        )

    def beam_search(
        self, source, num_beams: int = 4, length_penalty: float = 1.0, max_new_tokens: int = 32
    ) -> BeamResult:
        """Beam search with a length penalty (as ``model.generate(num_beams=..., length_penalty=...,
        do_sample=False)``): the encoder pass once, its memory shared by every beam; each beam its
        own rows of the decoder KV cache, reordered as beams are kept or dropped."""
        check_beam_options(num_beams, length_penalty, max_new_tokens)
        source_ids = self.encode(source)
        self._check_run(max_new_tokens, True, None, False, (), True)
        memory = drain(self.encoder_pass(source_ids, rows=num_beams))
        cache = KVCache(self.arch.n_layers, max_new_tokens + 1)

        def step(rows: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
            if rows is not None:
                reorder(cache, rows)
            return drain(self.decoder_pass(tokens[:, None].to(self.device), cache, memory))[:, -1]

        return beam_search(step, self.start_id, self.eos_id, num_beams, length_penalty, max_new_tokens)

    def translate(self, source, max_new_tokens: int = 32, num_beams: int = 1, length_penalty: float = 1.0) -> str:
        """The output text: greedy (``num_beams=1``) or beam search."""
        if num_beams == 1:
            return self.generate(source, max_new_tokens).text
        ids = self.beam_search(source, num_beams, length_penalty, max_new_tokens).token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def reorder(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep row ``rows[j]`` of every layer's keys and values as row j (beam search's bookkeeping)."""
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if k is not None and v is not None:
            cache.keys[i], cache.values[i] = k[rows.to(k.device)], v[rows.to(v.device)]


__all__ = ["Seq2SeqEngine", "reorder"]
