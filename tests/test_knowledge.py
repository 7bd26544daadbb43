"""The plays' knowledge graph against hand counts (Macbeth's cast list, the speakers of Macbeth's act 1
scene 2), and its lookup, embedding search and prompts."""

from __future__ import annotations

import pytest
import torch

from cyclelab.lab.embedding import sentence_embeddings
from cyclelab.lab.in_context import label_logprobs
from cyclelab.lab.knowledge import (
    TITLES,
    character_graph,
    fact_sentence,
    facts_about,
    facts_prompt,
    is_character,
    lookup,
    nearest_facts,
    play_edges,
    question_for,
)
from cyclelab.loading import corpus as data

# Macbeth's speaking characters, from the play's cast list (dramatis personae), by hand: the named ones, and the
# roles who speak under a role's name (the Porter, the Old Man, the Doctor — English and Scottish are both
# "Doctor" — and the Apparition). Not counted: the witches, murderers, lords, soldiers, servants and the Boy.
MACBETH = {
    "DUNCAN",
    "MALCOLM",
    "DONALBAIN",
    "MACBETH",
    "BANQUO",
    "MACDUFF",
    "LENNOX",
    "ROSS",
    "MENTEITH",
    "ANGUS",
    "CAITHNESS",
    "FLEANCE",
    "SIWARD",
    "YOUNG SIWARD",
    "SEYTON",
    "LADY MACBETH",
    "LADY MACDUFF",
    "HECATE",
    "PORTER",
    "OLD MAN",
    "DOCTOR",
    "APPARITION",
}


@pytest.fixture(scope="module")
def graph():
    return character_graph(["macbeth", "othello"])


def test_macbeths_characters_match_the_hand_count(graph):
    assert {name for name, plays in graph.items() if "macbeth" in plays} == MACBETH


def test_lookup_by_hand(graph):
    assert lookup(graph, "banquo") == ["macbeth"]
    assert lookup(graph, " IAGO ") == ["othello"]
    assert lookup(graph, "Romeo") == []  # not in these two plays


@pytest.mark.parametrize(
    "name, kept",
    [
        ("BANQUO", True),
        ("LADY MACBETH", True),
        ("FIRST WITCH", False),
        ("ALL", False),
        ("BOTH MURDERERS", False),
        ("SERVANT", False),
    ],
    ids=["named", "two words", "numbered role", "crowd", "both", "role"],
)
def test_roles_are_not_characters(name, kept):
    assert is_character(name) is kept


# Macbeth, act 1, scene 2, read off the play by hand: Duncan asks about the bleeding sergeant, Malcolm
# answers, the sergeant (tagged SOLDIER here) tells the battle in three speeches between Duncan's, Malcolm
# announces Ross, Lennox remarks on his haste, Ross brings the news, and Duncan and Ross alternate to the end.
SCENE_1_2 = [
    "DUNCAN",
    "MALCOLM",
    "SOLDIER",
    "DUNCAN",
    "SOLDIER",
    "DUNCAN",
    "SOLDIER",
    "DUNCAN",
    "MALCOLM",
    "LENNOX",
    "ROSS",
    "DUNCAN",
    "ROSS",
    "DUNCAN",
    "ROSS",
    "DUNCAN",
    "ROSS",
    "DUNCAN",
]
# Adjacent speeches between two characters (the sergeant is a role, so his speeches pair no one):
# Duncan-Malcolm (speeches 1-2 and 8-9), Malcolm-Lennox (9-10), Lennox-Ross (10-11), Ross-Duncan (11-12 on).
TALKS_1_2 = {("DUNCAN", "MALCOLM"), ("LENNOX", "MALCOLM"), ("LENNOX", "ROSS"), ("DUNCAN", "ROSS")}


@pytest.fixture(scope="module")
def edges():
    return play_edges(["macbeth"])


def test_a_short_scene_by_hand():
    label, speeches = data.scenes("macbeth")[1]
    assert label == "1.2" and [name for name, _ in speeches] == SCENE_1_2
    assert speeches[0][1][0] == "What bloody man is that? He can report,"


def test_who_appears_in_a_scene_and_who_speaks_to_whom(edges):
    assert [e[0] for e in edges if e[1:] == ("appears in", "macbeth 1.2")] == ["DUNCAN", "MALCOLM", "LENNOX", "ROSS"]
    assert not [e for e in edges if e[1:] == ("appears in", "macbeth 1.1")]  # the witches' scene: roles only
    talks = {(a, b) for a, relation, b in edges if relation == "speaks to"}
    assert TALKS_1_2 <= talks
    assert ("BANQUO", "MACBETH") in talks and ("MACBETH", "SEYTON") in talks
    assert all(a < b for a, b in talks) and len(talks) == sum(e[1] == "speaks to" for e in edges)  # each pair once


