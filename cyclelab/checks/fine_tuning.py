"""Chapter 06's checks: LoRA's forward pass, one training step, and the masked labels of instruction tuning."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker, close, name_the_mistake, raised, tensor_answer
from cyclelab.checks.recipes import made


def _lora_variants(x, W, A, B, alpha: float, r: int) -> dict[str, torch.Tensor]:
    """LoRA's output (``"ok"``) and the typical wrong ones, each named by its symptom."""
    base, update = x @ W, (x @ A) @ B
    return {
        "ok": base + update * alpha / r,
        f"the scale is alpha // r = {alpha // r:g} (floor division): use alpha / r = {alpha / r:g}": base
        + update * (alpha // r),
        "you returned the frozen layer alone: add the low-rank path (x @ A) @ B, scaled by alpha / r": base,
        "you returned only the low-rank update: LoRA ADDS it to the frozen output x @ W": update * alpha / r,
        f"the update is not scaled (alpha={alpha:g}, r={r}): multiply it by alpha / r": base + update,
        "the scale is upside down: it is alpha / r, not r / alpha": base + update * r / alpha,
        "the update is scaled by alpha alone: divide by the rank too, alpha / r": base + update * alpha,
        "the update is multiplied by alpha * r: the scale is alpha / r": base + update * alpha * r,
        "the update is divided by r alone: the scale is alpha / r": base + update / r,
        "the low-rank path is subtracted: LoRA ADDS (x @ A) @ B * alpha / r": base - update * alpha / r,
    }


@checker
def check_lora_forward(fn: Callable[..., torch.Tensor]) -> str:
    """Check ``fn(x, W, A, B, alpha, r) -> y``: LoRA's output ``x @ W + (x @ A) @ B * alpha / r``
    for ``x`` (batch, in), ``W`` (in, out), ``A`` (in, r), ``B`` (r, out); in float32 and float64."""
    gen = torch.Generator().manual_seed(6)
    for n_in, n_out, r, alpha, dtype in [
        (8, 5, 2, 4.0, torch.float32),
        (12, 12, 3, 1.0, torch.float32),
        (6, 10, 1, 16.0, torch.float64),
        (16, 4, 4, 6.0, torch.float32),
    ]:
        x, W = torch.randn(4, n_in, generator=gen), torch.randn(n_in, n_out, generator=gen)
        A, B = torch.randn(n_in, r, generator=gen), torch.randn(r, n_out, generator=gen)
        x, W, A, B = (t.to(dtype) for t in (x, W, A, B))
        y = tensor_answer(fn, x, W, A, B, alpha, r, noun="y", case=f"in={n_in}, out={n_out}, r={r}")
        if tuple(y.shape) != (4, n_out):
            raise Failed(f"the output should have shape (batch, out) = (4, {n_out}), got {tuple(y.shape)}")
        variants = _lora_variants(*(t.double() for t in (x, W, A, B)), alpha, r)
        if close(y, variants.pop("ok")):
            continue
        name_the_mistake(y, variants)
        raise Failed(f"for in={n_in}, out={n_out}, r={r} the output differs from x @ W + (x @ A) @ B * alpha / r")
    return "correct: the frozen path plus a rank-r update scaled by alpha / r"


# --- chapter 06: one training step -------------------------------------------------------------------


def _step_setup():
    """A small random GPT-2 (no dropout), token windows, and the run's settings: clipping active,
    the rate changing every step (warmup, then cosine)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cyclelab.train.finetune import TrainConfig

    torch.manual_seed(6)
    config = GPT2Config(
        vocab_size=48,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # GPT-2's class name names no loss: say which, or transformers warns
    data = list(torch.randint(0, 48, (12, 10), generator=torch.Generator().manual_seed(6)))
    cfg = TrainConfig(
        steps=4, batch_size=3, lr=2e-2, warmup=2, min_lr_ratio=0.1, clip=0.05, weight_decay=0.01, seed=6, device="cpu"
    )
    return model, data, made(cfg, "cyclelab.checks.fine_tuning:_step_setup", path=(2,))


def _step_loss(model, ids, how: str = "ok") -> torch.Tensor:
    logits = model(input_ids=ids).logits
    if how == "unshifted":
        pred, target = logits, ids
    elif how == "backwards":
        pred, target = logits[:, 1:], ids[:, :-1]
    else:
        pred, target = logits[:, :-1], ids[:, 1:]
    reduction = "sum" if how == "sum" else "mean"
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction=reduction)


def _mistaken_step(how: str):
    """A training step with one typical mistake ``how``, to tell which one a learner made."""

    def step(model, ids, opt, scheduler, clip):
        if how != "no zero_grad":
            opt.zero_grad()
        loss = _step_loss(model, ids, how)
        loss.backward()
        if how == "zero_grad before step":
            opt.zero_grad()
        if how != "no clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if how == "scheduler first":
            scheduler.step()
        if how != "no optimizer step":
            opt.step()
        if how not in ("no scheduler", "scheduler first"):
            scheduler.step()
        return loss.item()

    return step


_STEP_HINTS = {
    "unshifted": "the logits at position t were scored against token t itself: predict the NEXT token, "
    "logits[:, :-1] against ids[:, 1:]",
    "backwards": "the shift goes the wrong way: logits[:, :-1] (every position but the last) predict ids[:, 1:]",
    "sum": "the loss is summed over tokens: take the mean (cross_entropy's default), or the step size depends "
    "on the batch",
    "no zero_grad": "gradients add up from one step to the next: call optimizer.zero_grad() in every step",
    "no clip": "the gradient norm is not clipped: torch.nn.utils.clip_grad_norm_(model.parameters(), clip) "
    "after backward, before optimizer.step()",
    "no optimizer step": "the weights never change: call optimizer.step() after loss.backward() (and do not "
    "zero the gradients in between)",
    "no scheduler": "the learning rate never changes: call scheduler.step() after optimizer.step()",
    "scheduler first": "the schedule runs one step ahead: call scheduler.step() AFTER optimizer.step()",
}


def _run_steps(step_fn, model, data, cfg) -> list:
    """``cfg.steps`` calls of ``step_fn`` on the batches :func:`~cyclelab.train.finetune.train` draws;
    the returned losses. Raise :class:`Failed` when the learner's function raised."""
    from cyclelab.train.finetune import batch_indices, make_optimizer, make_scheduler

    model.train()
    where = "cyclelab.train.finetune"  # the learner's process makes its own optimizer and schedule
    opt = made(
        make_optimizer(model, cfg.lr, cfg.weight_decay), f"{where}:make_optimizer", model, cfg.lr, cfg.weight_decay
    )
    scheduler = made(make_scheduler(opt, cfg), f"{where}:make_scheduler", opt, cfg)
    losses = []
    for step in range(cfg.steps):
        ids = torch.stack([data[i] for i in batch_indices(cfg.seed, step, len(data), cfg.batch_size)])
        try:
            losses.append(step_fn(model, ids, opt, scheduler, cfg.clip))
        except Exception as err:  # a learner's bug, reported instead of raised
            raise raised(err, f"step {step}") from None
    return losses


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, tol: float = 2e-4) -> bool:
    return all(close(p.detach(), q.detach(), tol) for p, q in zip(a.parameters(), b.parameters()))


