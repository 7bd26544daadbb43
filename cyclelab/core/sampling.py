"""From logits to a token: the WRITEBACK stage of one clock cycle.

The model's last layer gives one score (a *logit*) per vocabulary entry. This module
turns those scores into the one token that is written back to the sequence:

1. :func:`pipeline` reshapes the scores, stage by stage, in the order transformers'
   ``generate`` uses: repetition penalty, then (only when sampling) temperature,
   top-k, top-p and min-p;
2. :func:`greedy` takes the best token, or :func:`sample` draws one at random;
3. :func:`choose` does both and records what happened in a :class:`Choice`.

:func:`beam_search` is the other classic way to decode: keep several candidate
continuations alive and return the ones with the highest total log-probability.

The processors work on logits of shape ``(vocab,)`` (one position) or
``(batch, vocab)``; filtered-out tokens get ``-inf`` (probability 0 after softmax).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cyclelab.core.seeds import seed_generator
from cyclelab.loading.schema import is_int

Ids = Sequence[int] | torch.Tensor


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts, without its negative wrap-around


@dataclass(frozen=True)
class Sampling:
    """Settings for turning logits into a token.

    With ``do_sample=False`` the most likely token is taken (greedy); ``temperature``,
    ``top_k``, ``top_p`` and ``min_p`` are then ignored, as in transformers, because they never
    change which token is the most likely. ``repetition_penalty`` applies in both modes.
    ``seed`` (an integer from 0 to 2**64 - 1) seeds the random generator that
    :func:`choose` makes when none is given.

    Unlike ``transformers.generate``, whose default ``top_k`` is 50, ``do_sample=True``
    with ``top_k=None`` samples from the **whole vocabulary**; pass ``top_k=50`` to match it.

    Every field is checked: ``do_sample`` must be a bool, numbers must be numbers (not bools or
    strings); a wrong type raises ``TypeError``, a value out of range ``ValueError``.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):  # numpy scalars as plain numbers
            value = getattr(self, name)
            if isinstance(value, (np.floating, np.integer)):
                object.__setattr__(self, name, value.item())
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        t = _number(self.temperature, "temperature")
        if self.do_sample and not (math.isfinite(t) and t > 0):
            raise ValueError(
                f"temperature must be a finite number > 0 when sampling, got {t!r} "
                "(use do_sample=False for greedy decoding)"
            )
        if self.top_k is not None and not (check_int(self.top_k, "top_k") >= 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {self.top_k!r}")
        p = self.top_p if self.top_p is None else _number(self.top_p, "top_p")
        if p is not None and not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None for no top-p), got {p!r}")
        m = self.min_p if self.min_p is None else _number(self.min_p, "min_p")
        if m is not None and not 0 <= m <= 1:
            raise ValueError(
                f"min_p must be in [0, 1] (a fraction of the top token's probability; None for no min-p), got {m!r}"
            )
        r = _number(self.repetition_penalty, "repetition_penalty")
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {r!r}")
        low, high = SEED_RANGE
        if self.seed is not None and not low <= check_int(self.seed, "seed") <= high:
            raise ValueError(
                f"seed must be an integer from {low} to 2**64 - 1 (or None for a random seed), got {self.seed!r}"
            )


def as_sampling(value: Sampling | dict | None) -> Sampling:
    """``value`` as :class:`Sampling`: a Sampling, a dict of its fields, or None for the defaults (greedy)."""
    if value is None:
        return Sampling()
    if isinstance(value, Sampling):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(Sampling.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown sampling setting(s) {unknown}; the settings are {sorted(Sampling.__dataclass_fields__)}"
            )
        return Sampling(**value)
    raise TypeError(f"sampling must be a Sampling, a dict of its settings or None, got {type(value).__name__}")


def check_int(value, name: str) -> int:
    """``value`` if it is an int (a bool is not); else a TypeError naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return value


def _number(value, name: str) -> float:
    """``value`` if it is an int or float (a bool is not); else a TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if isinstance(value, (int, np.integer)) and abs(int(value)) > 2**53:  # torch cannot turn it into a float
        raise ValueError(f"{name} must be a number of at most 2**53 in size, got {value!r}")
    return value.item() if isinstance(value, np.generic) else value  # numpy scalars as plain Python numbers


# ---------------------------------------------------------------- checks


