"""One truth across the debugger's panels: after every command, the state each panel renders from agrees
on the cycle, the chosen token, its probability and how it was chosen; the status line says what the
command did; ``State.changed`` names the views it changed. On the tiny model."""

import re

import pytest
import test_debugger

from cyclelab import Debugger
from cyclelab.debugger.text import TEXT_KEY, render_text
from cyclelab.debugger.views import chosen_words, p_text, render_all, show_token, to_text

PROMPT, engine = test_debugger.PROMPT, test_debugger.engine  # engine: the tiny model's fixture


def agree(dbg: Debugger, how: str | None = None):
    """Assert that every panel's data names the same cycle, token, p and way of choosing; return the state."""
    s = dbg.state()
    c, event = s.chosen, dbg.current_event
    assert c is not None and s.output is not None and s.draw is not None
    assert s.done == dbg.cycle and s.cycle == dbg.cycle + (event.op != "append")  # counter: the cycle shown
    if event.op in ("choose", "append"):
        assert c.cycle == s.cycle and c.written == (event.op == "append")
    # output panel
    assert (s.output.cycle + 1, s.output.token_id, s.output.token) == (c.cycle, c.token_id, c.token)
    assert s.output.forced == (c.how == "forced")
    after, raw = {i: p for i, _, p in s.output.top}, {i: p for i, _, p in s.output.raw_top}
    assert after.get(c.token_id, 0.0) == pytest.approx(c.p, abs=1e-6)
    if c.token_id in raw:
        assert raw[c.token_id] == pytest.approx(c.model_p, abs=1e-6)
    # sampler panel: its pick is the token, unless forced (then it names the pick the token replaced)
    assert s.draw.token == (c.instead if c.how == "forced" else c.token)
    if c.how != "forced":
        assert s.draw.p == pytest.approx(c.p, abs=1e-6)
    # text panel: the record written back
    if c.written:
        r = s.records[c.cycle - 1]
        assert (r.token_id, r.forced) == (c.token_id, c.how == "forced")
        assert (r.prob, r.raw_prob) == (pytest.approx(c.p, abs=1e-6), pytest.approx(c.model_p, abs=1e-6))
    # the same digits in the rendered output, sampler and (when it speaks of the choice) the status
    views = {k: to_text(v) for k, v in render_all(s).items()}
    words = chosen_words(c)
    assert f"cycle {c.cycle}: {words}" in views["output"] and f"p {p_text(c.p)}" in views["output"]
    if c.how == "forced":
        assert f"cycle {c.cycle} {words}" in views["sampler"]
    else:
        assert f"{show_token(c.token)} (p {p_text(c.p)})" in views["sampler"]
    if s.message.startswith(f"cycle {c.cycle}:"):
        assert words in s.message
    if how is not None:
        assert c.how == how
    return s


def test_the_first_state_holds_the_model_the_prompt_and_what_to_press(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=6)
    s = dbg.state()
    assert s.model == "tiny" and s.prompt == PROMPT and s.cycle == 0 and s.chosen is None
    assert s.message == "tiny, prompt 'ROMEO:': press Next token (or Step for one op)"
    assert s.changed == frozenset() and dbg.breakpoints == []


def test_next_token_says_what_it_chose_and_what_the_cache_gained(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8)
    dbg.state()
    dbg.next()
    s = agree(dbg, "greedy")
    n = len(dbg.prompt_ids)
    assert s.message == f"cycle 1: {chosen_words(s.chosen)}, KV cache +{n} positions (the prompt, read at once)"
    assert {"pipeline", "output", "sampler", "text", "status"} <= s.changed
    for _ in range(6):
        dbg.next()
    s = agree(dbg, "greedy")
    assert s.cycle == 7 and s.message == f"cycle 7: {chosen_words(s.chosen)}, KV cache +1 position (now {n + 6})"
    assert dbg.state().changed == s.changed  # asking again does not forget what the command changed


def test_choose_forces_a_token_keeps_the_cycle_and_counts_the_re_read_apart(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=10)
    dbg.run_to(7)
    before = dbg.state()
    old = before.chosen
    dbg.choose(2)
    s = agree(dbg, "forced")
    assert s.cycle == before.cycle == 7  # the counter does not step back
    assert s.chosen.instead == old.token and s.chosen.token == dbg.candidates()[2][1]  # the 3rd by model p
    assert s.message == f"cycle 7: {chosen_words(s.chosen)}; the old timeline is branch 0"
    assert re.fullmatch(r"forced \S+ \(p \d\.\d{3}\) instead of \S+", chosen_words(s.chosen))
    assert s.prefill == before.prefill and s.reread.flops > 0  # the branch's re-read is not prefill
    views = render_all(s)
    assert "re-read: " in to_text(views["pipeline"]) and "re-read (a branch restarts" in to_text(views["cost"])
    assert {"output", "sampler", "text", "branches", "status"} <= s.changed
    dbg.next()
    agree(dbg, "greedy")


def test_a_forced_token_the_filters_removed_has_p_0_everywhere(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=6, sampling={"do_sample": True, "top_k": 2, "seed": 1})
    dbg.run_to(3)
    dbg.choose(4)  # the 5th most likely: top-k 2 removed it
    s = agree(dbg, "forced")
    assert s.chosen.p == 0.0 and s.records[2].prob == 0.0 and s.chosen.model_p > 0
    assert "p 0.000" in s.message and "0 (filtered)" in to_text(render_all(s)["output"])


