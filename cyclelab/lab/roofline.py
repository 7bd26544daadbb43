"""The roofline: what bounds a cycle on *this* machine, measured here.

An op that does ``F`` FLOPs while moving ``B`` bytes has an **arithmetic intensity** ``F / B``
(FLOPs per byte). The machine can do at most ``peak`` FLOP/s and read at most ``bandwidth``
bytes/s, so the op can reach at most ``min(peak, intensity × bandwidth)`` FLOP/s: the roof.
Below the *ridge* intensity ``peak / bandwidth`` an op waits on memory, above it on arithmetic.

A third floor matters for small models: every torch op costs a fixed **dispatch overhead**
(Python, argument checks, memory allocation) however little it computes. :func:`phase_costs`
sets the three floors of a forward pass side by side — FLOPs / peak, bytes / bandwidth and
torch ops × overhead — and the largest says which regime the pass is in.

The FLOPs and bytes come from the engine's own accounting (each :class:`~cyclelab.core.events.Event`
carries them); the peak, bandwidth and overhead are measured by the functions below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cyclelab.core.attention import KVCache
from cyclelab.core.engine import Engine, drain
from cyclelab.core.events import Cost, Event
from cyclelab.kernels import f32_conv1d, f32_linear

ATTENTION = ("kv_cache", "scores", "softmax", "mix")  #: the ops read as one "attention" point


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls of ``fn`` (the least disturbed run), in seconds."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# --- the machine ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """This machine's measured limits: matmul FLOP/s, read bytes/s and seconds per torch op."""

    peak_flops: float
    bandwidth: float
    dispatch: float

    @property
    def ridge(self) -> float:
        """The intensity (FLOPs per byte) where memory stops being the limit."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """The roof at ``intensity``: ``min(peak, intensity × bandwidth)`` FLOP/s."""
        return min(self.peak_flops, intensity * self.bandwidth)


def matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """Peak FLOP/s of an ``n × n`` float32 matmul (2n³ FLOPs: a multiply and an add per term)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, repeats)


def read_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes/s read by a sum over a large float32 tensor: every byte read once, almost no arithmetic."""
    x = torch.ones(megabytes * 2**20 // 4)
    return x.numel() * 4 / best_of(x.sum, repeats)


def dispatch_overhead(calls: int = 2000, repeats: int = 3) -> float:
    """Seconds per torch op when the op itself does nothing: ``x.add_(1)`` on a one-element tensor."""
    x = torch.zeros(1)

    def loop():
        for _ in range(calls):
            x.add_(1)

    return best_of(loop, repeats) / calls


def measure(matmul_size: int = 1024, megabytes: int = 256, repeats: int = 3) -> Machine:
    """Measure this machine's :class:`Machine` limits (a few seconds)."""
    return Machine(
        matmul_flops(matmul_size, repeats), read_bandwidth(megabytes, repeats), dispatch_overhead(repeats=repeats)
    )


# --- the GEMV ceiling -----------------------------------------------------------------------------


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The matrices one decode step multiplies a vector by, each once, as ``(out, in)``: every
    ``Linear`` and GPT-2 ``Conv1D`` weight (stored ``(in, out)``, so transposed) and the
    unembedding (the lm_head, which may share its storage with the embedding table)."""
    seen, out = set(), []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        kind = type(module).__name__
        if kind not in ("Linear", "Conv1D"):
            continue
        if weight.data_ptr() not in seen:
            seen.add(weight.data_ptr())
            out.append(weight.detach().t() if kind == "Conv1D" else weight.detach())
    if not out:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv1D weights to multiply by")
    return out


def gemv_ceiling(model: torch.nn.Module, repeats: int = 3, kernel: str = "torch") -> dict:
    """One matrix-vector product per weight matrix, all of them: the fastest a batch-1 decode step could
    read its weights with that kernel — ``"torch"``: ``torch.mv``; ``"engine"``: the engine's own C loops
    (:mod:`cyclelab.kernels`). Returns the ``bytes`` read, the ``seconds`` of the best pass, the
    ``bandwidth`` it reached and the ``tokens_per_s`` ceiling."""
    if kernel not in ("torch", "engine"):
        raise ValueError(f"kernel must be 'torch' or 'engine', got {kernel!r}")
    matrices = weight_matrices(model)
    vectors = [torch.randn(w.shape[1], dtype=w.dtype) for w in matrices]

    def product(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kernel == "torch":
            return torch.mv(w, v)
        return f32_linear(v, w) if w.is_contiguous() else f32_conv1d(v, w.t())  # Conv1D's (in, out) as stored

    def one_pass():
        for w, v in zip(matrices, vectors):
            product(w, v)

    with torch.no_grad():
        one_pass()  # warm up
        seconds = best_of(one_pass, repeats)
    nbytes = sum(w.numel() * w.element_size() for w in matrices)
    return {"bytes": nbytes, "seconds": seconds, "bandwidth": nbytes / seconds, "tokens_per_s": 1 / seconds}


# --- where a forward pass spends its time ----------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_torch_ops(fn: Callable[[], object]) -> int:
    """How many torch (aten) ops ``fn()`` dispatches: each pays the dispatch overhead once."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def op_costs(events: list[Event]) -> dict[str, Cost]:
    """Cost per op name, summed over layers; the attention ops summed as one ``"attention"``."""
    costs: dict[str, Cost] = {}
    for event in events:
        costs.setdefault("attention" if event.op in ATTENTION else event.op, Cost()).add(event)
    return costs


