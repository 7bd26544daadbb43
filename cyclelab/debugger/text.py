"""Text mode: the debugger's views as plain text, for a terminal, a log or a test.

The views' HTML becomes text (:func:`~cyclelab.debugger.views.to_text`); what only a picture can
explain (keys to shades and colours, colour swatches) is left out, and one key line at the end
explains the notation the views use.
"""

from __future__ import annotations

import re

from cyclelab.debugger.views import State, render_all, to_text

# Pictures only: a key to shades, colours or swatches ("shade = probability", "(darker = more weight)")
# and the swatches themselves mean nothing in plain text (the numbers they stand for are printed beside
# them). A key is a colour word, then "=": the generated text, printed as is, is never taken for one.
_WORDS = r"(?:shade|shaded|dotted|darker|lighter|grey|greyed|blue|red|orange|outlined|colou?r)"
_VISUAL = re.compile(rf"^\W*{_WORDS}\b[^=]*=", re.I)
_VISUAL_ASIDE = re.compile(rf"\s*\([^()=]*\b{_WORDS}\b[^()=]*=[^()]*\)|[■▇█]\s?", re.I)
_KEY_LINE = re.compile(r"<p class='cld-key'[^>]*>.*?</p>", re.S)  # a panel's key: TEXT_KEY stands for them all
TEXT_KEY = (
    "key: cycle N = the N-th token's cycle (cycle 1 reads the prompt); "
    "p = probability after the sampler's settings (what the token was drawn from); "
    "model p = softmax of the plain logits; ‖x‖ = length of the residual vector after the layer; "
    "L1 H2 = layer 1, head 2; ␣ = a space, ⏎ = a newline"
)


def plain(text: str) -> str:
    """``text`` without what only a picture explains: keys to shades and colours, swatches, colour asides."""
    lines = []
    for line in text.split("\n"):
        clauses = [c for c in line.split("; ") if not _VISUAL.match(c)]
        line = _VISUAL_ASIDE.sub("", "; ".join(clauses)).rstrip()
        if line.strip():
            lines.append(line)
    return "\n".join(lines)


def render_text(state: State) -> str:
    """The whole debugger as plain text (text mode): the same views without the pictures' keys, and one
    key line for the notation they use."""
    views = render_all(state)
    order = ["pipeline", "cost", "status", "text", "output", "sampler", "registers", "memory", "branches"]
    head = f"cycle {state.cycle} of {state.max_cycles} · {state.written} tokens written · model {state.model}"
    blocks = [plain(to_text(_KEY_LINE.sub("", views[k]))) for k in order]
    return "\n\n".join([head] + [b for b in blocks if b] + [TEXT_KEY])