def test_ablating_a_head_says_which_and_from_when(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8)
    dbg.run_to(4)
    dbg.state()
    dbg.ablate_head(1, 2)
    s = agree(dbg, "greedy")  # cycle 4 is unchanged: the ablation starts with the next one
    assert s.message == "ablated L1 H2 from cycle 5 on" and "ablated heads: L1 H2" in s.notes
    assert "status" in s.changed and "output" not in s.changed
    dbg.next()
    s = agree(dbg, "greedy")
    assert s.cycle == 5 and s.reread.flops > 0  # the run restarted under the ablation


def test_sampling_with_top_k_and_top_p_shows_one_p_for_the_drawn_token(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8, sampling={"do_sample": True, "top_k": 5, "top_p": 0.9, "seed": 3})
    for _ in range(5):
        dbg.next()
        s = agree(dbg, "sampled")
    assert s.sampling == "sample, temperature 1, top-k 5, top-p 0.9, seed 3"
    assert s.draw.u is not None and s.draw.low <= s.draw.u < s.draw.high


def test_switching_the_sampler_mid_run_keeps_the_shown_choice_and_previews_the_new_settings(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8)
    dbg.run_to(3)
    before = dbg.state()
    dbg.set_sampling(do_sample=True, top_k=5, seed=2)
    s = agree(dbg, "greedy")  # cycle 3 was chosen greedily: every panel still says so
    assert s.message == "sampler from cycle 4 on: sample, temperature 1, top-k 5, seed 2"
    assert s.sampling == "greedy" and s.chosen == before.chosen
    assert "new settings from cycle 4 on" in s.preview and "top_k keeps 5" in s.preview
    assert s.changed == {"sampler", "status"}
    dbg.next()
    agree(dbg, "sampled")
    dbg.set_sampling(do_sample=False)  # back to greedy
    assert dbg.state().message == "sampler from cycle 5 on: greedy"
    dbg.next()
    s = agree(dbg, "greedy")
    assert s.sampling == "greedy" and s.preview == ""


def test_back_and_run_to_cycle_say_where_they_went(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8)
    dbg.run_to(5)
    assert dbg.message.startswith("cycle 5: chose ")
    agree(dbg)
    dbg.back_cycle()
    s = agree(dbg)
    assert s.message == "back to cycle 4" and s.cycle == 4
    dbg.back()  # into cycle 4: its choice is made but not yet written back
    s = agree(dbg)
    assert s.cycle == 4 and not s.chosen.written
    assert s.message == f"back one op: cycle 4: WRITEBACK, choose: {chosen_words(s.chosen)}, not yet written back"
    dbg.run_to(2)
    s = agree(dbg)
    assert s.message == "back to cycle 2" and s.cycle == 2
    dbg.run_to(6)
    s = agree(dbg)
    assert s.cycle == 6 and s.message.startswith("cycle 6: ")


def test_continue_without_a_breakpoint_says_so_and_stops_at_one_set(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8)
    assert dbg.breakpoints == [] and "no breakpoint set" in dbg.state().notes[0]
    dbg.cont()
    s = agree(dbg)
    assert s.message.startswith("no breakpoint is set, so Continue ran to the end") and "end of generation" in s.message
    dbg.reset()
    ps = [r.prob for r in dbg.now.records()]
    threshold = sorted(ps)[len(ps) // 2] + 1e-9  # about half the tokens fire
    first = next(k for k, p in enumerate(ps) if p < threshold)
    dbg.break_below(threshold)
    dbg.cont()
    s = agree(dbg)
    assert s.cycle == first + 1 and s.chosen.p < threshold
    assert s.message.startswith(f"stopped: break when p(chosen) < {threshold}. cycle {first + 1}: ")


def test_a_token_breakpoint_must_be_one_token_of_the_vocabulary(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"'Romeoxyz' is not one token of tiny's vocabulary .*token id"):
        dbg.break_on_token("Romeoxyz")
    assert "Romeoxyz" in dbg.error  # the widget shows it in its error line
    with pytest.raises(ValueError, match="token id must be an integer from 0 to"):
        dbg.break_on_token(engine.vocab_size)
    assert dbg.breakpoints == []
    one = engine.token_text(engine.tokenizer.encode(" art", add_special_tokens=False)[0])
    dbg.break_on_token(one.strip())  # spaces around it ignored, as when it fires
    assert len(dbg.breakpoints) == 1


def test_text_mode_has_no_picture_keys_and_explains_its_notation_once(engine):
    dbg = Debugger(engine, PROMPT, max_new_tokens=8)
    texts = [render_text(dbg.state())]
    dbg.run_to(3)
    dbg.choose(1)
    dbg.ablate_head(0, 1)
    dbg.set_sampling(do_sample=True, temperature=0.8, top_k=5, seed=1)
    dbg.next()
    texts.append(str(dbg))
    for text in texts:
        assert not re.search(r"\b(shade|shaded|darker|grey|greyed|blue|dotted|colou?r)\b|■", text, re.I), text
        assert not re.search(r"#\d|\bT=|p before|p after|head \d+\.\d+", text), text
        assert text.count(TEXT_KEY) == 1 and "‖x‖ = length" in TEXT_KEY and "model p = " in TEXT_KEY
    assert "temperature 0.8" in texts[-1] and "L0 H1" in texts[-1]
