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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from cyclelab.core.engine import Engine, as_loaded, legacy_weights_digest
from cyclelab.core.sampling import Sampling, as_sampling
from cyclelab.debugger.session import Debugger
from cyclelab.loading.atomic import read_text, strict_json, strict_loads, write_atomic
from cyclelab.loading.paths import LESSONS
from cyclelab.loading.schema import is_int, problem, shown, validator
from cyclelab.workshop.lesson_checks import check_interventions
from cyclelab.workshop.lesson_run import QUANTITIES, LessonRun, score_guess

VERSION = 1
KINDS = ("predict", "number", "discuss")
STAGES = ("", "FETCH", "READ", "EXECUTE", "WRITEBACK")
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
            raw = strict_loads(read_text(path, "lesson file"))
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
    "Pause",
    "QUANTITIES",
    "record",
]
