"""FETCH, part two: tokenizers side by side. The course's own :class:`~cyclelab.lab.tokenization.BPE` against the
``tokenizers`` trainer it reproduces, a unigram model, and the real models' tokenizers (``tiny``, ``smollm2``,
``minilm``): their tokens made visible, their counts per word and per language, and compression as merges grow."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cyclelab.lab.tokenization import BPE, DIVIDER, require_text, unicode_to_bytes, visible


def train_hf(
    text_or_iterable: str | Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
):
    """The reference: ``tokenizers``' ``ByteLevelBPETokenizer(add_prefix_space=False)`` trained the same way."""
    from tokenizers import ByteLevelBPETokenizer

    texts = [text_or_iterable] if isinstance(text_or_iterable, str) else list(text_or_iterable)
    hf = ByteLevelBPETokenizer(add_prefix_space=False)
    hf.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    return hf


def hf_merges(tokenizer) -> list[tuple[str, str]]:
    """The ordered merge list of a ``tokenizers``/``transformers`` BPE tokenizer."""
    import json

    backend = _backend(tokenizer)
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def same_as_hf(bpe: BPE, hf, texts: Sequence[str]) -> dict[str, bool]:
    """Compare our tokenizer with a Hugging Face one: merges, vocab, and the ids of ``texts``."""
    backend = _backend(hf)
    return {
        "merges": bpe.merges == hf_merges(hf),
        "vocab": bpe.vocab == backend.get_vocab(with_added_tokens=True),
        "ids": all(bpe.encode(t) == backend.encode(t).ids for t in texts),
    }


def train_unigram(text_or_iterable: str | Iterable[str], vocab_size: int, byte_fallback: bool = True):
    """A SentencePiece-style unigram tokenizer trained with ``tokenizers``.

    Unigram is SentencePiece's default model (T5, ALBERT); Llama 1/2 use SentencePiece's BPE
    model with the same text handling and byte fallback (:func:`_sentencepiece_style`).

    Spaces become ``▁`` and stay glued to the next word, as in SentencePiece; the unigram model
    keeps a log-probability per piece and cuts each word into the most probable sequence
    of pieces (Viterbi). With ``byte_fallback`` the 256 pieces ``<0x00>``…``<0xFF>`` are
    added (with a very low score), so a character the vocabulary lacks is spelt in its
    UTF-8 bytes instead of becoming ``<unk>``, as Llama 1/2's SentencePiece tokenizer does.
    """
    import json

    from tokenizers import Tokenizer, models, trainers

    texts = [text_or_iterable] if isinstance(text_or_iterable, str) else list(text_or_iterable)
    if not any(require_text(t, "each training text") for t in texts):
        raise ValueError("the training text is empty: give train_unigram some text to learn pieces from")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int of at least 2, got {vocab_size!r}")
    trained = _sentencepiece_style(Tokenizer(models.Unigram()))
    trained.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False
        ),
    )
    vocab = [tuple(v) for v in json.loads(trained.to_str())["model"]["vocab"]]
    if byte_fallback:
        vocab += [(f"<0x{b:02X}>", -100.0) for b in range(256)]
    return _sentencepiece_style(Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=byte_fallback)))


