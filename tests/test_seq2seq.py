"""The encoder–decoder engine against ``transformers``: logits, greedy and beam search, caches, activations, errors.

Float bound: the engine and ``transformers`` compute the same float32 products and sums, in other orders
(own kernels for decode rows, ``q @ k.T / sqrt(d)`` against ``(q @ k.T) * d**-0.5``). Each dot product of
length k <= 512 rounds by at most k * eps32 of its absolute sum; through 2 + 2 post-LayerNorm layers
(each norm brings the stream back to O(1)) that is a few 1e-6 on logits of size ~10. We assert 1e-4,
an order of magnitude above that and far below the gap between rival tokens that greedy search sees.
"""

from __future__ import annotations

import pytest
import torch

from cyclelab import load
from cyclelab.core.engine import Engine
from cyclelab.core.seq2seq import ENCODER_OPS, activation_names, seq2seq_architecture_for
from cyclelab.core.seq2seq_engine import Seq2SeqEngine
from cyclelab.loading.loader import Loaded

BOUND = 1e-4  # see the module docstring
BEAMS = [(2, 1.0), (4, 0.6), (3, -1.0), (5, 2.0)]  # (num_beams, length_penalty)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer ``<pad> </s> <unk> w3 w4 ...`` for the random model (ids are what tests feed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def random_marian() -> Loaded:
    """A random Marian of 2 encoder and 3 decoder layers, unequal head counts, swish MLPs, weights wide
    enough (std 0.3) that the outputs vary by position, and a final logits bias that makes EOS likely."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=60,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=40,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
        scale_embedding=True,
        activation_function="swish",
        init_std=0.3,
        attn_implementation="eager",
    )
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.1)
        model.final_logits_bias[0, 1] += 1.5
    return Loaded("random-marian", model, word_tokenizer(60), "test")


@pytest.fixture(scope="module")
def folio() -> Loaded:
    return load("folio-mt")


@pytest.fixture(scope="module")
def folio_lines() -> list[str]:
    import json

    from cyclelab.loading.paths import REPO_DATA

    rows = (REPO_DATA / "folio-mt" / "test.jsonl").read_text().splitlines()[:4]
    return [json.loads(r)["folio"] for r in rows]


RANDOM_SOURCES = [[5, 9, 12, 33, 7, 1], [40, 41, 3, 1], [7] * 10 + [1], [22, 1]]


def hf_generate(loaded: Loaded, ids: list[int], n: int, **options) -> list[int]:
    """``transformers``' own generate, the start token dropped."""
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, **options)
    return out[0].tolist()[1:]


def check_logits(loaded: Loaded, source: list[int], target: list[int]) -> None:
    with torch.no_grad():
        want = loaded.model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([target])).logits
    got = Seq2SeqEngine(loaded).logits(source, target)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < BOUND


@pytest.mark.parametrize("source", RANDOM_SOURCES[:2])
def test_logits_match_transformers_random(random_marian, own_kernels, source):
    check_logits(random_marian, source, [0, 4, 8, 22, 3, 17])


def test_logits_match_transformers_folio_mt(folio, folio_lines, own_kernels):
    engine = Seq2SeqEngine(folio)
    for line in folio_lines:
        source = engine.encode(line)
        target = [0] + folio.tokenizer(line)["input_ids"][:-1]  # any decoder ids will do: here the source's own
        check_logits(folio, source, target)


@pytest.mark.parametrize("which", ["random", "folio-mt"])
def test_greedy_same_with_and_without_caches_and_as_generate(which, request):
    loaded = request.getfixturevalue("random_marian" if which == "random" else "folio")
    engine = Seq2SeqEngine(loaded)
    lines = [] if which == "random" else request.getfixturevalue("folio_lines")
    sources = RANDOM_SOURCES if which == "random" else [engine.encode(line) for line in lines]
    for source in sources:
        cached = engine.generate(source, 20).token_ids
        assert engine.generate(source, 20, use_cache=False).token_ids == cached
        assert cached == hf_generate(loaded, source, 20, num_beams=1)


