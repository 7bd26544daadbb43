"""Bad input gets a clear error: one row per case, asserting the exception type and a message
that names the problem (the argument, file or field). No row may pass silently or fail deep inside.

The rows are grouped by category (docs/testing.md's Reliability section counts them):
prompts, lengths, sampling, run options, forced tokens and branches, ablation, trace files,
quantization, constructors and the debugger's commands.
"""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from cyclelab import Debugger, Engine, Loaded, Sampling, Trace, ablation, load
from cyclelab.core.blocks import Ablation
from cyclelab.core.engine import drain
from cyclelab.core.fingerprint import fingerprint
from cyclelab.core.sampling import apply_repetition_penalty, apply_temperature, as_sampling
from cyclelab.core.sampling import sample as decode_sample
from cyclelab.kernels import f32_linear, fused_rms_norm, fused_softmax, quantize_symmetric
from cyclelab.lab.quantize import int8_linear_of, to_int8

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def base(tiny_engine):
    """A 6-token greedy trace of tiny, and its file as plain data."""
    return tiny_engine.generate(PROMPT, 6, stop_at_eos=False)


@pytest.fixture
def c(tiny_engine, base, tmp_path, request):
    """What a row needs: the engine, a trace, a scratch folder, smollm2's engine on demand."""
    return SimpleNamespace(
        e=tiny_engine, trace=base, tmp=tmp_path, smollm2=lambda: request.getfixturevalue("smollm2_engine")
    )


def gen(c, prompt=PROMPT, n=2, **options):
    return c.e.generate(prompt, n, **options)


def sample(c, **settings):
    return c.e.generate(PROMPT, 2, do_sample=True, **settings)


def run(c, **options):
    return drain(c.e.run(PROMPT, 2, **options))


def trace_file(c, change=None, text=None) -> Trace:
    """Save the base trace, change its JSON (a function of the dict) or replace the whole text, load it."""
    path = c.tmp / "trace.json"
    raw = json.loads(json.dumps(c.trace.to_dict()))  # a copy: the changes must not reach the trace
    if change is not None:
        change(raw)
    path.write_text(text if text is not None else json.dumps(raw), encoding="utf-8", errors="surrogateescape")
    return Trace.load(path)


def setter(*keys_and_value):
    """A change to a trace dict: ``setter("records", 0, "prob", "high")`` sets raw["records"][0]["prob"]."""
    *keys, last, value = keys_and_value

    def change(raw):
        for k in keys:
            raw = raw[k]
        raw[last] = value

    return change


def deleter(*keys):
    def change(raw):
        for k in keys[:-1]:
            raw = raw[k]
        del raw[keys[-1]]

    return change


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


PROMPT_TYPES = "a str, a list or tuple of token ids"
FILE = r"trace\.json"

