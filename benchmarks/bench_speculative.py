"""Speculative decoding by prompt lookup, side by side in one run: plain greedy against greedy with
prompt-lookup drafts, for the engine and for ``transformers``' ``prompt_lookup_num_tokens``, on smollm2
(chat) rewriting Folio lines in modern spelling (an answer that copies its input)."""

from __future__ import annotations

from cyclelab import Engine, load
from cyclelab.lab.speculative import copy_question, greedy_with_lookup, plain_greedy, transformers_greedy

from .bench_engine import interleaved_best

DRAFT = 5  #: tokens drafted per lookup


def prompt_lookup(new_tokens: int = 64, repeats: int = 2, lines: int = 4) -> list[dict]:
    """Tokens per forward pass, tokens/s and the speed-up of lookup over plain greedy, engine and transformers."""
    engine = Engine(load("smollm2"))
    question = copy_question(lines)
    makers = {
        "engine": lambda: plain_greedy(engine, question, new_tokens, chat=True),
        "engine + lookup": lambda: greedy_with_lookup(engine, question, new_tokens, chat=True, draft_len=DRAFT),
        "transformers": lambda: transformers_greedy(engine, question, new_tokens, chat=True),
        "transformers + lookup": lambda: transformers_greedy(
            engine, question, new_tokens, chat=True, prompt_lookup_num_tokens=DRAFT
        ),
    }
    runs = {name: make() for name, make in makers.items()}  # the tokens and passes (deterministic)
    seconds = interleaved_best(makers, repeats)
    plain = runs["engine"].token_ids
    rows = []
    for name, run in runs.items():
        base = seconds[name.split(" +")[0]]
        rows.append(
            {
                "benchmark": f"prompt lookup, smollm2 chat, Folio to modern spelling, <= {new_tokens} tokens",
                "run": name,
                "tokens": len(run.token_ids),
                "forward_passes": run.forward_passes,
                "tokens_per_pass": round(run.tokens_per_pass, 2),
                "tokens_per_s": round(len(run.token_ids) / seconds[name], 1),
                "speedup_vs_plain": round(base / seconds[name], 2),
                "same_tokens": run.token_ids == plain,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict]:
    """The prompt-lookup benchmark; ``quick`` generates fewer tokens, once."""
    return prompt_lookup(16, 1, 2) if quick else prompt_lookup()


if __name__ == "__main__":
    for row in run():
        print(row)
