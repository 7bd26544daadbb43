"""The debugger, driven from Python as a learner would drive the widget: click, set values, read the views."""

import gc
import json
import re
import time
from pathlib import Path

import pytest
import torch

from cyclelab import Debugger, Sampling, Trace, ablation
from cyclelab.debugger.views import to_text

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny" / "config.json"
PROMPT = "ROMEO:"


@pytest.fixture
def engine(request):
    """The tiny Shakespeare model's engine (skipped until it is trained)."""
    if not TINY.exists():
        pytest.skip("the tiny model is not trained yet (data/tiny/config.json): run `cyclelab train-tiny`")
    return request.getfixturevalue("tiny_engine")


@pytest.fixture
def base(engine):
    """The plain greedy run the debugger should reproduce."""
    return engine.generate(PROMPT, 12, stop_at_eos=False)


def make(engine, n=12, **options):
    dbg = Debugger(engine, PROMPT, max_new_tokens=n, **options)
    dbg.widget()
    return dbg


def click(dbg, name, times=1):
    for _ in range(times):
        dbg.controls[name].click()


def view(dbg, name):
    return dbg.views[name].value


def no_model(monkeypatch, engine):
    """Any model computation from here on fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was called")

    monkeypatch.setattr(engine, "forward", forbidden)
    monkeypatch.setattr(engine.arch, "forward", forbidden)
    monkeypatch.setattr(engine, "run", forbidden)


# ---------------------------------------------------------------- moving


def test_next_token_three_times_shows_cycle_3_and_three_tokens(engine, base):
    dbg = make(engine)
    click(dbg, "Next token", 3)
    assert view(dbg, "counter") == "cycle 3"
    assert dbg.cycle == 3 and dbg.token_ids == base.token_ids[:3]
    assert view(dbg, "text").count("<span title='#") == 3
    assert "▶ WRITEBACK" in view(dbg, "pipeline") and dbg.current_event.op == "append"


def test_back_cycle_and_replay_need_no_model_call(engine, base, monkeypatch):
    dbg = make(engine)
    click(dbg, "Next token", 3)
    no_model(monkeypatch, engine)
    click(dbg, "Back cycle")
    assert view(dbg, "counter") == "cycle 2" and dbg.token_ids == base.token_ids[:2]
    click(dbg, "Back")
    assert dbg.cycle == 1 and dbg.current_event.op == "choose"
    click(dbg, "Next token")  # replayed from the history
    assert view(dbg, "counter") == "cycle 2" and view(dbg, "error") == ""
    click(dbg, "Reset")
    assert dbg.position == -1 and view(dbg, "counter") == "cycle 0"
    dbg.controls["jump"].value = 3
    assert dbg.cycle == 3 and dbg.token_ids == base.token_ids[:3]


def test_step_and_step_layer_walk_the_micro_ops(engine):
    dbg = make(engine)
    click(dbg, "Step")
    assert dbg.current_event.op == "embed" and "▶ FETCH" in view(dbg, "pipeline")
    click(dbg, "Step layer")
    assert dbg.current_event.op == "positions"
    click(dbg, "Step layer")
    assert (dbg.current_event.layer, dbg.current_event.op) == (0, "residual_mlp")
    assert "▶ EXECUTE L0" in view(dbg, "pipeline") and "L0" in view(dbg, "registers")
    kept = {e.op: e.tensors for e in dbg.history}
    assert kept["residual_mlp"]["x"].dim() == 1  # the last position only: memory stays bounded
    assert kept["softmax"]["probs"].shape[0] == engine.arch.n_heads and "keys" not in kept["kv_cache"]
    click(dbg, "Back", 3)
    assert dbg.current_event.op == "mlp_in"
    click(dbg, "Back", dbg.position)
    assert dbg.position == 0 and dbg.current_event.op == "embed"


def test_run_to_and_end_of_generation(engine, base):
    dbg = make(
        engine,
        n=5,
    )
    dbg.controls["cycle n"].value = 4
    click(dbg, "Run to cycle")
    assert dbg.cycle == 4
    click(dbg, "Continue")  # no breakpoint: to the end
    assert dbg.cycle == len(dbg.records) <= 5 and "end of generation" in view(dbg, "message")
    dbg.run_to(1)
    assert dbg.cycle == 1 and dbg.token_ids == base.token_ids[:1]


def test_text_mode_shows_every_view(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=6)
    dbg.next(), dbg.next()
    text = str(dbg)
    assert "cycle 2" in text and text.index("FETCH") < text.index("READ") < text.index("EXECUTE") < text.index(
        "WRITEBACK"
    )
    for heading in ("Registers", "Memory", "Output", "Sampler", "Text so far"):
        assert heading in text
    assert "".join(dbg.tokens).strip()[:3] in text.replace("␣", " ")
    assert "<" not in text.replace("<cycle", "")  # no markup left
    assert repr(dbg).startswith("<Debugger")


# ---------------------------------------------------------------- breakpoints


def test_continue_stops_at_a_token_breakpoint(engine, base):
    target = base.records[4].token
    first = next(r.cycle for r in base.records if r.token == target)
    dbg = make(engine)
    dbg.controls["break token"].value = target
    click(dbg, "Break on token")
    click(dbg, "Continue")
    assert dbg.cycle == first + 1 and dbg.tokens[-1] == target
    assert "stopped" in view(dbg, "message") and repr(target)[1:-1] in view(dbg, "status")


def test_probability_and_entropy_breakpoints(engine, base):
    probs = [r.prob for r in base.records]
    p = (min(probs) + max(probs)) / 2
    dbg = make(engine)
    dbg.controls["break p"].value = p
    click(dbg, "Break below p")
    click(dbg, "Continue")
    stop = dbg.cycle - 1
    assert probs[stop] < p and all(q >= p for q in probs[:stop])

    entropies = [r.entropy for r in base.records]
    h = (min(entropies) + max(entropies)) / 2
    dbg = make(engine)
    dbg.controls["break entropy"].value = h
    click(dbg, "Break above entropy")
    click(dbg, "Continue")
    stop = dbg.cycle - 1
    assert entropies[stop] > h and all(e <= h for e in entropies[:stop])
    click(dbg, "Clear breakpoints")
    assert dbg.breakpoints == []


def test_layer_op_breakpoint_stops_on_that_op(engine):
    dbg = make(engine)
    dbg.controls["break layer"].value = 1
    dbg.controls["break op"].value = "softmax"
    click(dbg, "Break at op")
    click(dbg, "Continue")
    event = dbg.current_event
    assert (event.cycle, event.layer, event.op) == (0, 1, "softmax")
    click(dbg, "Continue")
    assert (dbg.current_event.cycle, dbg.current_event.layer, dbg.current_event.op) == (1, 1, "softmax")
    assert f"layer {dbg.watch_layer}, head {dbg.watch_head}" in view(dbg, "memory")


def hf_lens_top1(loaded, ids: list[int], layer: int) -> int:
    """Independent logit lens from transformers: block ``layer``'s output at the last position,
    through the final LayerNorm and the unembedding (hidden_states[layer + 1]; not the last block,
    whose hidden state transformers returns already normed)."""
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0, -1]
        return int(loaded.model.lm_head(loaded.model.transformer.ln_f(hidden)).argmax())


def test_lens_breakpoint_stops_where_the_layer_changes_its_mind(engine, base):
    layer = 2
    dbg = make(engine)
    dbg.controls["break layer"].value = layer
    click(dbg, "Break on lens change")
    click(dbg, "Continue")
    event = dbg.current_event
    assert "logit-lens" in dbg.message and (event.op, event.layer) == ("residual_mlp", layer)
    changed = []
    for cycle in range(event.cycle + 1):
        ids = base.prompt_ids + base.token_ids[:cycle]
        changed.append(hf_lens_top1(engine.loaded, ids, layer) != hf_lens_top1(engine.loaded, ids, layer - 1))
    assert changed[-1] and not any(changed[:-1])  # the first cycle where it changes, none before


def test_lens_breakpoint_needs_a_layer_below(engine):
    dbg = make(engine)
    dbg.controls["break layer"].value = 0
    click(dbg, "Break on lens change")
    assert dbg.breakpoints == [] and "from 1" in view(dbg, "error")


# ---------------------------------------------------------------- interventions


def test_choose_the_runner_up_branches_and_keeps_the_old_branch(engine, base):
    dbg = make(engine)
    dbg.run_to(3)
    runner_up = int(torch.topk(dbg.history[dbg.now.ends[2] - 1].tensors["logits"], 2).indices[1])
    dbg.controls["candidates"].value = 1
    click(dbg, "Choose")
    assert dbg.current_event.op == "append" and dbg.records[-1].token_id == runner_up  # written back: still cycle 3
    assert view(dbg, "counter") == "cycle 3" and "<div>cycle 3: forced" in view(dbg, "message")
    assert len(dbg.branches) == 1 and dbg.branches[0].token_ids[:3] == base.token_ids[:3]
    dbg.run_to(8)
    expected = engine.branch(base, at_cycle=2, token=runner_up, max_new_tokens=8)
    assert dbg.token_ids == expected.token_ids and dbg.records[2].forced
    dbg.switch_branch(0)  # the old timeline is still reachable
    assert dbg.token_ids == base.token_ids[: dbg.cycle]


def test_ablating_a_head_changes_the_following_tokens(engine, base):
    heads = [(layer, head) for layer in range(engine.arch.n_layers) for head in range(engine.arch.n_heads)]
    changed = next(
        h for h in heads if engine.branch(base, at_cycle=2, ablation=ablation(heads=[h])).token_ids != base.token_ids
    )
    expected = engine.branch(base, at_cycle=2, ablation=ablation(heads=[changed]))
    dbg = make(engine)
    dbg.run_to(2)
    dbg.controls["ablate layer"].value, dbg.controls["ablate head"].value = changed
    click(dbg, "Ablate head")
    dbg.run_to(12)
    assert dbg.token_ids[:2] == base.token_ids[:2]
    assert dbg.token_ids == expected.token_ids != base.token_ids
    assert f"L{changed[0]} H{changed[1]}" in view(dbg, "status")


def test_sampling_from_the_widgets_matches_the_engine(engine):
    dbg = make(engine, n=8)
    c = dbg.controls
    c["sample"].value, c["temperature"].value, c["top-k"].value, c["seed"].value = True, 0.8, 20, 3
    assert dbg.sampling == Sampling(do_sample=True, temperature=0.8, top_k=20, seed=3)
    dbg.run_to(8)
    assert dbg.token_ids == engine.generate(PROMPT, 8, sampling=dbg.sampling).token_ids
    assert "draw u =" in view(dbg, "sampler") and "top_k" in view(dbg, "sampler")


def test_changing_the_sampler_mid_run_previews_without_the_model_then_branches(engine, base, monkeypatch):
    dbg = make(engine)
    dbg.run_to(3)
    with monkeypatch.context() as m:
        no_model(m, engine)
        dbg.controls["sample"].value = True
        dbg.controls["top-p"].value = 0.5  # re-runs only the sampler on this cycle's logits
        dbg.controls["min-p"].value = 0.05
        dbg.controls["seed"].value = 5
    assert "top_p" in view(dbg, "sampler") and "min_p" in view(dbg, "sampler") and view(dbg, "error") == ""
    assert dbg.sampling.min_p == 0.05 and "min-p 0.05" in str(dbg)
    dbg.run_to(8)
    expected = engine.branch(base, at_cycle=3, sampling=dbg.sampling, max_new_tokens=8)
    assert dbg.token_ids == expected.token_ids


def test_invalid_settings_show_an_error_instead_of_raising(engine):
    dbg = make(engine)
    dbg.controls["top-p"].value = 0.0
    assert "top_p" in view(dbg, "error")
    assert dbg.sampling.top_p is None  # the old settings stay
    click(dbg, "Choose")  # nothing chosen yet
    assert "no token has been chosen" in view(dbg, "error")
    dbg.controls["cycle n"].value = -1
    click(dbg, "Run to cycle")
    assert "cycle must be" in view(dbg, "error")
    click(dbg, "Next token")
    assert view(dbg, "error") == "" and dbg.cycle == 1
    with pytest.raises(ValueError, match="top_k"):  # text mode raises as Python does
        dbg.set_sampling(do_sample=True, top_k=0)


def test_export_writes_json_that_trace_load_reads(engine, tmp_path):
    dbg = make(engine)
    dbg.run_to(4)
    dbg.choose(1)  # writes the forced token back: still 4 tokens
    dbg.controls["export path"].value = str(tmp_path / "trace.json")
    click(dbg, "Export")
    raw = json.loads((tmp_path / "trace.json").read_text())
    trace = Trace.load(tmp_path / "trace.json")
    assert trace.token_ids == dbg.token_ids and len(trace.records) == 4
    assert raw["settings"]["interventions"] and trace.records[3].forced
    click(dbg, "Export HTML")  # the replay page, beside the JSON
    page = (tmp_path / "trace.html").read_text()
    assert "cyclelab debugger: tiny, 4 tokens" in page and "saved a replay of 4 tokens" in view(dbg, "message")


def test_other_engine_users_do_not_corrupt_a_paused_run(engine, base):
    dbg = make(engine)
    dbg.next()
    dbg.step_layer(), dbg.step_layer()  # paused inside the forward pass
    engine.generate("JULIET:", 3)  # someone else uses the engine meanwhile
    dbg.run_to(6)
    assert dbg.token_ids == base.token_ids[:6]


def test_a_paused_run_leaves_autograd_on_for_the_caller(engine):
    """Engine.forward holds no_grad across its yields; a paused debugger must not leak it."""
    dbg = make(engine)
    click(dbg, "Step layer", 3)  # paused inside the forward pass
    assert torch.is_grad_enabled()
    dbg.set_sampling(do_sample=True, seed=1)  # closes the paused run
    assert torch.is_grad_enabled()
    dbg.step_layer()
    del dbg
    gc.collect()
    assert torch.is_grad_enabled()


def transformers_lens(loaded, ids, k=3):
    """Per layer, the top-``k`` (token, probability) at the last position from transformers alone: each
    block's hidden state (output_hidden_states=True) through the model's final norm and lm_head.
    transformers' last hidden state has the final norm applied already, so it goes straight to lm_head."""
    model = loaded.model
    final_norm = getattr(model.base_model, "ln_f", None) or model.base_model.norm
    with torch.no_grad():
        hidden = [h[0, -1] for h in model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1:]]
        normed = [final_norm(h) for h in hidden[:-1]] + [hidden[-1]]
        top = torch.topk(torch.softmax(model.lm_head(torch.stack(normed)).float(), -1), k)
    return [[loaded.tokenizer.decode([int(i)]) for i in ids] for ids in top.indices], top.values