R = pytest.param
ROWS = [
    # ---------------------------------------------------------------- prompts
    R(lambda c: c.e.encode([5.7, 10.2]), TypeError, PROMPT_TYPES + r".*5\.7", id="prompt-float-ids"),
    R(lambda c: c.e.encode([5, 10.0]), TypeError, r"10\.0 \(float\)", id="prompt-one-float-id"),
    R(lambda c: c.e.encode(torch.tensor([[5, 6], [7, 8]])), TypeError, r"shape \(2, 2\)", id="prompt-2d-tensor"),
    R(lambda c: c.e.encode(torch.tensor(5)), TypeError, r"shape \(\)", id="prompt-0d-tensor"),
    R(lambda c: c.e.encode(torch.tensor([5.0, 6.0])), TypeError, r"dtype torch\.float32", id="prompt-float-tensor"),
    R(lambda c: c.e.encode(torch.tensor([True, False])), TypeError, r"dtype torch\.bool", id="prompt-bool-tensor"),
    R(lambda c: c.e.encode(b"ROMEO:"), TypeError, PROMPT_TYPES + r".*got bytes", id="prompt-bytes"),
    R(lambda c: c.e.encode(bytearray(b"ROMEO")), TypeError, r"got bytearray", id="prompt-bytearray"),
    R(lambda c: c.e.encode([True, False]), TypeError, r"True \(bool\)", id="prompt-bools"),
    R(lambda c: c.e.encode(["12"]), TypeError, r"'12' \(str\)", id="prompt-digit-strings"),
    R(lambda c: c.e.encode([[5, 6]]), TypeError, r"\[5, 6\] \(list\)", id="prompt-nested-list"),
    R(lambda c: c.e.encode([5, None]), TypeError, r"None \(NoneType\)", id="prompt-none-in-list"),
    R(lambda c: c.e.encode(None), TypeError, PROMPT_TYPES + r".*got NoneType", id="prompt-none"),
    R(lambda c: c.e.encode(42), TypeError, r"got int", id="prompt-bare-int"),
    R(lambda c: c.e.encode({5, 6}), TypeError, r"got set", id="prompt-set"),
    R(lambda c: c.e.encode(iter([5, 6])), TypeError, r"got list_iterator", id="prompt-iterator"),
    R(lambda c: c.e.encode("\ud800"), ValueError, r"not valid Unicode.*'\\ud800'", id="prompt-lone-surrogate"),
    R(lambda c: c.e.encode("ROMEO \udfff:"), ValueError, r"character 6 is '\\udfff'", id="prompt-surrogate-inside"),
    R(lambda c: c.e.encode(""), ValueError, r"prompt is empty", id="prompt-empty-string"),
    R(lambda c: c.e.encode(" \n\t"), ValueError, r"prompt is empty", id="prompt-whitespace"),
    R(lambda c: c.e.encode([]), ValueError, r"no tokens", id="prompt-empty-list"),
    R(lambda c: c.e.encode(torch.tensor([], dtype=torch.long)), ValueError, r"no tokens", id="prompt-empty-tensor"),
    R(
        lambda c: c.e.encode([4096]),
        ValueError,
        r"\[4096\] outside the vocabulary \(ids 0\.\.4095\)",
        id="prompt-id-vocab",
    ),
    R(lambda c: c.e.encode([-1, 5]), ValueError, r"\[-1\] outside the vocabulary", id="prompt-id-negative"),
    R(
        lambda c: c.e.encode(torch.tensor([5, 10**6])),
        ValueError,
        r"outside the vocabulary",
        id="prompt-tensor-id-vocab",
    ),
    R(lambda c: c.e.encode([5, 6], chat=True), ValueError, r"chat=True .*as text", id="prompt-ids-with-chat"),
    R(lambda c: c.e.encode(PROMPT, chat="yes"), TypeError, r"chat must be True or False", id="prompt-chat-not-bool"),
    R(
        lambda c: c.e.encode(PROMPT, chat=True),
        ValueError,
        r"'tiny' has no chat template",
        id="prompt-chat-no-template",
    ),
    R(lambda c: gen(c, prompt=[5.7, 10.2]), TypeError, r"5\.7 \(float\)", id="generate-float-ids"),
    R(lambda c: gen(c, prompt=None), TypeError, r"got NoneType", id="generate-none"),
    R(lambda c: run(c, chat=1), TypeError, r"chat must be True or False", id="run-chat-int"),
    R(lambda c: c.e.logits([5.5, 6.0]), TypeError, r"input_ids must be integer .*float", id="logits-float-ids"),
    R(lambda c: c.e.logits(["a"]), TypeError, r"input_ids must be token ids", id="logits-strings"),
    R(lambda c: c.e.logits([[5, 6], [7]]), TypeError, r"input_ids must be token ids", id="logits-ragged"),
    R(lambda c: c.e.logits([5, 4096]), ValueError, r"input_ids: \[4096\] outside the vocabulary", id="logits-id-vocab"),
    R(lambda c: c.e.logits(torch.tensor([[True]])), TypeError, r"dtype torch\.bool", id="logits-bool-tensor"),
    # ---------------------------------------------------------------- lengths
    R(lambda c: gen(c, n=True), TypeError, r"max_new_tokens must be an integer, got True", id="length-bool"),
    R(lambda c: gen(c, n=2.0), TypeError, r"max_new_tokens must be an integer, got 2\.0", id="length-float"),
    R(lambda c: gen(c, n="3"), TypeError, r"max_new_tokens must be an integer, got '3'", id="length-string"),
    R(lambda c: gen(c, n=None), TypeError, r"max_new_tokens must be an integer, got None", id="length-none"),
    R(lambda c: gen(c, n=0), ValueError, r"max_new_tokens must be an integer >= 1, got 0", id="length-zero"),
    R(lambda c: gen(c, n=-5), ValueError, r"max_new_tokens must be an integer >= 1", id="length-negative"),
    R(lambda c: gen(c, n=10**9), ValueError, r"exceeds 'tiny''s context window of 256", id="length-past-window"),
    R(
        lambda c: gen(c, prompt=[5] * 256, n=1),
        ValueError,
        r"prompt \(256 tokens\).*context window",
        id="length-prompt-fills-window",
    ),
    R(
        lambda c: c.e.logits([5] * 257),
        ValueError,
        r"257 positions exceed the context window",
        id="length-logits-window",
    ),
    # ---------------------------------------------------------------- sampling
    R(
        lambda c: gen(c, do_sample="no"),
        TypeError,
        r"do_sample must be True or False, got 'no'",
        id="sampling-do-sample-string",
    ),
    R(lambda c: gen(c, do_sample=1), TypeError, r"do_sample must be True or False, got 1", id="sampling-do-sample-int"),
    R(lambda c: gen(c, do_sample=None), TypeError, r"do_sample must be True or False", id="sampling-do-sample-none"),
    R(
        lambda c: sample(c, temperature=0.0),
        ValueError,
        r"temperature must be a finite number > 0",
        id="sampling-temperature-zero",
    ),
    R(
        lambda c: sample(c, temperature=-0.5),
        ValueError,
        r"temperature must be a finite number > 0",
        id="sampling-temperature-negative",
    ),
    R(
        lambda c: sample(c, temperature=math.nan),
        ValueError,
        r"temperature must be a finite",
        id="sampling-temperature-nan",
    ),
    R(
        lambda c: sample(c, temperature=math.inf),
        ValueError,
        r"temperature must be a finite",
        id="sampling-temperature-inf",
    ),
    R(
        lambda c: sample(c, temperature="hot"),
        TypeError,
        r"temperature must be a number, got 'hot'",
        id="sampling-temperature-string",
    ),
    R(
        lambda c: sample(c, temperature=True),
        TypeError,
        r"temperature must be a number, got True",
        id="sampling-temperature-bool",
    ),
    R(
        lambda c: sample(c, temperature=1e-300, seed=0),
        ValueError,
        r"temperature 1e-300 is too small",
        id="sampling-temperature-overflow",
    ),
    R(lambda c: sample(c, top_k=0), ValueError, r"top_k must be an integer >= 1", id="sampling-top-k-zero"),
    R(lambda c: sample(c, top_k=-3), ValueError, r"top_k must be an integer >= 1", id="sampling-top-k-negative"),
    R(lambda c: sample(c, top_k=2.5), TypeError, r"top_k must be an integer, got 2\.5", id="sampling-top-k-float"),
    R(lambda c: sample(c, top_k=True), TypeError, r"top_k must be an integer, got True", id="sampling-top-k-bool"),
    R(lambda c: sample(c, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]", id="sampling-top-p-zero"),
    R(lambda c: sample(c, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]", id="sampling-top-p-above-one"),
    R(lambda c: sample(c, top_p=math.nan), ValueError, r"top_p must be in \(0, 1\]", id="sampling-top-p-nan"),
    R(lambda c: sample(c, top_p=True), TypeError, r"top_p must be a number, got True", id="sampling-top-p-bool"),
    R(lambda c: sample(c, top_p="0.9"), TypeError, r"top_p must be a number", id="sampling-top-p-string"),
    R(lambda c: sample(c, min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]", id="sampling-min-p-negative"),
    R(lambda c: sample(c, min_p=1.5), ValueError, r"min_p must be in \[0, 1\]", id="sampling-min-p-above-one"),
    R(lambda c: sample(c, min_p=math.nan), ValueError, r"min_p must be in \[0, 1\]", id="sampling-min-p-nan"),
    R(lambda c: sample(c, min_p=True), TypeError, r"min_p must be a number, got True", id="sampling-min-p-bool"),
    R(lambda c: sample(c, min_p="0.1"), TypeError, r"min_p must be a number", id="sampling-min-p-string"),
    R(lambda c: gen(c, sampling={"min_p": 2}), ValueError, r"min_p must be in \[0, 1\]", id="sampling-min-p-dict"),
    R(
        lambda c: gen(c, repetition_penalty=0),
        ValueError,
        r"repetition_penalty must be a finite number > 0",
        id="sampling-penalty-zero",
    ),
    R(
        lambda c: gen(c, repetition_penalty=-1.2),
        ValueError,
        r"repetition_penalty must be a finite number > 0",
        id="sampling-penalty-negative",
    ),
    R(
        lambda c: gen(c, repetition_penalty=math.inf),
        ValueError,
        r"repetition_penalty must be a finite",
        id="sampling-penalty-inf",
    ),
    R(
        lambda c: gen(c, repetition_penalty=False),
        TypeError,
        r"repetition_penalty must be a number",
        id="sampling-penalty-bool",
    ),
    R(
        lambda c: sample(c, seed=-1),
        ValueError,
        r"seed must be an integer from 0 to 2\*\*64 - 1",
        id="sampling-seed-negative",
    ),
    R(lambda c: sample(c, seed=2**64), ValueError, r"seed must be an integer from 0", id="sampling-seed-too-large"),
    R(lambda c: sample(c, seed=1.5), TypeError, r"seed must be an integer, got 1\.5", id="sampling-seed-float"),
    R(lambda c: sample(c, seed=True), TypeError, r"seed must be an integer, got True", id="sampling-seed-bool"),
    R(lambda c: sample(c, seed="7"), TypeError, r"seed must be an integer, got '7'", id="sampling-seed-string"),
    R(
        lambda c: gen(c, sampling=Sampling(), do_sample=True),
        ValueError,
        r"either as keywords or as sampling=",
        id="sampling-both-ways",
    ),
    R(
        lambda c: gen(c, sampling={"temprature": 0.5}),
        ValueError,
        r"unknown sampling setting\(s\) \['temprature'\]",
        id="sampling-dict-typo",
    ),
    R(lambda c: gen(c, sampling="greedy"), TypeError, r"sampling must be a Sampling, a dict", id="sampling-string"),
    R(lambda c: gen(c, sampling=0.7), TypeError, r"sampling must be a Sampling, a dict", id="sampling-float"),
    R(
        lambda c: as_sampling([("do_sample", True)]),
        TypeError,
        r"sampling must be a Sampling",
        id="sampling-list-of-pairs",
    ),
    R(
        lambda c: apply_repetition_penalty(torch.tensor([2.0, 1.0]), [0], 1e-300),
        ValueError,
        r"repetition_penalty 1e-300 is too small.*overflows",
        id="sampling-penalty-overflow",
    ),
    R(
        lambda c: apply_temperature(torch.tensor([-2.0, -1.0]), 1e-300),
        ValueError,
        r"temperature 1e-300 is too small",
        id="sampling-temperature-underflow",
    ),
    R(
        lambda c: decode_sample(torch.tensor([math.inf, 1.0]), torch.Generator()),
        ValueError,
        r"logits contain \+inf",
        id="sampling-infinite-logit",
    ),
    # ---------------------------------------------------------------- run options
    R(lambda c: gen(c, trace=1), ValueError, r"unknown option\(s\) \['trace'\]", id="option-local-name-trace"),
    R(lambda c: gen(c, cycle=0), ValueError, r"unknown option\(s\) \['cycle'\]", id="option-local-name-cycle"),
    R(lambda c: gen(c, max_tokens=5), ValueError, r"unknown option\(s\) \['max_tokens'\]", id="option-typo"),
    R(lambda c: gen(c, use_cache="no"), TypeError, r"use_cache must be True or False", id="option-use-cache-string"),
    R(lambda c: gen(c, keep_events=1), TypeError, r"keep_events must be True or False", id="option-keep-events-int"),
    R(
        lambda c: gen(c, stop_at_eos=None),
        TypeError,
        r"stop_at_eos must be True or False",
        id="option-stop-at-eos-none",
    ),
    R(lambda c: gen(c, draws=-1), ValueError, r"draws must be >= 0", id="option-draws-negative"),
    R(lambda c: gen(c, draws=1.0), TypeError, r"draws must be an integer", id="option-draws-float"),
    R(lambda c: gen(c, capture=5), TypeError, r"capture must be None, \"all\"", id="option-capture-int"),
    R(
        lambda c: gen(c, capture="softmax"),
        TypeError,
        r"capture must be None, \"all\"",
        id="option-capture-bare-string",
    ),
    R(
        lambda c: gen(c, capture={"softmaxx"}),
        ValueError,
        r"unknown op\(s\) \['softmaxx'\]",
        id="option-capture-unknown-op",
    ),
    # ---------------------------------------------------------------- forced tokens, branch, replay
    R(
        lambda c: run(c, force=[4096]),
        ValueError,
        r"forced token ids: \[4096\] outside the vocabulary",
        id="force-vocab",
    ),
    R(lambda c: run(c, force=[None, -1]), ValueError, r"forced token ids: \[-1\] outside", id="force-negative"),
    R(lambda c: run(c, force=[5.0]), TypeError, r"force\[\.\.\.\] must be an integer, got 5\.0", id="force-float"),
    R(lambda c: run(c, force=[True]), TypeError, r"force\[\.\.\.\] must be an integer, got True", id="force-bool"),
    R(lambda c: run(c, force="ab"), TypeError, r"force must be a list of token ids", id="force-string"),
    R(lambda c: run(c, force=5), TypeError, r"force must be a list of token ids", id="force-int"),
    R(
        lambda c: c.e.branch(c.trace, 2, token=4096),
        ValueError,
        r"token: \[4096\] outside the vocabulary \(ids 0\.\.4095\)",
        id="branch-token-vocab",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2, token=-1),
        ValueError,
        r"token: \[-1\] outside the vocabulary",
        id="branch-token-negative",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2, token="the"),
        TypeError,
        r"token must be an integer, got 'the'",
        id="branch-token-string",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2, token=5.0),
        TypeError,
        r"token must be an integer, got 5\.0",
        id="branch-token-float",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2.5),
        TypeError,
        r"at_cycle must be an integer, got 2\.5",
        id="branch-at-cycle-float",
    ),
    R(
        lambda c: c.e.branch(c.trace, True),
        TypeError,
        r"at_cycle must be an integer, got True",
        id="branch-at-cycle-bool",
    ),
    R(
        lambda c: c.e.branch(c.trace, -1),
        ValueError,
        r"at_cycle must be between 0 and 6, got -1",
        id="branch-at-cycle-negative",
    ),
    R(
        lambda c: c.e.branch(c.trace, 7),
        ValueError,
        r"at_cycle must be between 0 and 6, got 7",
        id="branch-at-cycle-past-end",
    ),
    R(
        lambda c: c.e.branch(c.trace, 6),
        ValueError,
        r"max_new_tokens \(6\) must exceed at_cycle \(6\)",
        id="branch-at-end-no-room",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2, max_new_tokens=0),
        ValueError,
        r"max_new_tokens \(0\) must exceed at_cycle \(2\)",
        id="branch-zero-length",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2, max_new_tokens=4.0),
        TypeError,
        r"max_new_tokens must be an integer",
        id="branch-length-float",
    ),
    R(
        lambda c: c.e.branch(c.trace, 2, sampling="hot"),
        TypeError,
        r"sampling must be a Sampling",
        id="branch-sampling-string",
    ),
    R(lambda c: c.e.branch(c.trace.to_dict(), 2), TypeError, r"expected a Trace .*got dict", id="branch-not-a-trace"),
    R(lambda c: c.e.replay("trace.json"), TypeError, r"expected a Trace .*got str", id="replay-path-not-a-trace"),
    R(
        lambda c: c.smollm2().replay(c.trace),
        ValueError,
        r"made by 'tiny'; its tokenizer fingerprint differs from that of this engine's model 'smollm2'",
        id="replay-tiny-trace-on-smollm2",
    ),
    R(
        lambda c: c.smollm2().branch(c.trace, 2),
        ValueError,
        r"made by 'tiny'; its weights fingerprint differs from that of this engine's model 'smollm2'",
        id="branch-tiny-trace-on-smollm2",
    ),
    R(
        lambda c: Engine(Loaded("tiny", _changed(c.e.loaded.model), c.e.tokenizer, "test")).branch(c.trace, 2),
        ValueError,
        r"its weights fingerprint differs.*branch on an engine of the model that made it",
        id="branch-on-changed-weights-same-name",
    ),
    R(
        lambda c: c.smollm2().replay(trace_file(c, deleter("fingerprint"))),
        ValueError,
        r"made by 'tiny', not by this engine's model 'smollm2'",
        id="replay-old-file-on-another-model",
    ),
    R(
        lambda c: c.e.replay(trace_file(c, setter("prompt_ids", [4096]))),
        ValueError,
        r"prompt token ids: \[4096\] outside the vocabulary",
        id="replay-file-ids-past-vocab",
    ),
    # ---------------------------------------------------------------- ablation
    R(
        lambda c: gen(c, ablation=ablation(heads=[(0, 6)])),
        ValueError,
        r"head \(0, 6\) does not exist in 'tiny': layers are 0\.\.3, heads 0\.\.5",
        id="ablation-head-past-range",
    ),
    R(
        lambda c: gen(c, ablation=ablation(heads=[(4, 0)])),
        ValueError,
        r"head \(4, 0\) does not exist.*layers are 0\.\.3",
        id="ablation-layer-past-range",
    ),
    R(
        lambda c: gen(c, ablation=ablation(heads=[(0, -1)])),
        ValueError,
        r"head \(0, -1\) does not exist",
        id="ablation-head-negative",
    ),
    R(
        lambda c: gen(c, ablation=ablation(mlps=[4])),
        ValueError,
        r"MLP layer 4 does not exist in 'tiny': layers are 0\.\.3",
        id="ablation-mlp-past-range",
    ),
    R(
        lambda c: gen(c, ablation=ablation(mlps=[-1])),
        ValueError,
        r"MLP layer -1 does not exist",
        id="ablation-mlp-negative",
    ),
    R(
        lambda c: c.e.logits([5, 6], ablation=ablation(mlps=[9])),
        ValueError,
        r"MLP layer 9 does not exist",
        id="ablation-logits-mlp",
    ),
    R(
        lambda c: c.e.branch(c.trace, 1, ablation=ablation(heads=[(9, 9)])),
        ValueError,
        r"head \(9, 9\) does not exist",
        id="ablation-branch-head",
    ),
    R(
        lambda c: ablation(heads=[(0.5, 1)]),
        TypeError,
        r"heads must be a collection of \(layer, head\) pairs",
        id="ablation-float-layer",
    ),
    R(
        lambda c: ablation(heads=[0, 1]),
        TypeError,
        r"heads must be a collection of \(layer, head\) pairs",
        id="ablation-flat-heads",
    ),
    R(
        lambda c: ablation(mlps=["1"]),
        TypeError,
        r"mlps must be a collection of layer numbers",
        id="ablation-mlp-string",
    ),
    R(lambda c: Ablation(mlps=3), TypeError, r"mlps must be a collection", id="ablation-mlps-bare-int"),
    R(lambda c: gen(c, ablation={"heads": [(0, 1)]}), TypeError, r"ablation must be an Ablation", id="ablation-dict"),
    R(
        lambda c: Debugger(c.e, PROMPT, ablation=ablation(mlps=[7])),
        ValueError,
        r"MLP layer 7 does not exist",
        id="ablation-debugger",
    ),
    # ---------------------------------------------------------------- trace files
    R(
        lambda c: trace_file(c, text=""),
        ValueError,
        FILE + r" is not a trace file: not JSON.*empty or truncated",
        id="file-empty",
    ),
    R(
        lambda c: trace_file(c, text=json.dumps(c.trace.to_dict())[:200]),
        ValueError,
        FILE + r" is not a trace file: not JSON",
        id="file-truncated",
    ),
    R(
        lambda c: trace_file(c, text=nested(100_000)),
        ValueError,
        FILE + r" is not a trace file: nested too deeply",
        id="file-deep-nesting",
    ),
    R(
        lambda c: trace_file(c, text=json.dumps(c.trace.to_dict())[:-1] + ', "model": "tiny"}'),
        ValueError,
        FILE + r" is not a trace file: not JSON \(the key 'model' appears twice in one object\)",
        id="file-duplicate-key",
    ),
    R(
        lambda c: Trace.load(c.tmp / "nosuch.json"),
        FileNotFoundError,
        r"^cannot read the trace file \S+nosuch\.json: there is no such file: check the path$",
        id="file-missing",
    ),
    R(
        lambda c: Trace.load(c.tmp),
        IsADirectoryError,
        r"^cannot read the trace file \S+: it is a folder: give the path of a file in it$",
        id="file-is-a-folder",
    ),
    R(lambda c: trace_file(c, text="[]"), ValueError, FILE + r".*the file must be an object", id="file-list-at-top"),
    R(lambda c: trace_file(c, text="null"), ValueError, FILE + r".*the file must be an object", id="file-null"),
    R(
        lambda c: trace_file(c, text="1" * 5000),
        ValueError,
        FILE + r" is not a trace file: not JSON",
        id="file-huge-integer",
    ),
    R(lambda c: trace_file(c, text="\udcff\x00garbage"), ValueError, FILE + r" is not a trace file", id="file-binary"),
    R(lambda c: Trace.load(c.tmp / "missing.json"), FileNotFoundError, r"missing\.json", id="file-missing"),
    R(
        lambda c: trace_file(c, deleter("records")),
        ValueError,
        FILE + r".*lacks the field\(s\) \['records'\]",
        id="file-missing-records",
    ),
    R(
        lambda c: trace_file(c, deleter("model")),
        ValueError,
        FILE + r".*lacks the field\(s\) \['model'\]",
        id="file-missing-model",
    ),
    R(
        lambda c: trace_file(c, deleter("records", 0, "token_id")),
        ValueError,
        FILE + r".*records\[0\] lacks the field\(s\) \['token_id'\]",
        id="file-record-missing-key",
    ),
    R(
        lambda c: trace_file(c, setter("extra", 1)),
        ValueError,
        FILE + r".*has unknown field\(s\) \['extra'\]",
        id="file-unknown-key",
    ),
    R(
        lambda c: trace_file(c, setter("records", {"0": {}})),
        ValueError,
        r"trace\.json is not a valid trace file: records must be a list",
        id="file-records-object",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, [1, 2])),
        ValueError,
        FILE + r".*records\[0\] must be an object",
        id="file-record-is-list",
    ),
    R(
        lambda c: trace_file(c, setter("settings", [])),
        ValueError,
        FILE + r".*settings must be an object",
        id="file-settings-list",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "prob", "high")),
        ValueError,
        FILE + r".*records\[0\]\.prob must be a probability.*'high'",
        id="file-prob-string",
    ),
    R(
        lambda c: trace_file(c, setter("records", 1, "prob", 1.5)),
        ValueError,
        FILE + r".*records\[1\]\.prob must be a probability",
        id="file-prob-above-one",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "raw_prob", None)),
        ValueError,
        FILE + r".*records\[0\]\.raw_prob must be a probability",
        id="file-raw-prob-null",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "entropy", math.nan)),
        ValueError,
        r"is not a trace file: not JSON \(NaN is not a JSON number\)",
        id="file-entropy-nan",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "entropy", math.inf)),
        ValueError,
        r"is not a trace file: not JSON \(Infinity is not a JSON number\)",
        id="file-entropy-infinity",
    ),
    R(
        lambda c: trace_file(c, setter("prompt_ids", "5 6 7")),
        ValueError,
        FILE + r".*prompt_ids must be a non-empty list of token ids.*'5 6 7'",
        id="file-prompt-ids-string",
    ),
    R(
        lambda c: trace_file(c, setter("prompt_ids", [])),
        ValueError,
        FILE + r".*prompt_ids must be a non-empty list",
        id="file-prompt-ids-empty",
    ),
    R(
        lambda c: trace_file(c, setter("prompt_ids", [5, 6.5])),
        ValueError,
        FILE + r".*prompt_ids must be a non-empty list of token ids",
        id="file-prompt-ids-float",
    ),
    R(
        lambda c: trace_file(c, setter("prompt_ids", [5, -2])),
        ValueError,
        FILE + r".*prompt_ids must be",
        id="file-prompt-ids-negative",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "token_id", "12")),
        ValueError,
        FILE + r".*records\[0\]\.token_id must be an integer >= 0",
        id="file-token-id-string",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "cycle", 3)),
        ValueError,
        FILE + r".*records\[0\]\.cycle must be 0",
        id="file-cycles-out-of-order",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "forced", "no")),
        ValueError,
        FILE + r".*records\[0\]\.forced must be true or false",
        id="file-forced-string",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "draw", 1.0)),
        ValueError,
        FILE + r".*records\[0\]\.draw must be null or a number in \[0, 1\)",
        id="file-draw-one",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "n_inputs", 0)),
        ValueError,
        FILE + r".*records\[0\]\.n_inputs must be an integer >= 1",
        id="file-n-inputs-zero",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "top", [[5, "a"]])),
        ValueError,
        FILE + r".*records\[0\]\.top\[0\] must be \[token id, token text, probability\]",
        id="file-top-short",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "top", "abc")),
        ValueError,
        FILE + r".*records\[0\]\.top must be a list",
        id="file-top-string",
    ),
    R(
        lambda c: trace_file(c, setter("text", None)),
        ValueError,
        r"trace\.json is not a valid trace file: text must be a string",
        id="file-text-null",
    ),
    R(
        lambda c: trace_file(c, setter("model", "")),
        ValueError,
        r"trace\.json is not a valid trace file: model must be a model name",
        id="file-model-empty",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "sampling", {"do_sample": "no"})),
        ValueError,
        FILE + r".*settings\.sampling: do_sample must be True or False",
        id="file-sampling-bad-type",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "sampling", {"temprature": 1})),
        ValueError,
        FILE + r".*settings\.sampling: unknown sampling setting",
        id="file-sampling-unknown",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "sampling", [])),
        ValueError,
        FILE + r".*settings\.sampling must be an object",
        id="file-sampling-list",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "use_cache", "yes")),
        ValueError,
        FILE + r".*settings\.use_cache must be true or false",
        id="file-use-cache-string",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "ablation", {"heads": [[0]], "mlps": []})),
        ValueError,
        FILE + r".*ablation\.heads must be a list of \[layer, head\] pairs",
        id="file-ablation-bad-head",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "ablation", {"heads": []})),
        ValueError,
        FILE + r".*ablation lacks the field\(s\) \['mlps'\]",
        id="file-ablation-missing-mlps",
    ),
    R(
        lambda c: trace_file(c, setter("settings", "surprise", 1)),
        ValueError,
        FILE + r".*settings has unknown field\(s\) \['surprise'\]",
        id="file-settings-unknown",
    ),
    R(
        lambda c: trace_file(c, setter("fingerprint", "weights", "abc")),
        ValueError,
        FILE + r".*fingerprint\.weights must be a sha256 digest",
        id="file-fingerprint-short",
    ),
    R(
        lambda c: trace_file(c, setter("fingerprint", [])),
        ValueError,
        FILE + r".*fingerprint must be an object",
        id="file-fingerprint-list",
    ),
    # ---------------------------------------------------------------- quantization (int8 weights)
    R(
        lambda c: load("tiny", quantize="int4"),
        ValueError,
        r"unknown quantize='int4': the choices are None \(float weights\) and 'int8'.*simulate",
        id="load-quantize-int4",
    ),
    R(lambda c: load("tiny", quantize="INT8 "), ValueError, r"unknown quantize='INT8 '", id="load-quantize-misspelt"),
    R(
        lambda c: load("tiny", quantize=8),
        TypeError,
        r"quantize must be None or 'int8' \(a string\), got 8",
        id="load-quantize-int",
    ),
    R(
        lambda c: load("tiny", quantize=True),
        TypeError,
        r"quantize must be None or 'int8'.*got True",
        id="load-quantize-bool",
    ),
    R(
        lambda c: load("tiny", quantize="int8", dtype=torch.bfloat16),
        ValueError,
        r"quantize='int8' .*load with dtype=torch\.float32 and device='cpu' \(got dtype=torch\.bfloat16",
        id="load-quantize-bfloat16",
    ),
    R(lambda c: to_int8(None), TypeError, r"to_int8 converts a torch\.nn\.Module.*got NoneType", id="to-int8-none"),
    R(
        lambda c: to_int8(load("tiny", quantize="int8").model),
        ValueError,
        r"the model is already int8",
        id="to-int8-twice",
    ),
    R(
        lambda c: to_int8(torch.nn.Linear(2, 2).bfloat16()),
        ValueError,
        r"to_int8 needs a float32 model on the CPU.*got torch\.bfloat16 on cpu",
        id="to-int8-bfloat16",
    ),
    R(
        lambda c: int8_linear_of(torch.ones(2, 3), None)(torch.ones(1, 3, dtype=torch.bfloat16)),
        TypeError,
        r"an int8 Linear takes float32 inputs, got torch\.bfloat16",
        id="int8-linear-bfloat16-input",
    ),
    R(
        lambda c: int8_linear_of(torch.ones(2, 3), None)(torch.ones(1, 4)),
        ValueError,
        r"int8 Linear of 3 inputs got a tensor of shape \(1, 4\): its last dimension must be 3",
        id="int8-linear-wrong-width",
    ),
    R(
        lambda c: int8_linear_of(torch.ones(2, 3), None)(torch.tensor(1.0)),
        ValueError,
        r"got a tensor of shape \(\)",
        id="int8-linear-scalar-input",
    ),
    R(
        lambda c: int8_linear_of(torch.tensor([[1.0, float("nan")]]), None),
        ValueError,
        r"quantize_int8: the weight holds inf or NaN",
        id="int8-linear-nan-weight",
    ),
    # ---------------------------------------------------------------- constructors
    R(
        lambda c: Engine(None),
        TypeError,
        r"Engine needs a model: a Loaded from cyclelab\.load.*got NoneType",
        id="engine-none",
    ),
    R(lambda c: Engine(42), TypeError, r"Engine needs a model.*got int", id="engine-int"),
    R(lambda c: Engine(c.e), TypeError, r"Engine needs a model.*got Engine", id="engine-of-engine"),
    R(
        lambda c: Engine(c.e.loaded.model),
        TypeError,
        r"Engine needs a model.*got GPT2LMHeadModel",
        id="engine-bare-module",
    ),
    R(
        lambda c: Engine("no-such-model"),
        ValueError,
        r"unknown model 'no-such-model'. Choose one of: 'tiny'",
        id="engine-unknown-name",
    ),
    R(lambda c: Debugger(None, PROMPT), TypeError, r"Debugger needs a model.*got NoneType", id="debugger-none"),
    R(lambda c: Debugger(3.5, PROMPT), TypeError, r"Debugger needs a model.*got float", id="debugger-float"),
    R(
        lambda c: Debugger("no-such-model", PROMPT),
        ValueError,
        r"unknown model 'no-such-model'",
        id="debugger-unknown-name",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT, sampling=dict(do_sample=True, temprature=0.8)),
        ValueError,
        r"unknown sampling setting\(s\) \['temprature'\]",
        id="debugger-sampling-dict-typo",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT, sampling="greedy"),
        TypeError,
        r"sampling must be a Sampling, a dict",
        id="debugger-sampling-string",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT, sampling=dict(do_sample="no")),
        TypeError,
        r"do_sample must be True or False",
        id="debugger-sampling-bad-value",
    ),
    R(lambda c: Debugger(c.e, [5.5]), TypeError, r"5\.5 \(float\)", id="debugger-float-prompt"),
    R(lambda c: Debugger(c.e, None), TypeError, r"got NoneType", id="debugger-none-prompt"),
    R(
        lambda c: Debugger(c.e, PROMPT, max_new_tokens=True),
        TypeError,
        r"max_new_tokens must be an integer, got True",
        id="debugger-length-bool",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT, top=0),
        ValueError,
        r"top must be an integer from 1 to 100",
        id="debugger-top-zero",
    ),
    # ---------------------------------------------------------------- the debugger's commands
    R(
        lambda c: Debugger(c.e, PROMPT).set_sampling("hot"),
        TypeError,
        r"sampling must be a Sampling",
        id="debugger-set-sampling-string",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).set_sampling(do_sample="no"),
        TypeError,
        r"do_sample must be True or False",
        id="debugger-set-do-sample-string",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).set_sampling(seed=-3),
        ValueError,
        r"seed must be an integer from 0",
        id="debugger-set-seed-negative",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).ablate_head(0, 6),
        ValueError,
        r"head must be an integer from 0 to 5",
        id="debugger-ablate-missing-head",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).run_to(2.5),
        ValueError,
        r"cycle must be an integer from 0 to 20",
        id="debugger-run-to-float",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).break_entropy_above(math.nan),
        ValueError,
        r"entropy threshold must be a finite number >= 0 nats, got nan",
        id="debugger-entropy-nan",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).break_entropy_above(math.inf),
        ValueError,
        r"entropy threshold must be a finite number >= 0 nats, got inf",
        id="debugger-entropy-inf",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).break_entropy_above(True),
        TypeError,
        r"entropy threshold must be a number of nats, got True \(bool\)",
        id="debugger-entropy-bool",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).break_below(True),
        TypeError,
        r"p must be a probability \(a number in \(0, 1\]\), got True \(bool\)",
        id="debugger-break-below-bool",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT).break_below(math.nan),
        ValueError,
        r"p must be in \(0, 1\], got nan",
        id="debugger-break-below-nan",
    ),
    # ---------------------------------------------------------------- one-pass iterators, numpy, the lab helpers
    R(
        lambda c: gen(c, capture=(op for op in ["logits"])),
        TypeError,
        r"capture must be a set, list or tuple of op names, not a one-pass generator",
        id="option-capture-generator",
    ),
    R(
        lambda c: gen(c, capture=iter(["logits"])),
        TypeError,
        r"not a one-pass list_iterator",
        id="option-capture-iterator",
    ),
    R(
        lambda c: _patching(c, PROMPT, PROMPT),
        ValueError,
        r"the clean and corrupted prompts are the same tokens",
        id="patching-identical-prompts",
    ),
    R(
        lambda c: _shade(["a", "b"], [0.5, math.nan]),
        ValueError,
        r"score 1 is nan: shading needs finite scores",
        id="shaded-text-nan",
    ),
    R(lambda c: _shade(["a"], [math.inf]), ValueError, r"score 0 is inf", id="shaded-text-inf"),
    R(
        lambda c: _weight_bytes(c, group=-32),
        ValueError,
        r"group must be >= 1 \(values per int4 scale, e.g. 32\), got -32",
        id="weight-bytes-group-negative",
    ),
    R(lambda c: _weight_bytes(c, group=0), ValueError, r"group must be >= 1", id="weight-bytes-group-zero"),
    R(
        lambda c: _weight_bytes(c, group=32.0),
        TypeError,
        r"group must be an integer .*got 32\.0 \(float\)",
        id="weight-bytes-group-float",
    ),
    R(
        lambda c: _q4_1(np_array([300] + [0] * 19)),
        ValueError,
        r"must hold bytes \(integers 0\.\.255\), got dtype int64 from 0 to 300",
        id="q4-1-above-255",
    ),
    R(
        lambda c: _q4_1(np_array([-1] + [0] * 19)),
        ValueError,
        r"must hold bytes \(integers 0\.\.255\), got dtype int64 from -1 to 0",
        id="q4-1-negative",
    ),
    R(
        lambda c: _q4_1(np_array([0.5] * 20)),
        ValueError,
        r"must hold bytes \(integers 0\.\.255\), got dtype float64",
        id="q4-1-floats",
    ),
    R(
        lambda c: load("tiny", attn="flash"),
        ValueError,
        r"unknown attn='flash': the choices are 'eager' .* and 'sdpa'",
        id="load-attn-flash",
    ),
    R(lambda c: load("tiny", attn=None), TypeError, r"attn must be one of \('eager', 'sdpa'\)", id="load-attn-none"),
    R(
        lambda c: load("tiny", dtype=torch.int8),
        ValueError,
        r"dtype must be a floating-point dtype .*got torch\.int8; for int8 weights use quantize='int8'",
        id="load-dtype-int8",
    ),
    R(
        lambda c: load("tiny", dtype="float32"),
        TypeError,
        r"dtype must be a torch dtype such as torch\.float32, got 'float32'",
        id="load-dtype-string",
    ),
    R(
        lambda c: _lesson_text(c, lambda t: t.replace('"version": ', '"title": "x", "version": ', 1)),
        ValueError,
        r"l\.json is not a lesson file: not JSON \(the key 'title' appears twice in one object\)",
        id="lesson-duplicate-key",
    ),
    R(
        lambda c: _lesson_text(c, None),
        FileNotFoundError,
        r"no lesson file at \S+l\.json: check the path",
        id="lesson-missing",
    ),
    R(
        lambda c: f32_linear(torch.randn(1, 5), torch.randn(8, 16)),
        ValueError,
        r"f32_linear: x's last dimension must be the weight's input width 16 \(weight 0 is \(out, in\) = \(8, 16\)\)",
        id="f32-linear-x-too-narrow",
    ),
    R(
        lambda c: f32_linear(torch.randn(1, 16), torch.randn(16)),
        ValueError,
        r"f32_linear: weight 0 must be a 2-D tensor \(out, in\), got \(16,\)",
        id="f32-linear-1d-weight",
    ),
    R(
        lambda c: fused_softmax("x"),
        TypeError,
        r"fused_softmax: scores must be a torch\.Tensor, got str",
        id="fused-str",
    ),
    R(
        lambda c: fused_rms_norm(torch.randn(1, 16), torch.ones(16), float("nan")),
        ValueError,
        r"fused_rms_norm: eps must be a finite number >= 0 \(e\.g\. 1e-5\), got nan",
        id="fused-rms-norm-eps-nan",
    ),
    R(
        lambda c: decode_sample(torch.full((8,), float("nan")), Sampling(do_sample=True, seed=1)),
        ValueError,
        r"logits contain NaN: the model's output is damaged; check its weights",
        id="sample-nan-logits-names-the-fix",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT, 2).set_sampling(colour=1),
        ValueError,
        r"unknown sampling setting\(s\) \['colour'\]; the settings are \['do_sample', ",
        id="debugger-set-sampling-unknown-lists-the-settings",
    ),
    R(
        lambda c: sample(c, temperature=10**30),
        ValueError,
        r"temperature must be a number of at most 2\*\*53 in size, got 10{30}",
        id="sample-temperature-huge-int",
    ),
    R(
        lambda c: quantize_symmetric(torch.ones(2, 4), 1000),
        ValueError,
        r"levels must be a whole number from 1 to 127 .* got 1000",
        id="int8-levels-too-many",
    ),
    R(
        lambda c: quantize_symmetric(torch.ones(2, 4), float("nan")),
        ValueError,
        r"levels must be a whole number from 1 to 127 .* got nan",
        id="int8-levels-nan",
    ),
    R(
        lambda c: quantize_symmetric(torch.zeros(0, 4), 127),
        ValueError,
        r"w must hold at least one row of numbers, got shape \(0, 4\)",
        id="int8-empty-weights",
    ),
    R(
        lambda c: Debugger(c.e, PROMPT, 2).set_sampling(do_sample=True, temperature=-1),
        ValueError,
        r"temperature must be a finite number > 0 when sampling, got -1",
        id="debugger-set-sampling-negative-temperature",
    ),
    R(
        lambda c: _nan_trace_save(c),
        ValueError,
        r"cannot save the trace for .*t\.json as JSON: settings\.sampling\.temperature is nan",
        id="trace-save-nan",
    ),
    R(
        lambda c: trace_file(c, setter("records", 0, "token", "FORGED")),
        ValueError,
        FILE + r".*records\[0\]\.top\[0\] must be the text of token .*'FORGED'",
        id="file-token-text-disagrees",
    ),
    R(
        lambda c: c.e.replay(_edited(c, text="forged text")),
        ValueError,
        r"this trace's text 'forged text' is not what its token ids decode to",
        id="replay-text-forged",
    ),
    R(
        lambda c: c.e.replay(_edited(c, token="FORGED")),
        ValueError,
        r"cycle 0 gives token \d+ \(token\) the text 'FORGED', but the tokenizer decodes it as",
        id="replay-token-text-forged",
    ),
]


