"""Chapter 09's robustness helpers: typos, the modern → Folio table, the classifier's pooled vectors and HotFlip.

References are independent: hand-written strings and tables, a brute-force loop over every swap, a loss
that is linear in the input (where the first-order estimate is exact), and the gradient through
``inputs_embeds`` (a path that does not use the package's hook).
"""

from __future__ import annotations

import random
import string

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from cyclelab.lab.robust import (
    attacked_examples,
    embedding_gradient,
    fit_head,
    folio_table,
    head_predict,
    hotflip_attack,
    hotflip_scores,
    noisy_examples,
    pooled_features,
    typos,
    word_candidates,
)
from cyclelab.train.finetune import TrainConfig
from cyclelab.train.tasks.which_play import EncoderClassifier

# --- typos ------------------------------------------------------------------------------------------


def test_rate_zero_leaves_the_text_and_rate_one_touches_every_letter() -> None:
    text = "Friends, Romans, countrymen, lend me your ears!"
    assert typos(text, 0.0, seed=3) == text
    noised = typos(text, 1.0, seed=3)
    assert noised != text
    # punctuation and spaces are never edited, only moved by a swap or kept: each survives in the output
    assert sorted(c for c in noised if not c.isalpha()) == sorted(c for c in text if not c.isalpha())


def _typos_by_hand(text: str, rate: float, seed: int) -> str:
    """The same process written as one draw per letter against a list of outcomes."""
    rng, out, i = random.Random(seed), "", 0
    while i < len(text):
        c = text[i]
        if c.isalpha() and rng.random() < rate:
            kind = rng.randrange(4)
            if kind == 1:
                out += c + c
            elif kind == 2 and i + 1 < len(text):
                out, i = out + text[i + 1] + c, i + 1
            elif kind != 0:
                out += rng.choice(string.ascii_lowercase)
        else:
            out += c
        i += 1
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_typos_follow_the_documented_process(seed: int) -> None:
    text = "Is this a dagger which I see before me, the handle toward my hand?"
    assert typos(text, 0.3, seed=seed) == _typos_by_hand(text, 0.3, seed)
    assert typos(text, 0.3, seed=seed) == typos(text, 0.3, seed=seed)


def test_the_share_of_edited_letters_follows_the_rate() -> None:
    text = "abcdefghij" * 200  # 2000 letters; a dropped, doubled or replaced letter changes the string
    changed = sum(typos(text[i : i + 10], 0.2, seed=i) != text[i : i + 10] for i in range(0, len(text), 10))
    # P(a 10-letter word keeps all letters) = 0.8**10 = 0.107 (a swap with an equal letter cannot happen here)
    assert 0.80 < changed / 200 < 0.97


def test_noisy_examples_draw_their_rates_from_the_list() -> None:
    lines = ["to be or not to be"] * 50
    assert noisy_examples(lines, [0.0]) == lines
    out = noisy_examples(lines, [0.0, 1.0], seed=2)
    assert len(out) == 50 and 0 < sum(o == lines[0] for o in out) < 50


# --- the modern -> Folio table ------------------------------------------------------------------------


def test_folio_table_by_hand() -> None:
    pairs = [
        ("I haue it vpon me", "I have it upon me"),
        ("You haue it", "You have it"),
        ("Haue at you", "Have at you"),
        ("Then I haue done", "Then I have done"),
    ]
    # have <- haue three times; Have <- Haue once; upon <- vpon; identical words are left out
    assert folio_table(pairs) == {"have": "haue", "Have": "Haue", "upon": "vpon"}


# --- HotFlip's scores ---------------------------------------------------------------------------------


