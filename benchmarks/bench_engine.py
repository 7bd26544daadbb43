"""Engine benchmarks, measured side by side in one run.

1. Decode targets (greedy, batch 1): each row compares two runs timed in turns, prints the ratio, its
   target and whether it is met: tiny float32 engine vs ``transformers.generate``; smollm2 float32 engine
   vs the GEMV ceiling and vs ``transformers``; smollm2 int8 engine vs float32 ``transformers`` and vs
   ``transformers`` running the same int8 model; full capture vs no capture; then, without targets, the engine
   against its own kernels' GEMV ceiling and what the own kernels buy, forced on and as chosen by ``auto``,
   each side by side with the engine on torch's kernels.
2. Memory (RSS after load, after generate, peak), engine vs ``transformers``, each in a subprocess of its own.
3. Cost per token as the context grows, with and without the KV cache (table + figure).
4. Decode speed as a fraction of the memory-bandwidth limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from cyclelab import Engine, load
from cyclelab.kernels import torch_float32
from cyclelab.kernels.choice import forced
from cyclelab.lab import throughput
from cyclelab.lab.roofline import best_of, gemv_ceiling

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the Roman Empire begins"


def interleaved_best(runs: dict, repeats: int) -> dict[str, float]:
    """Shortest wall time of each run, taking turns (A B C, A B C, ...) so that a slow spell of
    the machine falls on every run alike rather than on whichever ran during it."""
    seconds = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds[name] = min(seconds[name], best_of(fn, 1))
    return seconds


def _generate(loaded, ids: list[int], new_tokens: int, capture=None):
    """A function timing one greedy run of ``new_tokens`` tokens: the engine's, or ``transformers``' if ``loaded`` is a pair."""
    if isinstance(loaded, tuple):  # ("transformers", Loaded)
        model, prompt, eos = loaded[1].model, torch.tensor([ids]), loaded[1].tokenizer.eos_token_id

        def hf():
            with torch.no_grad():
                model.generate(
                    prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos
                )

        return hf
    engine = Engine(loaded)
    return lambda: engine.generate(ids, new_tokens, stop_at_eos=False, capture=capture)


def _on_torch_kernels(run):
    """``run`` with every product on torch's kernels instead of the own ones (the lever, switched off)."""

    def without_lever():
        with torch_float32():
            run()

    return without_lever


def _on_own_kernels(run):
    """``run`` with the own kernels forced wherever they apply (``CYCLELAB_KERNELS=own``), not only where the
    ``auto`` choice measured them faster."""

    def own():
        with forced("own"):
            run()

    return own


def target_row(what: str, speed: float, against: str, other: float, target: float | None) -> dict:
    """One comparison: tokens/s of both runs, their ratio, the target (None: a lever's gain, no target) and
    whether it is met."""
    ratio = speed / other
    return {
        "benchmark": "decode targets (greedy, batch 1)",
        "row": what,
        "tokens_per_s": round(speed, 1),
        "against": against,
        "against_tokens_per_s": round(other, 1),
        "ratio": round(ratio, 2),
        "target": "-" if target is None else f">= {target}",
        "met": "-" if target is None else ratio >= target,
    }


def decode_targets(new_tokens: int = 128, repeats: int = 3) -> list[dict]:
    """The issue's targets, every run timed in turns with the others (tokens per second)."""
    tiny = load("tiny")
    smol, smol8 = load("smollm2"), load("smollm2", quantize="int8")
    tiny_ids, ids = Engine(tiny).encode("ROMEO:\nBut soft"), Engine(smol).encode(PROMPT)
    runs = {
        "tiny engine": _generate(tiny, tiny_ids, new_tokens),
        "tiny engine, torch kernels": _on_torch_kernels(_generate(tiny, tiny_ids, new_tokens)),
        "engine, torch kernels": _on_torch_kernels(_generate(smol, ids, new_tokens)),
        "tiny engine, own kernels": _on_own_kernels(_generate(tiny, tiny_ids, new_tokens)),
        "engine, own kernels": _on_own_kernels(_generate(smol, ids, new_tokens)),
        "tiny transformers": _generate(("transformers", load("tiny", attn="sdpa")), tiny_ids, new_tokens),
        "engine": _generate(smol, ids, new_tokens),
        "engine, full capture": _generate(smol, ids, new_tokens, capture="all"),
        "transformers": _generate(("transformers", load("smollm2", attn="sdpa")), ids, new_tokens),
        "engine int8": _generate(smol8, ids, new_tokens),
        "transformers int8": _generate(
            ("transformers", load("smollm2", attn="sdpa", quantize="int8")), ids, new_tokens
        ),
    }
    speed = {name: new_tokens / s for name, s in interleaved_best(runs, repeats).items()}
    ceiling = gemv_ceiling(smol.model, repeats=5)["tokens_per_s"]
    own_ceiling = gemv_ceiling(smol.model, repeats=5, kernel="engine")["tokens_per_s"]
    return [
        target_row(
            "tiny float32: engine, no capture",
            speed["tiny engine"],
            "transformers.generate",
            speed["tiny transformers"],
            1.5,
        ),
        target_row(
            "smollm2 float32: engine, no capture",
            speed["engine"],
            "GEMV ceiling (torch.mv over all matrices)",
            ceiling,
            0.9,
        ),
        target_row(
            "smollm2 float32: engine, no capture", speed["engine"], "transformers.generate", speed["transformers"], 1.0
        ),
        target_row(
            "smollm2 int8: engine", speed["engine int8"], "float32 transformers.generate", speed["transformers"], 2.5
        ),
        target_row(
            "smollm2 int8: engine",
            speed["engine int8"],
            "transformers.generate, same int8 model",
            speed["transformers int8"],
            1.0,
        ),
        target_row(
            "smollm2 float32: engine, full capture",
            speed["engine, full capture"],
            "engine, no capture",
            speed["engine"],
            0.5,
        ),
        target_row(
            "smollm2 float32: engine, no capture",
            speed["engine"],
            "GEMV ceiling of the engine's own kernels",
            own_ceiling,
            None,
        ),
        target_row(
            "lever, tiny: own kernels forced",
            speed["tiny engine, own kernels"],
            "engine on torch's kernels",
            speed["tiny engine, torch kernels"],
            None,
        ),
        target_row(
            "lever, tiny: kernels chosen (auto)",
            speed["tiny engine"],
            "engine on torch's kernels",
            speed["tiny engine, torch kernels"],
            None,
        ),
        target_row(
            "lever, smollm2: own kernels forced",
            speed["engine, own kernels"],
            "engine on torch's kernels",
            speed["engine, torch kernels"],
            None,
        ),
        target_row(
            "lever, smollm2: kernels chosen (auto)",
            speed["engine"],
            "engine on torch's kernels",
            speed["engine, torch kernels"],
            None,
        ),
    ]