def np_array(values):
    import numpy as np

    return np.array(values)


def _patching(c, clean, corrupt):
    from cyclelab.lab.patching import patching_grid

    return patching_grid(c.e, clean, corrupt, c.trace.records[0].token_id)


def _shade(tokens, scores):
    from cyclelab.lab.attribution import shaded_text

    return shaded_text(tokens, scores)


def _weight_bytes(c, group):
    from cyclelab.lab.quantize import weight_bytes

    return weight_bytes(c.e.loaded.model, "int4", group=group)


def _q4_1(block):
    from cyclelab.lab.quantize import decode_q4_1_block

    return decode_q4_1_block(block)


def _lesson_text(c, edit):
    """Load a copy of the course's lesson ``read`` edited by ``edit`` (a function of its text; None: no file)."""
    from cyclelab.workshop.lessons import LESSONS, Lesson

    path = c.tmp / "l.json"
    if edit is not None:
        path.write_text(edit((LESSONS / "read.json").read_text()))
    return Lesson.load(path)


def _nan_trace_save(c):
    trace = c.e.generate(PROMPT, 1, temperature=math.nan)  # greedy ignores the temperature, JSON cannot hold it
    trace.save(c.tmp / "t.json")


def _edited(c, text=None, token=None) -> Trace:
    """A copy of the base trace with its text, or the text of its first token alone (the candidates kept), forged."""
    trace = copy.deepcopy(c.trace)
    if text is not None:
        trace.text = text
    if token is not None:
        trace.records[0].token = token
        first = trace.records[0]
        first.top = [(i, token if i == first.token_id else t, p) for i, t, p in first.top]
    return trace