@pytest.mark.parametrize("num_beams,length_penalty", BEAMS)
def test_beam_search_matches_generate_random(random_marian, num_beams, length_penalty):
    engine = Seq2SeqEngine(random_marian)
    for source in RANDOM_SOURCES:
        got = engine.beam_search(source, num_beams, length_penalty, 12).token_ids
        assert got == hf_generate(random_marian, source, 12, num_beams=num_beams, length_penalty=length_penalty)


@pytest.mark.parametrize("num_beams,length_penalty", BEAMS[:3])
def test_beam_search_matches_generate_folio_mt(folio, folio_lines, num_beams, length_penalty):
    engine = Seq2SeqEngine(folio)
    for line in folio_lines:
        source = engine.encode(line)
        got = engine.beam_search(source, num_beams, length_penalty, 30)
        assert got.token_ids == hf_generate(folio, source, 30, num_beams=num_beams, length_penalty=length_penalty)
        assert got.steps and got.steps[-1].finished[0][0] == got.token_ids  # the last step's best finished one


def test_encoder_runs_once_with_caches_and_every_cycle_without(random_marian):
    engine = Seq2SeqEngine(random_marian)
    for use_cache, expected in ((True, 1), (False, 6)):
        trace = engine.generate([7] * 10 + [1], 6, use_cache=use_cache, keep_events=True, stop_at_eos=False)
        embeds = [e.cycle for e in trace.events if e.op == "enc_embed"]
        assert len(embeds) == expected and embeds == sorted(set(embeds))
        reads = [e for e in trace.events if e.op == "cross_read"]
        assert len(reads) == 6 * engine.arch.n_layers  # every cycle, every decoder layer reads the encoder memory
        assert {e.op for e in trace.events} >= ENCODER_OPS
    assert engine.memory is not None and len(engine.memory) == 11
    assert engine.memory.nbytes() == 2 * 3 * 11 * 32 * 4  # keys and values, 3 layers, 11 positions, width 32, float32


def test_run_with_cache_matches_transformers_attentions(random_marian):
    source, target = RANDOM_SOURCES[0], [0, 4, 8, 22]
    engine = Seq2SeqEngine(random_marian)
    _, acts = engine.run_with_cache(source, target)
    with torch.no_grad():
        out = random_marian.model(
            input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([target]), output_attentions=True
        )
    for layer in range(2):
        assert torch.allclose(
            acts[f"encoder.blocks.{layer}.attn.hook_pattern"], out.encoder_attentions[layer], atol=1e-5
        )
    for layer in range(3):
        assert torch.allclose(
            acts[f"decoder.blocks.{layer}.attn.hook_pattern"], out.decoder_attentions[layer], atol=1e-5
        )
        cross = acts[f"decoder.blocks.{layer}.cross_attn.hook_pattern"]
        assert torch.allclose(cross, out.cross_attentions[layer], atol=1e-5)
        attn = random_marian.model.model.decoder.layers[layer].encoder_attn
        keys = attn.k_proj(out.encoder_last_hidden_state).view(1, len(source), 2, 16).transpose(1, 2)
        assert torch.allclose(acts[f"encoder_memory.{layer}.keys"], keys, atol=1e-5)
        assert acts[f"decoder.blocks.{layer}.kv_cache.keys"].shape == (1, 2, len(target), 16)
    assert set(acts) == set(activation_names(2, 3))


def test_run_with_cache_names_are_checked(random_marian):
    engine = Seq2SeqEngine(random_marian)
    _, acts = engine.run_with_cache([5, 1], names=["encoder_memory.1.values"])
    assert list(acts) == ["encoder_memory.1.values"]
    with pytest.raises(ValueError, match="unknown activation name"):
        engine.run_with_cache([5, 1], names=["blocks.0.attn.hook_pattern"])
    with pytest.raises(TypeError, match="names must be"):
        engine.run_with_cache([5, 1], names="encoder.hook_embed")


def test_replay_forces_the_same_tokens(random_marian):
    engine = Seq2SeqEngine(random_marian)
    trace = engine.generate(RANDOM_SOURCES[1], 8)
    again = engine.replay(trace, capture={"cross_softmax"})
    assert again.token_ids == trace.token_ids and all(r.forced for r in again.records)
    assert any(e.op == "cross_softmax" and "probs" in e.tensors for e in again.events)


