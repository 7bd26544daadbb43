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
   baselines that never read the question (:func:`baseline_answers`): the passage's first, last
   or most frequent speaker.
4. **Text to text** — First Folio spelling to modern spelling (:func:`folio_pairs`), as *edit
   tagging* (like LaserTagger and GECToR): each Folio word gets a tag, ``KEEP`` or an edit learned
   from the aligned training pairs (:func:`align_words`, :func:`word_edit`, :func:`edit_vocabulary`);
   ``tiny`` plus a linear head tags every word (:func:`tagging_data`, :class:`EditTagger`,
   :func:`tagging_loss`) and :func:`modernise` applies the tags. Scored with BLEU against the
   copy-the-input baseline (and a context-free lookup table, :func:`lookup_table`).

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
_FOLIO_SPEAKER = re.compile(r"^[A-Z][A-Za-z]*\.\s+")


def _spoken_lines(text: str, folio: bool, min_words: int = 4) -> list[str]:
    """The lines of a play's ``text`` that someone speaks (``min_words`` words or more): no speaker
    tags, no stage directions; in the Folio (``folio=True``) the inline speaker is cut off."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if folio and line.startswith(" "):
            s = _FOLIO_SPEAKER.sub("", s)  # the Folio puts the speaker inline: "   Fla. It is no matter"
        if len(s.split()) >= min_words and not _SPEAKER_TAG.match(s) and not _STAGE.match(s):
            out.append(s)
    return out


def play_lines(plays: Sequence[str], n_per_play: int, seed: int = 0, min_words: int = 6) -> tuple[list[str], list[int]]:
    """``n_per_play`` random spoken lines (at least ``min_words`` words) from each play, shuffled;
    labels are the plays' positions in ``plays``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, name in enumerate(plays):
        lines = _spoken_lines(data.normalize_speakers(data.read_work(name)), folio=False, min_words=min_words)
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
    trainable and total parameters, seconds per step, held-out perplexity, the history and the
    fine-tuned model."""
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
                     "perplexity": sonnet_perplexity(tuned, tokenizer, test_texts), "history": history,
                     "model": tuned})
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
    matcher = difflib.SequenceMatcher(None)
    for line in folio:
        matcher.set_seq2(_spelling_key(line))  # difflib caches what it learns about seq2: set it once per line
        best, best_k = 0.0, None
        for k in range(j, min(j + look_ahead, len(modern))):
            matcher.set_seq1(keys[k])
            if matcher.real_quick_ratio() < min_ratio or matcher.quick_ratio() < min_ratio:
                continue
            if (ratio := matcher.ratio()) > best:
                best, best_k = ratio, k
        if best_k is not None and best >= min_ratio:
            if line != modern[best_k]:
                pairs.append((line, modern[best_k]))
            j = best_k + 1
    return pairs


KEEP = "KEEP"  #: the edit tag that leaves a word as it is


def align_words(old: str, new: str) -> list[tuple[str, str | None]]:
    """Each word (whitespace-separated, punctuation attached) of ``old`` with the word of ``new`` it
    becomes: difflib matches the two word sequences; equal words and same-length runs of replaced
    words pair up one to one; words inside an uneven change (inserted, dropped, merged) get None."""
    import difflib

    old_words, new_words = old.split(), new.split()
    out: list[str | None] = [None] * len(old_words)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old_words, new_words, autojunk=False).get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            for i, j in zip(range(i1, i2), range(j1, j2)):
                out[i] = new_words[j]
    return list(zip(old_words, out))


def word_edit(old: str, new: str) -> str:
    """The edit that turns the word ``old`` into ``new``, as a tag that other words can share:
    ``KEEP``; an optional case change of the first letter (``lower``/``upper``); then a rewrite of
    the ending after the longest common beginning, ``"cut→add"``. ``haue→have`` and ``giue→give``
    are both ``"ue→ve"``, ``Lord→lord,`` is ``"lower →,"``, ``vpon→upon`` is ``"vpon→upon"``."""
    if not old or not new or any(c.isspace() for c in old + new):
        raise ValueError(f"word_edit takes two single words, got {old!r} and {new!r}")
    if old == new:
        return KEEP
    case = ""
    if old[0].isupper() and new[0] == old[0].lower():
        case, old = "lower", old[0].lower() + old[1:]
    elif old[0].islower() and new[0] == old[0].upper():
        case, old = "upper", old[0].upper() + old[1:]
    p = 0
    while p < min(len(old), len(new)) and old[p] == new[p]:
        p += 1
    rule = "" if old == new else f"{old[p:]}→{new[p:]}"
    return " ".join(part for part in (case, rule) if part)


def apply_edit(word: str, edit: str) -> str:
    """Apply a tag of :func:`word_edit` to ``word``; a rewrite whose ending does not fit leaves
    the word unchanged (so a wrong tag can only do so much harm)."""
    if edit == KEEP:
        return word
    case, rule = "", edit  # a rule never holds a space: "lower →," is a case change and a rule
    if " " in edit or edit in ("lower", "upper"):
        case, _, rule = edit.partition(" ")
    if case not in ("", "lower", "upper") or (rule and "→" not in rule) or rule.count("→") > 1:
        raise ValueError(f"not an edit tag: {edit!r} (expected KEEP, lower, upper and/or 'cut→add')")
    out = word
    if case == "lower":
        out = out[:1].lower() + out[1:]
    elif case == "upper":
        out = out[:1].upper() + out[1:]
    if rule:
        cut, add = rule.split("→")
        if not out.endswith(cut):
            return word
        out = out[:len(out) - len(cut)] + add
    return out


def edit_vocabulary(pairs: Sequence[tuple[str, str]], min_count: int = 3) -> list[str]:
    """The tags the tagger chooses from: ``KEEP`` first, then every edit seen at least
    ``min_count`` times in the aligned ``pairs``, most frequent first."""
    from collections import Counter

    if not pairs:
        raise ValueError("no (folio, modern) pairs to learn edits from")
    counts = Counter(word_edit(o, n) for old, new in pairs for o, n in align_words(old, new) if n is not None)
    return [KEEP] + [e for e, c in counts.most_common() if c >= min_count and e != KEEP]


def _word_ids(tokenizer, line: str) -> tuple[list[int], list[int]]:
    """Token ids of ``line`` built word by word, and the position of each word's last token."""
    ids, last = [], []
    for i, word in enumerate(line.split()):
        ids += tokenizer(word if i == 0 else " " + word)["input_ids"]
        last.append(len(ids) - 1)
    return ids, last