@pytest.mark.parametrize("action,error,message", ROWS)
def test_bad_input_is_refused_clearly(c, action, error, message):
    with pytest.raises(error, match=message):
        action(c)


def _changed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with one weight matrix scaled: the same architecture, other weights."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.mul_(1.01)
    return other


# ---------------------------------------------------------------- what is accepted, and the fingerprint


def test_documented_prompt_forms_give_the_same_ids(tiny_engine):
    ids = tiny_engine.encode(PROMPT)
    assert tiny_engine.encode(tuple(ids)) == tiny_engine.encode(torch.tensor(ids)) == ids
    assert tiny_engine.encode(torch.tensor(ids, dtype=torch.int32)) == ids
    assert all(type(i) is int for i in tiny_engine.encode(torch.tensor(ids)))


def test_debugger_and_engine_accept_a_loaded_model_or_its_name(tiny, tiny_engine):
    expected = tiny_engine.generate(PROMPT, 3, stop_at_eos=False).token_ids
    for model in (tiny, "tiny"):
        dbg = Debugger(model, PROMPT, max_new_tokens=3)
        dbg.run_to(3)
        assert dbg.token_ids == expected and dbg.engine.loaded is tiny
    assert Engine("tiny").loaded is tiny


def test_debugger_takes_sampling_as_a_dict(tiny_engine):
    dbg = Debugger(tiny_engine, PROMPT, sampling={"do_sample": True, "seed": 3, "top_k": 20})
    assert dbg.sampling == Sampling(do_sample=True, seed=3, top_k=20)
    assert dbg.set_sampling({"temperature": 0.5}) == Sampling(temperature=0.5)


