"""The debugger's look: its stylesheet, the theme-aware probability shade, and the contrast it keeps.

Colours come from JupyterLab's theme variables (``--jp-…``); the few the themes lack (the shade's
hue and strength) are set per theme from ``body[data-jp-theme-light]``, which JupyterLab 4 and
Notebook 7 put on the page. :data:`THEMES` holds the two themes' values so a test (and the replay
page, which has no JupyterLab around it) can work out every text/background pair's contrast ratio.

The shade is a stated mapping: colour strength ``s = 1 + log10(p) / 2`` clipped to [0, 1], so
p = 1% is unshaded, 10% half and 100% full strength (the usual 5–30% of a small model land between
a third and three quarters); the tint is the theme's hue at ``s`` times the theme's strongest alpha,
light enough under dark text in the light theme and dark enough under light text in the dark one.
"""

from __future__ import annotations

import math

from cyclelab.core.events import Stage
from cyclelab.debugger.shading import STAGE_COLOURS

# JupyterLab 4's own values (theme-light-extension and theme-dark-extension).
THEMES = {
    "light": {
        "ui-font-color1": "rgba(0,0,0,.87)",
        "ui-font-color2": "rgba(0,0,0,.54)",
        "layout-color0": "#ffffff",
        "layout-color1": "#ffffff",
        "layout-color2": "#eeeeee",
        "border-color1": "#bdbdbd",
        "brand-color1": "#1976d2",
        "error-color1": "#d32f2f",
    },
    "dark": {
        "ui-font-color1": "rgba(255,255,255,.87)",
        "ui-font-color2": "rgba(255,255,255,.54)",
        "layout-color0": "#111111",
        "layout-color1": "#212121",
        "layout-color2": "#424242",
        "border-color1": "#616161",
        "brand-color1": "#2196f3",
        "error-color1": "#f44336",
    },
}
# The shade's hues (blue: probability, orange: attention weight) and strongest alpha, per theme.
HUES = {"blue": "33,150,243", "orange": "230,126,34"}
STRONGEST = {"light": 0.7, "dark": 0.5}
# Text on each lit stage: whichever of black and white reads on the stage's colour.
STAGE_TEXT = {Stage.FETCH: "#fff", Stage.READ: "#111", Stage.EXECUTE: "#111", Stage.WRITEBACK: "#fff"}


def strength(p: float) -> float:
    """The shade's strength for probability ``p``: 0 at 1% and below, 0.5 at 10%, 1 at 100%."""
    return 0.0 if p <= 0 else max(0.0, min(1.0, 1 + math.log10(p) / 2))


def shade(p: float, hue: str = "blue") -> str:
    """An inline style shading an element by ``p`` (the stylesheet turns ``--s`` into the theme's tint)."""
    return f"--s:{strength(p):.2f};--h:var(--cld-{hue})"


# ------------------------------------------------------------------ contrast (WCAG 2)


def rgba(colour: str) -> tuple[float, float, float, float]:
    """'#rgb', '#rrggbb' or 'rgba(r,g,b,a)' as (r, g, b, a), channels 0–255."""
    colour = colour.strip()
    if colour.startswith("#"):
        digits = colour[1:]
        if len(digits) == 3:
            digits = "".join(d * 2 for d in digits)
        return (*(int(digits[k : k + 2], 16) for k in (0, 2, 4)), 1.0)
    r, g, b, *a = (float(x) for x in colour[colour.index("(") + 1 : -1].split(","))
    return r, g, b, a[0] if a else 1.0


def over(top: str | tuple, bottom: str | tuple) -> tuple[float, float, float, float]:
    """``top`` painted over the opaque ``bottom`` (alpha blending)."""
    t = rgba(top) if isinstance(top, str) else top
    b = rgba(bottom) if isinstance(bottom, str) else bottom
    return (*(t[3] * t[k] + (1 - t[3]) * b[k] for k in range(3)), 1.0)


def luminance(colour: str | tuple) -> float:
    r, g, b, _ = rgba(colour) if isinstance(colour, str) else colour

    def linear(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)


def contrast(fg: str | tuple, bg: str | tuple) -> float:
    """The WCAG contrast ratio of ``fg`` (blended over ``bg`` if translucent) on the opaque ``bg``."""
    a, b = luminance(over(fg, bg)), luminance(bg)
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


