"""Lesson mode: record, save/load, replay to each pause, score answers, reject lessons for another model."""

import copy
import json
import math
import re

import pytest
import torch

from cyclelab.core.engine import Engine
from cyclelab.core.events import show_token
from cyclelab.debugger.session import Debugger
from cyclelab.workshop.lesson_run import LessonRun
from cyclelab.workshop.lessons import LESSONS, Intervention, Lesson, Pause, record

PROMPT, N = "ROMEO:", 8


@pytest.fixture(scope="module")
def lesson(tiny_engine):
    """A small lesson on tiny with one pause of each kind and no interventions."""
    return record(
        tiny_engine,
        PROMPT,
        N,
        title="test",
        pauses=[
            Pause(0, "number", "How many tokens is 'ROMEO:'?", "n_inputs"),
            Pause(2, "predict", "Next token?"),
            Pause(4, "discuss", "Why?"),
        ],
    )


@pytest.fixture(scope="module")
def steered(tiny_engine):
    """A lesson with a head ablated from cycle 3 and a token forced at cycle 5."""
    return record(
        tiny_engine,
        PROMPT,
        N,
        pauses=[Pause(3, "predict", "?"), Pause(6, "predict", "?")],
        interventions=[Intervention(3, "ablate_head", layer=0, head=1), Intervention(5, "choose", token=" the")],
    )


def reference_probs(tiny, ids: list[int]) -> torch.Tensor:
    """softmax of transformers' logits for the last position of ``ids``: the independent reference."""
    with torch.no_grad():
        logits = tiny.model(torch.tensor([ids])).logits[0, -1].double()
    return torch.softmax(logits, -1)


def test_save_load_round_trip(lesson, tmp_path):
    path = lesson.save(tmp_path / "l.json")
    back = Lesson.load(path)
    assert back == lesson
    assert back.to_dict() == json.loads(path.read_text(encoding="utf-8"))
    assert back.pauses[1].answer["token_id"] == lesson.tokens[2]  # greedy: the key is the token the run wrote


def test_predict_scores_against_transformers(lesson, tiny, tiny_engine):
    run = lesson.open(tiny_engine)
    run.next_pause()
    run.answer(2)
    assert run.next_pause().kind == "predict"
    ids = tiny.tokenizer(PROMPT)["input_ids"] + lesson.tokens[:2]
    probs = reference_probs(tiny, ids)
    order = torch.argsort(probs, descending=True).tolist()
    guess = order[4]  # the model's fifth choice, guessed by its text
    result = run.answer(tiny.tokenizer.decode([guess]))
    p = float(probs[guess])
    assert result.probability == pytest.approx(p, abs=1e-6)
    assert result.rank == 5
    assert result.surprise_bits == pytest.approx(-math.log(p) / math.log(2), abs=1e-5)
    assert result.correct is False and "#5" in result.feedback
    assert result.expected == tiny.tokenizer.decode([order[0]])


def test_top_token_guess_is_correct(lesson, tiny, tiny_engine):
    run = lesson.open(tiny_engine)
    run.next_pause(), run.next_pause()
    top = int(reference_probs(tiny, tiny.tokenizer(PROMPT)["input_ids"] + lesson.tokens[:2]).argmax())
    result = run.answer(top)  # by id this time
    assert result.correct is True and result.rank == 1 and result.feedback.startswith("Spot on")


def test_a_guess_without_its_leading_space_gets_a_hint(steered, tiny, tiny_engine):
    run = steered.open(tiny_engine)
    run.next_pause()  # cycle 3, head 0.1 off: the model's first choice is ' go' (see the lesson's answer key)
    assert tiny.tokenizer.decode([steered.tokens[3]]) == " go" and len(tiny.tokenizer.encode("go")) == 1
    result = run.answer("go")
    assert result.rank > 1 and result.feedback.endswith("With a leading space, '␣go' is #1.")


def test_number_pause_checked_from_the_trace(lesson, tiny, tiny_engine):
    run = lesson.open(tiny_engine)
    run.next_pause()
    n = len(tiny.tokenizer(PROMPT)["input_ids"])  # 'ROMEO:' by hand: the prefill feeds every prompt token
    assert run.answer(n).correct is True
    wrong = run.answer(n + 1)
    assert wrong.correct is False and f"the answer is {n}" in wrong.feedback


def test_replay_stops_at_each_pause_with_the_recorded_tokens(steered, tiny_engine):
    run = steered.open(tiny_engine)
    for pause in steered.pauses:
        assert run.next_pause() == pause
        assert run.debugger.cycle == pause.cycle
        assert run.debugger.token_ids == steered.tokens[: pause.cycle]
    assert run.next_pause() is None and run.finished
    assert run.debugger.token_ids == steered.tokens


