"""Which kernels run: the own/torch choice by (fake) timing, its cache, the per-thread torch switch, and the int8
layer API's checks. No test here times anything for real."""

import json
import os
import threading

import pytest
import torch

from cyclelab import kernels
from cyclelab.core.norms import rms_norm
from cyclelab.kernels import Int8Linear, choice, int8_linear, int8_linears, quantize_symmetric, torch_float32

KEY = {"cpu": "Test CPU", "torch": "0.0", "threads": 1, "source": "abc"}


def fake_timer(own_s: float, torch_s: float, calls: list | None = None):
    """A timer that reports fixed seconds for each side (and records which side it was asked to time)."""

    def timer(side, run):
        if calls is not None:
            calls.append(side)
        return own_s if side == "own" else torch_s

    return timer


def never(side, run):
    pytest.fail("the choice was measured again instead of read from the cache")


@pytest.mark.parametrize(
    "own_s,torch_s,want", [(1.0, 2.0, True), (2.0, 1.0, False)], ids=["own-faster", "torch-faster"]
)
def test_the_choice_follows_the_timer_both_ways(own_s, torch_s, want, tmp_path):
    calls = []
    chooser = choice.Chooser(tmp_path / "k", fake_timer(own_s, torch_s, calls), key=KEY)
    assert chooser.use_own("f32", (1, 64, 32), lambda: None, lambda: None) is want
    timed = len(calls)
    assert calls.count("own") == calls.count("torch") >= 3  # a warm-up and at least two timed runs each
    assert chooser.use_own("f32", (1, 64, 32), None, None) is want and len(calls) == timed  # decided once


def test_the_cache_is_reused_by_the_next_process_and_measured_again_when_the_key_changes(tmp_path):
    folder = tmp_path / "k"
    choice.Chooser(folder, fake_timer(1.0, 3.0), key=KEY).use_own("int8", (1, 8, 4), None, None)
    saved = json.loads((folder / choice.CACHE_NAME).read_text())
    assert saved["key"] == KEY and saved["timings"] == {"int8 (1, 8, 4)": [1.0, 3.0]}
    assert choice.Chooser(folder, never, key=KEY).use_own("int8", (1, 8, 4), None, None) is True
    for changed in ("cpu", "torch", "threads", "source"):
        calls = []
        other = choice.Chooser(folder, fake_timer(3.0, 1.0, calls), key={**KEY, changed: "other"})
        assert other.use_own("int8", (1, 8, 4), None, None) is False and calls, changed


def test_a_near_tie_is_measured_again_and_not_kept_for_later_processes(tmp_path):
    """Within 10 % either side may win by noise (a busy machine): the shape is timed twice, the decision holds
    for this process only, and the next process measures again."""
    calls = []
    chooser = choice.Chooser(tmp_path / "k", fake_timer(1.0, 1.05, calls), key=KEY)
    assert chooser.use_own("f32", (1, 8, 4), None, None) is True
    first = len(calls)
    assert first >= 2 * (1 + 3) * 2  # two rounds, each a warm-up and at least three runs of both sides
    assert not (tmp_path / "k" / choice.CACHE_NAME).exists()
    assert choice.clear(1.0, 1.2) and not choice.clear(1.0, 1.05) and choice.clear(1.2, 1.0)


@pytest.mark.parametrize("damage", ["not json", "wrong shape", "world-writable", "foreign owner", "a link"])
def test_a_damaged_or_foreign_cache_is_ignored(damage, tmp_path):
    folder = tmp_path / "k"
    choice.Chooser(folder, fake_timer(1.0, 3.0), key=KEY).use_own("f32", (1, 2, 3), None, None)
    path = folder / choice.CACHE_NAME
    if damage == "not json":
        path.write_bytes(b"\x00{garbage")
    elif damage == "wrong shape":
        path.write_text(json.dumps({"key": KEY, "timings": {"f32 (1, 2, 3)": "fast"}}))
    elif damage == "world-writable":
        os.chmod(path, 0o666)
    elif damage == "foreign owner":
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(path, 4242, -1)
    else:
        real = tmp_path / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    assert choice.read_cache(folder) is None
    calls = []
    assert choice.Chooser(folder, fake_timer(3.0, 1.0, calls), key=KEY).use_own("f32", (1, 2, 3), None, None) is False
    assert calls  # measured again; the next process reads the new, sound file
    assert choice.read_cache(folder)["timings"] == {"f32 (1, 2, 3)": (3.0, 1.0)}


