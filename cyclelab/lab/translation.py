"""The translation chapter's helpers: folio-mt's held-out line pairs, corpus scores (sacrebleu), the
cross-attention map of one translation, and a few-shot prompt that a decoder-only model completes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from time import perf_counter

import numpy as np
import torch

from cyclelab.core.engine import Engine
from cyclelab.core.seq2seq_engine import Seq2SeqEngine
from cyclelab.lab.stats import Interval, corpus_interval
from cyclelab.loading.paths import REPO_DATA

TEST_FILE = REPO_DATA / "folio-mt" / "test.jsonl"


def test_pairs(n: int | None = None) -> list[tuple[str, str]]:
    """The first ``n`` (default all 200) held-out ``(folio, modern)`` pairs of folio-mt (Macbeth, The Tempest)."""
    pairs = [(row["folio"], row["modern"]) for row in map(json.loads, TEST_FILE.read_text().splitlines())]
    if n is None:
        return pairs
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pairs):
        raise ValueError(f"n must be an integer from 1 to {len(pairs)} (or None for all), got {n!r}")
    return pairs[:n]


def _metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    if name not in ("bleu", "chrf"):
        raise ValueError(f"metric must be 'bleu' or 'chrf', got {name!r}")
    return BLEU() if name == "bleu" else CHRF()


def corpus_score(hypotheses: Sequence[str], references: Sequence[str], metric: str = "bleu") -> Interval:
    """sacrebleu's corpus BLEU or chrF (defaults, 0 to 100) with a bootstrap interval over the lines.

    Each line's sufficient statistics (n-gram matches and counts) are extracted once; a resample sums
    them, as sacrebleu sums them over a corpus, so that 2000 resamples cost little."""
    if len(hypotheses) != len(references):
        raise ValueError(f"one reference per hypothesis: got {len(hypotheses)} and {len(references)}")
    scorer = _metric(metric)
    stats = np.asarray(scorer._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=float)

    def score(rows: list) -> float:
        return float(scorer._compute_score_from_stats(np.sum(rows, axis=0).tolist()).score)

    return corpus_interval(list(stats), score)


def sentence_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """chrF of each hypothesis against its reference (for paired differences between two systems)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"one reference per hypothesis: got {len(hypotheses)} and {len(references)}")
    return [float(sacrebleu.sentence_chrf(h, [r]).score) for h, r in zip(hypotheses, references)]


def few_shot_prompt(shots: Sequence[tuple[str, str]], line: str) -> str:
    """An instruction, the ``(folio, modern)`` example pairs, then ``line`` for the model to complete."""
    for text in [line, *(t for pair in shots for t in pair)]:
        if not isinstance(text, str) or "\n" in text or not text.strip():
            raise ValueError(f"every line must be one non-empty line of text, got {text!r}")
    examples = "".join(f"Folio: {folio}\nModern: {modern}\n\n" for folio, modern in shots)
    return f"Rewrite each line from Shakespeare's First Folio in modern spelling.\n\n{examples}Folio: {line}\nModern:"


def complete_line(engine: Engine, prompt: str, max_new_tokens: int = 40) -> tuple[str, int]:
    """Greedy completion of ``prompt`` up to the end of the line: the text (stripped) and the tokens written."""
    ids: list[int] = []
    for event in engine.run(prompt, max_new_tokens=max_new_tokens):
        if event.op == "append":
            ids.append(event.info["record"].token_id)
            if "\n" in engine.tokenizer.decode(ids, skip_special_tokens=True):
                break
    text = engine.tokenizer.decode(ids, skip_special_tokens=True)
    return text.split("\n")[0].strip(), len(ids)


def timed(fn: Callable[[str], tuple[str, int]], lines: Sequence[str], desc: str = "") -> tuple[list[str], int, float]:
    """``fn`` (a line -> (output, tokens written)) over ``lines`` with a progress bar: outputs, tokens, seconds."""
    from tqdm.auto import tqdm

    outputs, tokens, start = [], 0, perf_counter()
    for line in tqdm(lines, desc=desc):
        text, n = fn(line)
        outputs.append(text)
        tokens += n
    return outputs, tokens, perf_counter() - start


def cross_attention_map(engine: Seq2SeqEngine, source: str, target_ids: Sequence[int], layer: int) -> torch.Tensor:
    """Cross-attention weights ``(target tokens, source tokens)`` of decoder ``layer``, averaged over its
    heads, when the decoder reads the start token and ``target_ids`` (row i: the cycle that chose token i)."""
    decoder_ids = [engine.start_id, *target_ids][: len(target_ids)]  # the inputs that predicted target_ids
    name = f"decoder.blocks.{layer}.cross_attn.hook_pattern"
    _, found = engine.run_with_cache(source, decoder_ids, names=[name])
    return found[name][0].float().mean(0).cpu()  # (heads, target, source) -> (target, source)


def plot_alignment(ax, weights: torch.Tensor, source: Sequence[str], target: Sequence[str], title: str) -> None:
    """One cross-attention map on ``ax``: target tokens down, source tokens across."""
    ax.imshow(weights.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(source)), [repr(t)[1:-1] for t in source], rotation=90, fontsize=7)
    ax.set_yticks(range(len(target)), [repr(t)[1:-1] for t in target], fontsize=7)
    ax.set_xlabel("source (Folio) token")
    ax.set_ylabel("token written")
    ax.set_title(title, fontsize=9)


__all__ = [
    "complete_line",
    "corpus_score",
    "cross_attention_map",
    "few_shot_prompt",
    "plot_alignment",
    "sentence_chrf",
    "test_pairs",
    "timed",
]
