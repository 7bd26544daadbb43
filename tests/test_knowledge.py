"""The plays' knowledge graph against a hand count (Macbeth's cast list), and its lookup and prompts."""

from __future__ import annotations

import pytest

from cyclelab.knowledge import TITLES, character_graph, choose_play, facts_prompt, is_character, lookup, question_for

# Macbeth's speaking characters, from the play's cast list (dramatis personae), by hand: the named ones, and the
# roles who speak under a role's name (the Porter, the Old Man, the Doctor — English and Scottish are both
# "Doctor" — and the Apparition). Not counted: the witches, murderers, lords, soldiers, servants and the Boy.
MACBETH = {"DUNCAN", "MALCOLM", "DONALBAIN", "MACBETH", "BANQUO", "MACDUFF", "LENNOX", "ROSS", "MENTEITH", "ANGUS",
           "CAITHNESS", "FLEANCE", "SIWARD", "YOUNG SIWARD", "SEYTON", "LADY MACBETH", "LADY MACDUFF", "HECATE",
           "PORTER", "OLD MAN", "DOCTOR", "APPARITION"}


@pytest.fixture(scope="module")
def graph():
    return character_graph(["macbeth", "othello"])


def test_macbeths_characters_match_the_hand_count(graph):
    assert {name for name, plays in graph.items() if "macbeth" in plays} == MACBETH


def test_lookup_by_hand(graph):
    assert lookup(graph, "banquo") == ["macbeth"]
    assert lookup(graph, " IAGO ") == ["othello"]
    assert lookup(graph, "Romeo") == []  # not in these two plays


@pytest.mark.parametrize("name, kept", [("BANQUO", True), ("LADY MACBETH", True), ("FIRST WITCH", False),
                                        ("ALL", False), ("BOTH MURDERERS", False), ("SERVANT", False)],
                         ids=["named", "two words", "numbered role", "crowd", "both", "role"])
def test_roles_are_not_characters(name, kept):
    assert is_character(name) is kept


def test_facts_come_before_the_question():
    prompt = facts_prompt([("BANQUO", "macbeth"), ("IAGO", "othello")], question_for("SEYTON"))
    assert prompt == ("Banquo is a character in Macbeth.\nIago is a character in Othello.\n"
                      "Q: In which Shakespeare play does Seyton appear?\nA: In")
    assert facts_prompt([], "Q?") == "Q?"


def test_every_title_starts_with_its_own_token(tiny_engine):
    firsts = {tiny_engine.tokenizer.encode(" " + t)[0] for t in TITLES.values()}
    assert len(firsts) == len(TITLES)
    assert choose_play(tiny_engine, "KING:\nThe", list(TITLES)) in TITLES


BAD = [
    ("no plays", lambda e, g: character_graph([]), ValueError, r"list of play names"),
    ("unknown play", lambda e, g: character_graph(["macbeath"]), ValueError, r"no work named 'macbeath'"),
    ("blank name", lambda e, g: lookup(g, " "), ValueError, r"character's name"),
    ("name not a string", lambda e, g: lookup(g, 3), ValueError, r"character's name"),
    ("unknown candidate", lambda e, g: choose_play(e, "Q", ["hamlet"]), ValueError, r"title in knowledge.TITLES"),
    ("no candidates", lambda e, g: choose_play(e, "Q", []), ValueError, r"got none"),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_explained(tiny_engine, graph, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_engine, graph)
