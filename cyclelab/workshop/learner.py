"""The learner's function in a limited process of its own, answering the check's calls over a pipe.

The check's process (:mod:`cyclelab.workshop.verdict`) never runs learner code: it forks the learner's
process before computing anything, with its own limits (:class:`~cyclelab.workshop.sandbox.Limits`), in
its own session and holding none of the check's files, sends it the learner's cells (only their definitions run there) and then, for each call the
check makes, the arguments (:mod:`cyclelab.workshop.wire`: values and tensor bytes, never pickle; a model,
engine or optimizer by the recipe that made it, :mod:`cyclelab.checks.recipes`). The learner's process
answers with the return value (or the exception's type, message and line) and the arguments the function
changed in place, which the check's process writes back into its own copies so the check sees what the
function did. Whatever the learner's code patches, prints or writes happens in the learner's process; the
check compares in its own. A call that does not return within the check's time, or a process that a limit
ends, stops the check with :class:`Stopped`, whose message names the limit.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import select
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cyclelab.workshop import wire
from cyclelab.workshop.sandbox import PR_SET_PDEATHSIG, Limits, _preexec, kill_descendants, prctl, unprivileged_user

GIB = 1 << 30
PACKAGE = Path(__file__).resolve().parents[1]  # the cyclelab package folder
KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MAGIC = re.compile(r"^\s*[%!].*$", re.MULTILINE)


class Stopped(BaseException):  # noqa: N818 - not an Exception: no check may catch it as the learner's error
    """The learner's process stopped answering: a time or resource limit, or it died; the message says which."""


class LearnerError(Exception):
    """An exception the learner's function raised in its own process (named like the learner's)."""


def _learner_error(name: str, message: str, line: str) -> LearnerError:
    kind = type(name if name.isidentifier() else "Exception", (LearnerError,), {})
    err = kind(message)
    err.learner_line = line
    return err


# ------------------------------------------------------------------ the learner's cells


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


# ------------------------------------------------------------------ the check's side


def _die_with(parent: int) -> None:
    """Be killed when ``parent`` ends, however it ends (Linux): a check's process killed by the grader's
    deadline must not leave the learner's, in its own session, running on. Set after the change of user,
    which clears it; a parent already gone by then ends this process at once."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class _Forked:
    """The learner's process, forked from the check's before the check computes anything (torch and cyclelab
    already imported: no second start-up), in a session of its own, limited (as ``nobody`` when root; root's
    limits on processes are not kept), holding no file of the check's but the two pipes and stderr."""

    def __init__(self, limits: Limits, cwd: str | None) -> None:
        limit = _preexec(limits, unprivileged_user())
        request, answer = os.pipe(), os.pipe()
        parent = os.getpid()
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:  # the learner's process
            try:
                os.setsid()
                limit()
                _die_with(parent)
                if cwd:
                    os.chdir(cwd)
                os.dup2(request[0], 0)
                os.dup2(answer[1], 1)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the check's verdict stream above all
                torch.set_num_threads(1)  # an OpenMP pool the parent started does not survive a fork
                _serve()
            finally:
                os._exit(1)
        os.close(request[0])
        os.close(answer[1])
        self.stdin = os.fdopen(request[1], "wb")
        self.stdout = os.fdopen(answer[0], "rb", buffering=0)  # select() must see every byte not yet read

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        for stream in (self.stdin, self.stdout):
            try:
                stream.close()
            except OSError:  # a pipe the learner's process left unread
                pass
        return self.returncode