def _check_logits(logits: torch.Tensor, one_row: bool = False) -> None:
    """Raise ValueError unless ``logits`` is a usable (vocab,) or (batch, vocab) float tensor."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point torch.Tensor, got {type(logits).__name__}")
    dims = (1,) if one_row else (1, 2)
    if logits.dim() not in dims:
        shapes = "(vocab,)" if one_row else "(vocab,) or (batch, vocab)"
        raise ValueError(f"logits must have shape {shapes}, got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits are empty (shape {tuple(logits.shape)}): pass one score per vocabulary token")
    if torch.isnan(logits.sum()) and torch.isnan(logits).any():  # the sum first: one cheap pass when there is none
        raise ValueError(
            "logits contain NaN: the model's output is damaged; check its weights (load(name, cache=False))"
        )


def _as_ids(ids: Ids, device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids as a LongTensor on ``device``."""
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long)
    return torch.tensor(list(ids), dtype=torch.long, device=device)


# ---------------------------------------------------------------- the processors


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: Ids, penalty: float) -> torch.Tensor:
    """Make tokens that already appeared less likely (CTRL-style penalty).

    For every token in ``previous_ids``, a positive logit is divided by ``penalty`` and
    a negative one multiplied by it, so ``penalty > 1`` always lowers the score.
    Counting once is enough: a token seen five times is penalised once.
    ``previous_ids`` is ``(seq,)`` for ``(vocab,)`` logits and ``(batch, seq)`` for
    ``(batch, vocab)`` logits.
    """
    _check_logits(logits)
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty!r}")
    ids = _as_ids(previous_ids, logits.device)
    if ids.numel() == 0:
        return logits.clone()
    if ids.dim() != logits.dim() or (ids.dim() == 2 and ids.shape[0] != logits.shape[0]):
        raise ValueError(f"previous_ids of shape {tuple(ids.shape)} do not match logits of shape {tuple(logits.shape)}")
    if ids.min() < 0 or ids.max() >= logits.shape[-1]:
        raise ValueError(f"previous_ids must be token ids in [0, {logits.shape[-1]})")
    seen = logits.gather(-1, ids)
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    if torch.isposinf(penalised).any():
        raise ValueError(
            f"repetition_penalty {penalty!r} is too small for these logits: dividing by it overflows "
            f"{logits.dtype}; use a penalty closer to 1 (1.0 = off)"
        )
    return logits.scatter(-1, ids, penalised)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by ``temperature``: below 1 sharpens the distribution, above 1 flattens it."""
    _check_logits(logits)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    out = logits / temperature
    if not torch.isfinite(out.amax(dim=-1)).all():
        raise ValueError(
            f"temperature {temperature!r} is too small for these logits: dividing by it overflows "
            f"{logits.dtype}; use a larger temperature, or do_sample=False for greedy decoding"
        )
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest-scoring tokens and set the others to ``-inf``.

    Tokens tied with the k-th best score are kept too, so slightly more than ``k``
    tokens may survive (as in transformers' ``TopKLogitsWarper``).
    """
    _check_logits(logits)
    if not is_int(k) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    kth_best = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth_best, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probabilities add up to ``p``.

    The kept set is the smallest one whose total probability is at least ``p``; the
    rest get ``-inf``. As in transformers' ``TopPLogitsWarper`` this is computed from the
    unlikely end: sorted from least to most likely, tokens are dropped while the dropped
    mass stays <= ``1 - p``. The most likely token is always kept.
    """
    _check_logits(logits)
    if not (0 < p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    sorted_logits, order = torch.sort(logits, descending=False)
    dropped_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = dropped_mass <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p filter (Nguyen et al. 2024): keep the tokens whose probability is at least ``min_p``
    times the most likely token's probability; the others get ``-inf``.

    The cut-off scales with the model's confidence: a peaked distribution keeps few tokens, a
    flat one many. The most likely token always stays (as in transformers' ``MinPLogitsWarper``).
    """
    _check_logits(logits)
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    probs = torch.softmax(logits, dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(drop, -math.inf)


def pipeline(
    logits: torch.Tensor, previous_ids: Ids, sampling: Sampling, one_row: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """All the stages from raw logits to the logits that are actually sampled, in order.

    Returns ``[("logits", raw), ("repetition_penalty", ...), ("temperature", ...),
    ("top_k", ...), ("top_p", ...), ("min_p", ...)]`` with only the active stages: the penalty
    when it is not 1, and, when sampling, a temperature other than 1, any ``top_k``, a
    ``top_p`` below 1 and a ``min_p`` above 0. The last entry is what :func:`greedy` or :func:`sample` sees.
    ``one_row=True`` accepts only ``(vocab,)`` logits.
    """
    _check_logits(logits, one_row)
    stages = [("logits", logits)]
    if sampling.repetition_penalty != 1.0:
        stages.append(
            ("repetition_penalty", apply_repetition_penalty(stages[-1][1], previous_ids, sampling.repetition_penalty))
        )
    if sampling.do_sample and sampling.temperature != 1.0:
        stages.append(("temperature", apply_temperature(stages[-1][1], sampling.temperature)))
    if sampling.do_sample and sampling.top_k is not None:
        stages.append(("top_k", top_k_filter(stages[-1][1], sampling.top_k)))
    if sampling.do_sample and sampling.top_p is not None and sampling.top_p < 1.0:
        stages.append(("top_p", top_p_filter(stages[-1][1], sampling.top_p)))
    if sampling.do_sample and sampling.min_p:
        stages.append(("min_p", min_p_filter(stages[-1][1], sampling.min_p)))
    return stages


# ---------------------------------------------------------------- picking a token


def greedy(logits: torch.Tensor) -> int:
    """The id of the highest-scoring token (the first one if several tie)."""
    _check_logits(logits, one_row=True)
    return int(torch.argmax(logits))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A random-number generator: seeded for reproducible draws, or randomly seeded when ``seed`` is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        seed_generator(generator, seed)  # the whole 0..2**64 - 1: seed + 2**32 is another stream
    return generator


def sample(logits: torch.Tensor, generator: torch.Generator) -> tuple[int, float]:
    """Draw a token at random, each with its softmax probability; return ``(token, u)``.

    Inverse-CDF sampling: line the tokens up, each taking a slice of [0, 1) as wide as
    its probability, draw ``u`` uniformly in [0, 1) and return the token whose slice
    contains ``u`` (the first token whose cumulative probability exceeds ``u``).
    Tokens with probability 0 have empty slices and are never drawn.
    """
    _check_logits(logits, one_row=True)
    if torch.isneginf(logits).all():
        raise ValueError(
            "every logit is -inf: there is no token left to sample; loosen the filters (top_k, top_p, min_p)"
        )
    if torch.isposinf(logits).any():
        raise ValueError("logits contain +inf: their probabilities are undefined; pass finite logits")
    u = torch.rand(1, generator=generator, device=generator.device).item()
    token, _, _ = slice_of(torch.softmax(logits.detach().double(), dim=-1), u)
    return token, u


def slice_of(probs: torch.Tensor, u: float) -> tuple[int, float, float]:
    """The token whose slice ``[low, high)`` of [0, 1) holds ``u``, with the tokens lined up in id
    order, each slice as wide as its probability: ``(token, low, high)``."""
    cdf = probs.double().cumsum(dim=-1).cpu()
    cdf = cdf / cdf[-1]  # make the last entry exactly 1 despite rounding
    token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True))
    return token, (float(cdf[token - 1]) if token > 0 else 0.0), float(cdf[token])