def tint(theme: str, hue: str, s: float, bg: str) -> tuple:
    """The colour of a shade of strength ``s`` over ``bg`` in ``theme``."""
    return over((*rgba(f"rgba({HUES[hue]})")[:3], STRONGEST[theme] * s), bg)


def dim(theme: str) -> str:
    """The secondary text colour: the theme's text colour at three quarters of its alpha."""
    r, g, b, a = rgba(THEMES[theme]["ui-font-color1"])
    return f"rgba({r:.0f},{g:.0f},{b:.0f},{0.75 * a:.3f})"


# ------------------------------------------------------------------ the stylesheet

_FG, _BG0 = "var(--jp-ui-font-color1,rgba(0,0,0,.87))", "var(--jp-layout-color0,#fff)"
_BG2, _LINE = "var(--jp-layout-color2,#eee)", "var(--jp-border-color1,#bdbdbd)"
_BRAND, _ERR = "var(--jp-brand-color1,#1976d2)", "var(--jp-error-color1,#d32f2f)"
_DIM = f"color-mix(in srgb,{_FG} 75%,transparent)"
_DARK = 'body[data-jp-theme-light="false"]'


def _palette(theme: str) -> str:
    return f"--cld-blue:{HUES['blue']};--cld-orange:{HUES['orange']};--cld-max:{STRONGEST[theme]}"


STYLE = f"""<style>
.cld,.cld-root{{{_palette("light")}}}
{_DARK} .cld,{_DARK} .cld-root{{{_palette("dark")}}}
@media (prefers-color-scheme:dark){{.cld-auto .cld{{{_palette("dark")}}}}}
.cld{{color:{_FG};font-family:var(--jp-ui-font-family,system-ui,sans-serif);font-size:14px;line-height:1.45;
 min-width:0}}
.cld-h{{font-weight:600;font-size:15px;margin:0 0 2px;padding:0;line-height:1.3}}
.cld-key{{font-size:12px;margin:0 0 4px;color:{_DIM}}}
[title]{{text-decoration-style:dotted}}
.cld-dim{{color:{_DIM}}} .cld-err{{color:{_ERR}}}
.cld-tok{{font-family:var(--jp-code-font-family,monospace);white-space:pre}}
.cld-strip{{display:flex;flex-wrap:nowrap;align-items:center;gap:4px;white-space:nowrap;overflow:hidden}}
.cld-box{{flex:0 1 auto;min-width:0;overflow:hidden;text-overflow:ellipsis;padding:2px 8px;border-radius:4px;
 background:{_BG2};color:{_FG}}}
.cld-box.cld-on{{font-weight:600}}
.cld-line{{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}}
.cld-t{{border-collapse:collapse}} .cld-t th{{text-align:left;font-weight:normal;color:{_DIM};padding:0 6px}}
.cld-t td{{padding:1px 6px;white-space:nowrap}}
.cld-sh{{background:rgba(var(--h),calc(var(--cld-max) * var(--s)))}}
.cld-bar{{display:inline-block;height:12px;border-radius:2px;background:{_BRAND};vertical-align:middle;margin-right:5px}}
.cld-bar.cld-raw{{background:{_DIM}}}
.cld-stack{{display:flex;height:20px;width:100%;background:{_BG2};border-radius:3px;overflow:hidden;margin:1px 0 5px}}
.cld-seg{{flex:0 0 auto;overflow:hidden;border-right:1px solid {_BG0};color:{_FG};font-size:12px;line-height:20px;
 padding-left:2px;white-space:pre}}
.cld-seg::after,.cld-kv::before,.cld-u::after{{content:attr(data-t)}}
.cld-seg.cld-gone{{background:{_BG2};color:{_DIM};text-decoration:line-through;outline:1px dashed {_LINE};
 outline-offset:-1px}}
.cld-cum{{position:relative;height:16px;background:{_BG2};border-radius:3px;margin:18px 0 4px}}
.cld-slice{{position:absolute;top:0;bottom:0;min-width:2px;background:{_BRAND}}}
.cld-u{{position:absolute;top:-3px;bottom:-3px;width:2px;background:{_ERR}}}
.cld-u::after{{position:absolute;top:-17px;left:-3px;font-size:12px;color:{_ERR}}}
.cld-kv{{display:flex;align-items:center;gap:4px;height:15px;margin:1px 0;font-size:12px;color:{_DIM}}}
.cld-kv::before{{flex:0 0 30px;text-align:right}}
.cld-kv>span{{height:8px;min-width:1px;background:{STAGE_COLOURS[Stage.READ]};border-radius:1px}}
.cld-chip{{display:inline-block;padding:1px 4px;margin:1px;border-radius:3px;border:1px solid transparent}}
.cld-fork{{border-color:{_ERR}}}
.cld-t .cld-chip{{max-width:10em;overflow:hidden;text-overflow:ellipsis;vertical-align:middle}}
.cld-panel{{border:1px solid {_LINE};border-radius:4px;padding:6px 8px;overflow:hidden}}
.cld-wrap,.cld-wrap .widget-label{{white-space:normal !important;overflow:visible !important;height:auto !important}}
.cld-lanes{{display:inline-table;vertical-align:top;margin:0 8px 4px 0}} .cld-lanes td{{padding:0 1px}}
.cld-fill{{display:flex;flex-direction:column;height:100%}}
.cld-prose{{flex:1 1 0;min-height:0;overflow:auto;display:flex;flex-direction:column-reverse}}
.cld-prose>div{{margin-bottom:auto;white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace)}}
.cld-wrap.cld-msg{{height:2.9em !important;overflow-y:auto !important}}
.cld-root .widget-html-content{{font-size:14px}}
.cld-root .cld-next{{font-weight:600}}
.cld-out,.cld-text,.cld-tab{{overflow:auto !important}}
.cld-out{{height:262px}} .cld-text{{height:196px}} .cld-tab{{height:330px}}
.cld-main{{container:cld-main / inline-size}}
.cld-main .cld-key{{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}}
@container cld-main (min-width:860px){{.cld-text{{height:262px}}}}
.cld-text>.widget-html,.cld-text .widget-html-content{{height:100%}}
@keyframes cld-flash0{{from{{box-shadow:0 0 0 3px {_BRAND}}}to{{box-shadow:0 0 0 3px transparent}}}}
@keyframes cld-flash1{{from{{box-shadow:0 0 0 3px {_BRAND}}}to{{box-shadow:0 0 0 3px transparent}}}}
.cld-changed0{{animation:cld-flash0 1.2s ease-out}} .cld-changed1{{animation:cld-flash1 1.2s ease-out}}
@media (prefers-reduced-motion:reduce){{.cld-changed0,.cld-changed1{{animation:none;box-shadow:0 0 0 2px {_BRAND}}}}}
</style>"""


