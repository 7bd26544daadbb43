"""Fine-tuning: change the weights that the READ stage reads.

Every cycle reads the same weights; fine-tuning is the one thing in the course that changes
them. This module has two halves:

* :func:`train` — a training loop small enough to read in one screen, each habit switchable in
  :class:`TrainConfig`: AdamW with weight decay (not on biases and norms), linear warmup then
  cosine decay (:func:`schedule`), gradient clipping, gradient accumulation, early stopping on a
  validation metric, a dropout toggle, mixed precision (bfloat16 autocast on CPU, float16 with a
  gradient scaler on a GPU), checkpoint and resume, and a tqdm progress bar showing the loss.
* parameter-efficient methods written from scratch: :class:`LoRALinear` / :func:`add_lora`,
  bottleneck :class:`Adapter` / :func:`add_adapters`, :class:`PromptTuning`, :class:`PrefixTuning`,
  :func:`freeze`
  (freeze the lower layers) and :func:`count_trainable`.

Batches are drawn from a generator seeded by ``(seed, step)``, so step *s* sees the same
examples whether the run was interrupted or not: resuming from a checkpoint continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from cyclelab.loading.device import pick_device

# --- the training loop -------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The knobs of :func:`train`; each habit can be switched off on its own."""

    steps: int = 100
    batch_size: int = 8  # examples per optimizer step (split into `accumulate` micro-batches)
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's decoupled decay; 0 switches it off
    warmup: int = 10  # linear warmup steps; 0 switches it off
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr; 1.0 = constant lr
    clip: float | None = 1.0  # max gradient norm; None switches clipping off
    accumulate: int = 1  # micro-batches per step (gradient accumulation)
    eval_every: int = 0  # evaluate every N steps (0: never)
    patience: int | None = None  # stop after this many evaluations without improvement
    dropout: float | None = None  # set every nn.Dropout to this p; None leaves the model's
    mixed_precision: bool = False  # bfloat16 autocast on CPU, float16 (+ grad scaler) on GPU
    checkpoint: str | Path | None = None  # save here every `checkpoint_every` steps; resume if present
    checkpoint_every: int = 0
    progress: bool = False  # tqdm bar with the loss
    seed: int = 0
    device: str | None = "cpu"  # None: cyclelab.pick_device() (a GPU when there is one)


@dataclass
class History:
    """What a run did: per-step loss and learning rate, evaluations, time per step."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    best: float = math.inf
    stopped_early: bool = False
    seconds_per_step: float = 0.0


def schedule(step: int, steps: int, lr: float, warmup: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step``: linear warmup over ``warmup`` steps, then cosine decay
    from ``lr`` to ``lr * min_lr_ratio`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in ``model`` (0 switches dropout off)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, first_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The :func:`schedule` as a torch scheduler, starting at ``first_step`` (a resumed run):
    each ``scheduler.step()`` moves the optimizer to the next step's learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: schedule(first_step + s, cfg.steps, 1.0, cfg.warmup, cfg.min_lr_ratio)
    )


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """The examples of step ``step``, drawn by a generator seeded by ``(seed, step)``: a run
    resumed from a checkpoint sees the same batches as one that was never interrupted."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=gen).tolist()


def _collate(items: list):
    if isinstance(items[0], dict):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    return torch.stack([torch.as_tensor(it) for it in items])


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)


def train_step(
    model: nn.Module,
    micro_batches: list,
    loss_fn: Callable,
    opt: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
) -> float:
    """One optimizer step: forward and backward of each micro-batch (their gradients add up),
    clip the gradient norm, step the optimizer, step the schedule. Returns the batch's mean loss."""
    device = next(model.parameters()).device
    amp_dtype = torch.float16 if scaler.is_enabled() else torch.bfloat16
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.mixed_precision):
            loss = loss_fn(model, batch) / len(micro_batches)
        scaler.scale(loss).backward()
        total += loss.item()
    scaler.unscale_(opt)  # back to true gradients before clipping (a no-op without float16)
    if cfg.clip is not None:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
    scaler.step(opt)
    scaler.update()
    scheduler.step()
    return total


