"""The engine against transformers: logits, greedy generation, cache, events, interventions, errors."""

import json

import pytest
import torch
from float_bounds import assert_within, logit_bound
from torch.utils.flop_counter import FlopCounterMode

from cyclelab import Engine, Stage, Trace, ablation, load
from cyclelab.core.engine import drain
from cyclelab.lab.attention_heads import KVCache

PROMPTS = ["ROMEO:", "What light through yonder window breaks?", "To be, or not to be: that is the question"]


def reference_logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0]


def long_prompt_ids(engine, n):
    text = " ".join(["Now is the winter of our discontent made glorious summer by this sun of York."] * 200)
    return engine.encode(text)[:n]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tiny_logits_agree_with_transformers(tiny, tiny_engine, prompt, own_kernels):
    """Equal within float32 rounding, whichever kernels sum the products (the bound: float_bounds.logit_bound)."""
    ids = tiny_engine.encode(prompt)
    assert_within(tiny_engine.logits(ids)[0], reference_logits(tiny, ids), logit_bound(tiny, ids))


def test_tiny_logits_agree_on_a_prompt_filling_the_context(tiny, tiny_engine):
    ids = long_prompt_ids(tiny_engine, tiny_engine.context_window - 6)
    assert_within(tiny_engine.logits(ids)[0], reference_logits(tiny, ids), logit_bound(tiny, ids))


@pytest.mark.parametrize("prompt", PROMPTS[1:])
def test_smollm2_logits_agree_with_transformers(smollm2, smollm2_engine, prompt, own_kernels):
    ids = smollm2_engine.encode(prompt)
    assert_within(smollm2_engine.logits(ids)[0], reference_logits(smollm2, ids), logit_bound(smollm2, ids))


def test_smollm2_logits_agree_on_a_long_prompt(smollm2, smollm2_sdpa, smollm2_engine):
    """512 tokens, far past every other test's prompt (the full 8192-token window would take minutes
    on CPU: see docs/benchmarks.md)."""
    ids = long_prompt_ids(smollm2_engine, 512)
    ours = smollm2_engine.logits(ids)[0]
    bound = logit_bound(smollm2, ids)  # 512 rows: torch's kernels on both sides, the bound still holds
    assert_within(ours, reference_logits(smollm2, ids), bound)
    # the fused SDPA kernel sums in another order: equal up to float32 rounding
    assert_within(ours, reference_logits(smollm2_sdpa, ids), bound)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name,prompt", [("tiny", "ROMEO:"), ("smollm2", "The history of the Roman Empire")])
def test_greedy_generation_equals_transformers_generate(name, prompt, use_cache):
    loaded = load(name)
    engine = Engine(loaded)
    n = 64 if name == "tiny" else 32 if use_cache else 16  # without a cache each step re-reads the whole context
    trace = engine.generate(prompt, max_new_tokens=n, use_cache=use_cache)  # both stop at end-of-text
    ids = torch.tensor([trace.prompt_ids])
    with torch.no_grad():
        ref = loaded.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    assert trace.token_ids == ref[0, ids.shape[1] :].tolist()


def test_events_follow_the_four_stages(tiny_engine):
    events = []
    steps = tiny_engine.run("ROMEO:", max_new_tokens=2)
    while True:
        try:
            events.append(next(steps))
        except StopIteration as done:
            trace = done.value
            break
    for cycle in (0, 1):
        stages = [e.stage for e in events if e.cycle == cycle]
        assert stages[0] == Stage.FETCH and stages[-1] == Stage.WRITEBACK
        order = [Stage.FETCH, Stage.READ, Stage.EXECUTE, Stage.WRITEBACK]
        assert {s for s in stages} == set(order)
        per_layer = [e.op for e in events if e.cycle == cycle and e.layer == 0]
        assert per_layer[:2] == ["norm_attn", "qkv"] and per_layer[-1] == "residual_mlp"
    assert [e.op for e in events[-2:]] == ["choose", "append"]
    assert len(trace.records) == 2
    assert all(not e.tensors for e in events if e.op != "append")  # nothing captured by default


def test_captured_attention_is_causal_and_normalised(tiny_engine):
    trace = tiny_engine.generate("ROMEO: O, she doth teach", max_new_tokens=2, capture={"softmax"}, keep_events=True)
    first = next(e for e in trace.events if e.op == "softmax" and e.cycle == 0)
    probs = first.tensors["probs"][0]  # (heads, queries, keys)
    n = len(trace.prompt_ids)
    assert probs.shape[-2:] == (n, n)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert torch.all(probs.triu(diagonal=1) == 0)  # no token reads a later one
    decode = next(e for e in trace.events if e.op == "softmax" and e.cycle == 1)
    assert decode.tensors["probs"].shape[-2:] == (1, n + 1)  # one query over the whole cache


