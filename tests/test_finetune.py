"""The fine-tuning loop and the parameter-efficient methods, checked against references (peft, sacrebleu)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from cyclelab.train.finetune import (
    Adapter,
    LoRALinear,
    PrefixTuning,
    PromptTuning,
    TrainConfig,
    add_adapters,
    add_lora,
    count_trainable,
    freeze,
    lm_loss,
    merge_lora,
    schedule,
    train,
)
from cyclelab.train.metrics import bleu


@pytest.fixture()
def model(tiny):
    """A private copy of tiny: ``load`` caches, and fine-tuning must not change the shared model."""
    torch.manual_seed(0)
    return copy.deepcopy(tiny.model)


def windows(n: int = 32, length: int = 33, seed: int = 0) -> list[torch.Tensor]:
    """Random token windows: enough to check the loop's arithmetic, fast to train on."""
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 4096, (n, length), generator=gen))


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 2, **kw})


# --- LoRA -----------------------------------------------------------------------------------------


def test_lora_trains_exactly_r_times_in_plus_out_per_layer(model) -> None:
    _, total = count_trainable(model)
    add_lora(model, ["c_attn"], r=4, alpha=8)
    trainable, total_after = count_trainable(model)
    assert trainable == 4 * 4 * (192 + 576)  # 4 layers, r * (in + out)
    assert total_after == total + trainable
    assert all(
        ("A" in n.split(".")[-1] or "B" in n.split(".")[-1]) for n, p in model.named_parameters() if p.requires_grad
    )


def test_lora_merged_gives_the_same_logits(model) -> None:
    add_lora(model, ["c_attn", "c_fc"], r=4, alpha=8)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.B, std=0.02)  # a trained-looking update, not zero
    ids = torch.tensor([windows(2)[0][:20].tolist()])
    with torch.no_grad():
        before = model(ids).logits
        merge_lora(model)
        after = model(ids).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_lora_on_nn_linear_merges_too() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4)
    torch.nn.init.normal_(layer.B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(layer.merge()(x), y)


def test_lora_agrees_with_peft(tiny) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = add_lora(copy.deepcopy(tiny.model), ["c_attn"], r=4, alpha=8)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(tiny.model),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0),
        )
    assert count_trainable(ours) == count_trainable(theirs)
    gen = torch.Generator().manual_seed(1)
    for i, block in enumerate(ours.transformer.h):  # copy peft's A and a random B into ours
        layer = theirs.base_model.model.transformer.h[i].attn.c_attn
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(
                torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.02
            )
            block.attn.c_attn.A.copy_(layer.lora_A["default"].weight.T)
            block.attn.c_attn.B.copy_(layer.lora_B["default"].weight.T)
    ids = torch.stack(windows(4, 25))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    cfg = fast(steps=3, clip=None)
    ours_hist = train(ours, windows(), lm_loss, cfg)
    theirs_hist = train(theirs, windows(), lambda m, b: lm_loss(m, b), cfg)
    assert ours_hist.loss == pytest.approx(theirs_hist.loss, abs=1e-4)


@pytest.mark.parametrize("r, message", [(0, "positive"), (-2, "positive"), (500, "larger than the layer")])
def test_lora_bad_rank(model, r, message) -> None:
    with pytest.raises(ValueError, match=message):
        add_lora(model, ["c_attn"], r=r)


def test_lora_and_adapters_unknown_target(model) -> None:
    with pytest.raises(ValueError, match="no module of the model is named"):
        add_lora(model, ["nonexistent"], r=2)
    with pytest.raises(ValueError, match="no module of the model is named"):
        add_adapters(model, ["nonexistent"])


# --- prefix tuning (Li & Liang) and prompt tuning (Lester et al.), against peft -----------------


def _peft(model, config):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about GPT-2's Conv1D and fan_in_fan_out
        return peft.get_peft_model(copy.deepcopy(model), config)


