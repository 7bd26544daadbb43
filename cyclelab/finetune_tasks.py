"""Fine-tuning tasks on the course's own data (no downloads), for chapter 06.

1. **Causal LM adaptation** — move ``tiny`` (trained on the plays) toward the Sonnets:
   :func:`sonnets`, :func:`lm_windows`, :func:`sonnet_perplexity`. Held-out sonnets are the
   last ones, so "after" perplexity measures sonnets the model never trained on.
2. **Sequence classification** — which play a line comes from, with ``minilm`` (a BERT encoder)
   plus a linear head: :func:`play_lines`, :func:`classification_data`, :class:`EncoderClassifier`,
   :func:`classification_loss`, :func:`predict`. The trivial baseline is the majority class.

3. **Span extraction** — who speaks a line: a passage of a few speeches (``NAME: ...``) and one
   of its lines as the question; the answer is the speaker's name in the passage. ``minilm`` with a
   start/end head (:class:`SpanExtractor`), scored by exact match and F1 (:func:`exact_match_f1`);
   baseline: the passage's first speaker.
4. **Text to text** — First Folio spelling to modern spelling (:func:`folio_pairs`), ``tiny``
   fine-tuned on ``"FOLIO: ... MODERN: ..."`` prompts (:func:`seq2seq_examples`, :func:`modernise`),
   scored with BLEU against the copy-the-input baseline.

:func:`compare_methods` runs task 1 with full fine-tuning, LoRA, adapters and prefix tuning;
:func:`plot_schedule`, :func:`plot_losses` and :func:`plot_confusion` draw the chapter's figures.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .metrics import perplexity_of_model

_ROMAN = re.compile(r"^\s*[IVXLC]+\s*$")


# --- task 1: causal LM adaptation toward the sonnets ----------------------------------------------


def sonnets() -> list[str]:
    """The 154 sonnets, each a string of its 14 (or so) lines, in order."""
    parts: list[list[str]] = []
    for line in data.read_work("sonnets").splitlines():
        if _ROMAN.match(line):
            parts.append([])  # a numeral starts the next sonnet; the title before the first is dropped
        elif parts and line.strip():
            parts[-1].append(line.strip())
    return ["\n".join(p) + "\n" for p in parts if p]


def sonnet_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``texts`` joined, each followed by the end-of-text token."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def lm_windows(tokenizer, texts: Sequence[str], length: int = 64) -> list[torch.Tensor]:
    """Training examples for a causal LM: consecutive windows of ``length`` tokens."""
    ids = sonnet_ids(tokenizer, texts)
    windows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length // 2)]
    if not windows:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {length}")
    return windows


def sonnet_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], context: int = 128) -> float:
    """Perplexity of ``model`` on ``texts`` (windows of ``context`` tokens)."""
    return perplexity_of_model(model, sonnet_ids(tokenizer, texts), context=context)


# --- task 2: which play is this line from? ---------------------------------------------------------

_SPEAKER_TAG = re.compile(r"^[A-Z0-9][A-Z0-9' ]*:$")
_STAGE = re.compile(r"^\s*(\[|Enter|Exit|Exeunt|Re-enter|ACT|SCENE|Scene)")


def play_lines(plays: Sequence[str], n_per_play: int, seed: int = 0, min_words: int = 6) -> tuple[list[str], list[int]]:
    """``n_per_play`` random spoken lines (at least ``min_words`` words) from each play, shuffled;
    labels are the plays' positions in ``plays``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, name in enumerate(plays):
        lines = [line.strip() for line in data.normalize_speakers(data.read_work(name)).splitlines()]
        lines = [line for line in lines if len(line.split()) >= min_words
                 and not _SPEAKER_TAG.match(line) and not _STAGE.match(line)]
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
        raise ValueError(f"the labels hold a single class ({sorted(set(labels))}): a classifier needs at least "
                         "two classes to tell apart (and would reach 100% by always answering the one)")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": torch.tensor(labels[i])} for i in range(len(texts))]


