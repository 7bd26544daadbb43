"""The debugger's look without a browser: contrast worked out from the stylesheet's colours, the
probability shade's stated mapping, the widget's stored output, what it marks as changed, and the
head it watches first. The browser checks the same contrast from computed styles (test_browser_view)."""

from __future__ import annotations

import re

import pytest
import torch

from cyclelab.core.events import Stage
from cyclelab.debugger.shading import STAGE_COLOURS
from cyclelab.debugger.style import (
    STAGE_TEXT,
    STYLE,
    THEMES,
    contrast,
    graphic_pairs,
    strength,
    text_pairs,
)
from cyclelab.debugger.views import KEYS, render_status


@pytest.mark.parametrize("theme", THEMES)
def test_every_text_colour_on_its_background_is_wcag_aa(theme):
    low = {name: round(contrast(fg, bg), 2) for name, (fg, bg) in text_pairs(theme).items() if contrast(fg, bg) < 4.5}
    assert low == {}
    low = {name: round(contrast(fg, bg), 2) for name, (fg, bg) in graphic_pairs(theme).items() if contrast(fg, bg) < 3}
    assert low == {}


def test_contrast_matches_the_wcag_examples():
    assert contrast("#000", "#fff") == pytest.approx(21)
    assert contrast("#777777", "#fff") == pytest.approx(4.48, abs=0.01)
    assert contrast("rgba(0,0,0,0)", "#123456") == pytest.approx(1)


def test_the_lit_stage_text_is_set_per_stage_and_reads():
    assert set(STAGE_TEXT) == set(Stage)
    assert min(contrast(STAGE_TEXT[s], STAGE_COLOURS[s]) for s in Stage) >= 4.5


def test_shade_mapping_is_the_stated_log_scale():
    assert [strength(p) for p in (0, 0.005, 0.01, 0.1, 1.0, 2.0)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    assert 0.3 < strength(0.05) < strength(0.3) < 0.8  # the usual probabilities of a small model stand apart
    assert "1% none, 10% half, 100% full" in KEYS["text"]


def test_style_adapts_to_the_theme_and_has_no_label_under_12px():
    assert 'body[data-jp-theme-light="false"]' in STYLE and "var(--jp-layout-color0" in STYLE
    sizes = [int(s) for s in re.findall(r"font-size:(\d+)px", STYLE)]
    assert sizes and min(sizes) >= 12
    assert "darker" not in " ".join(KEYS.values())  # in the dark theme more weight is lighter, not darker


def test_status_line_is_announced():
    assert "aria-live='polite'" in render_status("stopped", "", [])


# ---------------------------------------------------------------- the widget (tiny model)


@pytest.fixture
def dbg(tiny_engine):
    from cyclelab import Debugger

    dbg = Debugger(tiny_engine, "ROMEO:", max_new_tokens=6)
    dbg.widget()
    return dbg


def test_stored_output_is_a_line_and_a_picture_not_a_vbox(dbg):
    dbg.controls["Next token"].click()
    bundle = dbg._ui._repr_mimebundle_()
    assert "VBox(" not in bundle["text/plain"] and "Debugger for tiny" in bundle["text/plain"]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    picture = bundle["text/html"]
    assert "<h3 class='cld-h'>Output" in picture and "Text so far" in picture and "<button" not in picture
    assert dbg.widget()._repr_mimebundle_()["text/plain"] == bundle["text/plain"]


def test_panel_titles_are_headings_with_a_key(dbg):
    dbg.controls["Next token"].click()
    for name in ("output", "sampler", "text", "registers", "memory", "branches", "cost"):
        assert "<h3 class='cld-h'>" in dbg.views[name].value and "class='cld-key'" in dbg.views[name].value
    assert "aria-live" in dbg.views["message"].value


def test_choose_is_disabled_until_there_are_candidates(dbg):
    assert dbg.controls["Choose"].disabled and dbg.controls["candidates"].options == ()
    dbg.controls["Next token"].click()
    assert not dbg.controls["Choose"].disabled


def test_changed_panels_flash_and_their_tabs_are_marked(dbg, monkeypatch):
    state = dbg.state

    def with_changed():
        s = state()
        object.__setattr__(s, "changed", {"output", "sampler"})
        return s

    monkeypatch.setattr(dbg, "state", with_changed)
    dbg.controls["Next token"].click()
    first = re.search(r"cld-changed(\d)", dbg.views["output"].value)
    assert first and "cld-changed" in dbg.views["sampler"].value and "cld-changed" not in dbg.views["text"].value
    assert dbg._ui.inspect.titles[0] == "Sampler •" and dbg._ui.inspect.titles[1] == "Registers"
    dbg.controls["Next token"].click()  # a second change flashes again: the other class restarts the animation
    assert re.search(r"cld-changed(\d)", dbg.views["output"].value).group(1) != first.group(1)


def test_watched_head_is_the_previous_token_head(dbg, tiny_engine):
    from cyclelab.debugger.widget import _PROBE, previous_token_head

    ids = tiny_engine.encode(_PROBE)
    _, found = tiny_engine.run_with_cache(ids, names=lambda name: name.endswith("attn.hook_pattern"))
    q = torch.arange(2, len(ids))
    scores = {
        (layer, head): float(found[f"blocks.{layer}.attn.hook_pattern"][0][head, q, q - 1].mean())
        for layer in range(tiny_engine.arch.n_layers)
        for head in range(tiny_engine.arch.n_heads)
    }
    assert (dbg.watch_layer, dbg.watch_head) == previous_token_head(tiny_engine) == max(scores, key=scores.get)
    assert scores[(dbg.watch_layer, dbg.watch_head)] > 2 * scores[(0, 0)]  # far more structure than L0 H0
    assert (dbg.controls["watch layer"].value, dbg.controls["watch head"].value) == (dbg.watch_layer, dbg.watch_head)
