"""The debugger on an encoder–decoder: the same commands and views, over :class:`~cyclelab.core.seq2seq_engine.Seq2SeqEngine`.

>>> dbg = Debugger(Seq2SeqEngine("folio-mt"), "Wherein our Entertainment shall shame vs", max_new_tokens=20)
>>> dbg.step()            # the encoder pass comes first: enc_embed, ..., cross_kv (writes the encoder memory)
>>> dbg.next()            # then one decoder cycle per target token, each reading the KV cache and the encoder memory

``Debugger(...)`` given a :class:`Seq2SeqEngine` (or a loaded encoder–decoder) makes a :class:`Seq2SeqDebugger`.
Its memory panel shows both memories: the decoder's KV cache and the encoder memory, with where one
self-attention head and one cross-attention head of the current token look. Decoding is greedy;
forcing a token, ablating decoder heads, going back and the offline replay (``export_html``) work as for
decoder-only models.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

import torch

from cyclelab.core.blocks import Ablation
from cyclelab.core.engine import as_loaded
from cyclelab.core.events import CycleRecord, Event, Trace
from cyclelab.core.sampling import Sampling, as_sampling
from cyclelab.core.seq2seq import OPS
from cyclelab.core.seq2seq_engine import Seq2SeqEngine
from cyclelab.debugger.commands import check_int, command
from cyclelab.debugger.narrate import start_words
from cyclelab.debugger.session import Debugger
from cyclelab.debugger.timeline import VIEW_OPS, Breakpoint, LiveRun, Timeline
from cyclelab.debugger.views import Attention, CacheRow, Register, State
from cyclelab.loading.loader import load

UNIT_ENDS = frozenset({"enc_positions", "enc_norm_mlp", "positions", "norm_mlp", "logits", "choose", "append"})
VIEWS_SEQ2SEQ = (VIEW_OPS - {"residual_mlp"}) | {"enc_embed", "cross_kv", "cross_read", "cross_softmax", "norm_mlp"}


def capture_seq2seq(op: str, layer: int | None) -> bool:
    """The capture rule of the encoder–decoder debugger's runs: only the ops its views read."""
    return op in VIEWS_SEQ2SEQ


def for_views(steps: Generator[Event, None, Trace]) -> Generator[Event, None, Trace]:
    """Pass an encoder–decoder run's events on, with what the views read put in ``info`` (the debugger's
    slimming keeps ``info`` and drops tensors of ops a decoder-only model does not have)."""
    while True:
        try:
            event = next(steps)
        except StopIteration as done:
            return done.value
        t = event.tensors
        if event.op in ("cross_kv", "cross_read") and "keys" in t:
            event.info.update(
                length=t["keys"].shape[-2], memory_bytes=2 * t["keys"][:1].numel() * t["keys"].element_size()
            )
        elif event.op == "cross_softmax" and "probs" in t:
            event.info["probs"] = t["probs"][0, :, -1].detach().float().clone()  # (heads, source): the last query
        elif event.op == "norm_mlp" and "out" in t:
            event.info["x"] = t["out"][0, -1].detach().clone()  # the stream after the layer (post-LN)
        yield event


