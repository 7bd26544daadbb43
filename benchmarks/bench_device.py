"""CPU vs GPU: the same greedy generation of tiny on both, compared cycle by cycle.

Results need not match bit for bit across devices; the check is that the logits agree to
float tolerance and every cycle's top-5 candidates are the same set. Returns no rows
when torch sees no GPU.
"""

from __future__ import annotations

import time

import torch

from cyclelab import Engine, load


def run(quick: bool = False) -> list[dict]:
    """Agreement and speed of tiny on the CPU and on the GPU."""
    if not torch.cuda.is_available():
        return []
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 16 if quick else 64
    traces, speed, logits = {}, {}, {}
    for device in ("cpu", "cuda"):
        engine = Engine(load("tiny", device=device))
        engine.generate("ROMEO:", 4)  # warm-up
        start = time.perf_counter()
        traces[device] = engine.generate("ROMEO:", n, stop_at_eos=False)
        torch.cuda.synchronize()
        speed[device] = n / (time.perf_counter() - start)
        logits[device] = engine.logits(traces["cpu"].all_ids[:200]).cpu()
    same_top5 = sum(
        {t[0] for t in a.top} == {t[0] for t in b.top} for a, b in zip(traces["cpu"].records, traces["cuda"].records)
    )
    return [
        {
            "benchmark": "tiny on CPU vs GPU",
            "cycles": n,
            "same_tokens": traces["cpu"].token_ids == traces["cuda"].token_ids,
            "cycles_with_same_top5": same_top5,
            "max_logit_diff": f"{(logits['cpu'] - logits['cuda']).abs().max().item():.2e}",
            "cpu_tokens_per_s": round(speed["cpu"], 1),
            "gpu_tokens_per_s": round(speed["cuda"], 1),
        }
    ]