@pytest.mark.parametrize("name,prompt", [("tiny", PROMPT), ("smollm2", "The capital of France is")])
def test_logit_lens_agrees_with_transformers_hidden_states(name, prompt, request):
    """The registers view's logit lens at every layer, for the prompt (cycle 0) and one decode step."""
    engine = request.getfixturevalue("engine" if name == "tiny" else "smollm2_engine")
    dbg = Debugger(engine, prompt, max_new_tokens=2)
    for _ in range(2):
        dbg.next()
        registers = dbg.state().registers
        tokens, probs = transformers_lens(engine.loaded, list(dbg.prompt_ids) + dbg.token_ids[:-1])
        assert [r.layer for r in registers] == list(range(engine.arch.n_layers))
        assert [[t for t, _ in r.lens] for r in registers] == tokens
        torch.testing.assert_close(torch.tensor([[p for _, p in r.lens] for r in registers]), probs, atol=1e-4, rtol=0)


def test_each_click_lands_where_it_should_and_its_latency_is_printed(engine, base):
    dbg = make(engine)
    expected = {
        "Step": (0, "embed"),
        "Step layer": (0, "positions"),
        "Next token": (1, "append"),
        "Back cycle": (0, None),
        "Next token again": (1, "append"),
    }
    times = []
    for name, (cycle, op) in expected.items():
        start = time.perf_counter()
        click(dbg, name.removesuffix(" again"))
        times.append(time.perf_counter() - start)
        assert (dbg.cycle, dbg.current_event and dbg.current_event.op) == (cycle, op), name
    assert dbg.token_ids == base.token_ids[:1]
    print("click latency (ms):", [f"{t * 1e3:.1f}" for t in times])


