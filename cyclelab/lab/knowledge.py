"""A knowledge graph of the plays as the missing background: facts looked up, or found by embedding search,
and put in a prompt.

:func:`character_graph` reads who speaks in each play (:func:`cyclelab.loading.corpus.speeches`) into edges
``CHARACTER -> {plays}``; :func:`play_edges` adds, scene by scene (:func:`cyclelab.loading.corpus.scenes`), who appears
in which scene and who speaks to whom, as ``(head, relation, tail)`` triples; :func:`facts_about` is the graph
lookup, :func:`nearest_facts` the embedding search; :func:`fact_sentence` and :func:`facts_prompt` write the
facts found in front of a question (:func:`cyclelab.lab.in_context.label_logprobs` scores the answer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from cyclelab.lab.embedding import sentence_embeddings
from cyclelab.loading import corpus as data
from cyclelab.loading.schema import is_int

#: Speaker tags that name a role, not a character (a crowd, a stage function): left out of the graph.
GENERIC = frozenset(
    {
        "ALL",
        "BOTH",
        "LORD",
        "LORDS",
        "SERVANT",
        "SERVANTS",
        "MESSENGER",
        "SOLDIER",
        "SOLDIERS",
        "ATTENDANT",
        "GENTLEMAN",
        "GENTLEWOMAN",
        "OFFICER",
        "CITIZEN",
        "SONG",
        "PAGE",
        "BOY",
        "SON",
        "MURDERER",
        "MURDERERS",
        "WITCH",
        "WITCHES",
    }
)
#: How the plays are called in a sentence, for the ones the chapter asks about (each title starts with its own
#: token). Hamlet and King Lear are left out: their texts tag speakers by abbreviations ("HAM.", "GLOU.").
TITLES = {
    "macbeth": "Macbeth",
    "othello": "Othello",
    "tempest": "The Tempest",
    "julius_caesar": "Julius Caesar",
    "twelfth_night": "Twelfth Night",
    "romeo_and_juliet": "Romeo and Juliet",
}


def is_character(name: str) -> bool:
    """False for crowds and stage roles ("ALL", "FIRST MURDERER", "SERVANT"): names no one is called by."""
    words = name.split()
    return (
        bool(words)
        and name not in GENERIC
        and words[-1] not in GENERIC
        and words[0] not in {"FIRST", "SECOND", "THIRD", "FOURTH", "1", "2", "3", "4", "BOTH"}
    )


def character_graph(plays: Iterable[str]) -> dict[str, set[str]]:
    """``CHARACTER -> {plays they speak in}`` over ``plays`` (names as :func:`cyclelab.loading.corpus.play_names` gives them)."""
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


Edge = tuple[str, str, str]  # (head, relation, tail)


def play_edges(plays: Iterable[str]) -> list[Edge]:
    """The graph as triples, play by play: ``(CHARACTER, "character in", play)``, then scene by scene
    ``(CHARACTER, "appears in", "play act.scene")`` (they speak in it at least once) and
    ``(A, "speaks to", B)`` (one's speech comes right after the other's in a scene; A before B
    alphabetically, each pair once per play). Crowds and stage roles are left out (:func:`is_character`)."""
    graph = character_graph(plays)
    edges: list[Edge] = []
    for play in dict.fromkeys(plays):
        edges += [(name, "character in", play) for name in sorted(graph) if play in graph[name]]
        pairs: list[Edge] = []
        for label, speeches in data.scenes(play):
            order = [name for name, _ in speeches]
            edges += [(name, "appears in", f"{play} {label}") for name in dict.fromkeys(order) if is_character(name)]
            pairs += [
                (min(a, b), "speaks to", max(a, b))
                for a, b in zip(order, order[1:])
                if a != b and is_character(a) and is_character(b)
            ]
        edges += list(dict.fromkeys(pairs))
    return edges


def facts_about(edges: Sequence[Edge], name: str) -> list[Edge]:
    """Graph lookup: every edge whose head or tail is ``name`` (the whole name, any case), in the edges' order."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"give a character's name, e.g. 'BANQUO', got {name!r}")
    key = name.strip().upper()
    return [edge for edge in edges if key in (edge[0], edge[2])]


def fact_sentence(edge: Edge) -> str:
    """One edge as an English sentence, e.g. "Seyton appears in act 5, scene 3 of Macbeth."."""
    head, relation, tail = edge
    if relation == "character in":
        return f"{head.title()} is a character in {TITLES.get(tail, tail)}."
    if relation == "appears in":
        play, scene = tail.rsplit(" ", 1)
        act, number = scene.split(".")
        return f"{head.title()} appears in act {act}, scene {number} of {TITLES.get(play, play)}."
    if relation == "speaks to":
        return f"{head.title()} speaks to {tail.title()}."
    raise ValueError(f"unknown relation {relation!r}: 'character in', 'appears in' or 'speaks to'")


def nearest_facts(encoder, sentences: Sequence[str], vectors: torch.Tensor, question: str, k: int) -> list[str]:
    """Embedding search: the ``k`` of ``sentences`` (embedded as ``vectors`` by :func:`cyclelab.lab.embedding.sentence_embeddings`)
    whose vectors are closest in cosine to ``question``'s, closest first."""
    if vectors.dim() != 2 or vectors.shape[0] != len(sentences):
        raise ValueError(f"need one vector per sentence: {len(sentences)} sentences, vectors {tuple(vectors.shape)}")
    if not is_int(k) or not 1 <= k <= len(sentences):
        raise ValueError(f"k must be an integer from 1 to {len(sentences)}, got {k!r}")
    scores = vectors @ sentence_embeddings(encoder, [question])[0]
    return [sentences[i] for i in torch.topk(scores, k).indices.tolist()]


def facts_prompt(facts: Sequence[str], question: str) -> str:
    """``question`` after one line per fact sentence; the question alone when there are none."""
    return "".join(fact + "\n" for fact in facts) + question


def question_for(character: str) -> str:
    """The question asked for ``character``; it ends where the play's title goes."""
    return f"Q: In which Shakespeare play does {character.title()} appear?\nA: In"


__all__ = [
    "GENERIC",
    "TITLES",
    "Edge",
    "character_graph",
    "fact_sentence",
    "facts_about",
    "facts_prompt",
    "is_character",
    "lookup",
    "nearest_facts",
    "play_edges",
    "question_for",
]
