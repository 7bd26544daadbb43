"""The grader's two child processes, each run limited by :mod:`cyclelab.workshop.sandbox`.

``python -m cyclelab.workshop.verdict notebook``: execute a prepared notebook (papermill, a kernel of its own)
and print how the run ended as one JSON line. Nothing the kernel prints decides a grade.

``python -m cyclelab.workshop.verdict check``: the verdict of one check, in a fresh process that never runs
learner code. It reads a spec (JSON, on stdin): the learner's code cells before the check, the check's name
and the argument expressions of its call. The learner's function runs in a limited process of its own
(:mod:`cyclelab.workshop.learner`: of the cells it runs only definitions, imports, ``def``, ``class``,
assignments to plain names) that answers each call the check makes with values, never pickle; whatever it
patches, prints or writes stays there. The check function is cyclelab's own, the check's further arguments
(``tiny.model``) are made here from literals and ``load(...)`` only, and the verdict is read from the Result
object and written to a private copy of stdout; this process cannot be traced by the learner's (same user).
A function whose code is cyclelab's own, or that calls the package's reference (``_ref_*``), fails as copied
from the package (read from the source here, and from the function object there).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _statements(cells: list[list]) -> Iterator[ast.stmt]:
    """The top-level definition statements of the cells, in order (a cell that does not parse is skipped)."""
    from cyclelab.workshop.learner import definitions

    for _, source in cells:
        try:
            yield from definitions(source).body
        except SyntaxError:
            continue


def _copied_statically(cells: list[list], function: str) -> str:
    """Why the cells' last binding of ``function`` is the package's own, read from the source without running
    it: an import from cyclelab, or a ``def`` that names a reference ``_ref_*`` ('' otherwise)."""
    from cyclelab.workshop.learner import _code_names

    why = ""
    for stmt in _statements(cells):
        if isinstance(stmt, ast.ImportFrom) and any((a.asname or a.name) == function for a in stmt.names):
            ours = (stmt.module or "").split(".")[0] == "cyclelab"
            why = f"its code is cyclelab's own (imported from {stmt.module})" if ours else ""
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == function:
            code = compile(ast.Module([stmt], []), "<cell>", "exec")
            refs = sorted(n for n in _code_names(code) if n.startswith("_ref"))
            why = f"it calls the package's reference {refs[0]}" if refs else ""
    return why


def _bindings(cells: list[list]) -> dict[str, ast.expr]:
    """The expression each plain name was last assigned in the cells (definitions only, never run)."""
    names: dict[str, ast.expr] = {}
    for stmt in _statements(cells):
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                pairs = [(target, stmt.value)]
                if isinstance(target, ast.Tuple) and isinstance(stmt.value, ast.Tuple):
                    pairs = list(zip(target.elts, stmt.value.elts))
                names |= {t.id: v for t, v in pairs if isinstance(t, ast.Name)}
        elif isinstance(stmt, ast.AnnAssign):
            names[stmt.target.id] = stmt.value
        else:
            for node in ast.walk(stmt):
                if isinstance(node, ast.alias):
                    names.pop((node.asname or node.name).split(".")[0], None)
            names.pop(getattr(stmt, "name", ""), None)
    return names


def argument(expr: str, cells: list[list]):
    """The value of a check call's further argument (``tiny.model``, ``mlm``), made in this process without
    running learner code: a literal, a name the cells assigned a literal or ``load(...)`` of literals (made
    with cyclelab's own ``load``), and attributes of those. ValueError naming the argument otherwise."""
    from cyclelab.checks.recipes import made
    from cyclelab.loading.loader import load

    names = _bindings(cells)

    def value(node: ast.expr, depth: int = 0):
        if depth > 20:
            raise ValueError("its names refer to each other")
        if isinstance(node, ast.Name) and node.id in names:
            return value(names[node.id], depth + 1)
        if isinstance(node, ast.Attribute) and not node.attr.startswith("_"):
            return getattr(value(node.value, depth + 1), node.attr)
        if isinstance(node, (ast.Tuple, ast.List)):
            return (tuple if isinstance(node, ast.Tuple) else list)(value(e, depth + 1) for e in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "load":
            args = [value(a, depth + 1) for a in node.args]
            kwargs = {k.arg: value(k.value, depth + 1) for k in node.keywords if k.arg}
            return made(load(*args, **kwargs), "cyclelab.loading.loader:load", *args, **kwargs)
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise ValueError(f"`{ast.unparse(node)}` is not a literal nor load(...) of literals") from None

    try:
        return value(ast.parse(expr, mode="eval").body)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"the check's argument `{expr}` could not be made from the notebook: {err}") from None


def judge(spec: dict) -> dict:
    """The verdict of one check: {"status": passed|failed|error, "hint": ...}. The learner's function runs in
    a process of its own (:mod:`cyclelab.workshop.learner`); this one only calls it and compares."""
    import cyclelab.checks as checks
    from cyclelab.workshop.learner import Learner, Stopped, limits_of

    check, result_type = getattr(checks, spec["check"]), checks.Result
    function, cells = spec["function"], spec["cells"]
    why = _copied_statically(cells, function)
    if why:
        return {"status": "failed", "hint": f"copied from the package: {function} is not yours ({why})"}
    learner = None
    try:  # forked before this process computes anything (a thread pool in use does not survive a fork)
        learner = Learner(cells, function, limits_of(spec), spec.get("timeout", 600), spec.get("cwd"))
        extra = [argument(expr, cells) for expr in spec["args"][1:]]
        hello = learner.hello
        before = f" (the notebook's first error: {hello['first']})" if hello.get("first") else ""
        if not hello.get("defined"):
            return {"status": "error", "hint": f"the check raised NameError: name '{function}' is not defined{before}"}
        if hello.get("copied"):
            return {"status": "failed", "hint": f"copied from the package: {function} is not yours ({hello['copied']})"}
        result = check(learner.proxy(), *extra)
    except Stopped as stopped:
        return {"status": "error", "hint": str(stopped)}
    except ValueError as err:  # a further argument that could not be made
        return {"status": "error", "hint": str(err)}
    finally:
        if learner is not None:
            learner.stop()
    if type(result) is not result_type or not isinstance(vars(result).get("passed"), bool):
        return {"status": "error", "hint": f"{spec['check']} returned no Result"}
    passed, message = vars(result)["passed"], str(vars(result).get("message", ""))
    return {"status": "passed", "hint": ""} if passed is True else {"status": "failed", "hint": message}


def _check_main() -> None:
    from cyclelab.workshop.sandbox import kill_descendants

    _not_dumpable()
    verdict = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the learner's process never gets this name
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = json.loads(sys.stdin.read())
    try:
        answer = judge(spec)
    except BaseException as err:  # noqa: BLE001 - the check itself failing is an error row, not a crash
        answer = {"status": "error", "hint": f"the check raised {type(err).__name__}: {err}"}
    verdict.write(json.dumps(answer) + "\n")
    verdict.flush()
    kill_descendants()
    os._exit(0)  # no atexit hook or finaliser of the learner's code runs after the verdict


def _not_dumpable() -> None:
    """No process of the same user (the learner's) may trace this one or open its /proc files (Linux)."""
    from cyclelab.workshop.sandbox import PR_SET_DUMPABLE, prctl

    prctl(PR_SET_DUMPABLE, 0)


def _notebook_main() -> None:
    from cyclelab.workshop.course import run_notebook

    spec = json.loads(sys.stdin.read())
    end = time.monotonic() + spec["timeout"]
    prepared = Path(spec["notebook"])
    run = run_notebook(
        prepared,
        Path(spec["out_dir"]),
        profile="fast",  # grading runs the exercises' checks, which hold in every profile: at CI's sizes
        allow_errors=True,
        timeout_func=lambda cell: max(1, int(end - time.monotonic() + 0.999)),
    )
    print(json.dumps({"error": run.error, "output": str(run.output)}))


if __name__ == "__main__":
    from cyclelab.workshop.sandbox import contain

    contain()
    {"check": _check_main, "notebook": _notebook_main}[sys.argv[1]]()