class EncoderClassifier(nn.Module):
    """An encoder (BERT) and a linear head on the mean of its token vectors (padding excluded)."""

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(self.dropout(pooled))


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
        chunk = examples[i:i + batch_size]
        ids = torch.stack([e["input_ids"] for e in chunk]).to(device)
        mask = torch.stack([e["attention_mask"] for e in chunk]).to(device)
        out += model(ids, mask).argmax(-1).tolist()
    return out


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Accuracy on ``test_labels`` of always answering the most frequent training label."""
    if not train_labels or not test_labels:
        raise ValueError("majority_baseline needs non-empty label lists")
    top = max(set(train_labels), key=list(train_labels).count)
    return sum(y == top for y in test_labels) / len(test_labels)


# --- comparing methods and drawing the chapter's figures -----------------------------------------

#: Learning rates that suit each method on ``tiny`` (fewer trainable parameters tolerate larger steps).
METHOD_LR = {"full": 5e-4, "lora": 3e-3, "adapters": 3e-3, "prefix": 3e-2}


def prepare(model: nn.Module, method: str, r: int = 8, bottleneck: int = 16, n_virtual: int = 8) -> nn.Module:
    """A copy of ``model`` ready for ``method``: ``"full"``, ``"lora"`` (on ``c_attn`` and ``c_fc``),
    ``"adapters"`` (after each ``mlp``) or ``"prefix"`` (``n_virtual`` virtual tokens)."""
    import copy

    from .finetune import PrefixTuning, add_adapters, add_lora

    model = copy.deepcopy(model)  # never train the cached model that load() hands out
    if method == "full":
        return model
    if method == "lora":
        return add_lora(model, ["c_attn", "c_fc"], r=r, alpha=2 * r)
    if method == "adapters":
        return add_adapters(model, ["mlp"], bottleneck=bottleneck)
    if method == "prefix":
        return PrefixTuning(model, n_virtual=n_virtual)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_LR)}")


def compare_methods(model: nn.Module, tokenizer, train_texts: Sequence[str], test_texts: Sequence[str],
                    steps: int = 20, batch_size: int = 8, window: int = 64, seed: int = 0,
                    methods: Sequence[str] = tuple(METHOD_LR)) -> list[dict]:
    """Fine-tune a copy of ``model`` on ``train_texts`` with each method; one row per method:
    trainable and total parameters, seconds per step, held-out perplexity, and the history."""
    from .finetune import TrainConfig, count_trainable, lm_loss, train

    examples = lm_windows(tokenizer, train_texts, window)
    rows = []
    for method in methods:
        torch.manual_seed(seed)
        tuned = prepare(model, method)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=METHOD_LR[method], warmup=max(1, steps // 10), seed=seed)
        history = train(tuned, examples, lm_loss, cfg)
        trainable, total = count_trainable(tuned)
        rows.append({"method": method, "trainable": trainable, "total": total, "s_per_step": history.seconds_per_step,
                     "perplexity": sonnet_perplexity(tuned, tokenizer, test_texts), "history": history})
    return rows


def plot_schedule(steps: int, lr: float, warmup: int, min_lr_ratio: float = 0.1):
    """The learning rate of every step: warmup, then cosine decay."""
    import matplotlib.pyplot as plt

    from .finetune import schedule

    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(range(steps), [schedule(s, steps, lr, warmup, min_lr_ratio) for s in range(steps)])
    ax.axvline(warmup, color="grey", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="learning rate", title=f"warmup {warmup} steps, cosine decay to {min_lr_ratio:g}× peak")
    fig.tight_layout()
    return fig


def plot_losses(rows: Sequence[dict]):
    """Training loss per step for each method of :func:`compare_methods`."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for row in rows:
        ax.plot(range(1, len(row["history"].loss) + 1), row["history"].loss, label=row["method"])
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="fine-tuning tiny on the sonnets")
    ax.legend()
    fig.tight_layout()
    return fig


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
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true",
           title="which play is this line from?")
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yticklabels(names)
    fig.tight_layout()
    return fig


# --- task 4: First Folio spelling -> modern spelling (text to text, scored with BLEU) --------------

_FOLIO_SPEAKER = re.compile(r"^[A-Z][A-Za-z]*\.\s+")