class Learner:
    """The learner's process, seen from the check: start it, call its function, stop it."""

    def __init__(self, cells: list, function: str, limits: Limits, timeout: float, cwd: str | None = None) -> None:
        self.limits, self.timeout, self.function = limits, timeout, function
        self.deadline = time.monotonic() + timeout
        self.handles: dict[int, tuple[int, object]] = {}  # id(obj) -> (handle, obj): the object kept alive
        self.proc = _Forked(limits, cwd)
        wire.send(self.proc.stdin, {"cells": cells, "function": function})
        self.hello, _ = self._answer()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def _answer(self) -> tuple[dict, list[bytes]]:
        """The learner's next frame, within the check's time; :class:`Stopped` when there is none."""
        left = self.deadline - time.monotonic()
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
        if not ready:
            self.stop()
            raise Stopped(
                f"timed out after {self.timeout:g} s: {self.function} did not return (an endless loop, or a "
                "wait for something that never comes?); the grader stopped it and went on with the other checks"
            )
        try:
            return wire.receive(self.proc.stdout)
        except (EOFError, ValueError) as err:
            self.stop()
            raise Stopped(self._death(err)) from None

    def _death(self, err: Exception) -> str:
        code, limits = self.proc.returncode, self.limits
        if code == -signal.SIGXCPU:
            return (
                f"{self.function} ran past the grader's CPU-time limit ({limits.cpu_seconds} s of CPU for the "
                "check): make it do less work (smaller loops, no busy waiting)"
            )
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return (
                f"{self.function}'s process was ended by {name} (a crash, or the memory limit of "
                f"{limits.memory_bytes / GIB:g} GiB): try it on small inputs in the notebook first"
            )
        return f"{self.function}'s process ended without an answer (exit status {code}; {err})"

    def _ref(self, obj, encode: wire.Encoder) -> dict | None:
        """The reference that names ``obj`` (its handle, and the recipe with its arguments encoded), or None."""
        from cyclelab.checks.recipes import recipe_of

        recipe = recipe_of(obj)
        if recipe is None:
            return None
        handle = self.handles.setdefault(id(obj), (len(self.handles), obj))[0]
        recipe = {**recipe, "args": encode(recipe["args"]), "kwargs": encode(recipe["kwargs"])}
        ref = {"handle": handle, "recipe": recipe}
        if isinstance(obj, torch.nn.Module):
            ref["training"] = obj.training
        return ref

    def call(self, args: tuple):
        encoder = wire.Encoder()
        encoder.ref = lambda obj: self._ref(obj, encoder)
        header = {"args": encoder(list(args))}
        try:
            wire.send(self.proc.stdin, header, encoder.blobs)
        except BrokenPipeError as err:
            self.stop()
            raise Stopped(self._death(err)) from None
        answer, blobs = self._answer()
        decode = wire.Decoder(blobs)
        for index, value in answer.get("changed", []):
            _write_back(args[index], decode(value))
        if "raised" in answer:
            name, message, line = answer["raised"]
            self._limit(name, message)
            raise _learner_error(name, message, line)
        return decode(answer["value"])

    def _limit(self, name: str, message: str) -> None:
        """:class:`Stopped` when the learner's exception is a limit of the grader's (memory, processes)."""
        if name == "MemoryError" or "can't allocate memory" in message:
            raise Stopped(
                f"{self.function} ran past the grader's memory limit ({self.limits.memory_bytes / GIB:g} GiB "
                f"of address space; it raised {name}): work on the tensors the check gives, without large copies"
            )
        if name in ("BlockingIOError", "OSError") and "Resource temporarily unavailable" in message:
            raise Stopped(
                f"{self.function} ran past the grader's process limit ({self.limits.processes} processes; it "
                f"raised {name}: {message[:80]}): compute in the function itself, start no processes"
            )

    def proxy(self):
        """The learner's function as the check sees it: a callable with the learner's parameter names, or
        an object named like the learner's when it is not callable."""
        if not self.hello.get("callable"):
            return wire._opaque(self.hello.get("type", "object"), "")

        def learner_function(*args):
            return self.call(args)

        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in self.hello["parameters"]]
        learner_function.__signature__ = inspect.Signature(params)
        learner_function.__name__ = self.function
        return learner_function