@checker
def check_training_step(fn: Callable[..., float]) -> str:
    """Check ``fn(model, ids, optimizer, scheduler, clip) -> loss``: one step of causal LM training
    (forward, the shifted-label loss, backward, clip, optimizer step, schedule step). Its first loss
    must equal transformers' ``model(ids, labels=ids).loss``, and its weights after 4 steps those of
    :func:`cyclelab.train.finetune.train` on the same batches with the same seed."""
    import copy
    import warnings

    from cyclelab.train.finetune import batch_indices, lm_loss, train

    model, data, cfg = _step_setup()
    learner = made(copy.deepcopy(model), "cyclelab.checks.fine_tuning:_step_setup", path=(0,))
    ids0 = torch.stack([data[i] for i in batch_indices(cfg.seed, 0, len(data), cfg.batch_size)])
    with torch.no_grad():
        want_loss = float(model(input_ids=ids0, labels=ids0).loss)  # transformers shifts the labels itself
    losses = _run_steps(fn, learner, data, cfg)
    first = losses[0]
    if (
        first is None
        or isinstance(first, (str, bytes, tuple, list, dict))
        or (isinstance(first, torch.Tensor) and first.numel() != 1)
    ):
        raise Failed(f"return the batch's loss as a number (loss.item()), got {first!r:.60}")
    first = float(first.detach() if isinstance(first, torch.Tensor) else first)
    if abs(first - want_loss) > 1e-4 * max(1.0, abs(want_loss)):
        with torch.no_grad():
            for how in ("unshifted", "backwards", "sum"):
                if abs(first - float(_step_loss(model, ids0, how))) <= 1e-4 * max(1.0, abs(first)):
                    raise Failed(_STEP_HINTS[how])
        raise Failed(
            f"the first step's loss is {first:.4f}, but the mean next-token cross-entropy of the "
            f"batch is {want_loss:.4f}: return the loss computed before the weights change"
        )
    reference = copy.deepcopy(model)
    train(reference, data, lm_loss, cfg)
    if _same_weights(learner, reference):
        return (
            "correct: the same weights as cyclelab.train.finetune.train after 4 steps, and the first loss "
            "equals transformers' model(ids, labels=ids).loss"
        )
    for how, hint in _STEP_HINTS.items():
        wrong = copy.deepcopy(model)
        with warnings.catch_warnings():  # torch warns about the mistake "scheduler first": that is the point
            warnings.simplefilter("ignore", UserWarning)
            with contextlib.suppress(Failed):  # a mistaken step that raises leaves its weights as they are
                _run_steps(_mistaken_step(how), wrong, data, cfg)
        if _same_weights(learner, wrong):
            raise Failed(hint)
    raise Failed(
        "the loss is right, but after 4 steps the weights differ from the package loop's: "
        "zero_grad, backward, clip_grad_norm_(…, clip), optimizer.step(), scheduler.step()"
    )