def test_kv_cache_bytes_match_the_arithmetic(smollm2_engine):
    trace = smollm2_engine.generate("Hello", max_new_tokens=5)
    cfg = smollm2_engine.loaded.model.config
    positions = len(trace.prompt_ids) + len(trace.records) - 1  # the last token is chosen, not yet stored
    expected = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * positions * 4
    assert len(smollm2_engine.cache) == positions
    assert smollm2_engine.cache.nbytes() == expected


def test_decode_flops_are_about_twice_the_weights(smollm2_engine):
    trace = smollm2_engine.generate("Hello there", max_new_tokens=3)
    model = smollm2_engine.loaded.model
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    matmul_params += model.lm_head.weight.numel()  # tied: the unembedding reads the same matrix again
    decode = trace.records[1]
    assert decode.n_inputs == 1 and trace.records[0].prefill
    assert 2 * matmul_params <= decode.flops <= 2.1 * matmul_params


MATMUL_OPS = ("qkv", "scores", "mix", "attn_out", "mlp_in", "mlp_out", "logits")


def counted_flops(engine, prompt, max_new_tokens):
    """Every event of a run, with the FLOPs torch's FlopCounterMode saw while the engine computed it
    (the code between one ``next`` and the event it yields is that op's computation)."""
    steps, rows = engine.run(prompt, max_new_tokens, stop_at_eos=False), []
    with FlopCounterMode(display=False) as counter:
        while True:
            before = counter.get_total_flops()
            try:
                event = next(steps)
            except StopIteration:
                return rows
            rows.append((event, counter.get_total_flops() - before))


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_matmul_flops_per_op_agree_with_torch_flop_counter(name, request):
    """The engine's Event.flops of each matrix-multiply op, for one prefill (cycle 0) and one decode
    step (cycle 1), equal what torch.utils.flop_counter.FlopCounterMode counts for the same op.

    Like with like: FlopCounterMode counts only matmul-like ops (mm, addmm, bmm, baddbmm, sdpa),
    so only qkv, scores, mix, attn_out, mlp_in, mlp_out and logits are compared; for the other
    ops (norms, rope, softmax, act, residual adds, the choice) the engine's counts are elementwise
    estimates that the counter does not see: there it must count no matmul at all."""
    engine = request.getfixturevalue(f"{name}_engine")
    rows = counted_flops(engine, "ROMEO: But soft, what light", 2)
    matmuls = [(e.cycle, e.layer, e.op, e.flops, counted) for e, counted in rows if e.op in MATMUL_OPS]
    assert len(matmuls) == 2 * (6 * engine.arch.n_layers + 1)  # six per layer and the logits, per cycle
    assert {op for _, _, op, _, _ in matmuls} == set(MATMUL_OPS)
    assert all(counted > 0 for *_, counted in matmuls)
    assert [row[:4] for row in matmuls] == [row[:3] + (row[4],) for row in matmuls]
    assert [(e.op, e.layer) for e, counted in rows if e.op not in MATMUL_OPS and counted] == []


def test_seeded_sampling_is_reproducible(tiny_engine):
    runs = [tiny_engine.generate("JULIET:", 20, do_sample=True, temperature=0.9, top_k=40, seed=7) for _ in range(2)]
    other = tiny_engine.generate("JULIET:", 20, do_sample=True, temperature=0.9, top_k=40, seed=8)
    assert runs[0].token_ids == runs[1].token_ids != other.token_ids


def test_forced_token_changes_the_continuation(tiny_engine):
    base = tiny_engine.generate("ROMEO:", 16, stop_at_eos=False)
    runner_up = base.records[2].top[1][0]
    branch = tiny_engine.branch(base, at_cycle=2, token=runner_up)
    assert branch.token_ids[:2] == base.token_ids[:2]
    assert branch.token_ids[2] == runner_up and branch.token_ids != base.token_ids
    assert branch.records[2].forced


def test_ablation_changes_the_continuation_and_removing_it_restores(smollm2_engine):
    base = smollm2_engine.generate("The capital of France is", 12, stop_at_eos=False)
    ablated = smollm2_engine.branch(base, at_cycle=0, ablation=ablation(mlps=[0]))
    assert ablated.token_ids != base.token_ids
    restored = smollm2_engine.branch(ablated, at_cycle=0, ablation=ablation())
    assert restored.token_ids == base.token_ids


