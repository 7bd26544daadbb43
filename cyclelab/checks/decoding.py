"""Chapter 05's checks: nucleus (top-p) filtering, a masked LM's prediction, and perplexity."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, name_the_mistake, pair, tensor_answer
from cyclelab.checks.models import random_bert, random_gpt2
from cyclelab.checks.recipes import made


def _top_p_variants(logits: torch.Tensor, p: float) -> dict[str, torch.Tensor]:
    """Nucleus filtering done right (``"ok"``: sorted from most likely, keep tokens while the mass
    BEFORE them is < p, the best always) and the typical wrong ways, each named by its symptom."""
    z = logits.double()
    probs = torch.softmax(z, -1)
    order = torch.argsort(probs, descending=True)
    ranked = probs[order]
    before = torch.cumsum(ranked, 0) - ranked
    inf = torch.tensor(float("-inf"), dtype=torch.float64)

    def back(keep_ranked: torch.Tensor, values: torch.Tensor = z) -> torch.Tensor:
        keep = torch.zeros_like(keep_ranked)
        keep[order] = keep_ranked
        return torch.where(keep, values, inf)

    keep = (before < p) | (torch.arange(len(z)) == 0)
    up = torch.argsort(probs)
    keep_up = torch.zeros_like(keep)
    keep_up[up] = (torch.cumsum(probs[up], 0) - probs[up]) < p
    filtered_ranked = torch.where(keep, z[order], inf)
    return {
        "ok": back(keep),
        "nothing was filtered: every logit came back as it was. Keep the most likely tokens until their "
        "probabilities add up to p, and set the others to -inf": z.clone(),
        "the kept logits are in sorted order: put each back at its token's position (scatter by the sort "
        "order: out[order] = sorted_values)": filtered_ranked,
        "you put the kept logits back with gather (out = sorted[order]): the inverse of a sort is a scatter, "
        "out[order] = sorted_values": filtered_ranked[order],
        "you sorted from the least to the most likely: sort in DESCENDING order of probability": torch.where(
            keep_up, z, inf
        ),
        "you dropped the token that makes the total reach p: keep the smallest set whose probability is AT "
        "LEAST p — the token that crosses p stays": back((torch.cumsum(ranked, 0) < p) | (torch.arange(len(z)) == 0)),
        "the most likely token was dropped: it is always kept, even when its own probability is above p": back(
            torch.cumsum(ranked, 0) < p
        ),
        "you kept tokens after the cumulative probability passed p: a token is kept while the mass BEFORE "
        "it is below p": back(torch.cumsum(ranked, 0) - ranked <= p),
        "dropped tokens must get -inf (probability 0 after softmax), not 0: a logit of 0 is an ordinary score": torch.where(
            back(keep).isinf(), torch.zeros_like(z), z
        ),
        "you returned probabilities: return the LOGITS, with -inf for the dropped tokens": torch.where(
            back(keep).isinf(), inf, probs
        ),
        "you returned renormalised probabilities: return the LOGITS, with -inf for the dropped tokens": torch.where(
            back(keep).isinf(), inf, probs / probs[back(keep).isfinite()].sum()
        ),
    }


def _top_p_symptom(logits: torch.Tensor, kept: torch.Tensor, nucleus: torch.Tensor) -> str:
    """What is wrong with keeping ``kept`` where ``nucleus`` is right, read from the two sets."""
    probs = torch.softmax(logits.double(), -1)
    if kept.any() and (~kept).any() and float(probs[kept].min()) < float(probs[~kept].max()):
        return "you kept a less likely token while dropping a more likely one: sort in DESCENDING order of probability"
    if not bool(kept[int(probs.argmax())]):
        return "the most likely token was dropped: it is always kept, even when its own probability is above p"
    if int(kept.sum()) > int(nucleus.sum()):
        return (
            f"you kept tokens after the cumulative probability passed p: kept {int(kept.sum())}, the nucleus "
            f"has {int(nucleus.sum())}"
        )
    if int(kept.sum()) < int(nucleus.sum()):
        return (
            "you dropped the token that makes the total reach p: keep the smallest set whose probability is "
            "AT LEAST p — the token that crosses p stays"
        )
    return "the right tokens are kept but their logits changed: return the kept logits as they were"


def _same_filtered(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tokens dropped (-inf) and the same values kept."""
    kept = torch.isfinite(b)
    return (
        a.shape == b.shape
        and torch.equal(torch.isfinite(a), kept)
        and bool(torch.isneginf(a[~kept]).all())
        and torch.allclose(a[kept], b[kept], atol=1e-5)
    )


