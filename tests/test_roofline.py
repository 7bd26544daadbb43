"""The roofline and throughput helpers: the roof by hand, the engine's FLOPs against torch's
FlopCounterMode, the GEMV ceiling's weights against the config, and batched decode against
one sequence at a time."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cyclelab.core.attention import KVCache
from cyclelab.core.engine import drain
from cyclelab.lab.roofline import (
    Machine,
    best_of,
    count_torch_ops,
    gemv_ceiling,
    op_costs,
    phase_costs,
    weight_matrices,
)
from cyclelab.lab.throughput import batch_decode, cache_scaling

MATMUL_OPS = ("qkv", "scores", "mix", "attn_out", "mlp_in", "mlp_out", "logits")


def test_roof_by_hand():
    m = Machine(peak_flops=50e9, bandwidth=20e9, dispatch=5e-6)
    assert m.ridge == 2.5  # FLOPs per byte where the two limits meet
    assert m.attainable(0.5) == 10e9  # memory-bound: 0.5 FLOP/B × 20 GB/s
    assert m.attainable(100) == 50e9  # compute-bound: the peak


def test_count_torch_ops_counts_each_aten_call():
    a, b = torch.ones(3), torch.ones(3)
    assert count_torch_ops(lambda: (a + b) * b) == 2
    assert count_torch_ops(lambda: None) == 0


def test_engine_matmul_flops_equal_flop_counter_mode(tiny, tiny_engine):
    """FlopCounterMode counts the matmuls (and attention) of transformers' own forward pass."""
    ids = torch.tensor([tiny_engine.encode("ROMEO:\nBut soft, what light through yonder window breaks?")])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tiny.model(ids)
    events = []
    drain(tiny_engine.forward(ids, KVCache(tiny_engine.arch.n_layers, ids.shape[1])), events.append)
    assert sum(e.flops for e in events if e.op in MATMUL_OPS) == counter.get_total_flops()


def test_weight_matrices_of_tiny_are_its_conv1d_weights_and_the_unembedding(tiny):
    cfg = tiny.model.config
    d, layers, vocab = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_layer = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # c_attn, attn c_proj, c_fc, mlp c_proj as (out, in)
    shapes = [tuple(w.shape) for w in weight_matrices(tiny.model)]
    assert sorted(shapes) == sorted(per_layer * layers + [(vocab, d)])
    for kernel in ("torch", "engine"):
        ceiling = gemv_ceiling(tiny.model, repeats=1, kernel=kernel)
        assert ceiling["bytes"] == 4 * (layers * 12 * d * d + vocab * d)
        assert ceiling["tokens_per_s"] == pytest.approx(1 / ceiling["seconds"])
    with pytest.raises(ValueError, match="kernel must be 'torch' or 'engine'"):
        gemv_ceiling(tiny.model, kernel="mkl")


def test_phase_costs_of_tiny(tiny_engine):
    machine = Machine(50e9, 20e9, 5e-6)
    ids = tiny_engine.encode("ROMEO:\nBut soft, what light")
    prefill, decode = phase_costs(tiny_engine, ids, machine, repeats=1)
    assert (prefill["phase"], prefill["tokens"], decode["phase"], decode["tokens"]) == (
        "prefill",
        len(ids) - 1,
        "decode",
        1,
    )
    weights = gemv_ceiling(tiny_engine.loaded.model, repeats=1)["bytes"]
    assert decode["bytes"] >= weights  # a decode step reads every weight matrix
    assert prefill["flops"] > decode["flops"] * (len(ids) - 2)  # prefill does the matmuls for every position
    assert decode["memory_s"] == decode["bytes"] / 20e9 and decode["overhead_s"] == decode["torch_ops"] * 5e-6
    assert decode["bound"] == max(("compute", "memory", "overhead"), key=lambda k: decode[f"{k}_s"])
    assert "attention" in decode["ops"] and "scores" not in decode["ops"]
    assert sum(c.flops for c in decode["ops"].values()) == decode["flops"]


def test_op_costs_groups_attention():
    from cyclelab.core.events import Event, Stage

    events = [
        Event(0, Stage.READ, 0, "kv_cache", 0.1, 0, 8),
        Event(0, Stage.EXECUTE, 0, "scores", 0.2, 4, 0),
        Event(0, Stage.READ, 0, "qkv", 0.3, 10, 20),
        Event(0, Stage.READ, 1, "qkv", 0.3, 10, 20),
    ]
    costs = op_costs(events)
    assert (costs["attention"].flops, costs["attention"].bytes) == (4, 8)
    assert (costs["qkv"].flops, costs["qkv"].bytes) == (20, 40)


def test_batched_decode_equals_one_sequence_at_a_time(tiny_engine):
    ids = torch.tensor(
        [tiny_engine.encode(text)[:6] for text in ("ROMEO:\nBut soft, what light", "JULIET:\nO Romeo, Romeo!")]
    )
    n = tiny_engine.arch.n_layers
    batched = drain(tiny_engine.forward(ids, KVCache(n, 6)))
    for row in range(2):
        alone = drain(tiny_engine.forward(ids[row : row + 1], KVCache(n, 6)))
        torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=0)


def test_throughput_rows(tiny_engine):
    rows = batch_decode(tiny_engine, (1, 3), prompt_len=4, steps=2)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["tokens_per_s"] == pytest.approx(r["batch"] / (r["ms_per_step"] / 1e3)) for r in rows)
    scaling = cache_scaling(tiny_engine, (8, 16), decode_steps=2)
    assert [r["context"] for r in scaling] == [8, 16]
    assert all(r["speedup"] == pytest.approx(r["no_cache_ms"] / r["kv_cache_ms"]) for r in scaling)


BAD = {
    "best_of zero repeats": (
        lambda e: best_of(lambda: None, 0),
        ValueError,
        r"repeats must be a positive integer, got 0",
    ),
    "phase_costs one id": (lambda e: phase_costs(e, [5], Machine(1, 1, 1)), ValueError, r"at least 2 token ids"),
    "batch sizes empty": (lambda e: batch_decode(e, []), ValueError, r"batch_sizes must be a non-empty list"),
    "batch size zero": (lambda e: batch_decode(e, [1, 0]), ValueError, r"batch_sizes must be .*positive integers"),
    "decode steps float": (lambda e: cache_scaling(e, (8,), 1.5), ValueError, r"decode_steps must be"),
    "context too long": (lambda e: cache_scaling(e, (10**6,)), ValueError, r"exceed the model's context window"),
    "no matrices": (lambda e: weight_matrices(torch.nn.ReLU()), ValueError, r"ReLU has no Linear or Conv1D weights"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error(name, tiny_engine):
    call, error, message = BAD[name]
    with pytest.raises(error, match=message):
        call(tiny_engine)