def forward_outputs(engine, ids, off=None) -> dict:
    """Every op's output tensors of one forward pass over ``ids``, keyed by (layer, op, tensor name)."""
    steps = engine.forward(torch.tensor([ids]), KVCache(engine.arch.n_layers, len(ids)), capture="all", ablation=off)
    outputs = {}
    while True:
        try:
            event = next(steps)
        except StopIteration as done:
            outputs[(None, "logits", "returned")] = done.value
            return outputs
        outputs.update({(event.layer, event.op, key): t.clone() for key, t in event.tensors.items()})


@pytest.mark.parametrize(
    "off,layer", [(ablation(heads=[(2, 1)]), 2), (ablation(mlps=[1]), 1)], ids=["head 2.1", "mlp 1"]
)
def test_ablation_changes_only_what_lies_downstream(tiny_engine, off, layer):
    """Every tensor before the ablated part is bit-identical to the plain run's; its own output,
    every later layer's residual stream and the logits all change; undoing it restores the logits."""
    ids = tiny_engine.encode("ROMEO: What say you?")
    plain, ablated = forward_outputs(tiny_engine, ids), forward_outputs(tiny_engine, ids, off)
    assert plain.keys() == ablated.keys()
    cut = "mix" if off.heads else "mlp_out"  # the op whose output the ablation zeroes
    keys = list(plain)  # in the order the forward pass computed them
    first = keys.index((layer, cut, "out"))
    upstream = keys[:first]
    assert [k for k in upstream if not torch.equal(plain[k], ablated[k])] == []
    assert (layer - 1, "residual_mlp", "out") in upstream  # the layers before it are all compared
    if off.heads:
        ((_, head),) = off.heads
        mixed, plain_mixed = ablated[(layer, "mix", "out")], plain[(layer, "mix", "out")]
        assert torch.all(mixed[:, head] == 0) and plain_mixed[:, head].abs().sum() > 0
        others = [h for h in range(tiny_engine.arch.n_heads) if h != head]
        assert torch.equal(mixed[:, others], plain_mixed[:, others])
    else:
        assert torch.all(ablated[(layer, "mlp_out", "out")] == 0)
    downstream = [k for k in keys[first:] if k[1] in ("attn_out", "residual_attn", "residual_mlp", "logits")]
    assert (layer, "residual_mlp", "out") in downstream and (None, "logits", "returned") in downstream
    assert len({k[0] for k in downstream}) == tiny_engine.arch.n_layers - layer + 1  # this layer, later ones, None
    assert [k for k in downstream if torch.allclose(plain[k], ablated[k], atol=1e-6, rtol=0)] == []
    torch.testing.assert_close(tiny_engine.logits(ids)[0], plain[(None, "logits", "returned")][0], atol=0, rtol=0)


def test_same_seed_branch_replays_a_sampled_run(tiny_engine):
    base = tiny_engine.generate("HAMLET:", 12, do_sample=True, temperature=1.0, seed=11, stop_at_eos=False)
    assert tiny_engine.branch(base, at_cycle=5).token_ids == base.token_ids
    assert tiny_engine.replay(base).token_ids == base.token_ids


def test_trace_saves_and_loads_without_pickle(tiny_engine, tmp_path):
    trace = tiny_engine.generate("ROMEO:", 8)
    trace.save(tmp_path / "t.json")
    again = Trace.load(tmp_path / "t.json")
    assert again.to_dict() == trace.to_dict()
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["prompt_ids"] == trace.prompt_ids


