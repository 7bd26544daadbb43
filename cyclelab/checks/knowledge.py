"""Chapter 08's checks: a patched cell, an integrated-gradients sum, and the knowledge graph's lookup."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, close, tensor_answer
from cyclelab.checks.recipes import made


def _engine_of(engine):
    """``engine``, or the course's ``tiny`` model in an engine (loaded once)."""
    if engine is not None:
        return engine
    if "tiny" not in _ENGINES:
        from cyclelab.core.engine import Engine

        _ENGINES["tiny"] = made(Engine("tiny"), "cyclelab.core.engine:Engine", "tiny")
    return _ENGINES["tiny"]


_ENGINES: dict = {}


def _hooked_patch(model, ids: list[int], layer: int, position, vector: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a plain ``transformers`` forward of ``ids`` with block ``layer``'s output
    at ``position`` (an index or a slice) replaced by ``vector``: forward hooks, no engine code."""
    body = getattr(model, "transformer", None) or model.model
    block = (body.h if hasattr(body, "h") else body.layers)[layer]

    def replace(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, position] = vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(replace)
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double()
    finally:
        handle.remove()


def _stream_patch(engine, ids: list[int], layer: int, op: str, position: int, vector: torch.Tensor) -> torch.Tensor:
    """Logits at every position of the engine's run with ``op``'s output at ``layer`` overwritten at ``position``
    (the wrong places a learner may patch: after attention instead of after the whole layer)."""
    from cyclelab.core.attention import KVCache
    from cyclelab.core.engine import drain

    def write(event) -> None:
        if event.op == op and event.layer == layer:
            event.tensors["out"][0, position] = vector

    steps = engine.forward(
        torch.tensor([ids]), KVCache(engine.arch.n_layers, len(ids)), capture=lambda o, at: o == op and at == layer
    )
    return drain(steps, write)[0].double()


def _patch_cases(engine) -> list[tuple[list[int], int, int, torch.Tensor, int]]:
    """(corrupted ids, layer, position, clean vector, target) cells to try on ``engine``'s model."""
    from cyclelab.lab.patching import resid_post

    prompts = {
        "gpt2": ("KING RICHARD:\nNow, my lord of", "KING HENRY:\nNow, my lord of"),
        "llama": ("The capital of France is", "The capital of Italy is"),
    }
    pairs = prompts.get(engine.arch.family, prompts["llama"])  # GPT-2's are the plays' (tiny); others plain English
    clean, corrupt = (engine.encode(p) for p in pairs)
    stream = resid_post(engine, clean)
    last, diff = engine.arch.n_layers - 1, next(i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b)
    target = int(engine.logits(clean)[0, -1].argmax())
    return [
        (corrupt, layer, pos, stream[layer, pos], target)
        for layer, pos in ((1, diff), (last // 2, len(clean) - 1), (0, len(clean) - 1), (last, diff))
    ]


def _patch_slips(engine, ids, layer, position, vector, target) -> list[tuple[str, Callable[[], float]]]:
    """(hint, the value that mistake gives, computed when asked) for the typical mistakes of one patched cell."""
    model, n = engine.loaded.model, engine.arch.n_layers

    def patched(other: int = layer, where=position) -> torch.Tensor:  # another layer: nothing written if none
        if not 0 <= other < n:
            with torch.no_grad():
                return engine.logits(ids)[0].double()
        return _hooked_patch(model, ids, other, where, vector)

    def prob(z: torch.Tensor) -> float:
        return float(torch.softmax(z, -1)[target])

    return [
        (
            "that is the target's LOGIT: take the softmax over the vocabulary first",
            lambda: float(patched()[-1, target]),
        ),
        (
            "that is a LOG-probability: softmax, not log_softmax",
            lambda: float(torch.log_softmax(patched()[-1], -1)[target]),
        ),
        (
            "you read the prediction at the patched position: the answer is read at the LAST position (logits[0, -1])",
            lambda: prob(patched()[position]),
        ),
        (
            "off by one layer: match event.layer to `layer` exactly (layers count from 0)",
            lambda: prob(patched(layer - 1)[-1]),
        ),
        (
            "off by one layer: match event.layer to `layer` exactly (layers count from 0)",
            lambda: prob(patched(layer + 1)[-1]),
        ),
        (
            "nothing changed: the patch never reached the run. Capture the op (capture={'residual_mlp'}) and write into "
            "event.tensors['out'] while the engine is paused at that event, before asking for the next one",
            lambda: prob(patched(n)[-1]),
        ),
        (
            "you patched the stream after ATTENTION (residual_attn): the stream after the whole layer is residual_mlp",
            lambda: prob(_stream_patch(engine, ids, layer, "residual_attn", position, vector)[-1]),
        ),
        (
            "you overwrote EVERY position with the vector: write only [0, position]",
            lambda: prob(patched(where=slice(None))[-1]),
        ),
    ]


def _near(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-7 + 1e-3 * abs(want)


@checker
def check_patched_prob(fn: Callable, engine=None) -> str:
    """Check ``fn(engine, ids, layer, position, vector, target) -> probability``: run ``ids`` through the
    engine with the residual stream after ``layer`` (op ``residual_mlp``) at ``position`` overwritten by
    ``vector``, and return the probability of token ``target`` at the last position.

    Compared with a plain ``transformers`` forward whose block ``layer`` has a forward hook that does the
    same; tried on ``engine`` (default: the course's ``tiny``). A mistake is named when it explains the
    answers of every cell tried."""
    engine = _engine_of(engine)
    answers = []
    for ids, layer, position, vector, target in _patch_cases(engine):
        case = f"layer {layer}, position {position}"
        answer = call(
            fn,
            engine,
            list(ids),
            layer,
            position,
            vector.clone(),
            target,
            case=case,
            in_place="your function changed the clean vector or the ids it was given: "
            "write a copy of the vector into the run's tensor",
        )
        try:
            answers.append((case, float(answer), (ids, layer, position, vector, target)))
        except (TypeError, ValueError, RuntimeError):
            raise Failed(f"return the target's probability as one number, got {answer!r:.80}")
    wrong = []
    for case, got, args in answers:
        want = float(torch.softmax(_hooked_patch(engine.loaded.model, *args[:4])[-1], -1)[args[4]])
        if not _near(got, want):
            wrong.append(f"{case}: the patched probability should be {want:.6g}, got {got:.6g}")
    if not wrong:
        return (
            "correct: the engine paused after the layer, you wrote the clean vector into its output, "
            "and the rest of the run read it — the same probability as a transformers forward hook"
        )
    slips = [_patch_slips(engine, *args) for _, _, args in answers]
    for i, (hint, _) in enumerate(slips[0]):  # all() stops at the first cell the mistake does not explain
        if all(_near(got, cell[i][1]()) for (_, got, _), cell in zip(answers, slips)):
            raise Failed(hint)
    raise Failed(wrong[0])


def _ig_cases() -> list[tuple[Callable, torch.Tensor, torch.Tensor, int]]:
    """(gradient function, input, baseline, steps): curved functions whose gradient is written out by hand."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 2
    cases = [
        (lambda p: torch.cos(p) * w, x, torch.zeros_like(x), 8),  # f = sum(w sin x)
        (lambda p: 3 * p**2, x[0], torch.full((4,), 0.5, dtype=torch.float64), 5),  # f = sum(x^3)
        (lambda p: torch.exp(p) * w[1:], x[1:], torch.zeros_like(x[1:]), 12),
    ]  # f = sum(w e^x)
    for i, case in enumerate(cases):  # a learner's process makes its own gradient functions
        made(case[0], "cyclelab.checks.knowledge:_ig_cases", path=(i, 0))
    return cases


def _ig_reference(grad_fn, x, baseline, steps: int, alphas=None, scale: float = 1.0) -> torch.Tensor:
    """(x - baseline) × the mean gradient at ``alphas`` (default: the midpoints), by a plain loop."""
    alphas = [(k + 0.5) / steps for k in range(steps)] if alphas is None else alphas
    total = sum(grad_fn(baseline + a * (x - baseline)) for a in alphas)
    return (x - baseline) * total / len(alphas) * scale


@checker
def check_ig_sum(fn: Callable) -> str:
    """Check ``fn(grad_fn, x, baseline, steps) -> attributions``: integrated gradients by the midpoint rule,
    ``(x - baseline) × mean_k grad_fn(baseline + (k + ½)/steps · (x - baseline))``, shaped like ``x``."""
    for grad_fn, x, baseline, steps in _ig_cases():
        case = f"an input of shape {tuple(x.shape)}, {steps} steps"
        got = tensor_answer(fn, grad_fn, x.clone(), baseline.clone(), steps, noun="the attributions", case=case)
        if got.shape != x.shape:
            raise Failed(
                f"{case}: return one attribution per input value, shape {tuple(x.shape)}, "
                f"got {tuple(got.shape)} (average over the steps, do not stack them)"
            )
        if close(got, _ig_reference(grad_fn, x, baseline, steps)):
            continue
        slips = [
            (
                _ig_reference(grad_fn, x, baseline, steps, [k / steps for k in range(steps)]),
                "you used the LEFT end of each step (k / steps): use the midpoints (k + 0.5) / steps",
            ),
            (
                _ig_reference(grad_fn, x, baseline, steps, [(k + 1) / steps for k in range(steps)]),
                "you used the RIGHT end of each step ((k + 1) / steps): use the midpoints (k + 0.5) / steps",
            ),
            (
                _ig_reference(grad_fn, x, baseline, steps, scale=steps),
                "you summed the gradients: take their MEAN (divide by steps)",
            ),
            (
                _ig_reference(grad_fn, x, baseline, steps) / (x - baseline),
                "that is the average gradient alone: multiply it by (x - baseline)",
            ),
            (grad_fn(x) * x, "that is gradient × input: average the gradient ALONG THE PATH from the baseline to x"),
            (
                (x - baseline) * sum(grad_fn((k + 0.5) / steps * x) for k in range(steps)) / steps,
                "the path ignores the baseline: the points are baseline + alpha · (x - baseline)",
            ),
        ]
        for value, hint in slips:
            if close(got, value):
                raise Failed(f"{case}: {hint}")
        raise Failed(
            f"{case}: the attributions differ from (x - baseline) × the mean gradient at the "
            "midpoints; print your alphas (they should be (k + 0.5) / steps)"
        )
    return (
        "correct: the midpoint Riemann sum of the gradient along the straight path, times "
        "(x - baseline) — captum's IntegratedGradients with method='riemann_middle'"
    )


# --- chapter 08: the knowledge graph's lookup ----------------------------------------------------------------

#: A small graph written out by hand: upper-case characters, lower-case plays, "LADY MACBETH" beside "MACBETH".
_KG_EDGES = [
    ("BANQUO", "character in", "macbeth"),
    ("MACBETH", "character in", "macbeth"),
    ("LADY MACBETH", "character in", "macbeth"),
    ("BANQUO", "appears in", "macbeth 1.3"),
    ("MACBETH", "appears in", "macbeth 1.3"),
    ("BANQUO", "speaks to", "MACBETH"),
    ("LADY MACBETH", "speaks to", "MACBETH"),
    ("MACBETH", "speaks to", "ROSS"),
    ("IAGO", "character in", "othello"),
    ("ANGUS", "speaks to", "BANQUO"),
]
#: Each question's facts, by hand: (name as asked, the indices into _KG_EDGES of the facts that name them).
_KG_CASES = [("Macbeth", [1, 4, 5, 6, 7]), (" banquo ", [0, 3, 5, 9]), ("ROSS", [7]), ("iago", [8]), ("Hamlet", [])]


def _lookup_slips(edges: list, name: str) -> list[tuple[str, object]]:
    """(hint, the answer that mistake gives) for the typical mistakes of a graph lookup."""
    key = name.strip().upper()
    return [
        (
            "a fact can name them as its TAIL too: ('BANQUO', 'speaks to', 'MACBETH') is a fact about Macbeth",
            [e for e in edges if e[0] == key],
        ),
        ("you kept only the facts that name them as the TAIL: the HEAD counts too", [e for e in edges if e[2] == key]),
        (
            "strip the spaces around the name first (' banquo ' is Banquo)",
            [e for e in edges if name.upper() in (e[0], e[2])],
        ),
        (
            "no facts came back: compare in upper case — the graph's names are upper case ('BANQUO'), the name asked "
            "may not be",
            [e for e in edges if name.strip() in (e[0], e[2])],
        ),
        (
            "'MACBETH' is inside 'LADY MACBETH': compare whole names (==), not `in`",
            [e for e in edges if key in e[0] or key in e[2]],
        ),
        (
            "you compared in lower case on both sides, so the play 'macbeth' matched too: upper-case the name and "
            "compare it with the names as the graph stores them",
            [e for e in edges if key.lower() in (e[0].lower(), e[2].lower())],
        ),
        (
            "keep the edges' order (the play fact comes first, and the prompt keeps that order): do not sort",
            sorted(e for e in edges if key in (e[0], e[2])),
        ),
        (
            "you stopped at the first fact: collect EVERY edge that names them",
            [e for e in edges if key in (e[0], e[2])][:1],
        ),
    ]


def _as_facts(answer) -> list | None:
    """The answer as a list of facts (tuples; a fact given as a list is read as a tuple), or None if it is not a list."""
    if not isinstance(answer, (list, tuple)):
        return None
    return [tuple(a) if isinstance(a, list) else a for a in answer]


@checker
def check_graph_lookup(fn: Callable[[list, str], list]) -> str:
    """Check ``fn(edges, name) -> facts``: every ``(head, relation, tail)`` edge whose head or tail is ``name``
    (the whole name, in any case, spaces around it ignored), in the edges' order. Compared with facts
    picked out by hand from a small graph."""
    for name, picked in _KG_CASES:
        edges = list(_KG_EDGES)
        case = f"the facts about {name!r}"
        answer = call(
            fn,
            edges,
            name,
            case=case,
            in_place="your function changed the list of edges: build a new list of the facts it keeps",
        )
        got, want = _as_facts(answer), [_KG_EDGES[i] for i in picked]
        if got is None:
            raise Failed(f"{case}: return a list of facts (head, relation, tail), got {type(answer).__name__}")
        if got == want:
            continue
        if got and all(isinstance(fact, str) for fact in got):
            raise Failed(f"{case}: return the whole facts (head, relation, tail), not just names")
        for hint, value in _lookup_slips(edges, name):
            if got == value:
                raise Failed(f"{case}: {hint}")
        raise Failed(f"{case}: expected {want}, got {got!r:.200}")
    return (
        "correct: every edge whose head or tail is the whole name, in the graph's order — "
        "the facts the prompt will carry"
    )