def test_prefix_rows_hold_every_layers_keys_and_values(tiny) -> None:
    prefixed = PrefixTuning(copy.deepcopy(tiny.model), n_virtual=5)
    assert prefixed.prefix.shape == (5, 4 * 2 * 192)  # n_virtual x (layers x {K, V} x width)
    cache = prefixed.key_values(batch=3)
    assert len(cache.layers) == 4
    assert all(layer.keys.shape == layer.values.shape == (3, 6, 5, 32) for layer in cache.layers)


def test_prefix_tuning_starts_as_the_model_reading_real_words_first(tiny) -> None:
    """Initialised from the keys and values of 5 random words, the prefix must act exactly as if
    those words were read before the input (positions shifted by 5)."""
    prefixed = PrefixTuning(copy.deepcopy(tiny.model), n_virtual=5, seed=0)
    words = torch.randint(0, 4096, (1, 5), generator=torch.Generator().manual_seed(0))
    ids = torch.stack(windows(2, 9))
    with torch.no_grad():
        want = tiny.model(torch.cat([words.expand(2, -1), ids], dim=1)).logits[:, 5:]
        torch.testing.assert_close(prefixed(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_the_prefix_reaches_every_layers_attention(tiny) -> None:
    prefixed = PrefixTuning(copy.deepcopy(tiny.model), n_virtual=5)
    ids = torch.stack(windows(2, 9))
    with torch.no_grad():
        out = prefixed(ids, output_attentions=True)
        assert [a.shape[-1] for a in out.attentions] == [5 + 9] * 4  # every layer attends over prefix + input
        per_layer = prefixed.prefix.view(5, 4, 2 * 192)
        for layer in range(4):  # nudging one layer's keys/values alone changes the output
            moved = copy.deepcopy(prefixed)
            moved.prefix.view(5, 4, 2 * 192)[:, layer] += 0.5 * per_layer[:, layer].std()
            assert not torch.allclose(moved(ids).logits, out.logits, atol=1e-3), layer


@pytest.mark.parametrize("reparam", [None, 32], ids=["direct", "mlp"])
def test_prefix_tuning_counts_and_computes_like_peft(tiny, reparam) -> None:
    peft = pytest.importorskip("peft")
    ours = PrefixTuning(copy.deepcopy(tiny.model), n_virtual=5, reparam=reparam)
    extra = {} if reparam is None else {"prefix_projection": True, "encoder_hidden_size": reparam}
    theirs = _peft(tiny.model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, **extra))
    assert count_trainable(ours) == count_trainable(theirs)
    if reparam is None:  # the same rows in peft's prefix table give the same logits: the same layout
        ids = torch.stack(windows(2, 9))
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prefix)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # peft still passes `past_key_values=`
                want = theirs(input_ids=ids).logits
            torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_counts_like_peft(tiny) -> None:
    peft = pytest.importorskip("peft")
    theirs = _peft(tiny.model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    assert count_trainable(PromptTuning(copy.deepcopy(tiny.model), 5)) == count_trainable(theirs) == (5 * 192, 2616384)


def test_lora_on_attention_and_mlp_counts_like_peft(tiny) -> None:
    peft = pytest.importorskip("peft")
    theirs = _peft(
        tiny.model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    ours = add_lora(copy.deepcopy(tiny.model), ["c_attn", "c_fc"], r=8, alpha=16)
    assert count_trainable(ours) == count_trainable(theirs)
    assert count_trainable(ours)[0] == 4 * 8 * ((192 + 576) + (192 + 768))  # by hand: r (in + out) per layer


@pytest.mark.parametrize("reparam", [None, 16], ids=["direct", "mlp"])
def test_prefix_training_changes_only_the_prefix(tiny, reparam) -> None:
    prefixed = PrefixTuning(copy.deepcopy(tiny.model), n_virtual=4, reparam=reparam)
    frozen = copy.deepcopy(prefixed.model.state_dict())
    start = {n: p.detach().clone() for n, p in prefixed.named_parameters() if p.requires_grad}
    assert all(not n.startswith("model.") for n in start)
    hist = train(prefixed, windows(), lm_loss, fast(steps=3, lr=1e-2))
    assert len(hist.loss) == 3
    for name, value in prefixed.model.state_dict().items():
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0, msg=name)
    now = dict(prefixed.named_parameters())
    assert all(not torch.equal(now[n], before) for n, before in start.items())  # prefix (and MLP) all moved


# --- the loop ---------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays() -> None:
    lrs = [schedule(s, 100, 1.0, warmup=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert schedule(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_the_loop_equals_a_plain_torch_loop(tiny) -> None:
    """Reference: AdamW (decay on matrices only), LambdaLR warmup + cosine, clipping, and the
    shifted-label loss from transformers (``labels=ids``), written out by hand."""
    import math

    data, steps, lr, warmup = windows(), 5, 3e-3, 2
    ours = copy.deepcopy(tiny.model)
    hist = train(ours, data, lm_loss, fast(steps=steps, lr=lr, warmup=warmup, clip=0.5))
    ref = copy.deepcopy(tiny.model)
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )

    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (steps - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(data), (4,), generator=torch.Generator().manual_seed(step)).tolist()
        ids = torch.stack([data[i] for i in idx])
        loss = ref(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert hist.loss == pytest.approx(losses, abs=1e-5)
    assert hist.lr == pytest.approx([lr * factor(s) for s in range(steps)])
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_accumulation_equals_one_big_batch(tiny) -> None:
    data = windows()
    runs = []
    for accumulate in (1, 4):
        model = copy.deepcopy(tiny.model)
        hist = train(model, data, lm_loss, fast(steps=2, batch_size=8, accumulate=accumulate))
        runs.append((hist.loss, model.transformer.h[0].attn.c_attn.weight.detach().clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=1e-4)


def test_resume_from_checkpoint_continues_to_the_same_loss(tiny, tmp_path) -> None:
    data = windows()
    torch.manual_seed(0)
    whole = train(add_lora(copy.deepcopy(tiny.model), ["c_attn"], 4, 8), data, lm_loss, fast(steps=6))
    ckpt = tmp_path / "run.pt"
    torch.manual_seed(0)
    first = add_lora(copy.deepcopy(tiny.model), ["c_attn"], 4, 8)
    train(first, data, lm_loss, fast(steps=3, checkpoint=ckpt, checkpoint_every=3))
    # "interrupted" after 3 steps: a fresh process would rebuild the model and call train again
    torch.manual_seed(123)  # a different LoRA init, overwritten by the checkpoint
    resumed = train(
        add_lora(copy.deepcopy(tiny.model), ["c_attn"], 4, 8),
        data,
        lm_loss,
        fast(steps=6, checkpoint=ckpt, checkpoint_every=3),
    )
    assert len(resumed.loss) == 6
    assert resumed.loss == pytest.approx(whole.loss, abs=1e-5)


def test_early_stopping_keeps_the_best_weights(model) -> None:
    calls = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    snapshots = []

    def evaluate(m):
        snapshots.append(m.lm_head.weight.detach().clone())
        return next(calls)

    hist = train(model, windows(), lm_loss, fast(steps=6, eval_every=1, patience=2), evaluate)
    assert hist.stopped_early and len(hist.loss) == 4 and hist.best == 2.0
    torch.testing.assert_close(model.lm_head.weight, snapshots[1])


def test_mixed_precision_and_dropout_run(model) -> None:
    hist = train(model, windows(), lm_loss, fast(steps=2, mixed_precision=True, dropout=0.1))
    assert all(torch.isfinite(torch.tensor(hist.loss)))
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_adapters_and_prefix_start_as_the_unchanged_model(tiny) -> None:
    ids = torch.stack(windows(2, 20))
    with torch.no_grad():
        base = tiny.model(ids).logits
        adapted = add_adapters(copy.deepcopy(tiny.model), ["mlp"], bottleneck=8)
        torch.testing.assert_close(adapted(ids).logits, base)
        prefixed = PromptTuning(copy.deepcopy(tiny.model), n_virtual=5)
        assert prefixed(ids).logits.shape == base.shape
    assert count_trainable(adapted)[0] == 4 * (192 * 8 + 8 + 8 * 192 + 192)
    assert count_trainable(prefixed)[0] == 5 * 192
    hist = train(prefixed, windows(), lm_loss, fast(steps=2))
    assert len(hist.loss) == 2


# --- bad input ----------------------------------------------------------------------------------


def test_freeze_leaves_the_lower_layers_untouched(model) -> None:
    total = count_trainable(model)[0]
    frozen = freeze(model, ["transformer.wte", "transformer.wpe", "transformer.h.0.", "transformer.h.1."])
    per_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    assert frozen == 4096 * 192 + model.transformer.wpe.weight.numel() + 2 * per_block
    assert count_trainable(model)[0] == total - frozen
    lower = copy.deepcopy(model.transformer.h[1].state_dict())
    upper = copy.deepcopy(model.transformer.h[3].state_dict())
    train(model, windows(), lm_loss, fast(steps=2))
    for name, value in model.transformer.h[1].state_dict().items():
        torch.testing.assert_close(value, lower[name], rtol=0, atol=0)
    assert any(not torch.equal(value, upper[name]) for name, value in model.transformer.h[3].state_dict().items())
    with pytest.raises(ValueError, match="no parameter name"):
        freeze(model, ["encoder.layer.0."])


def test_empty_data_set(model) -> None:
    with pytest.raises(ValueError, match="empty"):
        train(model, [], lm_loss, fast())


def test_bad_adapter_and_prefix_sizes(model) -> None:
    with pytest.raises(ValueError, match="bottleneck"):
        Adapter(192, 0)
    for method in (PromptTuning, PrefixTuning):
        with pytest.raises(ValueError, match="n_virtual"):
            method(model, 0)


# --- BLEU ---------------------------------------------------------------------------------------

HYPS = [
    "The cat sat on the mat.",
    "Hello, world! How's it going?",
    "to be or not to be",
    "What light through yonder window breaks?",
    "O Romeo, Romeo, wherefore art thou Romeo?",
    "Now is the winter of our discontent",
]
REFS = [
    "The cat is on the mat.",
    "Hello world, how is it going?",
    "to be, or not to be: that is the question",
    "But soft, what light through yonder window breaks?",
    "O Romeo, Romeo! wherefore art thou Romeo?",
    "Now is the winter of our discontent made glorious summer",
]


@pytest.mark.parametrize("n", [1, 2, 6])
def test_bleu_agrees_with_sacrebleu(n) -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    want = sacrebleu.corpus_bleu(HYPS[:n], [REFS[:n]]).score
    assert bleu(HYPS[:n], REFS[:n]) == pytest.approx(want, abs=0.5)


def test_bleu_edges() -> None:
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100)
    assert bleu([""], ["a b"]) == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        bleu(["a"], [])


def test_bleu_from_line_statistics_is_corpus_bleu() -> None:
    from cyclelab.train.metrics import bleu_of_statistics, bleu_statistics

    stats = bleu_statistics(HYPS, REFS)
    assert len(stats) == len(HYPS)
    for n in (1, 2, 6):
        assert bleu_of_statistics(stats[:n]) == pytest.approx(bleu(HYPS[:n], REFS[:n]), abs=1e-9)
    sacrebleu = pytest.importorskip("sacrebleu")
    assert bleu_of_statistics(stats) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=0.5)
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        bleu_statistics(["a"], [])
    with pytest.raises(ValueError, match="no lines"):
        bleu_of_statistics([])
