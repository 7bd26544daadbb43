"""Before/after comparison of two versions of a model, cycle by cycle, checked against transformers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cyclelab import Engine
from cyclelab.lab.compare import before_after, compare_runs, cycle_logits, format_shifts, plot_shifts
from cyclelab.loading.loader import Loaded
from cyclelab.train.finetune import add_lora, merge_lora

PROMPT = "My love is"


@pytest.fixture(scope="module")
def changed(tiny):
    """tiny with a LoRA update of random B on every attention, merged back into plain weights."""
    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny.model), ["c_attn"], r=4, alpha=8)
    for name, p in model.named_parameters():
        if name.endswith(".B"):
            torch.nn.init.normal_(p, std=0.05)
    return Loaded("tiny (changed)", merge_lora(model).eval(), tiny.tokenizer, "test")


def test_shifts_agree_with_the_models_own_forward(tiny, changed) -> None:
    shifts = before_after(Engine(tiny), Engine(changed), PROMPT, max_new_tokens=6, movers=4)
    assert [s.cycle for s in shifts] == list(range(6))
    reference = Engine(tiny).generate(PROMPT, 6)  # greedy: the tokens the comparison forced on the new model
    prompt = reference.prompt_ids
    assert [s.token for s in shifts] == [r.token for r in reference.records]
    with torch.no_grad():
        old = torch.softmax(tiny.model(torch.tensor([reference.all_ids])).logits[0], -1)
        new = torch.softmax(changed.model(torch.tensor([reference.all_ids])).logits[0], -1)
    for s, token in zip(shifts, reference.token_ids):
        at = len(prompt) + s.cycle - 1  # the position whose logits chose this cycle's token
        assert s.before == pytest.approx(float(old[at, token]), abs=1e-4)
        assert s.after == pytest.approx(float(new[at, token]), abs=1e-4)
        assert s.after_choice == tiny.tokenizer.decode([int(new[at].argmax())])
        moved = (new[at] - old[at]).abs()
        top = torch.topk(moved, 4)
        assert [m[0] for m in s.movers] == [tiny.tokenizer.decode([i]) for i in top.indices.tolist()]
        assert abs(s.movers[0][2] - s.movers[0][1]) >= abs(s.change) - 1e-6  # the biggest mover moved at least as much
    assert max(abs(s.change) for s in shifts) > 1e-3  # the change did move something


def test_a_model_compared_with_itself_moves_nothing(tiny) -> None:
    shifts = before_after(Engine(tiny), Engine(tiny), PROMPT, max_new_tokens=4)
    assert all(s.change == pytest.approx(0, abs=1e-6) and s.after_choice == s.token for s in shifts)
    table = format_shifts(shifts)
    assert table.splitlines()[0].split()[:4] == ["cycle", "token", "before", "after"]
    assert len(table.splitlines()) == 5
    fig = plot_shifts(shifts)
    assert len(fig.axes[0].patches) == 2 * len(shifts)


def test_one_pass_gives_the_logits_each_cycle_chose_from(tiny) -> None:
    """The causal mask makes one forward pass over the run equal to replaying it cycle by cycle."""
    engine = Engine(tiny)
    kept = engine.generate(PROMPT, 5, capture={"logits"}, keep_events=True)
    per_cycle = torch.stack([e.tensors["out"][0, -1] for e in kept.events if e.op == "logits"])
    assert torch.allclose(cycle_logits(engine, kept), per_cycle, atol=1e-4)


def test_compare_bad_input(tiny, changed) -> None:
    engine = Engine(tiny)
    run = engine.generate(PROMPT, 3)
    with pytest.raises(ValueError, match="movers"):
        compare_runs(engine, engine, run, movers=0)
    with pytest.raises(ValueError, match="no generated tokens"):
        cycle_logits(engine, dataclasses.replace(run, records=[]))
    with pytest.raises(TypeError, match="expected a Trace"):
        compare_runs(engine, Engine(changed), "My love is")
    from transformers import GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=1, n_embd=16, n_head=2, n_positions=64)).eval()
    with pytest.raises(ValueError, match="two versions of one model"):
        before_after(engine, Engine(Loaded("another model", small, tiny.tokenizer, "test")), PROMPT, 2)
    with pytest.raises(ValueError, match="vocabularies differ"):
        compare_runs(engine, Engine(Loaded("another model", small, tiny.tokenizer, "test")), run)


def test_a_run_of_another_tokenizer_is_refused(tiny, smollm2) -> None:
    with pytest.raises(ValueError, match="tokenizer fingerprint differs"):
        compare_runs(Engine(tiny), Engine(tiny), Engine(smollm2).generate("Hi", 1))


def test_the_engine_asks_for_lora_to_be_merged(tiny) -> None:
    wrapped = add_lora(copy.deepcopy(tiny.model), ["c_attn"], r=2, alpha=4)
    with pytest.raises(ValueError, match="merge_lora"):
        Engine(Loaded("tiny + LoRA", wrapped, tiny.tokenizer, "test"))