def tagging_data(tokenizer, pairs: Sequence[tuple[str, str]], edits: Sequence[str], max_len: int = 48) -> list[dict]:
    """Examples ``{"input_ids", "attention_mask", "labels"}`` for the edit tagger: the Folio line's
    tokens, and at each word's **last** token the index of its edit in ``edits`` (-100 elsewhere,
    and on words whose edit is not in ``edits`` or that align with no single modern word)."""
    if not pairs:
        raise ValueError("no (folio, modern) pairs to make examples from")
    index = {e: i for i, e in enumerate(edits)}
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    out = []
    for old, new in pairs:
        ids, last = _word_ids(tokenizer, old)
        labels = [-100] * max_len
        for pos, (o, n) in zip(last, align_words(old, new)):
            if n is not None and pos < max_len:
                labels[pos] = index.get(word_edit(o, n), -100)
        ids = ids[:max_len]
        out.append({"input_ids": torch.tensor(ids + [pad] * (max_len - len(ids))),
                    "attention_mask": torch.tensor([1] * len(ids) + [0] * (max_len - len(ids))),
                    "labels": torch.tensor(labels)})
    return out


class EditTagger(nn.Module):
    """A transformer body (e.g. ``tiny``'s GPT-2 ``transformer``) and a linear head scoring every
    edit tag at every position (token classification)."""

    def __init__(self, body: nn.Module, n_edits: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, n_edits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state).float()


