"""The debugger's pictures as pure functions: hand-made data in, the HTML parsed back out.

What a learner sees is decided here (bar widths, greyed tokens, the draw's mark, shades, the fork);
the browser tests only check that the page shows it whole. Expected numbers are worked out by hand.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cyclelab.core.events import Cost, CycleRecord, Stage
from cyclelab.debugger.replay import VIEWS, replay_page
from cyclelab.debugger.views import (
    STYLE,
    Attention,
    CacheRow,
    Draw,
    Output,
    Register,
    SamplerStage,
    State,
    render_all,
    render_branches,
    render_memory,
    render_output,
    render_pipeline,
    render_registers,
    render_sampler,
    to_text,
)

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny" / "config.json"


class Elements(HTMLParser):
    """Every start tag as (tag, attributes, text inside it up to the next tag)."""

    def __init__(self, markup: str):
        super().__init__()
        self.found: list[dict] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.found.append({"tag": tag, **dict(attrs), "text": ""})

    def handle_data(self, data):
        if self.found:
            self.found[-1]["text"] += data

    def having(self, cls: str) -> list[dict]:
        return [e for e in self.found if cls in e.get("class", "").split()]


def style_value(element: dict, prop: str) -> str:
    return re.search(rf"(?:^|;){prop}:([^;]+)", element["style"]).group(1)


def percent(element: dict, prop: str = "width") -> float:
    return float(style_value(element, prop).removesuffix("%"))


def alpha(element: dict) -> float:
    """The strength of an element's probability shade (``--s``, 0 to 1; the stylesheet tints by it)."""
    assert "cld-sh" in element["class"].split()
    return float(re.search(r"--s:([\d.]+)", element["style"]).group(1))


def record(cycle: int, token: str, prob: float, token_id: int | None = None, forced: bool = False) -> CycleRecord:
    return CycleRecord(
        cycle,
        token_id if token_id is not None else hash(token) % 1000,
        token,
        prob,
        prob,
        1.0,
        [],
        0,
        None,
        forced,
        1,
        cycle + 3,
        0.01,
        10,
        10,
    )


# ---------------------------------------------------------------- candidates, sampler, lens


def test_candidates_are_bars_before_and_after_the_processors():
    output = Output(
        cycle=2,
        token=" the",
        token_id=7,
        forced=False,
        raw_top=[(7, " the", 0.5), (9, " a", 0.25), (4, "x", 0.125)],
        top=[(7, " the", 0.625), (9, " a", 0.375)],
    )
    html = render_output(output)
    bars = Elements(html).having("cld-bar")
    before, after = [b for b in bars if "cld-raw" in b["class"]], [b for b in bars if "cld-raw" not in b["class"]]
    assert [style_value(b, "width") for b in before] == ["35px", "18px", "9px"]  # 70 px for p = 1
    assert [style_value(b, "width") for b in after] == ["44px", "26px"]
    text = to_text(html)
    assert "✔␣the" in text and "0 (filtered)" in text and "cycle 3: chosen ␣the (id 7)" in text


def test_sampler_rows_grey_what_each_stage_removes_and_mark_the_draw():
    cells = {
        "logits": [("a", 0.5), ("b", 0.3), ("c", 0.2)],
        "top_k": [("a", 0.625), ("b", 0.375), ("c", None)],  # top-k 2 removes c
        "top_p": [("a", 1.0), ("b", None), ("c", None)],
    }  # then top-p removes b
    stages = [SamplerStage(name, sum(p is not None for _, p in row), [], None, row) for name, row in cells.items()]
    html = render_sampler(stages, Draw(u=0.3, token="a", low=0.25, high=0.75, n_kept=1), "sample T=1")
    rows = re.split(r"<div><b>", html)[1:]
    greyed = [[e["data-t"] for e in Elements(row).having("cld-gone")] for row in rows]
    assert greyed == [[], ["c"], ["b"]]  # only where removed, not again in the rows after
    gone_c = Elements(rows[1]).having("cld-gone")[0]
    assert percent(gone_c) == 20.0  # as wide as it was before the stage removed it
    assert [percent(e) for e in Elements(rows[0]).having("cld-seg")] == [50.0, 30.0, 20.0]
    marks = Elements(html)
    assert percent(marks.having("cld-u")[0], "left") == 30.0
    assert (percent(marks.having("cld-slice")[0], "left"), percent(marks.having("cld-slice")[0])) == (25.0, 50.0)
    assert [line for line in to_text(html).splitlines() if line.startswith("removed")] == [
        "removed here: c",
        "removed here: b",
    ]
    assert "draw u = 0.3000" in to_text(html) and "data-t" not in to_text(html)


