"""The from-scratch byte-level BPE equals Hugging Face's trainer; its helpers behave."""

import random

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from cyclelab.lab.tokenization import (
    BPE,
    GPT2_PATTERN_PARTS,
    bytes_to_unicode,
    explain_pretokens,
    pretokenize,
    to_byte_chars,
    visible,
)
from cyclelab.lab.tokenizer_compare import (
    compare_tokenizers,
    compression_curve,
    count_tokens,
    format_table,
    hf_merges,
    language_costs,
    load_tokenizer,
    piece_text,
    pieces,
    plot_compression,
    plot_language_costs,
    same_as_hf,
    show_tokens,
    tokens_per_word,
    train_hf,
    train_unigram,
)
from cyclelab.loading import corpus as data

EOS = "<|endoftext|>"
MIXED = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "  leading spaces,\ttabs\n\nand blank lines   \n",
    "Numbers: 3.14159, 1,000,000 and 2024-11-23; phone +44 20 7946 0958.",
    "Naïve café déjà vu — Straße, Ærøskøbing, São Paulo, Łódź.",
    "Chinese 你好，世界！ Japanese こんにちは世界。 Hindi नमस्ते दुनिया।",
    "Emoji 🙂👍🏽 🇫🇷 family 👨‍👩‍👧 and e\u0301 (combining accent).",
    "I'll, you're, we've, she's, they'd, I'm — contractions'S 'LL.",
    f"special {EOS} inside text{EOS}",
]


@pytest.fixture(scope="module")
def shakespeare():
    return data.corpus("train")[:120_000]


@pytest.fixture(scope="module")
def held_out():
    return data.corpus("valid")[:30_000]


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return BPE.train(shakespeare, 400)


def multilingual_corpus() -> list[str]:
    rng = random.Random(7)
    words = [
        "der",
        "die",
        "das",
        "und",
        "chat",
        "chien",
        "maison",
        "été",
        "über",
        "straße",
        "naïve",
        "数据",
        "模型",
        "こんにちは",
        "नमस्ते",
        "123",
        "4567",
        "🙂",
        "the",
        "then",
        "there",
        "'s",
        "'ll",
    ]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + rng.choice([".", "!", "?\n"])
        for _ in range(400)
    ]


# ---------------------------------------------------------------- bytes and pre-tokens
def test_bytes_to_unicode_is_gpt2s_printable_map():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert sorted(table.values()) == sorted(ByteLevel.alphabet())
    assert all(c.isprintable() and not c.isspace() for c in table.values())


@pytest.mark.parametrize("text", MIXED)
def test_pretokenize_matches_tokenizers_byte_level(text):
    reference = [piece for piece, _ in ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)]
    assert pretokenize(text) == reference
    assert "".join(pretokenize(text, byte_level=False)) == text


@pytest.mark.parametrize("text", MIXED)
def test_explaining_the_pattern_part_by_part_cuts_like_tokenizers(text):
    """The parts replayed one by one (``regex``) cut exactly as the whole pattern in ``tokenizers``' engine."""
    explained = explain_pretokens(text)
    assert [piece for piece, _ in explained] == pretokenize(text, byte_level=False)
    assert {part for _, part in explained} <= {part for part, _ in GPT2_PATTERN_PARTS}


def test_each_part_of_the_pattern_by_hand():
    parts = [part for part, _ in GPT2_PATTERN_PARTS]
    assert explain_pretokens("I'll pay 1,000!\n\n  Go") == [
        ("I", parts[1]),
        ("'ll", parts[0]),
        (" pay", parts[1]),
        (" 1", parts[2]),
        (",", parts[3]),
        ("000", parts[2]),
        ("!", parts[3]),
        ("\n\n ", parts[4]),
        (" Go", parts[1]),
    ]
    assert explain_pretokens("a\nb  ") == [("a", parts[1]), ("\n", parts[5]), ("b", parts[1]), ("  ", parts[4])]