class _Recorder:
    """Stands in for the compiled library: records which kernels are called (and computes nothing)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append(name)


@pytest.fixture
def recorder(monkeypatch):
    library = _Recorder()
    monkeypatch.setattr(kernels.build, "compiled", lambda: library)
    monkeypatch.delenv("CYCLELAB_KERNELS", raising=False)
    yield library
    choice.reset()


@pytest.mark.parametrize(
    "own_s,torch_s,called", [(1.0, 2.0, True), (2.0, 1.0, False)], ids=["own-faster", "torch-faster"]
)
def test_the_products_run_the_chosen_kernel(own_s, torch_s, called, recorder):
    choice.reset(choice.Chooser(None, fake_timer(own_s, torch_s), key=KEY))
    x, w = torch.randn(1, 40), torch.randn(24, 40)
    q, scale = quantize_symmetric(w, 127)
    with torch.no_grad():
        out = kernels.f32_linear(x, w)
        int8_linear(x, q, scale.flatten(), None)
        fused = kernels.fused_rms_norm(x, torch.ones(40), 1e-5, formula=rms_norm)
    assert recorder.calls == (["f32_linear", "int8_linear", "f32_rms_norm"] if called else [])
    if not called:
        assert torch.equal(out, torch.nn.functional.linear(x, w)) and fused is None
    report = kernels.choice_report()
    assert "f32 (1, 40, 24)" in report and "int8 (1, 40, 24)" in report and "fused ('rms_norm', 1, 40)" in report
    assert ("-> own" if called else "-> torch") in report


def test_own_mode_forces_the_own_kernels_without_timing(recorder, monkeypatch):
    monkeypatch.setenv("CYCLELAB_KERNELS", "own")
    choice.reset(choice.Chooser(None, never, key=KEY))
    with torch.no_grad():
        kernels.f32_linear(torch.randn(1, 8), torch.randn(4, 8))
    assert recorder.calls == ["f32_linear"]


def test_forced_own_skips_the_timing_and_keeps_the_decisions(recorder):
    chooser = choice.Chooser(None, fake_timer(2.0, 1.0), key=KEY)
    choice.reset(chooser)
    assert choice.use_own("f32", (1, 2), None, None) is False
    chooser.timer = never
    with choice.forced("own"):
        assert choice.use_own("f32", (1, 2), None, None) is True
    assert choice.use_own("f32", (1, 2), None, None) is False  # the measured decision, kept
    with pytest.raises(ValueError, match="forced\\(\\) takes 'own' or 'auto', got 'torch'"):
        with choice.forced("torch"):
            pass


def test_torch_float32_turns_every_own_kernel_off_in_its_thread_only(recorder, monkeypatch):
    monkeypatch.setenv("CYCLELAB_KERNELS", "own")
    choice.reset()  # the mode is read again at the next product
    x, w = torch.randn(1, 40), torch.randn(24, 40)
    q, scale = quantize_symmetric(w, 127)
    inside, outside, errors = threading.Barrier(2), {}, []

    def run(switched: bool):
        try:
            with torch.no_grad():
                if switched:
                    with torch_float32():
                        inside.wait(timeout=30)  # the other thread computes while this one is inside the block
                        outside["f32"] = kernels.f32_linear(x, w)
                        outside["int8"] = int8_linear(x, q, scale.flatten(), None)
                        outside["norm"] = kernels.fused_rms_norm(x, torch.ones(40), 1e-5)
                        inside.wait(timeout=30)
                else:
                    inside.wait(timeout=30)
                    kernels.f32_linear(x, w)
                    int8_linear(x, q, scale.flatten(), None)
                    inside.wait(timeout=30)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(s,)) for s in (True, False)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    assert sorted(recorder.calls) == ["f32_linear", "int8_linear"]  # the other thread's only
    assert torch.equal(outside["f32"], torch.nn.functional.linear(x, w)) and outside["norm"] is None
    torch.testing.assert_close(outside["int8"], torch._weight_int8pack_mm(x, q, scale.flatten()))


def test_doctor_reports_the_choice(monkeypatch):
    from cyclelab.doctor import _own_kernels

    if kernels.compiled() is None:
        pytest.skip("the own kernels are not built here")
    monkeypatch.delenv("CYCLELAB_KERNELS", raising=False)
    choice.reset(choice.Chooser(None, fake_timer(1.0, 2.0), key=KEY))
    try:
        choice.use_own("f32", (1, 2, 3), None, None)
        assert "float32 GEMV: own on 1/1 shapes (own/torch speed 2.00x" in _own_kernels().detail
    finally:
        choice.reset()


def _int8_parts(out: int = 4, k: int = 8):
    q, scale = quantize_symmetric(torch.randn(out, k), 127)
    return q, scale.flatten(), torch.zeros(out)


BAD_INT8 = {
    "float codes": (lambda q, s, b: (q.float(), s, b), TypeError, "codes q must be an int8 tensor, got torch.float32"),
    "non-contiguous q": (lambda q, s, b: (torch.cat([q, q], 1)[:, ::2], s, b), ValueError, "not contiguous"),
    "float64 scale": (
        lambda q, s, b: (q, s.double(), b),
        TypeError,
        "scale must be a float32 tensor, got torch.float64",
    ),
    "short scale": (lambda q, s, b: (q, s[:3], b), ValueError, "the scale must be a contiguous float32 vector of 4"),
    "long bias": (
        lambda q, s, b: (q, s, torch.zeros(5)),
        ValueError,
        "the bias must be a contiguous float32 vector of 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INT8))
def test_the_int8_layer_api_refuses_bad_layers_clearly(case):
    make, error, message = BAD_INT8[case]
    q, scale, bias = make(*_int8_parts())
    with pytest.raises(error, match=message):
        int8_linear(torch.randn(1, 8), q, scale, bias)
    with pytest.raises(error, match=message):
        int8_linears(torch.randn(1, 8), [_int8_parts(), (q, scale, bias)])
    with pytest.raises(error, match=message):  # checked once, when the layer is made
        Int8Linear(q, scale, bias)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_quantize_symmetric_refuses_rows_it_cannot_scale(bad):
    w = torch.randn(5, 8)
    w[3, 2] = bad
    with pytest.raises(ValueError, match=r"1 row\(s\) hold NaN or inf \(the first: row 3\)"):
        quantize_symmetric(w, 127)


def variant_timer(**seconds: float):
    """A timer that runs what it times and reports fixed seconds per side or step variant (own, torch, auto)."""

    def timer(side, run):
        if run is not None:
            run()
        return seconds[side]

    return timer


@pytest.mark.parametrize("winner", ["own", "torch", "auto"])
def test_whole_decode_steps_decide_the_shapes_they_use(winner, tmp_path):
    """Shapes timed alone say torch for one, own for the other; the fastest whole step overrides both (or keeps
    them, when the shapes as chosen alone make the fastest step), and a clear result is kept for later processes."""
    seconds = {"own": 0.003, "torch": 0.003, "auto": 0.003, winner: 0.001}  # fast steps: STEP_REPEATS rounds
    chooser = choice.Chooser(tmp_path / "k", variant_timer(**seconds), key=KEY)
    shapes = {("f32", (1, 8, 4)): (1.0, 2.0), ("int8", (1, 8, 4)): (2.0, 1.0)}
    chooser.timings.update({choice._name(*k): v for k, v in shapes.items()})
    chooser._loaded = True
    used = []

    def step():
        used.append({k: chooser.use_own(*k, None, None) for k in shapes})

    assert chooser.settle_step("step test", step) == winner
    alone = {("f32", (1, 8, 4)): True, ("int8", (1, 8, 4)): False}
    assert used[0] == alone  # the first step: each shape as chosen alone
    assert len(used) == 1 + 3 * (choice.STEP_REPEATS + 1)  # recorded, then each variant warmed up and timed in turns
    step()
    assert {"own": dict.fromkeys(shapes, True), "torch": dict.fromkeys(shapes, False)}.get(winner, alone) == used[-1]
    later = choice.Chooser(tmp_path / "k", never, key=KEY)
    decided = {k: later.use_own(*k, None, None) for k in shapes}
    assert decided == {"own": dict.fromkeys(shapes, True), "torch": dict.fromkeys(shapes, False)}.get(winner, alone)
    assert later.settle_step("step test", never) == winner  # read from the cache: not timed again
    assert f"step test: auto {seconds['auto'] * 1e3:.2f} ms" in "\n".join(later.report_lines())


def test_a_step_is_settled_only_in_auto_with_the_kernels_on(recorder, monkeypatch):
    chooser = choice.Chooser(None, never, key=KEY)
    choice.reset(chooser)
    monkeypatch.setattr(chooser, "settle_step", lambda name, step: step())
    ran = []
    kernels.settle_step("step x", lambda: ran.append("auto"))
    with choice.forced("own"):
        kernels.settle_step("step x", lambda: ran.append("own"))
    with torch_float32():
        kernels.settle_step("step x", lambda: ran.append("torch"))
    assert ran == ["auto"]


def test_a_slow_step_is_timed_in_fewer_rounds(tmp_path):
    chooser = choice.Chooser(tmp_path / "k", variant_timer(own=1.0, torch=2.0, auto=1.5), key=KEY)
    steps = []
    assert chooser.settle_step("step slow", lambda: steps.append(1)) == "own"
    assert len(steps) == 1 + 3 * 3  # recorded, then a warm-up and two timed rounds of each variant


@pytest.mark.parametrize("winner", ["own", "torch"])
def test_the_engine_settles_its_kernels_once_and_keeps_its_tokens(winner, tiny, monkeypatch):
    """Under auto, a run first lets whole decode steps decide (once per engine, on a scratch cache): the
    tokens are those of the own kernels forced, whichever way wins."""
    from cyclelab import Engine

    if kernels.compiled() is None:
        pytest.skip("no C compiler: the own kernels are not built here")
    with choice.forced("own"):
        want = Engine(tiny).generate("ROMEO:", 6, stop_at_eos=False).token_ids
    monkeypatch.setenv("CYCLELAB_KERNELS", "auto")
    seconds = {"own": 0.003, "torch": 0.003, "auto": 0.003, winner: 0.001}
    chooser = choice.Chooser(None, variant_timer(**seconds), key=KEY)
    choice.reset(chooser)
    try:
        engine = Engine(tiny)
        assert engine.generate("ROMEO:", 6, stop_at_eos=False).token_ids == want
        (step,) = chooser.steps.values()
        assert step["winner"] == winner and set(chooser.decided.values()) == {winner == "own"}
        chooser.timer = never
        assert engine.generate("ROMEO:", 6, stop_at_eos=False).token_ids == want  # settled: not timed again
    finally:
        choice.reset()