def test_greedy_sampler_has_no_draw_mark():
    stages = [SamplerStage("logits", 3, [("a", 0.5)], None, [("a", 0.5)])]
    html = render_sampler(stages, Draw(None, "a", 0.0, 0.0, 3))
    assert "greedy: argmax → a" in to_text(html) and not Elements(html).having("cld-u")


def test_logit_lens_is_a_grid_shaded_by_probability_marking_a_change_of_mind():
    registers = [
        Register(0, 3.0, [("x", 0.9), ("y", 0.05)]),
        Register(1, 4.0, [("x", 0.4), ("z", 0.3)]),
        Register(2, 5.0, [("z", 0.6), ("x", 0.2)]),
    ]
    html = render_registers(registers)
    chips = Elements(html).having("cld-chip")
    assert len(chips) == 6  # layers × top tokens
    shades = [alpha(c) for c in chips]
    assert shades[0] > shades[4] > shades[2] > shades[1]  # p 0.9 > 0.6 > 0.4 > 0.05
    rows = [line for line in to_text(html).splitlines() if line.startswith("L")]
    assert [("↻" in row) for row in rows] == [False, False, True]  # layer 2's top-1 z differs from layer 1's x


def test_kv_cache_is_one_block_per_layer_sized_by_bytes_against_the_full_cache():
    memory = [CacheRow(0, 4, 400), CacheRow(1, 4, 400), CacheRow(2, 2, 200)]
    html = render_memory(memory, None, max_positions=10)
    blocks = Elements(html).having("cld-kv")
    assert [b["data-t"] for b in blocks] == ["L0", "L1", "L2"]
    widths = [percent(e) for e in Elements(html).found if e["tag"] == "span" and e.get("style", "").startswith("width")]
    assert widths == [40.0, 40.0, 20.0]  # 100 B a position; full = 10 positions = 1000 B
    assert "L0–L1" in to_text(html) and "(no attention read yet)" in to_text(html)


def test_attention_strip_shades_each_earlier_token_by_its_weight():
    html = render_memory([CacheRow(0, 2, 10)], Attention(1, 3, ["a", "b"], [0.9, 0.1]), 4)
    chips = Elements(html).having("cld-chip")
    assert alpha(chips[0]) > alpha(chips[1]) and "layer 1, head 3" in to_text(html)


# ---------------------------------------------------------------- pipeline and branches


def state(**changes) -> State:
    base = dict(
        model="m",
        cycle=3,
        max_cycles=8,
        stage=Stage.EXECUTE,
        layer=1,
        op="attention",
        n_layers=2,
        n_inputs=1,
        this_op=Cost(0.001, 1, 1),
        this_cycle=Cost(0.01, 1, 1),
        total=Cost(0.4, 10, 10),
        prefill=Cost(0.1, 4, 4),
    )
    return State(**{**base, **changes})


def test_pipeline_strip_never_wraps_and_its_bar_splits_prefill_from_decode():
    html = render_pipeline(state())
    strip = Elements(html).having("cld-strip")
    assert strip and re.search(r"\.cld-strip\{\{?[^}]*flex-wrap:nowrap", STYLE)
    assert "▶ EXECUTE L1 · attention" in to_text(html)
    segments = [percent(e) for e in Elements(html).having("cld-seg")]
    assert segments == [25.0, 75.0]  # 0.1 s of 0.4 s in prefill


def test_branches_align_at_the_fork_and_mark_the_first_divergence():
    shared = [record(0, "A", 0.5, 1), record(1, "B", 0.4, 2)]
    now = shared + [record(2, "C", 0.3, 3), record(3, "D", 0.3, 4)]
    old = shared + [record(2, "C", 0.35, 3), record(3, "E", 0.6, 5)]  # an ablation: p changes at #2, token at #3
    html = render_branches(now, [old])
    lanes = [line.split() for line in to_text(html).splitlines() if line.startswith(("now", "branch 0 "))]
    assert lanes == [["now", "C", "D"], ["branch", "0", "C", "E"]]  # from the fork (#2) on, aligned
    assert "fork at cycle 3 after AB · first different token: cycle 4" in to_text(html)  # counted from 1
    forks = Elements(html).having("cld-fork")
    assert [f["text"] for f in forks] == ["D", "E"] and forks[0]["title"].endswith("first divergence")
    assert alpha(forks[1]) > alpha(forks[0])  # E was likelier (0.6) than D (0.3)


