"""The fault campaign: damaged files, refused permissions, full disks, concurrent writers and bad input, each case
in a process of its own, each outcome classified.

    python scripts/fault_campaign.py            # every case (about 10 minutes on 2 cores)
    python scripts/fault_campaign.py --quick    # the cases that need no SmolLM2 load or conversion (~2 minutes)
    python scripts/fault_campaign.py -k trace   # only cases whose name contains "trace"

Every case runs in a child forked from this process (which has torch, transformers and cyclelab imported and
the tiny model loaded, so a case costs milliseconds to start), under a memory limit (``RLIMIT_AS``) and a
timeout: a crash, an OOM or a hang is observed, not suffered. Nothing real is damaged: data/tiny is copied
and the asset cache is rebuilt from hard links (a file is copied before it is changed) under a scratch folder.

Each outcome is one of:

* **OK** — the right answer (a valid input works; a harmless change is ignored);
* **clear** — an error raised by cyclelab whose message names the problem (the file, field or argument)
  and its fix, with no raw errno;
* **unclear** — an error raised inside a library, a raw ``[Errno …]``, or a message naming neither;
* **silent** — a wrong result or a damaged file accepted;
* **crash** — a signal, an OOM, a hang.

It prints the counts per category and every case that is neither OK nor clear; the exit status is 1 if any.
Run it as root (permission cases drop to ``nobody``; disk cases mount small tmpfs folders).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fault_cases import CATEGORIES, Case  # noqa: E402  (scripts/fault_cases.py, fault_inputs.py: the families)
from fault_inputs import all_cases  # noqa: E402

MEMORY = 6 << 30  # RLIMIT_AS of a case: torch maps a lot of address space it never touches
FIX = re.compile(
    r"to repair|repair|\brun\b|\buse\b|must|choose|expected|should|\bgive\b|\bpass\b|\bfix\b|\bset\b|install|"
    r"remove|delete|\bcheck\b|one of|between|at least|at most|\bneeds?\b|free|chmod|sudo|admin|restore|"
    r"save .* again|record .* again|again with|\bwant\b|\bonly\b|instead|e\.g\.|choices|\(ids \d|settings are|"
    r"a prompt is|press|open it with|load with|converts .* once|make it again|(write|record) \w+ with|takes|point|loosen",
    re.I,
)
RAW_TYPES = {
    "KeyError", "IndexError", "AttributeError", "AssertionError", "ZeroDivisionError", "UnboundLocalError",
    "NameError", "error", "JSONDecodeError", "UnicodeDecodeError", "RecursionError", "OverflowError",
    "SafetensorError", "HeaderTooLarge", "MemoryError", "StopIteration",
}  # fmt: skip


def run_child(case: Case, scratch: Path, write_fd: int) -> None:
    """In the forked child: limit memory, set up, call, report one JSON line on ``write_fd``."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    os.setsid()
    ctx = {"dir": scratch, "case": case}
    os.chdir(scratch)
    report: dict
    try:
        if case.setup:
            case.setup(ctx)
        if case.user == "nobody":
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        value = case.call(ctx)
        report = {"kind": "value", "value": value if isinstance(value, (bool, int, float, str)) else repr(value)}
        if case.check is not None:
            try:
                report["right"] = bool(case.check(value))
            except Exception as err:  # a check that cannot read the value: the value is wrong
                report["right"] = False
                report["value"] = f"{report['value']!s:.300} (check failed: {err!r})"
    except BaseException as err:  # noqa: BLE001  (SystemExit from a CLI is an outcome too)
        frames = traceback.extract_tb(err.__traceback__)
        where = frames[-1].filename if frames else ""
        report = {
            "kind": "error",
            "type": type(err).__name__,
            "msg": str(err)[:2000],
            "where": where,
            "ours": "/cyclelab/" in where or type(err).__name__ == "Refused",
        }
    os.write(write_fd, (json.dumps(report, default=repr) + "\n").encode())
    os._exit(0)