def _brute_force(grad: torch.Tensor, emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    x = emb[ids]
    out = torch.empty(len(ids), len(emb), dtype=grad.dtype)
    for i in range(len(ids)):
        for v in range(len(emb)):
            swapped = x.clone()
            swapped[i] = emb[v]
            out[i, v] = (grad * (swapped - x)).sum()
    return out


def test_scores_are_the_gradient_dotted_with_each_swap() -> None:
    gen = torch.Generator().manual_seed(0)
    grad, emb = (
        torch.randn(5, 4, generator=gen, dtype=torch.float64),
        torch.randn(9, 4, generator=gen, dtype=torch.float64),
    )
    ids = torch.tensor([3, 0, 3, 8, 1])
    scores = hotflip_scores(grad, emb, ids)
    assert torch.allclose(scores, _brute_force(grad, emb, ids))
    assert torch.allclose(scores[torch.arange(5), ids], torch.zeros(5, dtype=torch.float64))  # keeping a token: 0


def test_on_a_linear_loss_the_first_order_choice_is_the_best_swap() -> None:
    """With L(x) = sum(W * x) the estimate is exact, so its argmax is the brute-force best swap."""
    gen = torch.Generator().manual_seed(1)
    w, emb, ids = torch.randn(4, 3, generator=gen), torch.randn(6, 3, generator=gen), torch.tensor([1, 4, 2, 0])
    x = emb[ids].requires_grad_(True)
    (grad,) = torch.autograd.grad((w * x).sum(), x)
    loss = lambda tokens: float((w * emb[tokens]).sum())  # noqa: E731
    changes = {
        (i, v): loss(torch.cat([ids[:i], torch.tensor([v]), ids[i + 1 :]])) - loss(ids)
        for i in range(4)
        for v in range(6)
    }
    best = int(hotflip_scores(grad, emb, ids).argmax())
    assert divmod(best, 6) == max(changes, key=changes.get)


# --- on a small random BERT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """A 2-class EncoderClassifier on a one-layer random BERT with 20 tokens, and a few examples."""
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=20,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
        )
    )
    model = EncoderClassifier(bert, 2, dropout=0.0).eval()
    ids = torch.randint(4, 20, (12, 6))
    ids[:, 0], ids[3:, 5] = 1, 0  # token 1 plays [CLS]; rows 3.. have one position of padding (token 0)
    mask = (ids != 0).long()
    with torch.no_grad():
        labels = model(ids, mask).argmax(-1)  # the model is right on every example to start with
    examples = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(12)]
    candidates = torch.zeros(20, dtype=torch.bool)
    candidates[4:] = True
    return model, examples, candidates