def test_long_branches_wrap_in_blocks_that_keep_the_columns_aligned():
    now = [record(k, f"n{k}", 0.5, k) for k in range(20)]
    old = [record(0, "n0", 0.5, 0)] + [record(k, f"o{k}", 0.5, 100 + k) for k in range(1, 12)]
    html = render_branches(now, [old], columns=8)
    rows = [
        line.split()
        for line in to_text(html).splitlines()
        if line.startswith(("now", "branch 0 ")) or line == "branch 0"
    ]  # an empty cell is a no-break space: split() drops it
    n, o = [f"n{k}" for k in range(20)], [f"o{k}" for k in range(12)]
    assert (
        rows
        == [
            ["now", *n[1:9]],
            ["branch", "0", *o[1:9]],  # cycles 1-8 (the fork is #1)
            ["now", *n[9:17]],
            ["branch", "0", *o[9:12]],  # 9-16: the old branch ends at 11
            ["now", *n[17:20]],
            ["branch", "0"],
        ]
    )


def test_no_branch_says_how_to_make_one():
    assert "Choose another token" in to_text(render_branches([record(0, "A", 0.5)], []))


def test_style_takes_its_colours_from_the_theme():
    """Every hex colour in the stylesheet is a var(--jp-…) fallback, the stage palette, or white on it."""
    fixed = {"#fff", "#DD8452"}  # text on the stage colours; the KV blocks (the READ stage's colour)
    loose = re.sub(r"var\(--jp-[\w-]+,#[0-9a-fA-F]+\)", "", STYLE)
    assert set(re.findall(r"#[0-9a-fA-F]{3,6}\b", loose)) <= fixed
    assert STYLE.count("var(--jp-") >= 10


# ---------------------------------------------------------------- the replay page


def frames(n: int) -> list[dict[str, str]]:
    return [{name: f"<div>{name} {k if name == 'text' else 0}</div>" for name in VIEWS} for k in range(n)]


def test_replay_page_holds_each_view_once_and_reaches_nothing_outside():
    page = replay_page(frames(3), "t <1>")
    data = json.loads(re.search(r'id="replay-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["frames"]) == 3 and len(data["parts"]) == len(VIEWS) - 1 + 3  # text differs, the rest shared
    assert [data["parts"][f[data["views"].index("text")]] for f in data["frames"]] == [
        f"<div>text {k}</div>" for k in range(3)
    ]
    assert not re.search(r"""(src|href)=|@import|url\(|https?://""", page)
    assert "<title>t &lt;1&gt;</title>" in page


def test_replay_page_escapes_a_closing_script_tag_inside_a_view():
    page = replay_page([{**frames(1)[0], "text": "<div>x</script><script>alert(1)</script></div>"}], "t")
    assert page.count("</script>") == 2  # the data block's and the code's own


@pytest.mark.parametrize(
    "given,error",
    [
        pytest.param([], "no frames to replay", id="no-frames"),
        pytest.param(
            [{"pipeline": "x"}], r"frames lack the view\(s\) \['branches', 'cost', 'memory'", id="views-missing"
        ),
    ],
)
def test_replay_page_bad_input(given, error):
    with pytest.raises(ValueError, match=error):
        replay_page(given, "t")


def test_export_html_has_a_frame_per_cycle_and_leaves_the_debugger_where_it_was(tiny_engine, tmp_path):
    if not TINY.exists():
        pytest.skip("the tiny model is not trained yet (data/tiny/config.json): run `cyclelab train-tiny`")
    from cyclelab import Debugger

    dbg = Debugger(tiny_engine, "ROMEO:", max_new_tokens=6)
    dbg.run_to(4)
    dbg.step()  # mid-cycle: the page ends at the last whole cycle
    position = dbg.position
    page = dbg.export_html(tmp_path / "run.html").read_text()
    data = json.loads(re.search(r'id="replay-data">(.*?)</script>', page, re.S).group(1))
    texts = [data["parts"][f[data["views"].index("text")]] for f in data["frames"]]
    assert [t.count("<span title='#") for t in texts] == [0, 1, 2, 3, 4]
    assert dbg.position == position and "saved a replay of 4 tokens" in dbg.message
    assert set(render_all(dbg.state())) == set(VIEWS)
