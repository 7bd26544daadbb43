"""The learner's function in a process of its own (workshop.learner): what crosses (workshop.wire), what a
cheat in the function body can reach, and the row each limit gives; every check here is judged in-process
by verdict.judge, a learner process each (a few seconds), with limits small enough to hit at once."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from test_grade import GREEDY_RIGHT

from cyclelab.checks.recipes import made, recipe_of, remake
from cyclelab.workshop import grade, wire
from cyclelab.workshop.sandbox import Limits
from cyclelab.workshop.verdict import argument, judge

STUB = "def greedy_step(logits):\n    return 0, 0.0"
SMALL = Limits(memory_bytes=2 << 30, cpu_seconds=6, processes=16)


def _judge(source: str, timeout: float = 30, limits: Limits = SMALL, tmp_path=None) -> dict:
    spec = {"cells": [[1, "import torch"], [2, source]], "check": "check_greedy_step", "function": "greedy_step"}
    spec |= {"args": ["greedy_step"], "timeout": timeout, "limits": asdict(limits)}
    return judge(spec | ({"cwd": str(tmp_path)} if tmp_path else {}))


def test_values_cross_without_pickle() -> None:
    values = [
        torch.randn(4, 3),
        torch.randn(6, 5, dtype=torch.float64).T,  # not contiguous
        torch.tensor([[True, False]]),
        torch.zeros(0, 3, dtype=torch.int64),
        torch.tensor(2.5, dtype=torch.bfloat16),
        {("a", "b"): 3, 4: [1.5, None]},
        (1, 2**70, float("nan"), "x"),
        {1, 2},
    ]
    encode = wire.Encoder()
    back = wire.Decoder(encode.blobs)(encode(values))
    for got, want in zip(back[:5], values[:5]):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert back[5] == values[5] and back[6][:2] == (1, 2**70) and back[6][3] == "x" and back[7] == {1, 2}


def test_an_object_of_the_learner_arrives_as_its_repr() -> None:
    class Mine:
        def __repr__(self) -> str:
            return "<mine>"

    encode = wire.Encoder()
    got = wire.Decoder(encode.blobs)(encode(Mine()))
    assert repr(got) == "<mine>" and type(got).__name__ == "Mine"


def test_a_made_model_is_remade_with_its_layers() -> None:
    from cyclelab.checks.models import random_gpt2

    model = made(random_gpt2(), "cyclelab.checks.models:random_gpt2")
    layer = model.transformer.h[1]
    recipe = recipe_of(layer)
    assert recipe["path"] == [["module", "transformer.h.1"]]
    again = remake(recipe, lambda x: x)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), layer.state_dict().values()))


def test_further_arguments_are_made_from_literals_and_load_only() -> None:
    cells = [[1, 'model_name = "tiny"'], [2, "tiny = load(model_name)\nweights = torch.ones(3)"]]
    model = argument("tiny.model", cells)
    assert isinstance(model, torch.nn.Module) and recipe_of(model)["factory"] == "cyclelab.loading.loader:load"
    with pytest.raises(ValueError, match="`weights` could not be made"):
        argument("weights", cells)


@pytest.mark.parametrize(
    "name, body",
    [
        (
            "patches-cyclelab",
            "    import cyclelab.checks.harness as h\n    h.Result.__bool__ = lambda self: True\n"
            "    h.close = lambda *a, **k: True\n    h.Failed.__init__ = lambda self, m: None\n",
        ),
        (
            "patches-sys-modules",
            "    import sys\n    sys.modules['cyclelab.checks'].Result = type('R', (), {'passed': True})\n"
            "    __import__('cyclelab.workshop.verdict')\n    sys.modules['cyclelab.workshop.verdict'].judge = lambda spec: {'status': 'passed', 'hint': ''}\n",
        ),
    ],
)
def test_a_patch_in_the_function_body_does_not_reach_the_check(name: str, body: str) -> None:
    answer = _judge(f"def greedy_step(logits):\n{body}    return 0, 0.0")
    assert answer["status"] == "failed" and answer["hint"].startswith("the probability should be"), answer


def test_a_function_that_never_returns_times_out_its_check() -> None:
    answer = _judge("def greedy_step(logits):\n    while True:\n        pass", timeout=3)
    assert answer["status"] == "error"
    assert answer["hint"].startswith("timed out after 3 s: greedy_step did not return"), answer


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("    x = torch.ones(1 << 31)\n", r"ran past the grader's memory limit \(2 GiB of address space"),
        (
            "    import os, time\n    for _ in range(64):\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n",
            r"ran past the grader's process limit \(16 processes.*start no processes",
        ),
        ("    while True:\n        pass\n", r"ran past the grader's CPU-time limit \(6 s of CPU"),
    ],
    ids=["memory", "processes", "cpu"],
)
def test_each_limit_gives_a_row_that_names_it(body: str, pattern: str) -> None:
    import re

    answer = _judge(f"def greedy_step(logits):\n{body}    return 0, 0.0", timeout=60)
    assert answer["status"] == "error" and re.search(pattern, answer["hint"]), answer


def test_the_check_cells_call_nothing_in_the_graded_kernel(tmp_path) -> None:
    from test_grade import mini_course

    from cyclelab.workshop.edition import read_notebook

    course = mini_course(tmp_path / "course")
    ref = grade.reference(course, "00_mini.ipynb")
    nb = read_notebook(course / "00_mini.ipynb")
    grade.prepare(nb, ref)
    run = grade.runnable(nb, ref)
    checks = [c.source for c in run.cells if c.metadata.get("nbgrader", {}).get("grade_id") in ref.checks]
    assert len(checks) == 2 and all(s.startswith("# graded in a process of its own") for s in checks)
    assert any("check_greedy_step(greedy_step)" in c.source and not c.source.startswith("#") for c in nb.cells)


def test_a_right_answer_passes_after_all_that() -> None:
    assert _judge(GREEDY_RIGHT) == {"status": "passed", "hint": ""}


def test_the_learners_process_ends_when_the_checks_is_killed(tmp_path) -> None:
    """The grader kills a check's process at its deadline; the learner's, in a session of its own, ends with it."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "learner.pid"
    body = (
        "def greedy_step(logits):\n"
        f"    open({str(pid_file)!r}, 'w').write(str(__import__('os').getpid()))\n"
        "    while True:\n        pass"
    )
    spec = {"cells": [[1, body]], "check": "check_greedy_step", "function": "greedy_step", "args": ["greedy_step"]}
    spec |= {"timeout": 120, "limits": asdict(SMALL)}
    code = f"from cyclelab.workshop.verdict import judge; judge({json.dumps(spec)!r} and __import__('json').loads({json.dumps(json.dumps(spec))}))"
    check = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    learner = int(pid_file.read_text())
    check.send_signal(signal.SIGKILL)
    check.wait()
    for _ in range(50):
        try:
            os.kill(learner, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(learner, signal.SIGKILL)
    pytest.fail("the learner's process outlived the check's")
