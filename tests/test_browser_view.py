"""The debugger's view in a real browser (Debian's Chromium driven by Playwright): layout, themes,
Jupyter Notebook 7, the offline replay page, and the click-to-panel latency a learner feels.

One Jupyter server serves both JupyterLab and Notebook 7 pages for the whole module. The Lab test
clicks as a learner would, checks that no button or label is cut at 1024 and 1400 px, and keeps
screenshots in the light and dark themes in tests/artifacts/browser/. With CYCLELAB_DOCS_SCREENSHOTS=1
it takes every one the docs show (light and dark, 1024 and 1400 px, after three tokens and after a
branch) and copies them to docs/. Skipped, saying why, without Chromium or Playwright.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import nbformat
import pytest
from test_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    KERNEL_READY,
    ROOT,
    Lab,
    browser_api,
    collapsed,
    running_lab,
    shown,
)

pytestmark = pytest.mark.browser

PROMPT = "ROMEO:"
TIMEOUT_MS = 90_000
WIDTHS = (1024, 1400)
DOCS = ROOT / "docs"
CLICKS = 10  # for the latency median
NOTEBOOK_CELL = 'from cyclelab import Debugger\ndbg = Debugger("{model}", {prompt!r}, max_new_tokens=24)\ndbg'

# Every button, label and tab title in the widget that is shown and whose text is wider than its box;
# and whether the output area, the widget or the page scrolls sideways.
CUT_TEXT = """(root) => {
    const cut = [];
    for (const el of root.querySelectorAll('button, .widget-label, .widget-label-basic, .lm-TabBar-tabLabel')) {
        if (el.offsetParent !== null && el.textContent.trim() && el.scrollWidth > el.clientWidth + 1)
            cut.push(`${el.textContent.trim()} (${el.scrollWidth} > ${el.clientWidth} px)`);
    }
    const boxes = [root, root.closest('.jp-OutputArea-output'), root.closest('.jp-WindowedPanel-outer'),
                   document.scrollingElement].filter(Boolean);
    const sideways = boxes.filter(e => e.scrollWidth > e.clientWidth + 1)
        .map(e => `${e.className || e.tagName}: ${e.scrollWidth} > ${e.clientWidth} px`);
    return {cut, sideways};
}"""
# Milliseconds from each click on "Next token" to the counter's new text (the last view the kernel updates).
CLICK_TO_PANEL = """async ([root, n]) => {
    const button = [...root.querySelectorAll('button')].find(b => b.textContent.trim() === 'Next token');
    const counter = [...root.querySelectorAll('.widget-label')].find(l => /^cycle \\d+$/.test(l.textContent));
    const times = [];
    for (let i = 0; i < n; i++) {
        const before = counter.textContent;
        const start = performance.now();
        await new Promise((resolve, reject) => {
            const seen = new MutationObserver(() => {
                if (counter.textContent !== before) { seen.disconnect(); resolve(); }
            });
            seen.observe(counter, {childList: true, characterData: true, subtree: true});
            setTimeout(() => reject(new Error('no update within 30 s')), 30000);
            button.click();
        });
        times.push(performance.now() - start);
        await new Promise(r => setTimeout(r, 100));  // the click's remaining messages land before the next one
    }
    return times;
}"""


# Where the loop a learner repeats sits on the page: the pipeline, the moves, the candidates and the text so far.
ESSENTIAL = """(root) => {
    const box = e => e && e.getBoundingClientRect();
    const button = name => [...root.querySelectorAll('button')].find(b => b.textContent.trim() === name);
    const panel = h => [...root.querySelectorAll('.cld-panel')].find(p => p.querySelector('h3')?.textContent.startsWith(h));
    const found = {pipeline: box(root.querySelector('.cld-strip')), 'Next token': box(button('Next token')),
                   Choose: box(button('Choose')), Output: box(panel('Output')), 'Text so far': box(panel('Text so far'))};
    return {viewport: innerHeight, found: Object.fromEntries(Object.entries(found).map(([k, r]) => [k, r && [r.top, r.bottom]]))};
}"""
# The WCAG contrast ratio of each element's computed text colour on its computed (blended) background.
CONTRAST = """(elements) => {
    const parse = c => {
        let m = c.match(/^rgba?\\(([^)]+)\\)/);
        if (m) { const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; }
        m = c.match(/^color\\(srgb ([^)]+)\\)/);
        if (m) { const p = m[1].split(/[ \\/]+/).filter(Boolean).map(Number); return [p[0] * 255, p[1] * 255, p[2] * 255, p.length > 3 ? p[3] : 1]; }
        throw new Error('cannot read the colour ' + c);
    };
    const over = (t, b) => [0, 1, 2].map(k => t[3] * t[k] + (1 - t[3]) * b[k]).concat([1]);
    const lum = c => {
        const l = [0, 1, 2].map(k => { const v = c[k] / 255; return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
    };
    const background = el => {
        const layers = [];
        for (let e = el; e; e = e.parentElement) {
            const c = parse(getComputedStyle(e).backgroundColor);
            if (c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
        }
        return layers.reverse().reduce((b, c) => over(c, b), [255, 255, 255, 1]);
    };
    return elements.map(el => {
        const b = background(el), f = over(parse(getComputedStyle(el).color), b), x = lum(f), y = lum(b);
        return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05);
    });
}"""
CONTRAST_OF = {  # what a learner reads while stepping, by CSS selector inside the widget
    "status line": "[role=status]",
    "candidate labels": ".cld-panel .cld-t td",
    "lit stage": ".cld-on",
    "panel keys": ".cld-key",
    "text so far": ".cld-prose .cld-sh",
}


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    """One headless Chromium for the module (skipped, saying why, without Chromium or Playwright)."""
    api = browser_api()
    with api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        api.expect.set_options(timeout=TIMEOUT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory) -> Iterator[Lab]:
    """One Jupyter server (Lab and Notebook 7 pages) on a folder of small debugger notebooks."""
    tmp = tmp_path_factory.mktemp("view")
    root = tmp / "notebooks"
    root.mkdir()
    for name, model in (("lab", "tiny"), ("nb7", "tiny"), ("smollm2", "smollm2")):
        book = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(NOTEBOOK_CELL.format(model=model, prompt=PROMPT))]
        )
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(book, root / f"{name}.ipynb")
    with running_lab(root, tmp) as lab:
        yield lab


def texts(trace) -> list[str]:
    """The texts of ``trace``'s generated tokens."""
    return [r.token for r in trace.records]


def share_kernel(server: Lab, source: str, target: str) -> None:
    """Give notebook ``target`` the kernel of ``source``'s session, if it has one (else it starts its own)."""
    with urllib.request.urlopen(server.page("api/sessions"), timeout=10) as answer:
        kernel = next((s["kernel"]["id"] for s in json.load(answer) if s["path"] == source), None)
    if kernel is not None:
        body = json.dumps({"path": target, "name": target, "type": "notebook", "kernel": {"id": kernel}}).encode()
        request = urllib.request.Request(server.page("api/sessions"), body, {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()


def open_debugger(browser, url: str, width: int, height: int = 2200):
    """A page at ``url`` with its notebook run; returns (page, widget root, counter)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_function(KERNEL_READY)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    root = page.locator(".cld-root")
    counter = root.locator(".widget-label").filter(has_text="cycle ").first
    browser_api().expect(counter).to_have_text("cycle 0")
    return page, root, counter


def cut_text(page, root, where: str) -> list[str]:
    """Each button, label or tab title cut, in every tab of the settings, and what scrolls sideways."""
    problems = []
    for tab in root.locator(".lm-TabBar-tab").all():
        tab.click()
        found = page.evaluate(CUT_TEXT, root.element_handle())
        problems += [f"{where}: {item}" for item in found["cut"] + found["sideways"]]
    root.locator(".lm-TabBar-tab").first.click()
    return problems


def click(root, name: str, counter, expect_cycle: int) -> None:
    root.get_by_role("button", name=name, exact=True).click()
    browser_api().expect(counter).to_have_text(f"cycle {expect_cycle}")


def set_theme(page, dark: bool) -> None:
    theme = "JupyterLab Dark" if dark else "JupyterLab Light"
    page.evaluate(f"window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{theme}'}})")
    page.wait_for_function(f"document.body.dataset.jpThemeLight === '{str(not dark).lower()}'")
    page.wait_for_timeout(300)  # the new theme's stylesheet applies


def low_contrast(page, root, where: str) -> list[str]:
    """Each group of CONTRAST_OF whose weakest element is under 4.5:1 (or that is not on the page)."""
    problems = []
    for name, selector in CONTRAST_OF.items():
        ratios = page.evaluate(CONTRAST, root.locator(selector).element_handles())
        if not ratios or min(ratios) < 4.5:
            problems.append(f"{where}: {name}: {min(ratios, default=0):.2f}:1 (of {len(ratios)})")
    return problems


def out_of_view(page, root, where: str) -> list[str]:
    """Each element of the loop a learner repeats that is not wholly within the first screen."""
    page.evaluate("document.querySelectorAll('.jp-WindowedPanel-outer').forEach(e => e.scrollTop = 0)")
    seen = page.evaluate(ESSENTIAL, root.element_handle())
    return [
        f"{where}: {name} at {box} (screen: {seen['viewport']} px)"
        for name, box in seen["found"].items()
        if box is None or box[0] < 0 or box[1] > seen["viewport"]
    ]


def height(root) -> float:
    return root.evaluate("r => r.getBoundingClientRect().height")


def look_everywhere(page, root, stage: str, name: str, dark_too: bool) -> list[str]:
    """At each width: what is cut, and a screenshot NAME-THEME-WIDTH in the light theme, and in the dark
    one too if ``dark_too`` (a theme changes colours only: the layout is checked once). Back to light
    at the widest after."""
    problems, colours = [], set()
    for dark in (False, True) if dark_too else (False,):
        set_theme(page, dark)
        colours.add(page.evaluate("r => getComputedStyle(r.querySelector('.cld')).color", root.element_handle()))
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 2200})
            if not dark:
                problems += cut_text(page, root, f"{stage}, {width} px")
            screenshot(root, f"{name}-{'dark' if dark else 'light'}-{width}")
    if dark_too and len(colours) != 2:
        problems.append(f"{stage}: the panels' text colour does not follow the theme: {colours}")
    set_theme(page, False)
    page.set_viewport_size({"width": WIDTHS[-1], "height": 2200})
    return problems


def screenshot(root, name: str) -> Path:
    """The widget as tests/artifacts/browser/NAME.png; also as docs/NAME.png when asked."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    root.screenshot(path=str(path))
    if os.environ.get("CYCLELAB_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / path.name)
    return path


def record_latency(model: str, times: list[float]) -> float:
    """Print the median and keep it in tests/artifacts/browser/latency.json (the benchmark table reads it)."""
    ms = median(times)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "latency.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    found[model] = {"median_ms": round(ms, 1), "clicks": len(times), "measured": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps(found, indent=1) + "\n")
    print(
        f"\n{model}: click on Next token -> updated panel, median of {len(times)}: {ms:.0f} ms "
        f"(all: {[round(t) for t in times]})"
    )
    return ms


def test_lab_layout_themes_branch_and_latency(browser, server: Lab, tiny_engine) -> None:
    """In JupyterLab: three tokens, then Choose the runner-up and two more; at 1024 and 1400 px in the
    light and dark themes nothing is cut, the branch shows beside the old one; then 10 timed clicks."""
    expect = browser_api().expect
    base = tiny_engine.generate(PROMPT, 4, stop_at_eos=False)
    runner_up = base.records[2].top[1][0]
    branched = tiny_engine.branch(base, at_cycle=2, token=runner_up, max_new_tokens=4)
    page, root, counter = open_debugger(browser, server.page("lab/tree/lab.ipynb"), WIDTHS[0], 768)
    try:
        # a learner's first screen: 1024 x 768 with the file browser open (Lab's default), then 1400 px
        assert page.evaluate("window.jupyterapp.shell.leftCollapsed") is False
        expect(root.get_by_role("button", name="Choose", exact=True)).to_be_disabled()  # no candidates yet
        heights, problems = [height(root)], []
        for n in range(1, 4):
            click(root, "Next token", counter, n)
            heights.append(height(root))
        assert max(heights) - min(heights) <= 8, heights  # stepping never moves the tabs below
        for dark in (False, True):
            set_theme(page, dark)
            for width in WIDTHS:
                page.set_viewport_size({"width": width, "height": 768})
                where = f"{'dark' if dark else 'light'}, {width} px, file browser open"
                problems += out_of_view(page, root, where) + low_contrast(page, root, where)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / f"first-screen-{'dark' if dark else 'light'}-{width}.png"))
        assert problems == []
        set_theme(page, False)
        page.set_viewport_size({"width": WIDTHS[-1], "height": 2200})
        page.evaluate("window.jupyterapp.shell.collapseLeft()")
        text = root.locator(".cld-prose div[style*='pre-wrap']")
        assert collapsed(text.inner_text()) == shown(PROMPT + "".join(texts(base)[:3]))
        every = os.environ.get("CYCLELAB_DOCS_SCREENSHOTS") == "1"  # the docs want both themes at each stage
        problems = look_everywhere(page, root, "after three tokens", "debugger", dark_too=every)
        click(root, "Choose", counter, 3)  # the runner-up of cycle 3's token (the dropdown's default): still cycle 3
        click(root, "Next token", counter, 4)
        problems += look_everywhere(page, root, "after a branch", "debugger-branch", dark_too=True)
        assert problems == []
        assert collapsed(text.inner_text()) == shown(PROMPT + "".join(texts(branched)))
        fork = root.locator(".cld-fork")
        expect(fork).to_have_count(2)  # the first different token, in the new timeline and in the old
        assert [collapsed(f.inner_text()) for f in fork.all()] == [
            collapsed(texts(branched)[2].replace(" ", "␣")),
            collapsed(texts(base)[2].replace(" ", "␣")),
        ]
        expect(root.get_by_text("⚠")).to_have_count(0)
        times = page.evaluate(CLICK_TO_PANEL, [root.element_handle(), CLICKS])
        expect(counter).to_have_text(f"cycle {4 + CLICKS}")
        record_latency("tiny", times)  # the target (150 ms) is the benchmark's to judge, not this test's
    finally:
        page.close()


def test_notebook7_runs_the_debugger(browser, server: Lab, tiny_engine) -> None:
    """The same widget in Jupyter Notebook 7: Next token works and nothing is cut at 1024 px."""
    pytest.importorskip("notebook", minversion="7", reason="Jupyter Notebook 7 is not installed (dev extra)")
    base = tiny_engine.generate(PROMPT, 2, stop_at_eos=False)
    page, root, counter = open_debugger(browser, server.page("notebooks/nb7.ipynb"), WIDTHS[0], 768)
    try:
        click(root, "Next token", counter, 1)
        click(root, "Next token", counter, 2)
        text = root.locator(".cld-prose div[style*='pre-wrap']")
        assert collapsed(text.inner_text()) == shown(PROMPT + "".join(texts(base)))
        problems = out_of_view(page, root, "Notebook 7, 1024 x 768") + low_contrast(page, root, "Notebook 7, light")
        page.set_viewport_size({"width": WIDTHS[0], "height": 2200})
        assert problems + cut_text(page, root, "Notebook 7, 1024 px") == []
    finally:
        page.close()


@pytest.mark.slow
def test_smollm2_click_to_panel_latency(browser, server: Lab) -> None:
    """The browser latency of smollm2 (slow: loads the 135M model in the kernel); printed and recorded."""
    page, root, counter = open_debugger(browser, server.page("lab/tree/smollm2.ipynb"), WIDTHS[-1])
    try:
        click(root, "Next token", counter, 1)  # the prompt's cycle (prefill) is not the step a learner repeats
        times = page.evaluate(CLICK_TO_PANEL, [root.element_handle(), CLICKS])
        record_latency("smollm2", times)
    finally:
        page.close()


def test_replay_page_steps_offline_like_the_debugger(browser, tiny_engine, tmp_path: Path) -> None:
    """export_html's page, opened from disk with the network off: Next and Back show each cycle's text."""
    from cyclelab import Debugger

    base = tiny_engine.generate(PROMPT, 8, stop_at_eos=False)
    runner_up = base.records[4].top[1][0]
    expected = texts(tiny_engine.branch(base, at_cycle=4, token=runner_up, max_new_tokens=8))
    dbg = Debugger(tiny_engine, PROMPT, max_new_tokens=8)
    dbg.run_to(5)
    dbg.choose(1)
    dbg.run_to(8)
    path = dbg.export_html(tmp_path / "replay.html")
    context = browser.new_context(offline=True, viewport={"width": 390, "height": 844})  # a phone
    asked = []
    context.route(
        "**/*",
        lambda route: (
            asked.append(route.request.url),
            route.continue_() if route.request.url.startswith("file:") else route.abort(),
        ),
    )
    page = context.new_page()
    try:
        page.goto(path.as_uri())
        expect = browser_api().expect
        counter, text = page.locator("#counter"), page.locator("#v-text .cld-prose div[style*='pre-wrap']")
        expect(counter).to_have_text("cycle 0")
        steps = [("#next", k) for k in range(1, 9)] + [("#next", 8), ("#back", 7), ("#back", 6)]  # the end holds
        for button, k in steps:
            page.locator(button).click()
            expect(counter).to_have_text(f"cycle {k}")
            assert collapsed(text.inner_text()) == shown(PROMPT + "".join(expected[:k])), k
        fork = page.locator("#v-branches .cld-fork")
        assert [collapsed(f.inner_text()) for f in fork.all()] == [
            expected[4].replace(" ", "␣").strip(),
            texts(base)[4].replace(" ", "␣").strip(),
        ]
        assert all(url.startswith("file:") for url in asked), asked
        assert page.evaluate("document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth")
        panels = page.locator(".cld-grid > .cld-panel").evaluate_all(  # a wide table scrolls inside its panel
            "ps => ps.map(p => [p.id, getComputedStyle(p).overflowX, p.getBoundingClientRect().right])"
        )
        assert [p for p in panels if p[1] != "auto" or p[2] > 390] == [], panels
        page.locator("#slider").focus()  # one key press on the focused slider: one cycle
        page.keyboard.press("ArrowLeft")
        expect(counter).to_have_text("cycle 5")
        page.keyboard.press("ArrowRight")
        expect(counter).to_have_text("cycle 6")
        page.locator("#back").click()
        page.locator("#back").click()
        expect(counter).to_have_text("cycle 4")  # before the fork: Branches shows no token from after it
        shown_cycles = [
            int(t.split()[0][1:])
            for t in page.locator("#v-branches [title^='#']").evaluate_all("chips => chips.map(c => c.title)")
        ]
        assert all(k < 4 for k in shown_cycles), shown_cycles
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # scrolled down, Back/Next stay at hand
        for button in ("#back", "#next"):
            top, bottom = page.locator(button).evaluate(
                "b => [b.getBoundingClientRect().top, b.getBoundingClientRect().bottom]"
            )
            assert 0 <= top and bottom <= 844, (button, top, bottom)
    finally:
        context.close()