def train(
    model: nn.Module,
    data: Sequence,
    loss_fn: Callable,
    cfg: TrainConfig,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> History:
    """Train ``model`` in place on ``data`` (a sequence of tensors or dicts of tensors, stacked
    into batches); ``loss_fn(model, batch)`` returns the mean loss of a batch and
    ``evaluate(model)`` a validation number, lower is better. Returns the :class:`History`."""
    from tqdm.auto import tqdm

    if len(data) == 0:
        raise ValueError("the training data set is empty: nothing to learn from")
    if cfg.batch_size % cfg.accumulate:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of accumulate {cfg.accumulate}")
    device = pick_device(cfg.device)
    model.to(device)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision and device.type == "cuda")
    hist, ckpt = History(), Path(cfg.checkpoint) if cfg.checkpoint else None
    step = _resume(ckpt, model, opt, scaler, hist) if ckpt is not None and ckpt.exists() else 0
    scheduler = make_scheduler(opt, cfg, first_step=step)
    best_state, bad, micro = None, 0, cfg.batch_size // cfg.accumulate
    bar = tqdm(total=cfg.steps, initial=step, desc="fine-tune", unit="step", disable=not cfg.progress)
    model.train()
    t0, start_step = time.perf_counter(), step
    while step < cfg.steps:
        idx = batch_indices(cfg.seed, step, len(data), cfg.batch_size)
        batches = [_to(_collate([data[i] for i in idx[m : m + micro]]), device) for m in range(0, len(idx), micro)]
        hist.lr.append(scheduler.get_last_lr()[0])
        hist.loss.append(train_step(model, batches, loss_fn, opt, scheduler, scaler, cfg))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{hist.loss[-1]:.3f}")
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0:
            value = float(evaluate(model))
            model.train()
            hist.evals.append((step, value))
            if value < hist.best:
                hist.best, bad, best_state = value, 0, copy.deepcopy(model.state_dict())
            else:
                bad += 1
            if cfg.patience is not None and bad >= cfg.patience:  # early stopping
                hist.stopped_early = True
                break
        if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save(ckpt, step, model, opt, scaler, hist)
    bar.close()
    if hist.stopped_early and best_state is not None:
        model.load_state_dict(best_state)  # keep the weights of the best evaluation
    hist.seconds_per_step = (time.perf_counter() - t0) / max(1, step - start_step)
    model.eval()
    return hist


def _save(path: Path, step: int, model: nn.Module, opt, scaler, hist: History) -> None:
    saved = {"loss": hist.loss, "lr": hist.lr, "evals": hist.evals, "best": hist.best}
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "step": torch.tensor(step),
            "history": json.dumps(saved),
        },
        path,
    )