def _write_back(arg, value) -> None:
    """Make the check's argument what the learner's function left it as."""
    if isinstance(arg, torch.Tensor) and isinstance(value, torch.Tensor):
        with torch.no_grad():
            if arg.shape == value.shape and arg.dtype == value.dtype:
                arg.copy_(value)
            else:
                arg.data = value
    elif isinstance(arg, list) and isinstance(value, list):
        arg[:] = value
    elif isinstance(arg, dict) and isinstance(value, dict):
        arg.clear()
        arg.update(value)
    elif isinstance(arg, torch.nn.Module) and isinstance(value, dict):
        arg.load_state_dict(value, strict=False)


# ------------------------------------------------------------------ the learner's side


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.nn.Module):
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    if isinstance(value, (list, dict)):
        try:
            return wire.Encoder()(value)
        except Exception:  # noqa: BLE001 - what cannot be encoded is not compared
            return None
    return None


def _changed(value, before) -> object | None:
    """The value to send back when ``value`` differs from its snapshot ``before``, else None."""
    if before is None:
        return None
    if isinstance(value, torch.Tensor):
        same = value.shape == before.shape and value.dtype == before.dtype and bool(torch.equal(value, before))
        return None if same else value
    if isinstance(value, torch.nn.Module):
        now = value.state_dict()
        same = now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
        return None if same else dict(now)
    return None if wire.Encoder()(value) == before else value


def _serve() -> None:
    from cyclelab.checks.harness import _learner_line
    from cyclelab.checks.recipes import remake
    from cyclelab.workshop.sandbox import contain

    contain()
    requests, reply = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # the learner's prints go to stderr
    sys.stdout = sys.stderr
    spec, _ = wire.receive(requests)
    sys.path.append(os.getcwd())  # the learner's own modules, after everything else (-P left it out)
    namespace: dict = {"__name__": "__main__"}
    first = _define(spec["cells"], namespace)
    fn = namespace.get(spec["function"])
    try:
        parameters = list(inspect.signature(fn).parameters) if callable(fn) else []
    except (TypeError, ValueError):
        parameters = []
    hello = {"defined": spec["function"] in namespace, "callable": callable(fn), "type": type(fn).__name__}
    hello |= {"first": first, "copied": copied(fn) if callable(fn) else "", "parameters": parameters}
    wire.send(reply, hello)
    objects: dict[int, object] = {}
    me = os.getpid()

    def ref(body, decode: wire.Decoder):
        """The object a reference names: made here the first time (its arguments may be references too)."""
        handle = body["handle"]
        if handle not in objects:
            objects[handle] = remake(body["recipe"], decode)
        obj = objects[handle]
        if isinstance(obj, torch.nn.Module) and "training" in body:
            obj.train(body["training"])
        return obj

    while True:
        try:
            header, blobs = wire.receive(requests)
        except EOFError:
            break
        decoder = wire.Decoder(blobs)
        decoder.ref = lambda body, decoder=decoder: ref(body, decoder)
        args = decoder(header["args"])
        before = [_snapshot(a) for a in args]
        try:
            answer = {"value": fn(*args)}
        except BaseException as err:  # noqa: BLE001 - the learner's function, whatever it raises
            answer = {"raised": [type(err).__name__, str(err)[:2000], _learner_line(err)]}
        if os.getpid() != me:  # a process the learner's function forked returns here: it never answers
            os._exit(0)
        kill_descendants()
        encoder = wire.Encoder()
        changed = [[i, encoder(c)] for i, c in enumerate(map(_changed, args, before)) if c is not None]
        if "value" in answer:
            answer["value"] = encoder(answer["value"])
        wire.send(reply, {**answer, "changed": changed}, encoder.blobs)
    kill_descendants()
    os._exit(0)


def limits_of(spec: dict) -> Limits:
    """The learner's limits from a check spec (the grader's defaults where it names none)."""
    return Limits(**{**asdict(Limits()), **spec.get("limits", {})})


if __name__ == "__main__":
    _serve()
