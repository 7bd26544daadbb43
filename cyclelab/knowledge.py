"""A knowledge graph of the plays as the missing background: character → play, looked up and put in a prompt.

:func:`character_graph` reads who speaks in each play (:func:`cyclelab.data.speeches`) into edges
``CHARACTER -> {plays}``; :func:`lookup` answers a question by graph lookup; :func:`facts_prompt` writes the
facts found in front of a question; :func:`choose_play` scores a model's answer among candidate plays by the
probability of each title's first token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from . import data
from .engine import Engine

#: Speaker tags that name a role, not a character (a crowd, a stage function): left out of the graph.
GENERIC = frozenset({"ALL", "BOTH", "LORD", "LORDS", "SERVANT", "SERVANTS", "MESSENGER", "SOLDIER", "SOLDIERS",
                     "ATTENDANT", "GENTLEMAN", "GENTLEWOMAN", "OFFICER", "CITIZEN", "SONG", "PAGE", "BOY", "SON",
                     "MURDERER", "MURDERERS", "WITCH", "WITCHES"})
#: How the plays are called in a sentence, for the ones the chapter asks about (each title starts with its own
#: token). Hamlet and King Lear are left out: their texts tag speakers by abbreviations ("HAM.", "GLOU.").
TITLES = {"macbeth": "Macbeth", "othello": "Othello", "tempest": "The Tempest", "julius_caesar": "Julius Caesar",
          "twelfth_night": "Twelfth Night", "romeo_and_juliet": "Romeo and Juliet"}


def is_character(name: str) -> bool:
    """False for crowds and stage roles ("ALL", "FIRST MURDERER", "SERVANT"): names no one is called by."""
    words = name.split()
    return bool(words) and name not in GENERIC and words[-1] not in GENERIC and not (
        words[0] in {"FIRST", "SECOND", "THIRD", "FOURTH", "1", "2", "3", "4", "BOTH"})


def character_graph(plays: Iterable[str]) -> dict[str, set[str]]:
    """``CHARACTER -> {plays they speak in}`` over ``plays`` (names as :func:`cyclelab.data.play_names` gives them)."""
    plays = list(plays)
    if not plays or isinstance(plays, str):
        raise ValueError(f"give a list of play names, e.g. ['macbeth'], got {plays!r}")
    graph: dict[str, set[str]] = {}
    for play in plays:
        for name, _ in data.speeches(play):
            if is_character(name):
                graph.setdefault(name, set()).add(play)
    return graph


def lookup(graph: dict[str, set[str]], character: str) -> list[str]:
    """The plays ``character`` speaks in (any case), sorted; [] when the graph does not know them."""
    if not isinstance(character, str) or not character.strip():
        raise ValueError(f"give a character's name, e.g. 'BANQUO', got {character!r}")
    return sorted(graph.get(character.strip().upper(), ()))


def facts_prompt(facts: Sequence[tuple[str, str]], question: str) -> str:
    """``question`` after one sentence per (character, play) fact; the question alone when there are none."""
    lines = [f"{character.title()} is a character in {TITLES.get(play, play)}." for character, play in facts]
    return "".join(line + "\n" for line in lines) + question


def question_for(character: str) -> str:
    """The question asked for ``character``; it ends where the play's title goes."""
    return f"Q: In which Shakespeare play does {character.title()} appear?\nA: In"


def choose_play(engine: Engine, prompt: str, candidates: Sequence[str]) -> str:
    """The candidate play (a :data:`TITLES` key) whose title's first token is likeliest after ``prompt``."""
    unknown = [c for c in candidates if c not in TITLES]
    if unknown or not candidates:
        raise ValueError(f"candidates must be plays with a title in knowledge.TITLES ({', '.join(TITLES)}); "
                         f"got {unknown or 'none'}")
    firsts = [engine.tokenizer.encode(" " + TITLES[c], add_special_tokens=False)[0] for c in candidates]
    if len(set(firsts)) < len(firsts):
        raise ValueError("two candidate titles start with the same token: the first token cannot tell them apart")
    probs = torch.softmax(engine.logits(engine.encode(prompt))[0, -1].float(), -1)
    return candidates[int(torch.argmax(probs[firsts]))]


__all__ = ["GENERIC", "TITLES", "character_graph", "choose_play", "facts_prompt", "is_character", "lookup",
           "question_for"]
