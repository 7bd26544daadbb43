"""Task 4 of chapter 06, text to text: First Folio spelling to modern spelling, scored with BLEU.

Done as *edit tagging* (like LaserTagger and GECToR): each Folio word gets a tag, ``KEEP`` or an
edit learned from the aligned training pairs (:func:`folio_pairs`, :func:`align_words`,
:func:`word_edit`, :func:`edit_vocabulary`); ``tiny`` plus a linear head tags every word
(:func:`tagging_data`, :class:`EditTagger`, :func:`tagging_loss`) and :func:`modernise` applies
the tags. The baselines: copying the input, and a context-free lookup table (:func:`lookup_table`).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.loading import corpus as data
from cyclelab.train.tasks import stack_batch, unpadded


def _spelling_key(line: str) -> str:
    return re.sub(r"[^a-z ]", "", line.lower().replace("v", "u").replace("j", "i"))


def folio_pairs(play: str, min_ratio: float = 0.85, look_ahead: int = 40) -> list[tuple[str, str]]:
    """``(folio, modern)`` line pairs of ``play`` that differ, aligned simply: walking through the
    Folio's lines in order, each is paired with the most similar of the next ``look_ahead`` modern
    lines (difflib ratio of lowercased letters, u/v and i/j merged) if that ratio is ``min_ratio``
    or more. Lines cut differently in the two editions are skipped, not split."""
    folio = data.spoken_lines(data.read_work(play, folio=True), folio=True)
    modern = data.spoken_lines(data.normalize_speakers(data.read_work(play)), folio=False)
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
        out = out[: len(out) - len(cut)] + add
    return out


def edit_vocabulary(pairs: Sequence[tuple[str, str]], min_count: int = 3) -> list[str]:
    """The tags the tagger chooses from: ``KEEP`` first, then every edit seen at least
    ``min_count`` times in the aligned ``pairs``, most frequent first."""
    if not pairs:
        raise ValueError("no (folio, modern) pairs to learn edits from")
    counts = Counter(word_edit(o, n) for old, new in pairs for o, n in align_words(old, new) if n is not None)
    return [KEEP] + [e for e, c in counts.most_common() if c >= min_count and e != KEEP]


def _word_ids(tokenizer, line: str) -> tuple[list[int], list[int]]:
    """Token ids of ``line`` built word by word, and the position of each word's last token."""
    words = line.split()
    ids, last = [], []
    for word_ids in tokenizer(words[:1] + [" " + w for w in words[1:]])["input_ids"] if words else []:
        ids += word_ids
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
        out.append(
            {
                "input_ids": torch.tensor(ids + [pad] * (max_len - len(ids))),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * (max_len - len(ids))),
                "labels": torch.tensor(labels),
            }
        )
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
    mask, ids, labels = unpadded(batch["attention_mask"], batch["input_ids"], batch["labels"])
    logits = model(ids, mask)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def modernise(
    model: nn.Module, tokenizer, edits: Sequence[str], lines: Sequence[str], max_len: int = 48, batch_size: int = 64
) -> list[str]:
    """Each Folio line with the tagger's most likely edit applied to every word (words past
    ``max_len`` tokens are kept as they are). A tagger that answers ``KEEP`` everywhere copies."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(lines), batch_size):
        chunk = lines[i : i + batch_size]
        encoded = tagging_data(tokenizer, [(line, line) for line in chunk], edits, max_len)
        ids, mask = stack_batch(encoded, device)
        mask, ids = unpadded(mask, ids)
        best = model(ids, mask).argmax(-1).tolist()
        for line, tags in zip(chunk, best):
            _, last = _word_ids(tokenizer, line)
            out.append(
                " ".join(apply_edit(w, edits[tags[p]]) if p < max_len else w for w, p in zip(line.split(), last))
            )
    return out


def lookup_table(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The most frequent modern form of each Folio word in the aligned ``pairs`` (no context;
    a tie goes to the form seen first)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for old, new in pairs:
        for o, n in align_words(old, new):
            if n is not None:
                seen[o][n] += 1
    return {word: forms.most_common(1)[0][0] for word, forms in seen.items()}


def modernise_by_lookup(table: dict[str, str], lines: Sequence[str]) -> list[str]:
    """Each line with every word replaced by its entry in ``table`` (kept if absent)."""
    return [" ".join(table.get(w, w) for w in line.split()) for line in lines]