def test_greedy_ignores_a_zero_temperature_and_a_seed_at_the_top_of_its_range(tiny_engine):
    greedy = tiny_engine.generate(PROMPT, 3)
    assert tiny_engine.generate(PROMPT, 3, temperature=0.0).token_ids == greedy.token_ids
    assert len(tiny_engine.generate(PROMPT, 3, do_sample=True, seed=2**64 - 1).records) == 3


def test_fingerprint_tells_weights_and_tokenizers_apart(tiny, tiny_engine, smollm2):
    mine = fingerprint(tiny)
    assert fingerprint(tiny) == mine == tiny_engine.fingerprint  # stable
    assert fingerprint(Loaded("copy", copy.deepcopy(tiny.model), tiny.tokenizer, "test")) == mine  # same numbers
    changed = fingerprint(Loaded("tiny", _changed(tiny.model), tiny.tokenizer, "test"))
    assert changed["weights"] != mine["weights"] and changed["tokenizer"] == mine["tokenizer"]
    other = fingerprint(smollm2)
    assert other["weights"] != mine["weights"] and other["tokenizer"] != mine["tokenizer"]


def test_fingerprint_follows_weights_changed_in_place(tiny):
    model = copy.deepcopy(tiny.model)
    loaded = Loaded("tiny", model, tiny.tokenizer, "test")
    before = fingerprint(loaded)["weights"]
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # element 0 is in every strided sample
    assert fingerprint(loaded)["weights"] != before


