"""Bad input, hand-edited traces and lessons, odd workshop folders, int8 and kernels: cases for fault_campaign.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from fault_cases import BASE_TRACE, ENGINE, LESSON, TINY, Refused, _nb, case, cli, copy_data

from cyclelab import Debugger, Sampling, Trace

NAN, INF = float("nan"), float("inf")
# the bad values every numeric argument meets
BAD = {
    "nan": NAN,
    "inf": INF,
    "-inf": -INF,
    "negative": -3,
    "huge": 10**30,
    "a string": "3",
    "None": None,
    "a list": [1],
    "a bool": True,
    "a tensor": torch.tensor([1.0, 2.0]),
    "a complex": 1j,
}


def bad_input_cases() -> list:
    cases = []
    # Sampling settings
    ok_values = {
        "temperature": {"huge", "a bool"},
        "top_k": {"huge"},
        "top_p": set(),
        "min_p": set(),
        "repetition_penalty": {"huge"},
        "seed": {"huge", "negative"},
    }
    for setting, fine in ok_values.items():
        for label, value in BAD.items():
            if label == "None" and setting in ("top_k", "top_p", "min_p", "seed"):
                continue  # None is the documented "off"
            expect = "either" if label in fine else "error"
            cases.append(case(f"generate with sampling {setting}={label}", "bad input",
                              lambda ctx, s=setting, v=value: ENGINE.generate(
                                  "ROMEO:", 2, sampling={"do_sample": True, s: v}).token_ids,
                              expect=expect, names=(setting,),
                              check=lambda ids: all(0 <= t < ENGINE.vocab_size for t in ids)))  # fmt: skip
    # generate's own arguments
    for label, value in BAD.items():
        cases.append(case(f"generate max_new_tokens={label}", "bad input",
                          lambda ctx, v=value: ENGINE.generate("ROMEO:", v).token_ids, names=("max_new_tokens",)))  # fmt: skip
    prompts = {
        "empty string": "",
        "None": None,
        "a float": 1.5,
        "token id past the vocabulary": [10**6],
        "negative token id": [-1],
        "a 2-D tensor": torch.zeros(2, 2, dtype=torch.long),
        "a float tensor": torch.tensor([1.5]),
        "nested lists": [[1, 2]],
        "a lone surrogate": "\ud800",
        "a prompt longer than the context": "a " * 5000,
        "bytes": b"ROMEO:",
        "a bool list": [True, False],
        "numpy ids": np.array([5, 6]),
    }
    for label, prompt in prompts.items():
        ok = label in ("numpy ids",)
        cases.append(case(f"generate with prompt {label}", "bad input",
                          lambda ctx, p=prompt: ENGINE.generate(p, 2).token_ids, names=("prompt",),
                          expect="either" if ok else "error"))  # fmt: skip
    options = {
        "use_cache": "yes",
        "keep_events": 2,
        "force": [10**7],
        "stop_at_eos": None,
        "draws": -1,
        "chat": "no",
        "capture": 12,
        "ablation": "all",
    }
    for option, value in options.items():
        cases.append(case(f"generate with {option}={value!r}", "bad input",
                          lambda ctx, o=option, v=value: ENGINE.generate("ROMEO:", 2, **{o: v}).token_ids,
                          names=(option,)))  # fmt: skip
    cases.append(case("generate with an unknown option", "bad input",
                      lambda ctx: ENGINE.generate("ROMEO:", 2, temprature=0.5), names=("temprature",)))  # fmt: skip
    # logits / encode / branch / replay
    logits_inputs = {"float ids": torch.tensor([[1.5]]), "empty": torch.zeros(1, 0, dtype=torch.long),
                     "3-D": torch.zeros(1, 1, 1, dtype=torch.long), "past vocab": torch.tensor([[10**6]]),
                     "a string": "ROMEO"}  # fmt: skip
    for label, ids in logits_inputs.items():
        cases.append(case(f"engine.logits with {label}", "bad input", lambda ctx, i=ids: ENGINE.logits(i).shape,
                          names=("ids",)))  # fmt: skip
    for label, at in {"cycle past the end": 99, "negative cycle": -1, "a float cycle": 1.5, "None": None}.items():
        cases.append(case(f"engine.branch at {label}", "bad input",
                          lambda ctx, a=at: ENGINE.branch(BASE_TRACE, a, 5).token_ids, names=("cycle",)))  # fmt: skip
    cases.append(case("replay a trace of another model", "bad input",
                      lambda ctx: ENGINE.replay(_other_model_trace()).token_ids, names=("model",)))  # fmt: skip
    cases.append(case("replay something that is not a trace", "bad input", lambda ctx: ENGINE.replay({"a": 1}),
                      names=("trace",)))  # fmt: skip
    # the debugger
    dbg_calls = {
        "run_to(-1)": lambda d: d.run_to(-1),
        "run_to(nan)": lambda d: d.run_to(NAN),
        "choose(rank=10**9)": lambda d: d.choose(10**9),
        "choose(token_id=-5)": lambda d: d.choose(token_id=-5),
        "ablate_head(99, 0)": lambda d: d.ablate_head(99, 0),
        "ablate_head(0, 99)": lambda d: d.ablate_head(0, 99),
        "ablate_head('0', 0)": lambda d: d.ablate_head("0", 0),
        "switch_branch(5)": lambda d: d.switch_branch(5),
        "break_below(nan)": lambda d: d.break_below(NAN),
        "break_below(2)": lambda d: d.break_below(2),
        "break_entropy_above(-1)": lambda d: d.break_entropy_above(-1),
        "break_on_token(10**9)": lambda d: d.break_on_token(10**9),
        "break_on_token('')": lambda d: d.break_on_token(""),
        "break_at(layer=99)": lambda d: d.break_at(layer=99),
        "break_at(op='nosuch')": lambda d: d.break_at(op="nosuch"),
        "break_on_lens_change(-1)": lambda d: d.break_on_lens_change(-1),
        "set_sampling(temperature=-1)": lambda d: d.set_sampling(do_sample=True, temperature=-1),
        "set_sampling(colour=1)": lambda d: d.set_sampling(colour=1),
    }
    names = {"run_to": "n", "choose(r": "token", "choose(t": "token", "ablate_head(9": "layer", "ablate_head(0": "head",
             "ablate_head('": "layer", "switch": "branch", "break_below": "p", "break_entropy": "h",
             "break_on_token": "token", "break_at(l": "layer", "break_at(o": "op", "break_on_lens": "layer",
             "set_sampling(t": "temperature", "set_sampling(c": "colour"}  # fmt: skip
    for label, call in dbg_calls.items():
        name = next(v for k, v in names.items() if label.startswith(k))
        cases.append(case(f"debugger {label}", "bad input", lambda ctx, c=call: c(Debugger(ENGINE, "ROMEO:", 4)),
                          names=(name,)))  # fmt: skip
    for label, value in {"max_new_tokens=0.5": {"max_new_tokens": 0.5}, "sampling='hot'": {"sampling": "hot"},
                         "engine='nosuch'": {"engine": "nosuch"}}.items():  # fmt: skip
        kwargs = {"engine": ENGINE, "prompt": "ROMEO:", **value}
        cases.append(case(f"Debugger({label})", "bad input", lambda ctx, k=kwargs: Debugger(**k),
                          names=(label.split("=")[0],) if "engine" not in label else ("nosuch",)))  # fmt: skip
    # load()
    load_args = {"dtype=torch.int8": {"dtype": torch.int8}, "dtype='float32'": {"dtype": "float32"},
                 "attn='flash'": {"attn": "flash"}, "quantize='int4'": {"quantize": "int4"},
                 "quantize='int8', dtype=float16": {"quantize": "int8", "dtype": torch.float16},
                 "device='tpu'": {"device": "tpu"}, "device=7": {"device": 7}}  # fmt: skip
    for label, kwargs in load_args.items():
        from cyclelab import load

        cases.append(case(f"load('tiny', {label})", "bad input", lambda ctx, k=kwargs: repr(load("tiny", **k)),
                          names=(label.split("=")[0],)))  # fmt: skip
    for label, name in {"''": "", "None": None, "'nosuch'": "nosuch", "a folder without a model": "/tmp",
                        "a file": "/etc/hostname", "3": 3}.items():  # fmt: skip
        cases.append(case(f"load({label})", "bad input", lambda ctx, n=name: repr(load(n)), names=()))
    # Sampling constructor directly and Sampling.sample
    from cyclelab.core.sampling import sample as decode_sample

    logits_bad = {"nan logits": torch.full((50,), NAN), "inf logits": torch.full((50,), INF),
                  "int logits": torch.arange(50), "2-D batch": torch.zeros(3, 50), "empty": torch.zeros(0),
                  "all -inf": torch.full((50,), -INF)}  # fmt: skip
    for label, logits in logits_bad.items():
        cases.append(case(f"sample() with {label}", "bad input",
                          lambda ctx, x=logits: decode_sample(x, Sampling(do_sample=True, seed=1)),
                          names=("logit",)))  # fmt: skip
    return cases


def _other_model_trace() -> Trace:
    raw = BASE_TRACE.to_dict()
    raw["model"] = "smollm2"
    raw["fingerprint"] = {}
    return Trace.from_dict(raw) if hasattr(Trace, "from_dict") else _via_file(raw)


def _via_file(raw: dict) -> Trace:
    path = Path("other.json")
    path.write_text(json.dumps(raw))
    return Trace.load(path)


# ------------------------------------------------------------------ hand-edited trace and lesson files
def _edits(raw: dict, record_key: str) -> dict:
    """Hand edits of a JSON document: (name -> edited text or dict)."""
    first = next(iter(raw))
    edits = {
        "empty file": "",
        "truncated": json.dumps(raw)[: len(json.dumps(raw)) // 2],
        "not JSON": "hello",
        "a JSON list": "[1, 2]",
        "NaN literal": json.dumps(raw).replace("{", '{"x": NaN, ', 1),
        "nested 100000 deep": "[" * 100000 + "]" * 100000,
        "UTF-8 BOM": "\ufeff" + json.dumps(raw),
        "Latin-1 bytes": json.dumps(raw).encode() + b"\xe9",
        f"{first} removed": {k: v for k, v in raw.items() if k != first},
        "an unknown key": {**raw, "colour": "red"},
        "a duplicated key": json.dumps(raw)[:-1] + f', "{first}": {json.dumps(raw[first])}}}',
    }
    for key, value in raw.items():
        for label, bad in (("null", None), ("a string", "x"), ("-1", -1), ("1e308", 1e308), ("a list", [])):
            if value == bad:
                continue
            edits[f"{key} set to {label}"] = {**raw, key: bad}
    return edits


def file_edit_cases(tmp: Path) -> list:
    cases = []
    trace_raw = BASE_TRACE.to_dict()
    lesson_raw = json.loads(LESSON.read_text())
    harmless = {  # a BOM is read; a renamed title or an empty list of pauses is still a lesson that replays
        "trace": {"UTF-8 BOM", "model set to a string"},
        "lesson": {"UTF-8 BOM", "title set to a string", "pauses set to a list", "interventions set to a list"},
    }
    for kind, raw, opener in (("trace", trace_raw, _open_trace), ("lesson", lesson_raw, _open_lesson)):
        for label, edited in _edits(raw, "records").items():
            expect = "either" if label in harmless[kind] else "error"

            def setup(ctx, edited=edited, kind=kind):
                path = ctx["dir"] / f"hand.{kind}.json"
                if isinstance(edited, bytes):
                    path.write_bytes(edited)
                else:
                    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))

            cases.append(case(f"{kind} file with {label}", "hand-edited files",
                              lambda ctx, o=opener, k=kind: o(ctx["dir"] / f"hand.{k}.json"), expect=expect,
                              names=(kind,), setup=setup))  # fmt: skip
    # record-level edits of a trace
    rec = trace_raw["records"][0]
    for key in rec:
        for label, bad in (("null", None), ("-1", -1), ("a string", "x"), ("NaN", "NaN")):
            if rec[key] == bad:
                continue  # no change

            def setup(ctx, key=key, bad=bad):
                raw = json.loads(json.dumps(trace_raw))
                raw["records"][0][key] = bad
                text = json.dumps(raw).replace('"NaN"', "NaN")
                (ctx["dir"] / "hand.trace.json").write_text(text)

            cases.append(case(f"trace record {key} set to {label}", "hand-edited files",
                              lambda ctx: _open_trace(ctx["dir"] / "hand.trace.json"), names=("trace",),
                              setup=setup, expect="error"))  # fmt: skip
    for label, path in {"missing": "nosuch.json", "a folder": ".", "a symlink loop": "loop.json"}.items():

        def setup(ctx):
            (ctx["dir"] / "loop.json").symlink_to("loop.json")

        for kind, opener in (("trace", _open_trace), ("lesson", _open_lesson)):
            cases.append(case(f"{kind} file {label}", "hand-edited files", lambda ctx, o=opener, p=path: o(ctx["dir"] / p),
                              names=(Path(path).name if path != "." else "",), setup=setup))  # fmt: skip
    return cases


def _open_trace(path: Path):
    trace = Trace.load(path)
    return ENGINE.replay(trace).token_ids


def _open_lesson(path: Path):
    from cyclelab.workshop.lessons import Lesson

    lesson = Lesson.load(path)
    run = lesson.open(ENGINE)
    for _ in range(len(lesson.pauses) + 1):  # replay to the end: the recorded tokens are checked on the way
        run.next_pause()
    return run.debugger.token_ids


# ------------------------------------------------------------------ workshop folders
def workshop_cases() -> list:
    cases = []

    def grade(*extra):  # a path for each argument but the values of --timeout and --jobs
        def paths(ctx):
            return [e if e.startswith("-") or before in ("--timeout", "--jobs") else str(ctx["dir"] / e)
                    for before, e in zip(("",) + extra, extra)]  # fmt: skip

        return lambda ctx: cli("grade", *paths(ctx))

    folders = {
        "a missing folder": (None, ("nosuch", "--out", "g.csv")),
        "a file": (lambda d: (d / "sub").write_text("x"), ("sub", "--out", "g.csv")),
        "an empty folder": (lambda d: (d / "sub").mkdir(), ("sub", "--out", "g.csv")),
        "a symlink loop": (lambda d: (d / "sub").symlink_to("sub"), ("sub", "--out", "g.csv")),
        "an unreadable folder": (lambda d: ((d / "sub").mkdir(), (d / "sub").chmod(0)), ("sub", "--out", "g.csv")),
        "a notebook that is not JSON": (
            lambda d: _nb(d, "sub/ann/01_clock_cycle.ipynb", "{"),
            ("sub", "--out", "g.csv"),
        ),
        "an empty notebook": (lambda d: _nb(d, "sub/ann/01_clock_cycle.ipynb", ""), ("sub", "--out", "g.csv")),
        "a notebook named like no chapter": (lambda d: _nb(d, "sub/ann/zz.ipynb", "{}"), ("sub", "--out", "g.csv")),
        "a learner name with a newline": (
            lambda d: _nb(d, "sub/a\nb/01_clock_cycle.ipynb", "{"),
            ("sub", "--out", "g.csv"),
        ),
        "--out a folder": (lambda d: (d / "sub").mkdir(), ("sub", "--out", "sub")),
        "--out under a file": (lambda d: ((d / "sub").mkdir(), (d / "f").write_text("")), ("sub", "--out", "f/g.csv")),
        "--timeout -1": (lambda d: (d / "sub").mkdir(), ("sub", "--timeout", "-1")),
        "--timeout nan": (lambda d: (d / "sub").mkdir(), ("sub", "--timeout", "nan")),
        "--jobs 0": (lambda d: (d / "sub").mkdir(), ("sub", "--jobs", "0")),
        "--course missing": (lambda d: (d / "sub").mkdir(), ("sub", "--course", "nosuch")),
    }
    for label, (setup, argv) in folders.items():
        fine = label in ("an empty folder", "a notebook that is not JSON", "an empty notebook",
                         "a notebook named like no chapter", "a learner name with a newline")  # fmt: skip
        cases.append(case(f"grade on {label}", "workshop folders", grade(*argv), expect="either" if fine else "error",
                          setup=(lambda ctx, s=setup: s(ctx["dir"])) if setup else None,
                          user="nobody" if "unreadable" in label else None, timeout=120))  # fmt: skip
    student = {
        "OUT an existing file": (lambda d: (d / "out").write_text("x"), "out"),
        "OUT inside the course's notebooks": (None, str(Path(__file__).resolve().parents[1] / "notebooks" / "x")),
        "OUT under a read-only folder": (lambda d: ((d / "ro").mkdir(), (d / "ro").chmod(0o555)), "ro/out"),
    }
    for label, (setup, out) in student.items():
        cases.append(case(f"edition student with {label}", "workshop folders",
                          lambda ctx, o=out: cli("edition", "student", str(ctx["dir"] / o)), names=("out",),
                          setup=(lambda ctx, s=setup: s(ctx["dir"])) if setup else None,
                          user="nobody" if "read-only" in label else None, timeout=120))  # fmt: skip
    annotate = {"a missing notebook": "nosuch.ipynb", "a folder": ".", "not a notebook": "x.txt"}
    for label, name in annotate.items():
        cases.append(case(f"edition annotate on {label}", "workshop folders",
                          lambda ctx, n=name: cli("edition", "annotate", str(ctx["dir"] / n)), names=(),
                          setup=lambda ctx: (ctx["dir"] / "x.txt").write_text("hello")))  # fmt: skip
    return cases


# ------------------------------------------------------------------ int8 and kernels
def int8_cases() -> list:
    from cyclelab.kernels import int8_linear, quantize_symmetric, to_int8

    cases = []
    w = torch.randn(8, 16)
    tensors = {"nan": torch.full((8, 16), NAN), "inf": torch.full((8, 16), INF), "int": torch.ones(8, 16, dtype=torch.int32),
               "1-D": torch.randn(16), "3-D": torch.randn(2, 8, 16), "empty": torch.zeros(0, 16),
               "float64": torch.randn(8, 16, dtype=torch.float64), "a list": [[1.0]]}  # fmt: skip
    for label, t in tensors.items():
        cases.append(case(f"quantize_symmetric with {label} weights", "int8",
                          lambda ctx, t=t: quantize_symmetric(t, 127), names=("w",) if label != "float64" else (),
                          expect="either" if label in ("float64", "1-D", "3-D") else "error",
                          check=lambda v: torch.isfinite(v[1]).all().item()))  # fmt: skip
    for levels in (0, -1, 1000, 1.5, NAN):
        cases.append(case(f"quantize_symmetric with levels={levels}", "int8",
                          lambda ctx, n=levels: quantize_symmetric(w, n), names=("levels",)))  # fmt: skip
    q, scale = quantize_symmetric(w, 127)
    scale = scale.reshape(-1).contiguous()
    lin = {"x wrong width": (torch.randn(1, 5), q, scale), "x nan": (torch.full((1, 16), NAN), q, scale),
           "q float": (torch.randn(1, 16), q.float(), scale), "scale wrong length": (torch.randn(1, 16), q, scale[:3]),
           "x float64": (torch.randn(1, 16, dtype=torch.float64), q, scale),
           "scale nan": (torch.randn(1, 16), q, torch.full_like(scale, NAN)),
           "x a list": ([1.0] * 16, q, scale)}  # fmt: skip
    for label, (x, qq, ss) in lin.items():
        nan_in = label.endswith("nan")  # NaN in, NaN out (as torch's linear): not a wrong number
        cases.append(case(f"int8_linear with {label}", "int8", lambda ctx, a=(x, qq, ss): int8_linear(*a, None),
                          names=() if label.startswith("x") else (label.split()[0],),
                          expect="either" if nan_in else "error", check=lambda v: torch.isnan(v).all().item()))  # fmt: skip
    cases.append(case("to_int8 on something not a model", "int8", lambda ctx: to_int8("tiny"), names=("model",)))
    cases.append(case("to_int8 twice", "int8", lambda ctx: repr(to_int8(to_int8(_copy_tiny()))), expect="either"))
    cases.append(case("to_int8 of a float16 model", "int8", lambda ctx: repr(to_int8(_copy_tiny().half())),
                      names=("float",)))  # fmt: skip
    cases.append(case("int8 engine generates like float", "int8",
                      lambda ctx: _int8_generates(), expect="ok", check=bool))  # fmt: skip
    return cases


def _copy_tiny():
    import copy

    return copy.deepcopy(TINY.model)


def _int8_generates() -> bool:
    from cyclelab import Engine, load

    engine = Engine(load("tiny", quantize="int8"))
    return len(engine.generate("ROMEO:", 4).token_ids) == 4


def kernel_cases() -> list:
    from cyclelab.kernels import f32_linear, fused_rms_norm, fused_softmax

    cases = []
    for label, value in {"bogus": "bogus", "empty": "", "OWN": "OWN"}.items():

        def call(ctx, v=value):
            import os
            import subprocess
            import sys

            env = dict(os.environ, CYCLELAB_KERNELS=v)
            code = "from cyclelab import load, Engine; print(Engine(load('tiny')).generate('ROMEO:', 2).token_ids)"
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=200)
            if out.returncode:
                raise Refused(out.stderr.strip()[-800:])
            return out.stdout + out.stderr[-300:]

        # an unknown value falls back to 'auto' (the same numbers) with a warning naming the variable and its choices
        warned = (lambda v: "is not one of auto, own, torch" in v) if label == "bogus" else (lambda v: "[" in v)
        cases.append(case(f"CYCLELAB_KERNELS={label}", "kernels", call, expect="ok", check=warned, timeout=240,
                          slow=True))  # fmt: skip
    shapes = {"x wrong width": (torch.randn(1, 5), torch.randn(8, 16)), "w 1-D": (torch.randn(1, 16), torch.randn(16)),
              "x int": (torch.ones(1, 16, dtype=torch.long), torch.randn(8, 16)),
              "x nan": (torch.full((1, 16), NAN), torch.randn(8, 16))}  # fmt: skip
    for label, (x, wt) in shapes.items():
        expect = "either" if label == "x nan" else "error"
        cases.append(case(f"f32_linear with {label}", "kernels", lambda ctx, a=(x, wt): f32_linear(*a), expect=expect,
                          names=(label.split()[0],), check=lambda v: torch.isnan(v).all().item()))  # fmt: skip
    cases.append(case("fused_rms_norm with a weight of the wrong width: None, the caller's formula runs", "kernels",
                      lambda ctx: fused_rms_norm(torch.randn(1, 16), torch.ones(5), 1e-5), expect="ok",
                      check=lambda v: v is None))  # fmt: skip
    cases.append(case("fused_rms_norm with eps nan", "kernels",
                      lambda ctx: fused_rms_norm(torch.randn(1, 16), torch.ones(16), NAN), names=("eps",)))  # fmt: skip
    cases.append(case("fused_softmax of a string", "kernels", lambda ctx: fused_softmax("x"), names=("scores",)))

    def damaged_library(how):
        def call(ctx):
            import os
            import subprocess
            import sys

            from cyclelab.kernels import build

            found = build.status()
            if found.library is None:
                raise Refused("no compiled kernel library here: nothing to damage")
            home = ctx["dir"] / "home"
            env = dict(os.environ, XDG_CACHE_HOME=str(home), CYCLELAB_KERNELS="own")
            code = "from cyclelab.kernels import build; s = build.status(); print(s.line())"
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=200)
            libs = [p for p in home.rglob("*.so")]
            for lib in libs:
                if how == "truncate":
                    os.truncate(lib, 100)
                elif how == "world-writable":
                    lib.chmod(0o777)
            code = "from cyclelab import load, Engine; print(Engine(load('tiny')).generate('ROMEO:', 2).token_ids)"
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=200)
            if out.returncode:
                raise Refused(out.stderr.strip()[-800:])
            return f"{len(libs)} libraries; " + out.stdout + out.stderr[-300:]

        return call

    for how in ("truncate", "world-writable"):
        # (the case's folder is mode 777, so the build is refused before any library exists: what this checks
        # is that refusal's warning and the fallback to torch; a damaged built library is tests/test_kernel_build.py's)
        cases.append(case(f"own kernels under a world-writable folder ({how} any library built)", "kernels", damaged_library(how), expect="either",
                          check=lambda v: v.startswith(("0", "1", "2")) and "[" in v, names=("kernel",),
                          timeout=400, slow=True))  # fmt: skip
    return cases


def all_cases(base: Path) -> list:
    from fault_cases import concurrency_cases, disk_cases, integrity_cases, permission_cases, smollm2_cases

    return (
        integrity_cases()
        + smollm2_cases()
        + permission_cases()
        + disk_cases()
        + concurrency_cases()
        + bad_input_cases()
        + file_edit_cases(base)
        + workshop_cases()
        + int8_cases()
        + kernel_cases()
    )


__all__ = ["all_cases", "math", "copy_data"]