RSS_SCRIPT = """
import os, resource, sys, torch
from cyclelab import Engine, load
def rss_mb():  # resident now
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
runner, quantize, n = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
loaded = load("smollm2", quantize=quantize, attn="sdpa" if runner == "transformers" else "eager")
engine = Engine(loaded)
ids = engine.encode("The history of the Roman Empire begins")
after_load = rss_mb()
if runner == "engine":
    engine.generate(ids, n, stop_at_eos=False)
else:
    with torch.no_grad():
        loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
print(after_load, rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ru_maxrss: KiB
"""


def rss_mb(runner: str, quantize: str | None, new_tokens: int) -> tuple[float, float, float]:
    """Resident memory (MB) of a fresh process that loads smollm2 and generates ``new_tokens`` greedily:
    after the load, after the generation, and the peak."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, runner, quantize or "", str(new_tokens)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=600,
    )
    return tuple(float(v) for v in out.stdout.split()[-3:])


def peak_memory(new_tokens: int = 32) -> list[dict]:
    """RSS of load + generate, engine against transformers, float32 and int8 (the peak is the loading's:
    the float32 file is read before an int8 conversion)."""
    rows = []
    for quantize in (None, "int8"):
        # The first load after the code or the cache changed converts the weights and caches them, and that
        # process keeps the conversion's memory: warm the cache first, so each row measures a steady load.
        rss_mb("engine", quantize, 1)
        for runner in ("engine", "transformers"):
            load_mb, end_mb, peak_mb = rss_mb(runner, quantize, new_tokens)
            rows.append(
                {
                    "benchmark": "memory, smollm2 load + generate (RSS, MB)",
                    "weights": quantize or "float32",
                    "runner": runner,
                    "after_load_MB": round(load_mb),
                    "after_generate_MB": round(end_mb),
                    "peak_MB": round(peak_mb),
                }
            )
        engine, hf = rows[-2]["after_generate_MB"], rows[-1]["after_generate_MB"]
        rows[-2].update(ratio_vs_transformers=round(engine / hf, 2), target="<= 1.05", met=engine / hf <= 1.05)
    return rows


def cache_scaling(lengths=(32, 64, 128, 256, 512, 1024), decode_steps: int = 8) -> list[dict]:
    """Milliseconds for one new token at each context length, with and without the KV cache."""
    rows = throughput.cache_scaling(Engine(load("smollm2")), lengths, decode_steps)
    plot_scaling(rows)
    return [
        {
            "benchmark": "ms per new token vs context",
            "context": r["context"],
            "kv_cache_ms": round(r["kv_cache_ms"], 1),
            "no_cache_ms": round(r["no_cache_ms"], 1),
            "speedup": round(r["speedup"], 1),
        }
        for r in rows
    ]


def plot_scaling(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = throughput.plot_cache_scaling(rows, title="smollm2 on 2 CPU cores: cost of one cycle")
    ax.figure.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    ax.figure.savefig(RESULTS / "kv_cache_scaling.png", dpi=100)
    plt.close(ax.figure)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy reads and writes every byte."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = best_of(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds


def bandwidth_fraction(new_tokens: int = 64) -> list[dict]:
    """Decode speed against the limit set by reading every weight once per token."""
    engine = Engine(load("smollm2"))
    model = engine.loaded.model
    matmul_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n and "norm" not in n
    )
    weight_bytes = matmul_bytes + model.lm_head.weight.numel() * 4  # tied unembedding read again
    bandwidth = copy_bandwidth()
    ids = engine.encode(PROMPT)
    seconds = best_of(lambda: engine.generate(ids, new_tokens, stop_at_eos=False), 2)
    per_token = seconds / new_tokens
    limit = bandwidth / weight_bytes
    return [
        {
            "benchmark": "decode vs memory bandwidth, smollm2 float32",
            "weights_read_MB": round(weight_bytes / 1e6),
            "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
            "limit_tokens_per_s": round(limit, 1),
            "measured_tokens_per_s": round(1 / per_token, 1),
            "fraction_of_limit": round((1 / per_token) / limit, 2),
        }
    ]


def run(quick: bool = False) -> list[dict]:
    """All engine benchmarks; ``quick`` uses fewer tokens and skips the KV-cache and bandwidth tables."""
    # memory first: a child process inherits its parent's peak RSS, so the parent must still be small
    if quick:
        return peak_memory(8) + decode_targets(32, 1)
    return peak_memory() + decode_targets() + cache_scaling() + bandwidth_fraction()


if __name__ == "__main__":
    for row in run():
        print(row)
