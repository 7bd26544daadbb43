"""Speculative decoding without a second model: prompt-lookup drafts, verified in one pass.

A decode cycle of a small model on a CPU costs about the same for 1 token as for 6 (chapter 07,
section 1: it is bound by overhead and weight reads, not arithmetic). So guess several tokens,
feed them all in one forward pass, and keep the longest prefix the model agrees with. The guess
here costs nothing: the tokens that followed the last earlier occurrence of the current n-gram
in the text so far (Saxena's *prompt lookup decoding*). With greedy choice the output is the
same as plain greedy decoding: every kept token is the model's own argmax at that position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Sequence

import torch

from cyclelab.core.attention import KVCache
from cyclelab.core.engine import Engine, drain
from cyclelab.core.sampling import check_int


@dataclass
class LookupRun:
    """What a prompt-lookup run produced and what it cost."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the model agreed with (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per forward pass: 1.0 is plain decoding."""
        return len(self.token_ids) / self.forward_passes if self.forward_passes else 0.0


def copy_question(n_lines: int = 4, play: str = "macbeth") -> str:
    """A question whose answer copies its input: the first ``n_lines`` Folio lines of ``play`` (without
    the witches' "1." speaker numbers) to rewrite in modern spelling, chapter 06's task."""
    from cyclelab.train.tasks.folio import folio_pairs

    if check_int(n_lines, "n_lines") < 1:
        raise ValueError(f"n_lines must be at least 1, got {n_lines}")
    lines = [folio for folio, _ in folio_pairs(play) if not folio[0].isdigit()][:n_lines]
    return (
        "Rewrite these lines in modern English spelling, changing nothing else. Lines:\n"
        + "\n".join(lines)
        + "\nModern spelling:"
    )


def lookup_draft(ids: Sequence[int], ngram: int = 3, k: int = 5) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the last n-gram.

    Tries n = ``ngram`` down to 1 and returns the first match's continuation, or ``[]``.
    """
    ids = list(ids)
    for n in range(min(ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):  # latest match first, never the tail itself
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + k]
    return []


def _check_settings(max_new_tokens: int, ngram: int, draft_len: int) -> None:
    for value, name in ((max_new_tokens, "max_new_tokens"), (ngram, "ngram"), (draft_len, "draft_len")):
        if check_int(value, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _accepted(draft: list[int], predictions: list[int]) -> int:
    """How many draft tokens in a row equal the model's own greedy predictions."""
    n = 0
    while n < len(draft) and predictions[n] == draft[n]:
        n += 1
    return n


def greedy_with_lookup(
    engine: Engine,
    prompt,
    max_new_tokens: int = 32,
    *,
    ngram: int = 3,
    draft_len: int = 5,
    chat: bool = False,
    stop_at_eos: bool = True,
) -> LookupRun:
    """Greedy decoding that verifies prompt-lookup drafts: one forward pass per accepted run of tokens."""
    _check_settings(max_new_tokens, ngram, draft_len)
    ids = engine.encode(prompt, chat=chat)
    engine.check_lengths(len(ids), max_new_tokens + draft_len)
    run, start = LookupRun(list(ids)), perf_counter()
    cache = KVCache(engine.arch.n_layers, len(ids) + max_new_tokens + draft_len)
    eos = engine.tokenizer.eos_token_id if stop_at_eos else None
    out = run.token_ids
    out.append(int(_predictions(engine, ids, cache)[-1]))  # prefill: the first token, as in plain greedy
    run.forward_passes = 1
    while len(out) < max_new_tokens and eos not in out:
        draft = lookup_draft(ids + out, ngram, min(draft_len, max_new_tokens - len(out)))
        predictions = _predictions(engine, [out[-1], *draft], cache)  # [i]: the model's choice after feed[:i+1]
        n_ok = _accepted(draft, predictions)
        run.forward_passes, run.drafted, run.accepted = (
            run.forward_passes + 1,
            run.drafted + len(draft),
            run.accepted + n_ok,
        )
        out.extend([*draft[:n_ok], predictions[n_ok]])
        cache.truncate(len(ids) + len(out) - 1)  # every chosen token but the newest has been fed
    del out[max_new_tokens:]
    if eos in out:
        del out[out.index(eos) + 1 :]
    run.seconds = perf_counter() - start
    return run


def _predictions(engine: Engine, feed: list[int], cache: KVCache) -> list[int]:
    """The greedy choice after each fed position, one forward pass on top of ``cache``."""
    logits = drain(engine.forward(torch.tensor([feed], device=engine.device), cache))
    return logits[0].argmax(-1).tolist()


def plain_greedy(engine: Engine, prompt, max_new_tokens: int = 32, *, chat: bool = False) -> LookupRun:
    """The engine's plain greedy run, timed, as a :class:`LookupRun`: one forward pass per token."""
    start = perf_counter()
    trace = engine.generate(prompt, max_new_tokens=max_new_tokens, chat=chat)
    seconds = perf_counter() - start
    return LookupRun(list(trace.prompt_ids), list(trace.token_ids), len(trace.token_ids), seconds=seconds)


def transformers_greedy(
    engine: Engine, prompt, max_new_tokens: int = 32, *, chat: bool = False, prompt_lookup_num_tokens: int | None = None
) -> LookupRun:
    """The same greedy run by ``transformers``' own ``generate`` on the engine's model, timed, with its
    prompt-lookup drafts of ``prompt_lookup_num_tokens`` tokens when given. Forward passes are counted
    by a hook on the model; ``drafted`` and ``accepted`` stay 0 (``generate`` does not report them)."""
    _check_settings(max_new_tokens, 1, prompt_lookup_num_tokens or 1)
    ids = engine.encode(prompt, chat=chat)
    batch = torch.tensor([ids], device=engine.device)
    lookup = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens} if prompt_lookup_num_tokens else {}
    run, model = LookupRun(list(ids)), engine.loaded.model
    hook = model.register_forward_hook(lambda *_: setattr(run, "forward_passes", run.forward_passes + 1))
    try:
        start = perf_counter()
        out = model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=engine.tokenizer.eos_token_id,
            **lookup,
        )
        run.seconds = perf_counter() - start
    finally:
        hook.remove()
    run.token_ids = out[0, len(ids) :].tolist()
    return run