def test_trace_table_has_a_header_and_a_row_per_cycle(tiny_engine):
    trace = tiny_engine.generate("ROMEO:", 5, stop_at_eos=False)
    header, *rows = trace.table(top=2, digits=3).splitlines()
    assert header.split() == ["cycle", "token", "top", "candidates", "ms"]
    assert len(rows) == len(trace.records) == 5
    for cycle, (row, record) in enumerate(zip(rows, trace.records)):
        assert int(row.split()[0]) == cycle
        assert f":{record.top[0][2]:.3f}" in row and f":{record.top[1][2]:.3f}" in row
        assert row.endswith(f"{record.seconds * 1e3:.1f}")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "   "}, "empty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
        ({"do_sample": True, "top_k": 0}, "top_k"),
        ({"max_new_tokens": 250, "prompt": "ROMEO: " * 40}, "context window"),
        ({"bogus_setting": 1}, "unknown option"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_engine, kwargs, message):
    kwargs = {"prompt": "ROMEO:", "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_engine.generate(**kwargs)


def test_logits_rejects_over_long_and_empty_input(tiny_engine):
    with pytest.raises(ValueError, match="context window"):
        tiny_engine.logits(list(range(tiny_engine.context_window + 1)))
    with pytest.raises(ValueError, match="at least one position"):
        tiny_engine.logits([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_engine.encode([10**7])


def test_unsupported_architecture_names_the_supported_families(minilm):
    with pytest.raises(ValueError, match=r"GPT-2 \(.gpt2.\), Llama \(.llama.\), Mistral.*OLMo-2.*got BertModel"):
        Engine(minilm)


def test_run_drains_to_the_same_trace_as_generate(tiny_engine):
    assert drain(tiny_engine.run("ROMEO:", 6)).token_ids == tiny_engine.generate("ROMEO:", 6).token_ids


def test_a_paused_run_leaves_autograd_on_in_the_caller(tiny_engine):
    """The engine computes without gradients, but only while it runs: between two events
    the learner's own code (e.g. a training cell) must still see autograd enabled."""
    steps = tiny_engine.run("ROMEO:", max_new_tokens=2)
    event = next(steps)
    assert event.op and torch.is_grad_enabled()
    assert not any(t.requires_grad for t in event.tensors.values())
    drain(steps)
    assert torch.is_grad_enabled()


def _alternate(*runs):
    """Advance the generators one event each in turn until all end; their return values, in order."""
    results, live = [None] * len(runs), dict(enumerate(runs))
    events = {i: [] for i in live}
    while live:
        for i in list(live):
            try:
                events[i].append(next(live[i]))
            except StopIteration as done:
                results[i] = done.value
                del live[i]
    return results, events


@pytest.mark.parametrize("model", ["tiny", "smollm2"])  # learned positions, and RoPE tables made per run
def test_two_runs_interleaved_event_by_event_equal_two_separate_runs(model, tiny_engine, smollm2_engine):
    engine = tiny_engine if model == "tiny" else smollm2_engine
    first = dict(prompt="ROMEO:", max_new_tokens=4, capture={"softmax", "positions"}, ablation=ablation(heads=[(1, 0)]))
    second = dict(
        prompt="What light through yonder window breaks? It is",
        max_new_tokens=5,
        capture={"mix"},
        do_sample=True,
        temperature=0.8,
        seed=3,
    )
    (a, b), events = _alternate(engine.run(**_run_args(first)), engine.run(**_run_args(second)))
    alone_a, alone_b = engine.generate(**first, keep_events=True), engine.generate(**second, keep_events=True)
    for mixed, alone, evs in ((a, alone_a, events[0]), (b, alone_b, events[1])):
        assert mixed.token_ids == alone.token_ids
        assert [r.prob for r in mixed.records] == pytest.approx([r.prob for r in alone.records], abs=1e-6)
        captured = [e for e in evs if e.tensors]
        assert [(e.cycle, e.layer, e.op) for e in captured] == [
            (e.cycle, e.layer, e.op) for e in alone.events if e.tensors
        ]
        for got, want in zip(captured, (e for e in alone.events if e.tensors)):
            for key in want.tensors:
                torch.testing.assert_close(got.tensors[key], want.tensors[key])


def _run_args(options: dict) -> dict:
    """``generate``'s keywords as ``run`` takes them (sampling settings gathered into ``sampling=``)."""
    from cyclelab import Sampling

    names = set(Sampling.__dataclass_fields__)
    rest = {k: v for k, v in options.items() if k not in names}
    return {**rest, "sampling": Sampling(**{k: v for k, v in options.items() if k in names})}


def test_token_text_is_the_tokenizers_decoding_each_time(smollm2_engine):
    ids = [0, 1, 42, 9000, 42, 49151]  # 42 twice: the second answer comes from the engine's memo
    assert [smollm2_engine.token_text(i) for i in ids] == [smollm2_engine.tokenizer.decode([i]) for i in ids]


def test_module_parts_are_what_attributes_give(tiny):
    from cyclelab.core.blocks import parts
    from cyclelab.lab.quantize import int8_linear_of

    block = tiny.model.transformer.h[0]
    assert all(a is b for a, b in zip(parts(block, "attn", "ln_1"), (block.attn, block.ln_1)))
    conv = block.attn.c_attn
    assert all(a is b for a, b in zip(parts(conv, "weight", "bias"), (conv.weight, conv.bias)))
    no_bias = torch.nn.Linear(4, 3, bias=False)
    assert parts(no_bias, "weight", "bias") == (no_bias.weight, None)
    packed = int8_linear_of(torch.randn(3, 4), torch.randn(3))
    assert all(
        a is b
        for a, b in zip(parts(packed, "q", "scale", "bias", "in_features"), (packed.q, packed.scale, packed.bias, 4))
    )
