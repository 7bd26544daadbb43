"""A self-contained HTML page that replays a debugger run, token by token, in any browser.

The page holds the views' HTML for the end of each cycle (each distinct string once), the
views' stylesheet with light and dark colours for JupyterLab's theme variables, and a few
lines of JavaScript for the step/back controls: no kernel, no network, no CDN.
"""

from __future__ import annotations

import html
import json

from cyclelab.debugger.views import STYLE

PANELS = ("output", "sampler", "text", "branches", "registers", "memory")
VIEWS = ("pipeline", "status") + PANELS
_LIGHT = {
    "ui-font-color1": "#212121",
    "ui-font-color2": "#616161",
    "ui-font-color3": "#9e9e9e",
    "layout-color1": "#ffffff",
    "layout-color2": "#eeeeee",
    "border-color2": "#e0e0e0",
    "brand-color1": "#1976d2",
    "error-color1": "#d32f2f",
}
_DARK = {
    "ui-font-color1": "#e0e0e0",
    "ui-font-color2": "#bdbdbd",
    "ui-font-color3": "#8a8a8a",
    "layout-color1": "#111111",
    "layout-color2": "#2a2a2a",
    "border-color2": "#3a3a3a",
    "brand-color1": "#64b5f6",
    "error-color1": "#ef5350",
}
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>:root{{{light}}} @media (prefers-color-scheme:dark){{:root{{{dark}}}}}
body{{background:var(--jp-layout-color1);margin:10px}}
.cld-grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(380px,100%),1fr));gap:8px;margin-top:8px}}
.cld-controls{{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin:6px 0}}
.cld-controls button{{font:inherit;padding:4px 10px;color:var(--jp-ui-font-color1);background:var(--jp-layout-color2);
border:1px solid var(--jp-border-color2);border-radius:4px}}</style>
{style}</head>
<body class="cld"><div class="cld-h">{title}</div>
<div id="v-pipeline"></div>
<div class="cld-controls"><button id="back" type="button">◀ Back cycle</button>
<button id="next" type="button">Next token ▶</button><b id="counter">cycle 0</b>
<span class="cld-dim" id="of"></span><input id="slider" type="range" min="0" value="0" aria-label="cycle"></div>
<div id="v-status"></div>
<div class="cld-grid">{panels}</div>
<script type="application/json" id="replay-data">{data}</script>
<script>
(function () {{
  const d = JSON.parse(document.getElementById("replay-data").textContent);
  const last = d.frames.length - 1, slider = document.getElementById("slider");
  let k = 0;
  slider.max = last;
  function show(to) {{
    k = Math.max(0, Math.min(last, to));
    d.views.forEach((name, i) => {{ document.getElementById("v-" + name).innerHTML = d.parts[d.frames[k][i]]; }});
    document.getElementById("counter").textContent = "cycle " + k;
    document.getElementById("of").textContent = "of " + last + " tokens";
    slider.value = k;
  }}
  document.getElementById("next").onclick = () => show(k + 1);
  document.getElementById("back").onclick = () => show(k - 1);
  slider.oninput = () => show(Number(slider.value));
  document.addEventListener("keydown", e => {{
    if (e.key === "ArrowRight") show(k + 1);
    if (e.key === "ArrowLeft") show(k - 1);
  }});
  show(0);
}})();
</script></body></html>
"""


def _variables(colours: dict[str, str]) -> str:
    return ";".join(f"--jp-{name}:{value}" for name, value in colours.items())


def replay_page(frames: list[dict[str, str]], title: str) -> str:
    """The page replaying ``frames`` (the views' HTML by name, one dict per cycle: 0 = before the first token)."""
    if not frames:
        raise ValueError("no frames to replay: the page needs at least the start (cycle 0)")
    missing = sorted({name for frame in frames for name in VIEWS if name not in frame})
    if missing:
        raise ValueError(f"frames lack the view(s) {missing}; give every view of render_all")
    parts: dict[str, int] = {}
    table = [[parts.setdefault(frame[name], len(parts)) for name in VIEWS] for frame in frames]
    data = json.dumps(
        {"views": VIEWS, "parts": list(parts), "frames": table}, ensure_ascii=False, separators=(",", ":")
    ).replace("</", "<\\/")
    panels = "".join(f'<div class="cld-panel" id="v-{name}"></div>' for name in PANELS)
    return _PAGE.format(
        title=html.escape(title),
        light=_variables(_LIGHT),
        dark=_variables(_DARK),
        style=STYLE,
        panels=panels,
        data=data,
    )
