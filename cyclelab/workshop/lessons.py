"""Lessons: a recorded debugger run with scripted pauses, each asking the learner a question.

An instructor records a lesson (a model, a prompt, sampling settings, interventions and pauses)
with :func:`record`, and saves it as one versioned JSON file; a learner opens it on the same model:

>>> lesson = record("tiny", "ROMEO:", 8, pauses=[Pause(0, "number", "How many tokens is 'ROMEO:'?", "n_inputs"),
...                                              Pause(3, "predict", "Which token comes next?")])
>>> lesson.save("romeo.json")
>>> run = Lesson.load("romeo.json").open("tiny")  # a LessonRun over a Debugger
>>> run.next_pause(); run.answer(2)               # replay to the first pause; score an answer
>>> run.widget()                                  # or: the question panel over the debugger widget

Kinds of pause (each *before* the token of its cycle is chosen; answering runs that cycle):

* ``predict`` -- guess the next token (its text or id); scored against the model's distribution:
  probability, rank and surprise (-log2 p bits), read from the logits the replay captured;
* ``number`` -- a number read from the cycle's record in the trace (:data:`QUANTITIES`);
* ``discuss`` -- a question for the room; nothing is scored.

A lesson carries its model's name and weights digest (:meth:`Engine.fingerprint`): opening it on
another model or on changed weights raises ``ValueError`` naming both and the fix.
"""

from __future__ import annotations

import copy
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from cyclelab.core.engine import Engine, as_loaded, legacy_weights_digest
from cyclelab.core.events import CycleRecord, show_token
from cyclelab.core.sampling import Sampling, as_sampling
from cyclelab.debugger.session import Debugger
from cyclelab.loading.atomic import strict_json, write_atomic
from cyclelab.loading.paths import LESSONS
from cyclelab.loading.schema import is_int, problem, shown, validator
from cyclelab.workshop.lesson_checks import check_interventions

VERSION = 1
KINDS = ("predict", "number", "discuss")
STAGES = ("", "FETCH", "READ", "EXECUTE", "WRITEBACK")
QUANTITIES: dict[str, tuple[str, Callable[[CycleRecord], float]]] = {
    "n_inputs": ("tokens FETCH feeds the model in this cycle", lambda r: r.n_inputs),
    "cache_len": ("keys (and values) each attention head reads in this cycle", lambda r: r.cache_len),
    "chosen_percent": ("probability of the chosen token, in percent", lambda r: round(100 * r.raw_prob, 1)),
}
INTERVENTIONS = {"choose": ("token_id",), "ablate_head": ("layer", "head"), "sampling": ("settings",)}
FIX_FILE = "record lessons with cyclelab.workshop.lessons.record and Lesson.save"


# ------------------------------------------------------------------ the data


@dataclass(frozen=True)
class Pause:
    """A stop before cycle ``cycle`` (``cycle`` tokens done) with a question; ``answer`` is filled by :func:`record`."""

    cycle: int
    kind: str  # one of KINDS
    question: str
    quantity: str | None = None  # for "number": a key of QUANTITIES
    tolerance: float = 0.0  # for "number": how far an answer may be off and still count
    answer: float | dict | None = (
        None  # the key: a number, or the model's top token {"token_id", "token", "probability"}
    )


@dataclass(frozen=True)
class Intervention:
    """An action at cycle ``cycle``: ``choose`` imposes ``token_id`` there; ``ablate_head`` switches
    head ``layer``.``head`` off from there on; ``sampling`` replaces the sampler by ``settings`` (a dict of
    :class:`Sampling` fields, the others at their defaults) from there on."""

    cycle: int
    kind: str  # one of INTERVENTIONS
    token_id: int | None = None
    token: str = ""  # the forced token's text, for people reading the file
    layer: int | None = None
    head: int | None = None
    settings: dict | None = None

    @property
    def when(self) -> tuple[int, int]:
        """Its place in the run: a cycle's pauses sort as ``(cycle, 1)``; a forced token is imposed after them
        (they ask about the model's own choice), other interventions before them."""
        return self.cycle, 2 if self.kind == "choose" else 0


