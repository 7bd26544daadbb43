"""Beam search with a length penalty, as ``transformers``' ``generate(num_beams=..., do_sample=False)`` does it (core).

Keep ``num_beams`` running hypotheses. Each step, every running beam proposes every next token; of the
``num_beams * vocab`` continuations, scored by their summed log-probabilities, the best ``2 * num_beams``
are looked at: those that end (EOS, or the length limit) and rank among the first ``num_beams`` join the
finished list with the score ``sum log p / length ** length_penalty``; the best ``num_beams`` that go on
become the new running beams. The search stops when no running beam can still beat the worst of
``num_beams`` finished ones (``transformers``' default heuristic, ``early_stopping=False``), or when all
continuations end. ``length_penalty > 0`` favours longer outputs, ``< 0`` shorter ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cyclelab.core.sampling import check_int

NEG = -1.0e9  #: the score that rules a candidate out (``transformers`` uses the same)

# step(rows, tokens) -> logits (num_beams, vocab): ``rows[j]`` is the running beam that beam j continues
# (None at the first step), ``tokens[j]`` the token it appends.
Step = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class BeamStep:
    """One step of the search: the running beams after it (token ids without the start token) with their
    summed log-probabilities, and the finished hypotheses so far with their length-penalised scores."""

    running: list[tuple[list[int], float]]
    finished: list[tuple[list[int], float]]


@dataclass
class BeamResult:
    """The best finished hypothesis (its token ids, the final EOS included if it ended there) and its score."""

    token_ids: list[int]
    score: float
    steps: list[BeamStep] = field(default_factory=list)


def check_beam_options(num_beams, length_penalty, max_new_tokens) -> None:
    """TypeError or ValueError naming the bad option."""
    if check_int(num_beams, "num_beams") < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if check_int(max_new_tokens, "max_new_tokens") < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a number, got {length_penalty!r}")
    if length_penalty != length_penalty or abs(length_penalty) == float("inf"):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")


def beam_search(
    step: Step, start_id: int, eos_id: int, num_beams: int, length_penalty: float, max_new_tokens: int
) -> BeamResult:
    """Run the search; ``step`` computes the next-token logits of every running beam."""
    check_beam_options(num_beams, length_penalty, max_new_tokens)
    n, cur_len, max_length = num_beams, 1, 1 + max_new_tokens  # lengths count the start token, as transformers does
    seqs: list[list[int]] = [[] for _ in range(n)]
    scores = torch.tensor([0.0] + [NEG] * (n - 1))  # all beams start equal: only the first may propose
    done_seqs: list[list[int]] = [[] for _ in range(n)]
    done_scores, done_flags = torch.full((n,), NEG), torch.zeros(n, dtype=torch.bool)
    improvable, rows, tokens = True, None, torch.full((n,), start_id)
    result = BeamResult([], NEG)
    while True:
        logp = torch.log_softmax(step(rows, tokens).float().cpu(), dim=-1)  # (n, vocab); the bookkeeping on the CPU
        vocab = logp.shape[-1]
        top, index = torch.topk((logp + scores[:, None]).reshape(-1), 2 * n)  # the best 2n continuations
        parent, token = index // vocab, index % vocab
        ends = (token == eos_id) | (cur_len + 1 >= max_length)
        cand = [seqs[p] + [t] for p, t in zip(parent.tolist(), token.tolist())]
        # the finished list: ended candidates among the first n, length-penalised, merged with the old ones
        penalised = top / ((cur_len + 1 - 1) ** length_penalty) + NEG * (not improvable)
        penalised = penalised + NEG * ~(ends & (torch.arange(2 * n) < n))
        keep = torch.topk(torch.cat([done_scores, penalised]), n).indices
        done_seqs = [(done_seqs + cand)[k] for k in keep.tolist()]
        done_scores = torch.cat([done_scores, penalised])[keep]
        done_flags = torch.cat([done_flags, ends & (torch.arange(2 * n) < n)])[keep]
        # the running beams: the best n continuations that did not end
        going = top + NEG * ends.float()
        pick = torch.topk(going, n).indices
        seqs, scores, rows, tokens = [cand[k] for k in pick.tolist()], going[pick], parent[pick], token[pick]
        cur_len += 1
        best_possible = scores[0] / ((cur_len - 1) ** length_penalty)
        worst_done = torch.where(done_flags, done_scores.min(), torch.tensor(NEG))
        improvable = improvable and bool((best_possible > worst_done).any())
        result.steps.append(BeamStep(_listed(seqs, scores), _listed(done_seqs, done_scores, done_flags)))
        if not improvable or bool(ends.all()):
            break
    result.token_ids, result.score = done_seqs[0], float(done_scores[0])
    return result


def _listed(seqs: list[list[int]], scores: torch.Tensor, flags: torch.Tensor | None = None) -> list:
    """``(ids, score)`` pairs, leaving out empty slots (score NEG or flag False)."""
    keep = [i for i in range(len(seqs)) if scores[i] > NEG / 2 and (flags is None or bool(flags[i]))]
    return [(list(seqs[i]), round(float(scores[i]), 6)) for i in keep]