def run_case(case: Case, base: Path) -> tuple[str, str]:
    """Fork, wait (up to the case's timeout), classify: (verdict, what happened)."""
    scratch = Path(tempfile.mkdtemp(prefix="case-", dir=base))
    scratch.chmod(0o777)  # a case run as nobody may write its own folder
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            run_child(case, scratch, write_fd)
        finally:
            os._exit(3)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + case.timeout
    while True:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return "crash", f"hung: no answer in {case.timeout:.0f} s"
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(scratch, ignore_errors=True)
    text = b"".join(chunks).decode(errors="replace").strip()
    if os.WIFSIGNALED(status) or not text:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        return "crash", f"killed by signal {sig}" if sig else f"exit {os.WEXITSTATUS(status)} without an answer"
    return classify(case, json.loads(text.splitlines()[-1]))


def classify(case: Case, report: dict) -> tuple[str, str]:
    if report["kind"] == "value":
        shown = f"returned {str(report['value'])[:300]}"
        if case.expect == "error":
            return "silent", shown + " (should have been refused)"
        if report.get("right", True):
            return "OK", shown
        return ("clear" if case.notes.get("refusal") else "silent"), shown
    message, kind = report["msg"], report["type"]
    shown = f"{kind}: {message[:600]}"
    if kind in ("MemoryError",):
        return "crash", shown
    if case.expect == "ok":
        return "unclear", shown + " (refused a valid input)"
    if kind in RAW_TYPES or "[Errno" in message or "Traceback" in message:
        return "unclear", shown
    if kind == "RuntimeError" and not case.notes.get("runtime_ok"):  # torch's C++ errors pass through Python frames
        return "unclear", shown + " (a plain RuntimeError: torch's, not cyclelab's)"
    if not report["ours"]:
        return "unclear", shown + f" (raised in {report['where']})"
    missing = [n for n in case.names if n.lower() not in message.lower()]
    if missing:
        return "unclear", shown + f" (does not name {', '.join(missing)})"
    if not FIX.search(message):
        return "unclear", shown + " (names no fix)"
    return "clear", shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out the slow cases (SmolLM2, conversions)")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every case's outcome")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run it as root: permission cases drop to the user nobody, disk cases mount tmpfs")
    base = Path(tempfile.mkdtemp(prefix="cyclelab-faults-"))
    base.chmod(0o755)
    try:
        cases = [c for c in all_cases(base) if args.k in c.name and not (args.quick and c.slow)]
        if args.list:
            for c in cases:
                print(f"{c.category:20} {c.name}")
            return 0
        return report(cases, base, args.verbose)
    finally:
        for mount in sorted(base.glob("**/mnt-*"), reverse=True):
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def report(cases: list[Case], base: Path, verbose: bool) -> int:
    counts: dict[str, Counter] = {c: Counter() for c in CATEGORIES}
    bad = []
    start = time.monotonic()
    for i, case in enumerate(cases, 1):
        verdict, what = run_case(case, base)
        counts[case.category][verdict] += 1
        if verdict not in ("OK", "clear"):
            bad.append((case, verdict, what))
        if verbose or verdict not in ("OK", "clear"):
            print(f"[{i}/{len(cases)}] {verdict:7} {case.category}: {case.name}: {what[:400]}", flush=True)
    verdicts = ("OK", "clear", "unclear", "silent", "crash")
    print(f"\n{len(cases)} cases in {time.monotonic() - start:.0f} s\n")
    print(f"| {'category':20} | cases | " + " | ".join(verdicts) + " |")
    print("|---|---|" + "---|" * len(verdicts))
    total: Counter = Counter()
    for category, count in counts.items():
        if count:
            total += count
            print(f"| {category:20} | {sum(count.values()):5} | " + " | ".join(str(count[v]) for v in verdicts) + " |")
    print(f"| {'all':20} | {sum(total.values()):5} | " + " | ".join(str(total[v]) for v in verdicts) + " |")
    if bad:
        print("\nneither OK nor clear:")
        for case, verdict, what in bad:
            print(f"  {verdict:7} {case.category}: {case.name}\n          {what}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