def _spoken_lines(text: str, folio: bool, min_words: int = 4) -> list[str]:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if folio and line.startswith(" "):
            s = _FOLIO_SPEAKER.sub("", s)  # the Folio puts the speaker inline: "   Fla. It is no matter"
        if len(s.split()) >= min_words and not _SPEAKER_TAG.match(s) and not _STAGE.match(s):
            out.append(s)
    return out


def _spelling_key(line: str) -> str:
    return re.sub(r"[^a-z ]", "", line.lower().replace("v", "u").replace("j", "i"))


def folio_pairs(play: str, min_ratio: float = 0.85, look_ahead: int = 40) -> list[tuple[str, str]]:
    """``(folio, modern)`` line pairs of ``play`` that differ, aligned simply: walking through the
    Folio's lines in order, each is paired with the most similar of the next ``look_ahead`` modern
    lines (difflib ratio of lowercased letters, u/v and i/j merged) if that ratio is ``min_ratio``
    or more. Lines cut differently in the two editions are skipped, not split."""
    import difflib

    folio = _spoken_lines(data.read_work(play, folio=True), folio=True)
    modern = _spoken_lines(data.normalize_speakers(data.read_work(play)), folio=False)
    keys = [_spelling_key(m) for m in modern]
    pairs, j = [], 0
    for line in folio:
        key, best, best_k = _spelling_key(line), 0.0, None
        for k in range(j, min(j + look_ahead, len(modern))):
            matcher = difflib.SequenceMatcher(None, key, keys[k])
            if matcher.real_quick_ratio() < min_ratio or matcher.quick_ratio() < min_ratio:
                continue
            if (ratio := matcher.ratio()) > best:
                best, best_k = ratio, k
        if best_k is not None and best >= min_ratio:
            if line != modern[best_k]:
                pairs.append((line, modern[best_k]))
            j = best_k + 1
    return pairs


def seq2seq_examples(tokenizer, pairs: Sequence[tuple[str, str]], length: int = 64) -> list[dict]:
    """``"FOLIO: <old>\\nMODERN: <new>\\n"`` prompts for a causal LM; only the answer (and the
    end-of-text token) is scored: labels are -100 on the prompt and the padding."""
    examples = []
    for old, new in pairs:
        prompt = tokenizer(f"FOLIO: {old}\nMODERN:")["input_ids"]
        answer = tokenizer(f" {new}\n")["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:length]
        labels = ([-100] * len(prompt) + answer)[:length]
        pad = length - len(ids)
        examples.append({"input_ids": torch.tensor(ids + [tokenizer.eos_token_id] * pad),
                         "labels": torch.tensor(labels + [-100] * pad)})
    if not examples:
        raise ValueError("no pairs to make examples from")
    return examples


@torch.no_grad()
def modernise(model: nn.Module, tokenizer, lines: Sequence[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers of a prompt-tuned causal LM to ``"FOLIO: <line>\\nMODERN:"``, up to the newline."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for line in lines:
        ids = tokenizer(f"FOLIO: {line}\nMODERN:", return_tensors="pt")["input_ids"].to(device)
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:]).split("\n")[0].replace("<|endoftext|>", "").strip())
    return out


# --- task 3: who speaks this line? (span extraction) ------------------------------------------------


def speeches(play: str) -> list[tuple[str, list[str]]]:
    """``(SPEAKER, lines)`` of each speech in the normalised play (stage directions dropped)."""
    out: list[tuple[str, list[str]]] = []
    for line in data.normalize_speakers(data.read_work(play)).splitlines():
        s = line.strip()
        if _SPEAKER_TAG.match(s):
            out.append((s[:-1], []))
        elif out and s and not _STAGE.match(s):
            out[-1][1].append(s)
    return [(name, lines) for name, lines in out if lines]