def test_pretokenize_keeps_the_space_with_the_next_word():
    assert pretokenize("ROMEO: I'll go.", byte_level=False) == ["ROMEO", ":", " I", "'ll", " go", "."]
    assert pretokenize("a  b", byte_level=False) == ["a", " ", " b"]


# ---------------------------------------------------------------- the same split for all of Unicode
RECENT_SCRIPTS = {"U+1E6C0-U+1E6FF": range(0x1E6C0, 0x1E700), "U+323B0-U+33479": range(0x323B0, 0x3347A)}


def byte_level_split(text: str) -> list[str]:
    """The reference: the pre-tokenizer inside Hugging Face's byte-level BPE."""
    return [piece for piece, _ in ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)]


def probes(chars) -> str:
    """One probe per character c: "a c 1 c ! c". c joins the letter a, the number 1, the symbol !
    or none of them (whitespace), so the probe splits differently for each class of the pattern."""
    return "".join(f"a{c}1{c}!{c}" for c in chars)


def test_every_code_point_splits_like_tokenizers():
    # In code-point order each piece is a run of one class (letters, numbers, whitespace,
    # other): equal pieces mean the class changes at the same code points. A run of letters
    # could still pass for a run of numbers, so one probe per run then checks its class.
    every = "".join(map(chr, [*range(0xD800), *range(0xE000, 0x110000)]))  # all but the surrogates
    runs = pretokenize(every, byte_level=False)
    assert "".join(runs) == every
    assert [to_byte_chars(run) for run in runs] == byte_level_split(every)
    text = probes(run[-1] for run in runs)
    assert pretokenize(text) == byte_level_split(text)


@pytest.mark.parametrize("block", RECENT_SCRIPTS.values(), ids=RECENT_SCRIPTS.keys())
def test_recent_scripts_split_and_train_like_tokenizers(block):
    chars = [chr(cp) for cp in block]
    text = probes(chars)
    assert pretokenize(text) == byte_level_split(text)
    corpus = [f"a{c}b {c}1 {c}{c}! the" for c in chars] * 2
    ours, hf = BPE.train(corpus, 300), train_hf(corpus, 300)
    assert same_as_hf(ours, hf, corpus[:50] + [text]) == {"merges": True, "vocab": True, "ids": True}


# ---------------------------------------------------------------- equality with Hugging Face
def test_shakespeare_merges_vocab_and_ids_equal_huggingface(shakespeare, held_out, bpe):
    hf = train_hf(shakespeare, 400)
    assert bpe.merges == hf_merges(hf)
    assert bpe.vocab == hf.get_vocab()
    assert bpe.encode(held_out) == hf.encode(held_out).ids
    assert same_as_hf(bpe, hf, MIXED) == {"merges": True, "vocab": True, "ids": True}


def test_multilingual_iterable_two_specials_equal_huggingface():
    corpus = multilingual_corpus()
    specials = ("<pad>", EOS)
    ours = BPE.train(corpus, 330, min_frequency=1, special_tokens=specials)
    hf = train_hf(corpus, 330, min_frequency=1, special_tokens=specials)
    assert ours.vocab["<pad>"] == 0 and ours.vocab[EOS] == 1
    assert same_as_hf(ours, hf, MIXED + corpus[:20]) == {"merges": True, "vocab": True, "ids": True}


def test_min_frequency_stops_training_like_huggingface():
    text = "abab cdcd abab efef xyxy abab " * 3 + "qrs"
    for min_frequency in (0, 3, 4, 10):
        ours = BPE.train(text, 300, min_frequency=min_frequency)
        hf = train_hf(text, 300, min_frequency=min_frequency)
        assert ours.merges == hf_merges(hf) and ours.vocab == hf.get_vocab()
        assert all(step.count >= min_frequency for step in ours.history)