def _sentencepiece_style(tok):
    """Llama 1/2's text handling: a ``▁`` in front of the text and for every space, pieces cut before
    each ``▁``; decoding turns ``▁`` back into spaces, bytes ``<0xNN>`` into characters, and drops the first space."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def load_tokenizer(name: str):
    """Only the tokenizer of a course model (``"tiny"``, ``"smollm2"``, ``"minilm"``), without its weights."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from cyclelab.loading.loader import ModelFileError, quiet_transformers, resolve_name

    folder, repair = resolve_name(name)
    if isinstance(folder, Path) and not (folder / "tokenizer.json").is_file():
        raise ModelFileError(f"no tokenizer in {folder}. To repair: {repair}.")
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------- comparing tokenizers
def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` inside a ``transformers`` or ``ByteLevelBPETokenizer`` wrapper."""
    for attr in ("backend_tokenizer", "_tokenizer"):
        inner = getattr(tokenizer, attr, None)
        if inner is not None:
            return inner
    return tokenizer


def _is_byte_level(tokenizer) -> bool:
    if isinstance(tokenizer, BPE):
        return True
    decoder = getattr(_backend(tokenizer), "decoder", None)
    return "ByteLevel" in repr(decoder)


def raw_tokens(tokenizer, text: str) -> list[str]:
    """The token strings of ``text`` as the tokenizer stores them (``Ġ``, ``##``…), no special tokens added."""
    require_text(text)
    if isinstance(tokenizer, BPE):
        return tokenizer.tokens(text)
    if hasattr(tokenizer, "tokenize"):  # transformers
        return tokenizer.tokenize(text)
    return tokenizer.encode(text, add_special_tokens=False).tokens  # tokenizers


def piece_text(token: str, byte_level: bool = True, special: Sequence[str] = ()) -> str:
    """A token as readable text: byte characters turned back into text, spaces as ␣.

    A token holding only part of a character's UTF-8 bytes is shown as its byte values,
    e.g. ``\\xe4\\xbd``. Non-byte-level tokens (WordPiece ``##ing``) are shown as stored.
    """
    if not byte_level or token in special:
        return visible(token)
    table = unicode_to_bytes()
    if any(c not in table for c in token):
        return visible(token)
    raw = bytes(table[c] for c in token)
    try:
        return visible(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)


def pieces(tokenizer, text: str) -> list[str]:
    """The tokens of ``text`` as readable pieces (see :func:`piece_text`)."""
    byte_level = _is_byte_level(tokenizer)
    special = (
        tokenizer.special_tokens if isinstance(tokenizer, BPE) else tuple(getattr(tokenizer, "all_special_tokens", ()))
    )
    return [piece_text(t, byte_level, special) for t in raw_tokens(tokenizer, text)]


def show_tokens(tokenizer, text: str, raw: bool = False) -> str:
    """The tokens of ``text`` separated by ``│``, spaces shown as ``␣`` and newlines as ``↵``.

    Byte-level tokenizers store a space as ``Ġ`` (byte 32 is not printable, so GPT-2 maps
    it to U+0120, see :func:`bytes_to_unicode`); ``raw=True`` shows that stored form.

    >>> show_tokens(bpe, " to be")            # doctest: +SKIP
    '␣to│␣be'
    """
    parts = raw_tokens(tokenizer, text) if raw else pieces(tokenizer, text)
    return DIVIDER.join(parts)


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text``, without the special tokens a tokenizer may add ([CLS], BOS…)."""
    return len(raw_tokens(tokenizer, text))


def tokens_per_word(tokenizer, text: str, words: int | None = None) -> float:
    """Tokens per word: how many cycles a word costs. Words are whitespace-separated.

    For text written without spaces (Chinese, Japanese) pass ``words`` explicitly, e.g.
    the word count of an English translation, to measure the cost of the same meaning.
    """
    n_words = len(require_text(text).split()) if words is None else words
    if n_words <= 0:
        raise ValueError("the text has no words: give some text, or the number of words as words=")
    return count_tokens(tokenizer, text) / n_words


def compare_tokenizers(tokenizers: dict[str, object], sentences: Sequence[str]) -> list[dict]:
    """One row per sentence: its token count and readable pieces under each tokenizer.

    Row keys: ``"sentence"``, then for each name ``name`` (the count) and
    ``name + " tokens"`` (the pieces, see :func:`pieces`). Works for :class:`BPE` and
    ``transformers``/``tokenizers`` tokenizers alike.
    """
    if not tokenizers:
        raise ValueError("give at least one tokenizer, as a dict {name: tokenizer}")
    rows = []
    for sentence in sentences:
        row: dict = {"sentence": sentence}
        for name, tok in tokenizers.items():
            parts = pieces(tok, sentence)
            row[name] = len(parts)
            row[f"{name} tokens"] = parts
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, width: int = 40) -> str:
    """Rows of dicts as a fixed-width text table (cells cut to ``width`` characters)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(value) -> str:
        text = (
            DIVIDER.join(value)
            if isinstance(value, list)
            else (f"{value:.2f}" if isinstance(value, float) else str(value))
        )
        text = text.replace("\n", "↵")
        return text if len(text) <= width else text[: width - 1] + "…"

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[k]) for line in cells)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def compression_curve(bpe: BPE, text: str, steps: Sequence[int]) -> list[tuple[int, float]]:
    """Tokens per character of ``text`` after each number of merges in ``steps``."""
    if not text:
        raise ValueError("give a non-empty text to measure")
    return [(n, len(bpe.truncated(n).encode(text)) / len(text)) for n in steps]


def language_costs(
    tokenizers: dict[str, object], translations: dict[str, str], reference: str = "English"
) -> list[dict]:
    """Tokens per word of the same text in several languages, one row per language.

    Words are counted once, in the ``reference`` translation (whitespace-separated), so
    every language is charged for the same meaning: Chinese and Japanese, written without
    spaces, are measured fairly. Row keys: ``"language"``, then one per tokenizer.
    """
    if reference not in translations:
        raise ValueError(f"the reference language {reference!r} is not among {list(translations)}")
    words = len(translations[reference].split())
    return [
        {"language": lang, **{name: tokens_per_word(tok, text, words=words) for name, tok in tokenizers.items()}}
        for lang, text in translations.items()
    ]


def plot_language_costs(
    rows: Sequence[dict], ax=None, title: str = "The same meaning costs more cycles in some languages"
):
    """Grouped bars of :func:`language_costs`: tokens per (English) word, per language and tokenizer."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.4))
    names = [k for k in rows[0] if k != "language"]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[name] for r in rows], width=width, label=name)
    ax.set_xticks(range(len(rows)), [r["language"] for r in rows])
    ax.set(ylabel="tokens per English word", title=title)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return ax


def plot_compression(curve: Sequence[tuple[int, float]], references: dict[str, float] | None = None, ax=None):
    """Tokens per character against the number of merges (from :func:`compression_curve`).

    ``references`` adds horizontal lines, e.g. the rate of a full-size tokenizer.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([n for n, _ in curve], [r for _, r in curve], marker="o", label="our BPE, truncated")
    for k, (name, rate) in enumerate((references or {}).items()):
        ax.axhline(rate, ls="--", lw=1, color=f"C{k + 1}", label=name)
    ax.set(
        xlabel="merges learned",
        ylabel="tokens per character",
        title="Each merge saves cycles: tokens per character of a held-out passage",
    )
    ax.set_ylim(0, None)
    ax.legend(fontsize=8)
    return ax
