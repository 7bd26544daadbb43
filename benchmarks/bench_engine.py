"""Engine benchmarks, measured side by side in one run.

1. Decode speed: the engine (no capture, full capture) vs ``transformers`` ``generate``
   (greedy, batch 1, KV cache, 128 new tokens) on smollm2.
2. Cost per token as the context grows, with and without the KV cache (table + figure).
3. Decode speed as a fraction of the memory-bandwidth limit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cyclelab import Engine, load
from cyclelab import throughput
from cyclelab.roofline import best_of

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


def decode_speed(new_tokens: int = 128, repeats: int = 4) -> list[dict]:
    """Tokens per second: engine without capture, with full capture, and transformers.generate."""
    eager, sdpa = load("smollm2"), load("smollm2", attn="sdpa")
    engine = Engine(eager)
    ids = engine.encode(PROMPT)
    prompt = torch.tensor([ids])

    def hf(model):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=eager.tokenizer.eos_token_id)

    def ours(capture):
        engine.generate(ids, new_tokens, stop_at_eos=False, capture=capture)

    runs = {"transformers generate (sdpa)": lambda: hf(sdpa.model),
            "transformers generate (eager)": lambda: hf(eager.model),
            "engine, no capture": lambda: ours(None),
            "engine, full capture": lambda: ours("all")}
    seconds = interleaved_best(runs, repeats)
    baseline = new_tokens / seconds["transformers generate (sdpa)"]
    return [{"benchmark": "decode speed, smollm2, greedy, 128 tokens", "run": name,
             "tokens_per_s": round(new_tokens / s, 1), "ratio_vs_transformers": round(new_tokens / s / baseline, 2)}
            for name, s in seconds.items()]


def cache_scaling(lengths=(32, 64, 128, 256, 512, 1024), decode_steps: int = 8) -> list[dict]:
    """Milliseconds for one new token at each context length, with and without the KV cache."""
    rows = throughput.cache_scaling(Engine(load("smollm2")), lengths, decode_steps)
    plot_scaling(rows)
    return [{"benchmark": "ms per new token vs context", "context": r["context"], "kv_cache_ms": round(r["kv_cache_ms"], 1),
             "no_cache_ms": round(r["no_cache_ms"], 1), "speedup": round(r["speedup"], 1)} for r in rows]


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
    matmul_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if "embed_tokens" not in n and "norm" not in n)
    weight_bytes = matmul_bytes + model.lm_head.weight.numel() * 4  # tied unembedding read again
    bandwidth = copy_bandwidth()
    ids = engine.encode(PROMPT)
    seconds = best_of(lambda: engine.generate(ids, new_tokens, stop_at_eos=False), 2)
    per_token = seconds / new_tokens
    limit = bandwidth / weight_bytes
    return [{"benchmark": "decode vs memory bandwidth, smollm2 float32", "weights_read_MB": round(weight_bytes / 1e6),
             "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "limit_tokens_per_s": round(limit, 1),
             "measured_tokens_per_s": round(1 / per_token, 1), "fraction_of_limit": round((1 / per_token) / limit, 2)}]


def run(quick: bool = False) -> list[dict]:
    """All engine benchmarks; ``quick`` uses fewer tokens and lengths."""
    if quick:
        return decode_speed(32, 1) + cache_scaling((32, 128), 4) + bandwidth_fraction(16)
    return decode_speed() + cache_scaling() + bandwidth_fraction()


if __name__ == "__main__":
    for row in run():
        print(row)