def tagging_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of the edit tags at the labelled positions (each word's last token)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100)


@torch.no_grad()
def modernise(model: nn.Module, tokenizer, edits: Sequence[str], lines: Sequence[str], max_len: int = 48,
              batch_size: int = 64) -> list[str]:
    """Each Folio line with the tagger's most likely edit applied to every word (words past
    ``max_len`` tokens are kept as they are). A tagger that answers ``KEEP`` everywhere copies."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(lines), batch_size):
        chunk = lines[i:i + batch_size]
        encoded = tagging_data(tokenizer, [(line, line) for line in chunk], edits, max_len)
        ids = torch.stack([e["input_ids"] for e in encoded]).to(device)
        mask = torch.stack([e["attention_mask"] for e in encoded]).to(device)
        best = model(ids, mask).argmax(-1).tolist()
        for line, tags in zip(chunk, best):
            _, last = _word_ids(tokenizer, line)
            out.append(" ".join(apply_edit(w, edits[tags[p]]) if p < max_len else w for w, p in zip(line.split(), last)))
    return out


def lookup_table(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The most frequent modern form of each Folio word in the aligned ``pairs`` (no context;
    a tie goes to the form seen first)."""
    from collections import Counter, defaultdict

    seen: dict[str, Counter] = defaultdict(Counter)
    for old, new in pairs:
        for o, n in align_words(old, new):
            if n is not None:
                seen[o][n] += 1
    return {word: forms.most_common(1)[0][0] for word, forms in seen.items()}


def modernise_by_lookup(table: dict[str, str], lines: Sequence[str]) -> list[str]:
    """Each line with every word replaced by its entry in ``table`` (kept if absent)."""
    return [" ".join(table.get(w, w) for w in line.split()) for line in lines]


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


def speaker_questions(plays: Sequence[str], n: int, k: int = 3, seed: int = 0, min_words: int = 4,
                      lines_per_speech: int = 1) -> list[dict]:
    """``n`` span-extraction examples: a passage of ``k`` consecutive speeches by at least two
    speakers (the first ``lines_per_speech`` lines of each, introduced by ``NAME:``), a line of one
    of them as the question, and as the answer the speaker's name where it stands in the passage
    (``answer_start`` is a character offset)."""
    if n < 1 or k < 2 or lines_per_speech < 1:
        raise ValueError(f"need n >= 1 questions, k >= 2 speeches and lines_per_speech >= 1; got {n}, {k}, {lines_per_speech}")
    rng = random.Random(seed)
    pool = [play for play in (speeches(p) for p in plays) if len(play) > k]
    if not pool:
        raise ValueError(f"no play among {list(plays)} has more than {k} speeches")
    out = []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        play = rng.choice(pool)
        i = rng.randrange(0, len(play) - k)
        window = play[i:i + k]
        if len({name for name, _ in window}) < 2:
            continue
        target = rng.randrange(k)
        candidates = [line for line in window[target][1][:lines_per_speech] if len(line.split()) >= min_words]
        if not candidates:
            continue
        context, start = "", 0
        for j, (name, lines) in enumerate(window):
            if j == target:
                start = len(context)
            context += f"{name}: {' '.join(lines[:lines_per_speech])}\n"
        out.append({"question": rng.choice(candidates), "context": context, "answer": window[target][0],
                    "answer_start": start})
    return out


def baseline_answers(examples: Sequence[dict], rule: str = "first") -> list[str]:
    """Answers that never read the question: the passage's ``"first"`` speaker, its ``"last"``, or
    the one with the ``"most"`` speeches in it (the earliest of a tie)."""
    out = []
    for ex in examples:
        names = [line.split(":")[0] for line in ex["context"].splitlines() if ":" in line]
        if not names:
            raise ValueError(f"no 'NAME:' speech in the passage {ex['context']!r}")
        if rule == "first":
            out.append(names[0])
        elif rule == "last":
            out.append(names[-1])
        elif rule == "most":
            out.append(max(names, key=lambda name: (names.count(name), -names.index(name))))
        else:
            raise ValueError(f"unknown baseline rule {rule!r}; choose 'first', 'last' or 'most'")
    return out


def span_data(tokenizer, examples: Sequence[dict], max_len: int = 128) -> tuple[list[dict], list[dict]]:
    """Encode ``question [SEP] passage`` and the answer's first and last token positions.
    Returns the encodings and the examples they encode: an example whose answer falls beyond
    ``max_len`` tokens is left out of both."""
    if not examples:
        raise ValueError("no questions to encode")
    out, kept = [], []
    for ex in examples:
        enc = tokenizer(ex["question"], ex["context"], truncation="only_second", max_length=max_len,
                        padding="max_length", return_offsets_mapping=True)
        first, last = ex["answer_start"], ex["answer_start"] + len(ex["answer"])
        seq = enc.sequence_ids()
        tokens = [t for t, ((a, b), s) in enumerate(zip(enc["offset_mapping"], seq)) if s == 1 and a < last and b > first]
        if not tokens:  # the answer was truncated away
            continue
        kept.append(ex)
        out.append({"input_ids": torch.tensor(enc["input_ids"]), "attention_mask": torch.tensor(enc["attention_mask"]),
                    "start": torch.tensor(tokens[0]), "end": torch.tensor(tokens[-1]),
                    "context_mask": torch.tensor([s == 1 for s in seq]),
                    "offsets": torch.tensor(enc["offset_mapping"])})
    return out, kept


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
def predict_spans(model: nn.Module, encoded: Sequence[dict], examples: Sequence[dict], max_tokens: int = 12,
                  batch_size: int = 64) -> list[str]:
    """The best passage span (start <= end < start + ``max_tokens``) of each example, as text."""
    if len(encoded) != len(examples):
        raise ValueError(f"{len(encoded)} encoded examples but {len(examples)} examples")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        start, end = model(torch.stack([e["input_ids"] for e in chunk]).to(device),
                           torch.stack([e["attention_mask"] for e in chunk]).to(device))
        mask = torch.stack([e["context_mask"] for e in chunk]).to(device)
        start, end = start.masked_fill(~mask, -1e9), end.masked_fill(~mask, -1e9)
        n = start.shape[1]
        allowed = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device)) & ~torch.triu(
            torch.ones(n, n, dtype=torch.bool, device=device), diagonal=max_tokens)
        scores = (start[:, :, None] + end[:, None, :]).masked_fill(~allowed, -1e18)
        for enc, ex, best in zip(chunk, examples[i:i + batch_size], scores.flatten(1).argmax(-1).tolist()):
            s, e = divmod(best, n)
            out.append(ex["context"][int(enc["offsets"][s][0]):int(enc["offsets"][e][1])])
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
