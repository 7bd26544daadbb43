"""Render docs/benchmarks.md from the recorded runs in benchmarks/results/*.json.

    python -m benchmarks.report            # print the page
    python -m benchmarks.report --write    # write docs/benchmarks.md
    python -m benchmarks.report --check    # exit 1 if docs/benchmarks.md is not the rendered page

Each JSON file is one run of ``python -m benchmarks`` (a list of rows; the row whose ``benchmark``
is ``"machine"`` describes the machine). ``quick.json``, the ``--quick`` smoke run, is not a result
and is left out. A run states its CPU through ``cpu_model`` (or ``cpu``) and ``cpu_flags`` (a list or
a string) in its machine row; a run without them is shown as "CPU not recorded". Where several runs
share a CPU model, the newest (by its recorded time) is the one shown, so the page has one row per
CPU model measured. Dates are used to pick that run, never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
NOT_RECORDED = "CPU not recorded"
SKIPPED = {"quick.json"}

# The headings of known columns; any other key is shown as it is.
HEADINGS = {
    "row": "row",
    "tokens_per_s": "tokens/s",
    "against": "against",
    "against_tokens_per_s": "its tokens/s",
    "ratio": "ratio",
    "target": "target",
    "met": "met",
    "weights": "weights",
    "runner": "runner",
    "after_load_MB": "after load (MB)",
    "after_generate_MB": "after generate (MB)",
    "peak_MB": "peak (MB)",
    "ratio_vs_transformers": "peak vs transformers",
    "context": "context",
    "kv_cache_ms": "with KV cache (ms)",
    "no_cache_ms": "without (ms)",
    "speedup": "speed-up",
    "weights_read_MB": "weights read (MB)",
    "copy_bandwidth_GBps": "copy bandwidth (GB/s)",
    "limit_tokens_per_s": "limit (tokens/s)",
    "measured_tokens_per_s": "measured (tokens/s)",
    "fraction_of_limit": "fraction of the limit",
    "model": "model",
    "target_ms": "target (ms)",
    "ms": "in Python (ms)",
    "clicks": "clicks",
    "browser_ms": "in the browser (ms)",
    "run": "run",
    "tokens": "tokens",
    "forward_passes": "forward passes",
    "tokens_per_pass": "tokens per pass",
    "speedup_vs_plain": "vs its plain run",
    "same_tokens": "same tokens",
}

TITLES = {"ms per new token vs context": "milliseconds per new token vs context"}

# What each benchmark measures, said once above its table.
ABOUT = {
    "decode targets (greedy, batch 1)": "Greedy decoding, batch 1, with the KV cache, 128 new tokens. Each ratio compares two runners "
    "timed in the same run, taking turns. The GEMV ceiling is one matrix-vector pass over all of the "
    "model's matrices per token, the most a decoder that reads every weight once can reach. The "
    "`lever` rows time the engine against itself with its own kernels switched off "
    "(`cyclelab.kernels.torch_float32()`).",
    "memory, smollm2 load + generate (RSS, MB)": "Resident memory of one process loading `smollm2` and generating, each runner in its own "
    "process. The int8 peak is the conversion, while the float32 file is read; the engine's kernels "
    "read the weights where they are, with no second copy.",
    "ms per new token vs context": "Milliseconds per new `smollm2` token as the context grows, with the KV cache and recomputing "
    "every position (figure: `benchmarks/results/kv_cache_scaling.png`).",
    "decode vs memory bandwidth, smollm2 float32": "Every decode step reads all of `smollm2`'s weight matrices once; a large tensor copy gives the "
    "machine's bandwidth, and so a limit in tokens per second (this row times 64 tokens).",
    "debugger next-token latency": "Median time of 10 **Next token** steps after the prefill: in Python, to every view re-rendered; "
    "in the browser (the last record of `tests/test_browser_view.py`, JupyterLab under Chromium), "
    "from the click to the updated panel.",
    "prompt lookup, smollm2 chat, Folio to modern spelling, <= 64 tokens": "Prompt-lookup speculative decoding (`benchmarks/bench_speculative.py`): drafts of 5 tokens copied "
    "from the prompt, verified in one forward pass; `same tokens` says the output equals the plain "
    "greedy run's.",
}


def load_runs(folder: Path = RESULTS) -> list[tuple[str, list[dict]]]:
    """(file name, rows) of every recorded run in ``folder``, by file name; the smoke run left out."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        if path.name in SKIPPED:
            continue
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "benchmark" in r for r in rows):
            raise ValueError(f"{path}: expected a list of rows, each with a 'benchmark' key")
        runs.append((path.name, rows))
    return runs


def machine(rows: list[dict]) -> dict:
    return next((r for r in rows if r["benchmark"] == "machine"), {})


def cpu_model(rows: list[dict]) -> str:
    m = machine(rows)
    return str(m.get("cpu_model") or m.get("cpu") or NOT_RECORDED)