def _resume(path: Path, model: nn.Module, opt, scaler, hist: History) -> int:
    """Load a checkpoint of :func:`_save` into the run's objects; returns the step to continue from."""
    state = torch.load(path, weights_only=True, map_location=next(model.parameters()).device)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    scaler.load_state_dict(state["scaler"])
    saved = json.loads(state["history"])
    hist.loss, hist.lr, hist.best = saved["loss"], saved["lr"], saved["best"]
    hist.evals = [tuple(e) for e in saved["evals"]]
    return int(state["step"])


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy. ``batch`` is ids ``(B, T)`` or a dict with ``input_ids`` and
    ``labels`` (-100 where a position is not scored, e.g. the prompt of a prompt → answer pair)."""
    ids, labels = (batch["input_ids"], batch["labels"]) if isinstance(batch, dict) else (batch, batch)
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


# --- parameter-efficient fine-tuning -------------------------------------------------------------


def freeze(model: nn.Module, prefixes: Sequence[str]) -> int:
    """Freeze every parameter whose name starts with one of ``prefixes`` (e.g. BERT's
    ``"embeddings"`` and ``"encoder.layer.0."``); returns how many numbers were frozen. Frozen
    lower layers need no backward pass at all: a cheaper step, and less to overfit."""
    frozen = 0
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
            frozen += p.numel()
    if not frozen:
        raise ValueError(f"no parameter name starts with any of {list(prefixes)}")
    return frozen


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _in_out(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_in_by_out) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if type(layer).__name__ == "Conv1D":  # transformers' GPT-2 layer: y = x @ W + b, W is (in, out)
        return layer.weight.shape[0], layer.weight.shape[1], True
    raise ValueError(f"LoRA wraps nn.Linear or GPT-2's Conv1D, not {type(layer).__name__}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2021):

    ``y = base(x) + (x @ A) @ B * alpha / r`` with ``A`` (in, r) random and ``B`` (r, out) zero,
    so training starts from the unchanged model. :meth:`merge` folds ``A @ B * alpha / r`` into
    the base weight: same outputs, no extra cost per cycle.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        n_in, n_out, self.in_by_out = _in_out(base)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if r > min(n_in, n_out):
            raise ValueError(
                f"LoRA rank r={r} is larger than the layer allows ({n_in}x{n_out}: at most "
                f"{min(n_in, n_out)}); a higher rank adds parameters but no expressiveness"
            )
        self.base, self.r, self.alpha, self.scale = base, r, alpha, alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        a = torch.empty(r, n_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's initialisation of lora_A
        self.A = nn.Parameter(a.T.contiguous().to(base.weight))
        self.B = nn.Parameter(torch.zeros(r, n_out).to(base.weight))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.A) @ self.B * self.scale

    def delta(self) -> torch.Tensor:
        """The weight update ``A @ B * alpha / r``, shaped like the base weight."""
        d = self.A @ self.B * self.scale
        return d if self.in_by_out else d.T

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the update into the base weight (once); returns the plain base layer."""
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True
        return self.base


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _freeze_and_find(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the modules called one of ``targets`` (the last part of the name); the whole
    model is frozen first, so only what is added next to those modules will train."""
    names = [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no module of the model is named {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    return names


def add_lora(
    model: nn.Module, targets: Sequence[str] = ("c_attn",), r: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> nn.Module:
    """Freeze ``model`` and wrap each layer whose name ends with one of ``targets`` (e.g.
    ``("c_attn",)`` in GPT-2, ``("query", "value")`` in BERT) in a :class:`LoRALinear`."""
    for name in _freeze_and_find(model, targets):
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its merged base layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merge())
    return model


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): ``h + up(gelu(down(h)))``, ``up`` starting at zero."""

    def __init__(self, width: int, bottleneck: int = 16):
        super().__init__()
        if bottleneck <= 0:
            raise ValueError(f"adapter bottleneck must be positive, got {bottleneck}")
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class _WithAdapter(nn.Module):
    def __init__(self, inner: nn.Module, adapter: Adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.inner(*args, **kwargs))


def add_adapters(model: nn.Module, targets: Sequence[str] = ("mlp",), bottleneck: int = 16) -> nn.Module:
    """Freeze ``model`` and put an :class:`Adapter` after each module named ``targets`` (its
    output must be a tensor of the model's width: GPT-2's ``mlp``, BERT's ``output``)."""
    width = model.config.hidden_size
    for name in _freeze_and_find(model, targets):
        inner = model.get_submodule(name)
        _replace(model, name, _WithAdapter(inner, Adapter(width, bottleneck).to(next(inner.parameters()))))
    return model


class PromptTuning(nn.Module):
    """Prompt tuning (Lester et al. 2021): a frozen causal LM behind ``n_virtual`` trainable vectors
    prepended to its input embeddings.

    Only the input vectors train; the frozen layers turn them into keys and values as they would a
    word's. The vectors start as the embeddings of random vocabulary tokens. Outputs at the virtual
    positions are dropped, so ``logits`` line up with ``input_ids``.
    """

    def __init__(self, model: nn.Module, n_virtual: int = 8, seed: int = 0):
        super().__init__()
        if n_virtual <= 0:
            raise ValueError(f"n_virtual must be positive, got {n_virtual}")
        self.model, self.n_virtual = model, n_virtual
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings().weight
        ids = torch.randint(0, emb.shape[0], (n_virtual,), generator=torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(emb.detach()[ids.to(emb.device)].clone())

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, **kwargs):
        embeds = self.model.get_input_embeddings()(input_ids)
        prompt = self.prompt.to(embeds.dtype).expand(input_ids.shape[0], -1, -1)
        out = self.model(inputs_embeds=torch.cat([prompt, embeds], dim=1), **kwargs)
        return SimpleNamespace(logits=out.logits[:, self.n_virtual :])


class PrefixTuning(nn.Module):
    """Prefix tuning (Li & Liang 2021): a frozen causal LM whose attention, in EVERY layer, also reads
    ``n_virtual`` learned key/value pairs placed before the real tokens.

    The prefix is one row per virtual token holding every layer's keys and values (the layout of
    peft's ``PrefixTuningConfig``): ``(n_virtual, n_layer × 2 × width)``. With ``reparam`` the rows
    come out of a small MLP instead (``n_virtual × width`` inputs, ``width → reparam → n_layer × 2 ×
    width``), which Li & Liang found steadier to train. They reach the layers as a KV cache
    (``cache=``, chapter 03): to each layer the prefix looks like tokens it has already read.
    """

    def __init__(self, model: nn.Module, n_virtual: int = 8, reparam: int | None = None, seed: int = 0):
        super().__init__()
        if n_virtual <= 0:
            raise ValueError(f"n_virtual must be positive, got {n_virtual}")
        cfg = model.config
        self.model, self.n_virtual = model, n_virtual
        self.layers = cfg.num_hidden_layers
        self.heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads  # Llama shares K/V heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for p in model.parameters():
            p.requires_grad_(False)
        real = self._real_key_values(n_virtual, seed)  # start from what the layers compute for real words
        if reparam is None:
            self.prefix, self.mlp = nn.Parameter(real), None
        else:
            self.prefix = nn.Parameter(model.get_input_embeddings().weight.detach()[:n_virtual].clone())
            self.mlp = nn.Sequential(
                nn.Linear(cfg.hidden_size, reparam), nn.Tanh(), nn.Linear(reparam, real.shape[1])
            ).to(real)

    @torch.no_grad()
    def _real_key_values(self, n: int, seed: int) -> torch.Tensor:
        """Every layer's keys and values for ``n`` random vocabulary tokens, as prefix rows."""
        emb = self.model.get_input_embeddings().weight
        ids = torch.randint(0, emb.shape[0], (1, n), generator=torch.Generator().manual_seed(seed)).to(emb.device)
        cache = self.model(input_ids=ids, use_cache=True).past_key_values
        layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(self.layers)]
        kv = torch.stack([t[0] for pair in layers for t in pair])  # (2L, heads, n, head_dim)
        return kv.permute(2, 0, 1, 3).reshape(n, -1).clone()

    @property
    def config(self):
        return self.model.config

    def key_values(self, batch: int):
        """The prefix as a fresh KV cache: layer ``i`` reads keys ``2i`` and values ``2i + 1``."""
        from transformers import DynamicCache

        rows = self.mlp(self.prefix) if self.mlp is not None else self.prefix
        kv = rows.view(self.n_virtual, 2 * self.layers, self.heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, batch, heads, n_virtual, head_dim)
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch = input_ids.shape[0]
        if attention_mask is not None:  # the real tokens may read every virtual one
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.n_virtual), attention_mask], dim=1)
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=self.key_values(batch), use_cache=False, **kwargs
        )


def plot_schedule(steps: int, lr: float, warmup: int, min_lr_ratio: float = 0.1):
    """The learning rate of every step: warmup, then cosine decay."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(range(steps), [schedule(s, steps, lr, warmup, min_lr_ratio) for s in range(steps)])
    ax.axvline(warmup, color="grey", ls=":", lw=1)
    ax.set(
        xlabel="step", ylabel="learning rate", title=f"warmup {warmup} steps, cosine decay to {min_lr_ratio:g}× peak"
    )
    fig.tight_layout()
    return fig
