"""The JSON Schemas of trace and lesson files: a valid file passes, each kind of damage is named plainly."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from cyclelab.core.events import Trace
from cyclelab.loading.schema import is_int, is_number, json_path, problem, validator
from cyclelab.workshop import lessons
from cyclelab.workshop.lessons import Lesson

ROOT = Path(__file__).resolve().parent.parent
RECORD = dict(
    cycle=0, token_id=7, token="a", prob=0.5, raw_prob=0.4, entropy=1.0, top=[[7, "a", 0.5]], greedy_id=7,
    draw=None, forced=False, n_inputs=2, cache_len=2, seconds=0.01, flops=10, bytes=20,
)  # fmt: skip
TRACE = {"model": "tiny", "prompt_ids": [5, 6], "settings": {"use_cache": True}, "text": "a", "records": [RECORD]}


def test_int_and_number_helpers_refuse_bools_and_non_finite_numbers() -> None:
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False)
    assert not is_number(math.nan) and not is_number(math.inf) and not is_number("1")
    assert json_path(["records", 3, "token_id"]) == "records[3].token_id" and json_path([]) == ""


def test_a_valid_trace_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TRACE))
    trace = Trace.load(path)
    assert trace.token_ids == [7] and trace.records[0].top == [(7, "a", 0.5)]
    assert problem(validator("cyclelab.core", "trace.schema.json"), TRACE) is None


def _record(**change) -> dict:
    return {**TRACE, "records": [RECORD, {**RECORD, "cycle": 1, **change}]}


@pytest.mark.parametrize(
    "doc, message",
    [
        (_record(token_id="7"), "records[1].token_id must be an integer >= 0, got '7'"),
        (_record(token_id=True), "records[1].token_id must be an integer >= 0, got True"),
        (_record(token_id=7.0), "records[1].token_id must be an integer >= 0, got 7.0"),
        (_record(prob=math.nan), "records[1].prob must be a probability (a number from 0 to 1), got nan"),
        (_record(forced=0), "records[1].forced must be true or false, got 0"),
        (_record(top=[[7, "a"]]), "records[1].top[0] must be [token id, token text, probability], got [7, 'a']"),
        ({k: v for k, v in TRACE.items() if k != "text"}, "the file lacks the field(s) ['text']"),
        ({**TRACE, "extra": 1}, "the file has unknown field(s) ['extra']"),
        ({**TRACE, "settings": {"ablation": {"heads": [[0, 1]]}}}, "settings.ablation lacks the field(s) ['mlps']"),
        ([], "the file must be an object ({...}), got []"),
    ],
    ids=["wrong-type", "bool-for-int", "float-for-int", "nan", "int-for-bool", "short-candidate", "missing",
         "unknown", "nested-missing", "not-an-object"],
)  # fmt: skip
def test_trace_schema_names_the_field(doc, message: str) -> None:
    assert problem(validator("cyclelab.core", "trace.schema.json"), doc) == message


def test_trace_rules_beyond_the_schema_stay(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_record(token="b")))
    with pytest.raises(ValueError, match=r"records\[1\]\.token must be the text of token 7, 'a'"):
        Trace.load(path)


LESSON = json.loads((ROOT / "data" / "lessons" / "read.json").read_text())


def test_a_valid_lesson_file_passes_and_its_enums_are_the_codes() -> None:
    assert Lesson.from_dict(copy.deepcopy(LESSON)).prompt == LESSON["prompt"]
    schema = validator("cyclelab.workshop", "lesson.schema.json").schema
    pause, intervention = schema["$defs"]["pause"]["properties"], schema["$defs"]["intervention"]["properties"]
    assert tuple(pause["kind"]["enum"]) == lessons.KINDS
    assert pause["quantity"]["enum"] == sorted(lessons.QUANTITIES)
    assert intervention["kind"]["enum"] == sorted(lessons.INTERVENTIONS)
    assert tuple(schema["properties"]["stage"]["enum"]) == lessons.STAGES
    assert schema["properties"]["version"]["const"] == lessons.VERSION


def _lesson(change) -> dict:
    doc = copy.deepcopy(LESSON)
    change(doc)
    return doc


@pytest.mark.parametrize(
    "doc, message",
    [
        (_lesson(lambda d: d.update(max_new_tokens=True)), "max_new_tokens must be an integer from 1 to 10000, got True"),
        (_lesson(lambda d: d.update(prompt=" ")), "prompt must be a non-empty string, got ' '"),
        (_lesson(lambda d: d["pauses"][0].update(tolerance=math.nan)), "pauses[0].tolerance must be a number >= 0, got nan"),
        (_lesson(lambda d: d["pauses"][1].update(cycle=1.0)), "pauses[1].cycle must be an integer from 0 to 7, got 1.0"),
        (_lesson(lambda d: d["pauses"][2].pop("kind")), "pauses[2] lacks the field(s) ['kind']"),
        (_lesson(lambda d: d.update(colour=1)), "the lesson has unknown field(s) ['colour']"),
        (_lesson(lambda d: d.update(tokens=[1, True])), "tokens must be a list of token ids, got [1, True]"),
    ],
    ids=["bool-for-int", "blank-text", "nan", "float-for-int", "missing", "unknown", "bool-token"],
)  # fmt: skip
def test_lesson_schema_names_the_field(doc: dict, message: str) -> None:
    assert problem(validator("cyclelab.workshop", "lesson.schema.json"), doc, "the lesson", last_cycle=7) == message
    with pytest.raises(ValueError, match=re.escape(f"bad.json is not a valid lesson file: {message}; ")):
        Lesson.from_dict(doc, "bad.json")


def test_nbgrader_metadata_refuses_a_nan_or_bool_points() -> None:
    from cyclelab.workshop.edition import _nbgrader, _schema_problem

    meta = _nbgrader("check_f", grade=True, solution=False, points=1)
    assert _schema_problem(meta, "code") is None
    for bad in (math.nan, True):
        assert _schema_problem({**meta, "points": bad}, "code") == "missing [], unknown [], wrong type ['points']"