def test_interventions_replay_as_by_hand(steered, tiny_engine, tiny):
    by_hand = Debugger(tiny_engine, PROMPT, N)
    by_hand.run_to(3)
    by_hand.ablate_head(0, 1)
    by_hand.run_to(6)
    the = tiny.tokenizer.encode(" the")
    assert len(the) == 1
    by_hand.choose(token_id=the[0])
    by_hand.run_to(N)
    plain = Debugger(tiny_engine, PROMPT, N)
    plain.run_to(N)
    assert by_hand.token_ids == steered.tokens != plain.token_ids  # the interventions change the run
    run = steered.open(tiny_engine)
    run.play([], out=lambda line: None)
    assert run.debugger.token_ids == by_hand.token_ids
    assert run.debugger.ablation.heads == {(0, 1)}


def test_text_mode_prints_each_question_and_feedback(lesson, tiny_engine):
    lines = []
    results = lesson.open(tiny_engine).play([2, lesson.pauses[1].answer["token"], "ok"], out=lines.append)
    text = "\n".join(lines)
    assert [r.correct for r in results] == [True, True, None]
    for pause in lesson.pauses:
        assert f"Q: {pause.question}" in text
    assert "-> Right: 2." in text and "finished" in lines[-1]


def test_widget_panel_scores_what_is_typed(lesson, tiny_engine):
    pytest.importorskip("ipywidgets")
    run = lesson.open(tiny_engine)
    box = run.widget()
    panel = run._panel
    assert run.debugger.widget() in box.children  # the debugger widget is composed, not changed
    panel.controls["Next pause"].click()
    assert "How many tokens" in panel.views["question"].value
    panel.controls["answer"].value = "three"
    panel.controls["Submit"].click()
    assert "type a number, got &#x27;three&#x27;" in panel.views["feedback"].value and 0 not in run.results
    panel.controls["answer"].value = "3"
    panel.controls["Submit"].click()
    assert panel.views["feedback"].value == run.results[0].feedback == "Not quite: the answer is 2 (you said 3)."
    assert panel.controls["Submit"].disabled
    panel.controls["Next pause"].click()
    panel.controls["answer"].value = "ROMEO:"  # two tokens: the error is shown, not raised
    panel.controls["Submit"].click()
    assert "is 2 tokens for" in panel.views["feedback"].value and 1 not in run.results


def test_changed_weights_are_refused(lesson, tiny):
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        next(changed.model.parameters()).mul_(1.01)  # as if the weights file had been retrained
    engine = Engine(changed)
    with pytest.raises(
        ValueError,
        match=rf"recorded on 'tiny' with weights sha256 {lesson.weights_sha256[:12]}…, "
        rf"but this 'tiny' has weights sha256 {engine.fingerprint['weights'][:12]}…"
        r".*record the lesson again",
    ):
        lesson.open(engine)