def _top_p_cases(seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(seed)
    spike = torch.tensor([0.2, 6.0, 1.0, -1.0, 0.5])  # the best token alone holds ~0.98
    cases = [(torch.tensor([0.5, 2.0, -1.0, 1.0, 0.1, -3.0]), 0.8), (spike, 0.5), (spike, 0.9)]
    for n, scale, p in [
        (10, 1.0, 0.9),
        (50, 2.0, 0.5),
        (200, 3.0, 0.95),
        (30, 1.5, 0.1),
        (1000, 4.0, 0.7),
        (8, 0.5, 0.99),
        (12, 2.0, 1.0),
    ]:
        logits = torch.randn(n, generator=gen) * scale
        cases.append((logits[torch.randperm(n, generator=gen)], p))
    cases.append((torch.randn(40, generator=gen, dtype=torch.float64) * 2, 0.6))
    return cases


@checker
def check_top_p_filter(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> str:
    """Check ``fn(logits, p) -> logits``: nucleus (top-p) filtering of a ``(vocab,)`` logits vector.

    Keep the smallest set of most likely tokens whose probabilities add up to at least ``p`` (the token
    that crosses ``p`` is kept; the most likely token always is); the others get ``-inf``; kept logits
    are returned unchanged, each at its own position.
    """
    for logits, p in _top_p_cases():
        case = f"p = {p}, {len(logits)} tokens"
        out = tensor_answer(
            fn,
            logits.clone(),
            p,
            noun="the logits",
            case=case,
            in_place="your function changed the logits it was given (in place): work on a copy "
            "(e.g. logits.masked_fill(...), which returns a new tensor)",
        )
        if out.shape != logits.shape:
            raise Failed(f"return one logit per token, shape {tuple(logits.shape)}; got {tuple(out.shape)}")
        variants = _top_p_variants(logits, p)
        want = variants.pop("ok")
        if _same_filtered(out, want):
            continue
        name_the_mistake(out, variants, _same_filtered, case)
        raise Failed(f"{_top_p_symptom(logits, torch.isfinite(out), torch.isfinite(want))} ({case})")
    return "correct: the nucleus is the smallest set of most likely tokens holding at least p"


@checker
def check_masked_prediction(fn: Callable, loaded=None) -> str:
    """Check ``fn(model, ids, position, mask_id) -> (token_id, probability)``: hide ``ids[position]``
    behind the mask token, run the masked LM, and return its most likely token AT that position and
    that token's probability.

    Tried on a small random BERT, and on ``loaded`` (e.g. ``load("tiny-mlm")``) when given.
    """
    import math

    gen = torch.Generator().manual_seed(7)
    model, mask_id = random_bert()
    made(model, "cyclelab.checks.models:random_bert", path=(0,))
    trials = []
    for n, pos in ((8, 3), (5, 0), (12, 11), (6, 2)):
        trials.append((model, mask_id, torch.randint(0, 58, (n,), generator=gen).tolist(), pos))
    if loaded is not None:
        tok = loaded.tokenizer
        for text in ("ROMEO:\nBut soft, what light through yonder window breaks?", "KING:\nMy lord, I pray you."):
            ids = tok(text)["input_ids"]
            trials += [(loaded.model, tok.mask_token_id, ids, pos) for pos in (1, len(ids) // 2, len(ids) - 1)]
    for model, mask_id, ids, pos in trials:
        out = call(
            fn,
            model,
            list(ids),
            pos,
            mask_id,
            in_place="your function changed the caller's list of ids (or the model): copy the "
            "list before putting the mask in (masked = list(ids))",
        )
        token, prob = pair(out)

        def predict(inputs, at):
            with torch.no_grad():
                logits = model(torch.tensor([inputs])).logits[0, at].double()
            probs = torch.softmax(logits, -1)
            return int(torch.argmax(probs)), float(probs.max()), float(logits.max())

        masked = list(ids)
        masked[pos] = mask_id
        want, want_p, want_logit = predict(masked, pos)
        if token == want and abs(prob - want_p) < 1e-4:
            continue
        case = f"(position {pos} of {len(ids)})"
        with torch.no_grad():
            every = model(torch.tensor([masked])).logits[0].double()  # (positions, vocab)
        if token != want and token == int(every.argmax()):
            raise Failed(
                f"you returned the argmax index of the whole sequence {case}: argmax over the "
                "flattened (positions × vocab) logits counts across positions; take the logits AT "
                "the masked position first, logits[0, position], then its argmax"
            )
        if token == want:
            if abs(prob - want_logit) < 1e-4:
                raise Failed(f"you returned the logit {case}: the probability is softmax(logits)[token]")
            if abs(prob - math.log(want_p)) < 1e-4:
                raise Failed(f"you returned the LOG-probability {case}: use softmax, not log_softmax")
            raise Failed(
                f"the token is right but its probability should be {want_p:.4f}, got {prob:.4f} "
                f"{case}: softmax over the vocabulary (the last axis) at the masked position"
            )
        unmasked, _, _ = predict(ids, pos)
        if token == unmasked and unmasked != want:
            raise Failed(
                f"the model saw the answer {case}: replace ids[position] by the mask token before running the model"
            )
        for shift, where in ((-1, "one position early"), (1, "one position late")):
            if 0 <= pos + shift < len(ids) and token == predict(masked, pos + shift)[0] and token != want:
                raise Failed(
                    f"you read the logits {where} {case}: a masked LM predicts the token AT "
                    "the mask — no shift, unlike a causal LM's next token"
                )
        raise Failed(f"at {case} the masked LM's top token is {want}, you returned {token}")
    return "correct: mask the position, run the encoder once, read the prediction AT the mask"


def _perplexity_variants(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity done right (``"ok"``: logits[i] scores ids[i + 1], exp of the mean negative
    log-likelihood) and the typical wrong ways, each named by its symptom."""
    import math

    z = logits.double()
    logp = torch.log_softmax(z, -1)

    def nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -rows.gather(-1, targets[:, None])[:, 0]

    right = nll(logp[:-1], ids[1:])
    n = len(right)
    return {
        "ok": math.exp(float(right.mean())),
        "you returned the mean negative log-likelihood (the loss): perplexity is exp of it": float(right.mean()),
        "you scored each position against its own token: logits[i] predicts the NEXT token, so compare "
        "logits[:-1] with ids[1:]": math.exp(float(nll(logp, ids).mean())),
        "you paired logits[i + 1] with ids[i]: the shift goes the other way, logits[:-1] against ids[1:]": math.exp(
            float(nll(logp[1:], ids[:-1]).mean())
        ),
        "you summed the negative log-likelihoods: take the MEAN over the predicted tokens, then exp": math.exp(
            min(float(right.sum()), 700.0)
        ),
        "you divided by all positions: only n - 1 tokens are predicted (the first has no prediction)": math.exp(
            float(right.sum()) / len(ids)
        ),
        "you used the raw logits as log-probabilities: apply log_softmax over the vocabulary first": math.exp(
            min(float(nll(z[:-1], ids[1:]).mean()), 700.0)
        ),
        "you averaged probabilities, not LOG-probabilities: the NLL of a token is -log p": math.exp(
            float(nll(logp[:-1].exp(), ids[1:]).mean())
        ),
        "you dropped the minus sign: the NLL is -log p, so perplexity is at least 1": math.exp(-float(right.mean())),
        "you averaged exp(NLL) token by token: exponentiate the MEAN NLL once (a geometric mean of 1/p)": float(
            right.exp().mean()
        ),
        "you raised 2 to an NLL in nats: use exp (2 ** goes with an NLL measured in bits, log2)": 2.0
        ** float(right.mean()),
        "you scored the most likely token at each position: score the token that actually comes next, ids[i + 1]": math.exp(
            float(-logp[:-1].amax(-1).mean())
        ),
        f"you divided the NLL by the vocabulary size: the mean is over the {n} predicted tokens": math.exp(
            float(right.sum()) / z.shape[-1]
        ),
    }


def _perplexity_cases(loaded=None):
    """``(what, logits, ids, transformers' exp(loss) or None)``: random logits, a random GPT-2 on a
    short sequence, and ``loaded``'s model on a line of the plays when given."""
    gen = torch.Generator().manual_seed(8)
    for seq, vocab, scale in ((6, 20, 2.0), (2, 7, 1.0), (12, 100, 4.0), (30, 50, 0.5)):
        yield (
            f"{seq} positions, {vocab} tokens",
            torch.randn(seq, vocab, generator=gen) * scale,
            torch.randint(0, vocab, (seq,), generator=gen),
            None,
        )
    models = [("a random GPT-2", random_gpt2(), torch.randint(0, 50, (10,), generator=gen))]
    if loaded is not None:
        text = "ROMEO:\nBut soft, what light through yonder window breaks?"
        models.append(
            (f"{loaded.name} on a line of the plays", loaded.model, torch.tensor(loaded.tokenizer(text)["input_ids"]))
        )
    for what, model, ids in models:
        with torch.no_grad():
            out = model(ids[None].to(model.device), labels=ids[None].to(model.device))
        yield what, out.logits[0].float().cpu(), ids, float(torch.exp(out.loss))


def _as_number(answer) -> float:
    """A learner's one-number answer as a float; raise :class:`Failed` saying what came back."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_complex():
        return float(answer)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    raise Failed(f"return the perplexity as ONE number (a float), got {answer!r:.80}")


@checker
def check_perplexity(fn: Callable[[torch.Tensor, torch.Tensor], float], loaded=None) -> str:
    """Check ``fn(logits, ids) -> float``: the perplexity of ``ids`` under a causal LM whose
    ``logits`` (``(positions, vocab)``) were computed on ``ids``: logits[i] predicts ids[i + 1],
    and perplexity = exp(mean negative log-likelihood of ids[1:]).

    Compared against a float64 computation, against the package's :func:`cyclelab.train.metrics.perplexity`
    of the same summed NLL, and, for a random GPT-2 (and ``loaded``, e.g. ``load("tiny")``, when
    given), against transformers' own ``exp(model(ids, labels=ids).loss)``.
    """
    import math

    from cyclelab.train.metrics import perplexity

    for what, logits, ids, hf in _perplexity_cases(loaded):
        out = call(fn, logits.clone(), ids.clone(), case=what)
        got = _as_number(out)
        variants = _perplexity_variants(logits, ids)
        want = variants.pop("ok")
        nll_sum = -float(torch.log_softmax(logits.double(), -1)[:-1].gather(-1, ids[1:, None]).sum())
        references = [want, perplexity(nll_sum, len(ids) - 1)] + ([hf] if hf is not None else [])
        if all(math.isclose(got, ref, rel_tol=1e-4) for ref in references):
            continue
        name_the_mistake(got, variants, lambda a, b: math.isclose(a, b, rel_tol=1e-4), what)
        raise Failed(
            f"on {what} the perplexity is {want:.4f}, you returned {got:.4f}: exp of the mean "
            "of -log_softmax(logits)[i, ids[i + 1]] over i = 0 .. n - 2"
        )
    return "correct: exp of the mean negative log-likelihood of each next token, as transformers' exp(loss) computes it"