@dataclass
class Choice:
    """What happened when one token was chosen (one WRITEBACK stage)."""

    token_id: int
    prob: float  #: probability of the chosen token under the final (processed) distribution
    raw_prob: float  #: its probability under the softmax of the raw logits
    entropy: float  #: entropy of the final distribution, in nats
    top: list[tuple[int, float]]  #: up to 5 most likely tokens with final probability > 0, best first
    draw: float | None  #: the uniform number ``u`` drawn when sampling; None for greedy
    greedy_id: int  #: argmax of the raw logits (what plain greedy decoding would pick)


def choose(
    logits: torch.Tensor, previous_ids: Ids, sampling: Sampling, generator: torch.Generator | None = None
) -> Choice:
    """Run :func:`pipeline` on one position's logits, then pick a token greedily or by sampling.

    When sampling without a ``generator``, one is made from ``sampling.seed``. To
    generate many tokens reproducibly, make one generator and pass it to every call:
    a fresh generator with the same seed would draw the same ``u`` every time.
    """
    final = pipeline(logits, previous_ids, sampling, one_row=True)[-1][1]
    greedy_id = int(torch.argmax(logits))
    if sampling.do_sample:
        token, draw = sample(final, generator or make_generator(sampling.seed))
    else:
        token, draw = (greedy_id if final is logits else int(torch.argmax(final))), None
    probs = torch.softmax(final.float(), dim=-1)
    raw = probs if final is logits else torch.softmax(logits.float(), dim=-1)
    best = torch.topk(probs, min(5, probs.numel()))
    return Choice(
        token_id=token,
        prob=probs[token].item(),
        raw_prob=raw[token].item(),
        entropy=torch.special.entr(probs).sum().item(),
        top=[(i, q) for q, i in zip(best.values.tolist(), best.indices.tolist()) if q > 0],
        draw=draw,
        greedy_id=greedy_id,
    )