def test_fingerprint_sees_an_edit_through_data_anywhere(tiny):
    """``.data`` bypasses the tensor's version counter; the digest hashes every byte, so it still changes."""
    loaded = Loaded("tiny", copy.deepcopy(tiny.model), tiny.tokenizer, "test")
    before = fingerprint(loaded)["weights"]
    loaded.model.lm_head.weight.data[7, 5] += 1e-3  # not in the old strided sample of ~1,000 values
    after = fingerprint(loaded)["weights"]
    assert after != before
    loaded.model.lm_head.weight.data[7, 5] -= 1e-3
    assert fingerprint(loaded)["weights"] in (before, after)  # float rounding may leave it one ulp off


def test_a_run_hashes_the_weights_once_not_per_token(tiny_engine, monkeypatch):
    from cyclelab.core import fingerprint as fingerprint_module

    calls = []
    real = fingerprint_module.weights_sha256
    monkeypatch.setattr(fingerprint_module, "weights_sha256", lambda model: calls.append(1) or real(model))
    tiny_engine.generate(PROMPT, 6)
    assert len(calls) == 1


def test_the_weights_are_hashed_in_full_only_when_their_stamp_moved(tiny, monkeypatch):
    """The CRC and version-counter stamp skips the full sha256 of unchanged weights, never of changed ones."""
    from cyclelab.loading import digest

    model, full = copy.deepcopy(tiny.model), []
    real = digest.full_sha256
    monkeypatch.setattr(digest, "full_sha256", lambda tensors: full.append(1) or real(tensors))
    first = digest.weights_sha256(model)
    assert digest.weights_sha256(model) == first and len(full) == 1
    model.lm_head.weight.data[7] *= -1  # a whole row negated behind the version counter: wider than 32 bits
    assert digest.weights_sha256(model) not in (first, None) and len(full) == 2
    with torch.no_grad():
        model.lm_head.weight[7] *= -1  # back, through the version counter
    assert digest.weights_sha256(model) == first and len(full) == 3
    assert digest.weights_sha256(model) == first == real(digest.weight_tensors(model)) and len(full) == 3