# ---------------------------------------------------------------- faults inside button handlers


def raise_once(monkeypatch, owner, name):
    """Make ``owner.name`` raise RuntimeError('injected fault') on its next call, then work again."""
    original, calls = getattr(owner, name), []

    def faulty(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)


def fault_in_the_forward_pass(dbg, monkeypatch):
    raise_once(monkeypatch, dbg.engine, "forward")
    click(dbg, "Next token")


def fault_mid_cycle(dbg, monkeypatch):
    click(dbg, "Step layer", 2)  # paused inside cycle 2's forward pass
    raise_once(monkeypatch, dbg._live, "next")
    click(dbg, "Step layer")


def fault_in_the_views(dbg, monkeypatch):
    raise_once(monkeypatch, dbg, "state")
    click(dbg, "Back")


def fault_in_the_logit_lens(dbg, monkeypatch):
    click(dbg, "Step layer", 2)  # the registers view shows layer 0's logit lens
    raise_once(monkeypatch, dbg.engine, "read_out")  # the lens's final norm and unembedding
    click(dbg, "Step layer")  # layer 1's lens fails


def fault_in_the_sampler_controls(dbg, monkeypatch):
    raise_once(monkeypatch, dbg, "_invalidate")
    dbg.controls["sample"].value = True


def fault_in_the_reference_model(dbg, monkeypatch):
    raise_once(monkeypatch, dbg.engine.loaded.model, "forward")
    click(dbg, "Check vs transformers")