# --- chapter 06, the tasks: the labels of instruction tuning -----------------------------------------


def _label_variants(p: list[int], a: list[int], max_len: int, pad: int) -> dict[str, list[int]]:
    """The right labels (``"ok"``) and the typical wrong ones, each named by its symptom."""
    fill = max_len - len(p) - len(a)
    ids = p + a + [pad] * fill
    return {
        "ok": [-100] * len(p) + a + [-100] * fill,
        "the prompt is scored too: give every prompt position the label -100, only the answer is learned": p
        + a
        + [-100] * fill,
        "the padding is scored: give every padding position the label -100 (not the pad id)": [-100] * len(p)
        + a
        + [pad] * fill,
        "the labels are the input ids everywhere: mask the prompt and the padding with -100": ids,
        "the labels are shifted by one: keep them aligned with input_ids, the loss (lm_loss) shifts them": (
            [-100] * (len(p) - 1) + a + [-100] * (fill + 1)
        ),
        "the answer is masked and the prompt scored: it is the other way round": p + [-100] * (len(a) + fill),
    }


def _as_ints(value, name: str, max_len: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
        raise Failed(f"return {name} as a list of ints (or a 1-D tensor), got {type(value).__name__}")
    if len(value) != max_len:
        raise Failed(f"{name} should hold max_len = {max_len} entries (pad at the end), got {len(value)}")
    return list(value)


@checker
def check_masked_labels(fn: Callable[..., tuple]) -> str:
    """Check ``fn(prompt_ids, answer_ids, max_len, pad_id) -> (input_ids, labels)``: prompt, answer and
    padding as the input; as labels, the answer's ids and -100 on the prompt and the padding (as
    :func:`cyclelab.train.tasks.instructions.instruction_examples` builds them)."""
    for p, a, max_len, pad in [([5, 6, 7], [8, 9], 8, 0), ([11, 12, 13, 14], [15], 5, 2), ([3], [4, 5, 6], 4, 1)]:
        case = f"prompt {p}, answer {a}, max_len {max_len}"
        out = call(fn, list(p), list(a), max_len, pad, case=case)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise Failed(f"return a pair (input_ids, labels), got {type(out).__name__}")
        ids, labels = (_as_ints(v, n, max_len) for v, n in zip(out, ("input_ids", "labels")))
        if ids != p + a + [pad] * (max_len - len(p) - len(a)):
            raise Failed(f"{case}: input_ids should be the prompt, then the answer, then pad_id up to max_len")
        variants = _label_variants(p, a, max_len, pad)
        if labels == variants.pop("ok"):
            continue
        raise Failed(next((hint for hint, wrong in variants.items() if labels == wrong), f"{case}: wrong labels"))
    return "correct: only the answer is scored; the prompt and the padding carry -100"