def test_unsupported_families_get_clear_errors(tiny):
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(
        BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    )  # fmt: skip
    with pytest.raises(ValueError, match="supports the Marian .* family only; got BartForConditionalGeneration"):
        seq2seq_architecture_for(bart)
    with pytest.raises(ValueError, match="not an encoder-decoder model: run it with cyclelab.Engine"):
        Seq2SeqEngine(tiny)
    with pytest.raises(TypeError, match="Seq2SeqEngine needs a model"):
        Seq2SeqEngine(3)  # type: ignore[arg-type]


def test_decoder_only_engine_refuses_folio_mt(folio):
    with pytest.raises(ValueError, match="causal language models"):
        Engine(folio)


def test_bad_input(random_marian):
    engine = Seq2SeqEngine(random_marian)
    with pytest.raises(ValueError, match="source is empty"):
        engine.generate("   ", 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([5, 99], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        engine.generate([5, 1], 0)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        engine.beam_search([5, 1], 0)
    with pytest.raises(TypeError, match="length_penalty must be a number"):
        engine.beam_search([5, 1], 2, "long")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length_penalty must be finite"):
        engine.beam_search([5, 1], 2, float("nan"))
    with pytest.raises(ValueError, match="exceed 64 positions"):
        engine.generate([5, 1], 64)
    with pytest.raises(ValueError, match="unknown encoder-decoder op"):
        engine.generate([5, 1], 2, capture={"rope"})
    with pytest.raises(TypeError, match="capture must be"):
        engine.generate([5, 1], 2, capture=iter(["embed"]))
    with pytest.raises(ValueError, match="decoder_ids must hold"):
        engine.logits([5, 1], [])
    with pytest.raises(ValueError, match="Seq2SeqEngine"):
        engine.replay(Engine(load("tiny")).generate("A", 2))


def test_the_cards_test_scores_reproduce_with_the_engine(folio):
    """The card's greedy BLEU and chrF on the 200 held-out pairs, recomputed with the engine and sacrebleu."""
    import json

    import sacrebleu

    from cyclelab.loading.paths import REPO_DATA

    folder = REPO_DATA / "folio-mt"
    pairs = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    engine = Seq2SeqEngine(folio)
    hyps = [engine.translate(p["folio"], max_new_tokens=48) for p in pairs]
    refs = [[p["modern"] for p in pairs]]
    card = json.loads((folder / "metrics.json").read_text())["test"]
    assert round(sacrebleu.corpus_bleu(hyps, refs).score, 2) == card["bleu"]
    assert round(sacrebleu.corpus_chrf(hyps, refs).score, 2) == card["chrf"]


SEQ2SEQ_MATMULS = {
    *(f"enc_{op}" for op in ("qkv", "scores", "mix", "attn_out", "mlp_in", "mlp_out")),
    "cross_kv",
    *("qkv", "scores", "mix", "attn_out", "cross_q", "cross_scores", "cross_mix", "cross_out"),
    *("mlp_in", "mlp_out", "logits"),
}


def test_matmul_flops_per_op_agree_with_torch_flop_counter(random_marian):
    """As tests/test_engine.py's test for decoders: each matrix-multiply op's Event.flops, for the encoder pass,
    the first cycle and a decode step, equal what torch's FlopCounterMode counts while the engine computes it;
    every other op (norms, softmax, residual adds, the choice) counts no matmul at all."""
    from test_engine import counted_flops

    rows = counted_flops(Seq2SeqEngine(random_marian), "w3 w4 w5 w6 w7", 2)
    counted_ops = {e.op for e, counted in rows if counted}
    assert counted_ops == SEQ2SEQ_MATMULS
    assert [(e.cycle, e.layer, e.op, e.flops) for e, c in rows if e.op in SEQ2SEQ_MATMULS] == [
        (e.cycle, e.layer, e.op, c) for e, c in rows if e.op in SEQ2SEQ_MATMULS
    ]
    assert {e.cycle for e, _ in rows if e.op == "qkv"} >= {0, 1}