def test_the_play_facts_come_first_and_match_the_cast(edges):
    cast = [e[0] for e in edges if e[1] == "character in"]
    assert set(cast) == MACBETH and edges[: len(cast)] == [
        (name, "character in", "macbeth") for name in sorted(MACBETH)
    ]


def test_graph_lookup_by_hand():
    small = [
        ("BANQUO", "character in", "macbeth"),
        ("LADY MACBETH", "speaks to", "MACBETH"),
        ("MACBETH", "speaks to", "SEYTON"),
        ("BANQUO", "speaks to", "MACBETH"),
    ]
    assert facts_about(small, " macbeth ") == [small[1], small[2], small[3]]  # head or tail, whole name, in order
    assert facts_about(small, "Seyton") == [small[2]]
    assert facts_about(small, "Lady") == []


@pytest.mark.parametrize(
    "edge, sentence",
    [
        (("SEYTON", "character in", "macbeth"), "Seyton is a character in Macbeth."),
        (("SEYTON", "appears in", "macbeth 5.3"), "Seyton appears in act 5, scene 3 of Macbeth."),
        (("LADY MACBETH", "speaks to", "MACBETH"), "Lady Macbeth speaks to Macbeth."),
        (("GONZALO", "appears in", "tempest 2.1"), "Gonzalo appears in act 2, scene 1 of The Tempest."),
    ],
    ids=["play", "scene", "speaks to", "two-word title"],
)
def test_fact_sentences(edge, sentence):
    assert fact_sentence(edge) == sentence


def test_embedding_search_finds_the_fact_about_the_character_asked(minilm):
    facts = [
        "Iago is a character in Othello.",
        "Banquo is a character in Macbeth.",
        "Romeo speaks to Tybalt.",
        "Gonzalo appears in act 2, scene 1 of The Tempest.",
    ]
    vectors = sentence_embeddings(minilm, facts)
    assert nearest_facts(minilm, facts, vectors, question_for("BANQUO"), 1) == ["Banquo is a character in Macbeth."]
    found = nearest_facts(minilm, facts, vectors, "Who does Tybalt talk to?", 2)
    assert found[0] == "Romeo speaks to Tybalt." and len(found) == 2


def test_facts_come_before_the_question():
    prompt = facts_prompt(
        [fact_sentence(("BANQUO", "character in", "macbeth")), fact_sentence(("IAGO", "character in", "othello"))],
        question_for("SEYTON"),
    )
    assert prompt == (
        "Banquo is a character in Macbeth.\nIago is a character in Othello.\n"
        "Q: In which Shakespeare play does Seyton appear?\nA: In"
    )
    assert facts_prompt([], "Q?") == "Q?"


def test_every_title_starts_with_its_own_token(tiny_engine):
    firsts = {tiny_engine.tokenizer.encode(" " + t)[0] for t in TITLES.values()}
    assert len(firsts) == len(TITLES)
    assert label_logprobs(tiny_engine, "KING:\nThe", [" lord"], list(TITLES.values())).shape == (1, len(TITLES))


BAD = [
    ("no plays", lambda e, g: character_graph([]), ValueError, r"list of play names"),
    ("unknown play", lambda e, g: character_graph(["macbeath"]), ValueError, r"no work named 'macbeath'"),
    ("blank name", lambda e, g: lookup(g, " "), ValueError, r"character's name"),
    ("name not a string", lambda e, g: lookup(g, 3), ValueError, r"character's name"),
    ("lookup of a blank name", lambda e, g: facts_about([], "  "), ValueError, r"character's name"),
    ("unknown relation", lambda e, g: fact_sentence(("A", "loves", "B")), ValueError, r"unknown relation 'loves'"),
    (
        "one vector short",
        lambda e, g: nearest_facts(None, ["a", "b"], torch.zeros(1, 4), "q", 1),
        ValueError,
        r"one vector per sentence: 2 sentences",
    ),
    (
        "k zero",
        lambda e, g: nearest_facts(None, ["a"], torch.zeros(1, 4), "q", 0),
        ValueError,
        r"k must be an integer from 1 to 1",
    ),
    ("unknown scene play", lambda e, g: data.scenes("macbeath"), ValueError, r"no work named 'macbeath'"),
]


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_explained(tiny_engine, graph, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_engine, graph)
