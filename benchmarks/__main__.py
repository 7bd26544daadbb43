"""Run every benchmark side by side and print one table per benchmark.

    python -m benchmarks            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks --quick    # smaller sizes, for a smoke test (about 2 minutes)
    OMP_NUM_THREADS=2 python -m benchmarks   # threads for torch (default: every core)

Results also go to benchmarks/results/latest.json (and figures next to it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from itertools import groupby
from pathlib import Path

MODULES = [
    "benchmarks.bench_engine",
    "benchmarks.bench_debugger",
    "benchmarks.bench_device",
    "benchmarks.bench_speculative",
]
RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "asimd",
    "sve",
)  #: the CPU features that decide which kernels are fast


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The :data:`FLAGS` this CPU has (``/proc/cpuinfo``'s flags or, on ARM, Features), in that order."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    found = set()
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip().lower() in ("flags", "features"):
            found.update(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in found]


def machine_record() -> dict:
    """Which machine the timings are of: CPU model, its vector features, cores, torch, the GPU (if any) and the
    kernels the engine chose (timings from one machine say little about another)."""
    import torch

    from cyclelab.kernels import build, choice

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "benchmark": "machine",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu": choice.cpu_model(),
        "cpu_flags": " ".join(cpu_flags()) or "-",
        "cpus": os.cpu_count(),
        "cores_usable": cores,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
        "kernels": f"CYCLELAB_KERNELS={build.mode()}",
        "load_1min_at_start": round(os.getloadavg()[0], 2),
    }


def write_results(rows: list[dict], path: Path) -> None:
    """``rows`` as JSON at ``path``, the machine's record first (made here if ``rows`` has none)."""
    if not rows or rows[0].get("benchmark") != "machine":
        rows = [machine_record(), *rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def format_rows(rows: list[dict]) -> str:
    """One fixed-width table per benchmark name."""
    out = []
    for name, group in groupby(rows, key=lambda r: r["benchmark"]):
        group = [{k: v for k, v in r.items() if k != "benchmark"} for r in group]
        keys = list(dict.fromkeys(k for r in group for k in r))
        widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in group)) for k in keys}
        out.append(f"\n## {name}")
        out.append("  ".join(k.ljust(widths[k]) for k in keys))
        out += ["  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys) for r in group]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    machine = machine_record()
    rows: list[dict] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            print(f"(skipping {name}: {err})")
            continue
        rows += module.run(quick=args.quick)
    machine["load_1min_at_end"] = round(os.getloadavg()[0], 2)  # other processes compete for the cores
    rows.insert(0, machine)
    print(format_rows(rows))
    write_results(rows, RESULTS / ("quick.json" if args.quick else "latest.json"))


if __name__ == "__main__":
    main()