def test_load_never_hands_out_a_model_edited_in_place():
    from cyclelab import load
    from cyclelab.loading import loader

    first = load("tiny")
    saved = dict(loader._CACHE)
    weight = first.model.lm_head.weight
    original = weight.data[3, 4].item()
    try:
        weight.data[3, 4] = original + 1.0
        again = load("tiny")
        assert again is not first and again.model.lm_head.weight[3, 4].item() == original
        assert load("tiny") is again  # the fresh copy is cached in its place
    finally:
        weight.data[3, 4] = original
        loader._CACHE.clear()
        loader._CACHE.update(saved)  # later tests get the session's model object again


def test_old_lessons_and_traces_with_the_sampled_digest_still_open(tiny_engine, base):
    from cyclelab.core.fingerprint import legacy_weights_digest

    old = legacy_weights_digest(tiny_engine.loaded.model)
    assert old != tiny_engine.fingerprint["weights"]
    trace = copy.deepcopy(base)
    trace.fingerprint = {**trace.fingerprint, "weights": old}
    tiny_engine.check_trace(trace, "weights")  # accepted: recorded before full-byte hashing
    trace.fingerprint["weights"] = "0" * 64
    with pytest.raises(ValueError, match="weights fingerprint differs"):
        tiny_engine.check_trace(trace, "weights")