def _forward(engine: Engine, ids: torch.Tensor, cache: KVCache) -> list[Event]:
    events: list[Event] = []
    drain(engine.forward(ids, cache), events.append)
    return events


def phase_costs(engine: Engine, ids: list[int] | torch.Tensor, machine: Machine, repeats: int = 3) -> list[dict]:
    """Prefill of ``ids`` then one decode step, each with its FLOPs, bytes, torch ops, measured
    seconds (best of ``repeats``), the three floors and the ``bound`` they predict."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] < 2:
        raise ValueError(f"phase_costs needs at least 2 token ids (a prompt and one to decode), got {ids.shape[1]}")
    n_layers, n = engine.arch.n_layers, ids.shape[1] - 1

    def prefilled() -> KVCache:
        cache = KVCache(n_layers, n + 1)
        _forward(engine, ids[:, :n], cache)
        return cache

    phases = {"prefill": (ids[:, :n], lambda: KVCache(n_layers, n + 1)), "decode": (ids[:, n:], prefilled)}
    rows = []
    for phase, (step_ids, fresh) in phases.items():
        caches = [fresh() for _ in range(repeats + 2)]  # one per run: a run fills its cache
        events = _forward(engine, step_ids, caches.pop())
        ops = count_torch_ops(lambda: _forward(engine, step_ids, caches.pop()))
        seconds = best_of(lambda: _forward(engine, step_ids, caches.pop()), repeats)
        total = Cost.of(events)
        floors = {
            "compute": total.flops / machine.peak_flops,
            "memory": total.bytes / machine.bandwidth,
            "overhead": ops * machine.dispatch,
        }
        rows.append(
            {
                "phase": phase,
                "tokens": step_ids.shape[1],
                "flops": total.flops,
                "bytes": total.bytes,
                "torch_ops": ops,
                "seconds": seconds,
                **{f"{k}_s": v for k, v in floors.items()},
                "bound": max(floors, key=floors.get),
                "ops": op_costs(events),
            }
        )
    return rows


def plot_roofline(machine: Machine, points: dict[str, tuple[float, float]], ax=None, title: str = ""):
    """The roof of ``machine`` and one dot per named point ``(intensity, achieved FLOP/s)``."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.2))
    low = min([machine.ridge / 100] + [i for i, _ in points.values()]) / 2
    high = max([machine.ridge * 100] + [i for i, _ in points.values()]) * 2
    x = np.logspace(np.log10(low), np.log10(high), 200)
    ax.plot(
        x, np.minimum(machine.peak_flops, x * machine.bandwidth), "k-", lw=2, label="roof: min(peak, I × bandwidth)"
    )
    ax.axvline(machine.ridge, color="grey", ls=":", lw=1)
    for name, (intensity, achieved) in points.items():
        ax.scatter(intensity, achieved, s=30, zorder=3)
        ax.annotate(name, (intensity, achieved), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (FLOPs per byte)",
        ylabel="FLOP/s",
        title=title or "roofline of this machine",
    )
    ax.legend(fontsize=8, loc="lower right")
    return ax
