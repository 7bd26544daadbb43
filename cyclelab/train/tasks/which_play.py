"""Task 2 of chapter 06, sequence classification: which play is a line from?

``minilm`` (a BERT encoder) plus a linear head on the mean of its token vectors:
:func:`play_lines`, :func:`classification_data`, :class:`EncoderClassifier`,
:func:`classification_loss`, :func:`predict`. The trivial baseline is the majority class
(:func:`majority_baseline`); :func:`plot_confusion` shows which plays get confused.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.loading import corpus as data
from cyclelab.train.tasks import stack_batch


def play_lines(plays: Sequence[str], n_per_play: int, seed: int = 0, min_words: int = 6) -> tuple[list[str], list[int]]:
    """``n_per_play`` random spoken lines (at least ``min_words`` words) from each play, shuffled;
    labels are the plays' positions in ``plays``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, name in enumerate(plays):
        lines = data.spoken_lines(data.normalize_speakers(data.read_work(name)), folio=False, min_words=min_words)
        if len(lines) < n_per_play:
            raise ValueError(f"{name} has only {len(lines)} usable lines, fewer than n_per_play={n_per_play}")
        texts += rng.sample(lines, n_per_play)
        labels += [label] * n_per_play
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def classification_data(tokenizer, texts: Sequence[str], labels: Sequence[int], max_len: int = 32) -> list[dict]:
    """Examples ``{"input_ids", "attention_mask", "labels"}`` padded to ``max_len`` tokens."""
    if len(texts) == 0:
        raise ValueError("the classification data set is empty")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(set(labels)) < 2:
        raise ValueError(
            f"the labels hold a single class ({sorted(set(labels))}): a classifier needs at least "
            "two classes to tell apart (and would reach 100% by always answering the one)"
        )
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "labels": torch.tensor(labels[i]),
        }
        for i in range(len(texts))
    ]


class EncoderClassifier(nn.Module):
    """An encoder (BERT) and a linear head on the mean of its token vectors (padding excluded)."""

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean of the encoder's token vectors (padding excluded): what the head reads."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(input_ids, attention_mask)))


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of the classifier's logits against ``batch["labels"]``."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def predict(model: nn.Module, examples: Sequence[dict], batch_size: int = 64) -> list[int]:
    """Predicted class of each example (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[int] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids, mask = stack_batch(chunk, device)
        out += model(ids, mask).argmax(-1).tolist()
    return out


def chance(labels: Sequence[int]) -> float:
    """Accuracy of guessing uniformly among the classes present in ``labels``: 1 / their number."""
    if not labels:
        raise ValueError("chance needs a non-empty label list")
    return 1 / len(set(labels))


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Accuracy on ``test_labels`` of always answering the most frequent training label."""
    if not train_labels or not test_labels:
        raise ValueError("majority_baseline needs non-empty label lists")
    top = max(set(train_labels), key=list(train_labels).count)
    return sum(y == top for y in test_labels) / len(test_labels)


def plot_confusion(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]):
    """Confusion matrix: rows the true play, columns the predicted one."""
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(names))))
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xlabel="predicted",
        ylabel="true",
        title="which play is this line from?",
    )
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticklabels(names)
    fig.tight_layout()
    return fig