def fault_writing_the_export(dbg, monkeypatch):
    dbg.controls["export path"].value = "/nonexistent-folder/trace.json"
    click(dbg, "Export")


def fault_writing_the_replay(dbg, monkeypatch):
    dbg.controls["export path"].value = "/nonexistent-folder/trace.json"
    click(dbg, "Export HTML")


@pytest.mark.parametrize(
    "inject,shown",
    [
        pytest.param(inject, shown, id=inject.__name__.replace("_", "-"))
        for inject, shown in [
            (fault_in_the_forward_pass, "RuntimeError: injected fault"),
            (fault_mid_cycle, "RuntimeError: injected fault"),
            (fault_in_the_views, "cannot draw the views: RuntimeError: injected fault"),
            (fault_in_the_logit_lens, "cannot draw the views: RuntimeError: injected fault"),
            (fault_in_the_sampler_controls, "RuntimeError: injected fault"),
            (fault_in_the_reference_model, "RuntimeError: injected fault"),
            (fault_writing_the_export, "FileNotFoundError: .*nonexistent-folder"),
            (fault_writing_the_replay, "FileNotFoundError: .*nonexistent-folder/trace.html"),
        ]
    ],
)
def test_a_fault_in_a_button_handler_shows_in_the_status_line_and_the_widget_keeps_working(
    engine, base, monkeypatch, inject, shown
):
    """The exception never reaches the kernel (a click returns normally); the next click works."""
    dbg = make(engine)
    click(dbg, "Next token", 2)
    inject(dbg, monkeypatch)  # clicks return: nothing raised into the kernel
    assert re.search(shown, view(dbg, "error")), view(dbg, "error")
    click(dbg, "Run to cycle")  # to the end: n = max_new_tokens
    assert view(dbg, "error") == "" and view(dbg, "counter") == "cycle 12"
    assert dbg.token_ids == base.token_ids


# ---------------------------------------------------------------- the big model


def test_smollm2_widget_views_and_faithfulness(smollm2_engine):
    dbg = Debugger(smollm2_engine, "The capital of France is", max_new_tokens=4)
    dbg.widget()
    click(dbg, "Next token", 3)
    assert view(dbg, "counter") == "cycle 3" and len(dbg.tokens) == 3
    assert view(dbg, "text").count("<span title='#") == 3
    assert to_text(view(dbg, "registers")).count("\nL") == smollm2_engine.arch.n_layers
    assert "L0–L29" in view(dbg, "memory")
    assert "decode: 1 token in" in view(dbg, "pipeline") and "prefill (cycle 1 reads the prompt at once)" in view(
        dbg, "cost"
    )
    click(dbg, "Check vs transformers")
    assert dbg.faith is not None and dbg.faith < 1e-3 and "transformers" in view(dbg, "message")
    dbg.watch(3, 8)
    assert "layer 3, head 8" in view(dbg, "memory")
