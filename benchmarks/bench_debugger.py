"""Debugger latency: from a "Next token" click to the updated views (model step + every view re-rendered).

``ms`` is measured here, in Python; ``browser_ms`` is the click-to-panel median that a learner sees in
Chromium (kernel round trip and page update included), measured by tests/test_browser_view.py
(smollm2's with CYCLELAB_SLOW=1) and read from its record, when it has run.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median
from time import perf_counter

from cyclelab import Debugger, Engine, load

TARGET_MS = {"tiny": 150, "smollm2": 400}
BROWSER = Path(__file__).resolve().parent.parent / "tests" / "artifacts" / "browser" / "latency.json"


def browser_latency() -> dict[str, float]:
    """Median click-to-panel milliseconds by model, as the browser test last measured them (empty before)."""
    try:
        found = json.loads(BROWSER.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {model: row["median_ms"] for model, row in found.items() if isinstance(row, dict) and "median_ms" in row}


def next_token_latency(engine: Engine, clicks: int = 10, prompt: str = "ROMEO:") -> tuple[float, int]:
    """Median milliseconds of the clicks that completed a cycle, and how many did (the prompt's cycle excluded)."""
    dbg = Debugger(engine, prompt, max_new_tokens=clicks + 1)
    dbg.widget()
    button = dbg.controls["Next token"]
    button.click()  # cycle 0 reads the whole prompt (prefill): not the step a learner repeats
    times = []
    for _ in range(clicks):
        before = dbg.cycle
        start = perf_counter()
        button.click()
        if dbg.cycle > before:
            times.append(perf_counter() - start)
    return (median(times) * 1e3 if times else float("nan")), len(times)


def run(quick: bool = False) -> list[dict]:
    """One row per model: median next-token click latency against its target (``quick``: 3 clicks)."""
    rows, browser = [], browser_latency()
    for model, target in TARGET_MS.items():
        row = {"benchmark": "debugger next-token latency", "model": model, "target_ms": target}
        try:
            engine = Engine(load(model))
        except Exception as exc:  # a model not trained or fetched yet: say so, keep the other rows
            rows.append({**row, "ms": None, "note": f"skipped: {exc}"})
            continue
        ms, clicks = next_token_latency(engine, clicks=3 if quick else 10)
        rows.append({**row, "ms": round(ms, 1), "clicks": clicks, "browser_ms": browser.get(model)})
    return rows


if __name__ == "__main__":
    for result in run():
        print(result)