def cpu_flags(rows: list[dict]) -> str:
    flags = machine(rows).get("cpu_flags")
    if not flags:
        return "not recorded"
    return ", ".join(flags) if isinstance(flags, list) else str(flags)


def one_run_per_cpu(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, list[dict]]]:
    """The newest run of each CPU model (by the machine row's recorded time), in order of CPU model."""
    newest: dict[str, tuple[str, list[dict]]] = {}
    for name, rows in runs:
        cpu = cpu_model(rows)
        when = str(machine(rows).get("date_utc", ""))
        if cpu not in newest or when >= str(machine(newest[cpu][1]).get("date_utc", "")):
            newest[cpu] = (name, rows)
    return [newest[cpu] for cpu in sorted(newest)]


def cell(value) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value is None or value == "-":
        return "—"
    return str(value).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render(runs: list[tuple[str, list[dict]]] | None = None) -> str:
    runs = load_runs() if runs is None else runs
    chosen = one_run_per_cpu(runs)
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks.report --write` from benchmarks/results/*.json: "
        "do not edit by hand (tests/test_docs.py checks it). -->",
        "",
        "`bash scripts/dev.sh bench` (or `.venv/bin/python -m benchmarks`) measures the engine, "
        "`transformers` and the debugger side by side in one run and writes "
        "`benchmarks/results/latest.json` (its first row records the machine and its load) and the "
        "figures beside it; `--quick` is a smoke test that writes `quick.json`, which this page leaves "
        "out. To keep a run from another machine, copy `latest.json` to a name of its own in "
        "`benchmarks/results/`; then `python -m benchmarks.report --write` renders this page again.",
        "",
        "Every number below is from the CPU its row names, with the threads and the load recorded for "
        "its run. Speed ratios are measured within one run, the runners taking turns, and move from run "
        "to run on a shared machine: they describe that CPU, not the engine on every machine.",
        "",
        "## Runs",
        "",
    ]
    if not chosen:
        return "\n".join(out + ["No run is recorded in `benchmarks/results/`.", ""])
    run_rows = []
    for name, rows in chosen:
        m = machine(rows)
        load = f"{cell(m.get('load_1min_at_start'))} → {cell(m.get('load_1min_at_end'))}"
        run_rows.append(
            [
                cpu_model(rows),
                cpu_flags(rows),
                f"`{name}`",
                cell(m.get("cpus")),
                cell(m.get("torch_threads")),
                cell(m.get("torch")),
                load,
            ]
        )
    out += table(
        ["CPU", "flags", "results file", "cores", "torch threads", "torch", "load (1 min) start → end"], run_rows
    )
    out += ["", "## Decode speed, one row per CPU", ""]
    out += summary(chosen)
    benchmarks = list(dict.fromkeys(r["benchmark"] for _, rows in chosen for r in rows if r["benchmark"] != "machine"))
    for bench in benchmarks:
        title = TITLES.get(bench, bench)
        out += ["", f"## {title[0].upper()}{title[1:]}", ""]
        if bench in ABOUT:
            out += [ABOUT[bench], ""]
        keys = list(
            dict.fromkeys(
                k for _, rows in chosen for r in rows if r["benchmark"] == bench for k in r if k != "benchmark"
            )
        )
        body = [
            [cpu_model(rows)] + [cell(r.get(k)) for k in keys]
            for _, rows in chosen
            for r in rows
            if r["benchmark"] == bench
        ]
        out += table(["CPU"] + [HEADINGS.get(k, k) for k in keys], body)
        if bench == "ms per new token vs context" and (RESULTS / "kv_cache_scaling.png").exists():
            out += ["", "![ms per new token with and without the KV cache](../benchmarks/results/kv_cache_scaling.png)"]
    return "\n".join(out) + "\n"


def summary(chosen: list[tuple[str, list[dict]]]) -> list[str]:
    """tokens/s of the engine's main decode rows, one row per CPU."""
    wanted = [
        ("tiny float32: engine, no capture", "transformers.generate", "`tiny` float32"),
        ("smollm2 float32: engine, no capture", "transformers.generate", "`smollm2` float32"),
        ("smollm2 int8: engine", "float32 transformers.generate", "`smollm2` int8"),
    ]
    header = ["CPU"]
    for _, _, label in wanted:
        header += [f"{label} tokens/s", "vs `transformers`"]
    body = []
    for _, rows in chosen:
        line = [cpu_model(rows)]
        for row, against, _ in wanted:
            hit = next((r for r in rows if r.get("row") == row and r.get("against") == against), None)
            line += [cell(hit["tokens_per_s"]), f"{cell(hit['ratio'])}×"] if hit else ["—", "—"]
        body.append(line)
    note = (
        "`vs transformers`: against `transformers.generate` in the same run (for int8, against the float32 `generate`)."
    )
    return table(header, body) + ["", note]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(ROOT)}")
    group.add_argument("--check", action="store_true", help=f"exit 1 if {PAGE.relative_to(ROOT)} is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        PAGE.write_text(page)
    elif args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python -m benchmarks.report --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