def speaker_questions(plays: Sequence[str], n: int, k: int = 3, seed: int = 0, min_words: int = 4) -> list[dict]:
    """``n`` span-extraction examples: a passage of ``k`` consecutive speeches (their first two lines,
    each introduced by ``NAME:``), a line of one of them as the question, and as the answer the
    speaker's name where it stands in the passage (``answer_start`` is a character offset)."""
    rng = random.Random(seed)
    pool = [speeches(p) for p in plays]
    out = []
    while len(out) < n:
        play = rng.choice(pool)
        i = rng.randrange(0, len(play) - k)
        window = play[i:i + k]
        if len({name for name, _ in window}) < 2:
            continue
        target = rng.randrange(k)
        candidates = [line for line in window[target][1][:2] if len(line.split()) >= min_words]
        if not candidates:
            continue
        context, start = "", 0
        for j, (name, lines) in enumerate(window):
            if j == target:
                start = len(context)
            context += f"{name}: {' '.join(lines[:2])}\n"
        out.append({"question": rng.choice(candidates), "context": context, "answer": window[target][0],
                    "answer_start": start, "first_speaker": window[0][0]})
    return out


def span_data(tokenizer, examples: Sequence[dict], max_len: int = 128) -> list[dict]:
    """Encode ``question [SEP] passage`` and the answer's first and last token positions."""
    out = []
    for ex in examples:
        enc = tokenizer(ex["question"], ex["context"], truncation="only_second", max_length=max_len,
                        padding="max_length", return_offsets_mapping=True)
        first, last = ex["answer_start"], ex["answer_start"] + len(ex["answer"])
        seq = enc.sequence_ids()
        tokens = [t for t, ((a, b), s) in enumerate(zip(enc["offset_mapping"], seq)) if s == 1 and a < last and b > first]
        if not tokens:  # the answer was truncated away
            continue
        out.append({"input_ids": torch.tensor(enc["input_ids"]), "attention_mask": torch.tensor(enc["attention_mask"]),
                    "start": torch.tensor(tokens[0]), "end": torch.tensor(tokens[-1]),
                    "context_mask": torch.tensor([s == 1 for s in seq]),
                    "offsets": torch.tensor(enc["offset_mapping"])})
    return out


class SpanExtractor(nn.Module):
    """An encoder and a linear layer giving each token a start score and an end score."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        start, end = self.head(h).float().unbind(-1)
        return start, end


def span_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean of the cross-entropies of the start and the end position."""
    start, end = model(batch["input_ids"], batch["attention_mask"])
    return (F.cross_entropy(start, batch["start"]) + F.cross_entropy(end, batch["end"])) / 2


@torch.no_grad()
def predict_spans(model: nn.Module, encoded: Sequence[dict], examples: Sequence[dict], max_tokens: int = 12) -> list[str]:
    """The best passage span (start <= end < start + ``max_tokens``) of each example, as text."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for enc, ex in zip(encoded, examples):
        start, end = model(enc["input_ids"][None].to(device), enc["attention_mask"][None].to(device))
        mask = enc["context_mask"].to(device)
        s = start[0].masked_fill(~mask, -1e9)
        e = end[0].masked_fill(~mask, -1e9)
        scores = s[:, None] + e[None, :]
        n = len(s)
        allowed = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device)) & ~torch.triu(
            torch.ones(n, n, dtype=torch.bool, device=device), diagonal=max_tokens)
        best = int(scores.masked_fill(~allowed, -1e18).argmax())
        i, j = divmod(best, n)
        out.append(ex["context"][int(enc["offsets"][i][0]):int(enc["offsets"][j][1])])
    return out


def exact_match_f1(predictions: Sequence[str], answers: Sequence[str]) -> tuple[float, float]:
    """SQuAD-style exact match and mean token F1 (lowercased, punctuation dropped), in percent."""
    def words(s: str) -> list[str]:
        return re.sub(r"[^\w\s]", " ", s.lower()).split()

    if len(predictions) != len(answers) or not answers:
        raise ValueError("give one prediction per answer (and at least one)")
    em = f1 = 0.0
    for p, a in zip(predictions, answers):
        pw, aw = words(p), words(a)
        em += pw == aw
        common = sum(min(pw.count(w), aw.count(w)) for w in set(pw))
        if common:
            precision, recall = common / len(pw), common / len(aw)
            f1 += 2 * precision * recall / (precision + recall)
    return 100 * em / len(answers), 100 * f1 / len(answers)