def test_embedding_gradient_matches_the_inputs_embeds_path(small) -> None:
    model, examples, _ = small
    ids = torch.stack([e["input_ids"] for e in examples])
    mask = torch.stack([e["attention_mask"] for e in examples])
    labels = torch.stack([e["labels"] for e in examples])
    logits, grad = embedding_gradient(model, ids, mask, labels)
    x = model.encoder.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    h = model.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    (want,) = torch.autograd.grad(F.cross_entropy(model.head(pooled), labels, reduction="sum"), x)
    assert torch.allclose(grad, want, atol=1e-6) and torch.allclose(logits, model(ids, mask), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_the_attack_flips_only_by_allowed_swaps(small) -> None:
    model, examples, candidates = small
    attack = hotflip_attack(model, examples, candidates, max_edits=3)
    before = torch.stack([e["input_ids"] for e in examples])
    with torch.no_grad():
        after = model(attack.ids, torch.stack([e["attention_mask"] for e in examples])).argmax(-1)
    labels = torch.stack([e["labels"] for e in examples])
    assert bool(attack.correct.all())
    assert torch.equal(attack.flipped, after != labels)  # flipped means: the model now answers wrong
    changed = attack.ids != before
    assert torch.equal(changed.sum(1), attack.edits) and int(attack.edits.max()) <= 3
    assert not changed[:, 0].any() and not changed[3:, 5].any()  # [CLS] and padding are never written
    assert bool(candidates[attack.ids[changed]].all())
    assert bool((attack.edits[~attack.flipped] == 3).all())  # an attack that failed used every swap it had
    assert attack.success_rate == float(attack.flipped.sum()) / 12
    kept = attacked_examples(examples, attack)
    assert len(kept) == int(attack.flipped.sum()) and all(
        torch.equal(k["labels"], e["labels"]) for k, e in zip(kept, [e for e, f in zip(examples, attack.flipped) if f])
    )


def test_the_first_swap_is_the_largest_score(small) -> None:
    model, examples, candidates = small
    one = examples[:1]
    _, grad = embedding_gradient(
        model, one[0]["input_ids"][None], one[0]["attention_mask"][None], one[0]["labels"][None]
    )
    scores = hotflip_scores(grad[0], model.encoder.get_input_embeddings().weight.detach(), one[0]["input_ids"])
    scores[0] = -torch.inf  # [CLS] is not a candidate
    scores[:, ~candidates] = -torch.inf
    position, token = divmod(int(scores.argmax()), 20)
    attack = hotflip_attack(model, one, candidates, max_edits=1)
    assert int(attack.ids[0, position]) == token and int(attack.edits[0]) == 1


def _pooled_by_hand(model, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The examples' ids and mask stacked, and their pooled vectors from one plain forward pass."""
    ids = torch.stack([e["input_ids"] for e in examples])
    mask = torch.stack([e["attention_mask"] for e in examples])
    with torch.no_grad():
        return ids, mask, model.pool(ids, mask)


def test_pooled_features_and_the_head(small) -> None:
    model, examples, _ = small
    ids, mask, want = _pooled_by_hand(model, examples)
    with torch.no_grad():
        assert torch.allclose(pooled_features(model, examples, batch_size=5), want, atol=1e-6)
        assert head_predict(model, examples) == model(ids, mask).argmax(-1).tolist()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    flipped = [{**e, "labels": 1 - e["labels"]} for e in examples]
    clone = EncoderClassifier(model.encoder, 2, dropout=0.0)
    fit_head(clone, flipped, TrainConfig(steps=200, batch_size=12, lr=0.1, warmup=0))
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    accuracy = sum(p == int(e["labels"]) for p, e in zip(head_predict(clone, flipped), flipped)) / 12
    assert accuracy > 0.5  # the head alone learned labels the old head got all wrong


def test_the_feature_cache_encodes_each_line_once(small) -> None:
    model, examples, _ = small
    ids, mask, want = _pooled_by_hand(model, examples)
    padded = {
        **examples[0],
        "input_ids": torch.cat([ids[0], torch.zeros(3, dtype=ids.dtype)]),
        "attention_mask": torch.cat([mask[0], torch.zeros(3, dtype=mask.dtype)]),
    }  # the same line, more padding
    runs = []
    handle = model.encoder.register_forward_hook(
        lambda module, args, kwargs, out: runs.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    try:
        cache: dict = {}
        first = pooled_features(model, examples[:8] + examples[:2], batch_size=4, cache=cache)
        assert sum(runs) == 8  # ten examples, eight distinct lines: each encoded once
        again = pooled_features(model, examples + [padded], batch_size=4, cache=cache)
        assert sum(runs) == 12  # only the four lines not seen before
        assert head_predict(model, examples, cache=cache) == model.head(want).argmax(-1).tolist()
        assert sum(runs) == 12
    finally:
        handle.remove()
    assert torch.allclose(first, torch.cat([want[:8], want[:2]]), atol=1e-6)
    assert torch.allclose(again, torch.cat([want, want[:1]]), atol=1e-6)


def test_word_candidates_of_minilm(minilm) -> None:
    allowed = word_candidates(minilm.tokenizer)
    vocab = minilm.tokenizer.get_vocab()
    assert allowed[vocab["dagger"]] and allowed[vocab["##ing"]]
    assert not allowed[vocab["[CLS]"]] and not allowed[vocab["[MASK]"]] and not allowed[vocab[","]]


# --- bad input -----------------------------------------------------------------------------------------

E = torch.zeros(5, 3)
BAD = [
    pytest.param(
        lambda: typos("a line", 1.5), ValueError, r"rate must be a number between 0 and 1", id="typos-rate-above-1"
    ),
    pytest.param(lambda: typos("a line", -0.1), ValueError, r"rate must be", id="typos-negative-rate"),
    pytest.param(lambda: typos("a line", True), ValueError, r"rate must be", id="typos-bool-rate"),
    pytest.param(lambda: typos(["a line"], 0.1), TypeError, r"text must be a str, not list", id="typos-list"),
    pytest.param(lambda: noisy_examples(["a"], []), ValueError, r"rates is empty", id="noisy-no-rates"),
    pytest.param(lambda: noisy_examples(["a"], [0.1, 2]), ValueError, r"rate must be", id="noisy-bad-rate"),
    pytest.param(
        lambda: hotflip_scores(torch.zeros(2, 4), E, torch.tensor([0, 1])),
        ValueError,
        r"same width.*\(2, 4\) and \(5, 3\)",
        id="scores-width",
    ),
    pytest.param(
        lambda: hotflip_scores(torch.zeros(2, 3), E, torch.tensor([0, 1, 2])),
        ValueError,
        r"one token per row of grad",
        id="scores-ids-length",
    ),
    pytest.param(
        lambda: hotflip_scores(torch.zeros(2, 3), E, torch.tensor([0, 5])),
        ValueError,
        r"ids must lie in \[0, 5\)",
        id="scores-id-out-of-range",
    ),
    pytest.param(
        lambda: hotflip_scores(torch.zeros(3), E, torch.tensor([0])),
        ValueError,
        r"need grad \(tokens, width\)",
        id="scores-1d-grad",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD)
def test_bad_input_is_named(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"max_edits": 0}, r"max_edits must be a positive int, not 0", id="attack-zero-edits"),
        pytest.param({"max_edits": 1.5}, r"max_edits must be a positive int", id="attack-float-edits"),
        pytest.param(
            {"candidates": torch.ones(19, dtype=torch.bool)},
            r"one entry per token \(20\).*\(19,\)",
            id="attack-candidates-length",
        ),
        pytest.param({"candidates": torch.ones(20)}, r"candidates must be a bool tensor", id="attack-candidates-float"),
        pytest.param({"examples": []}, r"examples is empty", id="attack-no-examples"),
    ],
)
def test_bad_attack_arguments(small, kwargs, message) -> None:
    model, examples, candidates = small
    args = {"examples": examples, "candidates": candidates, "max_edits": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        hotflip_attack(model, **args)


def test_attacked_examples_needs_the_attacked_list(small) -> None:
    model, examples, candidates = small
    attack = hotflip_attack(model, examples, candidates, max_edits=1)
    with pytest.raises(ValueError, match=r"the attack holds 12 examples, not 3: pass the same list"):
        attacked_examples(examples[:3], attack)