class Seq2SeqDebugger(Debugger):
    """:class:`~cyclelab.debugger.session.Debugger` for an encoder–decoder (greedy decoding)."""

    def __init__(
        self,
        engine: Seq2SeqEngine,
        prompt,
        max_new_tokens: int = 20,
        sampling: Sampling | dict | None = None,
        *,
        chat: bool = False,
        ablation: Ablation | None = None,
        top: int = 5,
    ):
        """``engine`` a :class:`Seq2SeqEngine` or a loaded encoder–decoder; ``prompt`` the source (text or ids)."""
        self.engine = engine if isinstance(engine, Seq2SeqEngine) else Seq2SeqEngine(as_loaded(engine, "Debugger"))
        if chat:
            raise ValueError("chat=True needs a chat model; an encoder-decoder reads its source as it is")
        if as_sampling(sampling).do_sample:
            raise ValueError("the encoder-decoder debugger decodes greedily: leave sampling out")
        self.prompt_ids = self.engine.encode(prompt)
        self.prompt_text = self.engine.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)
        self.engine._check_run(max_new_tokens, True, None, False, (), True)
        self.max_new_tokens, self.chat, self.top = max_new_tokens, False, check_int(top, 1, 100, "top")
        self.now = Timeline(Sampling(), self.engine._check_ablation(ablation))
        self._branches, self.breakpoints, self.position = [], [], -1
        self.watch_layer, self.watch_head = (
            self.engine.arch.n_layers - 1,
            0,
        )  # the last layer's cross-attention aligns best
        self.message, self.error = start_words(self.engine.loaded.name, self.prompt_text), ""
        self._before = self._shown = None
        self.faith = None
        self._live = LiveRun()
        weakref.finalize(self, self._live.close)
        self._ui, self._listeners = None, []

    def _eos_id(self) -> int | None:
        return self.engine.eos_id

    def _run_from(self, records: list, remaining: int, force: list):
        """The encoder pass again, then the decoder with the target so far as its prefix."""
        run = self.engine.run(
            self.prompt_ids,
            remaining,
            capture=capture_seq2seq,
            force=force,
            prefix=[r.token_id for r in records],
            ablation=self.now.ablation,
        )
        return for_views(run)

    def widget(self):
        """The ipywidgets UI, watching the last decoder layer's head 0 (the decoder-only UI's previous-token
        probe does not apply to an encoder-decoder)."""
        if self._ui is None:
            from cyclelab.debugger import widget

            widget._HEADS[self.engine] = (self.watch_layer, self.watch_head)
        return super().widget()

    @command
    def step_layer(self) -> Event | None:
        """Forward to the end of the current unit: FETCH of the source or the target, an encoder or decoder
        layer, the encoder memory written, the logits, the choice or the append."""
        return self._advance(
            lambda e: e.op in UNIT_ENDS or (e.op == "cross_kv" and e.layer == self.engine.arch.n_layers - 1)
        )

    @command
    def break_at(self, layer: int | None = None, op: str | None = None) -> Breakpoint:
        """Stop at an op (any layer), at a layer (any op), or at one op of one layer (encoder-decoder ops)."""
        if layer is None and op is None:
            raise ValueError("give a layer, an op, or both")
        if layer is not None:
            top = max(self.engine.arch.n_layers, self.engine.arch.n_encoder_layers) - 1
            check_int(layer, 0, top, "layer")
        if op is not None and op not in OPS:
            raise ValueError(f"unknown encoder-decoder op {op!r}; ops are {', '.join(OPS)}")
        return self._add(Breakpoint("op", layer=layer, op=op))

    @command
    def break_on_lens_change(self, layer: int) -> Breakpoint:
        """Refused: the logit-lens breakpoint reads decoder-only residual streams."""
        raise ValueError("the logit-lens breakpoint is for decoder-only models; use break_at(layer, op) here")

    @command
    def set_sampling(self, sampling: Sampling | None = None, **changes) -> Sampling:
        """Refused: the encoder–decoder engine decodes greedily."""
        raise ValueError("the encoder-decoder debugger decodes greedily; sampler settings cannot change")

    # --- views ------------------------------------------------------------------------------
    def state(self) -> State:
        """The decoder-only views' state, plus the encoder memory and the cross-attention of the watched head."""
        state = super().state()
        return replace(
            state,
            encoder_memory=self._encoder_memory(),
            cross=self._cross(),
            max_positions=1 + self.max_new_tokens,
        )

    def _encoder_memory(self) -> list[CacheRow]:
        n, found = self.engine.arch.n_layers, {}
        for _, e in self._backwards():
            if e.op == "cross_kv" and e.layer not in found:
                found[e.layer] = CacheRow(e.layer, e.info.get("length", 0), e.info.get("memory_bytes", 0))
        return [found.get(i, CacheRow(i, 0, 0)) for i in range(n)]

    def _cross(self) -> Attention | None:
        index = self._last_index("cross_softmax", self.watch_layer)
        if index is None or "probs" not in self.history[index].info:
            return None
        weights = self.history[index].info["probs"][self.watch_head].tolist()
        tokens = [self.engine.token_text(i) for i in self.prompt_ids]
        return Attention(self.watch_layer, self.watch_head, tokens, weights)

    def _attention(self) -> Attention | None:
        index = self._last_index("softmax", self.watch_layer)
        if index is None or "probs" not in self.history[index].tensors:
            return None
        weights = self.history[index].tensors["probs"][self.watch_head].tolist()
        ids = ([self.engine.start_id] + self.token_ids)[: len(weights)]
        return Attention(self.watch_layer, self.watch_head, [self.engine.token_text(i) for i in ids], weights)

    def _registers(self, here: list[Event]) -> list[Register]:
        from cyclelab.debugger.state import lens_registers

        return lens_registers(self.engine, here, "info")

    @command
    def faithfulness(self) -> float:
        """Largest |logit difference| between the logits shown so far and the model's own forward pass."""
        chooses = [e for e in self.history[: self.position + 1] if e.op == "choose" and "logits" in e.tensors]
        if not chooses:
            raise ValueError("no logits yet: run at least one cycle (Next token) first")
        target = [self.engine.start_id] + self.token_ids[: chooses[-1].cycle]
        with torch.no_grad():
            ref = self.engine.loaded.model(
                input_ids=torch.tensor([self.prompt_ids], device=self.engine.device),
                decoder_input_ids=torch.tensor([target], device=self.engine.device),
            ).logits[0]
        self.faith = max(float((e.tensors["logits"] - ref[e.cycle].float()).abs().max()) for e in chooses)
        self.message = f"max |engine − transformers| logit difference over {len(chooses)} tokens: {self.faith:.2e}"
        return self.faith

    def _trace(self, timeline: Timeline, records: list[CycleRecord]) -> Trace:
        settings = {
            "seq2seq": True,
            "use_cache": True,
            "sampling": {"do_sample": False},
            "interventions": list(timeline.log),
        }
        ids = [r.token_id for r in records]
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        return Trace(
            self.engine.loaded.name,
            list(self.prompt_ids),
            list(records),
            settings,
            text,
            fingerprint=self.engine.fingerprint,
        )


def _variant(engine) -> type | None:
    """Seq2SeqDebugger for a Seq2SeqEngine or a loaded encoder-decoder (registered with Debugger below)."""
    if isinstance(engine, (str, Path)):  # a model name or folder: loaded (and cached) to see what it is
        engine = load(engine)
    model = getattr(engine, "model", None)
    if isinstance(engine, Seq2SeqEngine) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return Seq2SeqDebugger
    return None


Debugger._variants.append(_variant)

__all__ = ["Seq2SeqDebugger", "capture_seq2seq", "for_views"]