@pytest.mark.parametrize("path", sorted(LESSONS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_lesson_replays_to_each_pause(path, tiny_engine):
    lesson = Lesson.load(path.stem)  # by name
    run = lesson.open(tiny_engine)
    while (pause := run.next_pause()) is not None:
        assert run.debugger.cycle == pause.cycle
        if pause.kind == "predict":
            assert run.answer(pause.answer["token_id"]).rank == 1
        elif pause.kind == "number":
            assert run.answer(pause.answer).correct is True
    assert run.debugger.token_ids == lesson.tokens


def giveaways(pause: Pause) -> list[str]:
    """How a feedback line would spell ``pause``'s answer."""
    if pause.kind == "predict":
        return [repr(show_token(pause.answer["token"]))]
    if pause.kind == "number" and pause.quantity == "chosen_percent":
        p = pause.answer / 100
        return [f"{pause.answer:g}", f"{p:.3f}", f"{p:.3g}", f"{-math.log2(p):.1f} bits"]
    return []


@pytest.mark.parametrize("path", sorted(LESSONS.glob("*.json")), ids=lambda p: p.stem)
def test_feedback_does_not_answer_the_next_pause(path, tiny_engine):
    """writeback asks for the first token, then how sure the model was of it: the first answer's
    feedback, right or wrong, must not print that probability (nor its surprise in bits)."""
    lesson = Lesson.load(path.stem)
    run = lesson.open(tiny_engine)
    while (pause := run.next_pause()) is not None:
        ahead = lesson.pauses[run.index + 1] if run.index + 1 < len(lesson.pauses) else None
        if pause.kind == "predict":
            right = pause.answer["token_id"]
            answers = [1 if right == 0 else 0, right]
        else:
            answers = [pause.answer if pause.kind == "number" else "no idea"]
        for given in answers:
            feedback = run.answer(given).feedback
            leaked = [s for s in giveaways(ahead) if s in feedback] if ahead else []
            assert not leaked, f"pause {run.index}'s feedback {feedback!r} answers the next pause"
    if path.stem == "writeback":
        assert lesson.pauses[1].quantity == "chosen_percent" and lesson.pauses[1].cycle == lesson.pauses[0].cycle


def test_one_shipped_lesson_per_stage():
    stages = sorted(Lesson.load(p).stage for p in LESSONS.glob("*.json"))
    assert stages == sorted(["FETCH", "READ", "EXECUTE", "WRITEBACK"])


# ------------------------------------------------------------------ bad input


def edited(change):
    """A case that saves the test lesson with ``change`` applied to its JSON data, then loads it."""

    def case(lesson, engine, tmp_path):
        data = lesson.to_dict()
        change(data)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        return Lesson.load(path)

    return case


def raw_file(text):
    def case(lesson, engine, tmp_path):
        (tmp_path / "bad.json").write_text(text, encoding="utf-8")
        return Lesson.load(tmp_path / "bad.json")

    return case


def opened(change, pauses=0):
    """A case that opens the lesson (with ``change`` applied to its data) on tiny and goes to pause ``pauses``."""

    def case(lesson, engine, tmp_path):
        data = lesson.to_dict()
        change(data)
        run = Lesson.from_dict(data).open(engine)
        for _ in range(pauses):
            run.next_pause()

    return case


def answering(*answers):
    """A case that answers the first pauses with ``answers`` (the last one is the bad one)."""

    def case(lesson, engine, tmp_path):
        run = lesson.open(engine)
        for value in answers:
            run.next_pause()
            run.answer(value)

    return case


BAD = [
    (
        "wrong-model",
        opened(lambda d: d.update(model="smollm2")),
        ValueError,
        r"recorded on model 'smollm2', not 'tiny': open it with Lesson\.open\('smollm2'\)",
    ),
    (
        "changed-weights-hash",
        opened(lambda d: d.update(weights_sha256="0" * 64)),
        ValueError,
        r"weights sha256 000000000000…, but this 'tiny' has weights sha256 [0-9a-f]{12}….*Restore the original model",
    ),
    (
        "unknown-version",
        edited(lambda d: d.update(version=2)),
        ValueError,
        r"bad\.json is not a valid lesson file: unknown lesson version 2; this cyclelab reads version 1",
    ),
    ("no-version", edited(lambda d: d.pop("version")), ValueError, r"bad\.json .* has no 'version' field"),
    ("corrupt-json", raw_file('{"version": 1, "model": "ti'), ValueError, r"bad\.json is not a lesson file: not JSON"),
    ("not-an-object", raw_file("[1, 2]"), ValueError, r"must be a JSON object, got list"),
    ("missing-field", edited(lambda d: d.pop("prompt")), ValueError, r"the lesson lacks the field\(s\) \['prompt'\]"),
    ("unknown-field", edited(lambda d: d.update(colour="red")), ValueError, r"unknown field\(s\) \['colour'\]"),
    (
        "pause-missing-question",
        edited(lambda d: d["pauses"][0].pop("question")),
        ValueError,
        r"pauses\[0\] lacks the field\(s\) \['question'\]",
    ),
    (
        "pause-beyond-max-new-tokens",
        edited(lambda d: d["pauses"][2].update(cycle=N)),
        ValueError,
        rf"pauses\[2\]\.cycle must be an integer from 0 to {N - 1}, got {N}",
    ),
    (
        "pause-cycle-a-string",
        edited(lambda d: d["pauses"][0].update(cycle="0")),
        ValueError,
        r"pauses\[0\]\.cycle must be an integer from 0 to 7, got '0'",
    ),
    (
        "pauses-out-of-order",
        edited(lambda d: d["pauses"][0].update(cycle=5)),
        ValueError,
        r"pauses\[1\]\.cycle must be in order",
    ),
    (
        "unknown-pause-kind",
        edited(lambda d: d["pauses"][2].update(kind="essay")),
        ValueError,
        r"pauses\[2\]\.kind must be one of \('predict', 'number', 'discuss'\)",
    ),
    (
        "unknown-quantity",
        edited(lambda d: d["pauses"][0].update(quantity="speed")),
        ValueError,
        r"pauses\[0\]\.quantity must be one of \['cache_len', 'chosen_percent', 'n_inputs'\]",
    ),
    (
        "max-new-tokens-a-string",
        edited(lambda d: d.update(max_new_tokens="8")),
        ValueError,
        r"max_new_tokens must be an integer from 1 to 10000, got '8'",
    ),
    (
        "bad-weights-hash",
        edited(lambda d: d.update(weights_sha256="abc")),
        ValueError,
        r"weights_sha256 must be a sha256 digest \(64 hex digits\), got 'abc'",
    ),
    (
        "bad-sampling",
        edited(lambda d: d.update(sampling={"temprature": 0.5})),
        ValueError,
        r"sampling: unknown sampling setting\(s\) \['temprature'\]",
    ),
    (
        "intervention-without-head",
        edited(lambda d: d["interventions"].append({"cycle": 1, "kind": "ablate_head", "layer": 0})),
        ValueError,
        r"interventions\[0\]\.head must be given for a ablate_head intervention",
    ),
    (
        "record-pause-beyond-max-new-tokens",
        lambda lesson, engine, tmp_path: record(engine, PROMPT, 4, pauses=[Pause(4, "predict", "?")]),
        ValueError,
        r"pauses\[0\]\.cycle must be an integer from 0 to 3, got 4",
    ),
    (
        "no-such-file",
        lambda lesson, engine, tmp_path: Lesson.load(tmp_path / "none.json"),
        FileNotFoundError,
        r"no lesson file at .*none\.json.*the course's lessons are \['execute', 'fetch', 'read', 'writeback'\]",
    ),
    (
        "replay-leaves-the-recording",
        opened(lambda d: d["tokens"].__setitem__(1, 5), pauses=2),
        ValueError,
        r"the replay left the lesson's recorded run at token #1",
    ),
    (
        "answer-before-next-pause",
        lambda lesson, engine, tmp_path: lesson.open(engine).answer(2),
        ValueError,
        r"no question to answer: call next_pause\(\) first",
    ),
    ("number-answer-a-string", answering("two"), TypeError, r"this number question takes a number, got 'two' \(str\)"),
    ("number-answer-a-bool", answering(True), TypeError, r"takes a number, got True \(bool\)"),
    (
        "predict-answer-a-float",
        answering(2, 3.5),
        TypeError,
        r"this predict question takes a token's text \(str\) or id \(int\), got 3\.5 \(float\)",
    ),
    (
        "predict-answer-two-tokens",
        answering(2, "ROMEO:"),
        ValueError,
        r"'ROMEO:' is 2 tokens for 'tiny' \('ROMEO', ':'\): guess one token",
    ),
    (
        "predict-answer-id-outside-vocab",
        answering(2, 4096),
        ValueError,
        r"token id 4096 is not in 'tiny''s vocabulary \(0\.\.4095\)",
    ),
]


@pytest.mark.parametrize("case, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_refused_clearly(case, error, message, lesson, tiny_engine, tmp_path):
    with pytest.raises(error, match=message):
        case(lesson, tiny_engine, tmp_path)


def test_run_is_a_lesson_run(lesson, tiny_engine):
    run = lesson.open(tiny_engine)
    assert isinstance(run, LessonRun) and run.pause is None and "3 pauses ahead" in str(run)


@pytest.mark.parametrize(
    "index, field, value, what",
    [
        (0, "layer", 99, "layers"),
        (0, "head", 64, "heads per layer"),
        (1, "token_id", 4096, "token ids"),
    ],
    ids=["layer-outside-the-model", "head-outside-the-model", "token-outside-the-vocabulary"],
)
def test_an_intervention_the_model_cannot_do_is_named_when_opened(
    steered, tiny_engine, tmp_path, index, field, value, what
):
    data = steered.to_dict()
    data["interventions"][index][field] = value
    path = tmp_path / "steered.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    lesson = Lesson.load(path)  # the file's shape is fine: only the model can tell
    size = {"layers": tiny_engine.arch.n_layers, "heads per layer": tiny_engine.arch.n_heads, "token ids": 4096}[what]
    kind = data["interventions"][index]["kind"]
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(path))}: interventions\[{index}\]\.{field} is {value}, but 'tiny' has {size} {what} "
        rf"\(0 to {size - 1}\), so this {kind} intervention is outside .*: fix interventions\[{index}\] in the lesson "
        rf"file, or record the lesson again",
    ):
        lesson.open(tiny_engine)