# ---------------------------------------------------------------- beam search


def _eos_ids(eos_token_id: int | Collection[int] | None) -> set[int]:
    """The end-of-sequence ids as a set (empty when there is none)."""
    if eos_token_id is None:
        return set()
    ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if any(not is_int(i) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id >= 0 or a collection of them, got {eos_token_id!r}")
    return ids


def beam_search(
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    input_ids: Ids,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | Collection[int] | None = None,
    length_penalty: float = 0.0,
) -> list[tuple[list[int], float]]:
    """Keep the ``num_beams`` best partial continuations at every step; return the best finished ones.

    ``next_logits`` maps a CPU LongTensor ``(beams, seq)`` (prompt plus generated ids)
    to the next-token logits ``(beams, vocab)`` of each row; it should move the ids to
    the model's device itself. The running beams are ranked by the plain sum of their
    tokens' log-probabilities. A *finished* hypothesis of ``n`` generated tokens scores
    ``log p / n ** length_penalty``: with the default ``0.0`` that is its log-probability,
    which favours short hypotheses (every extra token adds a negative term); ``1.0``
    (transformers' default) compares the mean log-probability per token instead, and larger
    values favour long hypotheses more. Hypotheses cut at ``max_new_tokens`` count as finished
    (truncated, not ended by the model).

    At each step every (beam, next token) pair is a candidate, ranked by total score:

    * a candidate ending in an end-of-sequence token, or reaching ``max_new_tokens``,
      is *finished* if it ranks among the top ``num_beams`` candidates;
    * the ``num_beams`` best other candidates keep running.

    The search stops after ``max_new_tokens`` steps, or earlier once ``num_beams``
    hypotheses have finished and the best running beam, scored at its current length,
    does not beat the worst of them (transformers' heuristic; exact for
    ``length_penalty=0``, where scores only go down). This is transformers' beam search
    with the same ``length_penalty`` and ``early_stopping=False`` (its default);
    ``early_stopping=True`` there stops as soon as ``num_beams`` hypotheses have
    finished, even if a running beam could still beat them.

    Returns up to ``num_beams`` ``(generated ids, score)`` pairs, best first (the score is the
    log-probability when ``length_penalty`` is 0, as in transformers' ``sequences_scores``);
    the generated ids exclude the prompt and include the end-of-sequence token if any.
    """
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompt = _as_ids(input_ids).flatten().tolist()
    if not prompt:
        raise ValueError("input_ids is empty: beam search needs at least one prompt token")
    eos = _eos_ids(eos_token_id)
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, (int, float))
        or not math.isfinite(length_penalty)
    ):
        raise ValueError(
            f"length_penalty must be a finite number (0.0 = none, 1.0 = per-token mean), got {length_penalty!r}"
        )
    running: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for step in range(max_new_tokens):
        logits = next_logits(torch.tensor([prompt + ids for ids, _ in running]))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(running):
            raise ValueError(f"next_logits must return a (beams, vocab) tensor with {len(running)} rows")
        scores = torch.tensor([s for _, s in running])[:, None] + torch.log_softmax(logits.float().cpu(), dim=-1)
        vocab = scores.shape[-1]
        # Enough candidates that num_beams of them do not end in an end-of-sequence token.
        top = torch.topk(scores.flatten(), min(scores.numel(), (1 + max(1, len(eos))) * num_beams))
        last_step = step == max_new_tokens - 1
        running_next: list[tuple[list[int], float]] = []
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            beam, token = divmod(index, vocab)
            ids = running[beam][0] + [token]
            if token in eos or last_step:
                if rank < num_beams:
                    finished.append((ids, score / len(ids) ** length_penalty))
            elif len(running_next) < num_beams:
                running_next.append((ids, score))
        finished = sorted(finished, key=lambda h: h[1], reverse=True)[:num_beams]
        running = running_next
        best_running = running[0][1] / (step + 1) ** length_penalty if running else None
        if best_running is None or (len(finished) == num_beams and best_running <= finished[-1][1]):
            break
    return finished