def text_pairs(theme: str) -> dict[str, tuple]:
    """Every (text colour, background) the views paint text with, by what it is, in ``theme``."""
    t = THEMES[theme]
    fg, bg0, bg1, bg2 = t["ui-font-color1"], t["layout-color0"], t["layout-color1"], t["layout-color2"]
    pairs = {f"text on {name}": (fg, bg) for name, bg in (("layout-color0", bg0), ("layout-color1", bg1), ("box", bg2))}
    pairs |= {f"dim text on {name}": (dim(theme), bg) for name, bg in (("page", bg0), ("box", bg2))}
    pairs["error on the page"] = (t["error-color1"], bg0)
    for hue in HUES:
        for s in (0.0, 0.5, 1.0):
            for name, bg in (("0", bg0), ("1", bg1)):
                pairs[f"text on the {hue} shade at {s} (layout-color{name})"] = (fg, tint(theme, hue, s, bg))
    pairs |= {f"lit {stage.value}": (STAGE_TEXT[stage], STAGE_COLOURS[stage]) for stage in Stage}
    return pairs


def graphic_pairs(theme: str) -> dict[str, tuple]:
    """Every (bar colour, background) of the views' bars, in ``theme`` (WCAG AA wants 3:1)."""
    t = THEMES[theme]
    return {
        "p after bar": (t["brand-color1"], t["layout-color0"]),
        "p before bar": (dim(theme), t["layout-color0"]),
        "p after bar (layout-color1)": (t["brand-color1"], t["layout-color1"]),
    }
