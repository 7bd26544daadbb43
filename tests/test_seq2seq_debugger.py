"""The debugger and its offline replay on an encoder–decoder: both memories in view, against transformers."""

from __future__ import annotations

import re

import pytest
import torch
from test_seq2seq import random_marian  # noqa: F401 - a fixture

from cyclelab import Debugger, Trace
from cyclelab.core.seq2seq_engine import Seq2SeqEngine
from cyclelab.debugger.seq2seq import Seq2SeqDebugger

SOURCE = [5, 9, 12, 33, 7, 1]


@pytest.fixture
def engine(random_marian):  # noqa: F811
    return Seq2SeqEngine(random_marian)


def make(engine, n: int = 6) -> Seq2SeqDebugger:
    dbg = Debugger(engine, SOURCE, max_new_tokens=n)
    dbg.widget()
    return dbg


def click(dbg, name: str, times: int = 1) -> None:
    for _ in range(times):
        dbg.controls[name].click()


def test_debugger_of_an_encoder_decoder_steps_the_encoder_pass_first(engine):
    dbg = make(engine)
    assert isinstance(dbg, Seq2SeqDebugger)
    click(dbg, "Step")
    assert dbg.current_event.op == "enc_embed"
    ops = []
    while dbg.current_event.op != "embed":  # the encoder pass, then the decoder's FETCH
        ops.append(dbg.current_event.op)
        click(dbg, "Step")
    assert ops[-engine.arch.n_layers :] == ["cross_kv"] * engine.arch.n_layers  # it ends writing the encoder memory
    assert all(op.startswith("enc_") for op in ops[: -engine.arch.n_layers])


def test_tokens_and_faithfulness_match_transformers(engine):
    dbg = make(engine)
    click(dbg, "Next token", 4)
    assert dbg.token_ids == engine.generate(SOURCE, 4, stop_at_eos=False).token_ids
    assert dbg.faithfulness() < 1e-4  # float32 sums in other orders: see tests/test_seq2seq.py


def test_memory_panel_shows_kv_cache_and_encoder_memory(engine, random_marian):  # noqa: F811
    dbg = make(engine)
    click(dbg, "Next token", 3)
    state = dbg.state()
    width = random_marian.model.config.d_model
    assert [r.length for r in state.memory] == [3, 3, 3]  # the start token and two chosen tokens
    assert [r.nbytes for r in state.memory] == [2 * 3 * width * 4] * 3
    assert [r.length for r in state.encoder_memory] == [len(SOURCE)] * 3  # written once, the source's length
    assert [r.nbytes for r in state.encoder_memory] == [2 * len(SOURCE) * width * 4] * 3
    dbg.watch(2, 1)
    state = dbg.state()
    with torch.no_grad():
        out = random_marian.model(
            input_ids=torch.tensor([SOURCE]),
            decoder_input_ids=torch.tensor([[0] + dbg.token_ids[:2]]),
            output_attentions=True,
        )
    want = out.cross_attentions[2][0, 1, -1]  # layer 2, head 1, the third token's query
    assert torch.allclose(torch.tensor(state.cross.weights), want, atol=1e-5)
    assert len(state.cross.tokens) == len(SOURCE)
    html = dbg.views["memory"].value
    assert "encoder memory" in html and "cross-attention, over the source" in html


def test_back_cycle_replays_from_the_history_and_choose_branches(engine, monkeypatch):
    dbg = make(engine)
    click(dbg, "Next token", 3)
    before = list(dbg.token_ids)
    monkeypatch.setattr(engine, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model called")))
    click(dbg, "Back cycle")
    click(dbg, "Next token")
    assert dbg.token_ids == before and dbg.views["error"].value == ""
    monkeypatch.undo()
    dbg.choose(2)
    assert dbg.token_ids[:2] == before[:2] and dbg.token_ids[2] != before[2] and len(dbg.branches) == 1
    forced = dbg.token_ids
    assert engine.generate(SOURCE, 3, force=[None, None, forced[2]]).token_ids == forced


def test_greedy_only(engine):
    with pytest.raises(ValueError, match="decodes greedily"):
        Debugger(engine, SOURCE, sampling={"do_sample": True, "seed": 1})
    dbg = make(engine)
    with pytest.raises(ValueError, match="decodes greedily"):
        dbg.set_sampling(temperature=0.5)


def test_replay_page_and_trace_file_record_both_memories(engine, tmp_path):
    dbg = make(engine)
    dbg.run_to(4)
    frames = dbg.frames()
    assert len(frames) == 5
    kv = [int(m) for f in frames for m in re.findall(r"<td>L0</td><td>(\d+)</td>", f["memory"])]
    assert kv == [0, 1, 2, 3, 4]  # the decoder KV cache grows a position a cycle…
    assert all("encoder memory" in f["memory"] for f in frames[1:])  # …beside the encoder memory, written once
    page = dbg.export_html(tmp_path / "run.html").read_text()
    assert "cyclelab debugger: random-marian, 4 tokens" in page and page.count("encoder memory") >= 1
    trace = Trace.load(dbg.export(tmp_path / "run.json"))
    assert trace.token_ids == dbg.token_ids and trace.settings["seq2seq"] is True
    assert engine.replay(trace).token_ids == trace.token_ids


def test_step_layer_breakpoints_and_lens(engine):
    dbg = make(engine)
    units = [dbg.step_layer().op for _ in range(6)]
    assert units == ["enc_positions", "enc_norm_mlp", "enc_norm_mlp", "cross_kv", "positions", "norm_mlp"]
    dbg.break_at(op="cross_read", layer=1)
    dbg.cont()
    assert (dbg.current_event.op, dbg.current_event.layer) == ("cross_read", 1)
    with pytest.raises(ValueError, match="unknown encoder-decoder op"):
        dbg.break_at(op="rope")
    with pytest.raises(ValueError, match="logit-lens breakpoint is for decoder-only"):
        dbg.break_on_lens_change(1)


def test_debugger_by_model_name_is_the_encoder_decoder_one(folio_name="folio-mt"):
    dbg = Debugger(folio_name, "I haue curs'd them without cause", max_new_tokens=3)
    assert isinstance(dbg, Seq2SeqDebugger) and dbg.engine.loaded.name == "folio-mt"
    dbg.next()
    assert dbg.cycle == 1