@dataclass
class Lesson:
    """One lesson: what to run, what to do on the way, where to stop and ask, and the tokens it produced."""

    model: str
    weights_sha256: str
    prompt: str
    max_new_tokens: int
    sampling: dict = field(default_factory=dict)
    interventions: list[Intervention] = field(default_factory=list)
    pauses: list[Pause] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the generated ids as recorded: replays are checked against them
    title: str = ""
    stage: str = ""  # the stage of the cycle it teaches, if one
    version: int = VERSION
    source: str = field(default="", compare=False)  # the file it was loaded from

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict:
        """Plain data for JSON (empty optional fields left out)."""
        out = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("source", "interventions", "pauses")
        }
        out["interventions"] = [{k: v for k, v in asdict(i).items() if v not in (None, "")} for i in self.interventions]
        out["pauses"] = [
            {k: v for k, v in asdict(p).items() if v is not None and (k != "tolerance" or p.kind == "number")}
            for p in self.pauses
        ]
        return copy.deepcopy({"version": out.pop("version"), **out})

    def save(self, path: str | Path) -> Path:
        """Write the lesson as standard JSON (never pickle), atomically: a failed save leaves the old file whole."""
        path = Path(path)
        write_atomic(path, strict_json(self.to_dict(), f"the lesson for {path}", indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Lesson:
        """Read a lesson written by :meth:`save` (or a course lesson by name, e.g. ``"fetch"``); a file that is
        not one raises ``ValueError`` naming the field."""
        path = Path(path)
        if not path.suffix and not path.exists() and (LESSONS / f"{path}.json").is_file():
            path = LESSONS / f"{path}.json"  # a course lesson by name: "fetch", "read", ...
        if not path.is_file():
            raise FileNotFoundError(
                f"no lesson file at {path}: check the path; the course's lessons are "
                f"{sorted(p.stem for p in LESSONS.glob('*.json'))}"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ValueError(
                f"{path} is not a lesson file: not JSON ({err}); it may be truncated: {FIX_FILE}"
            ) from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw, source: str = "lesson") -> Lesson:
        """A lesson from parsed JSON, every field checked (``ValueError`` naming ``source`` and the field)."""
        where = f"{source} is not a valid lesson file"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: it must be a JSON object, got {type(raw).__name__}; {FIX_FILE}")
        if "version" not in raw:
            raise ValueError(f"{where}: it has no 'version' field; {FIX_FILE}")
        if raw["version"] != VERSION:
            raise ValueError(
                f"{where}: unknown lesson version {raw['version']!r}; this cyclelab reads version "
                f"{VERSION}: update cyclelab, or record the lesson again"
            )
        try:
            _check(raw)
            return cls(
                **{
                    **raw,
                    "source": source,
                    "interventions": [Intervention(**item) for item in raw.get("interventions", [])],
                    "pauses": [Pause(**item) for item in raw.get("pauses", [])],
                }
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}; {FIX_FILE}") from None

    def open(self, engine: Engine | str, *, top: int = 5) -> LessonRun:
        """Check that ``engine`` (or the model of this name) is the lesson's model, and start a :class:`LessonRun`."""
        engine = engine if isinstance(engine, Engine) else Engine(as_loaded(engine, "Lesson.open"))
        name, found = engine.loaded.name, engine.fingerprint["weights"]
        what = f"lesson {self.title or self.source!r}" if self.title or self.source else "this lesson"
        if name != self.model:
            raise ValueError(
                f"{what} was recorded on model {self.model!r}, not {name!r}: open it with Lesson.open({self.model!r})"
            )
        if found != self.weights_sha256 and legacy_weights_digest(engine.loaded.model) != self.weights_sha256:
            raise ValueError(
                f"{what} was recorded on {self.model!r} with weights sha256 {self.weights_sha256[:12]}…, "
                f"but this {name!r} has weights sha256 {found[:12]}…: the weights changed since (retrained "
                f"or replaced). Restore the original model (cyclelab fetch; git checkout data/{name} for "
                "tiny) or record the lesson again (scripts/record_lessons.py)"
            )
        check_interventions(self, engine)
        return LessonRun(self, Debugger(engine, self.prompt, self.max_new_tokens, self.sampling, top=top))


# ------------------------------------------------------------------ validation


def _check(raw: dict) -> None:
    """ValueError naming the first field of a lesson's JSON that breaks ``lesson.schema.json``."""
    n = raw.get("max_new_tokens") if isinstance(raw, dict) else None
    last = n - 1 if is_int(n) else "max_new_tokens - 1"
    found = problem(validator("cyclelab.workshop", "lesson.schema.json"), raw, "the lesson", last_cycle=last)
    if found:
        raise ValueError(found)


def _fail(name: str, expected: str, value) -> None:
    raise ValueError(f"{name} must be {expected}, got {shown(value)}")


def _validate(lesson: Lesson) -> None:
    """ValueError naming the first field that is wrong: the schema's checks, then the rules across fields."""
    for name, items, cls in (("pauses", lesson.pauses, Pause), ("interventions", lesson.interventions, Intervention)):
        if not isinstance(items, list):
            _fail(name, "a list", items)
        for i, item in enumerate(items):
            if not isinstance(item, cls):
                _fail(f"{name}[{i}]", f"a {cls.__name__}", item)
    _check(lesson.to_dict())
    n = lesson.max_new_tokens
    _sampling(lesson.sampling, "sampling")
    if len(lesson.tokens) > n:
        _fail("tokens", f"a list of at most {n} token ids", lesson.tokens)
    for i, p in enumerate(lesson.pauses):
        _pause(p, f"pauses[{i}]", n)
        if i and p.cycle < lesson.pauses[i - 1].cycle:
            _fail(
                f"pauses[{i}].cycle",
                f"in order: >= the cycle of the pause before ({lesson.pauses[i - 1].cycle})",
                p.cycle,
            )
    for i, iv in enumerate(lesson.interventions):
        _intervention(iv, f"interventions[{i}]", n)


def _sampling(settings, name: str) -> Sampling:
    try:
        return as_sampling(settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {err}") from None


def _pause(p: Pause, name: str, n: int) -> None:
    """What the schema cannot say of a pause: its cycle runs, and a number pause (only) names its quantity."""
    if p.cycle >= n:
        _fail(f"{name}.cycle", f"an integer from 0 to {n - 1}", p.cycle)
    if (p.kind == "number") != (p.quantity is not None):
        _fail(f"{name}.quantity", "given for a number pause (only)", p.quantity)


def _intervention(iv: Intervention, name: str, n: int) -> None:
    """What the schema cannot say of an intervention: its cycle runs, and it has its kind's arguments."""
    if iv.cycle >= n:
        _fail(f"{name}.cycle", f"an integer from 0 to {n - 1}", iv.cycle)
    for arg in INTERVENTIONS[iv.kind]:
        if getattr(iv, arg) is None:
            _fail(f"{name}.{arg}", f"given for a {iv.kind} intervention", None)
    if iv.kind == "sampling":
        _sampling(iv.settings, f"{name}.settings")


# ------------------------------------------------------------------ answers


@dataclass(frozen=True)
class Result:
    """A scored answer. ``correct`` is None for a discussion question."""

    correct: bool | None
    feedback: str  # one line for the learner
    probability: float | None = None  # predict: the guess's probability under the model (softmax of the logits)
    rank: int | None = None  # predict: 1 for the model's most likely token
    surprise_bits: float | None = None  # predict: -log2(probability)
    expected: float | str | None = None  # number: the true value; predict: the model's top token

    def __str__(self) -> str:
        return self.feedback


def score_guess(logits: torch.Tensor, token_id: int) -> tuple[float, int, float]:
    """Probability, rank (1 = most likely) and surprise in bits of ``token_id`` under ``softmax(logits)``."""
    probs = torch.softmax(logits.double(), -1)
    p = float(probs[token_id])
    return p, 1 + int((probs > probs[token_id]).sum()), (-math.log2(p) if p > 0 else math.inf)


def _said(text: str) -> str:
    return repr(show_token(text))


# ------------------------------------------------------------------ the run


class LessonRun:
    """A lesson replayed in a :class:`Debugger`: :meth:`next_pause` runs to each pause, :meth:`answer` scores.

    The replay is checked against the tokens recorded in the lesson (``ValueError`` if it leaves them).
    """

    def __init__(self, lesson: Lesson, debugger: Debugger, *, verify: bool = True):
        self.lesson, self.debugger, self.verify = lesson, debugger, verify
        self.index = -1  # the current pause; -1 before the first, len(pauses) at the end
        self.results: dict[int, Result] = {}
        self._plan = sorted(lesson.interventions, key=lambda iv: iv.when)
        self._applied = 0  # how many of the planned interventions are done

    @property
    def pause(self) -> Pause | None:
        """The pause the run is at (None before the first and after the last)."""
        return self.lesson.pauses[self.index] if 0 <= self.index < len(self.lesson.pauses) else None

    @property
    def finished(self) -> bool:
        """True after the last pause (the run has gone to its last token)."""
        return self.index >= len(self.lesson.pauses)

    def next_pause(self) -> Pause | None:
        """Replay to the next pause, doing the interventions on the way; at the end, run to the last token (None)."""
        self.index = min(self.index + 1, len(self.lesson.pauses))
        pause = self.pause
        when = (pause.cycle, 1) if pause else (math.inf, 0)
        while self._applied < len(self._plan) and self._plan[self._applied].when < when:
            self._apply(self._plan[self._applied])
            self._applied += 1
        self.debugger.run_to(pause.cycle if pause else self.lesson.max_new_tokens, stop_at_breakpoints=False)
        self._check_tokens()
        return pause

    def _apply(self, iv: Intervention) -> None:
        dbg = self.debugger
        if iv.kind == "choose":
            dbg.run_to(iv.cycle + 1, stop_at_breakpoints=False)
            dbg.choose(token_id=iv.token_id)
            return
        dbg.run_to(iv.cycle, stop_at_breakpoints=False)
        if iv.kind == "ablate_head":
            dbg.ablate_head(iv.layer, iv.head)
        else:
            dbg.set_sampling(as_sampling(iv.settings))

    def _check_tokens(self) -> None:
        if not self.verify:
            return
        got, want = self.debugger.token_ids, self.lesson.tokens[: len(self.debugger.token_ids)]
        if got != want:
            i = next(i for i, (a, b) in enumerate(zip(got + [-1], want + [-1])) if a != b)
            text = self.debugger.engine.token_text
            raise ValueError(
                f"the replay left the lesson's recorded run at token #{i}: recorded "
                f"{_said(text(want[i])) if i < len(want) else 'nothing'}, got "
                f"{_said(text(got[i])) if i < len(got) else 'nothing'}. If you changed the run in the "
                "debugger, open the lesson again; otherwise record the lesson again on this machine"
            )

    def answer(self, value: str | int | float) -> Result:
        """Score ``value`` for the current pause and run its cycle (the token is then shown in the debugger).

        ``predict``: a token's text (one token, spaces included) or id; ``number``: a number;
        ``discuss``: any text. Wrong type: ``TypeError``.
        """
        pause = self.pause
        if pause is None:
            raise ValueError(
                "no question to answer: call next_pause() first"
                if self.index < 0
                else "the lesson is over: there are no more pauses"
            )
        check = {"predict": (str, int), "number": (int, float), "discuss": (str,)}[pause.kind]
        if isinstance(value, bool) or not isinstance(value, check):
            expected = {"predict": "a token's text (str) or id (int)", "number": "a number", "discuss": "text"}[
                pause.kind
            ]
            raise TypeError(f"this {pause.kind} question takes {expected}, got {value!r} ({type(value).__name__})")
        token_id = self._token_id(value) if pause.kind == "predict" else None
        record, logits = self._reveal(pause.cycle)
        ahead = self._next_at_same_cycle()
        if pause.kind == "predict":
            hide = ahead is not None and ahead.kind == "number" and ahead.quantity == "chosen_percent"
            result = self._score_predict(token_id, logits, value, hide_top_p=hide)
        elif pause.kind == "number":
            result = _score_number(value, QUANTITIES[pause.quantity][1](record), pause.tolerance)
        elif ahead is not None and ahead.kind == "predict":  # its token is the next question's answer
            result = Result(None, "Noted.")
        else:
            result = Result(None, f"Noted. The model wrote {_said(record.token)} here.")
        self.results[self.index] = result
        return result

    def _next_at_same_cycle(self) -> Pause | None:
        """The next pause when it stops at the current pause's cycle: feedback must not answer it."""
        pauses, here = self.lesson.pauses, self.pause
        following = pauses[self.index + 1] if self.index + 1 < len(pauses) else None
        return following if here and following and following.cycle == here.cycle else None

    def _token_id(self, guess: str | int) -> int:
        engine = self.debugger.engine
        if isinstance(guess, int):
            if not 0 <= guess < engine.vocab_size:
                raise ValueError(
                    f"token id {guess} is not in {engine.loaded.name!r}'s vocabulary (0..{engine.vocab_size - 1})"
                )
            return guess
        ids = engine.tokenizer.encode(guess, add_special_tokens=False) if guess else []
        if len(ids) != 1:
            parts = ", ".join(_said(engine.token_text(i)) for i in ids) or "nothing"
            raise ValueError(
                f"{guess!r} is {len(ids)} tokens for {engine.loaded.name!r} ({parts}): guess one token, "
                "with its leading space if it has one (' be', not 'be')"
            )
        return ids[0]

    def _reveal(self, cycle: int) -> tuple[CycleRecord, torch.Tensor]:
        """Run to the end of ``cycle`` (no recompute if it was run already): its record and its logits."""
        dbg = self.debugger
        dbg.run_to(cycle + 1, stop_at_breakpoints=False)
        if len(dbg.records) <= cycle:
            raise ValueError(
                f"the run ended after {len(dbg.records)} tokens (end of text), before the pause at token "
                f"#{cycle}: move the pause earlier"
            )
        choice = next(e for e in reversed(dbg.history) if e.op == "choose" and e.cycle == cycle)
        return dbg.records[cycle], choice.tensors["logits"]

    def _score_predict(self, token_id: int, logits: torch.Tensor, guess: str | int, hide_top_p: bool = False) -> Result:
        """Score a guess; ``hide_top_p`` leaves out the first choice's probability (and its surprise),
        when the next pause asks for it."""
        text = self.debugger.engine.token_text
        p, rank, bits = score_guess(logits, token_id)
        top = int(logits.argmax())
        if rank == 1:
            how = "" if hide_top_p else f" (p = {p:.3f}, {bits:.1f} bits of surprise)"
            line = f"Spot on: {_said(text(token_id))} is the model's first choice{how}."
        else:
            top_p = "" if hide_top_p else f" (p = {score_guess(logits, top)[0]:.3f})"
            line = (
                f"{_said(text(token_id))} is the model's #{rank} (p = {p:.3g}, {bits:.1f} bits of surprise); "
                f"its first choice was {_said(text(top))}{top_p}."
            )
        return Result(rank == 1, line + self._space_hint(guess, logits, rank), p, rank, bits, text(top))

    def _space_hint(self, guess: str | int, logits: torch.Tensor, rank: int) -> str:
        """A note when the same word with a leading space (a token of its own) ranks better: learners forget it."""
        if not isinstance(guess, str) or guess.startswith(" "):
            return ""
        ids = self.debugger.engine.tokenizer.encode(" " + guess, add_special_tokens=False)
        spaced = score_guess(logits, ids[0])[1] if len(ids) == 1 else rank
        return f" With a leading space, {_said(' ' + guess)} is #{spaced}." if spaced < rank else ""

    # --- text mode and widget --------------------------------------------------------------
    def __str__(self) -> str:
        lesson, dbg, pause = self.lesson, self.debugger, self.pause
        head = f"Lesson: {lesson.title or lesson.source or 'untitled'} ({lesson.model})"
        text = dbg.prompt_text + "".join(dbg.tokens[: pause.cycle] if pause else dbg.tokens)
        if pause is None:
            where = "finished" if self.finished else f"{len(lesson.pauses)} pauses ahead: call next_pause()"
            return f"{head}\n{where}\ntext: {text!r}"
        lines = [
            head,
            f"pause {self.index + 1} of {len(lesson.pauses)}, before token #{pause.cycle} ({pause.kind})",
            f"text so far: {text!r}",
            f"Q: {pause.question}",
        ]
        return "\n".join(lines)

    def play(self, answers: Sequence[str | int | float | None], out: Callable[[str], None] = print) -> list[Result]:
        """Text mode: go through every pause, answering with ``answers`` in order (None: skip), printing as it goes."""
        results = []
        while self.next_pause() is not None:
            out(str(self))
            given = answers[self.index] if self.index < len(answers) else None
            if given is not None:
                results.append(self.answer(given))
                out(f"answer: {given!r}\n-> {results[-1].feedback}")
        out(str(self))
        return results

    def widget(self):
        """The question panel (question, answer box, Submit, feedback, Next pause) above the debugger widget."""
        if not hasattr(self, "_panel"):
            self._panel = LessonPanel(self)
        return self._panel.box


def _score_number(value: float, truth: float, tolerance: float) -> Result:
    ok = abs(value - truth) <= tolerance
    truth_text = f"{truth:g}"
    line = f"Right: {truth_text}." if ok else f"Not quite: the answer is {truth_text} (you said {value:g})."
    return Result(ok, line, expected=truth)


class LessonPanel:
    """ipywidgets: the pause's question, an answer box, Submit, the feedback line and Next pause, over ``dbg.widget()``."""

    def __init__(self, run: LessonRun):
        import ipywidgets as w

        self.run = run
        self.controls = {
            "answer": w.Text(placeholder="your answer"),
            "Submit": w.Button(description="Submit"),
            "Next pause": w.Button(description="Next pause", button_style="primary"),
        }
        self.views = {
            "title": w.HTML(f"<b>Lesson: {html.escape(run.lesson.title or run.lesson.source)}</b>"),
            "question": w.HTML(),
            "feedback": w.HTML(),
        }
        self.controls["Submit"].on_click(lambda _: self.submit())
        self.controls["Next pause"].on_click(lambda _: self.next())
        c, v = self.controls, self.views
        self.box = w.VBox(
            [
                v["title"],
                v["question"],
                w.HBox([c["answer"], c["Submit"]]),
                v["feedback"],
                c["Next pause"],
                run.debugger.widget(),
            ]
        )
        self.redraw()

    def next(self) -> None:
        """Replay to the next pause."""
        self.controls["answer"].value = ""
        self._do(self.run.next_pause)

    def submit(self) -> None:
        """Score the answer box's text (as a number for a number question)."""
        pause, text = self.run.pause, self.controls["answer"].value
        if pause is not None and pause.kind == "number":
            try:
                number = float(text)
            except ValueError:
                return self._show_error(f"type a number, got {text!r}")
            text = int(number) if number.is_integer() else number
        self._do(lambda: self.run.answer(text))

    def _do(self, action: Callable) -> None:
        """Run ``action`` and redraw; a TypeError or ValueError goes to the feedback line (the learner's to fix)."""
        try:
            action()
        except (TypeError, ValueError) as err:
            return self._show_error(str(err))
        self.redraw()

    def _show_error(self, message: str) -> None:
        self.redraw()
        self.views["feedback"].value = f"<span style='color:#b00'>{html.escape(message)}</span>"

    def redraw(self) -> None:
        """Show the current pause's question and, once answered, its feedback."""
        run, pause = self.run, self.run.pause
        self.views["question"].value = (
            f"<b>Pause {run.index + 1} of {len(run.lesson.pauses)}</b> (before token "
            f"#{pause.cycle}): {html.escape(pause.question)}"
            if pause
            else ("The lesson is over." if run.finished else "Press Next pause to start.")
        )
        result = run.results.get(run.index)
        self.views["feedback"].value = html.escape(result.feedback) if result else ""
        self.controls["Submit"].disabled = pause is None or run.index in run.results


# ------------------------------------------------------------------ recording


def record(
    engine: Engine | str,
    prompt: str,
    max_new_tokens: int,
    *,
    pauses: Sequence[Pause | dict],
    interventions: Sequence[Intervention | dict] = (),
    sampling: Sampling | dict | None = None,
    title: str = "",
    stage: str = "",
) -> Lesson:
    """Run the lesson once in a :class:`Debugger` and return it with its recorded tokens and answer key.

    A ``choose`` intervention may name its token by text (``token=" go"``) instead of ``token_id``.
    """
    engine = engine if isinstance(engine, Engine) else Engine(as_loaded(engine, "record"))
    settings = {k: v for k, v in asdict(as_sampling(sampling)).items() if v != getattr(Sampling(), k)}
    draft = Lesson(
        engine.loaded.name,
        engine.fingerprint["weights"],
        prompt,
        max_new_tokens,
        settings,
        [_resolve(engine, iv) for iv in _as(interventions, Intervention)],
        sorted(_as(pauses, Pause), key=lambda p: p.cycle),
        title=title,
        stage=stage,
    )
    run = LessonRun(draft, Debugger(engine, prompt, max_new_tokens, settings), verify=False)
    keyed = []
    while (pause := run.next_pause()) is not None:
        rec, logits = run._reveal(pause.cycle)
        top = int(logits.argmax())
        key = (
            QUANTITIES[pause.quantity][1](rec)
            if pause.kind == "number"
            else {
                "token_id": top,
                "token": engine.token_text(top),
                "probability": round(score_guess(logits, top)[0], 6),
            }
            if pause.kind == "predict"
            else None
        )
        keyed.append(replace(pause, answer=key))
    return replace(draft, pauses=keyed, tokens=run.debugger.token_ids)


def _as(items: Sequence, cls: type) -> list:
    return [cls(**item) if isinstance(item, dict) else item for item in items]


def _resolve(engine: Engine, iv: Intervention) -> Intervention:
    """A choose given by ``token`` text gets its ``token_id`` (one token), and a token text for readers."""
    if not isinstance(iv, Intervention) or iv.kind != "choose":
        return iv
    if iv.token_id is None:
        ids = engine.tokenizer.encode(iv.token, add_special_tokens=False) if iv.token else []
        if len(ids) != 1:
            raise ValueError(
                f"choose: token {iv.token!r} must be exactly one token of {engine.loaded.name!r}, it is {len(ids)}"
            )
        iv = replace(iv, token_id=ids[0])
    return replace(iv, token=engine.token_text(iv.token_id))


__all__ = [
    "Intervention",
    "Lesson",
    "LessonPanel",
    "LessonRun",
    "Pause",
    "QUANTITIES",
    "Result",
    "record",
    "score_guess",
]
