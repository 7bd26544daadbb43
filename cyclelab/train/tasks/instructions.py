"""Task 5 of chapter 06, instruction tuning: answer a question about a line of the plays.

Each example is a *prompt* (an instruction and a line) and an *answer* (the play's title). The
model trains on the whole sequence but is scored on the answer only: every prompt position gets
the label -100, which the loss skips (:func:`instruction_examples`). :func:`answer_logprob` and
:func:`best_answer` measure the effect: how likely the right answer is, and whether the model prefers it
to the other titles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.train.tasks.which_play import play_lines

QUESTION = "Which play is this line from?"


def title(play: str) -> str:
    """A play's file name as a title: ``julius_caesar`` → ``Julius Caesar``."""
    return play.replace("_", " ").title()


def instruction_pairs(plays: Sequence[str], n_per_play: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs: the question and a line of one of ``plays``, and the play's title
    (with a leading space and a closing newline, as the model should write it)."""
    texts, labels = play_lines(plays, n_per_play, seed=seed)
    return [(f"{QUESTION}\n{text}\nAnswer:", f" {title(plays[label])}\n") for text, label in zip(texts, labels)]


def instruction_examples(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int = 64) -> list[dict]:
    """``{"input_ids", "labels"}`` per pair: prompt and answer tokens, padded to ``max_len``; the
    labels repeat the answer's tokens and are -100 on the prompt and the padding (not scored)."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs to make instruction examples from")
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    out = []
    for prompt, answer in pairs:
        p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"]
        if len(p) + len(a) > max_len:
            raise ValueError(
                f"prompt and answer take {len(p) + len(a)} tokens, more than max_len={max_len}: "
                "raise max_len or use shorter lines"
            )
        ids = p + a + [pad] * (max_len - len(p) - len(a))
        labels = [-100] * len(p) + a + [-100] * (max_len - len(p) - len(a))
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return out


@torch.no_grad()
def answer_logprobs(model: nn.Module, tokenizer, prompt: str, answers: Sequence[str]) -> list[float]:
    """log P(answer | prompt) of each of ``answers``: the sum of the log-probabilities of its tokens.
    One forward pass: the candidates are batched, padded on the right (the causal mask keeps the
    padding from reaching any answer token)."""
    p = tokenizer(prompt)["input_ids"]
    encoded = [tokenizer(a)["input_ids"] for a in answers]
    width = len(p) + max(len(a) for a in encoded)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for a in encoded], device=device)
    model.eval()
    logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return [float(sum(logp[k, len(p) - 1 + i, t] for i, t in enumerate(a))) for k, a in enumerate(encoded)]


def answer_logprob(model: nn.Module, tokenizer, prompt: str, answer: str) -> float:
    """log P(answer | prompt): the sum of the log-probabilities of the answer's tokens."""
    return answer_logprobs(model, tokenizer, prompt, [answer])[0]


def best_answer(model: nn.Module, tokenizer, prompt: str, answers: Sequence[str]) -> int:
    """Index of the most likely of ``answers`` after ``prompt``."""
    scores = answer_logprobs(model, tokenizer, prompt, answers)
    return max(range(len(answers)), key=scores.__getitem__)


def answer_scores(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], answers: Sequence[str]
) -> tuple[float, float]:
    """Over ``pairs`` (whose answers must be among ``answers``): the mean probability of the right
    answer, and the accuracy of choosing it among ``answers`` by likelihood."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs to score")
    prob = right = 0.0
    for prompt, answer in pairs:
        if answer not in answers:
            raise ValueError(f"the answer {answer!r} is not one of the candidates {list(answers)}")
        scores = answer_logprobs(model, tokenizer, prompt, answers)
        prob += math.exp(scores[answers.index(answer)])
        right += max(range(len(answers)), key=scores.__getitem__) == answers.index(answer)
    return prob / len(pairs), right / len(pairs)
