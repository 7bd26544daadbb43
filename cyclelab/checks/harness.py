"""The harness every learner check runs in: the :class:`Result` a notebook displays, the :class:`Failed`
a check raises with its hint, and :func:`checker`, the one place that turns either into a ✗ line.

A check reads top to bottom: it calls the learner's function with :func:`call` (or :func:`tensor_answer`,
:func:`pair`), compares, ``raise Failed(hint)`` on the first symptom, and returns its ✓ message.
"""

from __future__ import annotations

import functools
import inspect
import sysconfig
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Result:
    """Outcome of a check: whether it passed and what to tell the learner."""

    passed: bool
    message: str

    def __str__(self) -> str:
        return f"{'✓' if self.passed else '✗'} {self.message}"

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython display
        printer.text(str(self))

    def __bool__(self) -> bool:
        return self.passed


class Failed(Exception):
    """A check's verdict that the learner's answer is wrong; ``message`` is the hint they see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def checker(check: Callable[..., str]) -> Callable[..., Result]:
    """Make ``check(fn, ...) -> ✓ message`` a learner check that never raises: its message becomes a ✓
    :class:`Result`; a :class:`Failed` it raises (the learner's own exceptions arrive as one, through
    :func:`call`), a non-callable answer, or anything the check's reading of the answer trips on, a ✗ one."""

    @functools.wraps(check)
    def run(fn, *args, **kwargs) -> Result:
        if not callable(fn):
            return Result(
                False, f"pass your function itself, e.g. {check.__name__}(my_function), not a {type(fn).__name__}"
            )
        try:
            return Result(True, check(fn, *args, **kwargs))
        except Failed as failed:
            return Result(False, failed.message)
        except Exception as err:  # the answer's shape or type tripped the comparison
            return Result(
                False,
                f"your answer could not be compared ({type(err).__name__}: {err}): return what "
                "the exercise asks, with the shape and type of its example",
            )

    return run


# --- the learner's exceptions: where, what, and a likely cause ----------------------------------------

# Exception texts a learner's bug typically raises, and what to do about each.
_CAUSES = [
    (
        ("did not match", "expected scalar type", "expected m1 and m2 to have the same dtype", "dtype"),
        "two tensors of different dtypes met (float32 and float64?): convert one with .to(other.dtype)",
    ),
    (("cannot be multiplied",), "the matrix shapes do not fit (a, b) @ (b, c): print the .shape of each side"),
    (
        ("must match the size of tensor", "size of tensor a"),
        "two shapes do not broadcast: print the .shape of each tensor on that line",
    ),
    (("view size is not compatible",), "the tensor is not contiguous: use .reshape(...) instead of .view(...)"),
    (("out of bounds", "out of range"), "an index runs past the end of an axis: check which axis you index"),
    (("only one element tensors",), "a whole tensor was used where one number belongs: pick the element first"),
    (("'NoneType'",), "a value is None: does every function on the way return its result?"),
]


def _likely_cause(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    return next((cause for keys, cause in _CAUSES if any(k in text for k in keys)), "")


def _is_library(filename: str) -> bool:
    """True for frames of Python itself, installed packages and cyclelab: not the learner's code."""
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")} | {str(Path(__file__).parents[1])}
    return any(filename.startswith(root) for root in roots)


def _learner_line(err: Exception) -> str:
    """`` (line N: `code`)`` of the deepest frame of the learner's own code in ``err``'s traceback (or the line
    the learner's process found, when the exception was raised there)."""
    if isinstance(getattr(err, "learner_line", None), str):
        return err.learner_line
    mine = [f for f in traceback.extract_tb(err.__traceback__) if not _is_library(f.filename)]
    if not mine:
        return ""
    code = (mine[-1].line or "").strip()
    return f" (line {mine[-1].lineno}: `{code}`)" if code else f" (line {mine[-1].lineno})"


def raised(err: Exception, case: str = "", hint: str = "") -> Failed:
    """The :class:`Failed` for an exception from the learner's function: where, what, and a likely cause."""
    where = f"{case}: " if case else ""
    cause = hint or _likely_cause(err)
    return Failed(
        f"{where}your function raised {type(err).__name__}: {err}{_learner_line(err)}"
        + (f" — {cause}" if cause else "")
    )


# --- calling the learner's function -------------------------------------------------------------------


def _snapshot(value):
    """A copy of an argument to compare after the call, or None for what is not checked."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)
    if isinstance(value, torch.nn.Module):
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    return None


def _unchanged(value, before) -> bool:
    if isinstance(value, torch.Tensor):
        return value.shape == before.shape and value.dtype == before.dtype and bool(torch.equal(value, before))
    if isinstance(value, torch.nn.Module):
        now = value.state_dict()
        return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
    return value == before


def _argument_name(fn, index: int) -> str:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    return names[index] if index < len(names) else f"argument {index + 1}"


def call(fn, *args, case: str = "", hint: str = "", in_place: str = ""):
    """``fn(*args)``, the learner's function; raise :class:`Failed` when it raised (naming the ``case``, the
    learner's line and a likely cause, or ``hint``) or changed an argument in place (``in_place`` overrides
    the generic message)."""
    before = [_snapshot(a) for a in args]
    try:
        value = fn(*args)
    except Exception as err:  # a learner's bug, reported instead of raised
        raise raised(err, case, hint) from None
    for i, (arg, copy) in enumerate(zip(args, before)):
        if copy is not None and not _unchanged(arg, copy):
            where = f"{case}: " if case else ""
            raise Failed(
                where
                + (
                    in_place
                    or f"you changed `{_argument_name(fn, i)}` in place "
                    "(x += …, x /= …, x[...] = …): the caller still uses it, so "
                    "work on a new tensor (x = x + …)"
                )
            )
    return value


def tensor_answer(fn, *args, noun: str, case: str = "", in_place: str = "") -> torch.Tensor:
    """``fn(*args)`` as a float64 tensor; raise :class:`Failed` when it raised, changed an argument in place,
    or returned something other than a tensor."""
    out = call(fn, *args, case=case, in_place=in_place)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        raise Failed(f"return only {noun}, not a tuple of {len(out)}")
    if not isinstance(out, torch.Tensor):
        raise Failed(f"return {noun} as a tensor, not {type(out).__name__}")
    if out.is_complex() or out.dtype == torch.bool:
        raise Failed(f"return {noun} as a float tensor, not {out.dtype}")
    return out.detach().to("cpu", torch.float64)


def pair(answer, names: str = "(token_id, probability)") -> tuple[int, float]:
    """An answer ``(int, float)`` read as Python numbers; raise :class:`Failed` saying what came back."""
    try:
        first, second = answer
        if isinstance(second, torch.Tensor) and second.numel() != 1:
            raise Failed(
                f"return {names}: the second item should be ONE number, got a tensor of shape "
                f"{tuple(second.shape)} (pick the element, e.g. probs[token])"
            )
        return int(first), float(second)
    except (TypeError, ValueError, IndexError, RuntimeError):
        raise Failed(f"return a pair {names}, got {answer!r:.80}") from None


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Same shape and equal within ``tol`` (absolute and relative), compared in float64."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=False)


def name_the_mistake(answer, mistakes: Mapping[str, object], same: Callable = close, case: str = "") -> None:
    """Raise :class:`Failed` with the hint of the first of ``mistakes`` (hint -> what that mistake returns)
    that ``answer`` equals by ``same``; return when it equals none, so the check can say its own last word."""
    for hint, wrong in mistakes.items():
        if same(answer, wrong):
            raise Failed(f"{hint} ({case})" if case else hint)