def test_tie_breaking_on_many_small_random_corpora():
    rng = random.Random(3)
    for _ in range(25):
        alphabet = rng.choice(["ab", "abc", "aab c", "xy é🙂", "a b\n"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(rng.randint(1, 6))]
        vocab_size, min_frequency = rng.randint(260, 320), rng.randint(0, 2)
        ours = BPE.train(texts, vocab_size, min_frequency=min_frequency)
        hf = train_hf(texts, vocab_size, min_frequency=min_frequency)
        assert same_as_hf(ours, hf, texts) == {"merges": True, "vocab": True, "ids": True}, texts


@pytest.mark.slow  # the whole training split: half a minute; chapter 01 and the tests above train on slices
def test_full_corpus_reproduces_the_tiny_tokenizer():
    tiny = load_tokenizer("tiny")
    ours = BPE.train(data.corpus("train"), len(tiny))
    assert same_as_hf(ours, tiny, [data.corpus("valid")[:50_000]]) == {"merges": True, "vocab": True, "ids": True}


def test_on_merge_sees_every_merge_in_order(shakespeare):
    seen = []
    trained = BPE.train(shakespeare[:20_000], 280, on_merge=seen.append)
    assert [(s.left, s.right) for s in seen] == trained.merges == [(s.left, s.right) for s in trained.history]
    assert [s.rank for s in seen] == list(range(len(seen)))
    assert all(trained.vocab[s.token] == s.id for s in seen)
    counts = [s.count for s in seen]
    assert counts == sorted(counts, reverse=True)  # a merged pair never beats the pair merged before it
    assert seen[0].row() == {
        "rank": 0,
        "left": visible(seen[0].left, True),
        "right": visible(seen[0].right, True),
        "token": visible(seen[0].token, True),
        "id": 257,
        "count": counts[0],
    }


def test_vocab_ids_specials_then_alphabet_then_merges(bpe):
    ids = sorted(bpe.vocab.values())
    assert ids == list(range(len(bpe.vocab))) and len(bpe) == 400
    assert bpe.vocab[EOS] == 0
    assert [bpe.id_to_token[i] for i in range(1, 257)] == sorted(bytes_to_unicode().values())
    assert bpe.id_to_token[257] == "".join(bpe.merges[0])


def test_a_merge_list_rebuilds_the_same_tokenizer(bpe, held_out):
    rebuilt = BPE(bpe.merges)
    assert rebuilt.vocab == bpe.vocab and rebuilt.encode(held_out) == bpe.encode(held_out)


# ---------------------------------------------------------------- encode, decode
ROUND_TRIP = MIXED + [
    "",
    " ",
    "\n\n\n",
    "🙂",
    "é",
    "中文字符",
    "日本語のテキスト",
    "ñ" * 50,
    "x" * 500,
    "\x00\x01\x7f",
    "\u200b\ufeff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Ａ全角",
    "ﷺ",
    "a\r\nb",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_explicit(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_round_trip_random_code_points(bpe):
    rng = random.Random(0)
    for _ in range(300):
        chars = [chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 30))]
        text = "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)  # no lone surrogates
        assert bpe.decode(bpe.encode(text)) == text


def test_tokens_and_ids_agree(bpe):
    text = "JULIET: Wherefore art thou?"
    assert [bpe.vocab[t] for t in bpe.tokens(text)] == bpe.encode(text)
    assert "".join(bpe.tokens(text)) == "".join(pretokenize(text))


def test_special_tokens_in_text_map_to_their_id(bpe, shakespeare):
    hf = train_hf(shakespeare, 400)
    text = f"the end{EOS}THE START"
    assert bpe.encode(text) == hf.encode(text).ids and 0 in bpe.encode(text)
    assert bpe.decode(bpe.encode(text)) == text


def test_a_cut_character_decodes_to_the_replacement_mark(bpe):
    ids = bpe.encode("你")
    assert len(ids) == 3 and bpe.decode(ids[:2]) == "�"


def test_truncated_and_compression(bpe, held_out):
    assert bpe.truncated(0).encode("abc") == [bpe.vocab["a"], bpe.vocab["b"], bpe.vocab["c"]]
    assert len(bpe.truncated(0).encode(held_out)) == len(held_out.encode("utf-8"))
    curve = compression_curve(bpe, held_out[:3000], [0, 50, 143])
    rates = [r for _, r in curve]
    assert rates[0] == pytest.approx(len(held_out[:3000].encode()) / 3000)
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.7


# ---------------------------------------------------------------- bad input
def test_bad_training_input(shakespeare):
    with pytest.raises(ValueError, match="empty"):
        BPE.train("", 300)
    with pytest.raises(ValueError, match="empty"):
        BPE.train(["", ""], 300)
    with pytest.raises(ValueError, match="above 257"):
        BPE.train(shakespeare, 257)
    with pytest.raises(ValueError, match="above 256"):
        BPE.train(shakespeare, 256, special_tokens=())
    with pytest.raises(ValueError, match="str"):
        BPE.train(b"bytes are not text", 300)
    with pytest.raises(ValueError, match="str"):
        BPE.train(["ok", 3], 300)
    with pytest.raises(ValueError, match="min_frequency"):
        BPE.train(shakespeare, 300, min_frequency=-1)
    with pytest.raises(ValueError, match="str"):
        BPE.train(12, 300)


def test_bad_encode_and_decode_input(bpe):
    with pytest.raises(ValueError, match="must be a str"):
        bpe.encode(b"bytes")
    with pytest.raises(ValueError, match="must be a str"):
        bpe.tokens(None)
    with pytest.raises(ValueError, match="unknown token id 400"):
        bpe.decode([1, 400])
    with pytest.raises(ValueError, match="unknown token id -1"):
        bpe.decode([-1])
    with pytest.raises(ValueError, match="unknown token id 'a'"):
        bpe.decode(["a"])
    with pytest.raises(ValueError, match="n_merges"):
        bpe.truncated(10_000)


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def minilm_tok():
    return load_tokenizer("minilm")


def test_show_tokens_makes_spaces_and_pieces_visible(bpe):
    assert show_tokens(bpe, " the") == "␣the"
    shown = show_tokens(bpe, "ROMEO: to be\n")
    assert "│" in shown and "␣" in shown and "↵" in shown and " " not in shown
    assert show_tokens(bpe, " the", raw=True) == "Ġthe"
    assert "".join(show_tokens(bpe, "to be or not").split("│")).replace("␣", " ") == "to be or not"


def test_piece_text_for_bytes_and_wordpiece():
    table = bytes_to_unicode()
    first_two = "".join(table[b] for b in "你".encode()[:2])
    assert piece_text(first_two) == "\\xe4\\xbd"
    assert piece_text("Ġking") == "␣king" and piece_text("Ċ") == "↵"
    assert piece_text("##ing", byte_level=False) == "##ing"
    assert visible("a b\n") == "a␣b↵" and visible("aĠb", byte_chars=True) == "a␣b"


def test_compare_tokenizers_works_for_ours_and_huggingface(bpe, minilm_tok):
    rows = compare_tokenizers({"ours": bpe, "minilm": minilm_tok}, ["unbelievable", "Hello World"])
    assert [r["sentence"] for r in rows] == ["unbelievable", "Hello World"]
    assert rows[0]["ours"] == len(bpe.encode("unbelievable")) == len(rows[0]["ours tokens"])
    assert rows[1]["minilm tokens"] == ["hello", "world"]  # WordPiece lowercases, adds no [CLS] here
    assert rows[0]["minilm tokens"] == minilm_tok.tokenize("unbelievable") and rows[0]["minilm"] == 1  # a whole word
    table = format_table(rows, ["sentence", "ours", "minilm"])
    assert table.splitlines()[0].split() == ["sentence", "ours", "minilm"] and len(table.splitlines()) == 4
    with pytest.raises(ValueError):
        compare_tokenizers({}, ["x"])


def test_tokens_per_word(bpe, minilm_tok):
    assert tokens_per_word(bpe, " the the the") == pytest.approx(1.0)
    assert tokens_per_word(bpe, "你好", words=2) == pytest.approx(len(bpe.encode("你好")) / 2)
    assert count_tokens(minilm_tok, "hello world") == 2
    assert tokens_per_word(minilm_tok, "hello world") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no words"):
        tokens_per_word(bpe, "   ")


def test_pieces_of_a_llama_family_tokenizer():
    smol = load_tokenizer("smollm2")
    assert pieces(smol, "Hello world") == ["Hello", "␣world"]
    assert "".join(pieces(smol, "naïve café")).replace("␣", " ") == "naïve café"


def test_language_costs_and_plots(bpe):
    import matplotlib

    matplotlib.use("Agg")
    translations = {"English": "the cat sleeps", "Chinese": "猫在睡觉"}
    rows = language_costs({"ours": bpe}, translations)
    assert rows[0] == {"language": "English", "ours": pytest.approx(len(bpe.encode("the cat sleeps")) / 3)}
    assert rows[1]["ours"] == pytest.approx(len(bpe.encode("猫在睡觉")) / 3)
    with pytest.raises(ValueError, match="reference"):
        language_costs({"ours": bpe}, {"French": "le chat"})
    assert plot_language_costs(rows).get_ylabel() == "tokens per English word"
    ax = plot_compression([(0, 1.0), (10, 0.8)], references={"tiny": 0.3})
    assert len(ax.lines) == 2


@pytest.mark.parametrize("text", ["\ud800", "ROMEO:\udfff", "a\udc80b"])
def test_a_lone_surrogate_is_a_clear_error(text):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D[89A-F][0-9A-F]{2} at position \d+"):
        pretokenize(text)


# ---------------------------------------------------------------- unigram, SentencePiece-style
@pytest.fixture(scope="module")
def unigram(shakespeare):
    return train_unigram(shakespeare[:30_000], 300)


def test_unigram_byte_fallback_spells_unknown_characters_in_their_utf8_bytes(unigram):
    assert unigram.encode("🙂").tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # "🙂".encode() by hand
    for text in ROUND_TRIP:
        assert unigram.decode(unigram.encode(text).ids) == text
    assert "<unk>" not in unigram.encode("naïve 你好 🙂").tokens


def test_unigram_picks_the_most_probable_segmentation(unigram):
    """Viterbi against brute force: every way to cut a word into known pieces, scored by summed log-probability."""
    import itertools
    import json

    scores = {piece: score for piece, score in json.loads(unigram.to_str())["model"]["vocab"]}
    for word in ["▁thou", "▁mother", "▁lords", "▁brother"]:
        best = max(
            (
                cuts
                for n in range(len(word))
                for cuts in itertools.combinations(range(1, len(word)), n)
                if all(word[a:b] in scores for a, b in zip((0, *cuts), (*cuts, len(word))))
            ),
            key=lambda cuts: sum(scores[word[a:b]] for a, b in zip((0, *cuts), (*cuts, len(word)))),
        )
        want = [word[a:b] for a, b in zip((0, *best), (*best, len(word)))]
        assert unigram.encode(word[1:]).tokens == want


def test_unigram_without_byte_fallback_meets_unknown_characters(shakespeare):
    plain = train_unigram(shakespeare[:30_000], 300, byte_fallback=False)
    assert plain.decode(plain.encode("a 🙂").ids) != "a 🙂"


@pytest.mark.parametrize(
    "text, size, message",
    [
        ("", 100, "empty"),
        (["", ""], 100, "empty"),
        (b"bytes", 100, "must be a str"),
        ("text", 1, "vocab_size"),
        ("text", "100", "vocab_size"),
    ],
    ids=["empty text", "empty list", "bytes", "vocab too small", "vocab not an int"],
)
def test_unigram_bad_input(text, size, message):
    with pytest.raises(ValueError, match=message):
        train_unigram(text, size)