def test_a_trace_file_round_trips_with_its_fingerprint_and_replays(tiny_engine, base, tmp_path):
    base.save(tmp_path / "t.json")
    again = Trace.load(tmp_path / "t.json")
    assert again.fingerprint == tiny_engine.fingerprint and again.to_dict() == base.to_dict()
    assert tiny_engine.replay(again).token_ids == base.token_ids


def test_an_old_trace_file_without_fingerprint_still_replays_on_its_model(tiny_engine, base, tmp_path):
    raw = base.to_dict()
    del raw["fingerprint"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = Trace.load(tmp_path / "old.json")
    assert old.fingerprint == {}
    assert tiny_engine.branch(old, 3).token_ids == base.token_ids


def test_replay_through_fine_tuned_weights_is_allowed(tiny, tiny_engine, base):
    """Chapter 06 and compare.before_after replay a trace through other weights of the same tokenizer."""
    tuned = Engine(Loaded("tiny + sonnets", _changed(tiny.model), tiny.tokenizer, "test"))
    replayed = tuned.replay(base)
    assert replayed.token_ids == base.token_ids and all(r.forced for r in replayed.records)
    assert replayed.fingerprint == tuned.fingerprint != base.fingerprint


def test_the_debugger_exports_its_model_fingerprint(tiny_engine, tmp_path):
    dbg = Debugger(tiny_engine, PROMPT, max_new_tokens=3)
    dbg.run_to(2)
    assert Trace.load(dbg.export(tmp_path / "d.json")).fingerprint == tiny_engine.fingerprint


def test_ablation_within_range_is_accepted_at_the_edges(tiny_engine):
    n_layers, n_heads = tiny_engine.arch.n_layers, tiny_engine.arch.n_heads
    edge = ablation(heads=[(n_layers - 1, n_heads - 1)], mlps=[n_layers - 1])
    assert len(tiny_engine.generate(PROMPT, 2, ablation=edge).records) == 2
    assert Ablation(heads=[[0, 1]], mlps=(2,)) == ablation(heads=[(0, 1)], mlps=[2])  # lists become frozensets


def test_generate_accepts_every_run_option_by_name(tiny_engine):
    trace = tiny_engine.generate(
        PROMPT,
        2,
        use_cache=False,
        capture={"logits"},
        keep_events=True,
        force=[5],
        ablation=None,
        stop_at_eos=False,
        draws=0,
        chat=False,
    )
    assert trace.token_ids[0] == 5 and any(e.op == "logits" for e in trace.events)


def test_seeds_above_2_to_the_32_are_streams_of_their_own(tiny_engine):
    """torch's CPU twister reads 32 bits of a seed; seeds < 2**32 keep today's stream, larger ones get their own."""
    import numpy as np

    from cyclelab.core.sampling import make_generator
    from cyclelab.core.seeds import _init_by_array

    def draws(seed):
        return torch.rand(4, generator=make_generator(seed)).tolist()

    reference = torch.Generator().manual_seed(1)
    assert draws(1) == torch.rand(4, generator=reference).tolist()  # unchanged below 2**32
    assert draws(1 + 2**32) != draws(1) and draws(1 + 2**32) == draws(1 + 2**32)
    assert len({tuple(draws(s)) for s in (2**32, 2**33, 2**63, 2**64 - 1, 2**32 + 2**63)}) == 5
    key = [7, 5]  # the seeding is MT19937's init_by_array, as numpy's RandomState does it
    assert _init_by_array(key) == list(np.random.RandomState(key).get_state()[1])
    tokens = [tiny_engine.generate(PROMPT, 8, do_sample=True, seed=s).token_ids for s in (3, 3 + 2**32)]
    assert tokens[0] != tokens[1]


def test_numpy_scalars_are_numbers_like_floats(tiny_engine, tmp_path):
    import numpy as np

    for value in (np.float32(0.7), np.float64(0.7), np.float16(0.7)):
        sampling = Sampling(do_sample=True, temperature=value, seed=1)
        assert type(sampling.temperature) is float and abs(sampling.temperature - 0.7) < 1e-3
    trace = tiny_engine.generate(PROMPT, 2, do_sample=True, temperature=np.float32(0.5), seed=1)
    trace.save(tmp_path / "t.json")  # plain floats: JSON can hold them
    assert Trace.load(tmp_path / "t.json").settings["sampling"]["temperature"] == 0.5
    with pytest.raises(TypeError, match=r"temperature must be a number, got np.True_ \(bool\)"):
        Sampling(temperature=np.bool_(True))
