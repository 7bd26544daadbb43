"""The grader's two child processes, each run limited by :mod:`cyclelab.workshop.sandbox`.

``python -m cyclelab.workshop.verdict notebook``: execute a prepared notebook (papermill, a kernel of its own)
and print how the run ended as one JSON line. Nothing the kernel prints decides a grade.

``python -m cyclelab.workshop.verdict check``: the verdict of one check, in a fresh process. It reads a spec
(JSON, on stdin): the learner's code cells before the check, the check's name and the argument expressions of
its call. Of those cells it runs only definitions (imports, ``def``, ``class``, assignments to plain names):
no printing, hooks or patching reaches this process at the top level. The check function is cyclelab's own,
imported before any learner code runs, and the verdict is read from the Result object (not from any text)
and written to a private copy of stdout (the learner's prints go to stderr). A function whose code is
cyclelab's own, or that calls the package's reference (``_ref_*``), fails as copied from the package.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the cyclelab package folder
KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MAGIC = re.compile(r"^\s*[%!].*$", re.MULTILINE)


def definitions(source: str) -> ast.Module:
    """The definitions of a cell (see the module doc); SyntaxError when it does not parse."""
    tree = ast.parse(MAGIC.sub("", source))
    tree.body = [s for s in tree.body if isinstance(s, KEPT) or _plain_assignment(s)]
    return tree


def _plain_assignment(stmt: ast.stmt) -> bool:
    """``name = …`` or ``a, b = …`` (not ``obj.attr = …`` nor ``d[k] = …``: those patch what exists)."""

    def plain(target: ast.expr) -> bool:
        return isinstance(target, ast.Name) or (isinstance(target, ast.Tuple) and all(map(plain, target.elts)))

    if isinstance(stmt, ast.Assign):
        return all(plain(t) for t in stmt.targets)
    return isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name)


def _code_names(code) -> set[str]:
    """Every global and attribute name a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def copied(fn) -> str:
    """Why ``fn`` is the package's own code ('' when it is the learner's)."""
    if isinstance(fn, functools.partial):
        return copied(fn.func)
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    if code is None:
        module = getattr(fn, "__module__", "") or ""
        return f"it is {module}'s own" if module.split(".")[0] == "cyclelab" else ""
    if Path(code.co_filename).resolve().is_relative_to(PACKAGE):
        return f"its code is cyclelab's own ({Path(code.co_filename).name})"
    refs = sorted(n for n in _code_names(code) if n.startswith("_ref"))
    return f"it calls the package's reference {refs[0]}" if refs else ""


def _define(cells: list[list], namespace: dict) -> str:
    """Run each cell's definitions in ``namespace``, a cell stopping at its first error; the first error."""
    first = ""
    for number, source in cells:
        try:
            exec(compile(definitions(source), f"<cell {number}>", "exec"), namespace)
        except BaseException as err:  # noqa: BLE001 - the learner's cell, whatever it raises
            first = first or f"cell {number}: {type(err).__name__}: {err}"
    return first


def judge(spec: dict) -> dict:
    """The verdict of one check: {"status": passed|failed|error, "hint": ...}."""
    import cyclelab.checks as checks

    check, result_type = getattr(checks, spec["check"]), checks.Result  # before any learner code runs
    namespace: dict = {"__name__": "__main__"}
    first = _define(spec["cells"], namespace)
    before = f" (the notebook's first error: {first})" if first else ""
    try:
        args = [eval(expr, namespace) for expr in spec["args"]]  # noqa: S307 - the course's own check call
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "hint": f"the check raised {type(err).__name__}: {err}{before}"}
    why = copied(args[0]) if args else ""
    if why:
        return {"status": "failed", "hint": f"copied from the package: {spec['function']} is not yours ({why})"}
    result = check(*args)
    if type(result) is not result_type or not isinstance(vars(result).get("passed"), bool):
        return {"status": "error", "hint": f"{spec['check']} returned no Result"}
    passed, message = vars(result)["passed"], str(vars(result).get("message", ""))
    return {"status": "passed", "hint": ""} if passed is True else {"status": "failed", "hint": message}


def _check_main() -> None:
    from cyclelab.workshop.sandbox import kill_descendants

    verdict = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the learner's code never gets this name
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


def _notebook_main() -> None:
    from cyclelab.workshop.course import run_notebook

    spec = json.loads(sys.stdin.read())
    end = time.monotonic() + spec["timeout"]
    prepared = Path(spec["notebook"])
    run = run_notebook(
        prepared,
        Path(spec["out_dir"]),
        allow_errors=True,
        timeout_func=lambda cell: max(1, int(end - time.monotonic() + 0.999)),
    )
    print(json.dumps({"error": run.error, "output": str(run.output)}))


if __name__ == "__main__":
    from cyclelab.workshop.sandbox import contain

    contain()
    {"check": _check_main, "notebook": _notebook_main}[sys.argv[1]]()
