"""A lesson played: :class:`LessonRun` replays the recorded run in a :class:`~cyclelab.debugger.session.Debugger`
to each pause, scores the learner's :class:`Answer` (a predicted token against the model's distribution, a number
against the cycle's record) and shows it in :class:`LessonPanel` over the debugger's widget."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cyclelab.core.events import CycleRecord, show_token
from cyclelab.core.sampling import as_sampling
from cyclelab.debugger.session import Debugger

if TYPE_CHECKING:
    from cyclelab.workshop.lessons import Intervention, Lesson, Pause

QUANTITIES: dict[str, tuple[str, Callable[[CycleRecord], float]]] = {
    "n_inputs": ("tokens FETCH feeds the model in this cycle", lambda r: r.n_inputs),
    "cache_len": ("keys (and values) each attention head reads in this cycle", lambda r: r.cache_len),
    "chosen_percent": ("probability of the chosen token, in percent", lambda r: round(100 * r.raw_prob, 1)),
}


@dataclass(frozen=True)
class Answer:
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
        self.results: dict[int, Answer] = {}
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

    def answer(self, value: str | int | float) -> Answer:
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
            result = Answer(None, "Noted.")
        else:
            result = Answer(None, f"Noted. The model wrote {_said(record.token)} here.")
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

    def _score_predict(self, token_id: int, logits: torch.Tensor, guess: str | int, hide_top_p: bool = False) -> Answer:
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
        return Answer(rank == 1, line + self._space_hint(guess, logits, rank), p, rank, bits, text(top))

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

    def play(self, answers: Sequence[str | int | float | None], out: Callable[[str], None] = print) -> list[Answer]:
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


def _score_number(value: float, truth: float, tolerance: float) -> Answer:
    ok = abs(value - truth) <= tolerance
    truth_text = f"{truth:g}"
    line = f"Right: {truth_text}." if ok else f"Not quite: the answer is {truth_text} (you said {value:g})."
    return Answer(ok, line, expected=truth)


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
