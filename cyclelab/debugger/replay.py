"""A self-contained HTML page that replays a debugger run, token by token, in any browser.

The page holds the views' HTML for the end of each cycle (each distinct string once), the
views' stylesheet with light and dark colours for JupyterLab's theme variables, and a few
lines of JavaScript for the step/back controls: no kernel, no network, no CDN.
"""

from __future__ import annotations

import html
import json

from cyclelab.debugger.style import THEMES
from cyclelab.debugger.views import STYLE

PANELS = ("output", "text", "sampler", "branches", "registers", "memory", "cost")
VIEWS = ("pipeline", "status") + PANELS
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>:root{{{light}}} @media (prefers-color-scheme:dark){{:root{{{dark}}}}}
body{{background:var(--jp-layout-color0);margin:0 10px 10px}}
.cld-grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(420px,100%),1fr));gap:8px;margin-top:8px}}
.cld-grid>.cld-panel{{overflow-x:auto;max-width:100%}}
.cld-controls{{position:sticky;top:0;z-index:1;background:var(--jp-layout-color0);display:flex;flex-wrap:wrap;
gap:6px;align-items:center;padding:6px 0;border-bottom:1px solid var(--jp-border-color1)}}
.cld-controls button{{font:inherit;padding:6px 12px;min-height:36px;color:var(--jp-ui-font-color1);
background:var(--jp-layout-color2);border:1px solid var(--jp-border-color1);border-radius:4px}}
.cld-controls input{{flex:1 1 120px;min-width:0}}</style>
{style}</head>
<body class="cld cld-auto"><h1 class="cld-h" style="margin-top:10px">{title}</h1>
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
    if (e.target === slider) return;  // the slider moves itself (its input event shows the cycle)
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
        light=_variables(THEMES["light"]),
        dark=_variables(THEMES["dark"]),
        style=STYLE,
        panels=panels,
        data=data,
    )
